"""``wayang-mq events --from OFFSET|TIME``: the history stream, one line per message.

Each message is verified as the control plane verifies it (same key ring): what would not
be recorded is shown as ``refused`` with the reason, never with contents it cannot vouch for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings
from wayang_mq.core.errors import ConfigError

if TYPE_CHECKING:
    from wayang_mq.controlplane.facts import Payload
    from wayang_mq.controlplane.history import Entry, Start
    from wayang_mq.core.envelope import TaskChecks
    from wayang_mq.core.signing import KeyRing


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    ev = sub.add_parser("events", help="read the history stream (wayang.history) from a point")
    ev.add_argument(
        "--from",
        dest="start",
        default="first",
        help="offset, first, last, next, an ISO-8601 time or a duration ago like 10m"
        " (default: first)",
    )
    ev.add_argument("--to", dest="stop", help="last offset or time to show (default: the end)")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    ev.add_argument("--follow", action="store_true", help="keep printing new messages")
    ev.set_defaults(func=_cmd_events)


@dataclass(frozen=True, slots=True)
class EventLine:
    """What one history message says, for people and scripts."""

    offset: int
    at: str | None  # ISO-8601, from the message's own time
    kind: str  # task, retry, result, heartbeat, progress, cancel, dead letter, registration...
    task_id: str | None
    executor: str | None
    attempt: int | None
    status: str | None  # a result's status, a dead letter's code, a refusal's reason
    routing_key: str

    def text(self) -> str:
        """The readable line."""
        attempt = f"#{self.attempt}" if self.attempt is not None else ""
        tail = " ".join(part for part in (self.status, attempt) if part)
        return (
            f"{self.offset:>8}  {self.at or '-':<29}  {self.kind:<12}  {self.task_id or '-':<36}"
            f"  {self.executor or '-':<20}  {tail}"
        ).rstrip()


def describe(entry: Entry, keyring: KeyRing, checks: TaskChecks) -> EventLine:
    """The line for one entry (``refused`` when it does not verify)."""
    from wayang_mq.controlplane import facts

    d = entry.delivery
    try:
        payload = facts.read(d, keyring, checks).payload
    except facts.Refused as refused:
        at = _iso(d.timestamp_ms)
        return EventLine(
            entry.offset, at, "refused", None, None, None, refused.reason, d.routing_key
        )
    kind, task_id, executor, attempt, status, at_ms = _fields(payload)
    at = _iso(at_ms if at_ms is not None else d.timestamp_ms)
    return EventLine(entry.offset, at, kind, task_id, executor, attempt, status, d.routing_key)


Fields = tuple[str, str | None, str | None, int | None, str | None, int | None]


def _fields(p: Payload) -> Fields:
    """kind, task id, executor, attempt, status, time (ms) of a verified payload (typed as
    the union, so a new kind of fact is a type error here until it is shown)."""
    from wayang_mq.controlplane import facts

    if isinstance(p, facts.TaskSeen):
        t = p.task
        kind = "retry" if p.scheduled else "task"
        # None: the time the message was published (as the store does), not the task's issue
        return kind, t.task_id, None, t.attempt, "due" if p.retry_due else None, None
    if isinstance(p, facts.ResultSeen):
        r = p.result
        status = r.status.value + (" (retried)" if p.retried else "")
        return "result", r.task_id, r.executor_id, r.attempt, status, r.finished_at_ms
    if isinstance(p, facts.Beat):
        h = p.heartbeat
        return "heartbeat", None, h.executor_id, None, None, h.sent_at_ms
    if isinstance(p, facts.Registered):
        g = p.registration
        return "registration", None, g.executor_id, None, None, g.started_at_ms
    if isinstance(p, facts.ProgressSeen):
        pr = p.progress
        return "progress", pr.task_id, pr.executor_id, pr.attempt, None, pr.sent_at_ms
    if isinstance(p, facts.CancelSeen):
        c = p.request
        return "cancel", c.task_id, None, None, None, c.requested_at_ms
    if isinstance(p, facts.RedispatchSeen):
        n = p.record
        return "redispatch", n.task_id, n.executor_id, n.attempt, None, n.issued_at_ms
    dead = p.dead
    return "dead letter", p.task.task_id, None, p.task.attempt, str(dead.code), dead.dead_at_ms


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.config import broker_endpoint, keyring
    from wayang_mq.controlplane.history import parse_start
    from wayang_mq.core.envelope import TaskChecks
    from wayang_mq.topology.spec import load_topology

    start = parse_start(args.start)
    stop = parse_start(args.stop) if args.stop else None
    if isinstance(stop, str):
        raise ConfigError(f"--to {stop} is not a place to stop", hint="give an offset or a time")
    checks = TaskChecks(
        audience=settings.audience,
        max_body_bytes=load_topology(settings.topology).defaults.max_body_bytes,
    )
    amqp_url = broker_endpoint(settings, "control-plane").amqp_url
    asyncio.run(_print(amqp_url, start, stop, args, keyring(settings), checks))
    return Exit.OK


async def _print(
    amqp_url: str,
    start: Start,
    stop: Start | None,
    args: argparse.Namespace,
    ring: KeyRing,
    checks: TaskChecks,
) -> None:
    from wayang_mq.controlplane.history import History

    async with History(amqp_url) as history:
        end = None if args.follow else await history.last_offset()
        if end is None and not args.follow:
            return  # an empty history
        if isinstance(stop, int):
            end = stop if end is None else min(end, stop)
        until = stop if isinstance(stop, datetime) else None
        async for entry in history.entries(start, end=end):
            line = describe(entry, ring, checks)
            if until is not None and line.at and datetime.fromisoformat(line.at) > until:
                return
            print(json.dumps(asdict(line)) if args.json else line.text(), flush=True)
            if sys.stdout.closed:
                return
