"""Compensation: a task that fails for good dispatches the compensation it names."""

from __future__ import annotations

from collections.abc import Callable

import aio_pika
from wayang_workers.demo import Echo, Fail

from wayang_mq import ErrorCode, Executor, Status, Task
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.client.supervisor import SupervisionConfig
from wayang_mq.core.envelope import compensation_of
from wayang_mq.core.model import Compensation, ErrorInfo, JsonLike, Result, RetryHints
from wayang_mq.core.names import RESULTS_EXCHANGE, TASKS_EXCHANGE
from wayang_mq.core.wire import decode, task_message
from wayang_mq.ops.deadletters import list_dead_letters
from wayang_mq.testing.harness import Fabric, eventually

UNDO = Compensation(capability="demo.echo", input={"undo": "charge-42"})
#: a dispatcher that checks its tasks' deadlines often and gives up on them quickly
FAST = SupervisionConfig(deadline_grace_ms=300, check_interval_s=0.2, status_wait_s=0.3)


class Undo(Executor):
    """``demo.echo`` as a compensation would be written: it records each run's idempotency
    key, the key a real one would do its side effect once for."""

    serves = ("demo.echo",)

    def __init__(self) -> None:
        self.runs: list[tuple[str, str | None]] = []  # (task id, idempotency key) per run

    async def execute(self, task: Task) -> JsonLike:
        self.runs.append((task.task_id, task.idempotency_key))
        return {"undone": task.input.get("undo")}


async def test_a_failed_task_dispatches_its_compensation_and_links_it(fabric: Fabric) -> None:
    async with fabric.worker([Fail(), Echo()]), fabric.dispatcher() as dispatcher:
        failed = await dispatcher.run(
            "demo.fail", {"mode": "permanent"}, compensation=UNDO, wait_s=10
        )
        assert failed.compensation_task_id == f"{failed.task_id}.compensation"
        compensated = await dispatcher.result_of(failed.compensation_task_id, timeout_s=10)
    assert failed.status is Status.FAILED
    assert compensated.status is Status.SUCCESS
    assert compensated.node_id == f"{failed.node_id}:compensate"
    assert compensated.output["undo"] == "charge-42"
    assert compensated.output["compensates"]["task_id"] == failed.task_id
    assert compensated.output["compensates"]["error"]["code"] == "executor_error"


async def test_compensation_waits_for_the_last_attempt(fabric: Fabric) -> None:
    async with fabric.worker([Fail(), Echo()]), fabric.dispatcher() as dispatcher:
        failed = await dispatcher.run(
            "demo.fail",
            {"mode": "retryable"},
            compensation=UNDO,
            retry=RetryHints(max_attempts=2, initial_backoff_ms=100),
            wait_s=20,
        )
        assert failed.compensation_task_id is not None
        compensated = await dispatcher.result_of(failed.compensation_task_id, timeout_s=10)
    assert failed.attempt == 2
    assert failed.error is not None and failed.error.code is ErrorCode.RETRIES_EXHAUSTED
    assert compensated.output["compensates"]["error"]["code"] == "retries_exhausted"


async def test_a_successful_task_is_not_compensated(fabric: Fabric) -> None:
    async with fabric.worker([Echo()]), fabric.dispatcher() as dispatcher:
        result = await dispatcher.run("demo.echo", {"ok": 1}, compensation=UNDO, wait_s=10)
    assert result.status is Status.SUCCESS
    assert result.compensation_task_id is None


async def test_a_task_the_dispatcher_expires_dispatches_its_compensation(fabric: Fabric) -> None:
    # Given no worker for demo.sleep, and a task with a compensation queued behind a longer
    # one (the broker expires only at the head, so only the dispatcher sees its deadline)
    await fabric.purge("demo.sleep", "demo.echo")
    async with fabric.worker([Echo()]), fabric.dispatcher(supervision=FAST) as dispatcher:
        await dispatcher.submit("demo.sleep", {"seconds": 0}, queue_timeout_s=60)
        stuck = await dispatcher.submit(
            "demo.sleep", {"seconds": 0}, queue_timeout_s=1, compensation=UNDO
        )
        # When the dispatcher decides, at the task's deadline, that it failed
        failed = await stuck.result(10)
        # Then its FAILED timeout links the compensation, and the compensation runs
        assert failed.compensation_task_id == f"{stuck.task_id}.compensation"
        compensated = await dispatcher.result_of(failed.compensation_task_id, timeout_s=10)
    await fabric.purge("demo.sleep")
    assert failed.executor_id.startswith("dispatcher:")
    assert failed.error is not None and failed.error.code is ErrorCode.TIMEOUT
    assert compensated.status is Status.SUCCESS
    assert compensated.output["undo"] == "charge-42"
    assert compensated.output["compensates"]["task_id"] == stuck.task_id
    assert compensated.output["compensates"]["error"]["code"] == "timeout"


def test_a_compensation_derived_twice_is_one_task() -> None:
    # Given a task that names a compensation, and its failure
    task = Task.create("demo.fail", {}, compensation=UNDO)
    error = ErrorInfo(code=ErrorCode.EXECUTOR_ERROR, message="boom")
    # When the failure is decided twice (a worker after a redelivery, the reaper, anyone)
    first, second = compensation_of(task, error), compensation_of(task, error)
    # Then both derive the same task: id, token, node and idempotency key, so it runs once
    assert first is not None and first == second
    assert first.task_id == first.idempotency_key == f"{task.task_id}.compensation"
    assert first.token != task.token and first.node_id == f"{task.node_id}:compensate"


async def test_a_task_published_twice_is_decided_and_compensated_once(fabric: Fabric) -> None:
    await fabric.purge("demo.fail", "demo.echo")
    undo = Undo()
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with (
        connection,
        # no recent results kept: the copy is refused, not answered again from memory
        fabric.worker([Fail(), undo], concurrency=1, recent_results=0),
        fabric.dispatcher() as dispatcher,
    ):
        channel = await connection.channel(publisher_confirms=True)
        wire = await channel.declare_queue(exclusive=True)
        await wire.bind(RESULTS_EXCHANGE, dispatcher.reply_to)
        # Given a task that fails for good and names a compensation, published twice (as a
        # publisher retrying after a lost confirm does)
        task = dispatcher.task("demo.fail", {"mode": "permanent"}, compensation=UNDO)
        handle = await dispatcher.submit_task(task)
        tasks = await channel.get_exchange(TASKS_EXCHANGE)
        again = to_amqp(task_message(task, fabric.signer))
        await tasks.publish(again, task.capability, mandatory=True)
        # When a marker queued after both copies is answered (a single slot takes the queue
        # in order: the copies and the compensation are behind us then)
        failed = await handle.result(10)
        marker = await dispatcher.run("demo.echo", {"undo": "marker"}, wait_s=10)
        compensation_id = f"{task.task_id}.compensation"
        compensated = await dispatcher.result_of(compensation_id, timeout_s=10)
        seen: list[Result] = []
        await eventually(
            lambda: _collect(wire, seen, lambda r: r.task_id == marker.task_id, 1),
            what="the marker on the wire",
        )
    # Then the task was decided once: the second copy, no broker redelivery, was refused as
    # a replay (dead-lettered, answered to nobody), so one FAILED went out, linked
    decisions = [r for r in seen if r.task_id == task.task_id]
    assert [r.compensation_task_id for r in decisions] == [compensation_id]
    assert failed.compensation_task_id == compensation_id
    assert compensated.status is Status.SUCCESS
    # and the compensation ran once, under one idempotency key
    compensations = [run for run in undo.runs if run[0] != marker.task_id]
    assert compensations == [(compensation_id, compensation_id)]
    dead = await list_dead_letters(fabric.endpoint.amqp_url, "demo.fail")
    assert [d.code for d in dead if d.task_id == task.task_id] == [ErrorCode.REPLAYED]


async def _collect(
    wire: aio_pika.abc.AbstractQueue,
    seen: list[Result],
    wanted: Callable[[Result], bool],
    count: int,
) -> bool:
    """Read the results on the wire into ``seen``; True once ``count`` match ``wanted``."""
    while (message := await wire.get(fail=False, no_ack=True)) is not None:
        seen.append(decode(message.body, Result))
    return sum(1 for result in seen if wanted(result)) >= count
