"""``wayang-mq keys new``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    p = sub.add_parser("keys", help="manage Ed25519 signing keys")
    ksub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = ksub.add_parser("new", help="write a new keypair: <id>.key and <id>.pub")
    new.add_argument("--dir", type=Path, required=True, help="directory for the key files")
    new.set_defaults(func=_cmd_keys_new)


def _cmd_keys_new(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.core.signing import write_keypair

    private_path, public_path = write_keypair(args.dir)
    print(f"private key {private_path} (keep secret: publishers sign with it)")
    print(f"public key  {public_path} (copy to receivers' key directories)")
    return Exit.OK
