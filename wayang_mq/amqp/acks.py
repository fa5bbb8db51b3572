"""Acks that leave together: deliveries settled in the same turn of the event loop are acked
with one ``basic.ack`` (``multiple``) where their tags are contiguous.

Each ack costs the broker a command on the queue (a Raft command on a quorum queue) and us a
frame; one ``multiple`` ack settles a run of deliveries at once. The guarantee does not move:
a delivery is only ever marked ready by :func:`wayang_mq.amqp.outcome.settle`, after what its
outcome publishes was confirmed, and a ``multiple`` ack covers exactly the tags that are
ready, from the oldest unsettled delivery of the channel up: never one still running, nacked
or left. A tag ready out of order, behind one that is not, leaves on its own in the same
turn; nothing waits for a slower task.

That needs every delivery of the channel to be known, in tag order: a consumer opts in by
calling :func:`track` on each delivery as it arrives (the daemons' consumers and the
dispatcher's reply consumer do). A delivery of an untracked channel is acked alone, as
before. A channel that closed takes its book with it: its unacked deliveries go back to
their queues, as always.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError


class _Book:
    """One channel's deliveries not yet settled (in tag order) and those ready to ack."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self.unsettled: dict[int, None] = {}  # insertion order = tag order
        self.ready: dict[int, asyncio.Future[None]] = {}
        self.scheduled = False

    def flush(self) -> None:
        """Send what is ready: a contiguous run from the oldest as one multiple ack, the rest
        one by one; each waiting settle learns whether its ack was handed to the socket."""
        self.scheduled = False
        ready, self.ready = self.ready, {}
        run: list[int] = []
        for tag in self.unsettled:
            if tag not in ready:
                break
            run.append(tag)
        for tag in ready:
            self.unsettled.pop(tag, None)
        if len(run) > 1:
            self._send(run[-1], True, [ready.pop(tag) for tag in run])
        for tag, waiter in ready.items():
            self._send(tag, False, [waiter])

    def _send(self, tag: int, multiple: bool, waiters: list[asyncio.Future[None]]) -> None:
        sent = asyncio.ensure_future(self.channel.basic_ack(tag, multiple=multiple))

        def told(done: asyncio.Future[None]) -> None:
            failure = None if done.cancelled() else done.exception()
            for waiter in waiters:
                if waiter.done():
                    continue
                if done.cancelled():
                    waiter.cancel()
                elif failure is not None:
                    waiter.set_exception(failure)
                else:
                    waiter.set_result(None)

        sent.add_done_callback(told)


_books: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, _Book] = weakref.WeakKeyDictionary()


def _book(message: AbstractIncomingMessage) -> _Book | None:
    try:
        return _books.get(message.channel)
    except ChannelInvalidStateError:  # closed: its deliveries are back in their queues
        return None


def track(message: AbstractIncomingMessage) -> None:
    """Note a delivery as it arrives; call it for every delivery of a channel, or none."""
    tag = message.delivery_tag
    if tag is None:  # consumed with no_ack: nothing to settle
        return
    try:
        channel = message.channel
    except ChannelInvalidStateError:
        return
    book = _books.get(channel)
    if book is None:
        book = _books[channel] = _Book(channel)
    book.unsettled[tag] = None


def forget(message: AbstractIncomingMessage) -> None:
    """A tracked delivery settled otherwise (nacked, rejected): no longer holds up a run."""
    book = _book(message)
    if book is not None and message.delivery_tag is not None:
        book.unsettled.pop(message.delivery_tag, None)


def ack(message: AbstractIncomingMessage) -> Awaitable[None]:
    """Ack the delivery, with others of its channel where it can; awaitable until the ack
    is handed to the connection. An untracked delivery is acked alone."""
    tag = message.delivery_tag
    book = _book(message)
    if book is None or tag is None or tag not in book.unsettled:
        return message.ack()
    waiter = asyncio.get_running_loop().create_future()
    book.ready[tag] = waiter
    if not book.scheduled:
        book.scheduled = True
        asyncio.get_running_loop().call_soon(book.flush)
    _mark_processed(message)
    return waiter


def _mark_processed(message: AbstractIncomingMessage) -> None:
    """aio-pika's own state: the message is settled, so a second ack or nack through it is
    refused as for any other (MessageProcessError), instead of acking a tag twice."""
    lock = getattr(message, "lock", None)
    if callable(lock):
        lock()
    if hasattr(message, "_IncomingMessage__processed"):
        message._IncomingMessage__processed = True
