"""The progress events of the tasks a dispatcher's callers watch (``TaskHandle.progress()``).

Executors publish a task's progress on ``wayang.events`` as ``progress.<task id>``. Nothing is
bound there until a caller asks: then the dispatcher's own exclusive queue
``wayang.progress.<dispatcher id>`` (declared on first use, gone with the connection) is bound
to that one key, and unbound when the last watcher of the task stops. Every event is verified
like a heartbeat (signed by an executor key speaking as itself, serving the task's
capability); a forged or misaddressed one is dropped. Progress is advisory: events published
before the binding, or while the broker was away, are not seen, and a watcher that falls
behind keeps only the newest few.

Its own channel: an account granted before progress watching existed is refused the binding
(ACCESS_REFUSED closes the channel), which must not take the reply queue down with it. Then
watchers get no events (one warning says to grant the account again) and still end with the
task's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika.exceptions
import aiormq.exceptions
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from wayang_mq.core import logs, names
from wayang_mq.core.authority import check_executor_event
from wayang_mq.core.errors import WayangError
from wayang_mq.core.model import Progress, Result, Task
from wayang_mq.core.signing import KeyRing
from wayang_mq.core.wire import open_signed

log = logging.getLogger("wayang_mq.client.progress")

#: events kept per watcher that has not read them yet; older ones are dropped (the newest wins)
BUFFERED_EVENTS = 16
#: binding key words that are wildcards: a task id holding one cannot be watched exactly
_WILDCARDS = ("*", "#")

_BROKER_ERRORS = (
    aio_pika.exceptions.AMQPException,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    asyncio.TimeoutError,
)


@dataclass
class _Watched:
    task: Task
    watchers: list[asyncio.Queue[Progress]] = field(default_factory=list)
    attempt: int = 0  # the newest attempt an event came from: an older one's are stale


class ProgressFeed:
    """Binds, verifies and hands out progress events, per watched task."""

    def __init__(self, dispatcher_id: str, keyring: KeyRing) -> None:
        self._queue_name = names.progress_queue(dispatcher_id)
        self._keyring = keyring
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._lock = asyncio.Lock()
        self._watched: dict[str, _Watched] = {}
        self._refused = False  # the broker refused us once: do not ask again

    def attach(self, connection: AbstractRobustConnection) -> None:
        """The dispatcher's connection; the queue is declared when a caller first watches."""
        self._connection = connection

    async def events(self, task: Task, finished: asyncio.Future[Result]) -> AsyncIterator[Progress]:
        """The task's progress events as they arrive, until ``finished`` is done."""
        inbox: asyncio.Queue[Progress] = asyncio.Queue(BUFFERED_EVENTS)
        watching = not finished.done() and await self._watch(task, inbox)
        try:
            while not finished.done():
                if not watching:
                    await asyncio.wait({finished})
                    break
                getter = asyncio.ensure_future(inbox.get())
                either: set[asyncio.Future[Any]] = {getter, finished}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                yield getter.result()
        finally:
            if watching:
                await self._unwatch(task.task_id, inbox)

    # -- bindings -----------------------------------------------------------------------------

    async def _watch(self, task: Task, inbox: asyncio.Queue[Progress]) -> bool:
        """Start handing the task's events to ``inbox``; False when they cannot be had."""
        if any(word in _WILDCARDS for word in task.task_id.split(".")):
            return False
        async with self._lock:
            watched = self._watched.get(task.task_id)
            if watched is None:
                if not await self._bind(task.task_id, bind=True):
                    return False
                watched = self._watched[task.task_id] = _Watched(task)
            watched.watchers.append(inbox)
        return True

    async def _unwatch(self, task_id: str, inbox: asyncio.Queue[Progress]) -> None:
        async with self._lock:
            watched = self._watched.get(task_id)
            if watched is None or inbox not in watched.watchers:
                return
            watched.watchers.remove(inbox)
            if not watched.watchers:
                del self._watched[task_id]
                await self._bind(task_id, bind=False)

    async def _bind(self, task_id: str, *, bind: bool) -> bool:
        """Bind (or unbind) ``progress.<task id>``; False when the broker would not."""
        if self._refused or self._connection is None:
            return False
        key = names.event_key("progress", task_id)
        try:
            queue = self._queue or await self._declare(self._connection)
            if bind:
                await queue.bind(names.EVENTS_EXCHANGE, key)
            else:
                await queue.unbind(names.EVENTS_EXCHANGE, key)
        except _BROKER_ERRORS as exc:
            refused = isinstance(exc, aiormq.exceptions.ChannelAccessRefused)
            self._refused = refused
            self._queue = None if refused else self._queue
            logs.event(
                log,
                "progress.unavailable",
                logging.WARNING,
                task_id=task_id,
                error=exc,
                hint="grant the dispatcher's account again (`wayang-mq access grant`)"
                if refused
                else "the broker is away; progress resumes for tasks watched later",
            )
            return False
        return True

    async def _declare(self, connection: AbstractRobustConnection) -> AbstractQueue:
        channel = await connection.channel()
        # Exclusive: it goes away with this dispatcher's connection, so nothing piles up
        # for a dispatcher that is gone.
        queue = await channel.declare_queue(self._queue_name, exclusive=True, auto_delete=True)
        await queue.consume(self._on_message, no_ack=True)
        self._queue = queue
        return queue

    # -- events -------------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            progress, signer = open_signed(
                message.body, message.headers or {}, self._keyring, Progress
            )
            watched = self._watched.get(progress.task_id)
            if watched is None:
                return  # a late event of a task nobody watches any more
            check_executor_event(signer, progress.executor_id, (watched.task.capability,))
        except WayangError as exc:
            logs.event(log, "progress.refused", logging.WARNING, id=message.message_id, error=exc)
            return
        if progress.attempt < watched.attempt:
            return  # from an attempt a newer one replaced
        watched.attempt = progress.attempt
        for inbox in watched.watchers:
            if inbox.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    inbox.get_nowait()  # the watcher is behind: the newest event matters
            inbox.put_nowait(progress)
