"""``wayang-mq executors``, ``tasks``, ``task ID`` and ``audit``: reading the control plane's
record. Aligned tables for people, ``--json`` for scripts; ``audit`` exits 7 when it finds
anything wrong, so a cron job or a CI step can ask "was anything lost?" by its exit code."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from wayang_mq.cli.common import capability_arg
from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings
from wayang_mq.core.errors import ConfigError

if TYPE_CHECKING:
    from wayang_mq.controlplane.queries import TaskStory


def add(sub: Any) -> None:
    """Register these verbs' parsers and handlers."""
    ex = sub.add_parser("executors", help="the registry: every executor, live or lost")
    _json_flag(ex)
    ex.set_defaults(func=_cmd_executors)
    ts = sub.add_parser("tasks", help="recorded tasks, newest first")
    ts.add_argument("--capability", help="only this capability")
    ts.add_argument(
        "--status",
        help="SUCCESS or FAILED (a result), or queued, retrying, running, pending, finished",
    )
    ts.add_argument("--since", help="first seen at or after: a time (ISO 8601) or 10m, 2h, 1d")
    ts.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    _json_flag(ts)
    ts.set_defaults(func=_cmd_tasks)
    one = sub.add_parser("task", help="the whole story of one task, from the record")
    one.add_argument("task_id")
    _json_flag(one)
    one.set_defaults(func=_cmd_task)
    au = sub.add_parser(
        "audit", help="tasks lost or run twice, results without a task; exit 7 if any"
    )
    au.add_argument(
        "--grace", type=float, default=30.0, help="seconds past a deadline before a task counts"
    )
    _json_flag(au)
    au.set_defaults(func=_cmd_audit)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _database(settings: Settings) -> str:
    from wayang_mq.cli.controlplane import database_url

    return database_url(settings)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns, two spaces apart; the last column is not padded (it is the long one)."""
    all_rows = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in all_rows
    ]


def _when(value: datetime | None) -> str:
    return "-" if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 7200 else f"{seconds / 3600:.1f} h ago"


# -- executors --------------------------------------------------------------------------------


def _cmd_executors(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.controlplane.queries import executors, reading

    with reading(_database(settings)) as conn:
        found = executors(conn, datetime.now(UTC))
    if args.json:
        _print_json([e.as_json() for e in found])
        return Exit.OK
    if not found:
        print("no executors recorded (is `wayang-mq control-plane` running?)")
        return Exit.OK
    rows = [
        (
            e.executor_id,
            e.state,
            _age(e.last_seen_age_s),
            f"{e.load:.0%}",
            f"{len(e.in_flight)}/{e.concurrency}",
            ",".join(e.capabilities),
            json.dumps(e.metadata, sort_keys=True) if e.metadata else "",
        )
        for e in found
    ]
    header = ("EXECUTOR", "STATE", "LAST SEEN", "LOAD", "IN FLIGHT", "CAPABILITIES", "METADATA")
    print("\n".join(table(header, rows)))
    return Exit.OK


# -- tasks ------------------------------------------------------------------------------------


def _cmd_tasks(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.controlplane.queries import (
        TaskFilter,
        parse_since,
        reading,
        status_filter,
        tasks,
    )

    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit} is not a count", hint="e.g. --limit 100")
    which = TaskFilter(
        capability=None if args.capability is None else capability_arg(args.capability),
        status=None if args.status is None else status_filter(args.status),
        since=None if args.since is None else parse_since(args.since, datetime.now(UTC)),
        limit=args.limit,
    )
    with reading(_database(settings)) as conn:
        found = tasks(conn, which)
    if args.json:
        _print_json([t.as_json() for t in found])
        return Exit.OK
    if not found:
        print("no tasks recorded" + (" match" if args.capability or args.status else ""))
        return Exit.OK
    rows = [
        (
            t.task_id,
            t.capability,
            t.state,
            (t.status or "-") + (f" {t.error_code}" if t.error_code else ""),
            str(t.attempt),
            t.executor_id or "-",
            _when(t.first_seen),
        )
        for t in found
    ]
    header = ("TASK ID", "CAPABILITY", "STATE", "RESULT", "ATTEMPT", "EXECUTOR", "FIRST SEEN")
    print("\n".join(table(header, rows)))
    return Exit.OK


# -- one task ---------------------------------------------------------------------------------


def _cmd_task(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.controlplane.queries import reading, task_story

    with reading(_database(settings)) as conn:
        story = task_story(conn, args.task_id)
    if story is None:
        raise ConfigError(
            f"the record holds nothing about task {args.task_id}",
            hint="see `wayang-mq tasks` for the ids it holds",
        )
    if args.json:
        _print_json(story.as_json())
    else:
        print("\n".join(story_lines(story)))
    return Exit.OK


def story_lines(story: TaskStory) -> list[str]:
    """A task's story for a terminal: who and what, then what happened, in order."""
    t = story.task
    if t is None:
        lines = [f"task {story.task_id}: no task with this id was ever recorded"]
    else:
        result = t["status"] or "-"
        if t["error_code"]:
            result += f" ({t['error_code']})"
        lines = [
            f"task        {story.task_id}",
            f"capability  {t['capability']}   node {t['node_id']}",
            f"issuer      {t['issuer']}   publisher {t['publisher'] or '?'}   key {t['key_id']}",
            f"state       {t['state']}   attempt {t['attempt']} of {t['max_attempts']}"
            f"   executor {t['executor_id'] or '-'}",
            f"result      {result}   finished {_when(t['finished_at'])}",
            f"issued      {_when(t['issued_at'])}   deadline {_when(t['deadline_at'])}",
        ]
        duplicates = sum(c["duplicate"] for c in story.copies)
        if duplicates:
            lines.append(f"copies      {len(story.copies)}, of which {duplicates} duplicate")
    lines += ["", *table(("TIME (UTC)", "EVENT"), [(_when(e.at), e.text) for e in story.events])]
    return lines


# -- audit ------------------------------------------------------------------------------------


def _cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.controlplane.queries import AUDIT_CHUNK, audit, reading, reruns

    if args.grace < 0:
        raise ConfigError(f"--grace {args.grace} is negative", hint="seconds, e.g. --grace 30")
    scanned = [0]

    def progress(what: str, done: int, total: int) -> None:
        scanned[0] = done
        if total > AUDIT_CHUNK:  # a long scan: say how far it is
            print(f"audit: {done}/{total} {what} scanned", file=sys.stderr, flush=True)

    with reading(_database(settings)) as conn:
        findings = audit(conn, datetime.now(UTC), args.grace, progress)
        again = reruns(conn)
    if args.json:
        _print_json(
            {
                "clean": not findings,
                "tasks_scanned": scanned[0],
                "findings": [f.as_json() for f in findings],
                "reruns_after_redelivery": again,
            }
        )
    elif findings:
        rows = [(f.kind, f.task_id, f.reason) for f in findings]
        print("\n".join(table(("FINDING", "TASK ID", "WHY"), rows)))
        print(f"{len(findings)} finding(s) in {scanned[0]} tasks")
    else:
        print(f"clean: {scanned[0]} tasks, none lost, none run twice, no result without a task")
    if again and not args.json:
        print(
            f"note: {again} attempt(s) ran again after the broker redelivered them (their "
            "worker died before acking): at-least-once, their first answer is the one kept"
        )
    return Exit.AUDIT_FAILED if findings else Exit.OK
