"""The dispatcher's book of replies: which tasks wait for an answer, and what became of every
result that came back on the reply queue.

The first terminal result per task id wins and is handed to the caller waiting; later ones
are duplicates; a result for an attempt a newer one replaced (another token) is fenced. A
PENDING result is not an answer: it marks the task accepted (someone will answer it later),
which stops the dispatcher from expiring it at its queue deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from aio_pika.abc import AbstractIncomingMessage

from wayang_mq.amqp.outcome import discard, reject, settle
from wayang_mq.core import logs
from wayang_mq.core.bounded import LastSeen
from wayang_mq.core.errors import ResultTimeout, WayangError
from wayang_mq.core.model import Result, Task
from wayang_mq.core.signing import KeyRing
from wayang_mq.core.wire import open_unverified, open_verified

log = logging.getLogger("wayang_mq.client.dispatcher")


class Verdict(StrEnum):
    """What the dispatcher did with a result it received (or decided itself)."""

    HANDED_OUT = "handed_out"  # the task's first terminal result: given to the caller waiting
    UNCLAIMED = "unclaimed"  # the first terminal result, but no caller waits here: kept
    DUPLICATE = "duplicate"  # the task already has its terminal result: dropped
    FENCED = "fenced"  # answers an attempt a newer one (new token) replaced: dropped
    NOT_TERMINAL = "not_terminal"  # PENDING: the task is accepted; its answer comes later
    INVALID = "invalid"  # not a result, or its signature does not verify: rejected


@dataclass(frozen=True, slots=True)
class ResultSeen:
    """One result the dispatcher received, and its verdict; see :meth:`Dispatcher.observe`."""

    verdict: Verdict
    result: Result | None  # None when INVALID: the body could not be read as a result


#: called with every :class:`ResultSeen`, inline: quick, and must not raise
ResultListener = Callable[[ResultSeen], None]


class TaskHandle:
    """A submitted task; await ``result()`` for its terminal Result."""

    def __init__(
        self, task: Task, future: asyncio.Future[Result], accepted: asyncio.Future[Result]
    ) -> None:
        self.task = task
        self._future = future
        self._accepted = accepted

    @property
    def task_id(self) -> str:
        """The submitted task's id."""
        return self.task.task_id

    def done(self) -> bool:
        """True once a terminal result has arrived."""
        return self._future.done()

    async def result(self, timeout_s: float | None = None) -> Result:
        """The terminal result; ``ResultTimeout`` if none arrives within ``timeout_s``."""
        return await _wait(self._future, timeout_s, self.task)

    async def accepted(self, timeout_s: float | None = None) -> Result:
        """The first answer: a PENDING result (the task is accepted, its answer comes later),
        or the terminal result if it came first."""
        return await _wait(self._accepted, timeout_s, self.task)


async def _wait(future: asyncio.Future[Result], timeout_s: float | None, task: Task) -> Result:
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except TimeoutError:
        raise ResultTimeout(
            f"no result for task {task.task_id} within {timeout_s}s",
            hint=f"is a worker running for {task.capability!r}? "
            f"see `wayang-mq status {task.task_id}`",
        ) from None


@dataclass
class _Waiting:
    task: Task | None  # its current attempt (None: only awaited by id, not submitted here)
    result: asyncio.Future[Result]
    accepted: asyncio.Future[Result]
    accepted_token: str | None = None  # the token of the attempt a PENDING result accepted


class Replies:
    """Tasks waiting for their answer, and the verdict on every result received."""

    def __init__(
        self,
        keyring: KeyRing | None,
        seen_limit: int,
        on_forget: Callable[[str], None] = lambda task_id: None,
    ) -> None:
        self._keyring = keyring  # verify results' signatures when given
        self._waiting: dict[str, _Waiting] = {}
        self._seen: LastSeen[Result] = LastSeen(seen_limit)  # terminal results handed out
        self._listeners: list[ResultListener] = []
        self._on_forget = on_forget

    # -- tasks --------------------------------------------------------------------------------

    def handle(self, task: Task) -> TaskHandle | None:
        """The handle of a task already answered or on its way (idempotent submit), if any."""
        finished = self._seen.get(task.task_id)
        if finished is not None:
            future = asyncio.get_running_loop().create_future()
            future.set_result(finished)
            return TaskHandle(task, future, future)
        waiting = self._waiting.get(task.task_id)
        if waiting is None or waiting.task is None:
            return None
        return TaskHandle(waiting.task, waiting.result, waiting.accepted)

    def expect(self, task: Task) -> TaskHandle:
        """Wait for ``task``'s answer from now on."""
        loop = asyncio.get_running_loop()
        waiting = self._waiting.get(task.task_id)
        if waiting is None:  # result_of() may have asked for it already
            waiting = _Waiting(task, loop.create_future(), loop.create_future())
            self._waiting[task.task_id] = waiting
        waiting.task = task
        return TaskHandle(task, waiting.result, waiting.accepted)

    def replace(self, task: Task) -> None:
        """A new attempt replaces the current one (its token fences the old one's result)."""
        self._waiting[task.task_id].task = task

    def forget(self, task_id: str) -> None:
        """Stop waiting for the task."""
        self._waiting.pop(task_id, None)
        self._on_forget(task_id)

    def waiting(self) -> list[Task]:
        """The current attempt of every task still waiting for its terminal result."""
        return [w.task for w in self._waiting.values() if w.task is not None]

    def is_waiting(self, task_id: str) -> bool:
        """True while the task waits for its terminal result here."""
        waiting = self._waiting.get(task_id)
        return waiting is not None and waiting.task is not None

    def is_accepted(self, task_id: str) -> bool:
        """True once a PENDING result accepted the task's current attempt (a re-dispatched
        attempt must be accepted again)."""
        waiting = self._waiting.get(task_id)
        return (
            waiting is not None
            and waiting.task is not None
            and waiting.accepted_token == waiting.task.token
        )

    def finished(self, task_id: str) -> Result | None:
        """The terminal result handed out for ``task_id``, if still remembered."""
        return self._seen.get(task_id)

    async def result_of(self, task_id: str, timeout_s: float | None = None) -> Result:
        """The terminal result of any task answered to this dispatcher, by id."""
        finished = self._seen.get(task_id)
        if finished is not None:
            return finished
        waiting = self._waiting.get(task_id)
        if waiting is None:
            loop = asyncio.get_running_loop()
            waiting = _Waiting(None, loop.create_future(), loop.create_future())
            self._waiting[task_id] = waiting
        try:
            return await asyncio.wait_for(asyncio.shield(waiting.result), timeout_s)
        except TimeoutError:
            raise ResultTimeout(f"no result for task {task_id} within {timeout_s}s") from None

    # -- results ------------------------------------------------------------------------------

    def observe(self, listener: ResultListener) -> Callable[[], None]:
        """Tell ``listener`` about every result from now on; returns a function that stops it."""
        self._listeners.append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return stop

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """The reply queue's consumer: read, decide, then settle (the bad ones rejected)."""
        try:
            if self._keyring is not None:
                result = open_verified(message.body, message.headers or {}, self._keyring, Result)
            else:
                result = open_unverified(message.body, message.headers or {}, Result)
        except WayangError as exc:
            logs.event(
                log,
                "result.invalid",
                logging.WARNING,
                id=message.message_id,
                user_id=message.user_id,  # the publishing account, as the broker checked it
                error=exc,
            )
            self._notify(Verdict.INVALID, None)
            await settle(message, reject(message.message_id, "not a result we can trust"))
            return
        self.deliver(result)
        # Through settle: an ack on a channel that died meanwhile is skipped, not an error
        # that would escape the consumer callback (the broker redelivers; it is a duplicate).
        await settle(message, discard(result.task_id))

    def deliver(self, result: Result) -> None:
        """Act on a result, then tell the observers what became of it."""
        self._notify(self._decide(result), result)

    def _notify(self, verdict: Verdict, result: Result | None) -> None:
        seen = ResultSeen(verdict, result)
        for listener in tuple(self._listeners):
            try:
                listener(seen)
            except Exception:  # an observer's bug must not leave the result unacked
                log.exception("event=observer.failed verdict=%s", verdict)

    def _decide(self, result: Result) -> Verdict:
        """First terminal result per task id wins; duplicates and fenced results are dropped."""
        waiting = self._waiting.get(result.task_id)
        if not result.terminal:
            if waiting is not None:
                waiting.accepted_token = result.token
                if not waiting.accepted.done():
                    waiting.accepted.set_result(result)
            return Verdict.NOT_TERMINAL
        if result.task_id in self._seen:
            logs.event(log, "result.duplicate", logging.DEBUG, task_id=result.task_id)
            return Verdict.DUPLICATE
        current = waiting.task if waiting is not None else None
        # An empty token marks a result for a body nobody could trust (bad input): terminal.
        if current is not None and result.token and result.token != current.token:
            logs.event(
                log,
                "result.fenced",
                logging.WARNING,
                task_id=result.task_id,
                executor=result.executor_id,
                attempt=result.attempt,
                reason="a newer attempt replaced the one this result answers",
            )
            return Verdict.FENCED
        self._seen.put(result.task_id, result)
        self.forget(result.task_id)
        if waiting is None:
            # A task this process did not submit, e.g. before it restarted under the same id.
            logs.event(log, "result.unclaimed", task_id=result.task_id, status=result.status)
            return Verdict.UNCLAIMED
        for future in (waiting.result, waiting.accepted):
            if not future.done():
                future.set_result(result)
        return Verdict.HANDED_OUT
