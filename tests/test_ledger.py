"""Nothing is lost: 10,000 tasks through worker daemons that get killed, and a broker restart.

The ledger (``wayang_mq.ledger``) records every task the broker confirmed, counts the results on
the wire with a tap of its own, and at the end proves: every confirmed task got exactly one
terminal result to its caller, the queues drained, no dead letter went unanswered.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

import aio_pika
import pytest

from wayang_mq import Status
from wayang_mq.connect import management_client
from wayang_mq.deadletters import list_dead_letters
from wayang_mq.declare import apply_topology
from wayang_mq.dispatcher import Dispatcher
from wayang_mq.harness import Fabric, WorkerProcess
from wayang_mq.ledger import Ledger, LedgerMismatch, LedgerReport
from wayang_mq.model import Result, new_id
from wayang_mq.names import RESULTS_EXCHANGE, task_queue
from wayang_mq.publisher import to_amqp
from wayang_mq.testing import BrokerHandle
from wayang_mq.topology import parse_topology
from wayang_mq.wire import signed_message

TASKS = 10_000
IN_FLIGHT = 500  # submitted and not yet answered, at most: memory stays flat
WORKERS = 4
WORKER_ARGS = ["--concurrency", "16"]  # prefetch = concurrency: each holds 16 deliveries
COLLECT_TIMEOUT_S = 90.0
# Queued tasks must outlive a broker restart: the default 60 s queue timeout is too close.
QUEUE_TIMEOUT_S = 600.0


async def drive(ledger: Ledger, dispatcher: Dispatcher, count: int) -> None:
    """Submit ``count`` demo.echo tasks, at most IN_FLIGHT unanswered, collecting each result."""
    slots = asyncio.Semaphore(IN_FLIGHT)
    running: set[asyncio.Task[None]] = set()

    async def one(n: int) -> None:
        try:
            handle = await ledger.submit(
                dispatcher, "demo.echo", {"n": n}, queue_timeout_s=QUEUE_TIMEOUT_S
            )
            if handle is not None:
                await ledger.collect(handle, COLLECT_TIMEOUT_S)
        finally:
            slots.release()

    for n in range(count):
        await slots.acquire()
        job = asyncio.create_task(one(n))
        running.add(job)
        job.add_done_callback(running.discard)
    await asyncio.gather(*running)


async def report_progress(ledger: Ledger, started: float) -> None:
    """A progress line every 2 s (shown with -s, or in the report when the test fails)."""
    while True:
        await asyncio.sleep(2.0)
        print(f"[{time.monotonic() - started:6.1f}s] {ledger.progress()}", flush=True)


async def until(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def until_delivered(ledger: Ledger, count: int) -> None:
    await until(lambda: ledger.delivered_count >= count)


async def start_workers(fabric: Fabric, prefix: str, count: int) -> list[WorkerProcess]:
    daemons = [
        fabric.spawn_worker(["workers.demo:Echo"], executor_id=f"{prefix}-{n}", args=WORKER_ARGS)
        for n in range(count)
    ]
    for daemon in daemons:
        await asyncio.to_thread(daemon.wait_started)
    return daemons


async def run_load(
    fabric: Fabric, fault: Callable[[Ledger], Awaitable[None]]
) -> tuple[LedgerReport, float]:
    """TASKS tasks through a dispatcher, with ``fault`` running alongside; the ledger's report."""
    started = time.monotonic()
    management = management_client(fabric.endpoint)
    async with (
        fabric.dispatcher() as dispatcher,
        Ledger.for_dispatcher(dispatcher, management) as ledger,
    ):
        printer = asyncio.create_task(report_progress(ledger, started))
        try:
            await asyncio.gather(drive(ledger, dispatcher, TASKS), fault(ledger))
            print(f"[{time.monotonic() - started:6.1f}s] load done: {ledger.progress()}")
            report = await ledger.check()
        finally:
            printer.cancel()
    print(report.render())
    return report, time.monotonic() - started


# About 50 s (kills) and 90 s (restart) on 2 cores; room for a machine busy with other work.
@pytest.mark.timeout(300)
async def test_10000_tasks_with_5_worker_kills_each_get_exactly_one_result(
    fabric: Fabric,
) -> None:
    # Given 4 worker daemons serving demo.echo, each holding up to 16 deliveries
    pool = await start_workers(fabric, "ledger-kill", WORKERS)
    redelivered_before = _redeliveries(fabric)
    victims: list[str] = []

    async def kill_five(ledger: Ledger) -> None:
        # When a worker is killed with SIGKILL 5 times while tasks flow, each time replaced
        for n in range(5):
            await until_delivered(ledger, (n + 1) * TASKS // 7)
            victim = pool.pop(0)
            victim.signal(signal.SIGKILL)
            assert await asyncio.to_thread(victim.wait) == -signal.SIGKILL
            victims.append(victim.executor_id)
            (replacement,) = await start_workers(fabric, f"ledger-kill-r{n}", 1)
            pool.append(replacement)
            print(f"killed {victim.executor_id}, started {replacement.executor_id}")

    try:
        report, took = await run_load(fabric, kill_five)
    finally:
        fabric.stop_processes()
    print(f"took {took:.1f}s")
    # Then every confirmed task got exactly one terminal result, and nothing was left behind
    assert report.ok
    assert report.confirmed == TASKS and report.refused == 0
    assert report.delivered == TASKS
    assert len(victims) == 5
    # and the kills hit deliveries in flight: the broker redelivered what the victims held
    redelivered = _redeliveries(fabric) - redelivered_before
    print(f"redelivered after the kills: {redelivered}")
    assert redelivered >= 5


@pytest.mark.timeout(300)
async def test_10000_tasks_with_a_broker_restart_each_confirmed_get_exactly_one_result(
    fabric: Fabric, rabbitmq: BrokerHandle
) -> None:
    # Given 4 worker daemons serving demo.echo
    await start_workers(fabric, "ledger-restart", WORKERS)
    at_restart: list[int] = []

    async def restart_once(ledger: Ledger) -> None:
        # When the broker stops and starts again mid-run
        await until_delivered(ledger, TASKS // 3)
        at_restart.append(ledger.delivered_count)
        print(f"restarting the broker at {ledger.progress()}")
        await asyncio.to_thread(rabbitmq.restart)
        print(f"broker back at {ledger.progress()}")

    try:
        report, took = await run_load(fabric, restart_once)
    finally:
        fabric.stop_processes()
    print(f"took {took:.1f}s")
    # Then the restart happened mid-run
    assert 0 < at_restart[0] < TASKS
    # and every task the broker confirmed got exactly one terminal result to its caller; those
    # it could not confirm during the outage were refused to the caller and are not counted
    assert report.ok
    assert report.confirmed + report.refused == TASKS
    assert report.delivered == report.confirmed
    assert report.confirmed > TASKS // 2


def _redeliveries(fabric: Fabric) -> int:
    """The demo.echo queue's redelivery count, as the management API last sampled it."""
    queue = management_client(fabric.endpoint).get_queue("wayang.task.demo.echo") or {}
    return int(queue.get("message_stats", {}).get("redeliver", 0))


# -- the ledger itself: it must catch what it exists to catch ---------------------------------

IDLE = "ledger.idle"  # a capability no worker serves


async def publish_result(fabric: Fabric, reply_to: str, result: Result) -> None:
    """Publish a result on the wire as a worker would."""
    message = to_amqp(signed_message(result, fabric.signer, message_id=result.task_id))
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(RESULTS_EXCHANGE, ensure=False)
        await exchange.publish(message, reply_to)


async def test_the_ledger_catches_lost_tasks_double_deliveries_strays_and_unanswered_dead_letters(
    fabric: Fabric,
) -> None:
    management = management_client(fabric.endpoint)
    extra = parse_topology({"capabilities": {IDLE: {}}}, source="test_ledger")
    await apply_topology(extra, fabric.endpoint.amqp_url, management)
    await fabric.purge(IDLE)
    try:
        async with (
            fabric.dispatcher() as dispatcher,
            Ledger.for_dispatcher(dispatcher, management) as ledger,
        ):
            # Given, on a capability no worker serves (and with no reaper running):
            # a confirmed task that expires in its queue, dead-lettered with no FAILED result
            expired = await ledger.submit(dispatcher, IDLE, {"n": 0}, queue_timeout_s=0.5)
            # a confirmed task that nobody ever answers
            lost = await ledger.submit(dispatcher, IDLE, {"n": 1}, queue_timeout_s=300)
            # a confirmed task answered twice on the wire (as after a worker crash before its
            # ack), then handed to the caller twice (as a broken dispatcher would)
            twice = await ledger.submit(dispatcher, IDLE, {"n": 2}, queue_timeout_s=300)
            # and a result for a task id that was never submitted
            stranger = new_id()
            assert expired and lost and twice
            answer = Result(
                task_id=twice.task_id,
                token=twice.task.token,
                node_id=twice.task.node_id,
                capability=IDLE,
                status=Status.SUCCESS,
                executor_id="fake-worker",
            )
            for result in (answer, answer, answer.model_copy(update={"task_id": stranger})):
                await publish_result(fabric, dispatcher.reply_to, result)
            handed = await ledger.collect(twice, 10)
            assert handed is not None
            ledger.delivered(twice.task_id, handed.model_copy(update={"executor_id": "other"}))
            await until(lambda: ledger.tap.terminal[stranger] == 1, 10)
            await _until_dead(fabric, expired.task_id)
            # When the ledger checks
            with pytest.raises(LedgerMismatch) as mismatch:
                await ledger.check(drain_timeout_s=1.0, stats_interval_s=0.5)
    finally:
        await fabric.purge(IDLE)
    report = mismatch.value.report
    print(report.render())
    # Then it names each broken promise, and only those
    assert report.lost == tuple(sorted([expired.task_id, lost.task_id]))
    assert [(d.task_id, d.broker_reason) for d in report.unanswered_dead_letters] == [
        (expired.task_id, "expired")
    ]
    assert report.delivered_twice == {twice.task_id: 2}
    assert report.unknown == {stranger: 1}
    assert [(d.queue, d.ready) for d in report.undrained] == [(task_queue(IDLE), 2)]
    assert (report.undelivered, report.misdelivered, report.undecodable) == ((), (), 0)
    # and counts the duplicate on the wire apart, as allowed
    assert report.wire_duplicates == {twice.task_id: 2}
    assert "PROBLEM lost" in str(mismatch.value)


async def _until_dead(fabric: Fabric, task_id: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while task_id not in {
        d.task_id for d in await list_dead_letters(fabric.endpoint.amqp_url, IDLE)
    }:
        assert time.monotonic() < deadline, f"task {task_id} was never dead-lettered"
        await asyncio.sleep(0.2)
