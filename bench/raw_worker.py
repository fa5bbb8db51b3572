"""The raw aio-pika baseline worker: what the AMQP client alone does for one echo task.

Consume a quorum queue (prefetch N, each delivery handled in its own asyncio task, as the
wayang-mq worker does), publish the reply with publisher confirms, and ack only after the
broker confirmed it. msgpack in and out, persistent messages, nothing else: no signing, no
schema, no logging. Run ``python -m bench.raw_worker``; the broker URL comes from
``BENCH_AMQP_URL``, so the password never shows in ``ps``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import aio_pika
import msgpack
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

TASK_EXCHANGE = "bench.raw.tasks"
RESULT_EXCHANGE = "bench.raw.results"
TASK_QUEUE = "bench.raw.echo"
TASK_ROUTING_KEY = "bench.echo"


async def _handle(message: AbstractIncomingMessage, results: AbstractExchange) -> None:
    """Decode, echo, publish the reply and wait for its confirm, then ack."""
    task = msgpack.unpackb(message.body)
    body = msgpack.packb({"id": message.correlation_id, "output": task}, use_bin_type=True)
    reply = aio_pika.Message(
        body,
        content_type="application/msgpack",
        correlation_id=message.correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await results.publish(reply, message.reply_to or "")
    await message.ack()


async def serve(url: str, prefetch: int) -> None:
    """Consume until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    connection = await aio_pika.connect_robust(url, client_properties={"connection_name": "raw"})
    handlers: set[asyncio.Task[None]] = set()
    try:
        publish_channel = await connection.channel(publisher_confirms=True)
        results = await publish_channel.get_exchange(RESULT_EXCHANGE, ensure=False)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=prefetch)
        queue = await consume_channel.get_queue(TASK_QUEUE, ensure=False)

        async def on_message(message: AbstractIncomingMessage) -> None:
            handler = asyncio.create_task(_handle(message, results))
            handlers.add(handler)
            handler.add_done_callback(handlers.discard)

        await queue.consume(on_message)
        print("raw worker consuming", flush=True)
        await stop.wait()
    finally:
        await connection.close()


def main() -> None:
    """Entry point: ``python -m bench.raw_worker --prefetch N``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefetch", type=int, default=16, help="deliveries held at once")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    main = serve(os.environ["BENCH_AMQP_URL"], args.prefetch)
    if args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


if __name__ == "__main__":
    main()
