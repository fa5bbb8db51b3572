"""Claims (real broker, real PostgreSQL): workers started with ``claims=True`` ask the control
plane before running a task, so a task id runs once across the fleet, a recorded cancel stops
a worker that started after it, and with no control plane the fabric keeps executing."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import aio_pika
import psycopg
import pytest
from wayang_workers.demo import Echo, Sleep

from wayang_mq import Status, Task
from wayang_mq.core.authority import DECIDED_BY_CONTROL_PLANE
from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.model import JsonLike
from wayang_mq.testing.harness import Fabric, eventually


class CountingSleep(Sleep):
    """``demo.sleep`` that remembers every token it ran."""

    runs: ClassVar[list[str]] = []

    async def execute(self, task: Task) -> JsonLike:
        CountingSleep.runs.append(task.token)
        return await super().execute(task)


def _rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, params).fetchall())


async def _publish_outbox(fabric: Fabric, url: str, task_id: str) -> list[str]:
    """What the control plane's outbox loop does, for the answers to ``task_id`` still there
    (the loop deletes a row once the broker confirmed it); their routing keys."""
    rows = _rows(
        url,
        "SELECT exchange, routing_key, body, headers, message_id, type FROM outbox"
        " WHERE message_id = %s ORDER BY id",
        task_id,
    )
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for exchange_name, key, body, headers, message_id, wire_type in rows:
            exchange = await channel.get_exchange(exchange_name, ensure=False)
            message = aio_pika.Message(
                bytes(body),
                headers=headers,
                message_id=message_id,
                correlation_id=message_id,
                type=wire_type,
                content_type="application/msgpack",
                app_id="wayang-mq",
                reply_to=key,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, routing_key=key)
    return [row[1] for row in rows]


async def test_a_task_id_published_twice_by_two_clients_runs_once(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    await fabric.purge("demo.sleep")
    CountingSleep.runs.clear()
    async with (
        fabric.control_plane(record_db),
        fabric.worker([CountingSleep()], executor_id="claims-a", claims=True, concurrency=1),
        fabric.worker([CountingSleep()], executor_id="claims-b", claims=True, concurrency=1),
        fabric.dispatcher() as first,
        fabric.dispatcher() as second,
        fabric.dispatcher() as third,
    ):
        # Given task X running on one worker (the other is free),
        task = first.task("demo.sleep", {"seconds": 2})
        handle = await first.submit_task(task)
        await eventually(lambda: task.token in CountingSleep.runs, what="X running")

        def copy_for(client: Any) -> Task:
            fresh: Task = client.task("demo.sleep", {"seconds": 2})
            return fresh.model_copy(update={"task_id": task.task_id, "node_id": task.node_id})

        # when a second client publishes the same task id with its own token while X runs,
        while_running = copy_for(second)
        answered_while_running = await second.submit_task(while_running)

        def copies() -> list[tuple[Any, ...]]:
            return _rows(
                record_db,
                "SELECT token, duplicate, answered FROM task_copies WHERE task_id = %s",
                task.task_id,
            )

        await eventually(
            lambda: any(t == while_running.token for t, _, _ in copies()),
            what="the copy recorded",
        )
        result = await handle.result(30)
        assert result.status is Status.SUCCESS
        # and a third publishes it again after it finished,
        after_finish = copy_for(third)
        answered_after = await third.submit_task(after_finish)

        # then it ran once, the record holds one task and one winning result,
        await eventually(
            lambda: sorted(c[1:] for c in copies()) == [(False, False), (True, True), (True, True)],
            what="both copies recorded as duplicates and answered",
        )
        assert CountingSleep.runs == [task.token]
        assert _rows(record_db, "SELECT count(*) FROM tasks WHERE task_id = %s", task.task_id) == [
            (1,)
        ]
        won = _rows(
            record_db,
            "SELECT token, executor_id FROM results WHERE task_id = %s AND verdict = 'won'",
            task.task_id,
        )
        assert won == [(task.token, result.executor_id)]
        # and each copy's client is answered from the record with the winner's output.
        keys = await _publish_outbox(fabric, record_db, task.task_id)
        assert set(keys) <= {second.reply_to, third.reply_to}
        for client_handle, copy in (
            (answered_while_running, while_running),
            (answered_after, after_finish),
        ):
            answer = await client_handle.result(30)
            assert answer.status is Status.SUCCESS and answer.output == result.output
            assert answer.token == copy.token
            assert answer.executor_id.startswith(DECIDED_BY_CONTROL_PLANE)
        assert CountingSleep.runs == [task.token]


async def test_a_worker_started_after_a_cancel_refuses_the_task(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    await fabric.purge("demo.sleep")
    CountingSleep.runs.clear()
    async with fabric.control_plane(record_db), fabric.dispatcher() as dispatcher:
        # Given a task queued while no worker runs, and its cancel recorded,
        handle = await dispatcher.submit("demo.sleep", {"seconds": 1})
        assert await dispatcher.cancel(handle.task_id, reason="changed my mind")
        await eventually(
            lambda: (
                _rows(record_db, "SELECT 1 FROM cancels WHERE task_id = %s", handle.task_id) != []
            ),
            what="the cancel recorded",
        )
        # when a worker with claims starts (it never heard the broadcast),
        async with fabric.worker([CountingSleep()], executor_id="claims-late", claims=True):
            result = await handle.result(30)
        # then the task is answered cancelled, not run.
        assert result.status is Status.FAILED and result.error is not None
        assert result.error.code is ErrorCode.CANCELLED
        assert result.error.message == "changed my mind"
        assert CountingSleep.runs == []


async def test_without_a_control_plane_a_worker_with_claims_runs_the_task_anyway(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wayang_mq")
    await fabric.purge("demo.echo")
    # Given no control plane consuming wayang.claims,
    async with (
        fabric.worker([Echo()], executor_id="claims-alone", claims=True, claim_timeout_s=0.5),
        fabric.dispatcher() as dispatcher,
    ):
        # when a task comes, then it runs after the claim timeout, logged.
        result = await dispatcher.run("demo.echo", {"n": 1}, wait_s=30)
    assert result.status is Status.SUCCESS and result.output == {"n": 1}
    assert "event=claim.unanswered" in caplog.text
