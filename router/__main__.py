"""`python -m router`: load the served model's tokenizer, probe the workers and serve the OpenAI API; with
`--processes N`, N processes share the port (SO_REUSEPORT) so one host's router scales past one core. Each
process keeps its own routing state (prefix index, rates, sessions)."""

from __future__ import annotations

import multiprocessing
import sys

from protocol.cli import settings_or_exit
from router.serve import serve
from router.settings import parse_args


def main(argv: list[str] | None = None) -> int:
    settings = settings_or_exit(parse_args, argv)
    if settings.processes == 1:
        return serve(argv)
    ctx = multiprocessing.get_context("spawn")  # no fork after the tokenizer's threads started
    args = list(argv) if argv is not None else sys.argv[1:]
    children = [ctx.Process(target=serve, args=(args,), daemon=True) for _ in range(settings.processes - 1)]
    for c in children:
        c.start()
    try:
        return serve(argv)
    finally:
        for c in children:
            c.terminate()
        for c in children:
            c.join(5)


if __name__ == "__main__":
    sys.exit(main())
