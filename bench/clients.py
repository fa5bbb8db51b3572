"""The dispatcher side of each system: one round trip = submit one echo task, await its result.

Every client publishes persistent messages and waits for the broker's publisher confirm
before a submit counts, as ``wayang_mq.Dispatcher.submit`` does (except ``DramatiqClient``
for the ``dramatiq`` system: Dramatiq's default, unconfirmed sends); results come back on a
durable reply queue, consumed with manual acks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import aio_pika
import dramatiq
import msgpack
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from bench import dramatiq_app, raw_worker
from wayang_mq.client.dispatcher import Dispatcher, DispatcherConfig, TaskHandle
from wayang_mq.core.model import Status
from wayang_mq.core.signing import KeyRing, Signer

RESULT_TIMEOUT_S = 60.0
RAW_REPLY_QUEUE = "bench.raw.reply"
RAW_REPLY_KEY = "bench.reply"
#: the wayang-mq capability queue's limits (topology/wayang.toml) as queue arguments
CAPABILITY_QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-max-length": 100_000,
    "x-overflow": "reject-publish",
    "x-delivery-limit": 5,
}


class AsyncClient(Protocol):
    """A dispatcher-side client whose round trips run concurrently on one event loop."""

    async def start(self) -> None:
        """Connect and start consuming results."""

    async def submit(self, payload: dict[str, Any]) -> asyncio.Future[None]:
        """Publish one echo task (confirmed); the future ends when its checked result is in."""

    async def roundtrip(self, payload: dict[str, Any]) -> None:
        """Submit one echo task and wait for its result."""

    async def close(self) -> None:
        """Disconnect."""


class WayangClient:
    """wayang-mq's own Dispatcher submitting to ``demo.echo`` (or another capability)."""

    def __init__(
        self,
        amqp_url: str,
        signer: Signer,
        capability: str = "demo.echo",
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``registry``: where the dispatcher counts its metrics (None: metrics off)."""
        dispatcher_id = f"bench-{uuid.uuid4().hex[:8]}"
        config = DispatcherConfig(
            amqp_url=amqp_url,
            signer=signer,
            results_keyring=KeyRing.of([signer.public_key]),
            dispatcher_id=dispatcher_id,
        )
        self._capability = capability
        self._dispatcher = Dispatcher(config, registry=registry)

    async def start(self) -> None:
        """Connect and declare the reply queue."""
        await self._dispatcher.start()

    async def submit(self, payload: dict[str, Any]) -> asyncio.Future[None]:
        """Submit (confirmed); the future waits for the terminal result."""
        handle = await self._dispatcher.submit(self._capability, payload)
        return asyncio.ensure_future(self._succeeded(handle))

    async def _succeeded(self, handle: TaskHandle) -> None:
        result = await handle.result(RESULT_TIMEOUT_S)
        if result.status is not Status.SUCCESS:
            raise RuntimeError(f"{self._capability} failed: {result.error}")

    async def roundtrip(self, payload: dict[str, Any]) -> None:
        """Submit (confirmed) and await the terminal result."""
        handle = await self._dispatcher.submit(self._capability, payload)
        await self._succeeded(handle)

    async def close(self) -> None:
        """Close the dispatcher's connection."""
        await self._dispatcher.close()


class RawClient:
    """Plain aio-pika: confirmed, mandatory, persistent publish; futures by correlation id."""

    def __init__(self, amqp_url: str) -> None:
        self._url = amqp_url
        self._connection: AbstractRobustConnection | None = None
        self._tasks: AbstractExchange | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}

    async def start(self) -> None:
        """Connect, consume the reply queue (prefetch 512, as the Dispatcher's)."""
        self._connection = await aio_pika.connect_robust(self._url)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._tasks = await channel.get_exchange(raw_worker.TASK_EXCHANGE, ensure=False)
        replies = await self._connection.channel()
        await replies.set_qos(prefetch_count=512)
        queue = await replies.get_queue(RAW_REPLY_QUEUE, ensure=False)
        await queue.consume(self._on_reply)

    async def submit(self, payload: dict[str, Any]) -> asyncio.Future[None]:
        """Publish and wait for the confirm; the future waits for the reply."""
        return asyncio.ensure_future(self._reply(await self._publish(payload), payload))

    async def roundtrip(self, payload: dict[str, Any]) -> None:
        """Publish and wait for the confirm, then for the reply."""
        await self._reply(await self._publish(payload), payload)

    @staticmethod
    async def _reply(future: asyncio.Future[Any], payload: dict[str, Any]) -> None:
        output = await asyncio.wait_for(future, RESULT_TIMEOUT_S)
        if output != payload:
            raise RuntimeError(f"raw echo returned {output!r}")

    async def _publish(self, payload: dict[str, Any]) -> asyncio.Future[Any]:
        assert self._tasks is not None
        task_id = str(uuid.uuid4())
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[task_id] = future
        message = aio_pika.Message(
            msgpack.packb(payload, use_bin_type=True),
            content_type="application/msgpack",
            message_id=task_id,
            correlation_id=task_id,
            reply_to=RAW_REPLY_KEY,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._tasks.publish(message, raw_worker.TASK_ROUTING_KEY, mandatory=True)
        return future

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        reply = msgpack.unpackb(message.body)
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(reply["output"])
        await message.ack()

    async def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            await self._connection.close()


class DramatiqClient:
    """Dramatiq task messages (built and encoded by Dramatiq's own ``Message``, JSON) published
    with aio-pika, as ``RabbitmqBroker.enqueue`` publishes them: persistent, to the default
    exchange, routed by queue name; with ``confirm`` each publish waits for the broker's
    confirm and is mandatory (Dramatiq's ``confirm_delivery=True``), without it is neither
    (Dramatiq's default). Futures by message id; the worker's replies are Dramatiq messages
    on a durable reply queue, consumed with manual acks (prefetch 512, as the others).
    """

    def __init__(self, amqp_url: str, *, confirm: bool) -> None:
        self._url = amqp_url
        self._confirm = confirm
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._queue, self._reply_queue = dramatiq_app.queues(confirm=confirm)

    async def start(self) -> None:
        """Connect, consume the reply queue (declared beforehand by ``declare_queues``)."""
        self._connection = await aio_pika.connect_robust(self._url)
        channel = await self._connection.channel(
            publisher_confirms=self._confirm, on_return_raises=self._confirm
        )
        self._exchange = channel.default_exchange
        replies = await self._connection.channel()
        await replies.set_qos(prefetch_count=512)
        queue = await replies.get_queue(self._reply_queue, ensure=False)
        await queue.consume(self._on_reply)

    async def submit(self, payload: dict[str, Any]) -> asyncio.Future[None]:
        """Publish (confirmed or not, see the class); the future waits for the reply."""
        return asyncio.ensure_future(self._reply(await self._publish(payload), payload))

    async def roundtrip(self, payload: dict[str, Any]) -> None:
        """Publish, then wait for the reply."""
        await self._reply(await self._publish(payload), payload)

    @staticmethod
    async def _reply(future: asyncio.Future[Any], payload: dict[str, Any]) -> None:
        output = await asyncio.wait_for(future, RESULT_TIMEOUT_S)
        if output != payload:
            raise RuntimeError(f"dramatiq echo returned {output!r}")

    async def _publish(self, payload: dict[str, Any]) -> asyncio.Future[Any]:
        assert self._exchange is not None
        task_id = str(uuid.uuid4())
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=self._queue,
            actor_name=dramatiq_app.ECHO_ACTOR,
            args=(task_id, payload),
            kwargs={},
            options={},
            message_id=task_id,
        )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[task_id] = future
        body = aio_pika.Message(message.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self._exchange.publish(body, self._queue, mandatory=self._confirm)
        return future

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        task_id, output = dramatiq.Message.decode(message.body).args
        future = self._pending.pop(task_id, None)
        if future is not None and not future.done():
            future.set_result(output)
        await message.ack()

    async def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            await self._connection.close()


async def declare_raw_topology(amqp_url: str) -> None:
    """The raw baseline's exchanges and queues, shaped like wayang-mq's (and emptied)."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        tasks = await channel.declare_exchange(
            raw_worker.TASK_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        results = await channel.declare_exchange(
            raw_worker.RESULT_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            raw_worker.TASK_QUEUE, durable=True, arguments=CAPABILITY_QUEUE_ARGUMENTS
        )
        await queue.bind(tasks, raw_worker.TASK_ROUTING_KEY)
        # Like a dispatcher's reply queue: durable, classic, removed when long unused.
        reply = await channel.declare_queue(
            RAW_REPLY_QUEUE, durable=True, arguments={"x-expires": 24 * 3600 * 1000}
        )
        await reply.bind(results, RAW_REPLY_KEY)
        await queue.purge()
        await reply.purge()
    finally:
        await connection.close()


async def consumer_count(amqp_url: str, queue_name: str) -> int:
    """Consumers on a queue right now (a passive declare; the management stats lag)."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.consumer_count or 0)
    finally:
        await connection.close()


class CeleryClient:
    """Celery's own client (``apply_async`` + ``AsyncResult.get`` on ``rpc://``), blocking.

    Celery's client is synchronous: the bench runs it in a thread, keeping a sliding window
    of outstanding tasks and waiting on the oldest; results for the others are buffered by
    the rpc backend as they arrive on the same reply queue.
    """

    def __init__(self, amqp_url: str) -> None:
        from bench import celery_app

        celery_app.app.conf.broker_url = amqp_url
        self._app = celery_app.app
        self._echo = celery_app.echo

    def start(self) -> None:
        """Check the broker answers (queues are declared by the worker and the first publish)."""
        with self._app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)

    def roundtrip(self, payload: dict[str, Any]) -> None:
        """Submit one task and block until its result."""
        self._check(self._echo.apply_async((payload,)).get(timeout=RESULT_TIMEOUT_S), payload)

    def window(
        self,
        payloads: Callable[[int], dict[str, Any]],
        count: int,
        window: int,
        done: Callable[[], None],
    ) -> None:
        """Submit ``count`` tasks with at most ``window`` outstanding; ``done`` per result."""
        outstanding: deque[tuple[Any, dict[str, Any]]] = deque()
        for index in range(count):
            if len(outstanding) >= window:
                self._collect(outstanding.popleft())
                done()
            payload = payloads(index)
            outstanding.append((self._echo.apply_async((payload,)), payload))
        while outstanding:
            self._collect(outstanding.popleft())
            done()

    def drain(
        self,
        payloads: Callable[[int], dict[str, Any]],
        count: int,
        start_worker: Callable[[], None],
        done: Callable[[], None],
    ) -> list[float]:
        """Queue ``count`` tasks, start the worker, collect; the results' arrival times."""
        pending = [(self._echo.apply_async((payloads(i),)), payloads(i)) for i in range(count)]
        start_worker()
        arrivals = []
        for item in pending:
            self._collect(item)
            arrivals.append(time.perf_counter())
            done()
        return arrivals

    def _collect(self, pending: tuple[Any, dict[str, Any]]) -> None:
        result, payload = pending
        self._check(result.get(timeout=RESULT_TIMEOUT_S), payload)

    @staticmethod
    def _check(output: Any, payload: dict[str, Any]) -> None:
        if output != payload:
            raise RuntimeError(f"celery echo returned {output!r}")

    def close(self) -> None:
        """Release the app's pooled connections."""
        self._app.close()
