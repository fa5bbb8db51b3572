"""The ``wayang-mq`` command. Settings are read here, once, and passed down.

Every failure the user can cause or fix (bad input, unreachable broker, a full queue) ends as
one line on stderr, ``wayang-mq: error: <what> (<what to do>)``, and a distinct exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wayang_mq import __version__, logs
from wayang_mq.errors import (
    Backpressure,
    BrokerUnreachable,
    ConfigError,
    NoExecutor,
    ResultTimeout,
    WayangError,
)
from wayang_mq.settings import Settings

if TYPE_CHECKING:
    from wayang_mq.dispatcher import DispatcherConfig

if TYPE_CHECKING:
    from wayang_mq.deadletters import DeadLetter


class Exit(IntEnum):
    """Exit codes, documented in README.md."""

    OK = 0
    TASK_FAILED = 1  # the task ended FAILED (or PENDING without --wait answering)
    USAGE = 2  # bad arguments, settings, files
    UNREACHABLE = 3  # broker down or credentials refused
    NO_EXECUTOR = 4  # no queue serves the capability
    BACKPRESSURE = 5  # the capability's queue stayed full
    TIMEOUT = 6  # no result within --timeout
    INTERRUPTED = 130


_EXIT_FOR: list[tuple[type[WayangError], Exit]] = [
    (NoExecutor, Exit.NO_EXECUTOR),
    (Backpressure, Exit.BACKPRESSURE),
    (ResultTimeout, Exit.TIMEOUT),
    (BrokerUnreachable, Exit.UNREACHABLE),
]


def exit_code_for(error: WayangError) -> Exit:
    """The exit code a WayangError maps to."""
    for kind, code in _EXIT_FOR:
        if isinstance(error, kind):
            return code
    return Exit.USAGE


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand names its handler in ``func``."""
    parser = argparse.ArgumentParser(
        prog="wayang-mq", description="Wayang's execution fabric on RabbitMQ."
    )
    parser.add_argument("--version", action="version", version=f"wayang-mq {__version__}")
    parser.add_argument("--log-level", default="INFO", help="daemon log level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_dev(sub)
    _add_topology(sub)
    _add_keys(sub)
    _add_worker(sub)
    _add_submit(sub)
    _add_control(sub)
    _add_dead_letters(sub)
    return parser


def _add_dev(sub: Any) -> None:
    p = sub.add_parser("dev", help="run a local broker, the topology and demo workers")
    p.add_argument("--state-dir", type=Path, help="where the stack keeps its state (.wayang)")
    p.add_argument("--amqp-port", type=int, help="AMQP port (default: a free one)")
    p.add_argument("--management-port", type=int, help="console port (default: a free one)")
    p.add_argument("--workers", type=int, default=2, help="demo worker processes (default 2)")
    p.add_argument("--demo-tasks", type=int, default=20, help="tasks to send at start")
    p.add_argument("--no-wait", action="store_true", help="exit after the demo (for scripts)")
    p.set_defaults(func=_cmd_dev)


def _add_topology(sub: Any) -> None:
    p = sub.add_parser("topology", help="declare or export the RabbitMQ topology")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    apply = tsub.add_parser("apply", help="declare exchanges, queues, bindings and policies")
    apply.add_argument("--file", type=Path, help="topology file (default topology/wayang.toml)")
    apply.set_defaults(func=_cmd_topology_apply)
    export = tsub.add_parser("export", help="write a definitions.json for the console import")
    export.add_argument("--file", type=Path, help="topology file (default topology/wayang.toml)")
    export.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    export.set_defaults(func=_cmd_topology_export)


def _add_keys(sub: Any) -> None:
    p = sub.add_parser("keys", help="manage Ed25519 signing keys")
    ksub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = ksub.add_parser("new", help="write a new keypair: <id>.key and <id>.pub")
    new.add_argument("--dir", type=Path, required=True, help="directory for the key files")
    new.set_defaults(func=_cmd_keys_new)


def _add_worker(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a worker daemon for one or more executors")
    p.add_argument(
        "executors", nargs="+", metavar="MODULE:CLASS", help="e.g. wayang_workers.demo:Echo"
    )
    p.add_argument("--concurrency", type=int, default=8, help="tasks run at once (default 8)")
    p.add_argument("--prefetch", type=int, help="deliveries held (default: concurrency)")
    p.add_argument("--id", dest="executor_id", help="executor id (default: host-pid)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to finish on SIGTERM")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    p.add_argument(
        "--middleware",
        action="append",
        default=[],
        metavar="MODULE:CLASS",
        help="a wayang_mq.Middleware layer around every delivery (repeatable, in order)",
    )
    p.set_defaults(func=_cmd_worker)


def _add_submit(sub: Any) -> None:
    p = sub.add_parser("submit", help="publish one task; with --wait, print its result")
    p.add_argument("capability", help="e.g. demo.echo")
    p.add_argument("--input", default="{}", help="the input context as a JSON object")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    p.add_argument("--queue-timeout", type=float, default=60.0, help="seconds it may wait queued")
    p.add_argument("--exec-timeout", type=float, help="seconds it may run")
    p.add_argument("--node-id", help="workflow node id (default: the task id)")
    p.add_argument("--partition-key", help="keeps order per key on sharded capabilities")
    p.set_defaults(func=_cmd_submit)


def _add_control(sub: Any) -> None:
    cancel = sub.add_parser("cancel", help="cancel a task, running or still queued")
    cancel.add_argument("task_id")
    cancel.add_argument("--reason", default="", help="recorded in the FAILED result")
    cancel.set_defaults(func=_cmd_cancel)
    status = sub.add_parser("status", help="ask the executors where a task stands")
    status.add_argument("task_id")
    status.add_argument("--wait", type=float, default=1.0, help="seconds to gather answers")
    status.set_defaults(func=_cmd_status)


def _add_dead_letters(sub: Any) -> None:
    reaper = sub.add_parser("reaper", help="answer dead-lettered tasks with FAILED results")
    reaper.add_argument("--id", dest="reaper_id", help="reaper id (default: reaper-host-pid)")
    reaper.add_argument("--prefetch", type=int, default=32, help="dead letters held (default 32)")
    reaper.set_defaults(func=_cmd_reaper)
    p = sub.add_parser("dead", help="list, replay or purge dead-lettered tasks")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = dsub.add_parser("list", help="task id, reason, time and attempt of each dead letter")
    ls.add_argument("capability", nargs="?", help="one capability (default: all in the topology)")
    ls.add_argument("--limit", type=int, default=1000, help="at most this many per capability")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(func=_cmd_dead_list)
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


# -- handlers -------------------------------------------------------------------------------


def _cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.dev.stack import DevOptions, run_dev

    options = DevOptions(
        state_dir=args.state_dir or settings.state_dir,
        amqp_port=args.amqp_port,
        management_port=args.management_port,
        workers=args.workers,
        demo_tasks=args.demo_tasks,
        wait=not args.no_wait,
    )
    return int(run_dev(options, settings))


def _cmd_topology_apply(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.connect import broker_endpoint, management_client
    from wayang_mq.topology.apply import apply_topology
    from wayang_mq.topology.spec import load_topology

    topology = load_topology(args.file or settings.topology)
    endpoint = broker_endpoint(settings)
    report = asyncio.run(apply_topology(topology, endpoint.amqp_url, management_client(endpoint)))
    print("\n".join(report.lines()))
    return Exit.OK


def _cmd_topology_export(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.topology.export import write_definitions
    from wayang_mq.topology.spec import load_topology

    write_definitions(load_topology(args.file or settings.topology), args.out)
    print(f"wrote {args.out} (import it in the console: Overview → Import definitions)")
    return Exit.OK


def _cmd_keys_new(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.signing import write_keypair

    private_path, public_path = write_keypair(args.dir)
    print(f"private key {private_path} (keep secret: publishers sign with it)")
    print(f"public key  {public_path} (copy to receivers' key directories)")
    return Exit.OK


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.connect import broker_endpoint, keyring, signer
    from wayang_mq.executor import load_class, load_executor
    from wayang_mq.middleware import Middleware
    from wayang_mq.topology.spec import load_topology
    from wayang_mq.worker import Worker, WorkerConfig

    executors = [load_executor(spec) for spec in args.executors]
    middleware = tuple(
        load_class(spec, Middleware, "mypackage.metrics:Timing") for spec in args.middleware
    )
    extra = {"executor_id": args.executor_id} if args.executor_id else {}
    config = WorkerConfig(
        amqp_url=broker_endpoint(settings).amqp_url,
        keyring=keyring(settings),
        signer=signer(settings),
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        grace_s=args.grace,
        heartbeat_interval_s=args.heartbeat,
        retry_tiers=load_topology(settings.topology).retry_tiers,
        middleware=middleware,
        **extra,
    )
    worker = Worker(executors, config)
    asyncio.run(_run_until_signal(worker.run, worker.stop))
    return Exit.OK


async def _run_until_signal(run: Callable[[], Any], stop: Callable[[], None]) -> None:
    """Run a daemon; SIGTERM and SIGINT ask it to stop gracefully instead of killing it."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    await run()


def _cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.dispatcher import Dispatcher

    try:
        task_input = json.loads(args.input)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--input is not JSON: {exc}", hint="e.g. --input '{\"x\": 1}'") from exc
    if not isinstance(task_input, dict):
        raise ConfigError("--input must be a JSON object", hint="e.g. --input '{\"x\": 1}'")
    config = _dispatcher_config(settings)

    async def submit() -> int:
        async with Dispatcher(config) as dispatcher:
            handle = await dispatcher.submit(
                args.capability,
                task_input,
                queue_timeout_s=args.queue_timeout,
                timeout_s=args.exec_timeout,
                node_id=args.node_id,
                partition_key=args.partition_key,
            )
            if not args.wait:
                print(json.dumps({"task_id": handle.task_id, "status": "SUBMITTED"}))
                return Exit.OK
            result = await handle.result(args.timeout)
            print(result.model_dump_json(indent=2, exclude_defaults=False))
            return Exit.OK if result.status == "SUCCESS" else Exit.TASK_FAILED

    return asyncio.run(submit())


def _cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.dispatcher import Dispatcher

    config = _dispatcher_config(settings)

    async def cancel() -> bool:
        async with Dispatcher(config) as dispatcher:
            return await dispatcher.cancel(args.task_id, args.reason)

    listening = asyncio.run(cancel())
    print(json.dumps({"task_id": args.task_id, "cancel_sent": listening}))
    if not listening:
        print("wayang-mq: warning: no executor is listening on wayang.control", file=sys.stderr)
    return Exit.OK


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.dispatcher import Dispatcher

    config = _dispatcher_config(settings)

    async def status() -> dict[str, Any]:
        async with Dispatcher(config) as dispatcher:
            return (await dispatcher.status(args.task_id, args.wait)).as_dict()

    print(json.dumps(asyncio.run(status()), indent=2))
    return Exit.OK


def _cmd_reaper(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.connect import broker_endpoint, keyring, signer
    from wayang_mq.reaper import Reaper, ReaperConfig

    extra = {"reaper_id": args.reaper_id} if args.reaper_id else {}
    config = ReaperConfig(
        amqp_url=broker_endpoint(settings).amqp_url,
        keyring=keyring(settings),
        signer=signer(settings),
        prefetch=args.prefetch,
        **extra,
    )
    reaper = Reaper(config)
    asyncio.run(_run_until_signal(reaper.run, reaper.stop))
    return Exit.OK


def _dead_capability(capability: str) -> str:
    from wayang_mq.names import valid_capability

    if not valid_capability(capability):
        raise ConfigError(
            f"{capability!r} is not a capability name", hint="e.g. demo.echo; see `dead list`"
        )
    return capability


def _cmd_dead_list(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.connect import broker_endpoint, keyring
    from wayang_mq.deadletters import list_dead_letters
    from wayang_mq.topology.spec import load_topology

    if args.capability:
        capabilities = [_dead_capability(args.capability)]
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


def _dead_table(letters: Sequence[DeadLetter]) -> list[str]:
    """Aligned columns; the reason in words last, since it is the long one."""
    from wayang_mq.model import ms_to_datetime

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
    from wayang_mq.connect import broker_endpoint, keyring, signer
    from wayang_mq.deadletters import replay
    from wayang_mq.names import dead_queue

    capability = _dead_capability(args.capability)
    timeout_ms = None if args.queue_timeout is None else int(args.queue_timeout * 1000)
    outcomes = asyncio.run(
        replay(
            broker_endpoint(settings).amqp_url,
            capability,
            keyring=keyring(settings),
            signer=signer(settings),
            task_id=args.task_id,
            queue_timeout_ms=timeout_ms,
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
    from wayang_mq.connect import broker_endpoint
    from wayang_mq.deadletters import purge
    from wayang_mq.names import dead_queue

    capability = _dead_capability(args.capability)
    purged = asyncio.run(purge(broker_endpoint(settings).amqp_url, capability))
    print(f"purged {purged} dead letters from {dead_queue(capability)}")
    return Exit.OK


def _dispatcher_config(settings: Settings) -> DispatcherConfig:
    """A dispatcher on the configured broker, signing with the configured key."""
    from wayang_mq.connect import broker_endpoint, signer
    from wayang_mq.dispatcher import DispatcherConfig

    return DispatcherConfig(amqp_url=broker_endpoint(settings).amqp_url, signer=signer(settings))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wayang-mq`` script."""
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    try:
        settings = Settings()
        code = int(args.func(args, settings))
    except WayangError as exc:
        print(f"wayang-mq: error: {exc.one_line()}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
