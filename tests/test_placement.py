"""Discovery and placement (real broker, real PostgreSQL): a task whose policy names an
executor or labels runs only where the policy holds; one no live executor meets fails fast
``no_executor`` with the reason; a worker refuses a task whose policy it does not meet."""

from __future__ import annotations

import time
from typing import Any

import aio_pika
import psycopg
from wayang_workers.demo import Echo, Fail

from wayang_mq import Status
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.controlplane import store
from wayang_mq.controlplane.facts import Delivery, read
from wayang_mq.controlplane.placement import reason, select
from wayang_mq.core import names
from wayang_mq.core.authority import DECIDED_BY_CONTROL_PLANE
from wayang_mq.core.envelope import TaskChecks
from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.model import (
    Heartbeat,
    PolicyConstraints,
    Registration,
    Result,
    RetryHints,
    Task,
)
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import WireModel, decode, signed_message, task_message
from wayang_mq.runtime.executor import Executor
from wayang_mq.testing.harness import Fabric, eventually

EU = PolicyConstraints(labels={"region": "eu"})


class CountingEcho(Echo):
    """``demo.echo`` that remembers which tasks it ran (to show one never ran)."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def execute(self, task: Task) -> Any:
        self.ran.append(task.task_id)
        return await super().execute(task)


def _live(url: str, *executor_ids: str) -> bool:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM executors WHERE executor_id = ANY(%s) AND state = 'live'"
            " AND registered_at IS NOT NULL",
            (list(executor_ids),),
        ).fetchone()
    return rows is not None and rows[0] == len(executor_ids)


def _two_regions(fabric: Fabric, record_db: str, eu: Executor, us: Executor) -> Any:
    """A control plane and two workers of demo.echo, one labelled region=eu, one region=us."""
    return (
        fabric.control_plane(record_db),
        fabric.worker([eu], executor_id="place-eu", labels={"region": "eu"}),
        fabric.worker([us], executor_id="place-us", labels={"region": "us"}),
        fabric.dispatcher(),
    )


async def test_labelled_tasks_run_only_on_the_executor_with_those_labels(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    eu, us = CountingEcho(), CountingEcho()
    cp, eu_worker, us_worker, dispatching = _two_regions(fabric, record_db, eu, us)
    async with cp, eu_worker, us_worker, dispatching as dispatcher:
        await eventually(lambda: _live(record_db, "place-eu", "place-us"), what="registered")
        # When ten tasks ask for region=eu
        handles = [await dispatcher.submit("demo.echo", {"n": i}, policy=EU) for i in range(10)]
        results = [await h.result(30) for h in handles]
        # Then all ten ran on the eu executor, none on the us one
        assert {(r.status, r.executor_id) for r in results} == {(Status.SUCCESS, "place-eu")}
        assert sorted(eu.ran) == sorted(h.task_id for h in handles) and us.ran == []
        # And a task naming an executor runs there
        pinned = PolicyConstraints(executor_id="place-us")
        result = await (await dispatcher.submit("demo.echo", {}, policy=pinned)).result(30)
        assert (result.status, result.executor_id) == (Status.SUCCESS, "place-us")
        assert len(us.ran) == 1


async def test_a_placed_task_is_placed_again_when_its_retry_comes_due(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    async with (
        fabric.control_plane(record_db),
        fabric.worker([Fail()], executor_id="retry-eu", labels={"region": "eu"}),
        fabric.worker([Fail()], executor_id="retry-us", labels={"region": "us"}),
        fabric.dispatcher() as dispatcher,
    ):
        await eventually(lambda: _live(record_db, "retry-eu", "retry-us"), what="registered")
        # When tasks for region=eu fail their first attempt and are retried
        retry = RetryHints(max_attempts=2, initial_backoff_ms=1000)
        once = {"mode": "retryable", "succeed_on_attempt": 2}
        handles = [
            await dispatcher.submit("demo.fail", once, policy=EU, retry=retry) for _ in range(4)
        ]
        results = [await h.result(30) for h in handles]
        # Then every second attempt ran on the eu executor too (placed again, not queued for
        # any executor of the capability)
        assert {(r.status, r.attempt, r.executor_id) for r in results} == {
            (Status.SUCCESS, 2, "retry-eu")
        }


async def test_a_policy_no_live_executor_meets_fails_fast_with_the_reason(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    eu, us = CountingEcho(), CountingEcho()
    cp, eu_worker, us_worker, dispatching = _two_regions(fabric, record_db, eu, us)
    async with cp as control_plane, eu_worker, us_worker, dispatching as dispatcher:
        await eventually(lambda: _live(record_db, "place-eu", "place-us"), what="registered")
        # When a task with a minute to wait asks for a region nobody has
        mars = PolicyConstraints(labels={"region": "mars"})
        started = time.monotonic()
        handle = await dispatcher.submit("demo.echo", {}, policy=mars, queue_timeout_s=60)
        result = await handle.result(30)
        # Then it is answered FAILED no_executor by the control plane, at once, saying why
        assert time.monotonic() - started < 10
        assert result.status is Status.FAILED and result.error is not None
        assert result.error.code is ErrorCode.NO_EXECUTOR
        assert result.executor_id == f"{DECIDED_BY_CONTROL_PLANE}{control_plane.daemon_id}"
        message = result.error.message
        assert "no live executor of demo.echo has region=mars" in message
        assert "place-eu (region=eu)" in message and "place-us (region=us)" in message
        assert eu.ran == [] and us.ran == []


async def test_a_worker_refuses_a_task_whose_policy_it_does_not_meet(fabric: Fabric) -> None:
    await fabric.purge("demo.echo")
    us = CountingEcho()
    reply = names.reply_routing_key("place-plain")
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection, fabric.worker([us], executor_id="plain-us", labels={"region": "us"}):
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True)
        await replies.bind(names.RESULTS_EXCHANGE, reply)
        # When a client publishes a task asking for region=eu straight to the capability
        task = Task.create("demo.echo", {}, reply_to=reply, issuer="place-plain", policy=EU)
        tasks = await channel.get_exchange(names.TASKS_EXCHANGE)
        await tasks.publish(to_amqp(task_message(task, fabric.signer)), routing_key="demo.echo")
        got: list[Result] = []

        async def answered() -> bool:
            message = await replies.get(fail=False, no_ack=True)
            if message is not None:
                got.append(decode(message.body, Result))
            return bool(got)

        await eventually(answered, what="an answer")
        # Then the us worker answers it FAILED no_executor, saying what did not match and
        # how policy tasks are published, and never runs it
        (result,) = got
        assert (result.task_id, result.status, result.executor_id) == (
            task.task_id,
            Status.FAILED,
            "plain-us",
        )
        assert result.error is not None and result.error.code is ErrorCode.NO_EXECUTOR
        assert "region=eu" in result.error.message and "region=us" in result.error.message
        assert "place.demo.echo" in result.error.message
        assert us.ran == []


def _fact(signer: Signer, keyring: KeyRing, event: WireModel, key: str) -> Any:
    about = getattr(event, "executor_id", "x")
    wire = signed_message(event, signer, message_id=about)
    delivery = Delivery(names.EVENTS_EXCHANGE, key, wire.body, dict(wire.headers))
    return read(delivery, keyring, TaskChecks())


async def test_select_ranks_live_executors_by_load_and_filters_by_policy(record_db: str) -> None:
    signer = Signer.generate()
    keyring = KeyRing.of([signer.public_key])
    # Given three registered executors of demo.echo, with loads from their heartbeats
    given = {"r-a": ("eu", 3), "r-b": ("eu", 1), "r-c": ("us", 0)}
    async with await psycopg.AsyncConnection.connect(record_db, autocommit=True) as conn:
        for executor_id, (region, busy) in given.items():
            registration = Registration(
                executor_id=executor_id,
                capabilities=("demo.echo",),
                concurrency=4,
                metadata={"region": region},
            )
            key = names.event_key("registered", executor_id)
            await store.write(conn, _fact(signer, keyring, registration, key))
            beat = Heartbeat(
                executor_id=executor_id,
                capabilities=("demo.echo",),
                in_flight=tuple(f"{executor_id}-t{n}" for n in range(busy)),
                concurrency=4,
                sequence=1,
            )
            key = names.event_key("heartbeat", executor_id)
            await store.write(conn, _fact(signer, keyring, beat, key))

        async def chosen(policy: PolicyConstraints, capability: str = "demo.echo") -> list[str]:
            return [c.executor_id for c in await select(conn, capability, policy)]

        # Then the least loaded comes first, and the policy filters
        assert await chosen(PolicyConstraints()) == ["r-c", "r-b", "r-a"]
        assert await chosen(EU) == ["r-b", "r-a"]
        assert await chosen(PolicyConstraints(executor_id="r-a")) == ["r-a"]
        assert await chosen(PolicyConstraints(labels={"region": "eu"}, executor_id="r-c")) == []
        assert await chosen(PolicyConstraints(), "demo.sleep") == []
        # And a lost executor is not chosen
        await conn.execute("UPDATE executors SET state = 'lost' WHERE executor_id = 'r-b'")
        assert await chosen(EU) == ["r-a"]
        live = await select(conn, "demo.echo", PolicyConstraints())
        mars = PolicyConstraints(labels={"region": "mars"})
        assert reason("demo.echo", mars, live) == (
            "no live executor of demo.echo has region=mars; live: r-c (region=us), r-a (region=eu)"
        )
        assert reason("demo.sleep", mars, []) == "no live executor serves demo.sleep"
