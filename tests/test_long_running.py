"""Answer later, and run long: an executor may accept a task with PENDING and have it answered
later through a documented API; a long-running executor's task outlives the broker's
``consumer_timeout`` and survives its worker's death (real broker, timeout lowered to 2 s)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest

from wayang_mq import ErrorCode, ErrorInfo, Executor, Middleware, Pending, Status, Task, TaskRef
from wayang_mq.amqp.outcome import Kind
from wayang_mq.client.dispatcher import ResultSeen, Verdict
from wayang_mq.client.supervisor import SupervisionConfig
from wayang_mq.core.model import JsonLike, Result, now_ms
from wayang_mq.core.names import RESULTS_EXCHANGE
from wayang_mq.core.wire import decode
from wayang_mq.runtime.answers import Answers
from wayang_mq.runtime.middleware import Settled
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.plugin import BrokerHandle

FAST = SupervisionConfig(deadline_grace_ms=200, check_interval_s=0.1, status_wait_s=0.2)
CONSUMER_TIMEOUT_MS = 2000


class Inbox(Executor):
    """``approval.request``: files the task for a person and answers PENDING."""

    serves = ("approval.request",)

    def __init__(self) -> None:
        self.filed: list[TaskRef] = []

    async def execute(self, task: Task) -> JsonLike | Pending:
        self.filed.append(TaskRef.of(task))
        return Pending({"inbox": "approvals", "position": len(self.filed)})


class Agent(Executor):
    """``agent.reason``: thinks for ``seconds``; long-running unless told otherwise."""

    serves = ("agent.reason",)
    long_running = True

    def __init__(self) -> None:
        self.runs = 0

    async def execute(self, task: Task) -> JsonLike:
        self.runs += 1
        seconds = task.input.get("seconds", 0)
        assert isinstance(seconds, int | float)
        await asyncio.sleep(seconds)
        return {"thought_s": seconds}


class HeldAgent(Agent):
    """The same work, holding its delivery the whole time (the way Celery does)."""

    long_running = False


@pytest.fixture(autouse=True)
def _daemons_stopped(fabric: Fabric) -> Iterator[None]:
    yield
    fabric.stop_processes()


@pytest.fixture
async def short_consumer_timeout(rabbitmq: BrokerHandle) -> AsyncIterator[None]:
    """The broker closes the channel of a delivery held over 2 s, checking every 0.5 s (for
    channels opened meanwhile; restored afterwards)."""
    if not rabbitmq.can_restart:
        pytest.fail("these tests need a broker whose settings they can change (rabbitmqctl)")

    def set_env(key: str, value: int) -> None:
        rabbitmq.ctl("eval", f"application:set_env(rabbit, {key}, {value}).")

    await asyncio.to_thread(set_env, "consumer_timeout", CONSUMER_TIMEOUT_MS)
    await asyncio.to_thread(set_env, "channel_tick_interval", 500)
    try:
        yield
    finally:
        await asyncio.to_thread(set_env, "consumer_timeout", 1_800_000)
        await asyncio.to_thread(set_env, "channel_tick_interval", 60_000)


async def test_pending_then_a_later_success_reaches_the_dispatcher(fabric: Fabric) -> None:
    # Given an inbox executor that accepts tasks for a person to decide
    await fabric.purge("approval.request")
    inbox = Inbox()
    seen: list[ResultSeen] = []
    async with fabric.worker([inbox]), fabric.dispatcher(supervision=FAST) as dispatcher:
        dispatcher.observe(seen.append)
        handle = await dispatcher.submit("approval.request", {"amount": 120}, queue_timeout_s=0.5)

        # When the executor answers PENDING
        accepted = await handle.accepted(timeout_s=10)

        # Then the dispatcher has a PENDING result with the executor's details, and the task
        # is not expired after its queue deadline passes (it was started and accepted)
        assert accepted.status is Status.PENDING
        assert accepted.output == {"inbox": "approvals", "position": 1}
        assert not handle.done()
        ref = inbox.filed[0]
        await eventually(
            lambda: dispatcher.is_accepted(ref.task_id), what="the task marked accepted"
        )
        expired_by = handle.task.deadline_ms + FAST.deadline_grace_ms + 300  # and a few checks
        await eventually(lambda: now_ms() > expired_by, what="the deadline and grace passing")
        assert not handle.done()

        # When a person decides later, from a stored reference, in another process's shoes
        stored = ref.model_dump_json()
        async with Answers(fabric.endpoint.amqp_url, fabric.signer, "approver-1") as answers:
            stale = TaskRef.model_validate_json(stored).model_copy(update={"token": "stale"})
            await answers.succeed(stale, {"approved": False})
            await answers.succeed(TaskRef.model_validate_json(stored), {"approved": True})

        # Then the dispatcher hands out the later SUCCESS; the stale-token answer was fenced
        result = await handle.result(timeout_s=10)
        assert result.status is Status.SUCCESS
        assert result.output == {"approved": True}
        assert result.executor_id == "approver-1"
        verdicts = [s.verdict for s in seen if s.result and s.result.task_id == ref.task_id]
        assert verdicts == [Verdict.NOT_TERMINAL, Verdict.FENCED, Verdict.HANDED_OUT]


async def test_a_held_delivery_loses_its_channel_at_the_consumer_timeout(
    fabric: Fabric, short_consumer_timeout: None, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the lowered consumer_timeout, and an executor that holds its delivery while it runs
    await fabric.purge("agent.reason")
    caplog.set_level(logging.INFO, logger="wayang_mq")
    held = HeldAgent()
    async with fabric.worker([held]), fabric.dispatcher() as dispatcher:
        # When a task runs past the timeout
        handle = await dispatcher.submit("agent.reason", {"seconds": 3.5})
        await handle.result(timeout_s=30)

        # Then the broker took the delivery back (the ack found its channel closed): the
        # failure mode the long-running path exists for, so the next test is meaningful
        await eventually(
            lambda: "delivery.unsettled" in caplog.text, what="the ack finding its channel closed"
        )


async def test_a_long_running_task_outlives_the_consumer_timeout(
    fabric: Fabric, short_consumer_timeout: None, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a long-running executor and the lowered consumer_timeout
    await fabric.purge("agent.reason")
    caplog.set_level(logging.INFO, logger="wayang_mq")
    agent = Agent()
    async with fabric.worker([agent]), fabric.dispatcher() as dispatcher:
        # When a task runs well past the timeout
        handle = await dispatcher.submit("agent.reason", {"seconds": 3.5})

        # Then it is accepted at once (PENDING) and later answered SUCCESS, run exactly once,
        # and no delivery lost its channel
        accepted = await handle.accepted(timeout_s=10)
        assert accepted.status is Status.PENDING
        result = await handle.result(timeout_s=30)
        assert result.status is Status.SUCCESS
        assert result.output == {"thought_s": 3.5}
        assert agent.runs == 1
        assert "delivery.unsettled" not in caplog.text


async def test_a_long_running_task_whose_worker_dies_is_redispatched_and_completes(
    fabric: Fabric, short_consumer_timeout: None
) -> None:
    # Given a long-running worker daemon that will die mid-task, and a second one
    await fabric.purge("demo.sleep")
    doomed = fabric.spawn_worker(["wayang_workers.demo:LongSleep"], executor_id="long-doomed")
    await doomed.until_logged("event=worker.started")
    async with fabric.dispatcher(supervision=FAST) as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 4}, heartbeat_timeout_s=2)
        accepted = await handle.accepted(timeout_s=10)
        assert accepted.status is Status.PENDING
        assert accepted.executor_id == "long-doomed"

        # When its worker is killed (kill -9) while the acked task runs
        await doomed.until_logged(f"event=task.accepted task_id={handle.task_id}")
        doomed.signal(signal.SIGKILL)
        doomed.wait()
        survivor = fabric.spawn_worker(
            ["wayang_workers.demo:LongSleep"], executor_id="long-survivor"
        )
        await survivor.until_logged("event=worker.started")

        # Then heartbeat supervision re-dispatches it and the survivor answers it
        result = await handle.result(timeout_s=60)
        assert result.status is Status.SUCCESS
        assert result.executor_id == "long-survivor"
        assert result.attempt == 2


async def test_a_person_refusing_answers_the_task_failed_with_their_reason(fabric: Fabric) -> None:
    # Given a task waiting in the inbox
    await fabric.purge("approval.request")
    inbox = Inbox()
    async with fabric.worker([inbox]), fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("approval.request", {"amount": 9000})
        assert (await handle.accepted(timeout_s=10)).status is Status.PENDING

        # When the person refuses it
        refusal = ErrorInfo(code=ErrorCode.EXECUTOR_ERROR, message="over the approver's limit")
        async with Answers(fabric.endpoint.amqp_url, fabric.signer, "approver-2") as answers:
            await answers.fail(inbox.filed[0], refusal)

        # Then the caller gets FAILED with that reason, from the approver
        result = await handle.result(timeout_s=10)
    assert result.status is Status.FAILED
    assert result.error == refusal
    assert result.executor_id == "approver-2"
    assert result.token == handle.task.token


class Instant(Executor):
    """A long-running executor whose task ends at once: its answer races its own PENDING."""

    serves = ("agent.reason",)
    long_running = True

    async def execute(self, task: Task) -> JsonLike:
        return {"done": task.input}


class SlowToSettle(Middleware):
    """Takes its time over a PENDING outcome, as a layer that writes it to a database would."""

    async def on_settled(self, settled: Settled) -> None:
        if settled.outcome.kind is Kind.PENDING:
            await asyncio.sleep(0.3)


class Order(Middleware):
    """Records the outcomes in the order the worker settled them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, Kind]] = []

    async def on_settled(self, settled: Settled) -> None:
        self.seen.append((settled.outcome.task_id, settled.outcome.kind))


async def test_a_long_task_that_ends_at_once_answers_after_its_pending_never_before(
    fabric: Fabric,
) -> None:
    await fabric.purge("agent.reason")
    order = Order()
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with (
        connection,
        fabric.worker([Instant()], middleware=(SlowToSettle(), order)),
        fabric.dispatcher() as dispatcher,
    ):
        channel = await connection.channel()
        # a second queue on the dispatcher's reply address sees every result in wire order
        replies = await channel.declare_queue(exclusive=True)
        await replies.bind(RESULTS_EXCHANGE, dispatcher.reply_to)
        handles = [await dispatcher.submit("agent.reason", {"n": n}) for n in range(3)]
        wire: dict[str, list[str]] = {handle.task_id: [] for handle in handles}

        async def all_answered() -> bool:
            while (message := await replies.get(fail=False, no_ack=True)) is not None:
                result = decode(message.body, Result)
                wire[result.task_id].append(result.status.value)
            return all(len(seen) == 2 for seen in wire.values())

        await eventually(all_answered, what="PENDING and SUCCESS for each task")
    # the terminal answer waits until its PENDING is settled, slow middleware included: a
    # client, and every layer, sees the acceptance first, never the answer and then "pending"
    assert all(seen == ["PENDING", "SUCCESS"] for seen in wire.values()), wire
    for handle in handles:
        kinds = [kind for task_id, kind in order.seen if task_id == handle.task_id]
        assert kinds == [Kind.PENDING, Kind.DONE], order.seen
