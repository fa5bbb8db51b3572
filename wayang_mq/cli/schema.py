"""``wayang-mq schema``: the wire's JSON Schemas, for clients in other languages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    p = sub.add_parser("schema", help="print or write the JSON Schema of every wire message type")
    p.add_argument(
        "--out", type=Path, help="write <type>.json files into this directory (e.g. docs/schema)"
    )
    p.add_argument("type", nargs="?", help="one message type, e.g. wayang.task.v1 (default: all)")
    p.set_defaults(func=_cmd_schema)


def _cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.core.errors import ConfigError
    from wayang_mq.core.schema import all_schemas, write_schemas

    if args.out is not None:
        for path in write_schemas(args.out):
            print(path)
        return Exit.OK
    schemas = all_schemas()
    if args.type is not None:
        if args.type not in schemas:
            raise ConfigError(
                f"unknown message type {args.type!r}", hint=f"one of {', '.join(schemas)}"
            )
        schemas = {args.type: schemas[args.type]}
    print(json.dumps(schemas if args.type is None else schemas[args.type], indent=2))
    return Exit.OK
