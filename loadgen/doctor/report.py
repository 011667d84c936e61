"""The prefix doctor's report: an Analysis as rounded JSON, as markdown, and as a two-panel plot. Nothing from the
prompts appears but the findings' masked examples."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from loadgen.doctor.findings import Analysis, Finding

DIGITS = 4  # decimals of ratios in the JSON
SECONDS_DIGITS = 3
SOURCES = {"requests": "loadgen request JSONL", "openai": "OpenAI request log", "mooncake": "Mooncake trace"}


def _round(v: Any, digits: int = DIGITS) -> Any:
    if isinstance(v, float):
        return round(v, digits)
    if isinstance(v, dict):
        return {k: _round(x, digits) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x, digits) for x in v]
    return v


def to_json(analysis: Analysis) -> dict[str, Any]:
    """dataclasses.asdict, ratios rounded to DIGITS decimals and seconds to SECONDS_DIGITS."""
    d = dataclasses.asdict(dataclasses.replace(analysis, chains=None))
    d.pop("chains")
    seconds = d.pop("seconds")
    d = _round(d)
    d["seconds"] = _round(seconds, SECONDS_DIGITS)
    return d


def _cell(text: str) -> str:
    """Text safe in a markdown table cell: `|` escaped, newlines shown as ⏎."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎")


def _code(text: str) -> str:
    """A markdown code span holding `text` (masked, so its * and _ are not formatting)."""
    text = text.replace("|", "\\|").replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎")
    if not text:
        return ""
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or ticks != "`" else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def of_ceiling(ratio: float, ceiling: float) -> float:
    """A policy's cached ratio as a share of the ideal ceiling (1.0 when the ceiling is 0: nothing to miss)."""
    return ratio / ceiling if ceiling > 0 else 1.0


def short_hint(hint: str) -> str:
    """The hint's cause, without its advice: 'looks like a date/time'."""
    return hint.split(":", 1)[0]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _finding_row(k: int, f: Finding, prompt_tokens: int, versions: bool) -> list[str]:
    return [str(k), _cell(f.tenant) or "-", f"{f.start}-{f.end}", str(f.requests),
            f"{f.tokens_lost:,} ({_pct(f.tokens_lost / max(1, prompt_tokens))})", _pct(f.ceiling_fixed),
            f.fix, _cell(f.hint), _code(f.example)] + ([_cell(", ".join(f.versions)) or "-"] if versions else [])


def _groups(title: str, name: str, groups: dict[str, dict]) -> list[str]:
    rows = [[_cell(k) or "-", str(g["requests"]), f"{g['prompt_tokens']:,}", _pct(g["ceiling"]),
             _pct(g["ceiling_fixed"])] for k, g in groups.items()]
    return ["", f"## {title}", "", *_table([name, "requests", "prompt tokens", "ceiling now", "ceiling fixed"], rows)]


def markdown(analysis: Analysis) -> str:
    a = analysis
    lines = ["# Prefix doctor", "",
             f"- requests: {a.requests:,} ({SOURCES.get(a.source, a.source)})",
             f"- prompt tokens: {a.prompt_tokens:,} (cache blocks of {a.block_tokens} tokens)",
             f"- ideal ceiling now (one infinite cache): {_pct(a.ceiling)} of prompt tokens cached",
             f"- ideal ceiling with every finding fixed: {_pct(a.ceiling_fixed)}"]
    if a.seconds:
        lines.append("- seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in a.seconds.items()))
    if a.policy:
        rows = [[str(p["workers"]), p["policy"], _pct(p["ratio"]), _pct(of_ceiling(p["ratio"], a.ceiling)),
                 _pct(p["pooled"])] for p in a.policy]
        lines += ["", "## Routing policies (simulated, traffic as it is now)", "",
                  *_table(["workers", "policy", "cached ratio", "% of the ideal ceiling",
                           "pooled cache of the fleet's size"], rows)]
    lines += ["", "## Findings", ""]
    if a.findings:
        versions = len(a.versions) > 1  # which prefix versions a finding is in
        lines += _table(["#", "tenant", "tokens", "requests", "tokens lost", "ceiling if fixed", "fix", "hint",
                         "example (masked)"] + (["prefix versions"] if versions else []),
                        [_finding_row(k, f, a.prompt_tokens, versions) for k, f in enumerate(a.findings, 1)])
        lines += ["", "Tokens are positions in the prompt as the worker tokenizes it; the example shows the span "
                      "in [brackets], digits masked as 0 and letters as A/a."]
    else:
        lines.append("No findings: nothing was found that breaks a prefix the requests share.")
    if len(a.tenants) > 1:
        lines += _groups("Tenants", "tenant", a.tenants)
    if len(a.versions) > 1:
        lines += _groups("Prefix versions", "version", a.versions)
    if a.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in a.notes]]
    return "\n".join(lines) + "\n"


def plot(analysis: Analysis, path: Path) -> Path:
    """Tokens lost per finding, and the hit ratio now against fixed (the ideal and each simulated policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    a = analysis
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.5 * len(a.findings) + 2)))
    if a.findings:
        labels = [f"#{k} {f.start}-{f.end}: {short_hint(f.hint)}" for k, f in enumerate(a.findings, 1)]
        left.barh(range(len(labels)), [f.tokens_lost for f in a.findings], height=0.6, color="tab:red")
        left.set_yticks(range(len(labels)), labels, fontsize=8)
        left.invert_yaxis()
        left.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        left.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    else:
        left.text(0.5, 0.5, "no findings", ha="center", va="center", transform=left.transAxes)
        left.set_yticks([])
    left.set(xlabel="prompt tokens re-prefilled", title="Tokens lost per finding")

    names = ["ideal now", "ideal fixed"] + [f"{p['policy']}\n{p['workers']} workers" for p in a.policy]
    values = [a.ceiling, a.ceiling_fixed] + [p["ratio"] for p in a.policy]
    colors = ["tab:gray", "tab:green"] + ["tab:blue"] * len(a.policy)
    right.bar(range(len(names)), values, color=colors)
    right.set_xticks(range(len(names)), names, fontsize=7, rotation=30, ha="right")
    for x, v in enumerate(values):
        right.text(x, v, f"{100 * v:.0f}%", ha="center", va="bottom", fontsize=7)
    right.set(ylabel="cached / prompt tokens", ylim=(0, 1.05), title="Hit ratio now vs fixed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
