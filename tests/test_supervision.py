"""The dispatcher's own deadline and heartbeat supervision (real broker, real daemons)."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest

from wayang_mq import ErrorCode, Status
from wayang_mq.client.dispatcher import Dispatcher, TaskHandle
from wayang_mq.client.supervisor import SupervisionConfig
from wayang_mq.core.model import Result, Task
from wayang_mq.core.names import RESULTS_EXCHANGE, task_queue
from wayang_mq.core.wire import decode
from wayang_mq.testing.harness import Fabric, WorkerProcess, eventually

FAST = SupervisionConfig(deadline_grace_ms=300, check_interval_s=0.2, status_wait_s=0.3)


@pytest.fixture(autouse=True)
def _daemons_stopped(fabric: Fabric) -> Iterator[None]:
    """Every worker daemon a test spawns is stopped, whatever the test's outcome."""
    yield
    fabric.stop_processes()


@pytest.fixture
async def amqp(fabric: Fabric) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain channel of our own, to watch the wire and read queue counts."""
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        yield await connection.channel()


async def _nothing_ready(channel: aio_pika.abc.AbstractChannel, capability: str) -> bool:
    """No message waits in the capability's queue (a passive declare reads the exact count
    of ready ones; delivered but unacked ones are not counted)."""
    queue = await channel.declare_queue(task_queue(capability), passive=True)
    return queue.declaration_result.message_count == 0


async def test_a_task_stuck_behind_a_longer_one_times_out_at_its_own_deadline(
    fabric: Fabric,
) -> None:
    # Given no worker for demo.sleep, and a 1 s task queued behind a 60 s one: the broker
    # expires messages only at the head, so it would not expire the short one in time
    await fabric.purge("demo.sleep")
    async with fabric.dispatcher(supervision=FAST) as dispatcher:
        head = await dispatcher.submit("demo.sleep", {"seconds": 0}, queue_timeout_s=60)
        short = await dispatcher.submit("demo.sleep", {"seconds": 0}, queue_timeout_s=1)
        marker = await dispatcher.submit("demo.sleep", {"seconds": 0}, queue_timeout_s=60)
        # When its deadline passes, Then the dispatcher ends it FAILED timeout by itself
        result = await short.result(10)
        assert result.status is Status.FAILED
        assert result.error is not None and result.error.code is ErrorCode.TIMEOUT
        assert result.executor_id.startswith("dispatcher:")
        # and it never runs once a worker comes: a single-slot worker takes the queue in
        # order, so once the marker queued after it is answered, the short one is behind us
        daemon = await _single_slot(fabric, "late-sleeper")
        assert (await head.result(20)).status is Status.SUCCESS
        assert (await marker.result(20)).status is Status.SUCCESS
    assert f"task.started task_id={short.task_id}" not in daemon.log()
    await fabric.purge("demo.sleep")


async def test_a_hung_executors_task_is_reassigned_and_its_late_result_fenced(
    fabric: Fabric, amqp: aio_pika.abc.AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wayang_mq")
    await fabric.purge("demo.sleep")
    async with fabric.dispatcher(supervision=FAST) as dispatcher:
        wire = await amqp.declare_queue(exclusive=True)
        await wire.bind(RESULTS_EXCHANGE, dispatcher.reply_to)
        # Given a single-slot worker running a task that asks for heartbeat supervision
        hung = await _single_slot(fabric, "hb-hung")
        handle = await dispatcher.submit("demo.sleep", {"seconds": 3}, heartbeat_timeout_s=2.5)
        await hung.until_logged(f"task.started task_id={handle.task_id}")
        # When its executor hangs (SIGSTOP: its connection stays open, its heartbeats stop)
        hung.signal(signal.SIGSTOP)
        # and a second single-slot worker, busy with a blocker, holds one more delivery
        blocker = await dispatcher.submit("demo.sleep", {"seconds": 60})
        other = await _single_slot(fabric, "hb-other", prefetch=2)
        fresh = await _reassigned(dispatcher, handle, caplog)
        await other.until_logged(f"task.started task_id={blocker.task_id}")
        # Then the task was re-dispatched as attempt 2 with a new token, and the second
        # worker holds it (the hung one's only prefetch slot is still taken)
        assert (fresh.attempt, fresh.token != handle.task.token) == (2, True)
        await eventually(
            lambda: _nothing_ready(amqp, "demo.sleep"), what="attempt 2 taken by hb-other"
        )
        # When the hung executor wakes up and answers its now stale attempt first
        hung.signal(signal.SIGCONT)
        on_wire: list[Result] = []
        await eventually(
            lambda: _answered_by(wire, on_wire, hung), what="the stale result on the wire"
        )
        # and only then the new attempt may run
        assert await dispatcher.cancel(blocker.task_id)
        result = await handle.result(30)
    # Then the caller got attempt 2's SUCCESS, with the new token, from the second worker
    assert (result.status, result.attempt, result.executor_id) == (
        Status.SUCCESS,
        2,
        other.executor_id,
    )
    assert result.token == fresh.token
    # and the stale SUCCESS, on the wire before attempt 2 could even start, carried the old
    # token and was not handed out
    stale = [r for r in on_wire if r.task_id == handle.task_id]
    assert [(r.executor_id, r.attempt, r.token, r.status) for r in stale] == [
        (hung.executor_id, 1, handle.task.token, Status.SUCCESS)
    ]
    assert f"event=result.fenced task_id={handle.task_id}" in caplog.text


async def _single_slot(fabric: Fabric, executor_id: str, prefetch: int = 1) -> WorkerProcess:
    """A demo.sleep daemon running one task at a time and holding ``prefetch`` deliveries."""
    daemon = fabric.spawn_worker(
        ["wayang_workers.demo:Sleep"],
        executor_id=executor_id,
        args=["--concurrency", "1", "--prefetch", str(prefetch), "--grace", "2"],
    )
    await daemon.until_logged("event=worker.started")
    return daemon


async def _answered_by(
    wire: aio_pika.abc.AbstractQueue, seen: list[Result], daemon: WorkerProcess
) -> bool:
    """Collect the results on the wire into ``seen``; True once ``daemon`` answered one."""
    while (message := await wire.get(fail=False, no_ack=True)) is not None:
        seen.append(decode(message.body, Result))
    return any(result.executor_id == daemon.executor_id for result in seen)


async def _reassigned(
    dispatcher: Dispatcher, handle: TaskHandle, caplog: pytest.LogCaptureFixture
) -> Task:
    """Until the dispatcher logs the reassignment; the attempt it dispatched instead."""
    await eventually(
        lambda: f"event=task.reassigned task_id={handle.task_id}" in caplog.text,
        what="the reassignment",
    )
    return next(t for t in dispatcher.pending_tasks() if t.task_id == handle.task_id)
