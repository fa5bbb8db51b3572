"""Bad input never kills a worker: it is dead-lettered with a reason and answered FAILED.

Each case publishes raw AMQP (as a foreign client could) to ``wayang.tasks``, then checks the
dead letter in ``wayang.dead.demo.echo``, the FAILED result at the reply address, and that the
very next valid task on the same worker succeeds.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import aio_pika
import msgpack
import pytest

from wayang_mq import ErrorCode, Status, Task
from wayang_mq.harness import Fabric
from wayang_mq.model import Result, new_id, now_ms
from wayang_mq.names import RESULTS_EXCHANGE, TASKS_EXCHANGE, dead_queue
from wayang_mq.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Signer
from wayang_mq.wire import decode, encode
from workers.demo import Echo

MAX_BODY = 2048
REPLY = "reply.bad-input-test"
Build = Callable[[Fabric, str], tuple[bytes, dict[str, Any]]]


def _signed(fabric: Fabric, body: bytes) -> tuple[bytes, dict[str, Any]]:
    return body, fabric.signer.headers(body)


def _task(task_id: str, **changes: Any) -> Task:
    """A valid task for demo.echo, with ``changes`` applied unchecked (to build bad ones)."""
    task = Task.create("demo.echo", {"x": 1}, task_id=task_id, reply_to=REPLY)
    return task.model_copy(update=changes)


CASES: dict[str, tuple[Build, ErrorCode]] = {
    "unparseable body": (
        lambda f, tid: _signed(f, b"\xc1\xc1 not msgpack"),
        ErrorCode.INVALID_TASK,
    ),
    "body failing the schema": (
        lambda f, tid: _signed(f, msgpack.packb({"task_id": tid, "capability": "demo.echo"})),
        ErrorCode.INVALID_TASK,
    ),
    "missing signature": (lambda f, tid: (encode(_task(tid)), {}), ErrorCode.BAD_SIGNATURE),
    "forged signature": (
        lambda f, tid: (
            encode(_task(tid)),
            {**f.signer.headers(encode(_task(tid, token="other"))), KEY_ID_HEADER: f.signer.key_id},
        ),
        ErrorCode.BAD_SIGNATURE,
    ),
    "signature by an unknown key": (
        lambda f, tid: (encode(_task(tid)), Signer.generate().headers(encode(_task(tid)))),
        ErrorCode.BAD_SIGNATURE,
    ),
    "expired deadline": (
        lambda f, tid: _signed(
            f, encode(_task(tid, issued_at_ms=now_ms() - 5000, deadline_ms=now_ms() - 1000))
        ),
        ErrorCode.TOKEN_EXPIRED,
    ),
    "capability the queue does not serve": (
        lambda f, tid: _signed(f, encode(_task(tid, capability="demo.sleep"))),
        ErrorCode.NO_EXECUTOR,
    ),
    "oversized body": (
        lambda f, tid: _signed(
            f,
            encode(_task(tid, node_id="n" * 200, token="t" * 1000, input={"pad": "x" * MAX_BODY})),
        ),
        ErrorCode.OVERSIZED,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_is_dead_lettered_answered_and_the_worker_keeps_serving(
    fabric: Fabric, case: str
) -> None:
    build, code = CASES[case]
    task_id = new_id()
    body, headers = build(fabric, task_id)
    await fabric.purge("demo.echo")
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with (
        connection,
        fabric.worker([Echo()], max_body_bytes=MAX_BODY),
        fabric.dispatcher() as dispatcher,
    ):
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True)
        await replies.bind(RESULTS_EXCHANGE, REPLY)
        tasks = await channel.get_exchange(TASKS_EXCHANGE)
        # When a foreign client publishes the bad message
        await tasks.publish(
            aio_pika.Message(
                body,
                headers=headers,
                message_id=task_id,
                reply_to=REPLY,
                content_type="application/msgpack",
                type="wayang.task.v1",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="demo.echo",
        )
        # Then a FAILED result with the matching code arrives at its reply address
        reply = await _next(replies)
        result = decode(reply.body, Result)
        assert (result.task_id, result.status) == (task_id, Status.FAILED)
        assert result.error is not None and result.error.code is code
        # and the dead letter keeps the original body with the reason in its headers
        dead = await _next(await channel.get_queue(dead_queue("demo.echo"), ensure=False))
        assert dead.body == body
        assert dead.message_id == task_id
        assert dead.headers["wayang-error-code"] == str(code)
        assert dead.headers["wayang-error-message"]
        await dead.ack()
        # and the same worker answers the next valid task
        good = await dispatcher.run("demo.echo", {"after": case}, wait_s=10)
        assert good.status is Status.SUCCESS and good.output == {"after": case}


async def _next(
    queue: aio_pika.abc.AbstractQueue, timeout_s: float = 10.0
) -> aio_pika.abc.AbstractIncomingMessage:
    """Poll ``basic.get`` until a message is there."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        message = await queue.get(fail=False, no_ack=False)
        if message is not None:
            return message
        assert asyncio.get_running_loop().time() < deadline, f"nothing arrived on {queue.name}"
        await asyncio.sleep(0.05)


def test_signature_header_is_base64_of_64_bytes(fabric: Fabric) -> None:
    headers = fabric.signer.headers(b"body")
    assert len(base64.b64decode(headers[SIGNATURE_HEADER])) == 64
