"""Tasks flow from the dispatcher to worker daemons and results come back (real broker)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
import msgpack
import pytest

from wayang_mq import ErrorCode, Status, TaskState
from wayang_mq.errors import NoExecutor
from wayang_mq.harness import Fabric
from wayang_mq.names import EVENTS_EXCHANGE, RESULTS_EXCHANGE
from workers.demo import Echo, Fail, Sleep


@asynccontextmanager
async def tap(
    fabric: Fabric, exchange: str, *keys: str
) -> AsyncIterator[asyncio.Queue[aio_pika.abc.AbstractIncomingMessage]]:
    """An exclusive queue bound to ``exchange`` with ``keys``; yields what arrives on it."""
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        for key in keys:
            await queue.bind(exchange, key)
        await queue.consume(received.put, no_ack=True)
        yield received


async def test_2000_tasks_through_two_worker_daemons_get_one_result_each(fabric: Fabric) -> None:
    # Given two worker daemons serving demo.echo
    daemons = [
        fabric.spawn_worker(
            ["workers.demo:Echo"], executor_id=f"flow-{n}", args=["--concurrency", "16"]
        )
        for n in range(2)
    ]
    for daemon in daemons:
        daemon.wait_started()
    async with (
        fabric.dispatcher() as dispatcher,
        tap(fabric, RESULTS_EXCHANGE, dispatcher.reply_to) as results,
    ):
        # When 2,000 tasks with distinct node ids and tokens are submitted
        handles = await asyncio.gather(
            *(
                dispatcher.submit("demo.echo", {"i": i}, node_id=f"node-{i}", token=f"token-{i}")
                for i in range(2000)
            )
        )
        answered = await asyncio.gather(*(h.result(90) for h in handles))
        await asyncio.sleep(0.5)  # let any duplicate reach the tap
        raw_counts = collections.Counter()
        while not results.empty():
            raw_counts[msgpack.unpackb((await results.get()).body)["task_id"]] += 1
    # Then every task has exactly one result on the wire, correlated to its ids
    for i, (handle, result) in enumerate(zip(handles, answered, strict=True)):
        assert result.status is Status.SUCCESS
        assert (result.task_id, result.token, result.node_id) == (
            handle.task_id,
            f"token-{i}",
            f"node-{i}",
        )
        assert result.output == {"i": i}
    assert set(raw_counts) == {h.task_id for h in handles}
    assert set(raw_counts.values()) == {1}
    # and both daemons did part of the work
    assert {r.executor_id for r in answered} == {"flow-0", "flow-1"}
    fabric.stop_processes()


async def test_a_worker_runs_up_to_concurrency_tasks_at_once(fabric: Fabric) -> None:
    async with fabric.worker([Sleep()], concurrency=3), fabric.dispatcher() as dispatcher:
        handles = [await dispatcher.submit("demo.sleep", {"seconds": 0.6}) for _ in range(3)]
        results = [await h.result(30) for h in handles]
    # the three runs overlap in time: each started before any other finished
    spans = [(r.finished_at_ms - r.metrics["duration_ms"], r.finished_at_ms) for r in results]
    assert max(start for start, _ in spans) < min(end for _, end in spans)


async def test_registration_heartbeats_and_progress_are_published(fabric: Fabric) -> None:
    async with tap(fabric, EVENTS_EXCHANGE, "#") as events:
        worker = fabric.worker([Sleep()], executor_id="events-w", heartbeat_interval_s=0.3)
        async with worker, fabric.dispatcher() as dispatcher:
            result = await dispatcher.run("demo.sleep", {"seconds": 2.2}, wait_s=30)
        kinds: dict[str, list[dict]] = collections.defaultdict(list)
        while not events.empty():
            message = await events.get()
            kinds[message.type or ""].append(msgpack.unpackb(message.body))
    assert result.status is Status.SUCCESS
    assert [r["executor_id"] for r in kinds["wayang.registration.v1"]] == ["events-w"]
    progress = [p for p in kinds["wayang.progress.v1"] if p["task_id"] == result.task_id]
    assert [p["fraction"] for p in progress] == [0.0, pytest.approx(1 / 2.2), 1.0]
    beats = [b for b in kinds["wayang.heartbeat.v1"] if b["executor_id"] == "events-w"]
    assert any(result.task_id in b.get("in_flight", ()) for b in beats)


async def test_status_reports_running_with_progress_then_finished(fabric: Fabric) -> None:
    sleeper = Sleep()
    async with fabric.worker([sleeper]), fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 1.5})
        await _until(lambda: sleeper.status(handle.task_id).progress is not None)
        running = sleeper.status(handle.task_id)
        assert running.state is TaskState.RUNNING
        await handle.result(30)
        assert sleeper.status(handle.task_id).state is TaskState.FINISHED
        assert sleeper.status("never-seen").state is TaskState.UNKNOWN


async def test_cancel_ends_a_running_task_failed_cancelled(fabric: Fabric) -> None:
    sleeper = Sleep()
    async with fabric.worker([sleeper]), fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 30})
        await _until(lambda: sleeper.status(handle.task_id).state is TaskState.RUNNING)
        assert sleeper.cancel(handle.task_id, "test asked")
        result = await handle.result(10)
    assert result.status is Status.FAILED
    assert result.error is not None and result.error.code is ErrorCode.CANCELLED


async def test_execution_past_its_timeout_fails_with_timeout(fabric: Fabric) -> None:
    async with fabric.worker([Sleep()]), fabric.dispatcher() as dispatcher:
        result = await dispatcher.run("demo.sleep", {"seconds": 30}, timeout_s=0.3, wait_s=10)
    assert result.status is Status.FAILED
    assert result.error is not None
    assert (result.error.code, result.error.retryable) == (ErrorCode.TIMEOUT, True)


async def test_executor_errors_say_whether_they_are_retryable(fabric: Fabric) -> None:
    async with fabric.worker([Fail()]), fabric.dispatcher() as dispatcher:
        permanent = await dispatcher.run("demo.fail", {"mode": "permanent"}, wait_s=10)
        retryable = await dispatcher.run("demo.fail", {"mode": "retryable"}, wait_s=10)
    assert permanent.error is not None and not permanent.error.retryable
    assert retryable.error is not None and retryable.error.retryable
    assert permanent.error.code is ErrorCode.EXECUTOR_ERROR


async def test_a_capability_without_a_queue_is_a_typed_no_executor_error(fabric: Fabric) -> None:
    async with fabric.dispatcher() as dispatcher:
        with pytest.raises(NoExecutor, match=r"no\.such"):
            await dispatcher.submit("no.such", {})


async def test_output_msgpack_cannot_carry_is_an_invalid_result(fabric: Fabric) -> None:
    class Unsendable(Echo):
        async def execute(self, task):  # type: ignore[no-untyped-def]
            return {"x": object()}

    async with fabric.worker([Unsendable()]), fabric.dispatcher() as dispatcher:
        result = await dispatcher.run("demo.echo", {}, wait_s=10)
    assert result.error is not None and result.error.code is ErrorCode.INVALID_RESULT


async def _until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


async def test_recent_results_are_bounded_by_bytes_as_well_as_count(fabric: Fabric) -> None:
    # Given a worker whose recent-results budget is 8 KiB (a result over 1 KiB is not kept)
    class Sized(Echo):
        async def execute(self, task):  # type: ignore[no-untyped-def]
            return {"blob": "x" * task.input["size"]}

    executor = Sized()
    async with fabric.worker([executor], recent_results_bytes=8 * 1024), fabric.dispatcher() as d:
        big = await d.run("demo.echo", {"size": 4000}, wait_s=10)
        small = [await d.run("demo.echo", {"size": 100}, wait_s=10) for _ in range(20)]
        # Then the large result was never kept, the oldest small ones were evicted, and the
        # latest ones are still there to answer a redelivery
        assert executor.status(big.task_id).state is TaskState.UNKNOWN
        assert executor.status(small[0].task_id).state is TaskState.UNKNOWN
        assert executor.status(small[-1].task_id).state is TaskState.FINISHED
