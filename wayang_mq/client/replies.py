"""The dispatcher's book of replies: which tasks wait for an answer, and what became of every
result that came back on the reply queue.

Each task submitted here holds one of the dispatcher's outstanding slots
(:class:`~wayang_mq.client.outstanding.Slots`) while it waits; every way its entry leaves the
book (its terminal result, an expiry decided here, a publish that failed) goes through
:meth:`Replies.forget`, which gives the slot back.

Every result is verified first: its signature, and that the signing key may say it (an
executor answers as itself for its capabilities, see :mod:`wayang_mq.core.authority`); an
unsigned or forged one is rejected, never handed out. The first terminal result per task id
wins and is handed to the caller waiting; later ones are duplicates; a result whose token,
capability or node is not the current attempt's is fenced (an empty token included), and so
is a ``token_expired`` for a task known to have started (a replayed copy cannot end a task
that is running). A PENDING result is not an answer: it marks the task accepted (someone will
answer it later), which stops the dispatcher from expiring it at its queue deadline.

A control plane that re-dispatches a task whose executor was lost first sends its attempt
record (type ``wayang.attempt.v1``, signed by its key) to the task's reply address: verified,
it becomes the task's current attempt (the new attempt and token), so the lost attempt's late
result is fenced and the new one handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum

from aio_pika.abc import AbstractIncomingMessage

from wayang_mq.amqp import acks
from wayang_mq.amqp.outcome import discard, reject, settle
from wayang_mq.client.outstanding import Slots
from wayang_mq.core import logs
from wayang_mq.core.authority import check_result
from wayang_mq.core.bounded import LastSeen
from wayang_mq.core.errors import (
    ErrorCode,
    KeyNotAllowed,
    ResultTimeout,
    SignatureError,
    WayangError,
)
from wayang_mq.core.model import AttemptRecord, Progress, Result, Task
from wayang_mq.core.scopes import Role
from wayang_mq.core.signing import KEY_ID_HEADER, KeyRing
from wayang_mq.core.wire import open_signed
from wayang_mq.observability import tracing

log = logging.getLogger("wayang_mq.client.dispatcher")


class Verdict(StrEnum):
    """What the dispatcher did with a result it received (or decided itself)."""

    HANDED_OUT = "handed_out"  # the task's first terminal result: given to the caller waiting
    UNCLAIMED = "unclaimed"  # the first terminal result, but no caller waits here: kept
    DUPLICATE = "duplicate"  # the task already has its terminal result: dropped
    FENCED = "fenced"  # not the current attempt (token, capability, node), or a false expiry
    NOT_TERMINAL = "not_terminal"  # PENDING: the task is accepted; its answer comes later
    INVALID = "invalid"  # not a result, unsigned, forged, or signed by a key not allowed


@dataclass(frozen=True, slots=True)
class ResultSeen:
    """One result the dispatcher received, and its verdict; see :meth:`Dispatcher.observe`."""

    verdict: Verdict
    result: Result | None  # None when INVALID: the body could not be read as a result
    #: the W3C traceparent the result came with (validated; None if none or invalid): a
    #: child of the task's trace, so its trace id is the task's
    traceparent: str | None = None


#: called with every :class:`ResultSeen`, inline: quick, and must not raise
ResultListener = Callable[[ResultSeen], None]
#: where a handle's progress comes from (:class:`wayang_mq.client.progress.ProgressFeed`)
ProgressSource = Callable[[Task, "asyncio.Future[Result]"], AsyncIterator[Progress]]


class TaskHandle:
    """A submitted task; await ``result()`` for its terminal Result."""

    def __init__(
        self,
        task: Task,
        future: asyncio.Future[Result],
        accepted: asyncio.Future[Result],
        progress: ProgressSource | None = None,
    ) -> None:
        self.task = task
        self._future = future
        self._accepted = accepted
        self._progress = progress
        #: the W3C traceparent the task was published with (its trace id names the trace)
        self.traceparent: str | None = None

    @property
    def task_id(self) -> str:
        """The submitted task's id."""
        return self.task.task_id

    def done(self) -> bool:
        """True once a terminal result has arrived."""
        return self._future.done()

    def when_answered(self, callback: Callable[[Result], None]) -> None:
        """Call ``callback`` with the terminal result when it arrives (inline: keep it quick)."""

        def answered(future: asyncio.Future[Result]) -> None:
            if not future.cancelled() and future.exception() is None:
                callback(future.result())

        self._future.add_done_callback(answered)

    async def result(self, timeout_s: float | None = None) -> Result:
        """The terminal result; ``ResultTimeout`` if none arrives within ``timeout_s``."""
        return await _wait(self._future, timeout_s, self.task)

    def progress(self) -> AsyncIterator[Progress]:
        """The task's progress events as executors report them, until its terminal result
        arrives (then the iteration ends; await ``result()`` for it). Advisory: events sent
        before watching began, or while the broker was away, are not seen. Iterate it beside
        ``result()``, e.g. in a task of its own."""
        if self._progress is None:
            return _until(self._future)
        return self._progress(self.task, self._future)

    async def accepted(self, timeout_s: float | None = None) -> Result:
        """The first answer: a PENDING result (the task is accepted, its answer comes later),
        or the terminal result if it came first."""
        return await _wait(self._accepted, timeout_s, self.task)


async def _until(future: asyncio.Future[Result]) -> AsyncIterator[Progress]:
    """No progress to watch: an iteration that ends when the result arrives."""
    await asyncio.wait({future})
    return
    yield  # an async generator


async def _wait(future: asyncio.Future[Result], timeout_s: float | None, task: Task) -> Result:
    if future.done():
        return future.result()
    try:
        # asyncio.timeout: one timer, where wait_for adds a waiter future and callbacks; the
        # shield keeps the shared future alive when this waiter is cancelled or times out
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(future)
    except TimeoutError:
        raise ResultTimeout(
            f"no result for task {task.task_id} within {timeout_s}s",
            hint=f"is a worker running for {task.capability!r}? "
            f"see `wayang-mq status {task.task_id}`",
        ) from None


@dataclass(slots=True)  # one per outstanding task: no __dict__ each
class _Waiting:
    task: Task | None  # its current attempt (None: only awaited by id, not submitted here)
    result: asyncio.Future[Result]
    accepted: asyncio.Future[Result]
    accepted_token: str | None = None  # the token of the attempt a PENDING result accepted
    holds_slot: bool = False  # submitted here: holds an outstanding slot until it ends
    #: the trace its re-dispatches, expiry and compensation continue (kept while it waits,
    #: however many tasks end meanwhile)
    trace: tracing.TraceContext | None = None


class Replies:
    """Tasks waiting for their answer, and the verdict on every result received."""

    def __init__(
        self,
        keyring: KeyRing,
        seen_limit: int,
        on_forget: Callable[[str], None] = lambda task_id: None,
        progress: ProgressSource | None = None,
        *,
        slots: Slots,
    ) -> None:
        self._keyring = keyring  # every result's signature, and its key's scope
        self._waiting: dict[str, _Waiting] = {}
        #: outstanding slots: taken by the caller of expect(), given back by forget()
        self.slots = slots
        self._seen: LastSeen[Result] = LastSeen(seen_limit)  # terminal results handed out
        self._listeners: list[ResultListener] = []
        self._on_forget = on_forget
        self._progress = progress  # what handles' progress() iterates

    # -- tasks --------------------------------------------------------------------------------

    def handle(self, task: Task) -> TaskHandle | None:
        """The handle of a task already answered or on its way (idempotent submit), if any."""
        finished = self._seen.get(task.task_id)
        if finished is not None:
            future = asyncio.get_running_loop().create_future()
            future.set_result(finished)
            return TaskHandle(task, future, future, self._progress)
        waiting = self._waiting.get(task.task_id)
        if waiting is None or waiting.task is None:
            return None
        return TaskHandle(waiting.task, waiting.result, waiting.accepted, self._progress)

    def expect(self, task: Task) -> TaskHandle:
        """Wait for ``task``'s answer from now on; it holds the slot its caller took from
        ``slots`` until :meth:`forget` (``handle(task)`` was None: it is not waiting yet)."""
        loop = asyncio.get_running_loop()
        waiting = self._waiting.get(task.task_id)
        if waiting is None:  # result_of() may have asked for it already
            waiting = _Waiting(task, loop.create_future(), loop.create_future())
            self._waiting[task.task_id] = waiting
        assert not waiting.holds_slot, f"task {task.task_id} is already outstanding"
        waiting.task = task
        waiting.holds_slot = True
        return TaskHandle(task, waiting.result, waiting.accepted, self._progress)

    def traced(self, task_id: str, trace: tracing.TraceContext) -> None:
        """The trace the task's current attempt was published in."""
        waiting = self._waiting.get(task_id)
        if waiting is not None:
            waiting.trace = trace

    def trace(self, task_id: str) -> tracing.TraceContext | None:
        """The trace of a task waiting here, if it has one."""
        waiting = self._waiting.get(task_id)
        return waiting.trace if waiting is not None else None

    @property
    def outstanding(self) -> int:
        """Tasks submitted here still waiting for their terminal result."""
        return self.slots.taken

    def replace(self, task: Task) -> None:
        """A new attempt replaces the current one (its token fences the old one's result)."""
        self._waiting[task.task_id].task = task

    def forget(self, task_id: str) -> None:
        """Stop waiting for the task, and give back its outstanding slot. The one way an
        entry leaves the book, so that no slot is lost."""
        waiting = self._waiting.pop(task_id, None)
        if waiting is not None and waiting.holds_slot:
            self.slots.give_back()
        self._on_forget(task_id)

    def waiting(self) -> list[Task]:
        """The current attempt of every task still waiting for its terminal result."""
        return [w.task for w in self._waiting.values() if w.task is not None]

    def is_waiting(self, task_id: str) -> bool:
        """True while the task waits for its terminal result here."""
        waiting = self._waiting.get(task_id)
        return waiting is not None and waiting.task is not None

    def current(self, task_id: str) -> Task | None:
        """The current attempt of a task waiting here, if it is one."""
        waiting = self._waiting.get(task_id)
        return waiting.task if waiting is not None else None

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
        acks.track(message)  # the channel's one acking consumer: its acks may batch
        try:
            if message.type == AttemptRecord.wire_type:
                self._redispatched(message)
                await settle(message, discard(message.message_id))
                return
            result, signer = open_signed(message.body, message.headers or {}, self._keyring, Result)
            check_result(signer, result, self.current(result.task_id))
        except WayangError as exc:
            event = "security.refused" if isinstance(exc, SignatureError) else "result.invalid"
            key_id = (message.headers or {}).get(KEY_ID_HEADER)
            logs.event(
                log,
                event,
                logging.WARNING,
                id=message.message_id,
                code=exc.code,
                key_id=str(key_id)[:64] if key_id is not None else None,
                user_id=message.user_id,
                error=exc,
            )
            self._notify(Verdict.INVALID, None)
            await settle(message, reject(message.message_id, "not a result we can trust"))
            return
        trace = tracing.from_headers(message.headers)
        with logs.bound(
            task_id=result.task_id,
            node_id=result.node_id,
            capability=result.capability,
            executor_id=result.executor_id,
            attempt=result.attempt,
            trace_id=trace.trace_id if trace is not None else None,
        ):
            self.deliver(result, trace)
        # Through settle: an ack on a channel that died meanwhile is skipped, not an error
        # that would escape the consumer callback (the broker redelivers; it is a duplicate).
        await settle(message, discard(result.task_id))

    def _redispatched(self, message: AbstractIncomingMessage) -> None:
        """A control plane's notice: the task's next attempt, with its new token, is current."""
        record, signer = open_signed(
            message.body, message.headers or {}, self._keyring, AttemptRecord
        )
        scope = signer.scope
        if not scope.is_(Role.CONTROL_PLANE) or not scope.speaks_for(record.executor_id):
            raise KeyNotAllowed(
                f"a re-dispatch of task {record.task_id} may not be signed by {scope.describe()}"
            )
        current = self.current(record.task_id)
        if record.token is None or current is None or record.attempt <= current.attempt:
            return  # not ours, finished, or a re-send of a notice already taken
        update = {
            "attempt": record.attempt,
            "token": record.token,
            "deadline_ms": record.deadline_ms,
        }
        self.replace(current.model_copy(update=update))
        self._on_forget(record.task_id)  # its executor is unknown until it heartbeats it
        logs.event(
            log,
            "task.redispatched",
            logging.WARNING,
            task_id=record.task_id,
            attempt=record.attempt,
            by=record.executor_id,
        )

    def deliver(self, result: Result, trace: tracing.TraceContext | None = None) -> None:
        """Act on a result (that came in ``trace``), then tell the observers what became of it."""
        self._notify(self._decide(result), result, trace)

    def _notify(
        self, verdict: Verdict, result: Result | None, trace: tracing.TraceContext | None = None
    ) -> None:
        seen = ResultSeen(verdict, result, trace.traceparent if trace is not None else None)
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
        if current is not None:
            why = _not_current(result, current, waiting.accepted_token if waiting else None)
            if why is not None:
                logs.event(
                    log,
                    "result.fenced",
                    logging.WARNING,
                    task_id=result.task_id,
                    executor=result.executor_id,
                    attempt=result.attempt,
                    reason=why,
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


def _not_current(result: Result, current: Task, accepted_token: str | None) -> str | None:
    """Why ``result`` does not answer the task's current attempt, or None when it does."""
    if result.token != current.token:
        return "its token is not the current attempt's (a newer attempt replaced it)"
    if result.capability != current.capability or result.node_id != current.node_id:
        return "its capability or node is not the task's"
    if result.attempt > current.retry.max_attempts and result.attempt > current.attempt:
        return "its attempt is beyond the task's retry limit"
    expired = result.error is not None and result.error.code is ErrorCode.TOKEN_EXPIRED
    if expired and accepted_token == current.token:
        return "the task started (it was accepted) before its deadline: an expired copy of it"
    return None
