"""The fabric's Prometheus metric families, one set per daemon (docs/observability.md, Metrics).

Every daemon builds its families on a :class:`~prometheus_client.CollectorRegistry` of its
own: several daemons run in one process (tests, the dev stack), and each must answer its own
``/metrics``. A dispatcher builds them on the registry its embedding process gives it
(``prometheus_client.REGISTRY`` by default), once per registry, so two dispatchers in one
process share them.

Labels are bounded: no task ids; capabilities are validated names (and capped, see
:class:`BoundedLabel`); reasons and error codes come from closed enums, never free text.
Hot-path children (per capability) are bound once, so counting a task is an increment.

``prometheus_client`` is imported where a registry or a family is made: a daemon started
without metrics never loads it (2.5 MB of a worker's memory).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wayang_mq.core import names
from wayang_mq.core.errors import ErrorCode
from wayang_mq.version import __version__

if TYPE_CHECKING:  # imported where families are built: without metrics it is never loaded
    from prometheus_client import CollectorRegistry, Counter, Histogram

#: the label value for anything outside a closed set, or past a label's cap
OTHER = "other"

#: publish confirms and database batches: a millisecond to a minute
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    60.0,
)
#: execution, queue wait, round trip: five milliseconds to an hour
TASK_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip

#: error codes as label values: the wire's closed enum
ERROR_CODES = frozenset(str(code) for code in ErrorCode)


def new_registry() -> CollectorRegistry:
    """A daemon's own registry (the first use of the client in a daemon with metrics on)."""
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


class BoundedLabel:
    """A label fed from outside (a capability from a routing key, an exchange): the first
    ``limit`` distinct values are kept, any later one is ``other``, so a hostile sender
    cannot grow the series without bound."""

    def __init__(self, limit: int = 256, valid: Callable[[str], bool] = lambda _: True) -> None:
        self._limit = limit
        self._valid = valid
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit or not self._valid(value):
            return OTHER
        self._seen.add(value)
        return value


def error_code(code: object) -> str:
    """An error code as a label value: ``""`` for none, ``other`` if not the wire's."""
    if code is None:
        return ""
    text = str(code)
    return text if text in ERROR_CODES else OTHER


class PublishMetrics:
    """What a :class:`~wayang_mq.amqp.publisher.ConfirmedPublisher` reports: confirm latency
    by exchange, backpressure events, and whether the broker blocks publishing now."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self._confirm = Histogram(
            "wayang_publish_confirm_seconds",
            "Time from publishing a message to the broker's confirm, by exchange.",
            ["exchange"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self._exchange = BoundedLabel(64)
        self._by_exchange: dict[str, Callable[[float], None]] = {}
        events = Counter(
            "wayang_backpressure_total",
            "Publishes held back: a full queue nacked one (queue_full), or the broker blocked "
            "publishing (broker_blocked).",
            ["reason"],
            registry=registry,
        )
        self._queue_full = events.labels("queue_full")
        self._blocked_events = events.labels("broker_blocked")
        self._blocked = Gauge(
            "wayang_broker_blocked",
            "1 while the broker blocks this connection's publishing (a memory or disk alarm).",
            registry=registry,
        )

    def confirmed(self, exchange: str, seconds: float) -> None:
        """A publish was confirmed after ``seconds``."""
        observe = self._by_exchange.get(exchange)
        if observe is None:
            observe = self._confirm.labels(self._exchange(exchange or "(default)")).observe
            self._by_exchange[exchange] = observe
        observe(seconds)

    def rejected(self) -> None:
        """A full queue nacked a publish."""
        self._queue_full.inc()

    def blocked(self) -> None:
        """The broker blocks publishing: a wait begins."""
        self._blocked_events.inc()
        self._blocked.set(1)

    def unblocked(self) -> None:
        """Publishing flows again (or the wait was given up)."""
        self._blocked.set(0)


class DaemonMetrics:
    """What every daemon exports: who it is, whether it is ready, its publishing, and (for
    daemons that send them) the age of its last heartbeat."""

    def __init__(
        self, registry: CollectorRegistry, daemon: str, daemon_id: str, ready: Callable[[], bool]
    ) -> None:
        from prometheus_client import Gauge

        self.registry = registry
        info = Gauge(
            "wayang_daemon_info",
            "Always 1; the labels say which daemon, its id and the wayang-mq version.",
            ["daemon", "id", "version"],
            registry=registry,
        )
        info.labels(daemon, daemon_id, __version__).set(1)
        Gauge(
            "wayang_daemon_ready", "1 while the daemon is ready (see /readyz).", registry=registry
        ).set_function(lambda: 1.0 if ready() else 0.0)
        self.publish = PublishMetrics(registry)

    def heartbeat_age(self, age_s: Callable[[], float]) -> None:
        """Export the seconds since the last heartbeat this daemon sent."""
        from prometheus_client import Gauge

        Gauge(
            "wayang_heartbeat_age_seconds",
            "Seconds since this daemon last sent a heartbeat (NaN before the first).",
            registry=self.registry,
        ).set_function(age_s)


@dataclass(frozen=True, slots=True)
class CapabilityChildren:
    """One capability's pre-bound series: counting a task is one increment."""

    received: Counter
    execution: Histogram
    queue_wait: Histogram
    retries: Counter
    cancels: Counter
    redeliveries: Counter
    duplicates: Counter


class WorkerMetrics(DaemonMetrics):
    """A worker's task counters, histograms and in-flight gauge, by capability."""

    def __init__(
        self,
        registry: CollectorRegistry,
        daemon_id: str,
        ready: Callable[[], bool],
        capabilities: tuple[str, ...],
        in_flight: Callable[[str], int],
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        super().__init__(registry, "worker", daemon_id, ready)

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, ["capability", *labels], registry=registry)

        received = counter("wayang_tasks_received_total", "Task deliveries received.")
        self._finished = counter(
            "wayang_tasks_finished_total",
            "Deliveries answered with a result (PENDING: accepted, answered later).",
            "status",
            "error_code",
        )
        execution = Histogram(
            "wayang_task_execution_seconds",
            "Time executors took to run tasks (answers not run here are not observed).",
            ["capability"],
            registry=registry,
            buckets=TASK_BUCKETS,
        )
        queue_wait = Histogram(
            "wayang_task_queue_wait_seconds",
            "Time from a task's issue (or its not-before) until this worker opened it.",
            ["capability"],
            registry=registry,
            buckets=TASK_BUCKETS,
        )
        retries = counter("wayang_task_retries_total", "Failed attempts sent to a retry tier.")
        self._dead = counter(
            "wayang_dead_letters_total",
            "Tasks this worker copied to the dead queue, by error code.",
            "reason",
        )
        cancels = counter("wayang_cancels_total", "Tasks answered FAILED cancelled.")
        redeliveries = counter(
            "wayang_redeliveries_total", "Answered deliveries the broker had delivered before."
        )
        duplicates = counter(
            "wayang_duplicates_total", "Deliveries answered from an earlier result, not run."
        )
        self._refused = counter(
            "wayang_deliveries_refused_total",
            "Deliveries refused as bad input (not run), by error code.",
            "reason",
        )
        flight = Gauge(
            "wayang_tasks_in_flight",
            "Tasks running on this worker now.",
            ["capability"],
            registry=registry,
        )
        self.capabilities: dict[str, CapabilityChildren] = {}
        for capability in capabilities:
            self.capabilities[capability] = CapabilityChildren(
                received.labels(capability),
                execution.labels(capability),
                queue_wait.labels(capability),
                retries.labels(capability),
                cancels.labels(capability),
                redeliveries.labels(capability),
                duplicates.labels(capability),
            )
            flight.labels(capability).set_function(functools.partial(in_flight, capability))
        self._finished_children: dict[tuple[str, str, str], Counter] = {}

    def limits(
        self, capabilities: tuple[str, ...], waiting: Callable[[str], int]
    ) -> dict[str, Callable[[float], None]]:
        """The limit families (docs/executors.md, Limits), with series for the limited
        ``capabilities`` only; returns each one's wait observer."""
        from prometheus_client import Gauge, Histogram

        wait = Histogram(
            "wayang_limit_wait_seconds",
            "Time a delivery waited for its capability's limit (rate, max running) here.",
            ["capability"],
            registry=self.registry,
            buckets=TASK_BUCKETS,
        )
        gauge = Gauge(
            "wayang_limit_waiting",
            "Deliveries waiting for their capability's limit on this worker now.",
            ["capability"],
            registry=self.registry,
        )
        observers: dict[str, Callable[[float], None]] = {}
        for capability in capabilities:
            observers[capability] = wait.labels(capability).observe
            gauge.labels(capability).set_function(functools.partial(waiting, capability))
        return observers

    def finished(self, capability: str, status: str, code: object) -> Counter:
        """The finished counter of one capability, status and error code."""
        key = (capability, status, error_code(code))
        child = self._finished_children.get(key)
        if child is None:
            child = self._finished.labels(*key)
            self._finished_children[key] = child
        return child

    def dead_letter(self, capability: str, code: object) -> None:
        """A copy kept in the dead queue, with its reason."""
        self._dead.labels(capability, error_code(code) or OTHER).inc()

    def refused(self, capability: str, code: object) -> None:
        """A delivery refused as bad input (it is dead-lettered too)."""
        self._refused.labels(capability, error_code(code) or OTHER).inc()


class ReaperMetrics(DaemonMetrics):
    """What the reaper does with the broker's dead letters."""

    def __init__(
        self, registry: CollectorRegistry, daemon_id: str, ready: Callable[[], bool]
    ) -> None:
        from prometheus_client import Counter

        super().__init__(registry, "reaper", daemon_id, ready)
        self._received = Counter(
            "wayang_dead_letters_received_total",
            "Dead letters the reaper took from wayang.reaper, by error code of the reason.",
            ["capability", "reason"],
            registry=registry,
        )
        self._handled = Counter(
            "wayang_dead_letters_handled_total",
            "Dead letters the reaper is done with: answered (a FAILED result published), "
            "skipped (a worker answered it) or unanswerable (nothing verified to answer).",
            ["capability", "outcome"],
            registry=registry,
        )
        self.capability = BoundedLabel(256, names.valid_capability)

    def received(self, capability: str, code: object) -> None:
        """One dead letter taken."""
        self._received.labels(self.capability(capability), error_code(code) or OTHER).inc()

    def handled(self, capability: str, outcome: str) -> None:
        """One dead letter acked: ``answered``, ``skipped`` or ``unanswerable``."""
        self._handled.labels(self.capability(capability), outcome).inc()


#: the control plane's fact kinds, by payload class (facts.Payload)
FACT_KINDS = {
    "TaskSeen": "task",
    "ResultSeen": "result",
    "Registered": "registration",
    "Beat": "heartbeat",
    "ProgressSeen": "progress",
    "CancelSeen": "cancel",
    "DeadSeen": "dead_letter",
    "RedispatchSeen": "redispatch",
}
#: the record's own refusal reasons, besides error codes
RECORD_REASONS = frozenset({"invalid", "unexpected", "unreadable", "write_failed"})
#: what the audit finds (queries.Finding.kind)
AUDIT_KINDS = ("lost", "ran_twice", "stray_result")
EXECUTOR_STATES = ("live", "lost")


class ControlPlaneMetrics(DaemonMetrics):
    """The control plane's record writes and the record's state (executors, the audit).

    Claims, placements, lost executors and re-dispatches are counted where they are
    decided and exported by a collector reading those counts at scrape time
    (:mod:`wayang_mq.controlplane.gauges`)."""

    def __init__(
        self, registry: CollectorRegistry, daemon_id: str, ready: Callable[[], bool]
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        super().__init__(registry, "control_plane", daemon_id, ready)
        facts = Counter(
            "wayang_record_facts_total",
            "Facts newly written to the record, by kind (repeats not counted).",
            ["kind"],
            registry=registry,
        )
        self._facts = {cls: facts.labels(kind) for cls, kind in FACT_KINDS.items()}
        self._facts_other = facts.labels(OTHER)
        self._refusals = Counter(
            "wayang_record_refusals_total",
            "Messages the record refused to write, by reason.",
            ["reason"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "wayang_record_batch_seconds",
            "Time to commit one batch of facts (database waits included).",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        executors = Gauge(
            "wayang_executors",
            "Executors in the registry by state, as of the last periodic read.",
            ["state"],
            registry=registry,
        )
        self.executors = {state: executors.labels(state) for state in EXECUTOR_STATES}
        findings = Gauge(
            "wayang_audit_findings",
            "What the last periodic audit found, by kind (0 everywhere: a clean record).",
            ["kind"],
            registry=registry,
        )
        self.findings = {kind: findings.labels(kind) for kind in AUDIT_KINDS}

    def fact(self, payload: object) -> None:
        """One fact newly written."""
        self._facts.get(type(payload).__name__, self._facts_other).inc()

    def refusal(self, reason: str) -> None:
        """One message refused."""
        ok = reason in RECORD_REASONS or reason in ERROR_CODES
        self._refusals.labels(reason if ok else OTHER).inc()


class DispatcherMetrics:
    """What a dispatcher exports into its embedding process's registry: tasks submitted,
    results received, round trips, and its publishing."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        self.publish = PublishMetrics(registry)
        self._submitted = Counter(
            "wayang_tasks_submitted_total",
            "Tasks published (confirmed by the broker).",
            ["capability"],
            registry=registry,
        )
        self._results = Counter(
            "wayang_results_received_total",
            "Terminal results taken as a task's answer (duplicates and fenced ones not).",
            ["capability", "status", "error_code"],
            registry=registry,
        )
        self._round_trip = Histogram(
            "wayang_task_round_trip_seconds",
            "Time from submitting a task to its terminal result arriving.",
            ["capability"],
            registry=registry,
            buckets=TASK_BUCKETS,
        )
        self.capability = BoundedLabel(1024, names.valid_capability)
        self._children: dict[str, tuple[Counter, Histogram]] = {}

    def per_capability(self, capability: str) -> tuple[Counter, Histogram]:
        """The submitted counter and round-trip histogram of one capability."""
        children = self._children.get(capability)
        if children is None:
            label = self.capability(capability)
            children = (self._submitted.labels(label), self._round_trip.labels(label))
            self._children[capability] = children
        return children

    def result(self, capability: str, status: str, code: object) -> None:
        """A task's terminal result arrived."""
        self._results.labels(self.capability(capability), status, error_code(code)).inc()


_DISPATCHERS: weakref.WeakKeyDictionary[CollectorRegistry, DispatcherMetrics] = (
    weakref.WeakKeyDictionary()
)
_DISPATCHERS_LOCK = threading.Lock()


def dispatcher_metrics(registry: CollectorRegistry) -> DispatcherMetrics:
    """The dispatcher families of ``registry``, built on first use (a family may be
    registered once per registry; every dispatcher of the process shares them)."""
    with _DISPATCHERS_LOCK:
        metrics = _DISPATCHERS.get(registry)
        if metrics is None:
            metrics = DispatcherMetrics(registry)
            _DISPATCHERS[registry] = metrics
        return metrics
