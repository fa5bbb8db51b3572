"""``wayang-mq secrets keygen/set/list/rm``: the Fernet-encrypted secrets file a worker reads
with ``--secrets fernet:FILE``. Values are read from stdin (or a prompt), never from the
command line (it shows in ``ps`` and shell history), and never printed."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings
from wayang_mq.core.errors import ConfigError


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    p = sub.add_parser("secrets", help="edit an encrypted secrets file (values never printed)")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    keygen = ssub.add_parser("keygen", help="write a new Fernet key to a file (0600)")
    keygen.add_argument("--out", type=Path, required=True, help="the key file to create")
    keygen.set_defaults(func=_cmd_keygen)

    def file_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--file", type=Path, required=True, help="the encrypted secrets file")
        parser.add_argument(
            "--key-file", type=Path, help="its key (default WAYANG_SECRETS_KEY(_FILE))"
        )

    set_ = ssub.add_parser("set", help="store a secret; the value is read from stdin")
    set_.add_argument("name", help="the secret's name, as tasks reference it")
    file_args(set_)
    set_.set_defaults(func=_cmd_set)

    list_ = ssub.add_parser("list", help="the names stored (never the values)")
    file_args(list_)
    list_.set_defaults(func=_cmd_list)

    rm = ssub.add_parser("rm", help="remove a secret")
    rm.add_argument("name")
    file_args(rm)
    rm.set_defaults(func=_cmd_rm)


def _cmd_keygen(args: argparse.Namespace, settings: Settings) -> int:
    from cryptography.fernet import Fernet

    from wayang_mq.core.private_files import write_private

    if args.out.exists():
        # A key replaced is a secrets file lost: never overwrite one.
        raise ConfigError(f"{args.out} exists", hint="choose another path, or remove it first")
    write_private(args.out, Fernet.generate_key() + b"\n")
    print(f"key written to {args.out} (0600); point WAYANG_SECRETS_KEY_FILE at it")
    return Exit.OK


def _cmd_set(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.core.redact import MIN_LENGTH
    from wayang_mq.security.providers import read_secrets_file, write_secrets_file

    _check_name(args.name)
    fernet = _fernet(args, settings)
    values = read_secrets_file(args.file, fernet)
    value = _read_value(args.name)
    if len(value) < MIN_LENGTH:
        raise ConfigError(f"the value must have at least {MIN_LENGTH} characters")
    replaced = args.name in values
    values[args.name] = value
    write_secrets_file(args.file, fernet, values)
    print(
        f"{'replaced' if replaced else 'added'} {args.name} in {args.file} ({len(values)} secrets)"
    )
    return Exit.OK


def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.security.providers import read_secrets_file

    for name in sorted(read_secrets_file(args.file, _fernet(args, settings))):
        print(name)
    return Exit.OK


def _cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.security.providers import read_secrets_file, write_secrets_file

    fernet = _fernet(args, settings)
    values = read_secrets_file(args.file, fernet)
    if values.pop(args.name, None) is None:
        raise ConfigError(f"no secret {args.name!r} in {args.file}")
    write_secrets_file(args.file, fernet, values)
    print(f"removed {args.name} from {args.file} ({len(values)} secrets)")
    return Exit.OK


def _fernet(args: argparse.Namespace, settings: Settings) -> Any:
    from wayang_mq.config import secrets_key
    from wayang_mq.security.providers import fernet_of

    if args.key_file is not None:
        settings = settings.model_copy(
            update={"secrets_key": None, "secrets_key_file": args.key_file}
        )
    return fernet_of(secrets_key(settings))


def _check_name(name: str) -> None:
    from wayang_mq.security.secrets import NAME_RULE, valid_name

    if not valid_name(name):
        raise ConfigError(f"{name!r} is not a secret name", hint=NAME_RULE)


def _read_value(name: str) -> str:
    """The value from a prompt that does not echo, or from stdin (one trailing newline
    dropped), so it never appears in argv."""
    if sys.stdin.isatty():
        return getpass.getpass(f"value of {name} (not echoed): ")
    return sys.stdin.read().removesuffix("\n").removesuffix("\r")
