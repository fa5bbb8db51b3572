"""The dispatcher's own deadline and heartbeat supervision (real broker, real daemons)."""

from __future__ import annotations

import asyncio
import signal
import time

import aio_pika

from wayang_mq import ErrorCode, Status
from wayang_mq.harness import Fabric, WorkerProcess
from wayang_mq.model import Result
from wayang_mq.names import RESULTS_EXCHANGE
from wayang_mq.supervisor import SupervisionConfig
from wayang_mq.wire import decode

FAST = SupervisionConfig(deadline_grace_ms=300, check_interval_s=0.2, status_wait_s=0.3)


async def _until_logged(daemon: WorkerProcess, text: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{daemon.executor_id} never logged {text!r}"
        await asyncio.sleep(0.05)


async def test_a_task_stuck_behind_a_longer_one_times_out_at_its_own_deadline(
    fabric: Fabric,
) -> None:
    # Given no worker for demo.sleep, and a 1 s task queued behind a 60 s one: the broker
    # expires messages only at the head, so it would not expire the short one in time
    await fabric.purge("demo.sleep")
    async with fabric.dispatcher(supervision=FAST) as dispatcher:
        head = await dispatcher.submit("demo.sleep", {"seconds": 0}, queue_timeout_s=60)
        short = await dispatcher.submit("demo.sleep", {"seconds": 0}, queue_timeout_s=1)
        # When its deadline passes, Then the dispatcher ends it FAILED timeout by itself
        result = await short.result(10)
        assert result.status is Status.FAILED
        assert result.error is not None and result.error.code is ErrorCode.TIMEOUT
        assert result.executor_id.startswith("dispatcher:")
        # and it never runs once a worker comes: the broker expires it at the head, and a
        # worker would refuse it anyway (its deadline has passed)
        daemon = fabric.spawn_worker(["workers.demo:Sleep"], executor_id="late-sleeper")
        try:
            daemon.wait_started()
            assert (await head.result(20)).status is Status.SUCCESS
            await asyncio.sleep(1.0)
        finally:
            daemon.stop()
    assert f"task.started task_id={short.task_id}" not in daemon.log()
    await fabric.purge("demo.sleep")


async def test_a_hung_executors_task_is_reassigned_and_its_late_result_fenced(
    fabric: Fabric,
) -> None:
    # Given two single-slot worker daemons (a hung one cannot take the re-dispatch)
    await fabric.purge("demo.sleep")
    daemons = [
        fabric.spawn_worker(
            ["workers.demo:Sleep"], executor_id=f"hb-{n}", args=["--concurrency", "1"]
        )
        for n in range(2)
    ]
    for daemon in daemons:
        daemon.wait_started()
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    try:
        hung, result, on_wire, handle = await _hang_one(fabric, connection, daemons)
    finally:
        fabric.stop_processes()
    # Then the task was re-dispatched as attempt 2 and answered by the other executor
    other = next(d for d in daemons if d is not hung)
    assert (result.status, result.attempt, result.executor_id) == (
        Status.SUCCESS,
        2,
        other.executor_id,
    )
    # and the hung executor's late answer reached the dispatcher but was not handed out
    late = [r for r in on_wire if r.executor_id == hung.executor_id]
    assert len(late) == 1 and late[0].token == handle.task.token
    assert late[0].token != result.token


async def _hang_one(fabric, connection, daemons):  # type: ignore[no-untyped-def]
    """Submit a task, SIGSTOP the daemon that runs it, wake it after the reassignment."""
    async with connection, fabric.dispatcher(supervision=FAST) as dispatcher:
        wire = await (await connection.channel()).declare_queue(exclusive=True)
        await wire.bind(RESULTS_EXCHANGE, dispatcher.reply_to)
        handle = await dispatcher.submit("demo.sleep", {"seconds": 3}, heartbeat_timeout_ms=2500)
        hung = await _first_to_start(daemons, handle.task_id)
        # When the executor running it hangs (SIGSTOP: its connection stays open)
        hung.signal(signal.SIGSTOP)
        result = await handle.result(30)
        # and wakes up later and sends its now stale result
        hung.signal(signal.SIGCONT)
        await _until_logged(hung, f"task.finished task_id={handle.task_id}")
        await asyncio.sleep(0.5)
        on_wire = []
        while (message := await wire.get(fail=False, no_ack=True)) is not None:
            on_wire.append(decode(message.body, Result))
    return hung, result, on_wire, handle


async def _first_to_start(daemons: list[WorkerProcess], task_id: str) -> WorkerProcess:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for daemon in daemons:
            if f"task.started task_id={task_id}" in daemon.log():
                return daemon
        await asyncio.sleep(0.05)
    raise AssertionError("no daemon started the task")
