"""``wayang-mq dev``: a local broker, the topology, demo workers and tasks flowing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wayang_mq.config import Settings


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    p = sub.add_parser("dev", help="run a local broker, the topology and demo workers")
    p.add_argument("--state-dir", type=Path, help="where the stack keeps its state (.wayang)")
    p.add_argument("--amqp-port", type=int, help="AMQP port (default: a free one)")
    p.add_argument("--management-port", type=int, help="console port (default: a free one)")
    p.add_argument("--workers", type=int, default=2, help="demo worker processes (default 2)")
    p.add_argument("--demo-tasks", type=int, default=20, help="tasks to send at start")
    p.add_argument("--no-wait", action="store_true", help="exit after the demo (for scripts)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="TLS-only broker: a private CA, client certificates, EXTERNAL login",
    )
    p.add_argument(
        "--cluster",
        type=int,
        default=1,
        metavar="N",
        help="N private RabbitMQ nodes forming one cluster (3 is usual; default 1 node)",
    )
    p.add_argument(
        "--no-prometheus",
        action="store_true",
        help="do not start a private Prometheus (started when the prometheus binary exists)",
    )
    p.set_defaults(func=_cmd_dev)


def _cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.dev.stack import DevOptions, run_dev

    options = DevOptions(
        state_dir=args.state_dir or settings.state_dir,
        amqp_port=args.amqp_port,
        management_port=args.management_port,
        workers=args.workers,
        demo_tasks=args.demo_tasks,
        wait=not args.no_wait,
        tls=args.tls,
        prometheus=not args.no_prometheus,
        cluster=args.cluster,
    )
    return int(run_dev(options, settings))
