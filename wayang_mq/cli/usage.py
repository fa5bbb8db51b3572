"""``wayang-mq usage``: what the fabric did, for billing, summed from the control plane's
record per capability, executor, workflow node or issuer (docs/control-plane.md "Usage")."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings

if TYPE_CHECKING:
    from wayang_mq.controlplane.usage import UsageReport, UsageSum


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    us = sub.add_parser(
        "usage",
        help="tasks, attempts, wall and CPU time, bytes and units, summed for billing",
    )
    us.add_argument(
        "--since",
        required=True,
        help="attempts finished at or after: a time (ISO 8601, UTC unless it says) or 10m, 2h, 1d",
    )
    us.add_argument("--until", help="and before: a time or a duration back from now (default now)")
    us.add_argument(
        "--by",
        help="one row per capability, executor, node (the workflow node) or issuer; "
        "default: the total only",
    )
    us.add_argument("--json", action="store_true", help="print JSON for scripts")
    us.set_defaults(func=_cmd_usage)


def _cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.cli.controlplane import database_url
    from wayang_mq.controlplane.queries import parse_since, reading
    from wayang_mq.controlplane.usage import check_window, group_by, usage

    now = datetime.now(UTC)
    since = parse_since(args.since, now)
    until = now if args.until is None else parse_since(args.until, now, "--until")
    by = None if args.by is None else group_by(args.by)
    check_window(since, until)  # before connecting: a wrong window needs no database
    with reading(database_url(settings)) as conn:
        report = usage(conn, since, until, by)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(usage_lines(report)))
    return Exit.OK


def usage_lines(report: UsageReport) -> list[str]:
    """The report as an aligned table: one row per group, then the total."""
    from wayang_mq.cli.records import table

    units = report.unit_names()
    header = [
        (report.by or "").upper() or "ALL",
        "TASKS",
        "ATTEMPTS",
        "WALL S",
        "CPU S",
        "BYTES IN",
        "BYTES OUT",
        *(name.upper() for name in units),
    ]

    def row(label: str, s: UsageSum) -> list[str]:
        return [
            label,
            str(s.tasks),
            str(s.attempts),
            f"{s.wall_ms / 1000:.3f}",
            f"{s.cpu_ms / 1000:.3f}",
            str(s.bytes_in),
            str(s.bytes_out),
            *(_amount(s.units.get(name, 0.0)) for name in units),
        ]

    rows = [row(g.group or "-", g) for g in report.groups]
    rows.append(row("TOTAL" if report.by else "all", report.total))
    since, until = report.since.astimezone(UTC), report.until.astimezone(UTC)
    window = f"{since:%Y-%m-%d %H:%M:%S} to {until:%Y-%m-%d %H:%M:%S} UTC"
    return [f"usage of attempts finished {window}", *table(header, rows)]


def _amount(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"
