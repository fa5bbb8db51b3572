"""Faults while tasks flow: a killed worker, a stopped worker, a restarted broker.

Every scenario ends with the same check: every task the broker confirmed has a terminal
result at the dispatcher.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from wayang_mq import Status
from wayang_mq.amqp.connect import connect
from wayang_mq.client.dispatcher import TaskHandle
from wayang_mq.core.errors import BrokerUnreachable, PublishFailed
from wayang_mq.core.names import task_queue
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.ledger import passive_ready
from wayang_mq.testing.plugin import BrokerHandle

pytestmark = pytest.mark.timeout(240)

#: what a caller may be told while the broker is away: its task was not confirmed (typed, so
#: it knows the task was not taken); anything else during an outage is a bug
OUTAGE_ERRORS = (PublishFailed, BrokerUnreachable)


async def _all_answered(handles: list[TaskHandle], wait_s: float) -> list[Status]:
    results = await asyncio.gather(*(h.result(wait_s) for h in handles))
    return [r.status for r in results]


async def _until_all_delivered(fabric: Fabric, capability: str) -> None:
    """Until no task of ``capability`` waits in its queue: workers hold every one."""
    connection = await connect(fabric.endpoint.amqp_url, "test-faults")
    try:

        async def none_ready() -> bool:
            return await passive_ready(connection, task_queue(capability)) == 0

        await eventually(none_ready, what=f"every {capability} task delivered to a worker")
    finally:
        await connection.close()


async def test_kill_9_of_a_worker_holding_tasks_loses_none(fabric: Fabric) -> None:
    # Given two worker daemons, each holding several sleeping tasks
    args = ["--concurrency", "4", "--prefetch", "8"]
    try:
        victim = fabric.spawn_worker(
            ["wayang_workers.demo:Sleep"], executor_id="kill-victim", args=args
        )
        survivor = fabric.spawn_worker(
            ["wayang_workers.demo:Sleep"], executor_id="kill-survivor", args=args
        )
        await asyncio.to_thread(victim.wait_started)
        await asyncio.to_thread(survivor.wait_started)
        async with fabric.dispatcher() as dispatcher:
            handles = [await dispatcher.submit("demo.sleep", {"seconds": 0.5}) for _ in range(40)]
            await victim.until_logged("event=task.started")
            # When one of them is killed outright
            victim.signal(signal.SIGKILL)
            assert await asyncio.to_thread(victim.wait) == -signal.SIGKILL
            # Then every task still ends SUCCESS, the victim's ones on the survivor
            statuses = await _all_answered(handles, 90)
    finally:
        fabric.stop_processes()
    assert statuses == [Status.SUCCESS] * 40


async def test_sigterm_lets_the_running_task_finish_and_returns_the_held_ones_unstarted(
    fabric: Fabric,
) -> None:
    # Given a worker that runs 1 task at a time and holds 3 more (prefetch 4)
    await fabric.purge("demo.sleep")
    worker = fabric.spawn_worker(
        ["wayang_workers.demo:Sleep"],
        executor_id="term-w",
        args=["--concurrency", "1", "--prefetch", "4", "--grace", "20"],
    )
    try:
        await asyncio.to_thread(worker.wait_started)
        async with fabric.dispatcher() as dispatcher:
            handles = [await dispatcher.submit("demo.sleep", {"seconds": 1}) for _ in range(4)]
            await _until_all_delivered(fabric, "demo.sleep")  # 1 running, 3 held by it
            await worker.until_logged("event=task.started")
            # When it is asked to stop
            worker.signal(signal.SIGTERM)
            # Then it exits cleanly
            assert await asyncio.to_thread(worker.wait, 30) == 0
            log = worker.log()
            assert "event=worker.stopped" in log
            # and another worker, started afterwards, answers the rest
            successor = fabric.spawn_worker(["wayang_workers.demo:Sleep"], executor_id="term-next")
            await asyncio.to_thread(successor.wait_started)
            results = await asyncio.gather(*(h.result(60) for h in handles))
    finally:
        fabric.stop_processes()
    assert [(r.status, r.attempt) for r in results] == [(Status.SUCCESS, 1)] * 4
    # It finished the one task it was running, within the grace
    ran = [h.task_id for h, r in zip(handles, results, strict=True) if r.executor_id == "term-w"]
    started = [h.task_id for h in handles if f"event=task.started task_id={h.task_id}" in log]
    assert len(ran) == 1 and started == ran
    # and gave back the 3 it held without starting them: the next worker ran them, as attempt 1
    held = [h.task_id for h in handles if h.task_id not in ran]
    assert [r.executor_id for r in results if r.task_id in held] == ["term-next"] * 3
    assert all(f"event=task.returned task_id={t}" in log for t in held)


async def test_broker_restart_while_tasks_flow_loses_no_confirmed_task(
    fabric: Fabric, rabbitmq: BrokerHandle
) -> None:
    confirmed: list[TaskHandle] = []
    refused: list[Exception] = []
    submitted = 0
    try:
        # Given two worker daemons and a dispatcher publishing a steady stream of tasks
        for n in range(2):
            daemon = fabric.spawn_worker(["wayang_workers.demo:Echo"], executor_id=f"restart-{n}")
            await asyncio.to_thread(daemon.wait_started)
        async with fabric.dispatcher() as dispatcher:
            stop = asyncio.Event()

            async def publish() -> None:
                nonlocal submitted
                while not stop.is_set():
                    submitted += 1
                    try:
                        confirmed.append(await dispatcher.submit("demo.echo", {"n": submitted}))
                    except Exception as exc:  # classified below: only outage errors may come
                        refused.append(exc)
                    await asyncio.sleep(0.005)

            publisher = asyncio.create_task(publish())
            await eventually(lambda: len(confirmed) >= 100, what="100 tasks confirmed")
            # When the broker stops and starts again mid-stream
            await asyncio.to_thread(rabbitmq.restart)
            back = submitted

            def confirmed_after_restart() -> int:
                return sum(1 for h in confirmed if h.task.input["n"] > back)

            # Then publishing recovers: tasks submitted after the broker came back are confirmed
            await eventually(
                lambda: confirmed_after_restart() >= 100,
                timeout_s=60,
                what="100 tasks submitted after the restart confirmed",
            )
            stop.set()
            await publisher
            # and every task the broker confirmed gets its result
            statuses = await _all_answered(confirmed, 120)
    finally:
        fabric.stop_processes()
    assert statuses == [Status.SUCCESS] * len(confirmed)
    # and a publish the broker could not confirm during the outage failed with a typed error
    # saying so, and nothing else
    print(f"{len(confirmed)} confirmed, refused: {[repr(e) for e in refused]}")
    assert [e for e in refused if not isinstance(e, OUTAGE_ERRORS)] == []
