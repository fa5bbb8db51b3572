"""The control plane's metrics that are not counted on its write path
(docs/observability.md, Metrics):

- claims, placements, lost executors and re-dispatches, counted where they are decided
  (``ClaimDesk.counts``, ``Placer.counts``, ``Supervision``) and read by :class:`Decisions`
  when Prometheus scrapes: nothing extra on their paths;
- the record's state, read every ``audit_interval_s`` by :func:`watch`: executors by state,
  and the audit's findings by kind (:func:`wayang_mq.controlplane.queries.audit`, the same
  audit as ``wayang-mq audit``; it scans the tasks table in chunks, on a read-only connection
  in a worker thread, so a large record makes it slower, never the writes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from wayang_mq.controlplane import queries
from wayang_mq.controlplane.claims import ClaimDesk
from wayang_mq.controlplane.facts import Fact, Refused
from wayang_mq.controlplane.placement import Placer
from wayang_mq.controlplane.supervision import Supervision
from wayang_mq.core import logs
from wayang_mq.core.errors import WayangError
from wayang_mq.observability.metrics import AUDIT_KINDS, EXECUTOR_STATES, ControlPlaneMetrics

log = logging.getLogger("wayang_mq.controlplane")

#: placement outcomes (placement._placement_outcome)
PLACEMENTS = ("placed", "answered", "refused", "requeued")


@dataclass
class Parts:
    """The control plane's parts whose counts are exported (None: not running)."""

    claims: Callable[[], ClaimDesk | None]
    placer: Callable[[], Placer | None]
    supervision: Callable[[], Supervision | None]


class Decisions(Collector):
    """Claims by verdict, placements by outcome, lost executors and re-dispatches."""

    def __init__(self, parts: Parts) -> None:
        self._parts = parts

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Read the counts now."""
        claims = CounterMetricFamily(
            "wayang_claims",
            "Claims decided by verdict (refused: did not verify).",
            labels=["verdict"],
        )
        desk = self._parts.claims()
        if desk is not None:
            c = desk.counts
            for verdict, n in (
                ("run", c.run),
                ("duplicate", c.duplicate),
                ("cancelled", c.cancelled),
                ("refused", c.refused),
            ):
                claims.add_metric([verdict], n)
        yield claims
        placements = CounterMetricFamily(
            "wayang_placements", "Tasks sent for placement, by outcome.", labels=["outcome"]
        )
        placer = self._parts.placer()
        if placer is not None:
            for outcome in PLACEMENTS:
                placements.add_metric([outcome], placer.counts[outcome])
        yield placements
        supervision = self._parts.supervision()
        lost = supervision.lost if supervision is not None else 0
        redispatched = supervision.redispatched if supervision is not None else 0
        yield CounterMetricFamily(
            "wayang_executors_lost", "Executors this instance marked lost.", value=lost
        )
        yield CounterMetricFamily(
            "wayang_redispatches",
            "Tasks of lost executors this instance re-dispatched.",
            value=redispatched,
        )


def count_batch(
    metrics: ControlPlaneMetrics,
    seconds: float,
    read_out: Sequence[Fact | Refused],
    outcomes: Sequence[tuple[str, str]],
) -> None:
    """A committed batch: its time, each fact newly written by kind, each refusal by reason
    (the first word of the outcome's detail: a closed set, see ControlPlaneMetrics.refusal)."""
    metrics.batch_seconds.observe(seconds)
    for item, (kind, detail) in zip(read_out, outcomes, strict=True):
        if kind == "written" and isinstance(item, Fact):
            metrics.fact(item.payload)
        elif kind == "refused":
            metrics.refusal(detail.split(":", 1)[0])


def record_state(database_url: str) -> tuple[dict[str, int], dict[str, int]]:
    """Executors by state and audit findings by kind (blocking: run it in a thread)."""
    with queries.reading(database_url) as conn:
        rows = conn.execute("SELECT state, count(*) AS n FROM executors GROUP BY state")
        executors = {str(r["state"]): int(r["n"]) for r in rows.fetchall()}
        found: dict[str, int] = dict.fromkeys(AUDIT_KINDS, 0)
        for finding in queries.audit(conn, datetime.now(UTC)):
            found[finding.kind] = found.get(finding.kind, 0) + 1
    return executors, found


async def watch(metrics: ControlPlaneMetrics, database_url: str, interval_s: float) -> None:
    """Set the record-state gauges now and every ``interval_s`` (until cancelled); a read
    that fails is logged and leaves them as they were."""
    while True:
        try:
            executors, found = await asyncio.to_thread(record_state, database_url)
        except WayangError as exc:
            logs.event(log, "audit.unavailable", logging.WARNING, error=exc.one_line())
        except Exception:  # a bug here must not stop the gauges for good
            log.exception("event=audit.failed next=retrying")
        else:
            for state in EXECUTOR_STATES:
                metrics.executors[state].set(executors.get(state, 0))
            for kind in AUDIT_KINDS:
                metrics.findings[kind].set(found.get(kind, 0))
        await asyncio.sleep(interval_s)
