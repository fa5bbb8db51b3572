"""Retries through the fixed-TTL tiers (real broker): only the final outcome is a result."""

from __future__ import annotations

import base64
import itertools
import logging
from collections.abc import Callable
from typing import TypeVar

import aio_pika
import pytest
from wayang_workers.demo import Echo, Fail

from wayang_mq import ErrorCode, Status
from wayang_mq.amqp.connect import management_client
from wayang_mq.core.envelope import ATTEMPT_HEADER
from wayang_mq.core.model import AttemptRecord, Result, RetryHints, Task
from wayang_mq.core.names import (
    EVENTS_EXCHANGE,
    RESULTS_EXCHANGE,
    RETRY_EXCHANGE,
    dead_queue,
    retry_routing_key,
)
from wayang_mq.core.wire import decode
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import RetryTier, parse_topology

T = TypeVar("T")


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
        retried = await channel.declare_queue(exclusive=True)
        await retried.bind(RETRY_EXCHANGE, retry_routing_key("*", "demo.fail"))
        # Given a task that fails twice (retryable), with backoffs of 1000 and 1500 ms
        task = dispatcher.task(
            "demo.fail",
            {"mode": "retryable", "succeed_on_attempt": 3},
            retry=RetryHints(max_attempts=3, initial_backoff_ms=1000, backoff_multiplier=1.5),
        )
        await attempts.bind(EVENTS_EXCHANGE, f"attempt.{task.task_id}")
        # When it runs
        final = await (await dispatcher.submit_task(task)).result(30)
        # Then the one result is SUCCESS on attempt 3
        assert (final.status, final.attempt) == (Status.SUCCESS, 3)
        failed: list[Result] = []
        await eventually(
            lambda: _read(attempts, failed, lambda m: decode(m.body, Result), 2),
            what="two attempt events",
        )
        answered = await _drain(results)
        # (each retry is the issuer's task, unchanged: attempt 1 in its signed bytes, and the
        # worker's attempt record saying which attempt it now is)
        through = [
            (m.routing_key, _record(m).attempt, decode(m.body, Task).attempt)
            for m in await _drain(retried)
        ]
    # and it was the only result: attempts 1 and 2 were events
    assert len(answered) == 1
    assert [f.attempt for f in failed] == [1, 2]
    assert all(f.status is Status.FAILED for f in failed)
    # and attempts 2 and 3 went through the 1 s tier (the longest tier not longer than
    # their 1000 and 1500 ms backoffs), not the 5 s one
    assert through == [("retry.1s.demo.fail", 2, 1), ("retry.1s.demo.fail", 3, 1)]
    # so each began at least that tier's delay after the attempt before it failed
    delay_ms = next(t.ttl_ms for t in fabric.topology.retry_tiers if t.name == "1s")
    finished = [f.finished_at_ms for f in failed] + [final.finished_at_ms]
    assert all(b - a >= delay_ms for a, b in itertools.pairwise(finished)), finished


async def test_a_permanent_error_is_not_retried(fabric: Fabric) -> None:
    # Given a task allowed 5 attempts, When its executor raises a permanent error
    async with fabric.worker([Fail()]), fabric.dispatcher() as dispatcher:
        result = await dispatcher.run(
            "demo.fail", {"mode": "permanent"}, retry=RetryHints(max_attempts=5), wait_s=10
        )
    # Then the first attempt's failure is the result: no retry
    assert (result.status, result.attempt) == (Status.FAILED, 1)
    assert result.error is not None and result.error.code is ErrorCode.EXECUTOR_ERROR


async def test_exhausted_retries_end_failed_and_stay_in_the_dead_queue(fabric: Fabric) -> None:
    await fabric.purge("demo.fail")
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection, fabric.worker([Fail()]), fabric.dispatcher() as dispatcher:
        # Given a task allowed 2 attempts, When both fail (retryable)
        result = await dispatcher.run(
            "demo.fail",
            {"mode": "retryable", "message": "still broken"},
            retry=RetryHints(max_attempts=2, initial_backoff_ms=100),
            wait_s=30,
        )
        channel = await connection.channel()
        dead = await _drain(await channel.get_queue(dead_queue("demo.fail")))
    # Then the result is FAILED retries_exhausted, carrying the last error
    assert (result.status, result.attempt) == (Status.FAILED, 2)
    assert result.error is not None and result.error.code is ErrorCode.RETRIES_EXHAUSTED
    assert "still broken" in result.error.message
    assert result.error.details["last_error"]["code"] == "executor_error"
    # and the task is kept in its dead queue with the reason
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
                held: list[aio_pika.abc.AbstractIncomingMessage] = []
                await eventually(
                    lambda: _read(dead_queue_, held, lambda m: m, 1),
                    what="the dead letter in wayang.dead.demo.fail",
                )
                [dead] = held
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


async def _read(
    queue: aio_pika.abc.AbstractQueue,
    into: list[T],
    read: Callable[[aio_pika.abc.AbstractIncomingMessage], T],
    count: int,
) -> bool:
    """Take what ``queue`` holds into ``into`` (each message through ``read``); True once
    it holds ``count``."""
    into.extend(read(message) for message in await _drain(queue))
    return len(into) >= count


async def test_a_retry_no_tier_queue_takes_ends_with_the_tasks_final_answer(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker told of a retry tier the broker has no queue for (a topology not applied)
    missing = RetryTier(name="missing", ttl_ms=1000)
    caplog.set_level(logging.INFO, logger="wayang_mq")
    async with fabric.worker([Fail()], retry_tiers=(missing,)), fabric.dispatcher() as dispatcher:
        # When a retryable failure with attempts left would go to that tier
        result = await dispatcher.run(
            "demo.fail",
            {"mode": "retryable"},
            retry=RetryHints(max_attempts=3, initial_backoff_ms=1000),
            wait_s=30,
        )
    # Then the broker's refusal is reported, and the task ends with its own failure, answered
    # instead of stranded or retried forever
    assert "event=retry.unroutable" in caplog.text
    assert result.status is Status.FAILED and result.attempt == 1
    assert result.error is not None and result.error.code is ErrorCode.EXECUTOR_ERROR


def _record(message: aio_pika.abc.AbstractIncomingMessage) -> AttemptRecord:
    """The attempt record a retry carries in its headers."""
    encoded = (message.headers or {})[ATTEMPT_HEADER]
    assert isinstance(encoded, str)
    return decode(base64.b64decode(encoded), AttemptRecord)
