"""Publishing with publisher confirms: a publish returns only once the broker has the message.

The broker's answers become typed errors here, once: ``basic.return`` (no queue bound,
only with ``mandatory``) → :class:`Unroutable`; ``basic.nack`` (a full queue with
``reject-publish``) → :class:`Rejected`; the channel closed with ``ACCESS_REFUSED`` (the
account may not publish there) → :class:`AccessRefused`; any other closed channel or
connection → ``PublishFailed``.

Every message leaves with the AMQP ``user_id`` property set to the connection's user: the
broker refuses a ``user_id`` that is not the authenticated user's (``PRECONDITION_FAILED``),
so a receiver can trust it names the account that published (docs/security.md, section 3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from wayang_mq.core import logs
from wayang_mq.core.errors import BrokerBlocked, PublishFailed, WayangError
from wayang_mq.core.wire import WireMessage
from wayang_mq.observability.metrics import PublishMetrics

log = logging.getLogger("wayang_mq.amqp.publisher")

#: a publisher replaces its channel after a nack at most this often (see _fresh_channel)
FRESH_CHANNEL_S = 2.0


class Unroutable(WayangError):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class Rejected(WayangError):
    """The broker nacked the message: a queue it routes to is full (``reject-publish``)."""


class AccessRefused(WayangError):
    """The broker closed the channel with ACCESS_REFUSED: this account may not publish to that
    exchange (or under that routing key). Sending it again cannot help, so it is not retried."""


def connection_user(connection: aiormq.abc.AbstractConnection) -> str | None:
    """The user a connection authenticated as, for ``user_id``: the URL's user with PLAIN
    (aiormq, like the broker, defaults it to ``guest``), None with EXTERNAL (a certificate
    names the user; the client does not know it)."""
    if connection.url.query.get("auth", "plain").lower() != "plain":
        return None
    return connection.url.user or "guest"


def to_amqp(message: WireMessage, *, persistent: bool = True) -> aio_pika.Message:
    """The aio-pika message for a wire message."""
    props = message.amqp_properties()
    if not persistent:
        props["delivery_mode"] = aio_pika.DeliveryMode.NOT_PERSISTENT
    return aio_pika.Message(message.body, **props)


@dataclass
class PublishStats:
    """Counted, so that a slow or unconfirmed publish is never silent."""

    slow_confirms: int = 0  # confirms that took longer than ``slow_confirm_s``
    resent: int = 0  # publishes sent again after one was not confirmed (a possible duplicate)
    fresh_channels: int = 0  # channels replaced after a nack (a quorum queue's stuck client)


class ConfirmedPublisher:
    """Publishes on one channel opened with ``publisher_confirms`` and ``on_return_raises``.

    A confirm is waited for as long as the connection is up: a slow confirm is logged and
    counted, never given up on. Giving up on a confirm the broker still owes and publishing
    again is how one task gets queued twice and runs twice. What does end the wait: the
    connection or channel closing (aiormq fails the confirm; the publish is then sent again,
    logged and counted in ``stats.resent``), or, with ``blocked_wait_s``, a broker alarm that
    blocks the connection longer than that (``BrokerBlocked``).
    """

    def __init__(
        self,
        channel: AbstractChannel,
        *,
        reconnect_wait_s: float = 60.0,
        blocked_wait_s: float | None = None,
        slow_confirm_s: float = 10.0,
        metrics: PublishMetrics | None = None,
    ) -> None:
        """``blocked_wait_s``: how long to wait out a broker alarm before ``BrokerBlocked``
        (None: wait as long as it lasts, as workers do). ``slow_confirm_s``: a confirm slower
        than this is logged (``publish.confirm_slow``) and counted. ``metrics``: where confirm
        latency, full-queue nacks and broker blocks are counted (None: nowhere)."""
        self._metrics = metrics
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}
        self._reconnect_wait_s = reconnect_wait_s
        self._blocked_wait_s = blocked_wait_s
        self._slow_confirm_s = slow_confirm_s
        self.stats = PublishStats()
        self._fresh_at = -FRESH_CHANNEL_S  # when the channel was last replaced after a nack

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish_once(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.Message,
        *,
        mandatory: bool = False,
    ) -> None:
        """One attempt; raises Unroutable, Rejected, BrokerBlocked or PublishFailed."""
        try:
            try:
                await self._publish_once(exchange, routing_key, message, mandatory)
            except Rejected:
                if not await self._fresh_channel():
                    raise
                # Once more on a channel opened now: a full queue refuses it again.
                await self._publish_once(exchange, routing_key, message, mandatory)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling() > 0:
                raise  # this task was cancelled: its caller's cancellation, kept
            # Nobody cancelled this task: a future of the connection's was (a connection that
            # died mid-publish cancels the write's drain or the confirm). The broker may or may
            # not have the message: a failed publish, resent like any other, never a
            # CancelledError that escapes its caller as if it had been cancelled.
            raise PublishFailed(
                f"publish to {exchange} not confirmed: the connection closed under it"
            ) from exc

    async def _fresh_channel(self) -> bool:
        """After a nack, replace the channel (at most every ``FRESH_CHANNEL_S``); True if
        it was replaced.

        A nack usually means a full queue, and a fresh channel changes nothing. But RabbitMQ
        3.10 also nacks, for minutes, every publish of a channel that first published to a
        quorum queue while the queue was electing a new leader (a cluster node died): the
        channel's client state for that queue stays refused while a channel opened later is
        served. Seen in tests/test_cluster.py: a worker's results refused until its tasks hit
        the delivery limit. Closing the underlying channel makes aio-pika's robust channel
        open a new one; publishes in flight on the old one fail and are sent again.
        """
        loop = asyncio.get_running_loop()
        if loop.time() - self._fresh_at < FRESH_CHANNEL_S:
            return False
        self._fresh_at = loop.time()
        if not isinstance(self._channel, aio_pika.RobustChannel):
            return False
        try:
            await (await self._channel.get_underlay_channel()).close()
            await self._channel.ready()
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError):
            return False
        self.stats.fresh_channels += 1
        logs.event(
            log,
            "publish.fresh_channel",
            logging.WARNING,
            reason="the broker refused a publish (nack)",
            next="publishing it once more on a new channel; a full queue refuses it again",
        )
        return True

    async def _publish_once(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.Message,
        mandatory: bool,
    ) -> None:
        target = await self._exchange(exchange)
        try:
            connection = await self._wait_unblocked()
            if message.user_id is None:
                # set once; a resend keeps it (the same user on every connection of this URL)
                message.user_id = connection_user(connection)
            await self._confirmed(connection, target, exchange, routing_key, message, mandatory)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"no queue bound on {exchange} for {routing_key!r}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            if self._metrics is not None:
                self._metrics.rejected()
            raise Rejected(f"broker refused the message for {routing_key!r}") from exc
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise AccessRefused(
                f"the broker refused publishing to {exchange} with key {routing_key!r}: {exc}",
                hint="the account lacks that permission; see `wayang-mq access show`",
            ) from exc
        except (
            aiormq.exceptions.AMQPError,
            aio_pika.exceptions.ChannelInvalidStateError,
            ConnectionError,
            RuntimeError,
        ) as exc:
            raise PublishFailed(f"publish to {exchange} not confirmed: {exc!r}") from exc

    async def _confirmed(
        self,
        connection: aiormq.abc.AbstractConnection,
        target: AbstractExchange,
        exchange: str,
        routing_key: str,
        message: aio_pika.Message,
        mandatory: bool,
    ) -> None:
        """Publish and wait for the confirm, watched but never timed out (see the class)."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        watch = {"slow": False, "gave_up": False}
        handle: asyncio.TimerHandle

        def check() -> None:
            nonlocal handle
            waited = loop.time() - started
            if not watch["slow"]:
                watch["slow"] = True
                self.stats.slow_confirms += 1
                logs.event(
                    log,
                    "publish.confirm_slow",
                    logging.WARNING,
                    message_id=message.message_id,
                    exchange=exchange,
                    waited_s=round(waited, 1),
                    next="waiting for it: the connection is up",
                )
            blocked = self._blocked_wait_s is not None and waited > self._blocked_wait_s
            if blocked and not _unblocked(connection):
                logs.event(
                    log,
                    "broker.blocked",
                    logging.WARNING,
                    reason="the broker blocked publishing (memory or disk alarm) mid-publish",
                    message_id=message.message_id,
                    waited_s=round(waited, 1),
                    next="BrokerBlocked: the message may still be queued once the alarm clears",
                )
                watch["gave_up"] = True
                if self._metrics is not None:
                    self._metrics.blocked()
                    self._metrics.unblocked()  # given up on: no longer waited out here
                task.cancel()
                return
            handle = loop.call_later(self._slow_confirm_s, check)

        handle = loop.call_later(self._slow_confirm_s, check)
        try:
            await target.publish(message, routing_key, mandatory=mandatory)
            if self._metrics is not None:
                self._metrics.confirmed(exchange, loop.time() - started)
        except asyncio.CancelledError:
            if watch["gave_up"] and task.uncancel() == 0:
                raise BrokerBlocked(loop.time() - started) from None
            raise
        finally:
            handle.cancel()

    async def _wait_unblocked(self) -> aiormq.abc.AbstractConnection:
        """Return at once unless the broker has blocked the connection (an alarm): then log
        it and wait, for ``blocked_wait_s`` at most.

        During an alarm RabbitMQ stops reading from publishing connections, so a publish
        would wait for a confirm that never comes: a silent hang, which this turns into a
        logged, bounded wait.
        """
        connection = (await self._channel.get_underlay_channel()).connection
        # The common case without a timer: aiormq keeps "not blocked" as an Event of its own
        # (name-mangled); if a release renames it, every publish takes the timed path below.
        events = (
            getattr(connection, "connected", None),
            getattr(connection, "_Connection__connection_unblocked", None),
        )
        if all(isinstance(e, asyncio.Event) and e.is_set() for e in events):
            return connection
        try:
            async with asyncio.timeout(0.05):
                await connection.ready()  # connected and not blocked: returns immediately
            return connection
        except TimeoutError:
            pass
        logs.event(
            log,
            "broker.blocked",
            logging.WARNING,
            reason="the broker blocked publishing (memory or disk alarm)",
            waiting_s=self._blocked_wait_s
            if self._blocked_wait_s is not None
            else "until it clears",
        )
        started = time.monotonic()
        if self._metrics is not None:
            self._metrics.blocked()
        try:
            async with asyncio.timeout(self._blocked_wait_s):
                await connection.ready()
        except TimeoutError:
            raise BrokerBlocked(time.monotonic() - started) from None
        finally:
            if self._metrics is not None:
                self._metrics.unblocked()
        logs.event(log, "broker.unblocked", waited_s=round(time.monotonic() - started, 1))
        return connection

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.Message,
        *,
        mandatory: bool = False,
    ) -> None:
        """Publish, riding out a reconnect (bounded); Unroutable and Rejected are not retried."""
        try:  # the common case, without building a retry loop per message
            await self.publish_once(exchange, routing_key, message, mandatory=mandatory)
            return
        except PublishFailed as exc:
            # The broker may have the message: sending it again may queue it twice. Tasks are
            # idempotent by id and duplicates' results are dropped, but never silently.
            self.stats.resent += 1
            logs.event(
                log,
                "publish.resending",
                logging.WARNING,
                message_id=message.message_id,
                exchange=exchange,
                reason=str(exc),
                next="publishing again once the channel is back (a possible duplicate)",
            )
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(PublishFailed),
            stop=stop_after_delay(self._reconnect_wait_s),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self.publish_once(exchange, routing_key, message, mandatory=mandatory)


def _unblocked(connection: aiormq.abc.AbstractConnection) -> bool:
    """False while the broker blocks the connection (an alarm); True when unknown."""
    event = getattr(connection, "_Connection__connection_unblocked", None)
    return not isinstance(event, asyncio.Event) or event.is_set()
