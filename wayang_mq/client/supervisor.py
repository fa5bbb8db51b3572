"""The dispatcher's watch over its own tasks: deadlines, and executors that stop heartbeating.

Two gaps RabbitMQ leaves open are closed here:

* Per-message TTL expires only at the head of a queue, so a task stuck behind a slow one can
  outlive its deadline unseen. Once a task is past its deadline (plus a grace) with no
  result, the supervisor asks the executors; if none runs or finished it, the task ends
  FAILED ``timeout`` (a worker that receives it later refuses it: its deadline has passed).
* A hung executor (stopped process, blocked event loop) keeps its AMQP connection open, so
  the broker never returns its task. Workers list their in-flight task ids in every
  heartbeat; when a task's executor has been silent longer than the task's
  ``heartbeat_timeout_ms``, the task is re-dispatched as a new attempt with a new token, and
  the old attempt's late result is fenced off by that token. This is also what covers a
  long-running task (acked at start, so the broker no longer holds it) whose worker dies.

A task answered PENDING has started: its queue deadline no longer applies.

With a control plane running, the second watch is its job (``wayang-mq control-plane``
marks silent executors lost and re-dispatches their tasks, also when the dispatcher is gone):
set ``SupervisionConfig(reassign_silent=False)`` so that a task is not re-dispatched twice.
The deadline watch stays: it is the dispatcher's own promise to its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Protocol

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from wayang_mq.amqp.control import StatusSummary
from wayang_mq.core import logs, names
from wayang_mq.core.authority import check_executor_event, check_task_claim
from wayang_mq.core.errors import WayangError
from wayang_mq.core.model import Heartbeat, Task, now_ms
from wayang_mq.core.signing import KeyRing
from wayang_mq.core.wire import open_signed

log = logging.getLogger("wayang_mq.client.supervisor")


class Supervised(Protocol):
    """What the supervisor asks of its dispatcher."""

    dispatcher_id: str

    def pending_tasks(self) -> list[Task]: ...

    def is_pending(self, task_id: str) -> bool: ...

    def pending_task(self, task_id: str) -> Task | None: ...

    def is_accepted(self, task_id: str) -> bool: ...

    async def status(self, task_id: str, wait_s: float = 1.0) -> StatusSummary: ...

    async def expire(self, task: Task) -> None: ...

    async def reassign(self, task: Task, silent_executor: str) -> None: ...


@dataclass(frozen=True)
class SupervisionConfig:
    """How closely the dispatcher watches its tasks."""

    deadline_grace_ms: int = 5_000  # past the deadline, how long before asking the executors
    check_interval_s: float = 1.0
    status_wait_s: float = 0.5
    # re-dispatch tasks whose executor went silent; turn off where a control plane supervises
    # (it re-dispatches them even after this dispatcher is gone, and tells it the new attempt)
    reassign_silent: bool = True


class Supervisor:
    """Watches the pending tasks of one dispatcher."""

    def __init__(self, dispatcher: Supervised, config: SupervisionConfig, keyring: KeyRing) -> None:
        self._dispatcher = dispatcher
        self._config = config
        self._keyring = keyring  # a heartbeat that does not verify, or lies, is ignored
        self._last_beat: dict[str, int] = {}  # executor id → when its last heartbeat came
        self._running_on: dict[str, str] = {}  # task id → executor that listed it in flight
        self._loop: asyncio.Task[None] | None = None

    async def start(self, channel: AbstractChannel) -> None:
        """Listen to every executor's heartbeat and start the periodic check."""
        queue = await channel.declare_queue(
            f"wayang.watch.{self._dispatcher.dispatcher_id}", exclusive=True, auto_delete=True
        )
        await queue.bind(names.EVENTS_EXCHANGE, names.event_key("heartbeat", "*"))
        await queue.consume(
            self._on_heartbeat,
            no_ack=True,
            consumer_tag=f"{self._dispatcher.dispatcher_id}/heartbeats",
        )
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the periodic check."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    def forget(self, task_id: str) -> None:
        """The task has its terminal result."""
        self._running_on.pop(task_id, None)

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        try:
            beat, signer = open_signed(
                message.body, message.headers or {}, self._keyring, Heartbeat
            )
            check_executor_event(signer, beat.executor_id, beat.capabilities)
        except WayangError as exc:
            logs.event(log, "heartbeat.refused", logging.WARNING, id=message.message_id, error=exc)
            return
        self._last_beat[beat.executor_id] = now_ms()
        for task_id in beat.in_flight:
            task = self._dispatcher.pending_task(task_id)  # other dispatchers' are theirs
            if task is None:
                continue
            try:
                check_task_claim(signer, task)
            except WayangError as exc:
                logs.event(log, "heartbeat.refused", logging.WARNING, task_id=task_id, error=exc)
                continue
            self._running_on[task_id] = beat.executor_id

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._config.check_interval_s)
            for task in self._dispatcher.pending_tasks():
                try:
                    await self._check(task)
                except WayangError as exc:  # the broker may be away: try again next round
                    logs.event(
                        log,
                        "supervisor.check_failed",
                        logging.WARNING,
                        task_id=task.task_id,
                        error=exc,
                    )

    async def _check(self, task: Task) -> None:
        now = now_ms()
        executor = self._running_on.get(task.task_id)
        timeout_ms = task.heartbeat_timeout_ms if self._config.reassign_silent else None
        if executor is not None and timeout_ms is not None:
            silent_ms = now - self._last_beat.get(executor, now)
            if silent_ms > timeout_ms:
                self._running_on.pop(task.task_id, None)
                await self._dispatcher.reassign(task, executor)
            return
        if self._dispatcher.is_accepted(task.task_id):
            return  # started and answered PENDING: its queue deadline no longer applies
        if executor is None and now > task.deadline_ms + self._config.deadline_grace_ms:
            status = await self._dispatcher.status(task.task_id, self._config.status_wait_s)
            if status.state == "not running":
                await self._dispatcher.expire(task)
