"""The worker's memory of task attempts it has taken, so a copy of one published again (a
replay) is refused while the attempt is still valid, instead of running twice.

A broker *redelivery* (the ``redelivered`` flag, which only the broker sets) is no replay:
at-least-once delivery returns what a lost channel or a crash left unacked. A copy of an
attempt that runs here joins that run, and one that finished here recently is answered with
the same result (the dispatcher keeps the first): neither runs twice, so a publisher's
re-send after a lost confirm costs nothing. Anything else that repeats a (task id, attempt,
token) this worker took, and no longer holds, is a copy somebody published again: refused.
The memory is this worker's own, bounded, and kept until the attempt's deadline plus an
hour; it holds across workers where tasks of one id always reach one worker (sharded
capabilities with a single active consumer per shard) and not otherwise: docs/security.md
§7 says what covers the rest.
"""

from __future__ import annotations

from wayang_mq.core.bounded import LastSeenDigests
from wayang_mq.core.model import Task, now_ms

#: how long after an attempt's deadline a copy of it is still recognised
AFTER_DEADLINE_MS = 3_600_000


class Replays:
    """Attempts taken recently; ``take`` answers whether a fresh copy repeats one.

    Kept as digests in memory allocated up front (:class:`LastSeenDigests`: 4.2 MB for the
    100,000 attempts), so a worker's memory stays flat however many tasks it drains.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._taken = LastSeenDigests(limit)

    @staticmethod
    def _key(task: Task) -> str:
        return f"{task.task_id}\x00{task.attempt}\x00{task.token}"

    def take(self, task: Task, *, redelivered: bool) -> bool:
        """Record the attempt; False when a copy that is not a broker redelivery repeats an
        attempt taken before and still remembered."""
        key = self._key(task)
        until = self._taken.get(key)
        if until is not None and not redelivered and now_ms() <= until:
            return False
        self._taken.put(key, task.deadline_ms + AFTER_DEADLINE_MS)
        return True
