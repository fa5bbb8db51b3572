"""Running executors: the tasks in flight on one worker, and every way a run can end as a
:class:`Result`.

A run is an asyncio task that never raises for the executor's sake: success, an
:class:`ExecutorError`, any other exception, its timeout, a cancel request and an output msgpack
cannot carry all become a Result. Only the worker's own shutdown cancels it without one (the
delivery then goes back to its queue). An executor that returns :class:`Pending` has accepted
the task and will be answered later by someone else: its Result is PENDING.

Secrets (:mod:`wayang_mq.security.secrets`) are resolved here, inside the run and its timeout,
and every Result leaves through :func:`_result`, which redacts known secret values from its
output, error and logs. This is the runtime, not a middleware layer, on purpose: a layer cannot
change the task the executor receives nor fill its context, progress and heartbeats do not
pass through the chain, and the chain logs and skips a layer that raises, which would let an
unredacted result out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack

from wayang_mq.core import logs
from wayang_mq.core.errors import ErrorCode, ExecutorError
from wayang_mq.core.model import ErrorInfo, JsonLike, Result, Status, Task, now_ms
from wayang_mq.core.redact import REDACTOR, Redactor
from wayang_mq.observability.usage import Usage
from wayang_mq.runtime.context import ProgressSink, TaskContext, bind, unbind
from wayang_mq.runtime.executor import Executor, Pending
from wayang_mq.security.secrets import (
    BadReference,
    Resolver,
    SecretProvider,
    SecretUnavailable,
    references,
    shown,
    substitute,
)

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
        secrets: SecretProvider | None = None,
        redactor: Redactor = REDACTOR,
    ) -> None:
        self._executors = executors
        self._resolver = Resolver(secrets, redactor) if secrets is not None else None
        self._redactor = redactor
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

    async def start(self, task: Task, bytes_in: int = 0) -> Running:
        """Start the task's run (it goes on even if the caller stops waiting for it);
        ``bytes_in``: the size of the task's message body, for its usage."""
        context = TaskContext(
            task,
            self._executor_id,
            self._progress,
            redactor=self._redactor,
            usage=Usage(bytes_in=bytes_in),
        )
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
            task, self._executor_id, status, output, error, context, started, self._redactor
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
                return await self._execute(executor, task, context)
            try:
                async with asyncio.timeout(task.timeout_ms / 1000):
                    return await self._execute(executor, task, context)
            except TimeoutError:
                raise ExecutorError(
                    f"execution passed its timeout of {task.timeout_ms} ms",
                    code=ErrorCode.TIMEOUT,
                    retryable=True,
                ) from None
        finally:
            unbind(token)

    async def _execute(self, executor: Executor, task: Task, context: TaskContext) -> Any:
        """Resolve the task's secret references (the executor gets them as ``Secret`` values
        in its input and in ``ctx.secrets``), then run it."""
        try:
            names = references(task.input)
            if names:
                if self._resolver is None:
                    raise SecretUnavailable(
                        f"the task references secrets ({', '.join(sorted(names))}) but this "
                        "worker has no secret providers",
                        hint="start it with --secrets (see `wayang-mq worker --help`)",
                    )
                secrets = await self._resolver.resolve(
                    names, executor.allowed_secrets, capability=task.capability
                )
                task = task.model_copy(update={"input": substitute(task.input, secrets)})
                context.task, context.secrets = task, MappingProxyType(secrets)
        except (SecretUnavailable, BadReference) as exc:
            raise ExecutorError(
                exc.one_line(),
                code=exc.code or ErrorCode.SECRET_UNAVAILABLE,
                retryable=exc.retryable,
            ) from None
        # metered: the CPU time of the executor's own steps is the task's cpu_ms
        return await context.usage.metered(executor.execute(task))


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
    redactor: Redactor,
) -> tuple[Result, int]:
    """Build the result (and its output's size), turning an output msgpack cannot carry into
    ``invalid_result``, with every known secret value cut out of its output, error and logs:
    the one choke point every executed result passes before anything publishes or keeps it."""
    metrics = {
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "queue_ms": float(max(0, now_ms() - task.issued_at_ms)),
    }
    try:
        packed = msgpack.packb(output, use_bin_type=True)
        if redactor.found_in(packed):  # one C-speed search; the walk only when it hits
            output = redactor.value(output)
            packed = msgpack.packb(output, use_bin_type=True)
        output_bytes = len(packed)
    except (TypeError, ValueError, OverflowError) as exc:
        output_bytes = 0
        status, output = Status.FAILED, None
        error = ErrorInfo(code=ErrorCode.INVALID_RESULT, message=f"output cannot be sent: {exc}")
    metrics.update(context.usage.metrics(output_bytes))  # cpu_ms, bytes_in/out, units.*
    if error is not None:
        error = error.model_copy(
            update={
                "message": redactor.text(error.message),
                "details": redactor.value(shown(error.details)),
            }
        )
    result = Result.answering(
        task,
        executor_id,
        status,
        output=output,
        error=error,
        metrics=metrics,
        logs=tuple(redactor.text(line) for line in context.logs),
    )
    return result, output_bytes
