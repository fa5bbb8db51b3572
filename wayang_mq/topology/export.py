"""Export a topology as a RabbitMQ definitions document (``definitions.json``).

For operators who provision brokers from definitions (the console's "Import definitions",
``load_definitions`` in rabbitmq.conf, ``rabbitmqctl import_definitions``) instead of
running ``wayang-mq topology apply``. Built from the same Topology methods as apply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wayang_mq.topology.spec import Topology, as_dict


def export_definitions(
    topology: Topology, *, vhost: str = "/", rabbit_version: str | None = None
) -> dict[str, Any]:
    """The topology as a definitions document for one vhost (created on import if missing).

    Users and permissions are left out: they are the operator's, not the topology's.
    """
    document: dict[str, Any] = {}
    if rabbit_version is not None:
        document["rabbit_version"] = rabbit_version
    document["vhosts"] = [{"name": vhost}]
    document["exchanges"] = [
        {
            "name": e.name,
            "vhost": vhost,
            "type": e.type.value,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": as_dict(e.arguments),
        }
        for e in topology.exchanges()
    ]
    document["queues"] = [
        {
            "name": q.name,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": as_dict(q.arguments),
        }
        for q in topology.queues()
    ]
    document["bindings"] = [
        {
            "source": b.source,
            "vhost": vhost,
            "destination": b.destination,
            "destination_type": b.destination_type,
            "routing_key": b.routing_key,
            "arguments": {},
        }
        for b in topology.bindings()
    ]
    document["policies"] = [
        {
            "vhost": vhost,
            "name": p.name,
            "pattern": p.pattern,
            "apply-to": p.apply_to,
            "definition": as_dict(p.definition),
            "priority": p.priority,
        }
        for p in topology.policies()
    ]
    return document


def write_definitions(topology: Topology, path: Path, *, vhost: str = "/") -> None:
    """Write the definitions document as pretty JSON (stable order, so diffs stay small)."""
    text = json.dumps(export_definitions(topology, vhost=vhost), indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
