"""Synthetic workloads as timed OpenAI requests: Zipf-popular system prompts, RAG documents, growing
multi-turn chats, several tenants, and chats with a known prefix-cache killer (a timestamp, the user's name or
a shuffled tool list early in the system prompt) for the prefix doctor. Deterministic for a seed."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from loadgen.traces import RecordedRequest

KINDS = ("zipf", "rag", "multiturn", "tenants", "killers")
KILLERS = ("timestamp", "username", "tools", "clean")
_WORDS = ("account order parcel route invoice refund policy warranty delivery store price stock label customer "
          "address return window carrier express region tax discount member support ticket status").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _zipf_pick(rng: random.Random, n: int, s: float) -> int:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def generate(kind: str, requests: int, rate: float, seed: int = 0, prompts: int = 20, zipf_s: float = 1.1,
             prompt_words: int = 400, max_tokens: int = 32, turns: int = 5,
             tenants: list[str] | None = None, killer: str = "timestamp",
             fixed: bool = False) -> list[RecordedRequest]:
    """`requests` requests at `rate` per second (Poisson arrivals). `killer` and `fixed`: see `killers`."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic workload {kind!r}; one of {', '.join(KINDS)}")
    if kind == "killers":
        return killers(requests, rate, killer, fixed, seed, max_tokens)
    rng = random.Random(seed)
    systems = [f"You are assistant #{i}. " + _text(random.Random(seed * 1000 + i), prompt_words)
               for i in range(prompts)]
    t = 0.0
    out: list[RecordedRequest] = []
    conversations: dict[int, list[dict[str, str]]] = {}

    def chat(messages: list[dict[str, str]], **extra) -> dict:
        return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}

    makers: dict[str, Callable[[int], dict]] = {}

    def zipf(i: int) -> dict:
        sp = systems[_zipf_pick(rng, prompts, zipf_s)]
        return chat([{"role": "system", "content": sp}, {"role": "user", "content": _text(rng, 12) + "?"}])

    def rag(i: int) -> dict:
        doc = systems[_zipf_pick(rng, prompts, zipf_s)]
        return chat([{"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {_text(rng, 10)}?"}])

    def multiturn(i: int) -> dict:
        c = rng.randrange(max(1, requests // turns))
        msgs = conversations.setdefault(c, [{"role": "system", "content": systems[c % prompts]}])
        if len(msgs) > 1:  # the previous answer, as a client would send it back (loadgen does not wait for it)
            msgs.append({"role": "assistant", "content": _text(rng, 20)})
        msgs.append({"role": "user", "content": _text(rng, 12) + "?"})
        return chat(list(msgs), user=f"conversation-{c}")

    makers.update(zipf=zipf, rag=rag, multiturn=multiturn)
    for i in range(requests):
        t += rng.expovariate(rate) * 1000
        if kind == "tenants":
            body = makers[rng.choice(("zipf", "rag", "multiturn"))](i)
            key = (tenants or ["tenant-0"])[rng.randrange(len(tenants or [0]))]
            body["_api_key"] = key  # replay turns it into the Authorization header, never into the body
        else:
            body = makers[kind](i)
        out.append(RecordedRequest(timestamp=t, endpoint="/v1/chat/completions", body=body))
    return out


# ---- prefix-cache killers ---------------------------------------------------------------------------------

_START = datetime(2026, 12, 2, 9, 0, 0, tzinfo=timezone.utc)  # arrival time 0 of a killers workload
_BRAND = "You are the support assistant of Acme Parcel."
_USER_PREAMBLE = (_BRAND + " Answer questions about parcels, deliveries, returns and refunds politely and briefly. "
                  "Never promise a delivery date the tracking data does not show, and never ask for a password or "
                  "a full card number.")
_TOOLS_PREAMBLE = (_BRAND + " You can call tools to look things up; call one only when the question needs "
                   "data you do not have, and say which tool you used.")
_TOOLS = {"track_parcel": "the latest scan events of a tracking number",
          "find_order": "an order by its number or the customer's email",
          "refund_status": "where a refund stands and when it pays out",
          "create_return": "a return label for an order line",
          "list_stores": "pick-up points near a postcode",
          "delivery_slots": "free delivery windows for an address",
          "update_address": "change the delivery address of a parcel not yet shipped",
          "open_ticket": "hand the case to a human agent"}
_FIRST = ("Priya Mateo Aisha Lukas Sofia Kenji Amara Tomasz Leila Diego Ingrid Kwame Hana Rafael Zoe Omar Elif "
          "Jonas Mei Tariq").split()
_LAST = ("Raman Silva Okafor Novak Rossi Tanaka Haddad Berg Moreau Kowalski Nguyen Adeyemi Larsen Costa Fischer "
         "Sato Mendes Ibrahim Walsh Petrov").split()
_NAME_SENTENCE = re.compile(r"The user's name is [A-Z][a-z]+ [A-Z][a-z]+\.")
_TIME_SENTENCE = re.compile(r"Current time: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\.")
_TOOL_BLOCK = re.compile(r"Tools:(?:\n- \w+: [^\n]*){%d}" % len(_TOOLS))


def _instructions() -> str:
    """The long static part every killers request shares (~1500 tokens, one token a word)."""
    rng = random.Random(1234)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(14)).capitalize() + "." for _ in range(100)]
    return "Instructions:\n" + " ".join(sentences)


def killer_text(body: dict) -> str | None:
    """The killer in a killers request (the time sentence, the name sentence or the tool block), wherever it
    sits; None when it has none."""
    for m in body.get("messages", []):
        for pattern in (_TIME_SENTENCE, _NAME_SENTENCE, _TOOL_BLOCK):
            found = pattern.search(m.get("content") or "")
            if found:
                return found.group(0)
    return None


def killers(requests: int, rate: float, killer: str = "timestamp", fixed: bool = False, seed: int = 0,
            max_tokens: int = 32) -> list[RecordedRequest]:
    """Support chats: a short preamble, then the killer (the arrival time in ISO seconds; the user's name, ~30
    users who come back; the 8 tools in a random order), then ~1500 tokens of instructions every request shares,
    then a unique question. `fixed`: the time or name moved to the end of the user message, the tools sorted.
    "clean": the same prompt without a killer."""
    if killer not in KILLERS:
        raise ValueError(f"unknown killer {killer!r}; one of {', '.join(KILLERS)}")
    rng = random.Random(seed)
    names = [f"{rng.choice(_FIRST)} {rng.choice(_LAST)}" for _ in range(30)]
    instructions = _instructions()
    t = 0.0
    out = []
    for _ in range(requests):
        t += rng.expovariate(rate) * 1000
        question = _text(rng, 14).capitalize() + "?"
        if killer == "timestamp":
            now = (_START + timedelta(milliseconds=t)).strftime("%Y-%m-%dT%H:%M:%SZ")
            head, tail = _BRAND, f"Current time: {now}."
        elif killer == "username":
            head, tail = _USER_PREAMBLE, f"The user's name is {rng.choice(names)}."
        elif killer == "tools":
            tools = list(_TOOLS)
            rng.shuffle(tools)
            block = "Tools:\n" + "\n".join(f"- {k}: {_TOOLS[k]}" for k in (sorted(tools) if fixed else tools))
            head, tail = f"{_TOOLS_PREAMBLE}\n{block}", ""
        else:
            head, tail = _BRAND, ""
        if tail and not fixed:
            head, tail = f"{head} {tail}", ""
        system = f"{head}\n\n{instructions}"
        user = f"{question}\n\n{tail}" if tail else question
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "max_tokens": max_tokens, "temperature": 0}
        out.append(RecordedRequest(timestamp=t, endpoint="/v1/chat/completions", body=body))
    return out
