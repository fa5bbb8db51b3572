"""What executor code reaches while it runs: progress, heartbeat details, cancellation, logs,
the task's secrets, usage for billing.

Like Temporal's ``activity.info()``, the context travels in a contextvar, so an executor stays
plain async code and never sees AMQP. Progress and heartbeat details leave through the
worker's redactor: a secret value put in them is published as ``[secret:<name>]``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from wayang_mq.core.errors import ErrorCode, ExecutorError
from wayang_mq.core.model import JsonLike, Progress, Task
from wayang_mq.core.redact import REDACTOR, Redactor
from wayang_mq.observability import tracing
from wayang_mq.observability.usage import Usage
from wayang_mq.security.secrets import Secret, shown

ProgressSink = Callable[[Progress], Awaitable[None]]
T = TypeVar("T")

_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("wayang_task_context")


@dataclass
class TaskContext:
    """The running task's handle on the fabric."""

    task: Task
    executor_id: str
    _emit: ProgressSink = field(repr=False)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    logs: list[str] = field(default_factory=list)
    last_progress: Progress | None = None
    heartbeat_details: dict[str, JsonLike] = field(default_factory=dict)
    #: the secrets the task's input references, by name (see wayang_mq.security.secrets)
    secrets: Mapping[str, Secret] = field(default_factory=lambda: MappingProxyType({}))
    redactor: Redactor = field(default=REDACTOR, repr=False)
    #: what this run used so far (CPU, bytes in, reported units): the result's usage metrics
    usage: Usage = field(default_factory=Usage)
    #: the task's trace, as the worker continues it (taken when the run starts)
    trace: tracing.TraceContext | None = field(default_factory=tracing.current, repr=False)

    def secret(self, name: str) -> Secret:
        """The secret the task references as ``{"$secret": name}``; a name the task does not
        reference fails the task ``secret_unavailable`` (references are the task's grant)."""
        try:
            return self.secrets[name]
        except KeyError:
            raise ExecutorError(
                f"secret {name!r} is not referenced by the task's input",
                code=ErrorCode.SECRET_UNAVAILABLE,
                retryable=False,
            ) from None

    async def progress(
        self, fraction: float | None = None, message: str = "", **details: Any
    ) -> None:
        """Report progress: published as an event and remembered for ``status``."""
        self.last_progress = Progress(
            task_id=self.task.task_id,
            executor_id=self.executor_id,
            attempt=self.task.attempt,
            fraction=fraction,
            message=self.redactor.text(str(message)),
            details=self.redactor.value(shown(details)),
        )
        await self._emit(self.last_progress)

    def heartbeat(self, **details: Any) -> None:
        """Record liveness details; the worker's next heartbeat carries the latest under this
        task's id (they coalesce: only the last call before a heartbeat is sent)."""
        self.heartbeat_details = self.redactor.value(shown(details))

    def log(self, line: str) -> None:
        """A line for the result's ``logs``."""
        self.logs.append(line)

    def report_usage(self, **units: float) -> None:
        """Add billable units (``tokens=120, api_calls=1``): summed across calls, sent in the
        result as ``units.<name>``. Names are short ``[a-z][a-z0-9_]*`` identifiers, values
        finite and >= 0, at most 16 names a task; ``cpu_ms=`` adds to the task's CPU time
        (CPU spent where the runtime cannot meter it). A bad report raises ``ValueError``."""
        self.usage.report(**units)

    async def metered(self, coro: Coroutine[Any, Any, T]) -> T:
        """Wrap a coroutine you run as its own asyncio task (``create_task``, ``gather``, a
        ``TaskGroup``) so its CPU time counts for this task (the runtime meters only the
        ``execute`` coroutine itself): ``await asyncio.gather(ctx.metered(a()), ...)``."""
        return await self.usage.metered(coro)

    async def to_thread(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``asyncio.to_thread``, with the CPU time the call spends in its thread counted
        for this task (a plain ``asyncio.to_thread`` is not)."""
        return await self.usage.to_thread(func, *args, **kwargs)

    @property
    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` of this run: pass it (with :attr:`tracestate`) to
        ``Dispatcher.submit(..., traceparent=..., tracestate=...)`` for the tasks this
        executor dispatches, so they join the task's trace (a dispatcher in the same process
        finds it by itself)."""
        return self.trace.traceparent if self.trace is not None else None

    @property
    def tracestate(self) -> str | None:
        """The W3C ``tracestate`` that goes with :attr:`traceparent`, if any."""
        return self.trace.state or None if self.trace is not None else None

    @property
    def is_cancelled(self) -> bool:
        """True once a cancel request reached this task."""
        return self.cancelled.is_set()


def current() -> TaskContext:
    """The context of the task the calling coroutine is executing."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError(
            "wayang_mq.runtime.context.current() called outside a running task"
        ) from None


def bind(ctx: TaskContext) -> contextvars.Token[TaskContext]:
    """Make ``ctx`` current for the calling task (the runtime does this around ``execute``)."""
    return _current.set(ctx)


def unbind(token: contextvars.Token[TaskContext]) -> None:
    """Undo :func:`bind` when the task ends."""
    _current.reset(token)


def progress(fraction: float | None = None, message: str = "", **details: Any) -> Awaitable[None]:
    """Shortcut for ``current().progress(...)``."""
    return current().progress(fraction, message, **details)


def report_usage(**units: float) -> None:
    """Shortcut for ``current().report_usage(...)``."""
    current().report_usage(**units)
