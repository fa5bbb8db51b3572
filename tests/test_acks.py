"""Acks that leave together (wayang_mq.amqp.acks) and frames that leave together
(wayang_mq.amqp.corked), against a real broker: a multiple ack covers exactly the deliveries
that were ready, never one still unsettled; corked frames arrive whole and in order."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from wayang_mq.amqp import acks
from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.corked import cork
from wayang_mq.amqp.outcome import discard, requeue, settle
from wayang_mq.testing.plugin import BrokerHandle


async def _deliveries(
    rabbitmq: BrokerHandle, count: int
) -> tuple[aio_pika.abc.AbstractRobustConnection, str, list[AbstractIncomingMessage]]:
    """A fresh queue holding ``count`` messages, consumed on a tracked channel."""
    connection = await connect(rabbitmq.amqp_url, "test acks")
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=count)
    name = f"test.acks.{uuid.uuid4().hex[:8]}"
    queue = await channel.declare_queue(name, auto_delete=False)
    for n in range(count):
        await channel.default_exchange.publish(aio_pika.Message(str(n).encode()), name)
    got: list[AbstractIncomingMessage] = []
    arrived = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        acks.track(message)
        got.append(message)
        if len(got) == count:
            arrived.set()

    await queue.consume(on_message)
    await asyncio.wait_for(arrived.wait(), 10)
    return connection, name, sorted(got, key=lambda m: m.delivery_tag or 0)


async def _depth_after_close(rabbitmq: BrokerHandle, name: str) -> list[bytes]:
    """The queue's messages once the consuming connection closed (unacked ones came back)."""
    connection = await aio_pika.connect(rabbitmq.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        bodies = []
        while (message := await queue.get(fail=False)) is not None:
            bodies.append(message.body)
            await message.ack()
        await queue.delete(if_unused=False, if_empty=False)
        return bodies
    finally:
        await connection.close()


async def test_acks_in_one_turn_cover_exactly_the_ready_deliveries(rabbitmq: BrokerHandle) -> None:
    # Given 6 deliveries on a tracked channel, the fourth still unsettled
    connection, name, got = await _deliveries(rabbitmq, 6)
    try:
        ready = [got[0], got[1], got[2], got[4], got[5]]
        # When the others are acked in the same turn of the loop
        await asyncio.gather(*(acks.ack(message) for message in ready))
        await asyncio.sleep(0.2)
    finally:
        await connection.close()
    # Then the broker gives back exactly the one left unsettled: the run 0-2 went as one
    # multiple ack, 4 and 5 (behind the unsettled 3) one by one, none covered the fourth
    assert await _depth_after_close(rabbitmq, name) == [b"3"]


async def test_a_requeued_delivery_is_not_acked_and_no_longer_holds_up_the_run_after_it(
    rabbitmq: BrokerHandle,
) -> None:
    # Given 4 tracked deliveries, the second given back to its queue by settle (a requeue)
    connection, name, got = await _deliveries(rabbitmq, 4)
    sent: list[tuple[int, bool]] = []
    channel = got[0].channel
    basic_ack = channel.basic_ack

    async def recorded(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        sent.append((delivery_tag, multiple))
        await basic_ack(delivery_tag, multiple=multiple, wait=wait)

    channel.basic_ack = recorded  # type: ignore[method-assign]
    try:
        await settle(got[1], requeue(got[1].message_id, "test"))
        # When the rest are settled together (done: acked)
        rest = (got[0], got[2], got[3])
        await asyncio.gather(*(settle(m, discard(m.message_id)) for m in rest))
        await asyncio.sleep(0.2)
    finally:
        await connection.close()
    # Then they left as acks and only the requeued one is left in the queue...
    assert await _depth_after_close(rabbitmq, name) == [b"1"]
    # ...and the requeued one did not split them: one multiple ack up to the last
    assert sent == [(got[3].delivery_tag, True)]


async def test_an_untracked_delivery_is_acked_alone(rabbitmq: BrokerHandle) -> None:
    # Given a queue consumed without tracking
    connection = await aio_pika.connect(rabbitmq.amqp_url)
    name = f"test.acks.{uuid.uuid4().hex[:8]}"
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name)
        await channel.default_exchange.publish(aio_pika.Message(b"a"), name)
        await channel.default_exchange.publish(aio_pika.Message(b"b"), name)
        first = await queue.get()
        second = await queue.get()
        # When only the second is acked through acks.ack
        await acks.ack(second)
        assert first.delivery_tag is not None
    finally:
        await connection.close()
    # Then the first comes back: no multiple ack was sent for an untracked channel
    assert await _depth_after_close(rabbitmq, name) == [b"a"]


async def test_frames_written_in_one_turn_leave_in_one_write_in_order() -> None:
    # Given a corked writer on a real socket
    received = bytearray()
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)
        done.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writes: list[bytes] = []
    transport_write = writer.transport.write

    def counted(data: bytes) -> None:
        writes.append(bytes(data))
        transport_write(data)

    writer.transport.write = counted  # type: ignore[method-assign]
    cork(writer)
    # When 50 frames are written in one turn, then one more in a later turn
    for n in range(50):
        writer.write(f"frame-{n};".encode())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    writer.write(b"last;")
    writer.close()  # sends what is gathered first
    await asyncio.wait_for(done.wait(), 5)
    server.close()
    # Then the 50 left in one write, the last in another, all in order
    assert len(writes) == 2
    assert bytes(received) == b"".join(f"frame-{n};".encode() for n in range(50)) + b"last;"
