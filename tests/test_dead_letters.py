"""Dead letters end in a terminal FAILED result and stay inspectable (real broker, real daemons).

The reaper turns the broker's dead letters (expired, delivery limit, rejected by a consumer,
dropped by a full queue) into FAILED results at the task's reply address, and dispatches the
compensation a dead task names; workers' own dead letters (bad input) are not answered twice;
every dead letter waits in ``wayang.dead.<capability>``, where it can be listed, replayed and
purged.

Scenarios with a dispatcher end with the ledger check (``wayang_mq.testing.ledger``): every task the
broker confirmed got exactly one terminal result, the queues drained, and every dead letter of
those tasks was answered FAILED. Tasks published raw (as a foreign client would) are checked
with a tap on their reply address instead: exactly one terminal result each, read after a
barrier (the reaper's verdict on the copy, or a marker dead letter the reaper answers after
everything queued before it).
The dispatchers here run without their own deadline supervision (``supervision=None``), so a
timeout can only come from the reaper.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from wayang_workers.demo import Echo

from wayang_mq import Compensation, ErrorCode, Executor, Status, Task
from wayang_mq.amqp.connect import management_client
from wayang_mq.client.dispatcher import TaskHandle
from wayang_mq.core.model import JsonLike, Result, new_id
from wayang_mq.core.names import (
    DEAD_LETTER_EXCHANGE,
    RESULTS_EXCHANGE,
    TASKS_EXCHANGE,
    dead_queue,
    task_queue,
)
from wayang_mq.core.scopes import FULL_TRUST, KeyScope, Role
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import DEAD_LETTERED_BY_HEADER, decode, encode
from wayang_mq.ops.deadletters import list_dead_letters, purge, read_dead_letter, replay
from wayang_mq.ops.reaper import Handled, Reaper
from wayang_mq.testing.harness import Fabric, WorkerProcess, eventually
from wayang_mq.testing.ledger import Ledger
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import parse_topology

pytestmark = pytest.mark.timeout(180)

GARBAGE = b"\xc1\xc1 not msgpack"
REJECTED = "dl.rejected"  # a capability whose tasks a foreign consumer rejects
DROPPED = "dl.dropped"  # a capability whose full queue drops its oldest task
DROP_AFTER = 1  # dl.dropped's max-length


class ReplyTap:
    """Every result the broker routes to one reply address, duplicates included (for tasks
    published raw, which the project's Ledger cannot record, and to read the results)."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue, reply_to: str) -> None:
        self._queue = queue
        self.reply_to = reply_to
        self.results: list[Result] = []

    async def collect(self) -> list[Result]:
        """Take whatever arrived since the last call."""
        while (message := await self._queue.get(no_ack=True, fail=False)) is not None:
            self.results.append(decode(message.body, Result))
        return self.results

    async def wait_for(self, task_id: str) -> Result:
        """The first result for ``task_id``."""

        async def arrived() -> bool:
            return task_id in {r.task_id for r in await self.collect()}

        await eventually(arrived, what=f"a result for {task_id} at {self.reply_to}")
        return next(r for r in self.results if r.task_id == task_id)

    def terminal(self, *, besides: str = "") -> list[str]:
        """Task ids of the terminal results taken so far (one entry per result), sorted."""
        return sorted(r.task_id for r in self.results if r.terminal and r.task_id != besides)


async def _tap(connection: aio_pika.abc.AbstractConnection, reply_to: str) -> ReplyTap:
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(RESULTS_EXCHANGE, reply_to)
    return ReplyTap(queue, reply_to)


async def _consumers(fabric: Fabric, queue: str) -> int:
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        assert declared.declaration_result is not None
        return int(declared.declaration_result.consumer_count or 0)


async def _depth(fabric: Fabric, queue: str) -> int:
    """Ready messages in ``queue``, exact (a passive declare)."""
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        assert declared.declaration_result is not None
        return int(declared.declaration_result.message_count or 0)


async def _until_dead(fabric: Fabric, capability: str, task_id: str) -> None:
    async def dead() -> bool:
        letters = await list_dead_letters(fabric.endpoint.amqp_url, capability)
        return task_id in {d.task_id for d in letters}

    await eventually(dead, what=f"{task_id} reaching {dead_queue(capability)}")


async def _publish_raw(
    fabric: Fabric, exchange: str, routing_key: str, body: bytes, **properties: Any
) -> None:
    """Publish as a foreign client could, confirmed."""
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        extra = properties.pop("headers", {})
        message = aio_pika.Message(
            body,
            headers={**fabric.signer.headers(body), **extra},
            content_type="application/msgpack",
            type="wayang.task.v1",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **properties,
        )
        await target.publish(message, routing_key, mandatory=True)


async def _reaper_caught_up(fabric: Fabric, reaper: Reaper, tap: ReplyTap, capability: str) -> str:
    """A barrier: a marker dead letter, answered once the reaper (one dead letter at a time,
    ``prefetch=1``) has answered everything ``wayang.reaper`` held before it. Returns the
    marker's id (its copy stays in ``wayang.dead.<capability>``)."""
    assert reaper.config.prefetch == 1
    marker = f"marker-{new_id()}"
    task = Task.create(capability, {}, task_id=marker, reply_to=tap.reply_to)
    await _publish_raw(
        fabric,
        DEAD_LETTER_EXCHANGE,
        capability,
        encode(task),
        message_id=marker,
        reply_to=tap.reply_to,
    )
    await tap.wait_for(marker)
    return marker


@pytest.fixture(scope="module")
async def dl_fabric(fabric: Fabric) -> Fabric:
    """The session fabric with dl.rejected (default limits) and dl.dropped, whose queue drops
    its oldest task when full (``drop-head``, which RabbitMQ allows only with at-most-once
    dead-lettering) added; apply is additive."""
    management = management_client(fabric.endpoint)
    rejected = parse_topology({"capabilities": {REJECTED: {}}}, source="test_dead_letters")
    # (its own limits, not [defaults]: those are every task queue's, wayang.defaults)
    dropping = parse_topology(
        {
            "capabilities": {
                DROPPED: {
                    "max_length": DROP_AFTER,
                    "overflow": "drop-head",
                    "dead_letter_strategy": "at-most-once",
                }
            },
        },
        source="test_dead_letters",
    )
    for extra in (rejected, dropping):
        await apply_topology(extra, fabric.endpoint.amqp_url, management)
    return fabric


# -- the reaper ----------------------------------------------------------------------------------


async def test_a_task_outliving_its_queue_timeout_ends_failed_timeout_and_stays_dead(
    fabric: Fabric,
) -> None:
    # Given no worker for demo.sleep, and a reaper
    await fabric.purge("demo.sleep")
    await fabric.purge_reaper()
    assert await _consumers(fabric, task_queue("demo.sleep")) == 0
    marker = new_id()
    async with (
        fabric.reaper() as reaper,
        fabric.dispatcher(supervision=None) as dispatcher,
        Ledger.for_dispatcher(dispatcher, management_client(fabric.endpoint)) as ledger,
    ):
        # When a task waits in its queue longer than its queue timeout
        handle = await ledger.submit(
            dispatcher, "demo.sleep", {"marker": marker}, queue_timeout_s=0.5
        )
        assert handle is not None
        result = await ledger.collect(handle, 20)
        # Then the dispatcher gets a terminal FAILED timeout, from the reaper, for that very
        # task (its token and attempt: the reaper verified the body)
        assert result is not None and result.status is Status.FAILED
        assert result.error is not None and result.error.code is ErrorCode.TIMEOUT
        assert result.error.details["dead_letter_reason"] == "expired"
        assert result.executor_id == reaper.reaper_id  # no worker ever ran it
        assert (result.token, result.attempt) == (handle.task.token, 1)
        report = await ledger.check()
    assert (report.confirmed, report.delivered, report.on_wire) == (1, 1, 1)
    # and the task is still inspectable in wayang.dead.demo.sleep, with its reason
    letters = await list_dead_letters(
        fabric.endpoint.amqp_url, "demo.sleep", keyring=fabric.keyring
    )
    assert [(d.task_id, d.code, d.broker_reason, d.attempt) for d in letters] == [
        (handle.task_id, ErrorCode.TIMEOUT, "expired", 1)
    ]
    await fabric.purge("demo.sleep")


async def test_garbage_that_expires_unread_is_answered_to_nobody_and_kept(
    fabric: Fabric,
) -> None:
    # Given a foreign client's unreadable task with a reply address, and no worker to read it
    await fabric.purge("demo.sleep")
    await fabric.purge_reaper()
    task_id, reply_to = new_id(), f"reply.dead-garbage-{new_id()[:8]}"
    async with (
        fabric.reaper(prefetch=1) as reaper,
        await aio_pika.connect(fabric.endpoint.amqp_url) as connection,
    ):
        tap = await _tap(connection, reply_to)
        # When it expires in its queue
        await _publish_raw(
            fabric,
            TASKS_EXCHANGE,
            "demo.sleep",
            GARBAGE,
            message_id=task_id,
            reply_to=reply_to,
            expiration=0.3,
        )
        # Then once the reaper has seen it, and caught up, nothing was answered to the
        # address the unverified message named: its sender chose it (docs/security.md §6)
        await eventually(
            lambda: reaper.handled(task_id) is not None, what="the reaper seeing the dead letter"
        )
        marker = await _reaper_caught_up(fabric, reaper, tap, "demo.sleep")
        assert tap.terminal(besides=marker) == []
        assert reaper.handled(task_id) is Handled.SKIPPED
    # and the dead letter waits in wayang.dead.demo.sleep, for inspection
    letters = await list_dead_letters(fabric.endpoint.amqp_url, "demo.sleep")
    assert (task_id, "expired") in {(d.task_id, d.broker_reason) for d in letters}
    await fabric.purge("demo.sleep")


async def test_a_task_a_consumer_rejects_is_answered_executor_error_and_garbage_is_not(
    dl_fabric: Fabric,
) -> None:
    fabric = dl_fabric
    await fabric.purge(REJECTED)
    await fabric.purge_reaper()
    garbage_id, reply_to = new_id(), f"reply.dead-rejected-{new_id()[:8]}"
    async with (
        fabric.reaper(prefetch=1) as reaper,
        fabric.dispatcher(supervision=None) as dispatcher,
        await aio_pika.connect(fabric.endpoint.amqp_url) as connection,
    ):
        tap = await _tap(connection, reply_to)
        # Given a signed task and a foreign client's unreadable one on dl.rejected
        handle = await dispatcher.submit(REJECTED, {"n": 1}, queue_timeout_s=60)
        await _publish_raw(
            fabric, TASKS_EXCHANGE, REJECTED, GARBAGE, message_id=garbage_id, reply_to=reply_to
        )
        # When a foreign consumer takes each and rejects it without requeueing it
        queue = await (await connection.channel()).get_queue(task_queue(REJECTED), ensure=False)
        for _ in range(2):
            taken: list[aio_pika.abc.AbstractIncomingMessage] = []

            async def took(into: list[aio_pika.abc.AbstractIncomingMessage] = taken) -> bool:
                message = await queue.get(no_ack=False, fail=False)
                if message is not None:
                    into.append(message)
                return bool(into)

            await eventually(took, what=f"a task on {task_queue(REJECTED)}")
            await taken[0].reject(requeue=False)
        # Then the queue dead-letters them (reason "rejected") and the reaper answers the
        # signed one FAILED executor_error, for that very task
        result = await handle.result(30)
        assert (result.status, result.executor_id) == (Status.FAILED, reaper.reaper_id)
        assert result.error is not None and result.error.code is ErrorCode.EXECUTOR_ERROR
        assert result.error.details["dead_letter_reason"] == "rejected"
        assert (result.token, result.error.retryable) == (handle.task.token, False)
        # and the unreadable one is answered to nobody (once the reaper caught up)
        marker = await _reaper_caught_up(fabric, reaper, tap, REJECTED)
        assert tap.terminal(besides=marker) == []
    # and both wait in wayang.dead.dl.rejected with that reason
    letters = await list_dead_letters(fabric.endpoint.amqp_url, REJECTED)
    assert {(d.task_id, d.broker_reason) for d in letters if d.task_id != marker} == {
        (handle.task_id, "rejected"),
        (garbage_id, "rejected"),
    }
    await fabric.purge(REJECTED)


async def test_a_task_a_full_queue_drops_is_answered_backpressure(dl_fabric: Fabric) -> None:
    fabric = dl_fabric
    await fabric.purge(DROPPED)
    await fabric.purge_reaper()
    async with (
        fabric.reaper(prefetch=1),
        fabric.dispatcher(supervision=None) as dispatcher,
    ):
        # Given dl.dropped, no worker, and one task waiting in it (its max-length)
        oldest = await dispatcher.submit(DROPPED, {"n": "oldest"}, queue_timeout_s=60)
        # When one more task is published, and the queue drops its head to take it
        newest = await dispatcher.submit(DROPPED, {"n": "newest"}, queue_timeout_s=60)
        # Then the reaper answers the dropped task FAILED backpressure (retryable: the task
        # was not at fault), for that very task
        result = await oldest.result(30)
        assert result.status is Status.FAILED and result.error is not None
        assert (result.error.code, result.error.retryable) == (ErrorCode.BACKPRESSURE, True)
        assert result.error.details["dead_letter_reason"] == "maxlen"
        assert result.token == oldest.task.token
        # and the newest task still waits in the queue, unanswered
        assert await _depth(fabric, task_queue(DROPPED)) == DROP_AFTER
        assert not newest.done()
    letters = await list_dead_letters(fabric.endpoint.amqp_url, DROPPED)
    assert [(d.task_id, d.broker_reason) for d in letters] == [(oldest.task_id, "maxlen")]
    await fabric.purge(DROPPED)


class CompensationRecorder(Executor):
    """Serves ``demo.echo``, recording the compensations it runs."""

    serves = ("demo.echo",)

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[Task] = []

    async def execute(self, task: Task) -> JsonLike:
        self.ran.append(task)
        return task.input


async def test_the_reaper_dispatches_the_compensation_of_a_task_it_answers(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    # Given no worker for demo.sleep; a reaper signing with a key of its own; a worker for
    # demo.echo that trusts the issuer's key and, for attempt records, that reaper's only
    # (so a compensation runs only when that reaper decided it)
    await fabric.purge("demo.sleep", "demo.echo")
    await fabric.purge_reaper()
    assert await _consumers(fabric, task_queue("demo.sleep")) == 0
    reaper_signer = Signer.generate()
    ring = KeyRing.scoped(
        [
            (fabric.signer.public_key, FULL_TRUST),
            (reaper_signer.public_key, KeyScope(Role.REAPER, "comp-reaper")),
        ]
    )
    undo = CompensationRecorder()
    caplog.set_level(logging.INFO, logger="wayang_mq")
    async with (
        fabric.reaper(signer=reaper_signer, reaper_id="comp-reaper") as reaper,
        fabric.worker([undo], keyring=ring),
        fabric.dispatcher(supervision=None, results_keyring=ring) as dispatcher,
    ):
        # When a task naming a compensation expires in its queue, and another whose
        # compensation's capability has no queue
        compensated = await dispatcher.submit(
            "demo.sleep",
            {"charge": 42},
            queue_timeout_s=1.0,
            compensation=Compensation(capability="demo.echo", input={"undo": "charge-42"}),
        )
        unroutable = await dispatcher.submit(
            "demo.sleep",
            {"charge": 43},
            queue_timeout_s=1.0,
            compensation=Compensation(capability="no.such.queue", input={}),
        )
        # Then the reaper answers it FAILED timeout, linking the compensation it dispatched
        failed = await compensated.result(30)
        assert (failed.status, failed.executor_id) == (Status.FAILED, reaper.reaper_id)
        assert failed.error is not None and failed.error.code is ErrorCode.TIMEOUT
        assert failed.compensation_task_id == f"{compensated.task_id}.compensation"
        # and the compensation runs, signed by the reaper, answered at the same address
        done = await dispatcher.result_of(failed.compensation_task_id, timeout_s=30)
        assert done.status is Status.SUCCESS, done.error
        assert done.output["undo"] == "charge-42"
        assert done.output["compensates"]["task_id"] == compensated.task_id
        assert done.output["compensates"]["error"]["code"] == "timeout"
        assert [t.task_id for t in undo.ran] == [failed.compensation_task_id]
        # and a compensation that cannot be dispatched is logged, while the FAILED result
        # still goes out, linking none
        other = await unroutable.result(30)
        assert other.error is not None and other.error.code is ErrorCode.TIMEOUT
        assert other.compensation_task_id is None
        assert f"event=compensation.failed task_id={unroutable.task_id}" in caplog.text
    await fabric.purge("demo.sleep", "demo.echo")


async def _crash_workers_until_done(
    fabric: Fabric, poison: TaskHandle, name: str, most: int
) -> list[WorkerProcess]:
    """Start a worker daemon (one task at a time) whenever the previous one has died, until
    ``poison`` has its result; then make sure one is still alive for the tasks behind it."""
    daemons: list[WorkerProcess] = []

    def start(executor_id: str) -> None:
        args = ["--concurrency", "1"]
        daemons.append(
            fabric.spawn_worker(["wayang_workers.demo:Fail"], executor_id=executor_id, args=args)
        )

    def replace_the_dead_until_done() -> bool:
        if poison.done():
            return True
        if not daemons or daemons[-1].process.poll() is not None:
            assert len(daemons) <= most, "the poison task was never dead-lettered"
            start(f"{name}-{len(daemons)}")
        return False

    await eventually(replace_the_dead_until_done, timeout_s=120, what="the poison task's result")
    if daemons[-1].process.poll() is not None:
        start(f"{name}-after")
    return daemons


async def test_a_poison_task_ends_failed_delivery_limit_and_spares_the_others(
    fabric: Fabric,
) -> None:
    # Given demo.fail's delivery limit, and worker daemons that hold one task at a time (a
    # crash returns every task a worker holds, each counting toward its own limit)
    topology = fabric.topology
    limit = topology.limits_for(topology.capability("demo.fail")).delivery_limit
    await fabric.purge("demo.fail")
    await fabric.purge_reaper()
    marker = new_id()
    try:
        async with (
            fabric.reaper(),
            fabric.dispatcher(supervision=None) as dispatcher,
            Ledger.for_dispatcher(dispatcher, management_client(fabric.endpoint)) as ledger,
        ):
            # When a task that kills its worker is queued ahead of a normal one, and a fresh
            # worker daemon is started each time the previous one died
            poison = await ledger.submit(dispatcher, "demo.fail", {"mode": "crash", "m": marker})
            normal = await ledger.submit(
                dispatcher, "demo.fail", {"succeed_on_attempt": 1, "m": marker}
            )
            assert poison is not None and normal is not None
            daemons = await _crash_workers_until_done(
                fabric, poison, f"poison-{marker[:8]}", limit + 1
            )
            # Then the poison task ends FAILED delivery_limit after crashing limit + 1 workers
            result = await ledger.collect(poison, 30)
            assert result is not None and result.status is Status.FAILED
            assert result.error is not None and result.error.code is ErrorCode.DELIVERY_LIMIT
            crashed = [d for d in daemons if d.process.poll() is not None]
            assert [d.wait() for d in crashed] == [70] * (limit + 1)
            # and the normal task, queued behind it, succeeds on its first attempt
            other = await ledger.collect(normal, 30)
            assert other is not None and (other.status, other.attempt) == (Status.SUCCESS, 1)
            report = await ledger.check()
    finally:
        fabric.stop_processes()
    assert (report.confirmed, report.delivered, report.on_wire) == (2, 2, 2)
    # and the poison task waits in wayang.dead.demo.fail, for inspection
    letters = await list_dead_letters(fabric.endpoint.amqp_url, "demo.fail")
    assert [(d.task_id, d.broker_reason) for d in letters] == [(poison.task_id, "delivery_limit")]
    await fabric.purge("demo.fail")


async def test_bad_input_dead_lettered_by_a_worker_is_answered_once(fabric: Fabric) -> None:
    # Given a worker and a reaper
    await fabric.purge("demo.echo")
    await fabric.purge_reaper()
    task_id, reply_to = new_id(), f"reply.dead-once-{new_id()[:8]}"
    async with (
        fabric.reaper() as reaper,
        fabric.worker([Echo()], executor_id=f"once-{task_id[:8]}") as worker,
        await aio_pika.connect(fabric.endpoint.amqp_url) as connection,
    ):
        tap = await _tap(connection, reply_to)
        # When the worker dead-letters a signed task that arrived on the wrong queue
        wrong = Task.create("demo.sleep", {}, task_id=task_id, reply_to=reply_to)
        await _publish_raw(
            fabric,
            TASKS_EXCHANGE,
            "demo.echo",
            encode(wrong),
            message_id=task_id,
            reply_to=reply_to,
        )
        # Then the worker's FAILED no_executor is the one answer
        result = await tap.wait_for(task_id)
        assert (result.executor_id, result.status) == (worker.executor_id, Status.FAILED)
        assert result.error is not None and result.error.code is ErrorCode.NO_EXECUTOR
        # and the reaper never gets the worker's copy: it went to wayang.dead, which feeds
        # wayang.dead.<capability> only (wayang.dlx, the reaper's source, is the broker's)
        await tap.collect()
        assert tap.terminal() == [task_id]
        assert reaper.handled(task_id) is None
    letters = await list_dead_letters(fabric.endpoint.amqp_url, "demo.echo")
    assert [(d.task_id, d.code, d.dead_lettered_by) for d in letters] == [
        (task_id, ErrorCode.NO_EXECUTOR, worker.executor_id)
    ]
    await fabric.purge("demo.echo")


# -- list, replay, purge -------------------------------------------------------------------------


async def test_a_dead_task_is_listed_replayed_to_success_and_garbage_is_left(
    fabric: Fabric,
) -> None:
    url = fabric.endpoint.amqp_url
    await fabric.purge("demo.echo")
    await fabric.purge_reaper()
    marker = new_id()
    async with (
        fabric.reaper() as reaper,
        fabric.dispatcher(supervision=None) as dispatcher,
        Ledger.for_dispatcher(dispatcher, management_client(fabric.endpoint)) as ledger,
        await aio_pika.connect(url) as connection,
    ):
        tap = await _tap(connection, dispatcher.reply_to)
        # Given a demo.echo task that expired with no worker (answered FAILED timeout)
        handle = await ledger.submit(
            dispatcher, "demo.echo", {"marker": marker}, queue_timeout_s=0.5
        )
        assert handle is not None
        timed_out = await ledger.collect(handle, 20)
        assert timed_out is not None and timed_out.error is not None
        assert timed_out.error.code is ErrorCode.TIMEOUT
        # and a garbage dead letter beside it
        garbage_id = new_id()
        await _publish_raw(
            fabric, DEAD_LETTER_EXCHANGE, "demo.echo", GARBAGE, message_id=garbage_id
        )
        await _until_dead(fabric, "demo.echo", garbage_id)
        # When they are listed, twice
        listed = await list_dead_letters(url, "demo.echo", keyring=fabric.keyring)
        again = await list_dead_letters(url, "demo.echo", keyring=fabric.keyring)
        # Then both show, with their reasons, and listing consumed nothing (the order may
        # change: a dead letter that arrives while a listing holds the others goes first)
        assert {(d.task_id, d.reason, d.attempt) for d in listed} == {
            (handle.task_id, "timeout (expired)", 1),
            (garbage_id, "executor_error", None),
        }
        assert {d.task_id for d in again} == {d.task_id for d in listed}
        # When the task is replayed with a worker running
        async with fabric.worker([Echo()]) as worker:
            outcomes = await replay(
                url,
                "demo.echo",
                keyring=fabric.keyring,
                signer=fabric.signer,
                task_id=handle.task_id,
            )
            assert [(o.task_id, o.replayed) for o in outcomes] == [(handle.task_id, True)]

            # Then it runs again: a SUCCESS result for the same task, token and attempt reaches
            # its reply address (the dispatcher itself keeps the first terminal result)
            async def succeeded() -> bool:
                return any(r.status is Status.SUCCESS for r in await tap.collect())

            await eventually(succeeded, what="the replayed task's SUCCESS")
            report = await ledger.check()
        success = next(r for r in tap.results if r.status is Status.SUCCESS)
        assert (success.task_id, success.token, success.attempt) == (
            handle.task_id,
            handle.task.token,
            1,
        )
        assert (success.executor_id, success.output) == (worker.executor_id, {"marker": marker})
        # the reaper answered the expiry, and nothing else
        assert reaper.handled(handle.task_id) is Handled.ANSWERED
        assert [(r.task_id, r.status) for r in await tap.collect()] == [
            (handle.task_id, Status.FAILED),
            (handle.task_id, Status.SUCCESS),
        ]
    # the ledger: one result handed out, two terminal results on the wire (the replay's is
    # the second), and no dead letter of the task left unanswered
    assert (report.confirmed, report.delivered, report.on_wire) == (1, 1, 2)
    assert report.wire_duplicates == {handle.task_id: 2}
    # and the garbage cannot be replayed: it stays, with the reason said
    (left,) = await replay(url, "demo.echo", keyring=fabric.keyring, signer=fabric.signer)
    assert (left.task_id, left.replayed) == (garbage_id, False)
    assert "msgpack" in left.detail
    assert [d.task_id for d in await list_dead_letters(url, "demo.echo")] == [garbage_id]
    # When the queue is purged, Then it is empty and the count says so
    assert await purge(url, "demo.echo") == 1
    assert await list_dead_letters(url, "demo.echo") == []


# -- the CLI --------------------------------------------------------------------------------------


def wayang(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI as a separate process, on a clean WAYANG_* environment plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")}
    return subprocess.run(
        [sys.executable, "-m", "wayang_mq.cli", *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(run: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert run.returncode == code, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("wayang-mq: error:")]
    assert len(errors) == 1 and needle in errors[0], run.stderr
    assert "Traceback" not in run.stderr


async def test_the_dead_commands_list_replay_and_purge_with_exit_codes(fabric: Fabric) -> None:
    env = {
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_MANAGEMENT_URL": fabric.endpoint.management_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
    }
    # Given a task dead of its queue timeout in demo.echo, and a garbage dead letter
    await fabric.purge("demo.echo")
    async with fabric.dispatcher(supervision=None) as dispatcher:
        handle = await dispatcher.submit("demo.echo", {"cli": new_id()}, queue_timeout_s=0.3)
    await _until_dead(fabric, "demo.echo", handle.task_id)
    garbage_id = new_id()
    await _publish_raw(fabric, DEAD_LETTER_EXCHANGE, "demo.echo", GARBAGE, message_id=garbage_id)
    await _until_dead(fabric, "demo.echo", garbage_id)

    listed = await asyncio.to_thread(wayang, "dead", "list", "demo.echo", env=env)
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if handle.task_id in line]
    assert "timeout (expired)" in row and "demo.echo" in row

    as_json = await asyncio.to_thread(wayang, "dead", "list", "demo.echo", "--json", env=env)
    assert {(d["task_id"], d["code"]) for d in json.loads(as_json.stdout)} == {
        (handle.task_id, "timeout"),
        (garbage_id, "executor_error"),
    }
    everywhere = await asyncio.to_thread(wayang, "dead", "list", env=env)
    assert everywhere.returncode == 0 and handle.task_id in everywhere.stdout

    missing = await asyncio.to_thread(
        wayang, "dead", "replay", "demo.echo", "--task", "nope", env=env
    )
    one_line_error(missing, 2, "no dead letter of task nope")
    unknown = await asyncio.to_thread(wayang, "dead", "list", "no.such", env=env)
    one_line_error(unknown, 2, "wayang.dead.no.such")

    # a replay that cannot replay everything says so, and exits 1 (given a longer queue
    # timeout, so the replayed task, with no worker to run it, waits in its queue meanwhile)
    replayed = await asyncio.to_thread(
        wayang, "dead", "replay", "demo.echo", "--all", "--queue-timeout", "60", env=env
    )
    assert replayed.returncode == 1, replayed.stderr
    assert f"replayed  {handle.task_id}  to demo.echo as attempt 1, deadline in 60s" in (
        replayed.stdout
    )
    assert f"left      {garbage_id}  cannot be replayed" in replayed.stdout

    purged = await asyncio.to_thread(wayang, "dead", "purge", "demo.echo", env=env)
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 dead letters from wayang.dead.demo.echo" in purged.stdout
    empty = await asyncio.to_thread(wayang, "dead", "list", "demo.echo", env=env)
    assert (empty.returncode, empty.stdout.strip()) == (0, "no dead letters")
    await fabric.purge("demo.echo")
    await fabric.purge_reaper()  # no reaper ran: leave no unanswered copies behind


def test_the_reaper_daemon_stops_cleanly_on_sigterm(fabric: Fabric) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")},
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
    }
    command = [sys.executable, "-m", "wayang_mq.cli", "reaper", "--id", "sigterm-reaper"]
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as daemon:
        try:
            assert daemon.stderr is not None
            seen: list[str] = []
            # (stderr is a pipe: it logs JSON lines)
            while not any(_event(line) == "reaper.started" for line in seen):
                line = daemon.stderr.readline()
                assert line, "".join(seen)  # it exited before it started consuming
                seen.append(line)
            # When it gets SIGTERM, Then it stops consuming and exits 0
            daemon.terminate()
            _, rest = daemon.communicate(timeout=30)
        finally:
            daemon.kill()
    assert daemon.returncode == 0, rest
    assert "reaper.stopped" in [_event(line) for line in rest.splitlines()], rest


def _event(line: str) -> str | None:
    """The event a JSON log line names, if it is one."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value.get("event") if isinstance(value, dict) else None


# -- reading a dead letter (pure) ---------------------------------------------------------------


def test_the_latest_death_is_the_reason_not_the_first() -> None:
    # Given a retried task (it expired in a retry tier, back to its queue) that then crashed
    # its workers past the delivery limit: x-death is most recent first
    when = datetime(2026, 1, 1, tzinfo=UTC)
    crashed = {"count": 1, "reason": "delivery_limit", "queue": task_queue("demo.fail")}
    waited = {"count": 2, "reason": "expired", "queue": "wayang.retry.1s"}
    headers = {
        "x-death": [crashed | {"time": when}, waited | {"time": when}],
        "x-first-death-reason": "expired",
        "x-first-death-queue": "wayang.retry.1s",
    }
    dead = read_dead_letter(headers, capability="demo.fail", message_id="t-1")
    # Then the reason is the delivery limit, from the task queue
    assert (dead.code, dead.broker_reason, dead.source_queue) == (
        ErrorCode.DELIVERY_LIMIT,
        "delivery_limit",
        task_queue("demo.fail"),
    )
    assert dead.dead_at_ms == int(when.timestamp() * 1000) and not dead.answered


def test_a_workers_copy_names_its_code_and_is_already_answered() -> None:
    headers = {
        "wayang-error-code": "bad_signature",
        "wayang-error-message": "unknown signing key id 'x'",
        "wayang-dead-lettered-by": "demo-0",
    }
    dead = read_dead_letter(headers, capability="demo.echo", correlation_id="t-2")
    assert (dead.task_id, dead.code, dead.reason, dead.answered) == (
        "t-2",
        ErrorCode.BAD_SIGNATURE,
        "bad_signature",
        True,
    )


async def test_a_verified_dead_letter_a_worker_marked_answered_is_skipped_not_answered_again(
    fabric: Fabric,
) -> None:
    # Given a reaper, and a signed task's dead letter marked wayang-dead-lettered-by (a worker
    # answered it already), then an unmarked one as a barrier (one dead letter at a time)
    await fabric.purge("demo.echo")
    await fabric.purge_reaper()
    reply_to = f"reply.dead-marked-{new_id()[:8]}"
    marked = Task.create("demo.echo", {}, reply_to=reply_to)
    async with (
        fabric.reaper(prefetch=1) as reaper,
        await aio_pika.connect(fabric.endpoint.amqp_url) as connection,
    ):
        tap = await _tap(connection, reply_to)
        await _publish_raw(
            fabric,
            DEAD_LETTER_EXCHANGE,
            "demo.echo",
            encode(marked),
            message_id=marked.task_id,
            reply_to=reply_to,
            headers={DEAD_LETTERED_BY_HEADER: "w-1"},
        )
        barrier = await _reaper_caught_up(fabric, reaper, tap, "demo.echo")
        # Then the reaper skipped the marked one: the barrier is the only answer
        assert reaper.handled(marked.task_id) is Handled.SKIPPED
        assert tap.terminal(besides=barrier) == []
    await fabric.purge("demo.echo")
