"""What a span that breaks shared prefixes looks like, said without showing it: a plain hint from the span's
texts across requests, and a masked example (digits and letters replaced by their class, punctuation kept), so
a report never carries raw prompt text."""

from __future__ import annotations

import re
from collections.abc import Sequence

_DATE = re.compile(
    r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}/\d{1,2}/\d{2,4}|\d{1,2}:\d{2}"
    r"|\b(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\b|\b(mon|tue|wed|thu|fri|sat|sun)[a-z]*day\b",
    re.IGNORECASE)
_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-|\b(?=[0-9A-Za-z_-]*\d)(?=[0-9A-Za-z_-]*[A-Za-z])[0-9A-Za-z_-]{8,}\b"
                 r"|\b[0-9a-fA-F]{12,}\b")
_NUMBER = re.compile(r"^[\s\d.,:+-]*\d[\s\d.,:+-]*$")

ORDER = "items in varying order: sort them (a tool or document list)"
DATE = "looks like a date/time: move it after the shared part (the end of the prompt) or round it"
ID = "looks like an id: move it to the end of the prompt"
USER = "varies per user (a name or account detail): move it to the end of the prompt"
NUMBER = "a number that varies per request: move it to the end of the prompt"
REQUEST = "varies per request: move it to the end of the prompt"


def hint(spans: Sequence[str], ordered: bool = False) -> str:
    """The likeliest cause, from the span's texts in (a sample of) the requests it affects."""
    if ordered:
        return ORDER
    share = max(1, len(spans)) * 0.5
    if sum(bool(_DATE.search(s)) for s in spans) >= share:
        return DATE
    if sum(bool(_ID.search(s)) for s in spans) >= share:
        return ID
    if sum(bool(_NUMBER.match(s)) for s in spans) >= share:
        return NUMBER
    if len(set(spans)) <= 0.5 * len(spans):  # values repeat: a per-user (or per-account) field
        return USER
    return REQUEST


def mask(text: str) -> str:
    """Digits -> 0, upper-case letters -> A, other letters -> a; everything else kept."""
    return "".join("0" if c.isdigit() else ("A" if c.isupper() else "a") if c.isalpha() else c for c in text)


def example(before: str, span: str, after: str) -> str:
    """One request's span in its shared context, all masked, the span in brackets (a long one cut in the
    middle)."""
    if len(span) > 120:
        span = span[:60] + " … " + span[-40:]
    return mask(before[-24:]) + "[" + mask(span) + "]" + mask(after[:24])
