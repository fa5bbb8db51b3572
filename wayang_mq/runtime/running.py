"""Running executors: the tasks in flight on one worker, and every way a run can end as a
:class:`Result`.

A run is an asyncio task that never raises for the executor's sake: success, an
:class:`ExecutorError`, any other exception, its timeout, a cancel request and an output msgpack
cannot carry all become a Result. Only the worker's own shutdown cancels it without one (the
delivery then goes back to its queue). An executor that returns :class:`Pending` has accepted
the task and will be answered later by someone else: its Result is PENDING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from wayang_mq.core import logs
from wayang_mq.core.errors import ErrorCode, ExecutorError
from wayang_mq.core.model import ErrorInfo, JsonLike, Result, Status, Task, now_ms
from wayang_mq.runtime.context import ProgressSink, TaskContext, bind, unbind
from wayang_mq.runtime.executor import Executor, Pending

log = logging.getLogger("wayang_mq.runtime.running")


@dataclass
class Running:
    """A task this worker is executing."""

    task: Task
    context: TaskContext
    cancel_reason: str | None = None
    accepted: Result | None = None  # a long-running task's PENDING answer, once published
    #: set once the PENDING answer is settled: the terminal answer must not overtake it
    announced: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    #: the run: its result and the packed output's size
    job: asyncio.Task[tuple[Result, int]] = field(init=False, repr=False)


class Runner:
    """Starts runs, knows what is in flight, cancels on request."""

    def __init__(
        self,
        executors: Mapping[str, Executor],
        executor_id: str,
        progress: ProgressSink,
        on_start: Callable[[Task], Awaitable[None]],
    ) -> None:
        self._executors = executors
        self._executor_id = executor_id
        self._progress = progress
        self._on_start = on_start
        self._running: dict[str, Running] = {}
        self._accepting: dict[str, Running] = {}  # long tasks whose PENDING is not settled yet

    def get(self, task_id: str) -> Running | None:
        """The run of ``task_id`` in flight here, if any."""
        return self._running.get(task_id)

    def accepting(self, running: Running) -> None:
        """A long-running task was accepted: its answer waits until :meth:`announced`."""
        self._accepting[running.task.task_id] = running

    def announced(self, task_id: str | None) -> None:
        """The delivery of ``task_id`` is settled: an accepted task's answer may follow."""
        running = self._accepting.pop(task_id or "", None)
        if running is not None:
            running.announced.set()

    def in_flight(self) -> tuple[str, ...]:
        """The ids of the tasks running here."""
        return tuple(self._running)

    def details(self) -> dict[str, dict[str, JsonLike]]:
        """Each running task's latest heartbeat details (those that set any)."""
        return {
            task_id: dict(running.context.heartbeat_details)
            for task_id, running in self._running.items()
            if running.context.heartbeat_details
        }

    def long_running(self, task: Task) -> bool:
        """True if the task's executor acks at start and answers later (see Executor)."""
        return self._executors[task.capability].long_running

    def cancel(self, task_id: str, reason: str = "") -> bool:
        """Cancel a running task; it ends FAILED ``cancelled``."""
        running = self._running.get(task_id)
        if running is None:
            return False
        running.cancel_reason = reason or "cancel requested"
        running.context.cancelled.set()
        running.job.cancel()
        return True

    async def join(self, task: Task) -> Result | None:
        """The same attempt delivered again while it runs here (a publisher that retried after
        a lost confirm, two clients with one task id): wait for that run and answer with its
        result, instead of running the task twice at once. A long-running task is answered
        with its acceptance at once."""
        running = self._running.get(task.task_id)
        if running is None or running.task.attempt != task.attempt:
            return None
        logs.event(log, "task.joined", task_id=task.task_id, attempt=task.attempt)
        if running.accepted is not None:
            return running.accepted
        result, _ = await asyncio.shield(running.job)  # a joiner's cancel is not the run's
        return result

    async def start(self, task: Task) -> Running:
        """Start the task's run (it goes on even if the caller stops waiting for it)."""
        context = TaskContext(task, self._executor_id, self._progress)
        running = Running(task, context)
        running.job = asyncio.create_task(self._run(running))
        self._running[task.task_id] = running
        await self._on_start(task)
        return running

    async def _run(self, running: Running) -> tuple[Result, int]:
        task, context = running.task, running.context
        started = time.monotonic()
        logs.event(  # DEBUG: task.finished is the one INFO line per task (a measured 5% of CPU)
            log,
            "task.started",
            logging.DEBUG,
            task_id=task.task_id,
            capability=task.capability,
            attempt=task.attempt,
            executor=self._executor_id,
        )
        status, error = Status.SUCCESS, None
        try:
            output = await self._call(task, context)
            if isinstance(output, Pending):
                status, output = Status.PENDING, output.details
        except asyncio.CancelledError:
            if running.cancel_reason is None:
                raise  # the worker stops: no result, the delivery goes back
            output = None
            error = ErrorInfo(code=ErrorCode.CANCELLED, message=running.cancel_reason)
            status = Status.FAILED
        except Exception as exc:  # executor code may raise anything; it becomes a result
            output, status, error = None, Status.FAILED, _error_info(exc)
        finally:
            if self._running.get(task.task_id) is running:
                del self._running[task.task_id]
        result, output_bytes = _result(
            task, self._executor_id, status, output, error, context, started
        )
        logs.event(
            log,
            "task.finished",
            task_id=task.task_id,
            status=result.status,
            code=result.error.code if result.error else None,
            duration_ms=result.metrics["duration_ms"],
        )
        return result, output_bytes

    async def _call(self, task: Task, context: TaskContext) -> Any:
        token = bind(context)
        try:
            executor = self._executors[task.capability]
            if task.timeout_ms is None:
                return await executor.execute(task)
            try:
                async with asyncio.timeout(task.timeout_ms / 1000):
                    return await executor.execute(task)
            except TimeoutError:
                raise ExecutorError(
                    f"execution passed its timeout of {task.timeout_ms} ms",
                    code=ErrorCode.TIMEOUT,
                    retryable=True,
                ) from None
        finally:
            unbind(token)


def _error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, ExecutorError):
        return ErrorInfo(
            code=exc.code or ErrorCode.EXECUTOR_ERROR,
            message=exc.message,
            retryable=exc.retryable,
            retry_after_ms=None if exc.retry_after_s is None else int(exc.retry_after_s * 1000),
            details=exc.details,
        )
    # An unexpected exception is a bug or a transient fault: retryable, like Temporal's default.
    return ErrorInfo(
        code=ErrorCode.EXECUTOR_ERROR, message=f"{type(exc).__name__}: {exc}", retryable=True
    )


def _result(
    task: Task,
    executor_id: str,
    status: Status,
    output: Any,
    error: ErrorInfo | None,
    context: TaskContext,
    started: float,
) -> tuple[Result, int]:
    """Build the result (and its output's size), turning an output msgpack cannot carry into
    ``invalid_result``."""
    metrics = {
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "queue_ms": float(max(0, now_ms() - task.issued_at_ms)),
    }
    try:
        output_bytes = len(msgpack.packb(output, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        output_bytes = 0
        status, output = Status.FAILED, None
        error = ErrorInfo(code=ErrorCode.INVALID_RESULT, message=f"output cannot be sent: {exc}")
    result = Result.answering(
        task,
        executor_id,
        status,
        output=output,
        error=error,
        metrics=metrics,
        logs=tuple(context.logs),
    )
    return result, output_bytes
