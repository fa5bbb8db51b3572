"""``wayang-mq reaper`` and ``wayang-mq dead list|show|replay|purge``."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from wayang_mq.cli.common import add_metrics_options, capability_arg, run_until_signal
from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings
from wayang_mq.core.errors import ConfigError

if TYPE_CHECKING:
    from wayang_mq.ops.deadletters import DeadLetter, DeadLetterView


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    reaper = sub.add_parser("reaper", help="answer dead-lettered tasks with FAILED results")
    reaper.add_argument("--id", dest="reaper_id", help="reaper id (default: reaper-host-pid)")
    reaper.add_argument("--prefetch", type=int, default=32, help="dead letters held (default 32)")
    reaper.add_argument(
        "--health-port", type=int, help="answer HTTP health probes on this port (200 / 503)"
    )
    add_metrics_options(reaper)
    reaper.set_defaults(func=_cmd_reaper)
    p = sub.add_parser("dead", help="list, show, replay or purge dead-lettered tasks")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = dsub.add_parser("list", help="task id, reason, time and attempt of each dead letter")
    ls.add_argument("capability", nargs="?", help="one capability (default: all in the topology)")
    ls.add_argument("--limit", type=int, default=1000, help="at most this many per capability")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(func=_cmd_dead_list)
    sh = dsub.add_parser("show", help="one task's dead letters, decoded: task, input, reasons")
    sh.add_argument("task_id")
    sh.add_argument("--capability", help="look in this capability's dead queue only")
    sh.add_argument("--limit", type=int, default=1000, help="at most this many per capability")
    sh.add_argument("--json", action="store_true", help="print a JSON array")
    sh.set_defaults(func=_cmd_dead_show)
    rp = dsub.add_parser("replay", help="dispatch dead tasks again, freshly signed and timed")
    rp.add_argument("capability")
    which = rp.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", dest="task_id", help="the id of the task to replay")
    which.add_argument("--all", action="store_true", help="every dead letter of the capability")
    rp.add_argument(
        "--queue-timeout", type=float, help="seconds it may wait queued (default: as at first)"
    )
    rp.set_defaults(func=_cmd_dead_replay)
    pg = dsub.add_parser("purge", help="delete every dead letter of a capability")
    pg.add_argument("capability")
    pg.set_defaults(func=_cmd_dead_purge)


def _cmd_reaper(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.config import broker_endpoint, keyring, signer
    from wayang_mq.ops.reaper import Reaper, ReaperConfig
    from wayang_mq.topology.spec import load_topology

    extra = {"reaper_id": args.reaper_id} if args.reaper_id else {}
    topology = load_topology(settings.topology)
    config = ReaperConfig(
        amqp_url=broker_endpoint(settings, "reaper").amqp_url,
        keyring=keyring(settings),
        signer=signer(settings, "reaper"),
        prefetch=args.prefetch,
        max_body_bytes=topology.defaults.max_body_bytes,
        audience=settings.audience,
        retry_tiers=topology.retry_tiers,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        **extra,
    )
    reaper = Reaper(config)
    asyncio.run(run_until_signal(reaper.run, reaper.stop, config.keyring.reload))
    return Exit.OK


def _cmd_dead_list(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.config import broker_endpoint, keyring
    from wayang_mq.ops.deadletters import list_dead_letters
    from wayang_mq.topology.spec import load_topology

    if args.capability:
        capabilities = [capability_arg(args.capability)]
    else:
        capabilities = [c.name for c in load_topology(settings.topology).capabilities]
    url = broker_endpoint(settings).amqp_url
    try:
        ring = keyring(settings)  # only to show attempts: listing works without keys
    except ConfigError:
        ring = None

    async def gather() -> list[DeadLetter]:
        found: list[DeadLetter] = []
        for capability in capabilities:
            found += await list_dead_letters(url, capability, keyring=ring, limit=args.limit)
        return found

    letters = asyncio.run(gather())
    if args.json:
        print(json.dumps([letter.as_json() for letter in letters], indent=2))
    elif letters:
        print("\n".join(_dead_table(letters)))
    else:
        print("no dead letters")
    return Exit.OK


def _cmd_dead_show(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.config import broker_endpoint, keyring
    from wayang_mq.ops.deadletters import show_dead_letters
    from wayang_mq.topology.spec import load_topology

    if args.capability:
        capabilities = [capability_arg(args.capability)]
    else:
        capabilities = [c.name for c in load_topology(settings.topology).capabilities]
    try:
        ring = keyring(settings)  # to say whether the body verifies: showing works without
    except ConfigError:
        ring = None
    url = broker_endpoint(settings).amqp_url
    views = asyncio.run(
        show_dead_letters(url, args.task_id, capabilities, keyring=ring, limit=args.limit)
    )
    if not views:
        raise ConfigError(
            f"no dead letter of task {args.task_id} in the dead queues of "
            + ", ".join(capabilities),
            hint="see `wayang-mq dead list`",
        )
    if args.json:
        print(json.dumps([view.as_json() for view in views], indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(_show_text(view) for view in views))
    return Exit.OK


def _show_text(view: DeadLetterView) -> str:
    """One dead letter for people: what, why, when, the task, the deaths."""
    d = view.dead
    attempt = d.attempt
    when = view.as_json()["dead_at"] or "?"
    lines = [
        f"task        {d.task_id}",
        f"capability  {d.capability}",
        f"reason      {d.reason}: {d.message}",
        f"dead at     {when}" + (f" (by {d.dead_lettered_by})" if d.dead_lettered_by else ""),
        f"attempt     {'?' if attempt is None else attempt}",
        "answered    " + ("by the worker that dead-lettered it" if d.answered else "by the reaper"),
    ]
    if view.deaths:
        lines.append("deaths      " + "\n            ".join(view.deaths))
    if view.task is None:
        lines.append(f"body        unreadable: {view.unreadable}")
        return "\n".join(lines)
    trust = (
        "signature verified" if view.verified else f"NOT verified ({view.unreadable or 'no keys'})"
    )
    lines.append(f"body        a task, {trust}")
    fields = {k: v for k, v in view.task.items() if k != "input"}
    lines += [f"  {key}: {json.dumps(value, ensure_ascii=False)}" for key, value in fields.items()]
    pretty = json.dumps(view.task.get("input"), indent=2, ensure_ascii=False)
    lines.append("input (redacted)\n" + pretty)
    return "\n".join(lines)


def _dead_table(letters: Sequence[DeadLetter]) -> list[str]:
    """Aligned columns; the reason in words last, since it is the long one."""
    from wayang_mq.core.model import ms_to_datetime

    rows = [("TASK ID", "CAPABILITY", "REASON", "DEAD AT (UTC)", "ATTEMPT", "WHY")]
    for d in letters:
        when = "?" if d.dead_at_ms is None else f"{ms_to_datetime(d.dead_at_ms):%Y-%m-%d %H:%M:%S}"
        why = d.message + (f" (by {d.dead_lettered_by})" if d.dead_lettered_by else "")
        attempt = "?" if d.attempt is None else str(d.attempt)
        rows.append((d.task_id, d.capability, d.reason, when, attempt, why))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[5]]))
    return lines


def _cmd_dead_replay(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.config import broker_endpoint, keyring, signer, signer_scope
    from wayang_mq.core.names import dead_queue
    from wayang_mq.core.scopes import Role
    from wayang_mq.ops.deadletters import replay

    # a replay is a new task: an admin key issues it as dead-replay, a dispatcher's as itself
    scope = signer_scope(settings, "admin")
    issuer = "dead-replay"
    if scope is not None and scope.role is not Role.ADMIN:
        issuer = scope.identity

    capability = capability_arg(args.capability)
    timeout_ms = None if args.queue_timeout is None else int(args.queue_timeout * 1000)
    outcomes = asyncio.run(
        replay(
            broker_endpoint(settings).amqp_url,
            capability,
            keyring=keyring(settings),
            signer=signer(settings, "admin"),
            task_id=args.task_id,
            queue_timeout_ms=timeout_ms,
            issuer=issuer,
        )
    )
    if args.task_id and not outcomes:
        raise ConfigError(
            f"no dead letter of task {args.task_id} in {dead_queue(capability)}",
            hint=f"see `wayang-mq dead list {capability}`",
        )
    for outcome in outcomes:
        print(outcome.line())
    left = sum(not outcome.replayed for outcome in outcomes)
    print(f"{len(outcomes) - left} replayed, {left} left in {dead_queue(capability)}")
    return Exit.OK if left == 0 else Exit.TASK_FAILED


def _cmd_dead_purge(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.config import broker_endpoint
    from wayang_mq.core.names import dead_queue
    from wayang_mq.ops.deadletters import purge

    capability = capability_arg(args.capability)
    purged = asyncio.run(purge(broker_endpoint(settings).amqp_url, capability))
    print(f"purged {purged} dead letters from {dead_queue(capability)}")
    return Exit.OK
