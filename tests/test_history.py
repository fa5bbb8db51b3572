"""The history stream (real broker, real PostgreSQL): every recorded message is kept in
``wayang.history``; a fresh database rebuilt from it matches the control plane's record, and
``wayang-mq events`` reads it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aio_pika
import psycopg
import pytest
from wayang_workers.demo import Echo, Fail

from wayang_mq import Status
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.controlplane.facts import Delivery
from wayang_mq.controlplane.history import History, parse_start
from wayang_mq.controlplane.migrate import migrate
from wayang_mq.controlplane.rebuild import rebuild
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.model import RetryHints, Task
from wayang_mq.core.names import HISTORY_QUEUE, TASKS_EXCHANGE
from wayang_mq.core.wire import task_message
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.plugin import fresh_database

TASKS = (
    "SELECT task_id, state, status, error_code, attempt, executor_id FROM tasks"
    " WHERE task_id = ANY(%s) ORDER BY task_id"
)
ATTEMPTS = (
    "SELECT task_id, attempt, state, executor_id FROM attempts"
    " WHERE task_id = ANY(%s) ORDER BY task_id, attempt"
)
RESULTS = (
    "SELECT task_id, attempt, verdict, status FROM results"
    " WHERE task_id = ANY(%s) ORDER BY task_id, attempt, verdict"
)
USAGE = (
    "SELECT task_id, attempt, executor_id, capability, issuer, node_id, wall_ms, cpu_ms,"
    " bytes_in, bytes_out, units FROM usage WHERE task_id = ANY(%s) ORDER BY task_id, attempt"
)


def _rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, params).fetchall())


async def _next_offset(fabric: Fabric) -> int:
    """Where what happens from now on starts in the (shared) history."""
    async with History(fabric.endpoint.amqp_url) as history:
        last = await history.last_offset()
    return 0 if last is None else last + 1


async def _run_tasks(fabric: Fabric, record_db: str) -> list[str]:
    """Three echoes, a task that succeeds on its second attempt, one that fails for good;
    recorded by an in-process control plane. Returns the task ids."""
    async with (
        fabric.control_plane(record_db),
        fabric.worker([Echo(), Fail()], executor_id="history-worker"),
        fabric.dispatcher() as dispatcher,
    ):
        handles = [await dispatcher.submit("demo.echo", {"n": n}) for n in range(3)]
        retried = dispatcher.task(
            "demo.fail",
            {"mode": "retryable", "succeed_on_attempt": 2},
            retry=RetryHints(max_attempts=2, initial_backoff_ms=1000),
        )
        handles.append(await dispatcher.submit_task(retried))
        handles.append(await dispatcher.submit("demo.fail", {"mode": "permanent"}))
        results = [await h.result(30) for h in handles]
        assert [r.status for r in results] == [Status.SUCCESS] * 4 + [Status.FAILED]
        assert results[3].attempt == 2
        ids = [h.task_id for h in handles]

        def all_finished() -> bool:
            states = _rows(record_db, "SELECT state FROM tasks WHERE task_id = ANY(%s)", ids)
            return len(states) == len(ids) and {s for (s,) in states} == {"finished"}

        await eventually(all_finished, what="every task recorded finished")
    return ids


async def test_a_fresh_database_rebuilt_from_the_history_matches_the_record(
    fabric: Fabric, record_db: str, postgres: str
) -> None:
    # Given tasks (one retried, one failed) recorded by a control plane, and kept in the stream
    await fabric.purge_record()
    start = await _next_offset(fabric)
    ids = await _run_tasks(fabric, record_db)

    # When a fresh database is rebuilt from the stream, from where the test began
    with fresh_database(postgres) as rebuilt:
        migrate(rebuilt)
        seen: list[tuple[int, int]] = []
        report = await rebuild(
            fabric.endpoint.amqp_url,
            rebuilt,
            fabric.keyring,
            from_offset=start,
            progress=lambda done, total: seen.append((done, total)),
        )

        # Then it holds the same tasks, attempts, results and usage as the record
        for sql in (TASKS, ATTEMPTS, RESULTS, USAGE):
            assert _rows(rebuilt, sql, ids) == _rows(record_db, sql, ids) != []
        assert report.first == start and report.written > 0
        assert seen[-1][0] == seen[-1][1] == report.last - start + 1  # every entry
        assert report.read >= len(ids)
        # and a second rebuild into the same database is refused: it is not fresh any more
        with pytest.raises(ConfigError, match="already holds a record"):
            await rebuild(fabric.endpoint.amqp_url, rebuilt, fabric.keyring, from_offset=start)


async def test_events_from_an_offset_prints_the_tasks_and_their_results(
    fabric: Fabric, record_db: str, fabric_env: dict[str, str]
) -> None:
    # Given tasks run after a known offset of the history
    start = await _next_offset(fabric)
    ids = await _run_tasks(fabric, record_db)

    # When `wayang-mq events --from OFFSET` reads it (a separate process, as a user runs it)
    text = await _wayang("events", "--from", str(start), env=fabric_env)
    as_json = await _wayang("events", "--from", "10m", "--json", env=fabric_env)

    # Then every task shows up with its result, the retry and the failure included
    lines = text.splitlines()
    assert lines and lines[0].split()[0] == str(start)
    for task_id in ids:
        mine = [line.split() for line in lines if task_id in line]
        assert any(cols[2] == "task" for cols in mine), mine
        assert any(cols[2] == "result" for cols in mine), mine
    events = [json.loads(line) for line in as_json.splitlines()]
    retried, failed = ids[3], ids[4]
    assert {(e["kind"], e["status"]) for e in events if e["task_id"] == retried} >= {
        ("retry", None),
        ("result", "FAILED (retried)"),
        ("result", "SUCCESS"),
    }
    assert ("result", "FAILED") in {
        (e["kind"], e["status"]) for e in events if e["task_id"] == failed
    }


async def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``wayang-mq ARGS`` as a separate process, with ``env`` on a clean WAYANG_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "wayang_mq.cli", *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _wayang(*args: str, env: dict[str, str]) -> str:
    run = await _run(*args, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_a_stream_position_is_an_offset_a_name_an_instant_or_a_duration_ago() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_start("42") == 42
    assert parse_start("first") == "first"
    assert parse_start("10m", now=now) == now - timedelta(minutes=10)
    assert parse_start("2024-05-01T11:00:00Z") == datetime(2024, 5, 1, 11, 0, tzinfo=UTC)
    assert parse_start("2024-05-01T11:00") == datetime(2024, 5, 1, 11, 0, tzinfo=UTC)
    with pytest.raises(ConfigError, match="not a stream position"):
        parse_start("yesterday")


async def test_db_rebuild_replays_into_an_empty_database_and_refuses_a_filled_one(
    fabric: Fabric, record_db: str, fabric_env: dict[str, str], postgres: str
) -> None:
    # Given a task run after a known offset, recorded (so appended to the history) by a
    # control plane on another database, and an empty migrated database
    await fabric.purge_record()
    start = await _next_offset(fabric)
    with fresh_database(postgres) as live:
        migrate(live)
        async with (
            fabric.control_plane(live),
            fabric.worker([Echo()]),
            fabric.dispatcher() as dispatcher,
        ):
            handle = await dispatcher.submit("demo.echo", {"via": "rebuild"})
            assert (await handle.result(30)).status is Status.SUCCESS

            def recorded() -> bool:
                sql = "SELECT state FROM tasks WHERE task_id = %s"
                return _rows(live, sql, handle.task_id) == [("finished",)]

            await eventually(recorded, what="the task recorded finished")
    env = fabric_env | {"WAYANG_DATABASE_URL": record_db}

    # When `wayang-mq db rebuild` replays the history from there, twice
    first = await _run("db", "rebuild", "--from", str(start), env=env)
    second = await _run("db", "rebuild", "--from", str(start), env=env)

    # Then the first run recorded the task, showing its progress; the second is refused
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"replayed offsets {start}..")
    assert "rebuild: " in first.stderr and " history entries" in first.stderr
    states = _rows(record_db, "SELECT state FROM tasks WHERE task_id = %s", handle.task_id)
    assert states == [("finished",)]
    assert second.returncode == 2
    assert second.stderr.startswith("wayang-mq: error: the database already holds a record")


async def test_headers_that_crash_a_stream_conversion_reach_the_history_packed(
    fabric: Fabric, record_db: str
) -> None:
    # Given a signed task published with header values RabbitMQ 3.10 cannot convert for a
    # stream (a decimal, an array of tables: rabbitmq-server#3564), while a control plane runs
    await fabric.purge_record()
    await fabric.purge("demo.echo")
    start = await _next_offset(fabric)
    task = Task.create("demo.echo", {"odd": "headers"})
    wire = task_message(task, fabric.signer)
    odd = {"price": Decimal("12.50"), "hops": [{"via": "eu", "n": 1}]}
    async with fabric.control_plane(record_db) as cp:
        connection = await aio_pika.connect(fabric.endpoint.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(TASKS_EXCHANGE)
            message = to_amqp(wire)
            message.headers = {**(message.headers or {}), **odd}
            await exchange.publish(message, routing_key="demo.echo")
            # Then the publisher's channel survives, the task is recorded
            assert not channel.is_closed
        await eventually(lambda: cp.counts.written >= 1, what="the task recorded")
    # and its history entry holds the headers as they were published
    async with History(fabric.endpoint.amqp_url) as history:
        end = await history.last_offset()
        assert end is not None and end >= start
        entries = [e async for e in history.entries(start, end=end)]
    (entry,) = [e for e in entries if e.delivery.message_id == task.task_id]
    assert {k: entry.delivery.headers[k] for k in odd} == odd
    await fabric.purge("demo.echo")


async def test_a_bounded_read_yields_every_delivery_of_its_last_entry(fabric: Fabric) -> None:
    # Given one history entry holding a batch of three deliveries (as the control plane appends)
    batch = [
        Delivery(exchange=TASKS_EXCHANGE, routing_key="demo.echo", body=bytes([n]), headers={})
        for n in range(3)
    ]
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(Delivery.pack_many(batch)), routing_key=HISTORY_QUEUE
        )
    # When it is read up to its own offset
    async with History(fabric.endpoint.amqp_url) as history:
        end = await history.last_offset()
        assert end is not None
        entries = [e async for e in history.entries(end, end=end)]
    # Then all three come, sharing that offset
    assert [e.delivery.body for e in entries] == [b"\x00", b"\x01", b"\x02"]
    assert {e.offset for e in entries} == {end}
