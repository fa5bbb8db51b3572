"""``wayang-mq worker``: a worker daemon for one or more executors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wayang_mq.cli.common import add_metrics_options, process_id, run_daemon, run_until_signal
from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    p = sub.add_parser("worker", help="run a worker daemon for one or more executors")
    p.add_argument(
        "executors", nargs="+", metavar="MODULE:CLASS", help="e.g. wayang_workers.demo:Echo"
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="executor settings (TOML): a table per executor, named by its capability, e.g. "
        "[http.call] (docs/executors.md)",
    )
    p.add_argument("--concurrency", type=int, default=8, help="tasks run at once (default 8)")
    p.add_argument("--prefetch", type=int, help="deliveries held (default: concurrency)")
    p.add_argument("--id", dest="executor_id", help="executor id (default: <account>--<random>)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to finish on SIGTERM")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    p.add_argument(
        "--middleware",
        action="append",
        default=[],
        metavar="MODULE:CLASS",
        help="a wayang_mq.Middleware layer around every delivery (repeatable, in order)",
    )
    p.add_argument(
        "--health-port", type=int, help="answer HTTP health probes on this port (200 / 503)"
    )
    add_metrics_options(p)
    p.add_argument(
        "--max-clock-skew",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="refuse tasks issued further in the future than this (default 300)",
    )
    p.add_argument(
        "--max-queue-window",
        type=float,
        default=7 * 24 * 3600.0,
        metavar="SECONDS",
        help="refuse tasks whose deadline is further away than this (default 7 days)",
    )
    p.add_argument(
        "--secrets",
        action="append",
        default=[],
        metavar="PROVIDER",
        help='where tasks\' {"$secret": NAME} references are resolved, asked in order '
        "(repeatable; default WAYANG_SECRETS, comma-separated): env[:PREFIX], dir:PATH, "
        "fernet:PATH (key: WAYANG_SECRETS_KEY_FILE), class:MODULE:CLASS",
    )
    p.add_argument(
        "--claims",
        action="store_true",
        help="ask the control plane before running each task: a task id runs once across "
        "the fleet, and a recorded cancel is kept (no answer in time: the task runs anyway)",
    )
    p.add_argument(
        "--claim-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long to wait for the control plane's verdict (default 2)",
    )
    p.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        type=_label,
        metavar="KEY=VALUE",
        help="a placement label, sent as registration metadata (repeatable): tasks whose "
        "policy asks for labels run only on executors that have them, e.g. region=eu, "
        "trust_domain=internal",
    )
    p.add_argument(
        "--rate",
        dest="rates",
        action="append",
        default=[],
        metavar="CAP=RATE",
        help="start at most RATE tasks of capability CAP on this worker (repeatable): N/s, "
        "N/m or N/h, evenly spaced, or with ,burst=B up to B at once after a quiet spell, "
        "e.g. http.call=10/s; tasks over it wait in the queue (docs/executors.md, Limits)",
    )
    p.add_argument(
        "--max-running",
        dest="max_running",
        action="append",
        default=[],
        metavar="CAP=N",
        help="run at most N tasks of capability CAP at once on this worker, at most "
        "--concurrency (repeatable), e.g. http.call=4",
    )
    p.add_argument(
        "--limits-db",
        metavar="URL",
        help="share each --rate with every worker given the same database (PostgreSQL, "
        "migrated with `wayang-mq db migrate`): the rate holds for the fleet, not per worker",
    )
    p.add_argument(
        "--shards",
        action="append",
        default=[],
        metavar="[CAP=]N,N-M",
        help="consume only these shard queues of a sharded capability (default: all), e.g. "
        "0-1, 0,2 or db.query=2-3 (repeatable, one per capability; without CAP= for every "
        "sharded capability served). Each shard has one active consumer across the fleet: "
        "workers listing the same shard stand by for it (docs/sharding.md)",
    )
    p.set_defaults(func=_cmd_worker)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"label {text!r} is not KEY=VALUE (e.g. region=eu)")
    return key.strip(), value.strip()


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.config import broker_endpoint, keyring, secret_provider, signer
    from wayang_mq.core.loading import load_class
    from wayang_mq.runtime.executor import load_executor
    from wayang_mq.runtime.limits import limits_from_flags
    from wayang_mq.runtime.middleware import Middleware
    from wayang_mq.runtime.settings import WorkerFile
    from wayang_mq.runtime.shards import parse_shards
    from wayang_mq.runtime.worker import Worker, WorkerConfig
    from wayang_mq.topology.spec import load_topology

    limits = limits_from_flags(args.rates, args.max_running)
    shards = parse_shards(args.shards)
    settings_file = WorkerFile.read(args.config) if args.config is not None else None
    executors = [load_executor(spec, settings_file) for spec in args.executors]
    middleware = tuple(
        load_class(spec, Middleware, "mypackage.metrics:Timing") for spec in args.middleware
    )
    endpoint = broker_endpoint(settings, "executor")
    # An executor account allows its own id and <id>--<instance>: without --id, one of those.
    executor_id = args.executor_id or process_id(endpoint.username, "executor")
    topology = load_topology(settings.topology)
    config = WorkerConfig(
        amqp_url=endpoint.amqp_url,
        executor_id=executor_id,
        keyring=keyring(settings),
        signer=signer(settings, "executor"),
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        grace_s=args.grace,
        heartbeat_interval_s=args.heartbeat,
        retry_tiers=topology.retry_tiers,
        max_body_bytes=topology.defaults.max_body_bytes,
        max_clock_skew_ms=int(args.max_clock_skew * 1000),
        max_queue_window_ms=int(args.max_queue_window * 1000),
        audience=settings.audience,
        middleware=middleware,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        secrets=secret_provider(settings, args.secrets),
        claims=args.claims,
        claim_timeout_s=args.claim_timeout,
        labels=dict(args.labels),
        limits=limits,
        limits_db_url=args.limits_db,
        shards=shards,
    )
    worker = Worker(executors, config)
    run_daemon(run_until_signal(worker.run, worker.stop, config.keyring.reload))
    return Exit.OK
