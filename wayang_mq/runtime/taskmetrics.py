"""The worker's task metrics as a middleware layer (:mod:`wayang_mq.runtime.middleware`).

Every delivery passes its four hooks, so the layer sees what the worker does without a branch
in the worker: received (before decoding), opened (queue wait), executed (execution time,
or an answer from an earlier result: a duplicate), settled (the outcome: finished by status
and code, a retry, a dead letter, a refusal, a cancel, a redelivery). Each hook is one or
two increments on children bound per capability up front.
"""

from __future__ import annotations

from wayang_mq.amqp.outcome import Kind
from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.model import Result, now_ms
from wayang_mq.observability.metrics import CapabilityChildren, WorkerMetrics
from wayang_mq.runtime.middleware import Executed, Middleware, Opened, Received, Settled
from wayang_mq.runtime.recent import RecentResults


class TaskMetrics(Middleware):
    """Counts each delivery into a worker's :class:`WorkerMetrics`."""

    def __init__(self, metrics: WorkerMetrics, recent: RecentResults) -> None:
        self._metrics = metrics
        self._caps = metrics.capabilities
        self._recent = recent  # an answer that *is* its cached result is a duplicate

    async def on_received(self, received: Received) -> None:
        """One delivery received."""
        self._caps[received.capability].received.inc()

    async def on_opened(self, opened: Opened) -> Result | None:
        """Its queue wait: since issued, or since its not-before when it has one."""
        task = opened.task
        since = max(task.issued_at_ms, task.not_before_ms or 0)
        self._caps[opened.capability].queue_wait.observe(max(0, now_ms() - since) / 1000)
        return None

    async def on_executed(self, executed: Executed) -> Result:
        """Its execution time, or a duplicate answered from the worker's recent results."""
        result = executed.result
        children = self._caps[executed.task.capability]
        if self._recent.get(result.task_id) is result:
            children.duplicates.inc()
        else:
            duration_ms = result.metrics.get("duration_ms")
            if duration_ms is not None:
                children.execution.observe(duration_ms / 1000)
        return result

    async def on_settled(self, settled: Settled) -> None:
        """What became of the delivery."""
        outcome, capability = settled.outcome, settled.capability
        result = outcome.result
        children: CapabilityChildren = self._caps[capability]
        if result is not None and result.metrics.get("redelivered"):
            children.redeliveries.inc()
        kind = outcome.kind
        if kind is Kind.DONE or kind is Kind.PENDING:
            if result is None:
                return
            code = result.error.code if result.error is not None else None
            self._metrics.finished(capability, result.status, code).inc()
            if code == ErrorCode.CANCELLED:
                children.cancels.inc()
            elif code == ErrorCode.RETRIES_EXHAUSTED:
                self._metrics.dead_letter(capability, code)
        elif kind is Kind.RETRY:
            children.retries.inc()
        elif kind is Kind.DEAD_LETTER:
            self._metrics.refused(capability, outcome.code)
            self._metrics.dead_letter(capability, outcome.code)
        elif kind is Kind.DISCARD:  # a claim the record answers: a duplicate copy
            children.duplicates.inc()
