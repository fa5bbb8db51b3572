"""The worker's recent results, as a middleware layer: a redelivered task that this worker
already finished (its result was published but the ack was lost, or the result was not
confirmed and the delivery came back) is answered with the same result instead of being run
again.

Bounded by count and by bytes: a result too large for an eighth of the budget is not kept
(a redelivery then runs the task again, which at-least-once allows).
"""

from __future__ import annotations

from wayang_mq.core.bounded import LastSeen
from wayang_mq.core.model import Result
from wayang_mq.runtime.middleware import Executed, Middleware, Opened

#: ids, metrics and the model itself, roughly, on top of the output
_OVERHEAD_BYTES = 512


class RecentResults(Middleware):
    """Answers the same attempt of a finished task from memory."""

    def __init__(self, limit: int, budget_bytes: int) -> None:
        self._results: LastSeen[Result] = LastSeen(limit, budget_bytes)

    def get(self, task_id: str) -> Result | None:
        """The last terminal result this worker gave for ``task_id``, if it still has it."""
        return self._results.get(task_id)

    async def on_opened(self, opened: Opened) -> Result | None:
        """This attempt's result, if this worker finished it before (a redelivery)."""
        result = self._results.get(opened.task.task_id)
        return result if result is not None and result.attempt == opened.task.attempt else None

    async def on_executed(self, executed: Executed) -> Result:
        """Remember a terminal result (a PENDING one is not an answer to repeat)."""
        result = executed.result
        if result.terminal:
            self._results.put(result.task_id, result, executed.output_bytes + _OVERHEAD_BYTES)
        return result
