"""``wayang-mq topology apply|export``."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    p = sub.add_parser("topology", help="declare, export or reshard the RabbitMQ topology")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    apply = tsub.add_parser("apply", help="declare exchanges, queues, bindings and policies")
    apply.add_argument("--file", type=Path, help="topology file (default topology/wayang.toml)")
    apply.set_defaults(func=_cmd_topology_apply)
    export = tsub.add_parser("export", help="write a definitions.json for the console import")
    export.add_argument("--file", type=Path, help="topology file (default topology/wayang.toml)")
    export.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    export.set_defaults(func=_cmd_topology_export)
    reshard = tsub.add_parser(
        "reshard",
        help="change a sharded capability's shard count, moving its queued tasks",
        description="Rebuild CAP's shard queues as --to queues (single active consumer), "
        "moving every queued task; set shards = N in the topology file first, stop CAP's "
        "workers, and pause its dispatchers to keep order per key. Safe to run again after "
        "a crash (docs/sharding.md).",
    )
    reshard.add_argument("capability", metavar="CAP", help="the sharded capability")
    reshard.add_argument("--to", type=int, required=True, metavar="N", help="the new count")
    reshard.add_argument("--file", type=Path, help="topology file (default topology/wayang.toml)")
    reshard.set_defaults(func=_cmd_topology_reshard)


def _cmd_topology_apply(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.amqp.connect import management_client
    from wayang_mq.config import broker_endpoint
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


def _cmd_topology_reshard(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.amqp.connect import management_client
    from wayang_mq.config import broker_endpoint
    from wayang_mq.topology.reshard import reshard
    from wayang_mq.topology.spec import load_topology

    topology = load_topology(args.file or settings.topology)
    endpoint = broker_endpoint(settings)
    report = asyncio.run(
        reshard(
            topology,
            args.capability,
            args.to,
            endpoint.amqp_url,
            management_client(endpoint),
            progress=lambda line: print(line, flush=True),
        )
    )
    print(report.line())
    return Exit.OK
