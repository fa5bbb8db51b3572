"""Nothing is lost: 10,000 tasks through worker daemons that get killed, a broker restart, a
broker crash.

The ledger (``wayang_mq.testing.ledger``) records every task the broker confirmed, counts the
results on the wire with a tap of its own, hears what the dispatcher did with every result it
received (handed out, dropped as a duplicate, ...), and at the end proves: every confirmed task got
exactly one terminal result to its caller, every extra result on the wire was dropped by the
dispatcher, the queues drained, no dead letter went unanswered.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

import aio_pika
import pytest
from wayang_workers.demo import Echo

from wayang_mq import Status
from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.client.dispatcher import Dispatcher, Verdict
from wayang_mq.client.supervisor import SupervisionConfig
from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.model import Result, Task
from wayang_mq.core.names import RESULTS_EXCHANGE, reply_queue, task_queue
from wayang_mq.core.wire import signed_message
from wayang_mq.ops.deadletters import list_dead_letters
from wayang_mq.testing.harness import Fabric, WorkerProcess, eventually
from wayang_mq.testing.ledger import Ledger, LedgerMismatch, LedgerReport
from wayang_mq.testing.plugin import BrokerHandle
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import parse_topology

TASKS = 10_000
IN_FLIGHT = 500  # submitted and not yet answered, at most: memory stays flat
WORKERS = 4
WORKER_ARGS = ["--concurrency", "16"]  # prefetch = concurrency: each holds 16 deliveries
COLLECT_TIMEOUT_S = 90.0
# Queued tasks must outlive a broker restart: the default 60 s queue timeout is too close.
QUEUE_TIMEOUT_S = 600.0
# Tasks confirmed after the broker came back, at least, to call publishing recovered.
RECOVERED = 200
# Results the other workers hand out while a victim is frozen before its kill.
HELD_WHILE_FROZEN = 200


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

    try:
        for n in range(count):
            await slots.acquire()
            job = asyncio.create_task(one(n))
            running.add(job)
            job.add_done_callback(running.discard)
        await asyncio.gather(*running)
    finally:
        # A failure (or the test's timeout) must not leave hundreds of submits suspended on a
        # connection that is about to close: they would be collected, unfinished, in a later
        # test's time and fail it instead of this one.
        for job in running:
            job.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def report_progress(ledger: Ledger, started: float) -> None:
    """A progress line every 2 s (shown with -s, or in the report when the test fails)."""
    while True:
        await asyncio.sleep(2.0)
        print(f"[{time.monotonic() - started:6.1f}s] {ledger.progress()}", flush=True)


async def until_delivered(ledger: Ledger, count: int) -> None:
    await eventually(
        lambda: ledger.delivered_count >= count,
        timeout_s=120,
        what=f"{count} results handed to the caller",
    )


async def start_workers(fabric: Fabric, prefix: str, count: int) -> list[WorkerProcess]:
    daemons = [
        fabric.spawn_worker(
            ["wayang_workers.demo:Echo"], executor_id=f"{prefix}-{n}", args=WORKER_ARGS
        )
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
            # a TaskGroup: when one fails, the other is cancelled, not left running
            async with asyncio.TaskGroup() as group:
                group.create_task(drive(ledger, dispatcher, TASKS))
                group.create_task(fault(ledger))
            print(f"[{time.monotonic() - started:6.1f}s] load done: {ledger.progress()}")
            report = await ledger.check()
        finally:
            printer.cancel()
    print(report.render())
    return report, time.monotonic() - started


def assert_each_confirmed_task_got_one_success(report: LedgerReport) -> None:
    """The ledger's promise, and the outcome demo.echo must give: SUCCESS, every time."""
    assert report.ok, report.render()
    assert report.delivered == report.confirmed
    assert report.outcomes == {(Status.SUCCESS, None): report.confirmed}
    # no answer came from the dispatcher's own bookkeeping: every one is an executor's
    assert report.decided_by_dispatcher == ()
    # and every extra result on the wire (at-least-once) was dropped by the dispatcher
    extra = sum(n - 1 for n in report.wire_duplicates.values())
    assert report.verdicts.get(Verdict.DUPLICATE, 0) >= extra


# About 50 s (kills) and 90 s (restart) on 2 cores; room for a machine busy with other work.
@pytest.mark.slow
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
            # (frozen first, until the others have taken 200 more results: the broker has
            # pushed the frozen one its full prefetch by then, so the kill always finds
            # deliveries in its hands; an instant echo worker otherwise often holds none)
            victim.signal(signal.SIGSTOP)
            await until_delivered(ledger, ledger.delivered_count + HELD_WHILE_FROZEN)
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
    # Then every confirmed task got exactly one terminal result, SUCCESS, and nothing was
    # left behind
    assert_each_confirmed_task_got_one_success(report)
    assert report.confirmed == TASKS and report.refused == 0
    assert len(victims) == 5
    # and the kills hit deliveries in flight: the broker redelivered what the victims held
    # (the management API samples its counters every few seconds: wait for the sample)
    await eventually(
        lambda: _redeliveries(fabric) - redelivered_before >= 5,
        what="the broker counting at least one redelivery per kill",
    )
    print(f"redelivered after the kills: {_redeliveries(fabric) - redelivered_before}")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("outage", ["clean restart", "kill -9"])
async def test_10000_tasks_through_a_broker_outage_each_confirmed_get_exactly_one_result(
    fabric: Fabric, rabbitmq: BrokerHandle, outage: str
) -> None:
    # Given 4 worker daemons serving demo.echo (the topology was declared at session start,
    # long before the outage: a quorum queue declared just before a crash can be unusable)
    at_outage: list[int] = []

    async def outage_once(ledger: Ledger) -> None:
        # When the broker stops mid-run (cleanly, or SIGKILL: no shutdown at all), then starts
        await until_delivered(ledger, TASKS // 3)
        at_outage.append(ledger.delivered_count)
        print(f"{outage} of the broker at {ledger.progress()}")
        if outage == "kill -9":
            await asyncio.to_thread(rabbitmq.kill)
            await asyncio.to_thread(rabbitmq.start)
        else:
            await asyncio.to_thread(rabbitmq.restart)
        print(f"broker back at {ledger.progress()}")
        # Then publishing recovers: the dispatcher gets tasks confirmed again
        await _until_publishing_recovered(ledger)

    try:
        await start_workers(fabric, f"ledger-{outage.replace(' ', '-')}", WORKERS)
        report, took = await run_load(fabric, outage_once)
    finally:
        fabric.stop_processes()
    print(f"took {took:.1f}s")
    assert 0 < at_outage[0] < TASKS
    # and every task the broker confirmed got exactly one terminal result to its caller,
    # SUCCESS; those it could not confirm during the outage were refused to the caller and are
    # not counted
    assert_each_confirmed_task_got_one_success(report)
    assert report.confirmed + report.refused == TASKS
    assert report.confirmed > TASKS // 2


async def _until_publishing_recovered(ledger: Ledger) -> None:
    """Until RECOVERED more tasks are confirmed than when the broker came back."""
    back = len(ledger.confirmed_ids)
    await eventually(
        lambda: len(ledger.confirmed_ids) >= back + RECOVERED,
        timeout_s=60,
        what=f"{RECOVERED} tasks confirmed after the broker came back",
    )
    print(f"publishing recovered: {ledger.progress()}")


def _redeliveries(fabric: Fabric) -> int:
    """The demo.echo queue's redelivery count, as the management API last sampled it."""
    queue = management_client(fabric.endpoint).get_queue("wayang.task.demo.echo") or {}
    return int(queue.get("message_stats", {}).get("redeliver", 0))


# -- the ledger itself: it must catch what it exists to catch ---------------------------------

IDLE = "ledger.idle"  # a capability no worker serves


async def publish_result(fabric: Fabric, reply_to: str, result: Result) -> None:
    """Publish a result on the wire as a worker would."""
    message = to_amqp(signed_message(result, fabric.signer, message_id=result.task_id))
    await _publish(fabric, reply_to, message)


async def _publish(fabric: Fabric, reply_to: str, message: aio_pika.Message) -> None:
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(RESULTS_EXCHANGE, ensure=False)
        await exchange.publish(message, reply_to)


def answer(task: Task, executor_id: str) -> Result:
    """A SUCCESS result for ``task``, as executor ``executor_id`` would send it."""
    return Result(
        task_id=task.task_id,
        token=task.token,
        node_id=task.node_id,
        capability=task.capability,
        status=Status.SUCCESS,
        executor_id=executor_id,
    )


async def test_a_result_on_the_wire_twice_reaches_the_caller_once_and_the_copy_is_dropped(
    fabric: Fabric,
) -> None:
    management = management_client(fabric.endpoint)
    async with (
        fabric.worker([Echo()], executor_id="ledger-dup") as worker,
        fabric.dispatcher() as dispatcher,
        Ledger.for_dispatcher(dispatcher, management) as ledger,
    ):
        # Given a task a worker answered
        handle = await ledger.submit(dispatcher, "demo.echo", {"n": 1})
        assert handle is not None
        first = await ledger.collect(handle, 30)
        assert first is not None and first.executor_id == worker.executor_id
        # When a second, different result for it comes on the wire (as when a worker dies
        # after publishing its result but before its ack, and another one runs the task again)
        rerun = first.model_copy(update={"executor_id": "ledger-rerun", "finished_at_ms": 1})
        await publish_result(fabric, dispatcher.reply_to, rerun)
        # and a later task is answered on the same reply queue (a barrier: the copy came first)
        marker = await ledger.submit(dispatcher, "demo.echo", {"n": 2})
        assert marker is not None and await ledger.collect(marker, 30) is not None
        report = await ledger.check()
    print(report.render())
    # Then the caller got the first result only, and the dispatcher dropped the copy
    assert report.ok, report.render()
    assert await handle.result(1) == first
    assert report.wire_duplicates == {handle.task_id: 2}
    assert (report.delivered, report.on_wire, report.dropped) == (2, 3, 1)
    assert report.verdicts == {Verdict.HANDED_OUT: 2, Verdict.DUPLICATE: 1}
    assert report.outcomes == {(Status.SUCCESS, None): 2}


async def test_the_ledger_catches_lost_tasks_double_deliveries_strays_and_unanswered_dead_letters(
    fabric: Fabric,
) -> None:
    management = management_client(fabric.endpoint)
    extra = parse_topology({"capabilities": {IDLE: {}}}, source="test_ledger")
    await apply_topology(extra, fabric.endpoint.amqp_url, management)
    await fabric.purge(IDLE)
    # A dispatcher that remembers one finished task only (so a late result, once the task is
    # forgotten, is taken as its answer again) and ends an overdue task itself after 0.2 s
    dispatcher = Dispatcher(
        fabric.dispatcher_config(
            seen_results=1, supervision=SupervisionConfig(deadline_grace_ms=200)
        )
    )
    try:
        async with Ledger.for_dispatcher(dispatcher, management) as ledger:
            async with dispatcher:
                # Given, on a capability no worker serves (and with no reaper running):
                # a task that expires in its queue: the broker dead-letters it and nobody
                # answers the dead letter; the dispatcher ends it itself (FAILED timeout)
                expired = await ledger.submit(dispatcher, IDLE, {"n": 0}, queue_timeout_s=0.5)
                # a task that nobody ever answers
                lost = await ledger.submit(dispatcher, IDLE, {"n": 1}, queue_timeout_s=300)
                # a task answered twice on the wire (allowed: the dispatcher drops the copy)
                dup = await ledger.submit(dispatcher, IDLE, {"n": 2}, queue_timeout_s=300)
                # a task handed to callers twice
                twice = await ledger.submit(dispatcher, IDLE, {"n": 3}, queue_timeout_s=300)
                # a task answered only once its dispatcher is gone
                late = await ledger.submit(dispatcher, IDLE, {"n": 4}, queue_timeout_s=300)
                assert expired and lost and dup and twice and late

                decided = await ledger.collect(expired, 30)
                assert decided is not None and decided.error is not None
                assert decided.error.code is ErrorCode.TIMEOUT
                assert decided.executor_id == f"dispatcher:{dispatcher.dispatcher_id}"
                await _until_dead(fabric, expired.task_id)
                await heard(ledger, 2, "the expiry, and its copy on the wire")
                for result in (answer(dup.task, "fake-1"), answer(dup.task, "fake-2")):
                    await publish_result(fabric, dispatcher.reply_to, result)
                await heard(ledger, 4, "both results for dup")
                await publish_result(fabric, dispatcher.reply_to, answer(twice.task, "fake-1"))
                # a result for a task id never submitted, which pushes `twice` out of memory
                stranger = dispatcher.task(IDLE, {"n": 5})  # built, never published
                await publish_result(fabric, dispatcher.reply_to, answer(stranger, "fake-1"))
                await heard(ledger, 6, "the results for twice and stranger")
                # a caller asks for `twice` again, and a second result for it comes
                asking = asyncio.create_task(dispatcher.result_of(twice.task_id, 10))
                await publish_result(fabric, dispatcher.reply_to, answer(twice.task, "fake-2"))
                assert (await asking).executor_id == "fake-2"
                # and a message on the reply key that is not a result
                await _publish(fabric, dispatcher.reply_to, aio_pika.Message(b"not a result"))
                await heard(ledger, 8, "the message that is not a result")
            # the dispatcher is gone: `late` is answered now, and `dup` a third time
            for result in (answer(late.task, "fake-1"), answer(dup.task, "fake-3")):
                await publish_result(fabric, dispatcher.reply_to, result)
            await eventually(lambda: ledger.tap.terminal[dup.task_id] == 3, what="dup on wire")
            # When the ledger checks
            with pytest.raises(LedgerMismatch) as mismatch:
                await ledger.check(drain_timeout_s=1.0, stats_interval_s=0.5)
    finally:
        await fabric.purge(IDLE)
        await _delete_queue(fabric, reply_queue(dispatcher.dispatcher_id))
    report = mismatch.value.report
    print(report.render())
    # Then it names each broken promise, and only those
    assert report.lost == (lost.task_id,)
    assert [(d.task_id, d.broker_reason) for d in report.unanswered_dead_letters] == [
        (expired.task_id, "expired")
    ]
    assert report.delivered_twice == {twice.task_id: 2}
    assert report.undelivered == (late.task_id,)
    assert report.unseen_by_dispatcher == {dup.task_id: 1, late.task_id: 1}
    assert report.unknown == {stranger.task_id: 1}
    assert report.undecodable == 1
    assert [(d.queue, d.ready) for d in report.undrained] == [
        (task_queue(IDLE), 4),
        (reply_queue(dispatcher.dispatcher_id), 2),
    ]
    assert report.misdelivered == ()
    # and counts apart what is allowed: duplicates on the wire, the dispatcher's own decision
    # (which is no result of the fabric: not on the wire, and no answer to the dead letter)
    assert report.wire_duplicates == {dup.task_id: 3, twice.task_id: 2}
    assert report.decided_by_dispatcher == (expired.task_id,)
    assert (report.delivered, report.on_wire, report.dropped) == (4, 7, 2)
    assert report.outcomes == {(Status.FAILED, ErrorCode.TIMEOUT): 1, (Status.SUCCESS, None): 3}
    assert "PROBLEM lost" in str(mismatch.value)


async def heard(ledger: Ledger, count: int, what: str) -> None:
    """Until the ledger's dispatcher has given its verdict on ``count`` results."""
    await eventually(lambda: sum(ledger.witness.verdicts.values()) >= count, what=what)


async def _until_dead(fabric: Fabric, task_id: str) -> None:
    async def dead() -> bool:
        letters = await list_dead_letters(fabric.endpoint.amqp_url, IDLE)
        return task_id in {d.task_id for d in letters}

    await eventually(dead, what=f"task {task_id} dead-lettered")


async def _delete_queue(fabric: Fabric, name: str) -> None:
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(name)
