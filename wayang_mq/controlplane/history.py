"""Reading ``wayang.history``: the record's flows kept as a RabbitMQ stream, for replay.

``wayang.history`` holds what the control plane read from ``wayang.record`` and did not
refuse, appended by the control plane itself after it wrote them: one stream entry per batch
it wrote (the batch's deliveries packed, see
:meth:`~wayang_mq.controlplane.facts.Delivery.pack_many`), so every delivery of an entry
shares its offset. It is a stream: reading removes nothing, and any reader can start
anywhere. Over AMQP 0-9-1 a stream consumer must set a prefetch and ack manually (the acks
are credit, not removal), and says where to start in the consume argument
``x-stream-offset``: ``first``, ``last`` (the start of the last chunk), ``next``, an offset,
or a timestamp (the first chunk written at or after that second). Each delivery carries its
offset in the ``x-stream-offset`` header; offsets grow by one per entry.

A stream has no end a consumer is told about, so a bounded read first asks for the current
last offset (:meth:`History.last_offset`) and stops there. Each entry is turned into the same
:class:`~wayang_mq.controlplane.facts.Delivery` the control plane reads from ``wayang.record``,
so :func:`~wayang_mq.controlplane.facts.read` and the store apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, Self

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity

from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.outcome import discard, settle
from wayang_mq.controlplane.facts import Delivery
from wayang_mq.core import names
from wayang_mq.core.errors import ConfigError, TopologyError

#: the header in which the broker tells a stream consumer each message's offset
OFFSET_HEADER: Final = "x-stream-offset"

#: where a read starts: a named position, an offset, or an instant
Start = int | datetime | Literal["first", "last", "next"]

_NAMED: Final = ("first", "last", "next")
_AGO: Final = re.compile(r"^(\d+)([smhd])$")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_START_HINT: Final = "give an offset (e.g. 0), first, last, next, 2024-05-01T12:00Z or 10m (ago)"


@dataclass(frozen=True, slots=True)
class Entry:
    """One message of the history: where it sits, and the delivery as the record saw it."""

    offset: int
    delivery: Delivery
    last: bool = True  # the entry's last delivery (every delivery of a batch shares its offset)


def parse_start(text: str, *, now: datetime | None = None) -> Start:
    """``--from``/``--to`` as given on the command line: an offset, first/last/next, an
    ISO-8601 instant (UTC when it names no zone) or a duration ago (``30s``, ``10m``, ``2h``,
    ``7d``)."""
    text = text.strip()
    if text in _NAMED:
        return text  # type: ignore[return-value]  # one of the three literals
    if text.isdigit():
        return int(text)
    ago = _AGO.match(text)
    if ago:
        delta = timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
        return (now or datetime.now(UTC)) - delta
    try:
        instant = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r} is not a stream position", hint=_START_HINT) from None
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


def deliveries_of(message: AbstractIncomingMessage) -> list[Delivery]:
    """A history entry's deliveries as the record read them (the control plane appends each
    batch it wrote as one entry: see :meth:`~wayang_mq.controlplane.facts.Delivery.pack_many`),
    so a fact read from the history has the same digest as when read from ``wayang.record``."""
    return Delivery.unpack_many(message.body)


def offset_of(message: AbstractIncomingMessage) -> int:
    """The offset the broker put on a stream delivery."""
    value = (message.headers or {}).get(OFFSET_HEADER)
    if not isinstance(value, int):
        raise TopologyError(
            f"{names.HISTORY_QUEUE} delivered a message without an offset: is it a stream?",
            hint="delete the queue and run `wayang-mq topology apply`",
        )
    return value


def _argument(start: Start) -> Any:
    if isinstance(start, int) and start < 0:
        # A bad x-stream-offset closes the whole connection (INTERNAL_ERROR): check it here.
        raise ConfigError(f"offset {start} is negative", hint=_START_HINT)
    return start


class History:
    """A connection reading ``wayang.history`` (``async with History(url) as history``)."""

    def __init__(
        self,
        amqp_url: str,
        *,
        prefetch: int = 512,
        idle_s: float = 5.0,
        first_wait_s: float = 1.0,
    ) -> None:
        self._url = amqp_url
        self._prefetch = prefetch
        # A bounded read stops when nothing came for idle_s (nothing after its start); an
        # empty stream answers last_offset with nothing within first_wait_s.
        self._idle_s = idle_s
        self._first_wait_s = first_wait_s
        self._stack = contextlib.AsyncExitStack()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None

    async def __aenter__(self) -> Self:
        connection = await connect(self._url, "wayang-history")
        await self._stack.enter_async_context(connection)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)  # a stream consumer needs one
        try:
            self._queue = await channel.declare_queue(names.HISTORY_QUEUE, passive=True)
        except ChannelNotFoundEntity:
            await self._stack.aclose()
            raise TopologyError(
                f"the broker has no {names.HISTORY_QUEUE} stream",
                hint="run `wayang-mq topology apply`",
            ) from None
        self._channel = channel
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def last_offset(self) -> int | None:
        """The offset of the newest message now (None: the stream is empty).

        ``last`` starts at the last chunk's first message; the rest of that chunk follows at
        once, so the newest is the highest offset before the deliveries pause."""
        newest: int | None = None
        async for entry in self._consume("last", idle_s=0.2, first_wait_s=self._first_wait_s):
            newest = entry.offset if newest is None else max(newest, entry.offset)
        return newest

    async def entries(self, start: Start = "first", *, end: int | None) -> AsyncIterator[Entry]:
        """Entries from ``start`` in order, up to and including offset ``end`` (None: follow
        forever). A bounded read also ends when nothing more comes for ``idle_s``."""
        if end is not None and isinstance(start, int) and start > end:
            return
        idle = None if end is None else self._idle_s
        async for entry in self._consume(start, idle_s=idle, first_wait_s=idle):
            if end is not None and entry.offset > end:
                return
            yield entry
            if end is not None and entry.offset >= end and entry.last:
                return

    async def _consume(
        self, start: Start, *, idle_s: float | None, first_wait_s: float | None
    ) -> AsyncIterator[Entry]:
        """Consume from ``start`` until cancelled or, with ``idle_s``, until a pause.

        Offsets never go back: after a reconnect the robust connection consumes again from
        ``start``, and what was already yielded is skipped."""
        assert self._queue is not None, "use History in `async with`"
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        tag = await self._queue.consume(inbox.put, arguments={OFFSET_HEADER: _argument(start)})
        seen = -1
        wait = first_wait_s
        try:
            while True:
                try:
                    message = await asyncio.wait_for(inbox.get(), wait)
                except TimeoutError:
                    return
                wait = idle_s
                offset = offset_of(message)
                # the ack is credit for the next one: a stream removes nothing
                await settle(message, discard(None))
                if offset <= seen:
                    continue
                seen = offset
                deliveries = deliveries_of(message)
                for n, delivery in enumerate(deliveries, 1):
                    yield Entry(offset, delivery, last=n == len(deliveries))
        finally:
            with contextlib.suppress(Exception):
                await self._queue.cancel(tag)
