"""Command-line entry helpers shared by `python -m worker`, `python -m router`, `python -m worker.sidecar` and
`python -m loadgen`."""

from __future__ import annotations

import logging
import resource
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


def configure_logging(level: str) -> None:
    """The one log format of every prefixroute process."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard limit: a proxy holds two sockets per request in flight, and
    the common soft default of 1024 would cap it near 500 concurrent requests. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
