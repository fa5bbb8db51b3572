"""Retries through the fixed-TTL tiers (real broker): only the final outcome is a result."""

from __future__ import annotations

import asyncio
import itertools

import aio_pika
import pytest

from wayang_mq import ErrorCode, Status
from wayang_mq.connect import management_client
from wayang_mq.declare import apply_topology
from wayang_mq.harness import Fabric
from wayang_mq.model import Result, RetryHints
from wayang_mq.names import EVENTS_EXCHANGE, RESULTS_EXCHANGE, dead_queue
from wayang_mq.topology import parse_topology
from wayang_mq.wire import decode
from workers.demo import Echo, Fail


async def _drain(queue: aio_pika.abc.AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    messages = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        messages.append(message)
    return messages


async def test_a_task_failing_twice_then_succeeding_ends_success_on_attempt_3(
    fabric: Fabric,
) -> None:
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection, fabric.worker([Fail()]), fabric.dispatcher() as dispatcher:
        channel = await connection.channel()
        attempts = await channel.declare_queue(exclusive=True)
        results = await channel.declare_queue(exclusive=True)
        await results.bind(RESULTS_EXCHANGE, dispatcher.reply_to)
        task = dispatcher.task(
            "demo.fail",
            {"mode": "retryable", "succeed_on_attempt": 3},
            retry=RetryHints(max_attempts=3, initial_backoff_ms=1000, backoff_multiplier=1.5),
        )
        await attempts.bind(EVENTS_EXCHANGE, f"attempt.{task.task_id}")
        final = await (await dispatcher.submit_task(task)).result(30)
        await asyncio.sleep(0.3)
        failed = [decode(m.body, Result) for m in await _drain(attempts)]
        answered = await _drain(results)
    # Then the one result is SUCCESS on attempt 3
    assert (final.status, final.attempt) == (Status.SUCCESS, 3)
    assert len(answered) == 1
    # and attempts 1 and 2 were events, not results
    assert [f.attempt for f in failed] == [1, 2]
    assert all(f.status is Status.FAILED for f in failed)
    # spaced by the 1 s tier (backoffs 1000 and 1500 ms both fit the 1 s tier, not the 5 s one)
    finished = [f.finished_at_ms for f in failed] + [final.finished_at_ms]
    gaps = [later - earlier for earlier, later in itertools.pairwise(finished)]
    assert all(1000 <= gap < 4000 for gap in gaps), gaps


async def test_a_permanent_error_is_not_retried(fabric: Fabric) -> None:
    async with fabric.worker([Fail()]), fabric.dispatcher() as dispatcher:
        result = await dispatcher.run(
            "demo.fail", {"mode": "permanent"}, retry=RetryHints(max_attempts=5), wait_s=10
        )
    assert (result.status, result.attempt) == (Status.FAILED, 1)
    assert result.error is not None and result.error.code is ErrorCode.EXECUTOR_ERROR


async def test_exhausted_retries_end_failed_and_stay_in_the_dead_queue(fabric: Fabric) -> None:
    await fabric.purge("demo.fail")
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection, fabric.worker([Fail()]), fabric.dispatcher() as dispatcher:
        result = await dispatcher.run(
            "demo.fail",
            {"mode": "retryable", "message": "still broken"},
            retry=RetryHints(max_attempts=2, initial_backoff_ms=100),
            wait_s=30,
        )
        channel = await connection.channel()
        dead = await _drain(await channel.get_queue(dead_queue("demo.fail")))
    assert (result.status, result.attempt) == (Status.FAILED, 2)
    assert result.error is not None and result.error.code is ErrorCode.RETRIES_EXHAUSTED
    assert "still broken" in result.error.message
    assert result.error.details["last_error"]["code"] == "executor_error"
    assert [m.message_id for m in dead] == [result.task_id]
    assert dead[0].headers["wayang-error-code"] == "retries_exhausted"


async def test_a_full_retry_tier_requeues_the_task_and_the_worker_keeps_serving(
    fabric: Fabric,
) -> None:
    # Given a retry tier that is full (max_length 1, and the broker already refuses more)
    topology = parse_topology(
        {
            "retry_tiers": [{"name": "jammed", "ttl_ms": 600_000, "max_length": 1}],
            "capabilities": {"demo.fail": {"delivery_limit": 2}},
        },
        source="test",
    )
    await apply_topology(topology, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    try:
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            tiers = await channel.get_exchange("wayang.retry")
            # max-length overshoots by one with reject-publish: park until the broker nacks
            with pytest.raises(aio_pika.exceptions.DeliveryError):
                for _ in range(5):
                    await tiers.publish(aio_pika.Message(b"parked"), "retry.jammed.parked")
            await fabric.purge("demo.fail")
            worker = fabric.worker([Fail(), Echo()], retry_tiers=topology.retry_tiers)
            async with worker, fabric.dispatcher() as dispatcher:
                # When a retryable failure cannot be parked in the tier (the broker nacks)
                doomed = await dispatcher.submit(
                    "demo.fail", {"mode": "retryable"}, retry=RetryHints(max_attempts=3)
                )
                # Then the delivery goes back to its queue each time, until the queue's
                # delivery limit dead-letters it, and the worker keeps serving meanwhile
                dead_queue_ = await channel.get_queue(dead_queue("demo.fail"))
                dead = await _poll(dead_queue_)
                assert dead.message_id == doomed.task_id
                assert dead.headers["x-death"][0]["reason"] == "delivery_limit"
                ok = await dispatcher.run("demo.echo", {"still": "serving"}, wait_s=10)
                assert ok.status is Status.SUCCESS
            await (await channel.get_queue("wayang.retry.jammed")).purge()
    finally:
        # Restore the default topology's policies for the tests that follow.
        await apply_topology(
            fabric.topology, fabric.endpoint.amqp_url, management_client(fabric.endpoint)
        )


async def _poll(
    queue: aio_pika.abc.AbstractQueue, timeout_s: float = 30.0
) -> aio_pika.abc.AbstractIncomingMessage:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (message := await queue.get(fail=False, no_ack=True)) is None:
        assert asyncio.get_running_loop().time() < deadline, f"nothing arrived on {queue.name}"
        await asyncio.sleep(0.1)
    return message
