"""Broker role accounts (``wayang-mq access``): what each account may do, refused by the broker.

Every refusal here is RabbitMQ's own: the channel (or connection) closed with ACCESS_REFUSED
(403), except a forged ``user_id``, which the broker refuses as PRECONDITION_FAILED (406).
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import psycopg
import pytest
from aio_pika.abc import AbstractChannel
from wayang_workers.demo import Echo, Fail, Sleep

from tests.test_cli import wayang
from wayang_mq.amqp.connect import connect, management_client
from wayang_mq.amqp.endpoint import with_credentials
from wayang_mq.amqp.management import ManagementClient
from wayang_mq.controlplane.history import History
from wayang_mq.core import names
from wayang_mq.core.errors import BrokerUnreachable, ConfigError, ErrorCode
from wayang_mq.core.model import PolicyConstraints, Result, RetryHints, Status, Task, new_id
from wayang_mq.core.wire import DEAD_LETTERED_BY_HEADER, decode
from wayang_mq.security.accounts import (
    Role,
    account_for,
    grant,
    revoke,
    show,
)
from wayang_mq.testing.harness import Fabric, eventually

pytestmark = pytest.mark.timeout(120)

QUORUM = {"x-queue-type": "quorum"}

GARBAGE = b"\xc1 not msgpack"


class Accounts:
    """Grants accounts on the session's broker and revokes them all at the end."""

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.admin: ManagementClient = management_client(fabric.endpoint)
        self.made: list[str] = []

    def url(self, role: Role, prefix: str, capabilities: tuple[str, ...] = ()) -> tuple[str, str]:
        """A new account of ``role``: its id and its AMQP URL."""
        identity = f"{prefix}-{new_id()[:8]}"
        granted = grant(self.admin, account_for(role, identity, capabilities))
        assert granted.created and granted.password
        self.made.append(identity)
        return identity, with_credentials(self.fabric.endpoint.amqp_url, identity, granted.password)

    def close(self) -> None:
        for identity in self.made:
            revoke(self.admin, identity)


@pytest.fixture
def accounts(fabric: Fabric) -> Iterator[Accounts]:
    made = Accounts(fabric)
    try:
        yield made
    finally:
        made.close()


Operation = Callable[[AbstractChannel], Awaitable[Any]]


async def _refused(url: str, operation: Operation, code: int = 403) -> str:
    """Run ``operation`` on a fresh channel of ``url``; the broker's refusal text."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(aiormq.exceptions.AMQPError) as refused:
            await operation(channel)
        # aiormq maps the Channel.Close reply code to the class: 403 / 406
        kind = {
            403: aiormq.exceptions.ChannelAccessRefused,
            406: aiormq.exceptions.ChannelPreconditionFailed,
        }[code]
        assert isinstance(refused.value, kind), repr(refused.value)
        text = str(refused.value)
        assert ("ACCESS_REFUSED" if code == 403 else "PRECONDITION_FAILED") in text, text
        return text


async def _allowed(url: str, operation: Operation) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        await operation(await connection.channel(publisher_confirms=True))


def _publish(exchange: str, key: str, **properties: Any) -> Operation:
    async def publish(channel: AbstractChannel) -> None:
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        await target.publish(aio_pika.Message(GARBAGE, **properties), key)

    return publish


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer that never gets a message (the broker refuses it first)."""


def _consume(queue_name: str) -> Operation:
    async def consume(channel: AbstractChannel) -> None:
        queue = await channel.declare_queue(queue_name, passive=True)
        await queue.consume(_ignore)

    return consume


def _bind(queue_name: str, exchange: str, key: str, **declare: Any) -> Operation:
    async def bind(channel: AbstractChannel) -> None:
        queue = await channel.declare_queue(queue_name, **declare)
        await queue.bind(exchange, key)

    return bind


# -- an executor -----------------------------------------------------------------------------------


async def test_an_executor_consumes_and_publishes_only_what_its_capabilities_need(
    accounts: Accounts,
) -> None:
    # Given an executor account granted demo.echo only
    executor, url = accounts.url(Role.EXECUTOR, "ex", ("demo.echo",))

    # Then it cannot consume another capability's queue (payment.charge is in the topology)
    await _refused(url, _consume(names.task_queue("payment.charge")))
    # nor publish a task: not to wayang.tasks, not through the default exchange into a task
    # queue (its own capability's included). (A retry key of another capability passes the
    # broker, for compensations; what travels there is refused by receivers unless this
    # executor's signed attempt record may speak for the task: tests/test_security.py.)
    await _refused(url, _publish(names.TASKS_EXCHANGE, "demo.echo"))
    text = await _refused(url, _publish("", names.task_queue("demo.echo")))
    assert "amq.default" in text
    await _refused(url, _publish(names.RETRY_EXCHANGE, "not-a-retry.demo.echo"))
    # nor put anything where the reaper answers it, nor a dead copy for another capability
    await _refused(url, _publish(names.DEAD_LETTER_EXCHANGE, "demo.echo"))
    await _refused(url, _publish(names.DEAD_COPY_EXCHANGE, "payment.charge"))
    # nor send another executor's heartbeat, nor a result for a capability it does not serve
    await _refused(url, _publish(names.EVENTS_EXCHANGE, "heartbeat.someone-else"))
    await _refused(url, _publish(names.RESULTS_EXCHANGE, "noreply.payment.charge"))
    # nor publish anything under another user's name (the broker checks user_id)
    await _refused(
        url, _publish(names.RESULTS_EXCHANGE, "reply.d1", user_id="someone-else"), code=406
    )
    # nor read results: no queue of its own but its control queue, which cannot be bound to
    # wayang.results (with "#" or any key), and no other queue may be declared
    control = f"wayang.control.{executor}"
    own = {"exclusive": True, "auto_delete": True}
    await _refused(url, _bind(control, names.RESULTS_EXCHANGE, "#", **own))
    await _refused(url, _bind(control, names.RESULTS_EXCHANGE, "reply.d1", **own))
    await _refused(url, _bind(f"tap-{executor}", names.RESULTS_EXCHANGE, "#", exclusive=True))
    # nor bind its control queue to status replies meant for a dispatcher
    await _refused(url, _bind(control, names.CONTROL_EXCHANGE, "status-reply.d1", **own))

    # While what it needs is allowed: its control queue, bound to cancels and status requests
    await _allowed(url, _bind(control, names.CONTROL_EXCHANGE, "cancel.#", **own))
    # its heartbeat, a result to a reply address, a status report
    await _allowed(url, _publish(names.EVENTS_EXCHANGE, f"heartbeat.{executor}"))
    await _allowed(url, _publish(names.RESULTS_EXCHANGE, "reply.nobody-listens"))
    await _allowed(url, _publish(names.CONTROL_EXCHANGE, "status-reply.nobody-listens"))
    # its own user_id
    await _allowed(url, _publish(names.EVENTS_EXCHANGE, f"heartbeat.{executor}", user_id=executor))


async def test_a_passive_declare_needs_no_permission(accounts: Accounts) -> None:
    # Given an executor of demo.echo: a passive declare of payment.charge's queue is allowed
    # (RabbitMQ checks no permission on it; workers rely on it to find their queues)
    _, url = accounts.url(Role.EXECUTOR, "ex", ("demo.echo",))
    await _allowed(
        url,
        lambda channel: channel.declare_queue(names.task_queue("payment.charge"), passive=True),
    )


async def test_an_executor_claims_and_takes_placed_tasks_on_its_own_queue_only(
    accounts: Accounts, fabric: Fabric, admin_channel: AbstractChannel
) -> None:
    # Given an executor account granted demo.echo, a control plane's account, and another
    # executor's own queue on the broker
    executor, url = accounts.url(Role.EXECUTOR, "ex", ("demo.echo",))
    _, cp_url = accounts.url(Role.CONTROL_PLANE, "cp")
    other = names.executor_queue("someone-else")
    await admin_channel.declare_queue(other, durable=True, arguments=QUORUM)
    mine, instance = names.executor_queue(executor), names.executor_queue(f"{executor}--one")
    try:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            # When it binds its control queue to its claim replies, and declares and binds its
            # own executor queue to executor.<me> on wayang.tasks (the broker allows both)
            control = await channel.declare_queue(
                f"wayang.control.{executor}", exclusive=True, auto_delete=True
            )
            await control.bind(names.CONTROL_EXCHANGE, names.claim_reply_key(executor))
            own = await channel.declare_queue(mine, durable=True, arguments=QUORUM)
            await own.bind(names.TASKS_EXCHANGE, names.executor_routing_key(executor))
            # and claims a task of its capability (it is granted claim.demo.echo)
            control_exchange = await channel.get_exchange(names.CONTROL_EXCHANGE, ensure=False)
            await control_exchange.publish(
                aio_pika.Message(GARBAGE), names.claim_key("demo.echo"), mandatory=True
            )
            # Then the control plane's claim reply and the task it places reach it there
            await _allowed(cp_url, _publish(names.CONTROL_EXCHANGE, f"claim-reply.{executor}"))
            await _allowed(cp_url, _publish(names.TASKS_EXCHANGE, f"executor.{executor}"))
            await _arrives(control, "the claim reply on its control queue")
            await _arrives(own, "the placed task on its own queue")
        # and an instance of the account may have a queue of its own, and consume it
        await _allowed(url, _bind(instance, names.TASKS_EXCHANGE, f"executor.{executor}--one"))
        await _allowed(url, _consume(mine))

        # While it cannot claim for a capability it does not serve, nor take another
        # executor's claim replies
        await _refused(url, _publish(names.CONTROL_EXCHANGE, "claim.payment.charge"))
        control_queue = f"wayang.control.{executor}"
        exclusive = {"exclusive": True, "auto_delete": True}
        await _refused(
            url,
            _bind(control_queue, names.CONTROL_EXCHANGE, "claim-reply.someone-else", **exclusive),
        )
        # nor bind its own queue to another executor's placed tasks, or to all of them, or to
        # any task (read on wayang.tasks is for executor.<me> alone)
        for key in ("executor.someone-else", "executor.#", "demo.echo", "#"):
            await _refused(url, _bind(mine, names.TASKS_EXCHANGE, key, passive=True))
        # nor declare or consume another executor's queue
        await _refused(url, _bind(names.executor_queue("x"), names.TASKS_EXCHANGE, "executor.x"))
        await _refused(url, _consume(other))
        # nor publish any task, placed or not: write on wayang.tasks stays closed
        for key in (f"executor.{executor}", "place.demo.echo", "demo.echo"):
            await _refused(url, _publish(names.TASKS_EXCHANGE, key))
    finally:
        await _drop_queues(fabric, mine, instance, other)
        await (await admin_channel.get_queue(names.CLAIMS_QUEUE, ensure=False)).purge()


async def _arrives(queue: aio_pika.abc.AbstractQueue, what: str) -> None:
    got: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def arrived() -> bool:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            got.append(message)
        return bool(got)

    await eventually(arrived, what=what)


# -- dispatchers --------------------------------------------------------------------------------


async def test_a_dispatcher_reads_only_its_own_replies(accounts: Accounts, fabric: Fabric) -> None:
    # Given two dispatcher accounts, granted demo.echo, and the second one running
    first, first_url = accounts.url(Role.DISPATCHER, "disp", ("demo.echo",))
    second, second_url = accounts.url(Role.DISPATCHER, "disp", ("demo.echo",))
    async with fabric.dispatcher(amqp_url=second_url, dispatcher_id=second, supervision=None):
        # Then the first cannot consume the second's reply queue
        await _refused(first_url, _consume(names.reply_queue(second)))
        # nor bind its own reply queue to the second's reply key (topic read permission,
        # checked by the broker on queue.bind), nor to every result
        mine = names.reply_queue(first)
        await _refused(first_url, _bind(mine, names.RESULTS_EXCHANGE, f"reply.{second}"))
        await _refused(first_url, _bind(mine, names.RESULTS_EXCHANGE, "#"))
        # nor publish a task for a capability it was not granted, nor forge the second's result
        await _refused(first_url, _publish(names.TASKS_EXCHANGE, "payment.charge"))
        await _refused(first_url, _publish(names.RESULTS_EXCHANGE, f"reply.{second}"))
        # while binding its own queue to its own key is allowed (an instance of it too)
        await _allowed(first_url, _bind(mine, names.RESULTS_EXCHANGE, f"reply.{first}"))
        instance = names.reply_queue(f"{first}--one")
        await _allowed(
            first_url,
            _bind(instance, names.RESULTS_EXCHANGE, f"reply.{first}--one", auto_delete=True),
        )
    await _drop_queues(accounts.fabric, mine, names.reply_queue(second))


async def test_a_dispatcher_watches_its_tasks_progress_but_not_everyones(
    accounts: Accounts, fabric: Fabric
) -> None:
    # Given a dispatcher account granted demo.sleep, and a worker serving it
    dispatcher_id, url = accounts.url(Role.DISPATCHER, "disp", ("demo.sleep",))
    progress_queue = names.progress_queue(dispatcher_id)
    async with (
        fabric.worker([Sleep()]),
        fabric.dispatcher(amqp_url=url, dispatcher_id=dispatcher_id, supervision=None) as d,
    ):
        # When it watches a task's progress
        handle = await d.submit("demo.sleep", {"seconds": 1.5})
        fractions = [p.fraction async for p in handle.progress()]
        # Then the broker let it bind progress.<task id>: the events came, up to done
        assert fractions and fractions[-1] == 1.0, fractions
    # while every task's progress (a wildcard word) is refused
    exclusive = {"exclusive": True, "auto_delete": True}
    await _refused(url, _bind(progress_queue, names.EVENTS_EXCHANGE, "progress.#", **exclusive))
    await _refused(url, _bind(progress_queue, names.EVENTS_EXCHANGE, "progress.*", **exclusive))


async def test_a_dispatcher_publishes_placed_tasks_for_its_capabilities_only(
    accounts: Accounts, fabric: Fabric, admin_channel: AbstractChannel
) -> None:
    # Given dispatchers granted demo.echo, the pattern demo.*, and every key (#)
    _, echo_url = accounts.url(Role.DISPATCHER, "disp", ("demo.echo",))
    _, pattern_url = accounts.url(Role.DISPATCHER, "disp", ("demo.*",))
    _, every_url = accounts.url(Role.DISPATCHER, "disp", ("#",))
    try:
        for url in (echo_url, pattern_url, every_url):
            # Then each may publish demo.echo tasks, and those whose policy needs particular
            # executors (place.demo.echo, for the control plane to place)
            await _allowed(url, _publish(names.TASKS_EXCHANGE, "demo.echo"))
            await _allowed(url, _publish(names.TASKS_EXCHANGE, "place.demo.echo"))
            # but never put a task on one executor: only the control plane places, "#" or not
            await _refused(url, _publish(names.TASKS_EXCHANGE, "executor.some-worker"))
        # And placed tasks are held to the capabilities too
        for url in (echo_url, pattern_url):
            await _refused(url, _publish(names.TASKS_EXCHANGE, "place.payment.charge"))
        await _allowed(every_url, _publish(names.TASKS_EXCHANGE, "place.payment.charge"))
    finally:
        await fabric.purge("demo.echo", "payment.charge")
        await (await admin_channel.get_queue(names.PLACE_QUEUE, ensure=False)).purge()


async def _drop_queues(fabric: Fabric, *queues: str) -> None:
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)


# -- the control plane ----------------------------------------------------------------------------


async def test_a_control_plane_consumes_the_record_and_publishes_only_what_it_must(
    accounts: Accounts, admin_channel: AbstractChannel
) -> None:
    # Given a control-plane account (and an executor's own queue on the broker)
    cp, url = accounts.url(Role.CONTROL_PLANE, "cp")
    await admin_channel.declare_queue(names.executor_queue("ex-someone"))

    # Then it cannot consume a task queue, another queue of the fabric, or the reaper's
    await _refused(url, _consume(names.task_queue("demo.echo")))
    await _refused(url, _consume(names.REAPER_QUEUE))
    # nor publish to wayang.dlx (only the broker dead-letters), retries, dead copies or events
    await _refused(url, _publish(names.DEAD_LETTER_EXCHANGE, "demo.echo"))
    await _refused(url, _publish(names.RETRY_EXCHANGE, "retry.1s.demo.echo"))
    await _refused(url, _publish(names.DEAD_COPY_EXCHANGE, "demo.echo"))
    await _refused(url, _publish(names.EVENTS_EXCHANGE, f"heartbeat.{cp}"))
    # nor declare a queue that is not its own, nor bind its own to another's status replies
    await _refused(url, _bind(f"wayang.cp.{cp}x", names.CONTROL_EXCHANGE, f"status-reply.{cp}x"))
    own = {"exclusive": True, "auto_delete": True}
    mine = f"wayang.cp.{cp}"
    await _refused(url, _bind(mine, names.CONTROL_EXCHANGE, "status-reply.d1", **own))
    # nor read results or events with its own queues
    await _refused(url, _bind(mine, names.RESULTS_EXCHANGE, "#", **own))

    # nor consume an executor's own queue, nor claim like an executor
    await _refused(url, _consume(names.executor_queue("ex-someone")))
    await _refused(url, _publish(names.CONTROL_EXCHANGE, "claim.demo.echo"))

    # While it may consume wayang.record, the claims and the tasks to place
    for queue in (names.RECORD_QUEUE, names.CLAIMS_QUEUE, names.PLACE_QUEUE):
        await _allowed(url, _consume(queue))
    # and read the history (as `wayang-mq events` and `wayang-mq db rebuild` do)
    async with History(url, first_wait_s=0.2) as history:
        await history.last_offset()
    # answer an executor's claims, and place a task on an executor
    await _allowed(url, _publish(names.CONTROL_EXCHANGE, "claim-reply.ex-someone--1"))
    await _allowed(url, _publish(names.TASKS_EXCHANGE, "executor.ex-someone"))
    await admin_channel.queue_delete(names.executor_queue("ex-someone"))
    # re-dispatch a task of any capability, answer from the record (to a reply address or
    # none), cancel and ask for status
    await _allowed(url, _publish(names.TASKS_EXCHANGE, "payment.charge"))
    await _allowed(url, _publish(names.RESULTS_EXCHANGE, "reply.nobody-listens"))
    await _allowed(url, _publish(names.RESULTS_EXCHANGE, "noreply.demo.echo"))
    await _allowed(url, _publish(names.CONTROL_EXCHANGE, "cancel.some-task"))
    await _allowed(url, _publish(names.CONTROL_EXCHANGE, "status.some-task"))
    # declare its own queues, one bound to its own status replies (an instance's too)
    await _allowed(url, _bind(mine, names.CONTROL_EXCHANGE, f"status-reply.{cp}", **own))
    await _allowed(
        url,
        _bind(
            f"wayang.cp.{cp}--one.status", names.CONTROL_EXCHANGE, f"status-reply.{cp}--one", **own
        ),
    )


async def test_a_control_plane_under_its_account_records_and_files_what_it_refuses(
    accounts: Accounts, fabric: Fabric, record_db: str, admin_channel: AbstractChannel
) -> None:
    # Given a control plane running under its own account
    await fabric.purge_record()
    cp, url = accounts.url(Role.CONTROL_PLANE, "cp")
    async with fabric.control_plane(record_db, amqp_url=url, control_plane_id=cp) as plane:
        # When garbage reaches the record (a result nobody could have signed)
        garbage_id = new_id()
        results = await admin_channel.get_exchange(names.RESULTS_EXCHANGE, ensure=False)
        await results.publish(aio_pika.Message(GARBAGE, message_id=garbage_id), "noreply.x")

        # Then its copy lands in wayang.record.refused, through the default exchange
        refused = await admin_channel.get_queue(names.RECORD_REFUSED_QUEUE, ensure=False)
        copies: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def filed() -> bool:
            message = await refused.get(no_ack=True, fail=False)
            if message is not None and message.message_id == garbage_id:
                copies.append(message)
            return bool(copies)

        await eventually(filed, what="the refused copy in wayang.record.refused")
        assert copies[0].user_id == cp
        assert plane.counts.refused >= 1


def _rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, params).fetchall())


class CountingEcho(Echo):
    """``demo.echo`` that remembers which tasks it ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def execute(self, task: Task) -> Any:
        self.ran.append(task.task_id)
        return await super().execute(task)


async def test_role_accounts_claim_and_place_with_the_control_plane(
    accounts: Accounts, fabric: Fabric, record_db: str
) -> None:
    # Given a control plane, a dispatcher and (later) a worker with claims and a label, each
    # under its own role account
    await fabric.purge_record()
    await fabric.purge("demo.echo")
    cp, cp_url = accounts.url(Role.CONTROL_PLANE, "cp")
    executor, executor_url = accounts.url(Role.EXECUTOR, "ex", ("demo.echo",))
    dispatcher_id, dispatcher_url = accounts.url(Role.DISPATCHER, "disp", ("demo.echo",))
    echo = CountingEcho()
    async with (
        fabric.control_plane(record_db, amqp_url=cp_url, control_plane_id=cp),
        fabric.dispatcher(
            amqp_url=dispatcher_url, dispatcher_id=dispatcher_id, supervision=None
        ) as dispatcher,
    ):
        # and a task queued while no worker runs, its cancel recorded
        cancelled = await dispatcher.submit("demo.echo", {"n": 0})
        assert await dispatcher.cancel(cancelled.task_id, reason="changed my mind")
        await eventually(
            lambda: (
                _rows(record_db, "SELECT 1 FROM cancels WHERE task_id = %s", cancelled.task_id)
                != []
            ),
            what="the cancel recorded",
        )
        async with fabric.worker(
            [echo],
            amqp_url=executor_url,
            executor_id=executor,
            claims=True,
            labels={"region": "eu"},
        ):
            # When the worker takes it, Then its claim is answered cancelled (the claim went
            # out and the verdict came back under the accounts): it never runs
            result = await cancelled.result(30)
            assert result.status is Status.FAILED and result.error is not None
            assert result.error.code is ErrorCode.CANCELLED
            # When a task asks for region=eu (place.demo.echo, published by the dispatcher)
            await eventually(
                lambda: (
                    _rows(
                        record_db,
                        "SELECT 1 FROM executors WHERE executor_id = %s AND state = 'live'"
                        " AND registered_at IS NOT NULL",
                        executor,
                    )
                    != []
                ),
                what="the worker registered in the record",
            )
            eu = PolicyConstraints(labels={"region": "eu"})
            placed = await (await dispatcher.submit("demo.echo", {"n": 1}, policy=eu)).result(30)
        # Then the control plane placed it on the worker's own queue, where it ran
        assert (placed.status, placed.executor_id) == (Status.SUCCESS, executor)
        assert echo.ran == [placed.task_id]
    await _drop_queues(fabric, names.reply_queue(dispatcher_id), names.executor_queue(executor))


# -- the whole fabric under role accounts ------------------------------------------------------


class Tap:
    """The results routed to one reply key, with the user_id the broker checked (admin)."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self.queue = queue
        self.seen: dict[str, list[tuple[Result, str | None]]] = {}

    async def collect(self) -> None:
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            result = decode(message.body, Result)
            self.seen.setdefault(result.task_id, []).append((result, message.user_id))

    async def terminal(self, task_id: str) -> tuple[Result, str | None]:
        async def arrived() -> bool:
            await self.collect()
            return any(r.terminal for r, _ in self.seen.get(task_id, []))

        await eventually(arrived, what=f"a terminal result for {task_id}")
        return next((r, u) for r, u in self.seen[task_id] if r.terminal)


@pytest.fixture
async def admin_channel(fabric: Fabric) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        yield await connection.channel()


async def test_role_accounts_run_a_task_a_retry_a_dead_letter_and_a_refusal_end_to_end(
    accounts: Accounts, fabric: Fabric, admin_channel: AbstractChannel
) -> None:
    # Given a worker, a dispatcher and the reaper, each under its own role account
    await fabric.purge("demo.echo", "demo.fail", "demo.sleep")
    await fabric.purge_reaper()
    executor, executor_url = accounts.url(Role.EXECUTOR, "ex", ("demo.echo", "demo.fail"))
    every = tuple(c.name for c in fabric.topology.capabilities)  # as the CLI's default
    dispatcher_id, dispatcher_url = accounts.url(Role.DISPATCHER, "disp", every)
    reaper_id, reaper_url = accounts.url(Role.REAPER, "reaper")
    tap_queue = await admin_channel.declare_queue(exclusive=True)
    await tap_queue.bind(names.RESULTS_EXCHANGE, names.reply_routing_key(dispatcher_id))
    tap = Tap(tap_queue)
    async with (
        fabric.worker([Echo(), Fail()], amqp_url=executor_url, executor_id=executor),
        fabric.reaper(amqp_url=reaper_url, reaper_id=reaper_id),
        fabric.dispatcher(
            amqp_url=dispatcher_url, dispatcher_id=dispatcher_id, supervision=None
        ) as dispatcher,
    ):
        # When it runs a task, a task that succeeds on its second attempt (through the 1 s
        # retry tier), and a task that expires in a queue no worker serves
        echo = await dispatcher.submit("demo.echo", {"hello": "roles"})
        retried = await dispatcher.submit(
            "demo.fail",
            {"mode": "retryable", "succeed_on_attempt": 2},
            retry=RetryHints(max_attempts=3, initial_backoff_ms=1000),
        )
        expired = await dispatcher.submit("demo.sleep", {"seconds": 0}, queue_timeout_s=0.5)

        # Then each ends as it should, answered under the account that decided it
        done = await echo.result(30)
        assert (done.status, done.output) == (Status.SUCCESS, {"hello": "roles"})
        again = await retried.result(30)
        assert (again.status, again.attempt) == (Status.SUCCESS, 2)
        dead = await expired.result(30)
        assert dead.status is Status.FAILED and dead.error is not None
        assert dead.error.code is ErrorCode.TIMEOUT and dead.executor_id == reaper_id
        # and every result on the wire carries the user_id the broker checked
        for handle, account in ((echo, executor), (retried, executor), (expired, reaper_id)):
            _, user_id = await tap.terminal(handle.task_id)
            assert user_id == account

        # When garbage reaches the worker's queue
        garbage_id = new_id()
        exchange = await admin_channel.get_exchange(names.TASKS_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(GARBAGE, message_id=garbage_id), "demo.echo")
        # Then the worker's dead copy reaches wayang.dead.demo.echo through wayang.dead (the
        # executor may publish there, for its capabilities only), under its user_id
        dead_queue = await admin_channel.get_queue(names.dead_queue("demo.echo"), ensure=False)
        copies: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def copied() -> bool:
            message = await dead_queue.get(no_ack=True, fail=False)
            if message is not None and message.message_id == garbage_id:
                copies.append(message)
            return bool(copies)

        await eventually(copied, what="the worker's dead copy in wayang.dead.demo.echo")
        assert copies[0].user_id == executor
        assert (copies[0].headers or {})[DEAD_LETTERED_BY_HEADER] == executor
    await fabric.purge("demo.echo", "demo.fail", "demo.sleep")
    await _drop_queues(fabric, names.reply_queue(dispatcher_id))


def rotated_url(accounts: Accounts, identity: str) -> str:
    """A fresh password for ``identity`` (rotation), as its URL."""
    account = account_for(Role.REAPER, identity)
    granted = grant(accounts.admin, account, new_password=True)
    assert granted.password is not None and not granted.created
    return with_credentials(accounts.fabric.endpoint.amqp_url, identity, granted.password)


# -- revoke, rotate, and what grant refuses ------------------------------------------------------


async def test_revoke_closes_the_accounts_connections_and_it_no_longer_logs_in(
    accounts: Accounts,
) -> None:
    # Given an executor account with an open connection
    executor, url = accounts.url(Role.EXECUTOR, "ex", ("demo.echo",))
    connection = await aio_pika.connect(url)
    closed: list[BaseException | None] = []
    connection.close_callbacks.add(lambda _conn, exc: closed.append(exc))
    try:
        # When it is revoked
        assert revoke(accounts.admin, executor)
        # Then the broker closes its connection (CONNECTION_FORCED) at once
        await eventually(lambda: bool(closed), what="the connection closed by the broker")
        assert "CONNECTION_FORCED" in str(closed[0])
    finally:
        await connection.close()
    # and the account no longer logs in
    with pytest.raises(BrokerUnreachable, match="refused the credentials"):
        await connect(url, "after-revoke")
    assert show(accounts.admin, executor) == []
    assert not revoke(accounts.admin, executor)


async def test_grant_keeps_the_password_until_rotated_and_never_touches_other_users(
    accounts: Accounts, fabric: Fabric
) -> None:
    # Given a reaper account
    reaper_id, old_url = accounts.url(Role.REAPER, "reaper")
    account = account_for(Role.REAPER, reaper_id)
    # When it is granted again, Then its password is kept (the old URL still logs in)
    assert grant(accounts.admin, account).password is None
    await (await connect(old_url, "still-valid")).close()
    # When its password is rotated, Then only the new one works
    new_url = rotated_url(accounts, reaper_id)
    await (await connect(new_url, "rotated")).close()
    with pytest.raises(BrokerUnreachable):
        await connect(old_url, "stale")
    # And grant refuses to turn it into another role, or to touch the administrator
    with pytest.raises(ConfigError, match="is a reaper account"):
        grant(accounts.admin, account_for(Role.EXECUTOR, reaper_id, ("demo.echo",)))
    with pytest.raises(ConfigError, match="not a wayang-mq account"):
        grant(accounts.admin, account_for(Role.REAPER, fabric.endpoint.username))
    with pytest.raises(ConfigError, match="not a wayang-mq account"):
        revoke(accounts.admin, fabric.endpoint.username)
    (view,) = show(accounts.admin, reaper_id)
    assert view.role is Role.REAPER and view.permissions is not None
    assert view.permissions["read"] == "^(?:wayang\\.reaper)$"
    assert {t["exchange"] for t in view.topics} >= {names.RESULTS_EXCHANGE, names.TASKS_EXCHANGE}


def test_the_access_commands_grant_show_and_revoke(
    fabric_env: dict[str, str], tmp_path: Path
) -> None:
    identity = f"cp-{new_id()[:8]}"
    password_file = tmp_path / "cp.password"
    # When an account is granted with --password-file
    run = wayang(
        "access",
        "grant",
        "control-plane",
        identity,
        "--password-file",
        str(password_file),
        env=fabric_env,
    )
    assert run.returncode == 0, run.stderr
    # Then the password is in a 0600 file, not on the terminal
    password = password_file.read_text().strip()
    assert len(password) >= 32 and password not in run.stdout
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    # and show lists its role and regexes
    shown = wayang("access", "show", identity, env=fabric_env)
    assert shown.returncode == 0, shown.stderr
    assert f"{identity}  role=control-plane" in shown.stdout
    assert "topic wayang.events: write ^$  read ^$" in shown.stdout
    assert "wayang\\.record" in shown.stdout
    # and revoke removes it
    gone = wayang("access", "revoke", identity, env=fabric_env)
    assert gone.returncode == 0 and "revoked" in gone.stdout
    assert wayang("access", "show", identity, env=fabric_env).returncode == 2
    # and an executor without a capability is a one-line usage error
    bad = wayang("access", "grant", "executor", identity, env=fabric_env)
    assert bad.returncode == 2 and "at least one --capability" in bad.stderr
