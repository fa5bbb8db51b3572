"""The control plane's record (real broker, real PostgreSQL): every task, result and event
written once, from any client; the first terminal result wins."""

from __future__ import annotations

from typing import Any

import aio_pika
import psycopg
import pytest
from wayang_workers.demo import Echo, Fail

from wayang_mq import ErrorCode, Status
from wayang_mq.controlplane import store
from wayang_mq.controlplane.facts import Delivery, Fact, read
from wayang_mq.controlplane.migrate import migrate
from wayang_mq.core.envelope import TaskChecks
from wayang_mq.core.model import ErrorInfo, Result, RetryHints, Task
from wayang_mq.core.names import RECORD_REFUSED_QUEUE, RESULTS_EXCHANGE, TASKS_EXCHANGE
from wayang_mq.core.wire import WireMessage, signed_message, task_message
from wayang_mq.ops.deadletters import replay
from wayang_mq.testing.harness import Fabric, eventually


def _rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, params).fetchall())


def test_migrate_twice_applies_nothing_the_second_time(record_db: str) -> None:
    assert migrate(record_db) == []
    tables = {r[0] for r in _rows(record_db, "SELECT tablename FROM pg_tables")}
    assert {"executors", "tasks", "attempts", "results", "progress", "dead_letters"} <= tables


async def test_tasks_results_and_executors_are_recorded_once(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    async with (
        fabric.control_plane(record_db) as cp,
        fabric.worker([Echo()], executor_id="rec-echo") as _,
        fabric.dispatcher() as dispatcher,
    ):
        handles = [await dispatcher.submit("demo.echo", {"n": i}) for i in range(20)]
        results = [await h.result(30) for h in handles]
        assert all(r.status is Status.SUCCESS for r in results)
        ids = [h.task_id for h in handles]

        def finished() -> list[tuple[Any, ...]]:
            return _rows(
                record_db,
                "SELECT task_id, status, executor_id FROM tasks"
                " WHERE task_id = ANY(%s) AND state = 'finished'",
                ids,
            )

        await eventually(lambda: len(finished()) == 20, what="20 tasks recorded finished")
        rows = finished()
        assert {r[1] for r in rows} == {"SUCCESS"} and {r[2] for r in rows} == {"rec-echo"}
        won = _rows(
            record_db,
            "SELECT count(*) FROM results WHERE task_id = ANY(%s) AND verdict = 'won'",
            ids,
        )
        assert won == [(20,)]
        executors = _rows(
            record_db, "SELECT capabilities, state FROM executors WHERE executor_id = 'rec-echo'"
        )
        assert executors == [(["demo.echo"], "live")]
        assert cp.counts.refused == 0


async def test_a_retried_task_has_one_row_per_attempt(fabric: Fabric, record_db: str) -> None:
    await fabric.purge_record()
    async with (
        fabric.control_plane(record_db),
        fabric.worker([Fail()]),
        fabric.dispatcher() as dispatcher,
    ):
        task = dispatcher.task(
            "demo.fail",
            {"mode": "retryable", "succeed_on_attempt": 2},
            retry=RetryHints(max_attempts=2, initial_backoff_ms=1000),
        )
        result = await (await dispatcher.submit_task(task)).result(30)
        assert result.status is Status.SUCCESS and result.attempt == 2

        def attempts() -> list[tuple[Any, ...]]:
            return _rows(
                record_db,
                "SELECT attempt, state FROM attempts WHERE task_id = %s ORDER BY attempt",
                task.task_id,
            )

        await eventually(lambda: len(attempts()) == 2 and attempts()[1][1] == "finished")
        assert attempts() == [(1, "finished"), (2, "finished")]
        verdicts = _rows(
            record_db,
            "SELECT attempt, verdict FROM results WHERE task_id = %s ORDER BY seq",
            task.task_id,
        )
        assert verdicts == [(1, "retried"), (2, "won")]


async def test_the_same_message_read_twice_is_written_once(record_db: str, fabric: Fabric) -> None:
    # Given one signed task as the record would receive it, read twice (a redelivery after a
    # control plane died, or a second instance, or a rebuild from the stream)
    task = Task.create("demo.echo", {"n": 1}, issuer="")
    message = task_message(task, fabric.signer)
    delivery = Delivery(
        exchange=TASKS_EXCHANGE,
        routing_key="demo.echo",
        body=message.body,
        headers=message.headers,
        message_id=task.task_id,
    )
    checks = TaskChecks()
    first, second = (read(delivery, fabric.keyring, checks) for _ in range(2))
    async with await psycopg.AsyncConnection.connect(record_db, autocommit=True) as conn:
        # Then the first write records it and the second changes nothing
        assert await store.write(conn, first) is True
        assert await store.write(conn, second) is False
    assert _rows(record_db, "SELECT count(*) FROM facts WHERE task_id = %s", task.task_id) == [(1,)]
    assert _rows(
        record_db, "SELECT count(*) FROM task_copies WHERE task_id = %s", task.task_id
    ) == [(1,)]


@pytest.mark.parametrize("copy_first", [True, False], ids=["copy-first", "result-first"])
async def test_a_replays_result_is_replayed_whichever_the_record_reads_first(
    record_db: str, fabric: Fabric, copy_first: bool
) -> None:
    # Given a task answered FAILED timeout, then replayed (same id and token, new bytes with a
    # fresh deadline) and answered SUCCESS by the replay's run: the copy comes from the
    # operator's tool and the result from a worker, two publishers RabbitMQ does not order
    task = Task.create("demo.echo", {"n": 1}, issuer="", reply_to="reply.d-1")
    copy = task.model_copy(update={"deadline_ms": task.deadline_ms + 60_000})
    failed = Result.failure(task, "reaper", ErrorInfo(code=ErrorCode.TIMEOUT, message="expired"))
    succeeded = Result.answering(task, "w-1", Status.SUCCESS, output={"n": 1})

    def delivered(message: WireMessage, exchange: str, key: str) -> Fact:
        delivery = Delivery(
            exchange=exchange,
            routing_key=key,
            body=message.body,
            headers=message.headers,
            message_id=task.task_id,
        )
        return read(delivery, fabric.keyring, TaskChecks())

    def answer(result: Result) -> Fact:
        signed = signed_message(result, fabric.signer, message_id=task.task_id)
        return delivered(signed, RESULTS_EXCHANGE, "reply.d-1")

    original = delivered(task_message(task, fabric.signer), TASKS_EXCHANGE, "demo.echo")
    replayed = delivered(task_message(copy, fabric.signer), TASKS_EXCHANGE, "demo.echo")
    later = [replayed, answer(succeeded)] if copy_first else [answer(succeeded), replayed]
    # When the record reads them in either order
    async with await psycopg.AsyncConnection.connect(record_db, autocommit=True) as conn:
        for fact in [original, answer(failed), *later]:
            assert await store.write(conn, fact) is True
    # Then the first answer stays the task's and the replay's run is kept as 'replayed'
    verdicts = "SELECT status, verdict FROM results WHERE task_id = %s ORDER BY seq"
    assert _rows(record_db, verdicts, task.task_id) == [("FAILED", "won"), ("SUCCESS", "replayed")]


async def test_an_unverifiable_message_is_counted_and_set_aside_never_written(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    async with fabric.control_plane(record_db) as cp:
        connection = await aio_pika.connect(fabric.endpoint.amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(RESULTS_EXCHANGE)
            # a result nobody signed, naming a task id
            await exchange.publish(
                aio_pika.Message(b"\x81\xa7task_id\xa6forged", message_id="forged"),
                routing_key="reply.someone",
            )
            await eventually(lambda: cp.counts.refused == 1, what="the forged result refused")
            refused = await channel.get_queue(RECORD_REFUSED_QUEUE, ensure=False)
            kept = await refused.get(no_ack=True, fail=False)
    assert kept is not None and kept.message_id == "forged"
    assert "bad_signature" in str((kept.headers or {})["wayang-refused-reason"])
    assert _rows(record_db, "SELECT reason, count FROM refusals") == [("bad_signature", 1)]
    assert _rows(record_db, "SELECT count(*) FROM facts") == [(0,)]


async def test_a_replayed_dead_letters_new_result_is_recorded_beside_the_first(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    await fabric.purge("demo.echo")
    await fabric.purge_reaper()
    async with (
        fabric.control_plane(record_db),
        fabric.reaper(),
        fabric.dispatcher(supervision=None) as dispatcher,
    ):
        # Given a task that expired with no worker, answered FAILED timeout by the reaper
        handle = await dispatcher.submit("demo.echo", {"replay": 1}, queue_timeout_s=0.5)
        first = await handle.result(30)
        assert first.error is not None and first.error.code is ErrorCode.TIMEOUT
        # When an operator replays its dead letter with a worker running
        async with fabric.worker([Echo()]):
            (outcome,) = await replay(
                fabric.endpoint.amqp_url,
                "demo.echo",
                keyring=fabric.keyring,
                signer=fabric.signer,
                task_id=handle.task_id,
            )
            assert outcome.replayed

            # Then the record keeps the replay's SUCCESS as 'replayed' beside the first answer
            def verdicts() -> list[tuple[Any, ...]]:
                return _rows(
                    record_db,
                    "SELECT status, verdict FROM results WHERE task_id = %s ORDER BY seq",
                    handle.task_id,
                )

            await eventually(lambda: len(verdicts()) == 2, what="the replay's result recorded")
    assert verdicts() == [("FAILED", "won"), ("SUCCESS", "replayed")]
    task = _rows(
        record_db,
        "SELECT status, error_code, replayed_at IS NOT NULL FROM tasks WHERE task_id = %s",
        handle.task_id,
    )
    assert task == [("FAILED", "timeout", True)]
