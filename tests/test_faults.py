"""Faults while tasks flow: a killed worker, a stopped worker, a restarted broker.

Every scenario ends with the same check: every task the broker confirmed has a terminal
result at the dispatcher.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from wayang_mq import Status
from wayang_mq.dispatcher import TaskHandle
from wayang_mq.errors import WayangError
from wayang_mq.harness import Fabric

pytestmark = pytest.mark.timeout(240)


async def _all_answered(handles: list[TaskHandle], wait_s: float) -> list[Status]:
    results = await asyncio.gather(*(h.result(wait_s) for h in handles))
    return [r.status for r in results]


async def _wait_for_log(daemon, text: str, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{daemon.executor_id} never logged {text!r}"
        await asyncio.sleep(0.05)


async def test_kill_9_of_a_worker_holding_tasks_loses_none(fabric: Fabric) -> None:
    # Given two worker daemons, each holding several sleeping tasks
    args = ["--concurrency", "4", "--prefetch", "8"]
    victim = fabric.spawn_worker(["workers.demo:Sleep"], executor_id="kill-victim", args=args)
    survivor = fabric.spawn_worker(["workers.demo:Sleep"], executor_id="kill-survivor", args=args)
    victim.wait_started()
    survivor.wait_started()
    async with fabric.dispatcher() as dispatcher:
        handles = [await dispatcher.submit("demo.sleep", {"seconds": 0.5}) for _ in range(40)]
        await _wait_for_log(victim, "event=task.started")
        # When one of them is killed outright
        victim.signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
        # Then every task still ends SUCCESS, the victim's ones on the survivor
        statuses = await _all_answered(handles, 90)
    assert statuses == [Status.SUCCESS] * 40
    fabric.stop_processes()


async def test_sigterm_lets_in_flight_tasks_finish_and_returns_the_rest(fabric: Fabric) -> None:
    # Given a worker running 2 tasks at a time, with 6 more waiting
    worker = fabric.spawn_worker(
        ["workers.demo:Sleep"], executor_id="term-w", args=["--concurrency", "2", "--grace", "20"]
    )
    worker.wait_started()
    async with fabric.dispatcher() as dispatcher:
        handles = [await dispatcher.submit("demo.sleep", {"seconds": 1}) for _ in range(8)]
        await _wait_for_log(worker, "event=task.started")
        # When it is asked to stop
        worker.signal(signal.SIGTERM)
        # Then it finishes what it runs and exits cleanly
        assert worker.wait(30) == 0
        assert "event=worker.stopped" in worker.log()
        # and the rest were returned to the queue: another worker answers them
        fabric.spawn_worker(["workers.demo:Sleep"], executor_id="term-next").wait_started()
        results = await asyncio.gather(*(h.result(60) for h in handles))
    assert [r.status for r in results] == [Status.SUCCESS] * 8
    by = [r.executor_id for r in results]
    assert by.count("term-w") == 2  # its two in-flight tasks, finished within the grace
    assert by.count("term-next") == 6  # the others went back to the queue, unharmed
    assert all(r.attempt == 1 for r in results)
    fabric.stop_processes()


async def test_broker_restart_while_tasks_flow_loses_no_confirmed_task(
    fabric: Fabric, rabbitmq
) -> None:  # type: ignore[no-untyped-def]
    # Given two worker daemons and a dispatcher publishing a steady stream of tasks
    for n in range(2):
        fabric.spawn_worker(["workers.demo:Echo"], executor_id=f"restart-{n}").wait_started()
    confirmed: list[TaskHandle] = []
    refused = 0
    async with fabric.dispatcher() as dispatcher:
        stop = asyncio.Event()

        async def publish() -> None:
            nonlocal refused
            n = 0
            while not stop.is_set():
                try:
                    confirmed.append(await dispatcher.submit("demo.echo", {"n": n}))
                except WayangError:
                    refused += 1  # not confirmed: the caller knows it was not taken
                n += 1
                await asyncio.sleep(0.005)

        publisher = asyncio.create_task(publish())
        await asyncio.sleep(1.0)
        # When the broker stops and starts again mid-stream
        await asyncio.to_thread(rabbitmq.restart)
        await asyncio.sleep(3.0)
        stop.set()
        await publisher
        # Then every task the broker confirmed gets its result
        statuses = await _all_answered(confirmed, 120)
    assert len(confirmed) > 100
    assert statuses == [Status.SUCCESS] * len(confirmed)
    fabric.stop_processes()
