"""The worker's trace layer: each task's W3C trace continued, its log fields bound, and with
OpenTelemetry its ``queue wait``, ``execute`` and ``publish result`` spans
(:mod:`wayang_mq.observability.tracing` holds the trace context itself).

It is the worker's first middleware layer, so every line about a task, from every later
layer and the executor, carries the task's fields and trace id.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field

from wayang_mq.core.model import Result, Status, Task
from wayang_mq.observability import tracing
from wayang_mq.runtime.middleware import Executed, Middleware, Opened, Received, Settled


@dataclass(slots=True)
class _Delivery:
    """One delivery's trace, from its arrival to its answer."""

    incoming: tracing.TraceContext | None
    received_ns: int
    execute: tracing.Span | None = None
    executed_ns: int | None = None
    attributes: dict[str, str | int] = field(default_factory=dict)


_delivery: contextvars.ContextVar[_Delivery | None] = contextvars.ContextVar(
    "wayang_delivery_trace", default=None
)


class TaskTracing(Middleware):
    """The worker's first layer: continues each task's trace and binds its log fields.

    Received: reads ``traceparent``/``tracestate`` (invalid: ignored, a new trace starts).
    Opened: the task's trace context becomes current (its span is the worker's ``execute``
    span), with task id, node id, capability, executor id, attempt and trace id on every log
    line; with OpenTelemetry, ``queue wait`` is recorded and ``execute`` starts. Executed:
    ``execute`` ends. Settled: ``publish result`` is recorded (the answer's publish and
    confirm)."""

    def __init__(self, executor_id: str) -> None:
        self._executor_id = executor_id

    async def on_received(self, received: Received) -> None:
        _delivery.set(_Delivery(tracing.from_headers(received.headers), time.time_ns()))

    async def on_opened(self, opened: Opened) -> None:
        delivery = _delivery.get()
        if delivery is None:  # pragma: no cover - on_received always runs first
            delivery = _Delivery(None, time.time_ns())
            _delivery.set(delivery)
        task, incoming = opened.task, delivery.incoming
        if not tracing.otel_active():  # the common case: only the ids
            tracing.bind_task(
                task, self._executor_id, incoming.child() if incoming else tracing.new_trace()
            )
            return None
        attributes = delivery.attributes = _attributes(task)
        waited_from = max(task.issued_at_ms, task.not_before_ms or 0) * 1_000_000
        if waited_from < delivery.received_ns:
            wait = tracing.otel_span("queue wait", "internal", incoming, waited_from, attributes)
            wait.end(end_ns=delivery.received_ns)
        span = tracing.otel_span("execute", "consumer", incoming, None, attributes)
        span.attach()
        delivery.execute = span
        tracing.bind_task(task, self._executor_id, span.context)
        return None

    async def on_executed(self, executed: Executed) -> Result:
        delivery = _delivery.get()
        result = executed.result
        if delivery is not None and delivery.execute is not None:  # recorded with OpenTelemetry
            delivery.executed_ns = time.time_ns()
            error = None
            if result.status is Status.FAILED and result.error is not None:
                error = f"{result.error.code}: {result.error.message}"[:500]
            delivery.execute.end(error=error)
        return result

    async def on_settled(self, settled: Settled) -> None:
        delivery = _delivery.get()
        if delivery is None or delivery.execute is None:
            return
        if settled.outcome.kind == "pending":
            return  # accepted: it runs on, its answer is published later
        delivery.execute.end()  # answered without an executed result (refused by a layer)
        if delivery.executed_ns is not None:
            published = tracing.otel_span(
                "publish result",
                "producer",
                delivery.execute.context,
                delivery.executed_ns,
                {**delivery.attributes, "wayang.outcome": str(settled.outcome.kind)},
            )
            published.end()
            delivery.executed_ns = None


def _attributes(task: Task) -> dict[str, str | int]:
    return {
        "messaging.system": "rabbitmq",
        "wayang.task_id": task.task_id,
        "wayang.capability": task.capability,
        "wayang.node_id": task.node_id,
        "wayang.attempt": task.attempt,
    }
