"""Backpressure is explicit: a full queue refuses, a blocked broker is reported, nothing is lost.

A capability ``bp.full`` with ``max_length = 5`` (``reject-publish``, from the default limits)
is added to the session's topology; no worker serves it until a test starts one.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import tomllib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.test_cli import assert_one_line_error, wayang
from wayang_mq import Executor, Task
from wayang_mq.amqp.connect import management_client
from wayang_mq.core.errors import Backpressure, BrokerBlocked
from wayang_mq.core.model import JsonLike
from wayang_mq.core.names import task_queue
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.ledger import Ledger
from wayang_mq.testing.plugin import BrokerHandle
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import parse_topology

FULL = "bp.full"
BLOCKED = "bp.blocked"
LIMIT = 5
EXTRA_TOPOLOGY = f"""
[capabilities."{FULL}"]
max_length = {LIMIT}

[capabilities."{BLOCKED}"]
"""
WAIT_S = 1.0  # DispatcherConfig.backpressure_wait_s: how long a refusal is retried
# Longer than the tasks live in these tests, so none expires into the dead-letter queues.
QUEUE_TIMEOUT_S = 300.0


class Fill(Executor):
    """Serves ``bp.full``: answers with its input."""

    serves = (FULL,)

    async def execute(self, task: Task) -> JsonLike:
        return task.input


@pytest.fixture(scope="module")
async def bp_fabric(fabric: Fabric) -> Fabric:
    """The session fabric with bp.full and bp.blocked added (apply is additive)."""
    topology = parse_topology(tomllib.loads(EXTRA_TOPOLOGY), source="test_backpressure")
    await apply_topology(topology, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
    return fabric


@pytest.fixture
async def empty_full_queue(bp_fabric: Fabric) -> AsyncIterator[Fabric]:
    """bp.full empty before and after the test (leftovers would expire into dead letters)."""
    await bp_fabric.purge(FULL)
    yield bp_fabric
    await bp_fabric.purge(FULL)


async def test_a_full_queue_refuses_the_next_task_with_backpressure_and_never_enqueues_it(
    empty_full_queue: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    fabric = empty_full_queue
    caplog.set_level(logging.INFO, logger="wayang_mq")
    async with fabric.dispatcher(backpressure_wait_s=WAIT_S) as dispatcher:
        # Given no worker, and bp.full filled to its max-length
        for n in range(LIMIT):
            await dispatcher.submit(FULL, {"n": n}, queue_timeout_s=QUEUE_TIMEOUT_S)
        assert await fabric.depth(FULL) == LIMIT
        # (RabbitMQ checks the limit before it enqueues, so it takes exactly one more: the
        # overshoot DESIGN.md documents; a publish is refused once the queue is past the limit)
        await dispatcher.submit(FULL, {"n": LIMIT}, queue_timeout_s=QUEUE_TIMEOUT_S)
        assert await fabric.depth(FULL) == LIMIT + 1
        # When one more task is submitted
        with pytest.raises(Backpressure) as refused:
            await dispatcher.submit(FULL, {"n": "refused"}, queue_timeout_s=QUEUE_TIMEOUT_S)
    # Then it raises Backpressure naming the queue, after retrying the refused publish
    assert refused.value.queue == task_queue(FULL)
    assert task_queue(FULL) in refused.value.one_line()
    assert "event=task.backpressure" in caplog.text
    # and none of its attempts was enqueued: the queue holds exactly what it held
    assert await fabric.depth(FULL) == LIMIT + 1


async def test_the_cli_submit_to_a_full_queue_exits_5_with_one_line_naming_it(
    empty_full_queue: Fabric,
) -> None:
    fabric = empty_full_queue
    env = {
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_MANAGEMENT_URL": fabric.endpoint.management_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
    }
    # Given bp.full past its limit
    async with fabric.dispatcher() as dispatcher:
        for n in range(LIMIT + 1):
            await dispatcher.submit(FULL, {"n": n}, queue_timeout_s=QUEUE_TIMEOUT_S)
    # When the CLI submits one more (it retries for the default 10 s, then gives up)
    run = await asyncio.to_thread(wayang, "submit", FULL, env=env)
    # Then it exits 5 with one line naming the full queue, and did not enqueue the task
    assert_one_line_error(run, 5, task_queue(FULL), "full")
    assert await fabric.depth(FULL) == LIMIT + 1


async def test_after_backpressure_every_confirmed_task_gets_one_result_and_the_refused_none(
    empty_full_queue: Fabric,
) -> None:
    fabric = empty_full_queue
    management = management_client(fabric.endpoint)
    async with (
        fabric.dispatcher(backpressure_wait_s=WAIT_S) as dispatcher,
        Ledger.for_dispatcher(dispatcher, management) as ledger,
    ):
        # Given bp.full past its limit, and one more task refused with Backpressure
        handles = [
            await ledger.submit(dispatcher, FULL, {"n": n}, queue_timeout_s=QUEUE_TIMEOUT_S)
            for n in range(LIMIT + 1)
        ]
        refused = await ledger.submit(dispatcher, FULL, {"n": "refused"})
        assert refused is None and len(ledger.refused_ids) == 1
        # When a worker for bp.full starts and drains the queue
        async with fabric.worker([Fill()], executor_id="bp-fill"):
            results = [await ledger.collect(h, 30) for h in handles if h is not None]
            report = await ledger.check(drain_timeout_s=20)
    # Then every confirmed task got exactly one result, in the order they were queued
    assert [r.output if r else None for r in results] == [{"n": n} for n in range(LIMIT + 1)]
    assert (report.confirmed, report.delivered, report.on_wire) == (LIMIT + 1,) * 3
    assert report.ok, report.render()
    # and the refused one none: it was never taken, so it never ran
    assert report.refused == 1 and report.refused_but_answered == ()


# -- a blocked connection ---------------------------------------------------------------------

# Only so that a hang fails the test instead of the suite. Giving up takes a client one
# unanswered confirm (max(5 s, its backpressure wait): the publish that made the broker block
# it) plus the backpressure wait for the alarm to clear: about 6 s here, 20 s for the CLI.
HANG_GUARD_S = 90.0


def _memory_watermark(rabbitmq: BrokerHandle) -> str:
    """The broker's relative memory watermark now, to put it back afterwards (default 0.4)."""
    out = rabbitmq.ctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    try:
        return str(float(out.strip()))
    except ValueError:
        return "0.4"


async def _memory_alarm(rabbitmq: BrokerHandle, watermark: str, *, raised: bool) -> None:
    """Set the broker's memory watermark; wait until its memory alarm is raised or cleared."""
    await asyncio.to_thread(rabbitmq.ctl, "set_vm_memory_high_watermark", watermark)

    async def in_effect() -> bool:
        alarms = await asyncio.to_thread(rabbitmq.ctl, "eval", "rabbit_alarm:get_alarms().")
        return ("memory" in alarms) == raised

    await eventually(in_effect, what=f"the memory alarm {'raised' if raised else 'cleared'}")


async def test_a_publish_while_the_broker_blocks_is_reported_as_broker_blocked_and_exit_5(
    bp_fabric: Fabric, rabbitmq: BrokerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    fabric = bp_fabric
    env = {
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_MANAGEMENT_URL": fabric.endpoint.management_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
    }
    previous = await asyncio.to_thread(_memory_watermark, rabbitmq)
    caplog.set_level(logging.INFO, logger="wayang_mq")
    await fabric.purge(BLOCKED)
    try:
        async with fabric.dispatcher(backpressure_wait_s=WAIT_S) as dispatcher:
            try:
                # Given a broker memory alarm: the broker blocks connections that publish
                await _memory_alarm(rabbitmq, "0.00001", raised=True)
                # When the CLI submits a task, and a dispatcher submits one, during the alarm
                run, submitted = await asyncio.gather(
                    asyncio.to_thread(
                        wayang,
                        "submit",
                        BLOCKED,
                        "--queue-timeout",
                        str(QUEUE_TIMEOUT_S),
                        env=env,
                        timeout=HANG_GUARD_S,
                    ),
                    asyncio.wait_for(
                        dispatcher.submit(BLOCKED, {}, queue_timeout_s=QUEUE_TIMEOUT_S),
                        HANG_GUARD_S,
                    ),
                    return_exceptions=True,
                )
                # and the dispatcher submits again while the alarm holds: now the connection
                # is known to be blocked, so the publish waits before it is even sent
                again = await asyncio.wait_for(
                    _raised(dispatcher.submit(BLOCKED, {}, queue_timeout_s=QUEUE_TIMEOUT_S)),
                    HANG_GUARD_S,
                )
            finally:
                # Cleared before the dispatcher closes: a blocked connection cannot even close.
                await _memory_alarm(rabbitmq, previous, raised=False)
            # (RabbitMQ stops reading a blocked connection, and reads what it had written once
            # the alarm clears: each first publish lands now; wait for both, then drop them)
            await eventually(
                lambda: _landed(fabric, 2), what=f"the blocked publishes reaching {BLOCKED}"
            )
    finally:
        await fabric.purge(BLOCKED)
    # Then the dispatcher's caller gets the typed, retryable BrokerBlocked, not a hang
    assert isinstance(submitted, BrokerBlocked), submitted
    assert submitted.retryable and "blocked" in submitted.one_line()
    # (the first while its confirm was owed, the second before it was sent)
    assert isinstance(again, BrokerBlocked), again
    # and a publish the broker holds is not treated as lost: never queued up to be sent again
    assert "event=publish.resending" not in caplog.text
    # and the block is logged as a structured event an operator can alert on
    assert "event=broker.blocked" in caplog.text
    # and the CLI exits 5 with one line saying the broker blocked publishing
    assert isinstance(run, subprocess.CompletedProcess), run
    assert_one_line_error(run, 5, "blocked")


async def _landed(fabric: Fabric, count: int) -> bool:
    return await fabric.depth(BLOCKED) == count


async def _raised(submitting: Any) -> BaseException | None:
    """What ``submitting`` raised (None if it returned)."""
    try:
        await submitting
    except Exception as exc:  # the test asserts which
        return exc
    return None
