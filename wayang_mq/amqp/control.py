"""Cancel and status over ``wayang.control`` (spec §5's ``cancel(taskId)``, ``status(taskId)``).

Requests are broadcast: a caller does not know which executor holds a task, so every worker
gets every request on its own exclusive queue (``wayang.control.<executor>``) and answers
only what it knows. Requests are signed like tasks and verified against the worker's key
ring, so nobody without a trusted key can cancel work. Control messages are not persistent
and are consumed without acks: a request lost in a crash is simply asked again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from wayang_mq.amqp.publisher import ConfirmedPublisher, Unroutable, to_amqp
from wayang_mq.core import logs, names
from wayang_mq.core.authority import check_cancel, check_executor_event, check_status_request
from wayang_mq.core.bounded import LastSeen
from wayang_mq.core.errors import ErrorCode, SignatureError, WayangError
from wayang_mq.core.model import (
    CancelRequest,
    ErrorInfo,
    Progress,
    Result,
    Status,
    StatusReport,
    StatusRequest,
    Task,
    TaskState,
    TaskStatus,
    WireModel,
    new_id,
    now_ms,
)
from wayang_mq.core.scopes import Role
from wayang_mq.core.signing import KeyRing, Signer, Verified
from wayang_mq.core.wire import (
    check_properties,
    open_signed,
    signed_message,
)

log = logging.getLogger("wayang_mq.amqp.control")
M = TypeVar("M", bound=WireModel)
Listener = Callable[[AbstractIncomingMessage], Awaitable[None]]


class ControlTarget(Protocol):
    """What the control server asks of a worker."""

    executor_id: str

    def status(self, task_id: str) -> TaskStatus: ...

    def cancel(self, task_id: str, reason: str = "") -> bool: ...

    def running_task(self, task_id: str) -> Task | None: ...

    async def withdraw(self, task_id: str, reason: str, requester: str | None) -> bool: ...


def _message(model: WireModel, signer: Signer, message_id: str) -> aio_pika.Message:
    return to_amqp(signed_message(model, signer, message_id=message_id), persistent=False)


class ControlServer:
    """The executor side: cancels running tasks, remembers cancels of tasks not yet received,
    and answers status requests."""

    def __init__(
        self,
        target: ControlTarget,
        keyring: KeyRing,
        signer: Signer,
        publisher: ConfirmedPublisher,
        *,
        remember: int = 100_000,
    ) -> None:
        self._target = target
        self._keyring = keyring
        self._signer = signer
        self._publisher = publisher
        # task id → reason, until when, and who may have sent it (issuer; None: an admin)
        self._cancelled: LastSeen[tuple[str, int, str | None]] = LastSeen(remember)
        # more messages this queue takes: binding key, and the handler per AMQP type
        self._listeners: dict[str, tuple[str, Listener]] = {}

    def listen(self, binding_key: str, wire_type: str, handler: Listener) -> None:
        """Also take ``wire_type`` messages sent with ``binding_key`` (before :meth:`start`):
        a worker's control queue is the one queue its account may read on wayang.control."""
        self._listeners[wire_type] = (binding_key, handler)

    async def start(self, channel: AbstractChannel) -> None:
        """Declare this worker's control queue, bind it to every request, consume it."""
        queue = await channel.declare_queue(
            f"wayang.control.{self._target.executor_id}", exclusive=True, auto_delete=True
        )
        await queue.bind(names.CONTROL_EXCHANGE, "cancel.#")
        await queue.bind(names.CONTROL_EXCHANGE, "status.#")
        for binding_key, _ in self._listeners.values():
            await queue.bind(names.CONTROL_EXCHANGE, binding_key)
        await queue.consume(
            self._on_message, no_ack=True, consumer_tag=f"{self._target.executor_id}/control"
        )

    def cancelled(self, task: Task) -> str | None:
        """The reason, when a cancel for this task arrived before the task itself, from the
        task's own issuer (or an admin)."""
        entry = self._cancelled.get(task.task_id)
        if entry is None or entry[1] < now_ms():
            return None
        reason, _, requester = entry
        if requester is not None and requester != task.issuer:
            logs.event(
                log,
                "security.refused",
                logging.WARNING,
                task_id=task.task_id,
                code=ErrorCode.KEY_NOT_ALLOWED,
                why=f"a cancel by {requester!r}, but the task was issued by {task.issuer!r}",
            )
            return None
        return reason

    def answer_if_cancelled(self, task: Task, executor_id: str) -> Result | None:
        """A task whose cancel arrived before it did is answered FAILED ``cancelled``, not run."""
        reason = self.cancelled(task)
        if reason is None:
            return None
        logs.event(log, "task.discarded", task_id=task.task_id, reason=reason)
        error = ErrorInfo(code=ErrorCode.CANCELLED, message=reason)
        return Result.failure(task, executor_id, error)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            # first: an undecodable ``type`` reads as None, which would be ignored unlogged
            check_properties(message.headers or {}, message.body)
            if message.type == CancelRequest.wire_type:
                await self._on_cancel(*self._open(message, CancelRequest))
            elif message.type == StatusRequest.wire_type:
                request, signer = self._open(message, StatusRequest)
                check_status_request(signer)
                await self._on_status(request)
            elif message.type in self._listeners:
                await self._listeners[message.type][1](message)
        except WayangError as exc:
            event = "security.refused" if isinstance(exc, SignatureError) else "control.refused"
            logs.event(log, event, logging.WARNING, type=message.type, code=exc.code, error=exc)

    def _open(self, message: AbstractIncomingMessage, model: type[M]) -> tuple[M, Verified]:
        return open_signed(message.body, message.headers or {}, self._keyring, model)

    async def _on_cancel(self, request: CancelRequest, signer: Verified) -> None:
        check_cancel(signer, request, self._target.running_task(request.task_id))
        reason = request.reason or f"cancelled by {request.requester or 'a caller'}"
        running = self._target.cancel(request.task_id, reason)
        withdrawn = False
        if not running:
            requester = None if signer.scope.role is Role.ADMIN else signer.scope.identity
            until = now_ms() + request.forget_after_ms
            self._cancelled.put(request.task_id, (reason, until, requester))
            # accepted earlier (PENDING) and waiting on someone: its executor withdraws it
            withdrawn = await self._target.withdraw(request.task_id, reason, requester)
        logs.event(
            log,
            "task.cancel_requested",
            task_id=request.task_id,
            running=running,
            withdrawn=withdrawn,
            reason=reason,
        )

    async def _on_status(self, request: StatusRequest) -> None:
        status = self._target.status(request.task_id)
        if status.state is TaskState.UNKNOWN:
            return  # only executors that know the task answer
        report = StatusReport(
            request_id=request.request_id,
            task_id=request.task_id,
            executor_id=self._target.executor_id,
            state=status.state,
            attempt=status.attempt,
            progress=status.progress,
            outcome=status.outcome,
        )
        await self._publisher.publish_once(
            names.CONTROL_EXCHANGE,
            request.reply_to,
            _message(report, self._signer, request.request_id),
        )


@dataclass(frozen=True)
class StatusSummary:
    """What the fabric knows of a task, for people and scripts (``wayang-mq status``)."""

    task_id: str
    state: str  # "finished", "running", or "not running" (queued, waiting to retry, or unknown)
    executor_id: str | None = None
    attempt: int | None = None
    outcome: str | None = None
    progress: float | None = None
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        """For JSON output; empty fields left out."""
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def summarize(task_id: str, reports: list[StatusReport], outcome: Status | None) -> StatusSummary:
    """One answer from many executors' reports and what the caller already received."""
    running = [r for r in reports if r.state == TaskState.RUNNING]
    finished = [r for r in reports if r.state == TaskState.FINISHED]
    if outcome is not None or finished:
        last = max(finished, key=lambda r: r.attempt or 0) if finished else None
        return StatusSummary(
            task_id,
            "finished",
            last.executor_id if last else None,
            last.attempt if last else None,
            str(outcome or (last and last.outcome)),
        )
    if running:
        report = max(running, key=lambda r: r.attempt or 0)
        progress: Progress | None = report.progress
        return StatusSummary(
            task_id,
            "running",
            report.executor_id,
            report.attempt,
            progress=progress.fraction if progress else None,
            message=progress.message if progress else "",
        )
    return StatusSummary(
        task_id,
        "not running",
        message="no executor runs it or finished it recently: it is queued, waiting in a "
        "retry tier, or unknown",
    )


class ControlClient:
    """The caller side: broadcast cancels, ask status and gather the answers."""

    def __init__(
        self,
        publisher: ConfirmedPublisher,
        signer: Signer,
        requester_id: str,
        keyring: KeyRing,
        issuer: str | None = None,
    ) -> None:
        self._publisher = publisher
        self._signer = signer
        self._requester_id = requester_id  # names its status-reply queue
        self._issuer = issuer or requester_id  # who its cancels say they come from
        self._keyring = keyring  # status reports are verified: an executor speaks for itself
        # request id → the task's capability (None: not known here) and the reports so far
        self._waiting: dict[str, tuple[str | None, list[StatusReport]]] = {}

    async def start(self, channel: AbstractChannel) -> None:
        """Declare the queue that collects status answers for this requester."""
        queue = await channel.declare_queue(
            f"wayang.status-reply.{self._requester_id}", exclusive=True, auto_delete=True
        )
        await queue.bind(names.CONTROL_EXCHANGE, names.status_reply_key(self._requester_id))
        await queue.consume(
            self._on_report, no_ack=True, consumer_tag=f"{self._requester_id}/status-replies"
        )

    async def cancel(self, task_id: str, reason: str = "") -> bool:
        """Broadcast a cancel; False when no executor is listening at all."""
        request = CancelRequest(task_id=task_id, reason=reason, requester=self._issuer)
        try:
            await self._publisher.publish(
                names.CONTROL_EXCHANGE,
                names.cancel_key(task_id),
                _message(request, self._signer, task_id),
                mandatory=True,
            )
        except Unroutable:
            return False
        return True

    async def status(
        self, task_id: str, wait_s: float = 1.0, capability: str | None = None
    ) -> list[StatusReport]:
        """Every executor's answer that arrives within ``wait_s``; with the task's
        ``capability`` known, only from keys that serve it (a key speaks only for tasks of
        its capabilities: a report by another capability's executor is refused)."""
        request = StatusRequest(
            request_id=new_id(),
            task_id=task_id,
            reply_to=names.status_reply_key(self._requester_id),
        )
        self._waiting[request.request_id] = (capability, [])
        try:
            await self._publisher.publish(
                names.CONTROL_EXCHANGE,
                names.status_key(task_id),
                _message(request, self._signer, request.request_id),
                mandatory=True,
            )
        except Unroutable:
            return []
        try:
            await asyncio.sleep(wait_s)
            return self._waiting[request.request_id][1]
        finally:
            del self._waiting[request.request_id]

    async def _on_report(self, message: AbstractIncomingMessage) -> None:
        try:
            report, signer = open_signed(
                message.body, message.headers or {}, self._keyring, StatusReport
            )
            waiting = self._waiting.get(report.request_id)
            capability = waiting[0] if waiting is not None else None
            check_executor_event(signer, report.executor_id, (capability,) if capability else ())
        except WayangError as exc:
            event = "security.refused" if isinstance(exc, SignatureError) else "control.refused"
            logs.event(log, event, logging.WARNING, type=message.type, code=exc.code, error=exc)
            return
        if waiting is not None:
            waiting[1].append(report)
