"""What ``wayang-mq top`` shows, gathered in one pass: the broker's queues, consumers and
alarms from the management API, and the live executors and running tasks from the control
plane's record.

Each source fails on its own: a broker or database that went away becomes an error line in
the snapshot (and the other source still answers), never an exception out of
:meth:`FabricSources.snapshot`, so a refreshing view keeps refreshing until it comes back.
The management API's numbers lag by its statistics interval (5 s by default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from wayang_mq.amqp.management import JSON, ManagementClient
from wayang_mq.core import names
from wayang_mq.core.errors import WayangError
from wayang_mq.topology.spec import Capability, Topology

#: how many running tasks the view lists (the longest running first)
SLOWEST = 8
#: a message shown in a cell is cut to this many characters (it is executor-written text)
MESSAGE_CHARS = 60


@dataclass(frozen=True, slots=True)
class CapabilityStats:
    """One capability's task queues (all its shards, summed) and its dead-letter queue."""

    capability: str
    queues: int  # task queues found on the broker (its shards)
    expected_queues: int  # task queues the topology declares for it
    depth: int  # messages in its task queues: ready + unacked
    ready: int
    unacked: int  # delivered to an executor, not yet acked (running, mostly)
    publish_rate: float  # messages per second into its task queues
    deliver_rate: float  # messages per second delivered to executors
    consumers: int
    dead: int  # messages in wayang.dead.<capability>


@dataclass(frozen=True, slots=True)
class TierStats:
    """One retry tier's queue: retries waiting out their delay, for every capability."""

    name: str
    ttl_ms: int
    depth: int


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """The broker the view watches."""

    management_url: str
    node: str
    version: str
    alarms: tuple[str, ...]  # e.g. "memory on rabbit@host", "disk on rabbit@host"


@dataclass(frozen=True, slots=True)
class ConsumerGroup:
    """What one connection consumes of the task queues: an executor, as the broker sees it
    (the view's executors panel when there is no database)."""

    connection: str  # the name the client gave its connection (ours: the daemon id)
    capabilities: tuple[str, ...]
    consumers: int
    prefetch: int  # deliveries it may hold at once, summed over its consumers


@dataclass(frozen=True, slots=True)
class LiveExecutor:
    """One executor from the registry."""

    executor_id: str
    state: str  # live or lost
    in_flight: int
    concurrency: int
    last_seen_age_s: float
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunningTask:
    """A task the record says is running (or accepted and answered later)."""

    task_id: str
    capability: str
    executor_id: str
    attempt: int
    running_s: float
    fraction: float | None  # its last progress, 0..1 (None: none reported, or no fraction)
    message: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One frame of the view; an ``*_error`` says why that part is missing."""

    taken_at: datetime
    broker: BrokerInfo | None = None
    capabilities: tuple[CapabilityStats, ...] = ()
    tiers: tuple[TierStats, ...] = ()
    consumers: tuple[ConsumerGroup, ...] = ()
    executors: tuple[LiveExecutor, ...] | None = None  # None: no database, or it failed
    running: tuple[RunningTask, ...] = ()
    management_url: str = ""
    broker_error: str | None = None
    database_configured: bool = False
    database_error: str | None = None


class FabricSources:
    """Where a snapshot comes from: a management API, the topology that says which queues
    belong to which capability, and (optionally) the record's database."""

    def __init__(
        self,
        management: ManagementClient,
        topology: Topology,
        *,
        capabilities: Sequence[str] = (),
        database_url: str | None = None,
        slowest: int = SLOWEST,
    ) -> None:
        self._management = management
        self._topology = topology
        self._capabilities = watched(topology, capabilities)
        self._database_url = database_url
        self._slowest = slowest

    def snapshot(self, now: datetime | None = None) -> Snapshot:
        """Ask every source once; what fails is said in the snapshot, not raised."""
        now = now or datetime.now(UTC)
        url = self._management.base_url
        parts: dict[str, Any] = {"taken_at": now, "management_url": url}
        try:
            parts |= self._from_broker()
        except WayangError as exc:
            parts["broker_error"] = f"broker unreachable at {url}, retrying: {exc.message}"
        parts["database_configured"] = self._database_url is not None
        if self._database_url is not None:
            try:
                parts |= self._from_record(self._database_url, now)
            except WayangError as exc:
                parts["database_error"] = f"database unreachable, retrying: {exc.message}"
        return Snapshot(**parts)

    def _from_broker(self) -> dict[str, Any]:
        overview = self._management.overview()
        queues = {q["name"]: q for q in self._management.list_queues() if "name" in q}
        consumers = self._management.list_consumers()
        connections = self._management.list_connections()
        return {
            "broker": broker_info(self._management.base_url, overview, self._management),
            "capabilities": tuple(capability_stats(self._capabilities, queues)),
            "tiers": tuple(
                TierStats(t.name, t.ttl_ms, _int(queues.get(t.queue), "messages"))
                for t in self._topology.retry_tiers
            ),
            "consumers": tuple(consumer_groups(self._capabilities, consumers, connections)),
        }

    def _from_record(self, database_url: str, now: datetime) -> dict[str, Any]:
        from wayang_mq.controlplane.queries import executors, reading

        served = {c.name for c in self._capabilities}
        with reading(database_url) as conn:
            found = [
                LiveExecutor(
                    e.executor_id,
                    e.state,
                    len(e.in_flight),
                    e.concurrency,
                    e.last_seen_age_s,
                    tuple(e.capabilities),
                )
                for e in executors(conn, now)
                if e.state == "live" and served & set(e.capabilities)
            ]
            running = running_tasks(conn, now, sorted(served), self._slowest)
        return {"executors": tuple(found), "running": tuple(running)}


def watched(topology: Topology, only: Sequence[str] = ()) -> tuple[Capability, ...]:
    """The capabilities to show: the topology's, or just ``only`` (one the topology does not
    list is shown as one unsharded queue, as a worker would declare it)."""
    if not only:
        return topology.capabilities
    out = []
    for name in dict.fromkeys(only):
        try:
            out.append(topology.capability(name))
        except KeyError:
            out.append(Capability(name=name))
    return tuple(out)


def broker_info(url: str, overview: JSON, management: ManagementClient) -> BrokerInfo:
    """The header's facts: node, version, and any memory or disk alarm in the cluster."""
    alarms = []
    for node in management.list_nodes():
        name = str(node.get("name", "?"))
        if node.get("mem_alarm"):
            alarms.append(f"memory on {name}")
        if node.get("disk_free_alarm"):
            alarms.append(f"disk on {name}")
        if node.get("running") is False:
            alarms.append(f"{name} down")
    return BrokerInfo(
        url,
        str(overview.get("node", "?")),
        str(overview.get("rabbitmq_version", "?")),
        tuple(alarms),
    )


def capability_stats(
    capabilities: Iterable[Capability], queues: Mapping[str, JSON]
) -> list[CapabilityStats]:
    """Each capability's task queues summed (shards included), and its dead queue."""
    out = []
    for capability in capabilities:
        found = [queues[name] for name in capability.task_queues if name in queues]
        out.append(
            CapabilityStats(
                capability=capability.name,
                queues=len(found),
                expected_queues=len(capability.task_queues),
                depth=sum(_int(q, "messages") for q in found),
                ready=sum(_int(q, "messages_ready") for q in found),
                unacked=sum(_int(q, "messages_unacknowledged") for q in found),
                publish_rate=sum(_rate(q, "publish") for q in found),
                deliver_rate=sum(_rate(q, "deliver_get") for q in found),
                consumers=sum(_int(q, "consumers") for q in found),
                dead=_int(queues.get(names.dead_queue(capability.name)), "messages"),
            )
        )
    return out


def consumer_groups(
    capabilities: Iterable[Capability], consumers: Iterable[JSON], connections: Iterable[JSON]
) -> list[ConsumerGroup]:
    """The task queues' consumers, grouped by the connection that holds them."""
    capability_of = {q: c.name for c in capabilities for q in c.task_queues}
    client_name = {
        str(c.get("name")): str(c.get("user_provided_name") or c.get("name")) for c in connections
    }
    groups: dict[str, tuple[set[str], int, int]] = {}
    for consumer in consumers:
        queue = consumer.get("queue")
        queue_name = queue.get("name") if isinstance(queue, dict) else None
        if queue_name not in capability_of:
            continue
        channel = consumer.get("channel_details")
        server_name = str(channel.get("connection_name", "?")) if isinstance(channel, dict) else "?"
        connection = client_name.get(server_name, server_name)
        caps, count, prefetch = groups.get(connection, (set(), 0, 0))
        caps.add(capability_of[queue_name])
        groups[connection] = (caps, count + 1, prefetch + _int(consumer, "prefetch_count"))
    return [
        ConsumerGroup(name, tuple(sorted(caps)), count, prefetch)
        for name, (caps, count, prefetch) in sorted(groups.items())
    ]


def running_tasks(
    conn: Any, now: datetime, capabilities: Sequence[str], limit: int
) -> list[RunningTask]:
    """The tasks running longest (and long-running ones accepted), with their last progress."""
    rows = conn.execute(
        "SELECT t.task_id, t.capability, t.executor_id, t.attempt,"
        " coalesce(a.started_at, a.queued_at, t.first_seen) AS started,"
        " p.fraction, p.message FROM tasks t"
        " LEFT JOIN attempts a ON a.task_id = t.task_id AND a.attempt = t.attempt"
        " LEFT JOIN LATERAL (SELECT fraction, message FROM progress WHERE task_id = t.task_id"
        "  AND attempt = t.attempt ORDER BY sent_at DESC LIMIT 1) p ON true"
        " WHERE t.state IN ('running', 'pending') AND t.capability = ANY(%s)"
        " ORDER BY started, t.task_id LIMIT %s",
        (list(capabilities), limit),
    ).fetchall()
    return [
        RunningTask(
            task_id=r["task_id"],
            capability=r["capability"],
            executor_id=r["executor_id"] or "?",
            attempt=r["attempt"],
            running_s=max(0.0, (now - r["started"]).total_seconds()),
            fraction=r["fraction"],
            message=(r["message"] or "")[:MESSAGE_CHARS],
        )
        for r in rows
    ]


def _int(item: JSON | None, key: str) -> int:
    value = (item or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _rate(queue: JSON, stat: str) -> float:
    """A per-second rate from ``message_stats`` (absent until the queue saw traffic)."""
    stats = queue.get("message_stats")
    details = stats.get(f"{stat}_details") if isinstance(stats, dict) else None
    rate = details.get("rate") if isinstance(details, dict) else None
    return float(rate) if isinstance(rate, int | float) and not isinstance(rate, bool) else 0.0
