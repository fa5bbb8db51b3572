"""``wayang-mq control-plane`` and ``wayang-mq db migrate``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from wayang_mq.cli.common import add_metrics_options, run_until_signal
from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings
from wayang_mq.core.errors import ConfigError


def add(sub: Any) -> None:
    """Register this verb's parsers and handlers."""
    cp = sub.add_parser(
        "control-plane", help="record every task, result and event in PostgreSQL (the registry)"
    )
    cp.add_argument("--id", dest="control_plane_id", help="default: control-plane-host-pid")
    cp.add_argument(
        "--prefetch", type=int, default=256, help="deliveries held while writing (default 256)"
    )
    cp.add_argument(
        "--health-port", type=int, help="answer HTTP health probes on this port (200 / 503)"
    )
    add_metrics_options(cp)
    cp.add_argument(
        "--audit-interval",
        type=float,
        default=60.0,
        metavar="S",
        help="with --metrics-port: seconds between the audit and registry reads behind "
        "wayang_audit_findings and wayang_executors (default 60; 0: never)",
    )
    cp.set_defaults(func=_cmd_control_plane)
    db = sub.add_parser("db", help="the control plane's database")
    dsub = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    mig = dsub.add_parser("migrate", help="apply the schema migrations not applied yet")
    mig.set_defaults(func=_cmd_migrate)
    rb = dsub.add_parser(
        "rebuild", help="replay the history stream into a fresh, migrated, empty database"
    )
    rb.add_argument(
        "--from",
        dest="start",
        default="first",
        help="offset or time to replay from (default: first, the oldest the stream keeps)",
    )
    rb.set_defaults(func=_cmd_rebuild)


def database_url(settings: Settings) -> str:
    """The control plane's database (WAYANG_DATABASE_URL, or the one `wayang-mq dev` runs)."""
    from wayang_mq.config import saved_database_url

    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    saved = saved_database_url(settings)
    if saved is None:
        raise ConfigError(
            "no database: WAYANG_DATABASE_URL is not set and no `wayang-mq dev` stack runs here",
            hint="set WAYANG_DATABASE_URL=postgresql://user:password@host/db, or run "
            "`wayang-mq dev`",
        )
    return saved


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.controlplane.migrate import latest_version, migrate

    applied = migrate(database_url(settings))
    if applied:
        for name in applied:
            print(f"applied {name}")
    print(f"schema at version {latest_version()}")
    return Exit.OK


def _cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.config import broker_endpoint, keyring
    from wayang_mq.controlplane.history import parse_start
    from wayang_mq.controlplane.rebuild import rebuild
    from wayang_mq.core.envelope import TaskChecks
    from wayang_mq.topology.spec import load_topology

    start = parse_start(args.start)
    topology = load_topology(settings.topology)
    checks = TaskChecks(audience=settings.audience, max_body_bytes=topology.defaults.max_body_bytes)
    report = asyncio.run(
        rebuild(
            broker_endpoint(settings, "control-plane").amqp_url,
            database_url(settings),
            keyring(settings),  # verified as the control plane verifies
            checks=checks,
            from_offset=start,
            progress=_Progress(),
        )
    )
    if report.first is None:
        print("the history holds nothing to replay")
        return Exit.OK
    print(
        f"replayed offsets {report.first}..{report.last}: {report.read} read,"
        f" {report.written} written, {report.repeated} repeated, {report.refused} refused"
    )
    return Exit.OK


class _Progress:
    """Messages read / total on stderr: one line redrawn on a terminal, else a line per tenth."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._tenth = -1

    def __call__(self, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if not self._tty and tenth == self._tenth:
            return
        self._tenth = tenth
        end = "\n" if done >= total or not self._tty else "\r"
        print(f"rebuild: {done} / {total} history entries", end=end, file=sys.stderr, flush=True)


def _cmd_control_plane(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.config import broker_endpoint, keyring, signer
    from wayang_mq.controlplane.config import ControlPlaneConfig
    from wayang_mq.controlplane.daemon import ControlPlane
    from wayang_mq.topology.spec import load_topology

    topology = load_topology(settings.topology)
    extra = {"control_plane_id": args.control_plane_id} if args.control_plane_id else {}
    config = ControlPlaneConfig(
        amqp_url=broker_endpoint(settings, "control-plane").amqp_url,
        database_url=database_url(settings),
        keyring=keyring(settings),
        signer=signer(settings, "control-plane"),
        prefetch=args.prefetch,
        audience=settings.audience,
        max_body_bytes=topology.defaults.max_body_bytes,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        audit_interval_s=args.audit_interval,
        **extra,
    )
    daemon = ControlPlane(config)
    asyncio.run(run_until_signal(daemon.run, daemon.stop, config.keyring.reload))
    return Exit.OK
