"""Command-line entry helpers shared by `python -m worker` and `python -m router`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

S = TypeVar("S")


def settings_or_exit(parse: Callable[[list[str] | None], S], argv: list[str] | None) -> S:
    """Parsed settings, or exit 2 with one line per bad setting (never a pydantic traceback)."""
    try:
        return parse(argv)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"cannot read the configuration: {exc}", file=sys.stderr)
    raise SystemExit(2)
