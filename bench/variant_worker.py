"""A wayang-mq worker with guarantees switched off, for bench/prices.py only.

    python -m bench.variant_worker --off signatures [--off schema ...] -- <wayang-mq args>

patches this process (bench/variants.py says what each switch removes), then runs
``wayang_mq.cli.main`` with the arguments after ``--``, as ``python -m wayang_mq.cli`` would.
"""

from __future__ import annotations

import argparse
import sys

from bench import variants


def main(argv: list[str] | None = None) -> int:
    """Patch, then be the wayang-mq CLI."""
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit(
            "usage: python -m bench.variant_worker --off SWITCH ... -- <wayang-mq args>"
        )
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m bench.variant_worker")
    parser.add_argument(
        "--off", action="append", default=[], choices=sorted(variants.SWITCHES), metavar="SWITCH"
    )
    args = parser.parse_args(argv[:split])
    variants.apply(args.off)
    from wayang_mq.cli import main as cli_main  # after patching: nothing has bound them yet

    return cli_main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
