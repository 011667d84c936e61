"""How a benchmark hands over its results: the JSON document and the markdown table on stdout, and with --out,
NAME.json and NAME.md (a header line, the table, notes) in that folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(doc: dict[str, Any], md: str, out: Path | None, name: str, header: str, notes: str = "") -> None:
    print(json.dumps(doc, indent=2))
    print(md)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2))
    (out / f"{name}.md").write_text(f"{header}\n\n{md}\n{notes}")
