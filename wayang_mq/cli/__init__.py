"""The ``wayang-mq`` command, one module per verb. Settings are read here, once, and passed down.

Every failure the user can cause or fix (bad input, unreachable broker, a full queue) ends as
one line on stderr, ``wayang-mq: error: <what> (<what to do>)``, and a distinct exit code.
A verb's module (and what it imports) loads only when that verb runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from wayang_mq import __version__
from wayang_mq.cli import (
    access,
    control,
    controlplane,
    dead,
    dev,
    events,
    keys,
    records,
    schema,
    secrets,
    submit,
    top,
    topology,
    usage,
    worker,
)
from wayang_mq.cli.exits import Exit, exit_code_for
from wayang_mq.config import Settings, redact_credentials
from wayang_mq.core import logs
from wayang_mq.core.errors import WayangError

__all__ = ["Exit", "build_parser", "exit_code_for", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand names its handler in ``func``."""
    parser = argparse.ArgumentParser(
        prog="wayang-mq", description="Wayang's execution fabric on RabbitMQ."
    )
    parser.add_argument("--version", action="version", version=f"wayang-mq {__version__}")
    parser.add_argument("--log-level", default="INFO", help="daemon log level (default INFO)")
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=None,
        help="log lines as JSON objects or readable text; auto (the default, or "
        "WAYANG_LOG_FORMAT): text on a terminal, JSON otherwise",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in (
        dev,
        topology,
        access,
        keys,
        secrets,
        worker,
        submit,
        control,
        dead,
        controlplane,
        records,
        events,
        usage,
        schema,
        top,
    ):
        verb.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wayang-mq`` script."""
    args = build_parser().parse_args(argv)
    try:
        log_format = logs.resolve_format(args.log_format, os.environ.get("WAYANG_LOG_FORMAT"))
    except ValueError as exc:
        print(f"wayang-mq: error: WAYANG_LOG_FORMAT: {exc}", file=sys.stderr)
        return Exit.USAGE
    logs.configure(args.log_level, log_format)
    try:
        settings = Settings()
        redact_credentials(settings)  # no log line shows the configured passwords
        code = int(args.func(args, settings))
    except WayangError as exc:
        print(f"wayang-mq: error: {exc.one_line()}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    return code
