"""Retries through the fixed-TTL tiers (real broker): only the final outcome is a result."""

from __future__ import annotations

import asyncio
import itertools

import aio_pika

from wayang_mq import ErrorCode, Status
from wayang_mq.harness import Fabric
from wayang_mq.model import Result, RetryHints
from wayang_mq.names import EVENTS_EXCHANGE, RESULTS_EXCHANGE, dead_queue
from wayang_mq.wire import decode
from workers.demo import Fail


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
