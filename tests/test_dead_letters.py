"""Dead letters end in a terminal FAILED result and stay inspectable (real broker, real daemons).

The reaper turns the broker's dead letters (expired, delivery limit) into FAILED results at the
task's reply address; workers' own dead letters (bad input) are not answered twice; every dead
letter waits in ``wayang.dead.<capability>``, where it can be listed, replayed and purged.

Scenarios with a dispatcher end with the ledger check (``wayang_mq.ledger``): every task the
broker confirmed got exactly one terminal result, the queues drained, and every dead letter of
those tasks was answered FAILED. Tasks published raw (as a foreign client would) are checked
with a tap on their reply address instead: exactly one terminal result each.
The dispatchers here run without their own deadline supervision (``supervision=None``), so a
timeout can only come from the reaper.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from wayang_mq import ErrorCode, Status
from wayang_mq.connect import management_client
from wayang_mq.deadletters import list_dead_letters, purge, read_dead_letter, replay
from wayang_mq.dispatcher import TaskHandle
from wayang_mq.harness import Fabric, WorkerProcess
from wayang_mq.ledger import Ledger
from wayang_mq.model import Result, new_id
from wayang_mq.names import (
    DEAD_LETTER_EXCHANGE,
    RESULTS_EXCHANGE,
    TASKS_EXCHANGE,
    dead_queue,
    task_queue,
)
from wayang_mq.reaper import Outcome
from wayang_mq.wire import decode
from workers.demo import Echo

pytestmark = pytest.mark.timeout(180)

GARBAGE = b"\xc1\xc1 not msgpack"


class ReplyTap:
    """Every result the broker routes to one reply address, duplicates included (for tasks
    published raw, which the project's Ledger cannot record, and to read the results)."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self._queue = queue
        self.results: list[Result] = []

    async def collect(self) -> list[Result]:
        """Take whatever arrived since the last call."""
        while (message := await self._queue.get(no_ack=True, fail=False)) is not None:
            self.results.append(decode(message.body, Result))
        return self.results

    async def wait_for(self, task_id: str, timeout_s: float = 20.0) -> Result:
        """The first result for ``task_id``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for result in await self.collect():
                if result.task_id == task_id:
                    return result
            assert time.monotonic() < deadline, f"no result for {task_id} at the reply address"
            await asyncio.sleep(0.05)

    async def check(self, confirmed: Iterable[str]) -> None:
        """Every confirmed task has exactly one terminal result, and nothing else came."""
        await asyncio.sleep(0.3)  # a duplicate would be on its way by now
        terminal = sorted(r.task_id for r in await self.collect() if r.terminal)
        assert terminal == sorted(confirmed), self.results


async def _tap(connection: aio_pika.abc.AbstractConnection, reply_to: str) -> ReplyTap:
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(RESULTS_EXCHANGE, reply_to)
    return ReplyTap(queue)


async def _consumers(fabric: Fabric, queue: str) -> int:
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        assert declared.declaration_result is not None
        return int(declared.declaration_result.consumer_count or 0)


async def _until_dead(
    fabric: Fabric, capability: str, task_id: str, timeout_s: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while task_id not in {
        d.task_id for d in await list_dead_letters(fabric.endpoint.amqp_url, capability)
    }:
        assert time.monotonic() < deadline, f"{task_id} never reached {dead_queue(capability)}"
        await asyncio.sleep(0.2)


async def _publish_raw(
    fabric: Fabric, exchange: str, routing_key: str, body: bytes, **properties: Any
) -> None:
    """Publish as a foreign client could, confirmed."""
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        message = aio_pika.Message(
            body,
            headers=fabric.signer.headers(body),
            content_type="application/msgpack",
            type="wayang.task.v1",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **properties,
        )
        await target.publish(message, routing_key, mandatory=True)


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


async def test_garbage_that_expires_unread_is_answered_from_its_amqp_properties(
    fabric: Fabric,
) -> None:
    # Given a foreign client's unreadable task with a reply address, and no worker to read it
    await fabric.purge("demo.sleep")
    await fabric.purge_reaper()
    task_id, reply_to = new_id(), f"reply.dead-garbage-{new_id()[:8]}"
    async with fabric.reaper(), await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
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
        # Then the reaper answers FAILED timeout, correlated by the message id alone
        result = await tap.wait_for(task_id)
        assert result.status is Status.FAILED
        assert result.error is not None and result.error.code is ErrorCode.TIMEOUT
        assert (result.token, result.node_id) == ("", "")  # nothing read from the body
        assert "msgpack" in result.error.details["unverified"]
        await tap.check([task_id])
    await fabric.purge("demo.sleep")


async def _crash_workers_until_done(
    fabric: Fabric, poison: TaskHandle, name: str, most: int
) -> list[WorkerProcess]:
    """Start a worker daemon (one task at a time) whenever the previous one has died, until
    ``poison`` has its result; then make sure one is still alive for the tasks behind it."""
    daemons: list[WorkerProcess] = []

    def start(executor_id: str) -> None:
        args = ["--concurrency", "1"]
        daemons.append(
            fabric.spawn_worker(["workers.demo:Fail"], executor_id=executor_id, args=args)
        )

    while not poison.done():
        if not daemons or daemons[-1].process.poll() is not None:
            assert len(daemons) <= most, "the poison task was never dead-lettered"
            start(f"{name}-{len(daemons)}")
        await asyncio.sleep(0.1)
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
        # When the worker dead-letters a garbage task
        await _publish_raw(
            fabric, TASKS_EXCHANGE, "demo.echo", GARBAGE, message_id=task_id, reply_to=reply_to
        )
        # Then the worker's FAILED invalid_task is the one answer
        result = await tap.wait_for(task_id)
        assert (result.executor_id, result.status) == (worker.executor_id, Status.FAILED)
        assert result.error is not None and result.error.code is ErrorCode.INVALID_TASK
        # and the reaper saw the dead letter, and left it alone
        deadline = time.monotonic() + 10
        while reaper.outcome(task_id) is None:
            assert time.monotonic() < deadline, "the reaper never saw the dead letter"
            await asyncio.sleep(0.05)
        assert reaper.outcome(task_id) is Outcome.SKIPPED
        await tap.check([task_id])
    letters = await list_dead_letters(fabric.endpoint.amqp_url, "demo.echo")
    assert [(d.task_id, d.code, d.dead_lettered_by) for d in letters] == [
        (task_id, ErrorCode.INVALID_TASK, worker.executor_id)
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
            deadline = time.monotonic() + 20
            while not [r for r in await tap.collect() if r.status is Status.SUCCESS]:
                assert time.monotonic() < deadline, "the replayed task never succeeded"
                await asyncio.sleep(0.05)
            report = await ledger.check()
        success = next(r for r in tap.results if r.status is Status.SUCCESS)
        assert (success.task_id, success.token, success.attempt) == (
            handle.task_id,
            handle.task.token,
            1,
        )
        assert (success.executor_id, success.output) == (worker.executor_id, {"marker": marker})
        # the reaper answered the expiry, and nothing else
        assert reaper.outcome(handle.task_id) is Outcome.ANSWERED
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
            while not any("event=reaper.started" in line for line in seen):
                line = daemon.stderr.readline()
                assert line, "".join(seen)  # it exited before it started consuming
                seen.append(line)
            # When it gets SIGTERM, Then it stops consuming and exits 0
            daemon.terminate()
            _, rest = daemon.communicate(timeout=30)
        finally:
            daemon.kill()
    assert daemon.returncode == 0, rest
    assert "event=reaper.stopped" in rest


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
