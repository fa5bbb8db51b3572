"""``wayang-mq access grant|revoke|show``: one broker account per identity (docs/security.md §3).

Runs with an administrator's account (``WAYANG_AMQP_URL``, or the one ``wayang-mq dev``
saved): only it may create users and set permissions, through the management API.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings

_ROLES = {
    "executor": "consumes its capabilities' queues and its own; publishes results, events, "
    "retries, claims",
    "dispatcher": "publishes tasks, cancels and status requests; reads its own replies",
    "reaper": "answers the broker's dead letters (wayang.reaper)",
    "control-plane": "consumes wayang.record, claims and place; re-dispatches, places, "
    "answers and cancels",
}


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    p = sub.add_parser("access", help="broker accounts per role: grant, revoke, show")
    asub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    grant = asub.add_parser("grant", help="create or update the account of one identity")
    rsub = grant.add_subparsers(dest="role", required=True, metavar="ROLE")
    for role, what in _ROLES.items():
        r = rsub.add_parser(role, help=what)
        r.add_argument("id", help="the identity, which is also the user name (e.g. demo-0)")
        if role in ("executor", "dispatcher"):
            r.add_argument(
                "--capability",
                action="append",
                default=[],
                metavar="C",
                help="a capability it serves (repeatable; required)"
                if role == "executor"
                else "a capability or pattern (demo.*, payments.#) it may dispatch "
                "(repeatable; default: every capability in the topology)",
            )
        r.add_argument(
            "--password-file",
            type=Path,
            help="write a new password there (0600) instead of printing it",
        )
        r.add_argument(
            "--new-password",
            action="store_true",
            help="make a new password for an existing account (rotation)",
        )
        r.set_defaults(func=_cmd_grant)
    revoke = asub.add_parser("revoke", help="delete an account; its connections are closed")
    revoke.add_argument("id")
    revoke.set_defaults(func=_cmd_revoke)
    show = asub.add_parser("show", help="the accounts and their permissions")
    show.add_argument("id", nargs="?")
    show.set_defaults(func=_cmd_show)


def _client(settings: Settings) -> Any:
    from wayang_mq.amqp.connect import management_client
    from wayang_mq.config import broker_endpoint

    return management_client(broker_endpoint(settings))


def _cmd_grant(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.core.private_files import write_private
    from wayang_mq.security.accounts import Role, account_for, grant
    from wayang_mq.topology.spec import load_topology

    role = Role(args.role)
    capabilities = list(getattr(args, "capability", []))
    if role is Role.DISPATCHER and not capabilities:
        capabilities = [c.name for c in load_topology(settings.topology).capabilities]
    account = account_for(role, args.id, capabilities)
    granted = grant(_client(settings), account, new_password=args.new_password)
    verb = "created" if granted.created else "updated"
    print(f"{verb} {role} account {account.user!r} ({len(account.topics)} topic permissions)")
    if granted.password is None:
        print("password unchanged (rotate it with --new-password)")
    elif args.password_file is not None:
        write_private(args.password_file, granted.password + "\n")
        print(f"password written to {args.password_file} (0600)")
    else:
        print(f"password (shown once): {granted.password}")
    return Exit.OK


def _cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.security.accounts import revoke

    if revoke(_client(settings), args.id):
        print(f"revoked {args.id!r}: account deleted, its connections closed by the broker")
        return Exit.OK
    print(f"no account {args.id!r}")
    return Exit.USAGE


def _cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.security.accounts import show

    views = show(_client(settings), args.id)
    if not views:
        print(f"no account {args.id!r}" if args.id else "no wayang-mq accounts")
        return Exit.USAGE if args.id else Exit.OK
    for view in views:
        print(f"{view.user}  role={view.role}")
        perms = view.permissions or {}
        for kind in ("configure", "write", "read"):
            print(f"    {kind:<9} {perms.get(kind, '(none)')}")
        for topic in view.topics:
            print(f"    topic {topic['exchange']}: write {topic['write']}  read {topic['read']}")
    return Exit.OK
