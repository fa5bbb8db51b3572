"""A dispatcher's outstanding tasks are bounded: ``DispatcherConfig.max_outstanding``.

A capability ``os.held`` is added to the session's topology; no worker serves it until a test
starts one, so every task submitted to it stays outstanding.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import AsyncIterator

import pytest

from wayang_mq import ErrorCode, Executor, Status, Task
from wayang_mq.amqp.connect import management_client
from wayang_mq.client.outstanding import Slots
from wayang_mq.client.supervisor import SupervisionConfig
from wayang_mq.core.errors import Backpressure, NoExecutor, TooManyOutstanding
from wayang_mq.core.model import JsonLike
from wayang_mq.testing.harness import Fabric
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import parse_topology

HELD = "os.held"
LIMIT = 5
WAIT_S = 0.5  # DispatcherConfig.backpressure_wait_s: how long a submit waits for a slot
GUARD_S = 20.0  # a wait the test expects to end well before this (only so a hang fails)
QUEUE_TIMEOUT_S = 300.0  # longer than the tests: nothing expires into the dead letters
FAST = SupervisionConfig(deadline_grace_ms=200, check_interval_s=0.2, status_wait_s=0.2)


class Held(Executor):
    """Serves ``os.held``: answers with its input."""

    serves = (HELD,)

    async def execute(self, task: Task) -> JsonLike:
        return task.input


@pytest.fixture(scope="module")
async def held_fabric(fabric: Fabric) -> Fabric:
    """The session fabric with os.held added (apply is additive)."""
    spec = f'[capabilities."{HELD}"]\n'
    topology = parse_topology(tomllib.loads(spec), source="test_outstanding")
    await apply_topology(topology, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
    return fabric


@pytest.fixture
async def held(held_fabric: Fabric) -> AsyncIterator[Fabric]:
    """os.held empty before and after the test."""
    await held_fabric.purge(HELD)
    yield held_fabric
    await held_fabric.purge(HELD)


async def test_past_max_outstanding_a_submit_waits_then_raises_too_many_outstanding(
    held: Fabric,
) -> None:
    config = {"max_outstanding": LIMIT, "backpressure_wait_s": WAIT_S}
    async with held.dispatcher(**config) as dispatcher:
        # Given no worker, and max_outstanding tasks submitted and unanswered
        for n in range(LIMIT):
            await dispatcher.submit(HELD, {"n": n}, queue_timeout_s=QUEUE_TIMEOUT_S)
        assert dispatcher.outstanding == LIMIT
        # When one more is submitted
        started = time.monotonic()
        with pytest.raises(TooManyOutstanding) as refused:
            await dispatcher.submit(HELD, {"n": "one too many"}, queue_timeout_s=QUEUE_TIMEOUT_S)
        waited = time.monotonic() - started
        # Then it waited the backpressure wait for a task to end, then was refused with the
        # typed, retryable Backpressure a full queue raises, naming the limit and what to do
        assert WAIT_S <= waited < GUARD_S
        assert isinstance(refused.value, Backpressure) and refused.value.retryable
        assert refused.value.limit == LIMIT
        line = refused.value.one_line()
        assert f"{LIMIT} tasks" in line and "max_outstanding" in line and "await results" in line
        # and it was never published, nor does it count as outstanding
        assert await held.depth(HELD) == LIMIT
        assert dispatcher.outstanding == LIMIT


async def test_a_waiting_submit_proceeds_once_a_worker_answers_a_task(held: Fabric) -> None:
    config = {"max_outstanding": LIMIT, "backpressure_wait_s": GUARD_S}
    async with held.dispatcher(**config) as dispatcher:
        # Given max_outstanding tasks outstanding, and one more submit waiting for a slot
        handles = [
            await dispatcher.submit(HELD, {"n": n}, queue_timeout_s=QUEUE_TIMEOUT_S)
            for n in range(LIMIT)
        ]
        sixth = asyncio.create_task(
            dispatcher.submit(HELD, {"n": LIMIT}, queue_timeout_s=QUEUE_TIMEOUT_S)
        )
        await asyncio.sleep(0.3)
        assert not sixth.done()
        # When a worker starts and answers them
        async with held.worker([Held()], executor_id="os-held"):
            first = await handles[0].result(GUARD_S)
            # Then the waiting submit proceeds (long before its wait ran out) and is answered
            handle = await asyncio.wait_for(sixth, GUARD_S)
            result = await handle.result(GUARD_S)
            rest = [await h.result(GUARD_S) for h in handles[1:]]
    assert first.status is Status.SUCCESS and result.output == {"n": LIMIT}
    assert [r.output for r in rest] == [{"n": n} for n in range(1, LIMIT)]
    # and every answered task gave its slot back
    assert dispatcher.outstanding == 0


async def test_a_resubmit_of_an_outstanding_task_returns_its_handle_without_a_slot(
    held: Fabric,
) -> None:
    config = {"max_outstanding": 1, "backpressure_wait_s": WAIT_S}
    async with held.dispatcher(**config) as dispatcher:
        # Given one task outstanding, the limit
        handle = await dispatcher.submit(HELD, {}, task_id="os-again", queue_timeout_s=300)
        # When the same task id is submitted again
        started = time.monotonic()
        again = await dispatcher.submit(HELD, {}, task_id="os-again", queue_timeout_s=300)
        # Then it is answered at once with the outstanding task's handle (no slot waited for)
        assert time.monotonic() - started < WAIT_S
        assert again.task_id == handle.task_id and again.traceparent == handle.traceparent
        assert dispatcher.outstanding == 1
        assert await held.depth(HELD) == 1


async def test_an_outstanding_task_keeps_its_trace_however_many_tasks_come_after_it(
    held: Fabric,
) -> None:
    # Given a dispatcher that remembers the last 2 tasks' traces, and one task outstanding
    async with held.dispatcher(seen_results=2, max_outstanding=10) as dispatcher:
        first = await dispatcher.submit(HELD, {}, task_id="os-traced", queue_timeout_s=300)
        # When more tasks than it remembers are submitted after it
        for n in range(4):
            await dispatcher.submit(HELD, {"n": n}, queue_timeout_s=QUEUE_TIMEOUT_S)
        # Then the outstanding task's trace is still known: a resubmit (as an expiry, a
        # re-dispatch or a compensation would) continues the trace it was published in
        again = await dispatcher.submit(HELD, {}, task_id="os-traced", queue_timeout_s=300)
        assert first.traceparent is not None and again.traceparent == first.traceparent


async def test_a_failed_publish_gives_its_slot_back(held: Fabric) -> None:
    config = {"max_outstanding": 2, "backpressure_wait_s": WAIT_S}
    async with held.dispatcher(**config) as dispatcher:
        # Given one task outstanding of two allowed
        await dispatcher.submit(HELD, {}, queue_timeout_s=QUEUE_TIMEOUT_S)
        # When submits fail to publish, more often than there are slots
        for _ in range(3):
            with pytest.raises(NoExecutor):
                await dispatcher.submit("os.unserved", {})
        # Then each gave its slot back: the free one is still free
        assert dispatcher.outstanding == 1
        started = time.monotonic()
        await dispatcher.submit(HELD, {}, queue_timeout_s=QUEUE_TIMEOUT_S)
        assert time.monotonic() - started < WAIT_S
        assert dispatcher.outstanding == 2


async def test_a_task_the_dispatcher_expires_gives_its_slot_to_a_waiting_submit(
    held: Fabric,
) -> None:
    config = {"max_outstanding": 2, "backpressure_wait_s": GUARD_S, "supervision": FAST}
    async with held.dispatcher(**config) as dispatcher:
        # Given the limit outstanding: a 1 s task queued behind a long one (so the broker
        # cannot expire it at the head; the dispatcher's own deadline ends it), and one
        # more submit waiting for a slot
        await dispatcher.submit(HELD, {"n": "head"}, queue_timeout_s=QUEUE_TIMEOUT_S)
        short = await dispatcher.submit(HELD, {"n": "short"}, queue_timeout_s=1)
        waiting = asyncio.create_task(
            dispatcher.submit(HELD, {"n": "waiting"}, queue_timeout_s=QUEUE_TIMEOUT_S)
        )
        # When the short task's deadline passes
        expired = await short.result(GUARD_S)
        # Then it ends FAILED timeout, and the waiting submit takes its slot
        assert expired.error is not None and expired.error.code is ErrorCode.TIMEOUT
        await asyncio.wait_for(waiting, GUARD_S)
        assert dispatcher.outstanding == 2


async def test_slots_are_handed_out_first_come_first_served_and_a_give_up_loses_none() -> None:
    # Given a gate of one slot, taken, and three submits waiting in turn
    slots = Slots(1)
    assert await slots.take(0)
    order: list[str] = []

    async def wait(name: str, wait_s: float) -> None:
        if await slots.take(wait_s):
            order.append(name)

    waiters = [asyncio.create_task(wait(name, GUARD_S)) for name in ("a", "b")]
    quitter = asyncio.create_task(wait("quits", GUARD_S))
    await asyncio.sleep(0)
    assert slots.waiting == 3
    # When the third gives up (cancelled) and slots come back one by one
    quitter.cancel()
    for _ in range(3):
        slots.give_back()
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
    # Then they went in the order the submits came, the quitter took none, and none was lost
    assert order == ["a", "b"]
    assert slots.taken == 0
    assert await slots.take(0)
