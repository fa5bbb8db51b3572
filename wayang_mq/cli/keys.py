"""``wayang-mq keys new|list|rotate|revoke``: Ed25519 keys and what each may sign."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings
from wayang_mq.core.errors import ConfigError


def add(sub: Any) -> None:
    """Register this verb's parsers and handlers."""
    p = sub.add_parser("keys", help="manage Ed25519 signing keys and their scopes")
    ksub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = ksub.add_parser(
        "new", help="write a keypair and its scope: <id>.key, <id>.pub and <id>.toml"
    )
    new.add_argument("--dir", type=Path, required=True, help="directory for the key files")
    new.add_argument(
        "--role",
        default="admin",
        choices=["dispatcher", "executor", "reaper", "control-plane", "admin"],
        help="what the key may sign (default admin: anything; give daemons scoped keys)",
    )
    new.add_argument("--id", dest="identity", help="the dispatcher or executor id it signs as")
    new.add_argument(
        "--capability",
        action="append",
        default=[],
        help="a capability it covers: demo.echo, demo.*, or * (repeat; default *)",
    )
    new.set_defaults(func=_cmd_new)
    ls = ksub.add_parser("list", help="the keys in a directory and their scopes")
    ls.add_argument("--dir", type=Path, required=True)
    ls.set_defaults(func=_cmd_list)
    rot = ksub.add_parser(
        "rotate", help="a new keypair with the same scope; the old one stays until revoked"
    )
    rot.add_argument("key_id")
    rot.add_argument("--dir", type=Path, required=True)
    rot.set_defaults(func=_cmd_rotate)
    rev = ksub.add_parser(
        "revoke", help="stop trusting a key: its files move to DIR/revoked (receivers reload)"
    )
    rev.add_argument("key_id")
    rev.add_argument("--dir", type=Path, required=True)
    rev.set_defaults(func=_cmd_revoke)


def _cmd_new(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.core.scopes import KeyScope, Role, valid_pattern
    from wayang_mq.core.signing import write_keypair

    role = Role(args.role)
    identity = args.identity or ("admin" if role is Role.ADMIN else None)
    if identity is None:
        raise ConfigError(f"a {role.value} key needs --id (the id it signs as)")
    capabilities = tuple(args.capability) or ("*",)
    bad = [c for c in capabilities if not valid_pattern(c)]
    if bad:
        raise ConfigError(f"not a capability pattern: {', '.join(bad)}", hint="e.g. demo.echo")
    scope = KeyScope(role, identity, capabilities)
    private_path, public_path = write_keypair(args.dir, scope=scope)
    print(f"private key {private_path} (keep secret: only {identity} signs with it)")
    print(f"public key  {public_path} and its scope {public_path.with_suffix('.toml')}")
    print(f"            scope: {scope.describe()} (copy both to receivers' key directories)")
    return Exit.OK


def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.core.signing import KeyRing

    ring = KeyRing.load_dir(args.dir)
    if not ring.keys:
        print(f"no keys in {args.dir}")
    for key_id in sorted(ring.keys):
        scope = ring.scope(key_id)
        private = "private key here" if _files_of(args.dir, key_id)[0].exists() else "public only"
        what = scope.describe() if scope is not None else "NO SCOPE: trusted for nothing"
        print(f"{key_id}  {what}  ({private})")
    return Exit.OK


def _cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.core.signing import KeyRing, write_keypair

    ring = KeyRing.load_dir(args.dir)
    scope = ring.scope(args.key_id)
    if scope is None:
        raise ConfigError(f"no key {args.key_id} with a scope in {args.dir}", hint="`keys list`")
    private_path, public_path = write_keypair(args.dir, scope=scope)
    print(f"new key     {private_path.stem} with the scope of {args.key_id}: {scope.describe()}")
    print(f"public key  {public_path} (copy it and its .toml to receivers first)")
    print("then: switch the signer to the new .key (WAYANG_SIGNING_KEY), and")
    print(f"      wayang-mq keys revoke {args.key_id} --dir DIR  on every receiver")
    return Exit.OK


def _cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    files = [path for path in _files_of(args.dir, args.key_id) if path.exists()]
    if not files:
        raise ConfigError(f"no key {args.key_id} in {args.dir}", hint="see `wayang-mq keys list`")
    revoked = args.dir / "revoked"
    revoked.mkdir(mode=0o700, exist_ok=True)
    # the .pub first: from that instant receivers that reload no longer trust it
    for path in sorted(files, key=lambda p: p.suffix != ".pub"):
        os.replace(path, revoked / path.name)
    print(f"revoked {args.key_id}: moved {', '.join(p.name for p in files)} to {revoked}")
    print("running daemons stop trusting it within a second (or at once on SIGHUP)")
    return Exit.OK


def _files_of(directory: Path, key_id: str) -> tuple[Path, Path, Path]:
    """The .key, .pub and .toml of ``key_id``: found by content, since names do not matter."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from wayang_mq.core.signing import key_id_of

    for pub in sorted(directory.glob("*.pub")):
        try:
            key = serialization.load_pem_public_key(pub.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(key, Ed25519PublicKey) and key_id_of(key) == key_id:
            return pub.with_suffix(".key"), pub, pub.with_suffix(".toml")
    stem = directory / key_id
    return stem.with_suffix(".key"), stem.with_suffix(".pub"), stem.with_suffix(".toml")
