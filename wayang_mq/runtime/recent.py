"""The worker's recent results, as a middleware layer: a redelivered task that this worker
already finished (its result was published but the ack was lost, or the result was not
confirmed and the delivery came back) is answered with the same result instead of being run
again.

Bounded by count and by bytes: a result too large for an eighth of the budget is not kept
(a redelivery then runs the task again, which at-least-once allows). Results are kept in
their wire form (an echo's ~400 bytes, where the model is ~1.8 KB: 10,000 of them are 18 MB
as models), and decoded again only when one is asked for; the newest few are kept as they
are too, so a result handed out is the same object when asked for again (the metrics layer
tells an answer from memory by that).
"""

from __future__ import annotations

from wayang_mq.core.bounded import LastSeen
from wayang_mq.core.errors import InvalidMessage
from wayang_mq.core.model import Result
from wayang_mq.core.wire import decode, encode
from wayang_mq.runtime.middleware import Executed, Middleware, Opened

#: ids, metrics and the model itself, roughly, on top of the output
_OVERHEAD_BYTES = 512
#: results kept as models too: more than the deliveries a worker holds at once
_AS_MODELS = 256


class RecentResults(Middleware):
    """Answers the same attempt of a finished task from memory."""

    def __init__(self, limit: int, budget_bytes: int) -> None:
        self._results: LastSeen[bytes] = LastSeen(limit, budget_bytes)
        self._models: LastSeen[Result] = LastSeen(min(limit, _AS_MODELS))

    def get(self, task_id: str) -> Result | None:
        """The last terminal result this worker gave for ``task_id``, if it still has it."""
        body = self._results.get(task_id)
        if body is None:
            return None
        result = self._models.get(task_id)
        if result is None:
            try:
                result = decode(body, Result)
            except InvalidMessage:  # encoded here, so never; the task would run again
                return None
            self._models.put(task_id, result)
        return result

    async def on_opened(self, opened: Opened) -> Result | None:
        """This attempt's result, if this worker finished it before (a redelivery)."""
        result = self.get(opened.task.task_id)
        return result if result is not None and result.attempt == opened.task.attempt else None

    async def on_executed(self, executed: Executed) -> Result:
        """Remember a terminal result (a PENDING one is not an answer to repeat)."""
        result = executed.result
        weight = executed.output_bytes + _OVERHEAD_BYTES
        if result.terminal and self._results.put(result.task_id, encode(result), weight):
            self._models.put(result.task_id, result)
        return result
