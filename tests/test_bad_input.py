"""Bad input never kills a worker: it is dead-lettered with a reason, and answered FAILED only
when the task itself verified (docs/security.md §6).

Each case publishes raw AMQP (as a foreign client could) to ``wayang.tasks``, then checks the
dead letter in ``wayang.dead.<capability>``, the FAILED result at the reply address for a task
that verified (and none for a body nobody could verify), and that the very next valid task on
the same worker succeeds. When the
broker will not take the worker's dead-letter copy, the delivery is rejected instead, and the
queue's own (at-least-once) dead-lettering keeps the task.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import msgpack
import pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from wayang_workers.demo import Echo

from wayang_mq import ErrorCode, Executor, Status, Task
from wayang_mq.amqp.connect import management_client
from wayang_mq.core.model import JsonLike, Result, new_id, now_ms
from wayang_mq.core.names import RESULTS_EXCHANGE, TASKS_EXCHANGE, dead_queue, task_queue
from wayang_mq.core.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Signer
from wayang_mq.core.wire import (
    DEAD_LETTERED_BY_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    decode,
    encode,
)
from wayang_mq.ops.deadletters import list_dead_letters
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.plugin import BrokerHandle
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import parse_topology

MAX_BODY = 2048
REPLY = "reply.bad-input-test"
GARBAGE = b"\xc1\xc1 not msgpack"
Build = Callable[[Fabric, str], tuple[bytes, dict[str, Any]]]


def _signed(fabric: Fabric, body: bytes) -> tuple[bytes, dict[str, Any]]:
    return body, fabric.signer.headers(body)


def _task(task_id: str, **changes: Any) -> Task:
    """A valid task for demo.echo, with ``changes`` applied unchecked (to build bad ones)."""
    task = Task.create("demo.echo", {"x": 1}, task_id=task_id, reply_to=REPLY)
    return task.model_copy(update=changes)


#: case -> how to build it, its code, and whether it is answered at its reply address
CASES: dict[str, tuple[Build, ErrorCode, bool]] = {
    "unparseable body": (
        lambda f, tid: _signed(f, GARBAGE),
        ErrorCode.INVALID_TASK,
        False,
    ),
    "body failing the schema": (
        lambda f, tid: _signed(f, msgpack.packb({"task_id": tid, "capability": "demo.echo"})),
        ErrorCode.INVALID_TASK,
        False,
    ),
    "missing signature": (
        lambda f, tid: (encode(_task(tid)), {}),
        ErrorCode.BAD_SIGNATURE,
        False,
    ),
    "forged signature": (
        lambda f, tid: (
            encode(_task(tid)),
            {**f.signer.headers(encode(_task(tid, token="other"))), KEY_ID_HEADER: f.signer.key_id},
        ),
        ErrorCode.BAD_SIGNATURE,
        False,
    ),
    "signature by an unknown key": (
        lambda f, tid: (encode(_task(tid)), Signer.generate().headers(encode(_task(tid)))),
        ErrorCode.UNKNOWN_KEY,
        False,
    ),
    "expired deadline": (
        lambda f, tid: _signed(
            f, encode(_task(tid, issued_at_ms=now_ms() - 5000, deadline_ms=now_ms() - 1000))
        ),
        ErrorCode.TOKEN_EXPIRED,
        True,
    ),
    "capability the queue does not serve": (
        lambda f, tid: _signed(f, encode(_task(tid, capability="demo.sleep"))),
        ErrorCode.NO_EXECUTOR,
        True,
    ),
    "oversized body": (
        lambda f, tid: _signed(
            f,
            encode(_task(tid, node_id="n" * 200, token="t" * 1000, input={"pad": "x" * MAX_BODY})),
        ),
        ErrorCode.OVERSIZED,
        False,
    ),
}


async def _next(queue: AbstractQueue) -> AbstractIncomingMessage:
    """The next message on ``queue`` (``basic.get``, unacked), as soon as there is one."""
    got: list[AbstractIncomingMessage] = []

    async def arrived() -> bool:
        message = await queue.get(fail=False, no_ack=False)
        if message is not None:
            got.append(message)
        return bool(got)

    await eventually(arrived, what=f"a message on {queue.name}")
    return got[0]


async def _bound_queue(channel: AbstractChannel, routing_key: str) -> AbstractQueue:
    """A private queue receiving what ``wayang.results`` routes with ``routing_key``."""
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(RESULTS_EXCHANGE, routing_key)
    return queue


async def _publish_raw(
    channel: AbstractChannel, capability: str, message: aio_pika.Message
) -> None:
    """Publish to ``wayang.tasks`` as a foreign client could; confirmed when the channel is."""
    tasks = await channel.get_exchange(TASKS_EXCHANGE)
    await tasks.publish(message, routing_key=capability)


def _publish_bare(amqp_url: str, capability: str, body: bytes) -> None:
    """Publish ``body`` with no AMQP properties at all, confirmed (blocking: run it in a
    thread). pika, as a foreign client: aio-pika always gives a message a ``message_id``."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(TASKS_EXCHANGE, capability, body, pika.BasicProperties())
    finally:
        connection.close()


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_is_dead_lettered_answered_only_if_verified_and_the_worker_keeps_serving(
    fabric: Fabric, case: str
) -> None:
    build, code, answered = CASES[case]
    task_id = new_id()
    body, headers = build(fabric, task_id)
    await fabric.purge("demo.echo")
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with (
        connection,
        # one delivery at a time: the valid task after the bad one is a barrier
        fabric.worker([Echo()], max_body_bytes=MAX_BODY, concurrency=1),
        fabric.dispatcher() as dispatcher,
    ):
        channel = await connection.channel(publisher_confirms=True)
        replies = await _bound_queue(channel, REPLY)
        # When a foreign client publishes the bad message
        await _publish_raw(
            channel,
            "demo.echo",
            aio_pika.Message(
                body,
                headers=headers,
                message_id=task_id,
                reply_to=REPLY,
                content_type="application/msgpack",
                type="wayang.task.v1",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
        )
        if answered:
            # Then a task that verified gets a FAILED result with its code at its reply address
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
        if not answered:
            # and a body nobody could trust was answered to nobody: its sender chose that
            # reply address (docs/security.md §6)
            assert await replies.get(fail=False, no_ack=True) is None


async def test_garbage_with_no_properties_is_dead_lettered_under_a_generated_id_and_not_answered(
    fabric: Fabric,
) -> None:
    await fabric.purge("demo.echo")
    await fabric.purge_reaper()
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with (
        connection,
        # one delivery at a time: the task after the garbage is delivered once the garbage
        # was settled, so its result is a barrier for anything the garbage could have caused
        fabric.worker([Echo()], executor_id="bad-no-props", concurrency=1) as worker,
        fabric.dispatcher() as dispatcher,
    ):
        channel = await connection.channel(publisher_confirms=True)
        every_result = await _bound_queue(channel, "#")
        # Given garbage bytes without any AMQP property: no message id, no reply address, no
        # signature, no type
        await asyncio.to_thread(_publish_bare, fabric.endpoint.amqp_url, "demo.echo", GARBAGE)
        # When a valid task follows it on the same single-slot worker
        good = await dispatcher.run("demo.echo", {"after": "no-props"}, wait_s=20)
        # Then the worker kept serving: the valid task succeeds
        assert good.status is Status.SUCCESS and good.output == {"after": "no-props"}
        # and no result was published anywhere for the garbage: the only result on
        # wayang.results up to the valid task's is the valid task's
        first = await _next(every_result)
        assert decode(first.body, Result).task_id == good.task_id
        assert await every_result.get(fail=False, no_ack=True) is None
        # and the garbage waits in wayang.dead.demo.echo under a generated id, with its reason
        dead = await _next(await channel.get_queue(dead_queue("demo.echo"), ensure=False))
        assert dead.body == GARBAGE
        assert dead.message_id is not None and dead.message_id.startswith("unknown-")
        assert dead.correlation_id == dead.message_id
        assert dead.reply_to is None
        assert dead.headers[ERROR_CODE_HEADER] == str(ErrorCode.BAD_SIGNATURE)
        assert dead.headers[ERROR_MESSAGE_HEADER]
        assert dead.headers[DEAD_LETTERED_BY_HEADER] == worker.executor_id
        await dead.ack()
    await fabric.purge("demo.echo")
    await fabric.purge_reaper()  # the worker's copy, answered by nobody: nobody could be


# -- a dead-letter copy the broker refuses ---------------------------------------------------------

REFUSED = "bad.refused"
REFUSED_TOPOLOGY = f'[capabilities."{REFUSED}"]\n'
REFUSE_POLICY = "test.refuse-dead-letters"
# How long the broker's at-least-once dead-lettering waits for a target queue's confirm before
# it publishes a dead letter there again (RabbitMQ's default is 2 minutes). 3.10 reads the
# first key, later versions the second; a queue's dead-letter worker reads it when it starts.
CONFIRM_TIMEOUT_KEYS = (
    "dead_letter_worker_publisher_confirm_timeout",
    "dead_letter_worker_publisher_confirm_timeout_ms",
)


class Refused(Executor):
    """Serves ``bad.refused``: answers with its input."""

    serves = (REFUSED,)

    async def execute(self, task: Task) -> JsonLike:
        return task.input


@contextlib.contextmanager
def _dead_letters_resent_every(rabbitmq: BrokerHandle, ms: int) -> Iterator[None]:
    """Within the block, quorum queues created now resend an unconfirmed dead letter every
    ``ms`` instead of every 2 minutes; the broker's settings are put back afterwards."""
    previous = {
        key: rabbitmq.ctl("eval", f"application:get_env(rabbit, {key}).").strip()
        for key in CONFIRM_TIMEOUT_KEYS
    }
    for key in CONFIRM_TIMEOUT_KEYS:
        rabbitmq.ctl("eval", f"application:set_env(rabbit, {key}, {ms}).")
    try:
        yield
    finally:
        for key, value in previous.items():
            if value.startswith("{ok,"):
                rabbitmq.ctl("eval", f"application:set_env(rabbit, {key}, {value[4:-1]}).")
            else:
                rabbitmq.ctl("eval", f"application:unset_env(rabbit, {key}).")


def _held_for_dead_lettering(rabbitmq: BrokerHandle, queue: str) -> int:
    """Dead letters a quorum queue still holds because a target queue has not confirmed them."""
    out = rabbitmq.ctl(
        "eval",
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)),'
        " proplists:get_value(messages_dlx, rabbit_amqqueue:info(Q, [messages_dlx])).",
    )
    return int(out.strip())


@contextlib.asynccontextmanager
async def _refusing_dead_queue(fabric: Fabric, channel: AbstractChannel) -> AsyncIterator[None]:
    """``wayang.dead.bad.refused`` refuses every publish while the block runs.

    A higher-priority policy (dead queues have none of their own) sets ``max-length`` 0 with
    ``reject-publish``. A quorum queue refuses only once it is past its limit, so it is given
    one filler message first; taking the filler out makes it accept again.
    """
    management = management_client(fabric.endpoint)
    dead = dead_queue(REFUSED)
    default_exchange = channel.default_exchange
    await default_exchange.publish(aio_pika.Message(b"filler"), routing_key=dead)
    await asyncio.to_thread(
        management.put_policy,
        REFUSE_POLICY,
        pattern=f"^{dead.replace('.', '[.]')}$",
        definition={"max-length": 0, "overflow": "reject-publish"},
        priority=100,
    )
    try:

        async def refused() -> bool:
            # the broker applies a policy shortly after storing it: probe until it refuses
            try:
                await default_exchange.publish(aio_pika.Message(b"probe"), routing_key=dead)
            except aio_pika.exceptions.DeliveryError:  # basic.nack: refused
                return True
            return False

        await eventually(refused, what=f"{dead} refusing publishes")
        yield
    finally:
        await asyncio.to_thread(management.delete_policy, REFUSE_POLICY)


async def test_a_dead_letter_copy_the_broker_refuses_is_rejected_and_kept_by_the_queue(
    fabric: Fabric, rabbitmq: BrokerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    task_id, reply_to = new_id(), f"reply.bad-refused-{new_id()[:8]}"
    # (the broker resends unconfirmed dead letters every second, for queues created now)
    with _dead_letters_resent_every(rabbitmq, 1000):
        # Given a capability whose queue dead-letters at least once (its default policy)...
        extra = parse_topology(tomllib.loads(REFUSED_TOPOLOGY), source="test_bad_input")
        await apply_topology(extra, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
        await fabric.purge(REFUSED)
        await fabric.purge_reaper()
        caplog.set_level(logging.INFO, logger="wayang_mq")
        try:
            await _refused_copy_is_kept(fabric, rabbitmq, caplog, task_id, reply_to)
        finally:
            await fabric.purge(REFUSED)
            await fabric.purge_reaper()


async def _refused_copy_is_kept(
    fabric: Fabric,
    rabbitmq: BrokerHandle,
    caplog: pytest.LogCaptureFixture,
    task_id: str,
    reply_to: str,
) -> None:
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await _bound_queue(channel, reply_to)
        # ... and whose dead queue refuses every publish; a worker and a reaper run
        async with (
            _refusing_dead_queue(fabric, await connection.channel(publisher_confirms=True)),
            fabric.reaper(prefetch=1) as reaper,
            fabric.worker([Refused()], executor_id="bad-refused", concurrency=1),
            fabric.dispatcher() as dispatcher,
        ):
            # When a foreign client publishes signed garbage with a reply address
            await _publish_raw(
                channel,
                REFUSED,
                aio_pika.Message(
                    GARBAGE,
                    headers=fabric.signer.headers(GARBAGE),
                    message_id=task_id,
                    reply_to=reply_to,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
            )
            # Then the worker could not keep its copy, and says it rejected the delivery
            await eventually(
                lambda: f"event=dead_letter.rejected task_id={task_id}" in caplog.text,
                what="the worker logging dead_letter.rejected",
            )
            # and the queue dead-lettered the delivery itself (reason "rejected"): the reaper
            # sees it and sets it aside, answering nobody (nobody could verify the body)
            await eventually(
                lambda: reaper.handled(task_id) is not None, what="the reaper seeing it"
            )
            assert await replies.get(fail=False) is None
            # and the worker keeps serving
            good = await dispatcher.run(REFUSED, {"after": "refused"}, wait_s=20)
            assert good.status is Status.SUCCESS and good.output == {"after": "refused"}
            # and while the dead queue refuses, the task queue holds the dead letter
            # (at-least-once dead-lettering: until every target queue has confirmed it)
            held = await asyncio.to_thread(_held_for_dead_lettering, rabbitmq, task_queue(REFUSED))
            assert held == 1
            # When the dead queue takes messages again (its filler is taken out)
            await (await channel.get_queue(dead_queue(REFUSED), ensure=False)).purge()

            # Then the broker delivers the dead letter there, with its reason
            async def landed() -> bool:
                letters = await list_dead_letters(fabric.endpoint.amqp_url, REFUSED)
                return (task_id, "rejected") in {(d.task_id, d.broker_reason) for d in letters}

            await eventually(landed, what=f"{task_id} reaching {dead_queue(REFUSED)}")


def test_signature_header_is_base64_of_64_bytes(fabric: Fabric) -> None:
    headers = fabric.signer.headers(b"body")
    assert len(base64.b64decode(headers[SIGNATURE_HEADER])) == 64
