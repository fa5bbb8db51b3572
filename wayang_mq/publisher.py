"""Publishing with publisher confirms: a publish returns only once the broker has the message.

The broker's three answers become typed errors here, once: ``basic.return`` (no queue bound,
only with ``mandatory``) → :class:`Unroutable`; ``basic.nack`` (a full queue with
``reject-publish``) → :class:`Rejected`; a closed channel or connection → ``PublishFailed``.
"""

from __future__ import annotations

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from wayang_mq.errors import PublishFailed, WayangError
from wayang_mq.wire import WireMessage


class Unroutable(WayangError):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class Rejected(WayangError):
    """The broker nacked the message: a queue it routes to is full (``reject-publish``)."""


def to_amqp(message: WireMessage, *, persistent: bool = True) -> aio_pika.Message:
    """The aio-pika message for a wire message."""
    props = message.amqp_properties()
    if not persistent:
        props["delivery_mode"] = aio_pika.DeliveryMode.NOT_PERSISTENT
    return aio_pika.Message(message.body, **props)


class ConfirmedPublisher:
    """Publishes on one channel opened with ``publisher_confirms`` and ``on_return_raises``."""

    def __init__(self, channel: AbstractChannel, *, reconnect_wait_s: float = 60.0) -> None:
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}
        self._reconnect_wait_s = reconnect_wait_s

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
        """One attempt; raises Unroutable, Rejected or PublishFailed."""
        target = await self._exchange(exchange)
        try:
            await target.publish(message, routing_key, mandatory=mandatory)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"no queue bound on {exchange} for {routing_key!r}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise Rejected(f"broker refused the message for {routing_key!r}") from exc
        except (
            TimeoutError,
            aiormq.exceptions.AMQPError,
            aio_pika.exceptions.ChannelInvalidStateError,
            ConnectionError,
            RuntimeError,
        ) as exc:
            raise PublishFailed(f"publish to {exchange} not confirmed: {exc!r}") from exc

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
        except PublishFailed:
            pass
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(PublishFailed),
            stop=stop_after_delay(self._reconnect_wait_s),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self.publish_once(exchange, routing_key, message, mandatory=mandatory)
