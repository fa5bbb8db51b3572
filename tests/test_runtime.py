"""Tasks flow from the dispatcher to worker daemons and results come back (real broker)."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import msgpack
import pytest
from wayang_workers.demo import Echo, Fail, Sleep

from wayang_mq import ErrorCode, Executor, Status, Task, TaskState, current
from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.core.errors import NoExecutor
from wayang_mq.core.model import JsonLike, Result, new_id
from wayang_mq.core.names import EVENTS_EXCHANGE, RESULTS_EXCHANGE, TASKS_EXCHANGE, task_queue
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import WireMessage, decode, task_message
from wayang_mq.testing.harness import WAIT_S, Fabric, eventually
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import parse_topology

Incoming = aio_pika.abc.AbstractIncomingMessage


@asynccontextmanager
async def tap(fabric: Fabric, exchange: str, *keys: str) -> AsyncIterator[list[Incoming]]:
    """An exclusive queue bound to ``exchange`` with ``keys``; yields what arrives, in order."""
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    received: list[Incoming] = []

    async def keep(message: Incoming) -> None:
        received.append(message)

    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        for key in keys:
            await queue.bind(exchange, key)
        await queue.consume(keep, no_ack=True)
        yield received


class Gated(Executor):
    """``demo.echo`` that counts its runs per task id and holds each run until released."""

    serves = ("demo.echo",)

    def __init__(self, *, held: bool = False) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.running = 0
        self.most_at_once = 0
        self.release = asyncio.Event()
        if not held:
            self.release.set()

    async def execute(self, task: Task) -> JsonLike:
        self.runs[task.task_id] += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return task.input


class GatedSleep(Gated):
    """The same, serving ``demo.sleep``."""

    serves = ("demo.sleep",)


async def publish_task(
    fabric: Fabric, message: WireMessage, routing_key: str, times: int = 1
) -> None:
    """Publish a signed task to ``wayang.tasks`` as any AMQP client could, confirmed each time."""
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(TASKS_EXCHANGE, ensure=False)
        for _ in range(times):
            await exchange.publish(to_amqp(message), routing_key, mandatory=True)


async def next_message(
    queue: aio_pika.abc.AbstractQueue, *, what: str, timeout_s: float = WAIT_S
) -> Incoming:
    """The next message ``basic.get`` finds in ``queue``, waiting by condition (no ack needed)."""
    found: list[Incoming] = []

    async def arrived() -> bool:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            found.append(message)
        return bool(found)

    await eventually(arrived, timeout_s=timeout_s, what=what)
    return found[0]


async def ready_count(fabric: Fabric, queue: str) -> int:
    """The queue's ready messages, read exactly with a passive declare."""
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def test_2000_tasks_through_two_worker_daemons_get_one_result_each(fabric: Fabric) -> None:
    # Given two worker daemons serving demo.echo
    daemons = [
        fabric.spawn_worker(
            ["wayang_workers.demo:Echo"], executor_id=f"flow-{n}", args=["--concurrency", "16"]
        )
        for n in range(2)
    ]
    marker = f"tap.marker.{new_id()}"
    try:
        for daemon in daemons:
            await asyncio.to_thread(daemon.wait_started)
        async with (
            fabric.dispatcher() as dispatcher,
            tap(fabric, RESULTS_EXCHANGE, dispatcher.reply_to, marker) as results,
        ):
            # When 2,000 tasks with distinct node ids and tokens are submitted
            handles = await asyncio.gather(
                *(
                    dispatcher.submit(
                        "demo.echo", {"i": i}, node_id=f"node-{i}", token=f"token-{i}"
                    )
                    for i in range(2000)
                )
            )
            answered = await asyncio.gather(*(h.result(90) for h in handles))
            # (barrier: once the daemons have exited, all they ever published is in the tap's
            # queue; a marker published after that arrives after every duplicate would)
            fabric.stop_processes()
            await _publish_marker(fabric, marker)
            await eventually(
                lambda: any(m.routing_key == marker for m in results), what="the marker"
            )
            raw_counts = collections.Counter(
                msgpack.unpackb(m.body)["task_id"] for m in results if m.routing_key != marker
            )
    finally:
        fabric.stop_processes()
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


async def _publish_marker(fabric: Fabric, routing_key: str) -> None:
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(RESULTS_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(b"marker"), routing_key)


async def test_a_worker_runs_up_to_concurrency_tasks_at_once(fabric: Fabric) -> None:
    # Given a worker with 3 slots whose executor holds every run until released
    await fabric.purge("demo.echo")
    executor = Gated(held=True)
    async with fabric.worker([executor], concurrency=3), fabric.dispatcher() as dispatcher:
        # When 4 tasks are submitted
        handles = [await dispatcher.submit("demo.echo", {"n": n}) for n in range(4)]
        # Then 3 run at the same time, and the 4th waits in the queue for a slot
        await eventually(lambda: executor.running == 3, what="3 tasks running at once")
        assert await ready_count(fabric, task_queue("demo.echo")) == 1
        # and once they are released, all 4 finish, never more than 3 at a time
        executor.release.set()
        results = [await h.result(30) for h in handles]
    assert [r.status for r in results] == [Status.SUCCESS] * 4
    assert executor.most_at_once == 3


async def test_registration_heartbeats_and_progress_are_published(fabric: Fabric) -> None:
    async with tap(fabric, EVENTS_EXCHANGE, "#") as events:
        # Given a worker heartbeating every 0.3 s, When it runs a 2.2 s task
        worker = fabric.worker([Sleep()], executor_id="events-w", heartbeat_interval_s=0.3)
        async with worker, fabric.dispatcher() as dispatcher:
            result = await dispatcher.run("demo.sleep", {"seconds": 2.2}, wait_s=30)

        def of(kind: str) -> list[dict[str, Any]]:
            return [msgpack.unpackb(m.body) for m in events if m.type == kind]

        def progress() -> list[dict[str, Any]]:
            return [p for p in of("wayang.progress.v1") if p["task_id"] == result.task_id]

        # (the worker publishes its events in order on one channel: once the last progress
        # event is here, its registration and the heartbeats before it are too)
        await eventually(
            lambda: [p["fraction"] for p in progress()][-1:] == [1.0], what="the last progress"
        )
    # Then it registered once, reported progress each second, and heartbeated the task in flight
    assert result.status is Status.SUCCESS
    assert [r["executor_id"] for r in of("wayang.registration.v1")] == ["events-w"]
    assert [p["fraction"] for p in progress()] == [0.0, pytest.approx(1 / 2.2), 1.0]
    beats = [b for b in of("wayang.heartbeat.v1") if b["executor_id"] == "events-w"]
    assert any(result.task_id in b.get("in_flight", ()) for b in beats)


async def test_heartbeat_details_an_executor_records_reach_the_wire(fabric: Fabric) -> None:
    # Given an executor that records heartbeat details while it runs, then waits
    class Stepping(Gated):
        async def execute(self, task: Task) -> JsonLike:
            for step in range(1, 4):
                current().heartbeat(step=step, of=3)  # only the latest travels
            return await super().execute(task)

    executor = Stepping(held=True)
    async with tap(fabric, EVENTS_EXCHANGE, "heartbeat.details-w") as beats:
        worker = fabric.worker([executor], executor_id="details-w", heartbeat_interval_s=0.2)
        async with worker, fabric.dispatcher() as dispatcher:
            handle = await dispatcher.submit("demo.echo", {"x": 1})

            # When the worker heartbeats while the task runs
            def details() -> list[Any]:
                return [msgpack.unpackb(m.body).get("details", {}) for m in beats]

            await eventually(
                lambda: {handle.task_id: {"step": 3, "of": 3}} in details(),
                what="a heartbeat carrying the task's latest details",
            )
            executor.release.set()
            assert (await handle.result(WAIT_S)).status is Status.SUCCESS
    # Then no heartbeat carried an older step than the one recorded last before it was sent
    assert all(d.get(handle.task_id, {}).get("step", 3) == 3 for d in details())


async def test_status_reports_running_with_progress_then_finished(fabric: Fabric) -> None:
    sleeper = Sleep()
    async with fabric.worker([sleeper]), fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 1.5})
        await eventually(
            lambda: sleeper.status(handle.task_id).progress is not None, what="first progress"
        )
        running = sleeper.status(handle.task_id)
        assert running.state is TaskState.RUNNING
        await handle.result(30)
        assert sleeper.status(handle.task_id).state is TaskState.FINISHED
        assert sleeper.status("never-seen").state is TaskState.UNKNOWN


async def test_cancel_ends_a_running_task_failed_cancelled(fabric: Fabric) -> None:
    sleeper = Sleep()
    async with fabric.worker([sleeper]), fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 30})
        await eventually(
            lambda: sleeper.status(handle.task_id).state is TaskState.RUNNING, what="running"
        )
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


async def test_recent_results_are_bounded_by_bytes_as_well_as_count(fabric: Fabric) -> None:
    # Given a worker whose recent-results budget is 8 KiB (a result over 1 KiB is not kept)
    class Sized(Echo):
        async def execute(self, task):  # type: ignore[no-untyped-def]
            return {"blob": "x" * task.input["size"]}

    executor = Sized()
    async with fabric.worker([executor], recent_results_bytes=8 * 1024), fabric.dispatcher() as d:
        # When a large result is produced, Then it is not kept at all
        big = await d.run("demo.echo", {"size": 4000}, wait_s=10)
        assert executor.status(big.task_id).state is TaskState.UNKNOWN
        # When 20 small ones follow (over 8 KiB together, far under the count limit)
        small = [await d.run("demo.echo", {"size": 100}, wait_s=10) for _ in range(20)]
        # Then the oldest were evicted, and the latest are still there to answer a redelivery
        assert executor.status(small[0].task_id).state is TaskState.UNKNOWN
        assert executor.status(small[-1].task_id).state is TaskState.FINISHED


# -- the same task id twice -----------------------------------------------------------------


async def test_resubmitting_a_pending_task_id_returns_its_handle_without_publishing_again(
    fabric: Fabric,
) -> None:
    # Given a task running on a single-slot worker, held there
    await fabric.purge("demo.echo")
    executor = Gated(held=True)
    async with fabric.worker([executor], concurrency=1), fabric.dispatcher() as dispatcher:
        first = await dispatcher.submit("demo.echo", {"n": 1})
        await eventually(lambda: executor.runs[first.task_id] == 1, what="the task running")

        # When the same task is submitted again while it is pending
        again = await dispatcher.submit_task(first.task)

        # Then nothing new was published (the worker's only slot is busy, so a second copy,
        # confirmed before submit_task returned, would be waiting in the queue)
        assert await ready_count(fabric, task_queue("demo.echo")) == 0
        # and both handles get the one run's result
        executor.release.set()
        results = [await first.result(30), await again.result(30)]
    assert again.task_id == first.task_id
    assert results[0] == results[1] and results[0].status is Status.SUCCESS
    assert executor.runs == {first.task_id: 1}


async def test_resubmitting_a_finished_task_id_returns_its_result_without_running_again(
    fabric: Fabric,
) -> None:
    # Given a task that ran and finished
    await fabric.purge("demo.echo")
    executor = Gated()
    async with fabric.dispatcher() as dispatcher:
        async with fabric.worker([executor]):
            first = await dispatcher.submit("demo.echo", {"n": 2})
            finished = await first.result(30)

        # When it is submitted again, with no worker consuming any more
        again = await dispatcher.submit_task(first.task)

        # Then the handle already holds the first result, and nothing was published
        assert again.done()
        assert await again.result(1) == finished
        assert await ready_count(fabric, task_queue("demo.echo")) == 0
    assert executor.runs == {first.task_id: 1}


async def test_a_redelivered_finished_attempt_is_answered_from_recent_results(
    fabric: Fabric,
) -> None:
    # Given the same signed task (same id, same attempt) delivered twice to one worker, as
    # the broker does when an ack is lost
    await fabric.purge("demo.echo")
    reply = f"reply.redelivery-{new_id()[:8]}"
    task = Task.create("demo.echo", {"n": 3}, reply_to=reply)
    executor = Gated()
    async with tap(fabric, RESULTS_EXCHANGE, reply) as results:
        await publish_task(fabric, task_message(task, fabric.signer), "demo.echo", times=2)

        # When a single-slot worker takes both deliveries
        async with fabric.worker([executor], concurrency=1):
            await eventually(lambda: len(results) == 2, what="both deliveries answered")

    # Then the executor ran once, and both deliveries were answered with that one result
    assert executor.runs == {task.task_id: 1}
    answers = [decode(m.body, Result) for m in results]
    assert answers[0] == answers[1]
    assert answers[0].status is Status.SUCCESS and answers[0].output == {"n": 3}


async def test_the_same_attempt_delivered_while_it_runs_joins_that_run(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the same signed task delivered twice to a worker with free slots, the second
    # while the first still runs (a publisher retrying after a lost confirm)
    await fabric.purge("demo.echo")
    reply = f"reply.joined-{new_id()[:8]}"
    task = Task.create("demo.echo", {"n": 4}, reply_to=reply)
    executor = Gated(held=True)
    caplog.set_level(logging.INFO, logger="wayang_mq")
    async with (
        tap(fabric, RESULTS_EXCHANGE, reply) as results,
        fabric.worker([executor], concurrency=4),
    ):
        await publish_task(fabric, task_message(task, fabric.signer), "demo.echo", times=2)
        # When the second delivery arrives while the first run is held
        await eventually(
            lambda: (
                f"event=task.joined task_id={task.task_id}" in caplog.text
                or executor.runs[task.task_id] == 2
            ),
            what="the second delivery joining the first run (or running beside it)",
        )
        executor.release.set()
        await eventually(lambda: len(results) == 2, what="both deliveries answered")

    # Then the executor ran once, both deliveries got that one result, and nothing broke
    assert executor.runs == {task.task_id: 1}
    answers = [decode(m.body, Result) for m in results]
    assert answers[0] == answers[1] and answers[0].status is Status.SUCCESS
    assert "worker.bug" not in caplog.text


async def test_a_task_naming_another_capability_than_its_queue_is_refused_not_run(
    fabric: Fabric,
) -> None:
    # Given a worker serving demo.echo and demo.sleep, and a validly signed demo.sleep task
    # that arrives on demo.echo's queue
    await fabric.purge("demo.echo", "demo.sleep")
    reply = f"reply.wrong-queue-{new_id()[:8]}"
    task = Task.create("demo.sleep", {"seconds": 0}, reply_to=reply)
    echo, sleep = Gated(), GatedSleep()
    async with tap(fabric, RESULTS_EXCHANGE, reply) as results, fabric.worker([echo, sleep]):
        await publish_task(fabric, task_message(task, fabric.signer), "demo.echo")

        # When the worker handles it
        await eventually(lambda: len(results) == 1, what="the answer")

    # Then it is answered FAILED no_executor, and no executor ran it
    answer = decode(results[0].body, Result)
    assert answer.task_id == task.task_id and answer.status is Status.FAILED
    assert answer.error is not None and answer.error.code is ErrorCode.NO_EXECUTOR
    assert echo.runs == sleep.runs == {}


# -- a result the broker refuses ------------------------------------------------------------

CONFIRM_CAPABILITY = "runtime.confirm"


async def test_a_result_the_broker_refuses_is_not_acked_away_but_answered_once_there_is_room(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a capability whose redeliveries are not capped, and a task whose reply queue is
    # full with overflow=reject-publish, so the broker nacks the worker's result
    topology = parse_topology(
        {"capabilities": {CONFIRM_CAPABILITY: {"delivery_limit": 100_000}}}, source="test_runtime"
    )
    await apply_topology(topology, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
    await fabric.purge(CONFIRM_CAPABILITY)
    reply = f"reply.full-{new_id()[:8]}"
    task = Task.create(CONFIRM_CAPABILITY, {"n": 4}, reply_to=reply)

    class Counted(Gated):
        serves = (CONFIRM_CAPABILITY,)

    executor = Counted()
    caplog.set_level(logging.WARNING, logger="wayang_mq.runtime.worker")
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await replies.bind(RESULTS_EXCHANGE, reply)
        await channel.default_exchange.publish(aio_pika.Message(b"filler"), replies.name)
        await publish_task(fabric, task_message(task, fabric.signer), CONFIRM_CAPABILITY)

        async with fabric.worker([executor], concurrency=1):
            # When the worker runs it and the broker refuses the result
            await eventually(
                lambda: f"event=result.unconfirmed task_id={task.task_id}" in caplog.text,
                what="the worker seeing its result refused",
            )
            # and room is made in the reply queue
            filler = await next_message(replies, what="the filler")
            assert filler.body == b"filler"

            # Then the task, returned to its queue rather than acked away, is answered
            answer = await next_message(replies, timeout_s=20, what="the result once there is room")
    result = decode(answer.body, Result)
    assert (result.task_id, result.status, result.output) == (
        task.task_id,
        Status.SUCCESS,
        {"n": 4},
    )
    # and the redeliveries were answered from recent results: the executor ran once
    assert executor.runs == {task.task_id: 1}


# -- results verified against a key ring ----------------------------------------------------


async def test_results_verify_against_every_key_of_the_ring_and_others_are_refused(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a dispatcher trusting the result keys of executors A and B, and three workers
    # signing their results with A's key, B's key and a key outside the ring
    await fabric.purge("demo.echo", "demo.sleep", "demo.fail")
    key_a, key_b, outsider = Signer.generate(), Signer.generate(), Signer.generate()
    ring = KeyRing.of([key_a.public_key, key_b.public_key])
    caplog.set_level(logging.WARNING, logger="wayang_mq.client.dispatcher")
    async with (
        fabric.dispatcher(results_keyring=ring) as dispatcher,
        fabric.worker([Echo()], signer=key_a, executor_id="ring-a"),
        fabric.worker([Sleep()], signer=key_b, executor_id="ring-b"),
        fabric.worker([Fail()], signer=outsider, executor_id="ring-outsider"),
    ):
        # When each runs a task
        from_a = await dispatcher.run("demo.echo", {"n": 5}, wait_s=30)
        from_b = await dispatcher.run("demo.sleep", {"seconds": 0}, wait_s=30)
        refused = await dispatcher.submit("demo.fail", {"succeed_on_attempt": 1})

        # Then the results signed by either key of the ring are handed out
        assert (from_a.status, from_a.executor_id) == (Status.SUCCESS, "ring-a")
        assert (from_b.status, from_b.executor_id) == (Status.SUCCESS, "ring-b")
        # and the one signed by the outsider is refused when it arrives, never handed out
        await eventually(
            lambda: f"event=security.refused id={refused.task_id}" in caplog.text,
            what="the dispatcher refusing the outsider's result",
        )
        assert not refused.done()
