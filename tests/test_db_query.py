"""db.query against a real PostgreSQL through a real broker: values stay data, read-only
connections refuse writes, timeouts, row limits, the types table, cancellation, a database
lost or down, and the CLI daemon with its DSN by secret reference."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from wayang_workers.db_query import DbQuery, DbQuerySettings

from wayang_mq import ErrorCode, Status
from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.core.model import Result
from wayang_mq.runtime.executor import load_executor
from wayang_mq.runtime.settings import SecretRef, WorkerFile
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.plugin import fresh_database

EXAMPLE = Path(__file__).parent.parent / "workers" / "examples" / "db_query.toml"


@pytest.fixture
def database(postgres: str) -> Iterator[str]:
    """A fresh database holding ``people`` (one row, bob)."""
    with fresh_database(postgres) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE people (name text PRIMARY KEY)")
        conn.execute("INSERT INTO people VALUES ('bob')")
        conn.execute(
            "CREATE FUNCTION add_person(who text) RETURNS int LANGUAGE sql"
            " AS 'INSERT INTO people VALUES (who) RETURNING 1'"
        )
        yield url


def settings(url: str, **connection: Any) -> DbQuerySettings:
    """Two connections to ``url``: ``main`` (read-only unless told) and ``rw`` (writable)."""
    return DbQuerySettings.model_validate(
        {"connections": {"main": {"dsn": url, **connection}, "rw": {"dsn": url, "writable": True}}}
    )


@asynccontextmanager
async def serving(fabric: Fabric, config: DbQuerySettings) -> AsyncIterator[Dispatcher]:
    """An in-process db.query worker and a dispatcher."""
    executor_id = f"db-{secrets.token_hex(3)}"
    async with fabric.worker([DbQuery(config)], executor_id=executor_id), fabric.dispatcher() as d:
        yield d


async def query(dispatcher: Dispatcher, **task: Any) -> Result:
    return await dispatcher.run("db.query", {"connection": "main", **task}, wait_s=30)


def failed(result: Result, code: ErrorCode, reason: str | None, *, retryable: bool) -> None:
    assert result.status is Status.FAILED, result
    assert result.error is not None
    assert result.error.code is code, result.error
    assert result.error.details.get("reason") == reason, result.error
    assert result.error.retryable is retryable, result.error


def people(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [name for (name,) in conn.execute("SELECT name FROM people ORDER BY name")]


async def test_an_injection_attempt_stays_data_and_two_statements_are_refused(
    fabric: Fabric, database: str
) -> None:
    hostile = "x'); DROP TABLE people; --"
    async with serving(fabric, settings(database, writable=True)) as dispatcher:
        # Given a value that would drop the table if it were pasted into the SQL
        inserted = await query(
            dispatcher, sql="INSERT INTO people VALUES (%(name)s)", params={"name": hostile}
        )
        found = await query(
            dispatcher, sql="SELECT name FROM people WHERE name = %s", params=[hostile]
        )
        # And SQL that holds two statements, with and without parameters
        two = await query(dispatcher, sql="SELECT 1; DROP TABLE people")
        two_with_params = await query(dispatcher, sql="SELECT %s; DROP TABLE people", params=[1])
    # Then the value was stored and matched literally, and the table is still there
    assert inserted.status is Status.SUCCESS and inserted.output["rowcount"] == 1
    assert found.output["rows"] == [{"name": hostile}]
    failed(two, ErrorCode.EXECUTOR_ERROR, "sql_error", retryable=False)
    failed(two_with_params, ErrorCode.EXECUTOR_ERROR, "sql_error", retryable=False)
    assert two.error is not None and two.error.details["sqlstate"] == "42601"
    assert "multiple commands" in two.error.message
    assert people(database) == ["bob", hostile]


async def test_a_write_is_refused_read_only_and_committed_writable(
    fabric: Fabric, database: str
) -> None:
    async with serving(fabric, settings(database)) as dispatcher:
        refused = await query(dispatcher, sql="INSERT INTO people VALUES (%s)", params=["ann"])
        # a CTE that writes, and a session setting that would outlive the task, are refused
        # or undone the same way
        sneaky = await query(
            dispatcher, sql="WITH x AS (DELETE FROM people RETURNING 1) SELECT count(*) FROM x"
        )
        # a query calling a function that writes
        through_function = await query(dispatcher, sql="SELECT add_person(%s)", params=["eve"])
        accepted = await query(
            dispatcher, connection="rw", sql="INSERT INTO people VALUES (%s)", params=["cy"]
        )
    # (the write is refused before it is sent; the CTE, a query, by PostgreSQL's READ ONLY)
    failed(refused, ErrorCode.EXECUTOR_ERROR, "read_only", retryable=False)
    assert refused.error is not None and "runs queries only" in refused.error.message
    failed(sneaky, ErrorCode.EXECUTOR_ERROR, "read_only", retryable=False)
    assert sneaky.error is not None and sneaky.error.details["sqlstate"] in ("25006", "0A000")
    failed(through_function, ErrorCode.EXECUTOR_ERROR, "read_only", retryable=False)
    assert through_function.error is not None
    assert through_function.error.details["sqlstate"] == "25006"
    assert accepted.status is Status.SUCCESS, accepted.error
    assert accepted.output["rowcount"] == 1 and accepted.output["command"] == "INSERT"
    assert accepted.output["rows"] == [] and accepted.output["columns"] == []
    assert people(database) == ["bob", "cy"]


async def test_nothing_a_task_leaves_on_its_session_reaches_the_next_task(
    fabric: Fabric, database: str
) -> None:
    # Given one pooled connection, so both tasks run on the same session
    async with serving(fabric, settings(database, max_size=1)) as dispatcher:
        # When a task takes a session lock and switches the session to read-write
        locked = await query(dispatcher, sql="SELECT pg_advisory_lock(42)")
        unlocked = await query(
            dispatcher, sql="SELECT set_config('default_transaction_read_only', 'off', false)"
        )
        # Then the next task finds neither
        locks = await query(
            dispatcher, sql="SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'"
        )
        write = await query(dispatcher, sql="INSERT INTO people VALUES ('eve')")
    assert locked.status is Status.SUCCESS and unlocked.status is Status.SUCCESS
    assert locks.output["rows"] == [{"n": 0}]
    failed(write, ErrorCode.EXECUTOR_ERROR, "read_only", retryable=False)


async def test_a_statement_past_its_timeout_fails_timeout_and_the_pool_still_serves(
    fabric: Fabric, database: str
) -> None:
    async with serving(fabric, settings(database, max_size=1)) as dispatcher:
        slow = await query(dispatcher, sql="SELECT pg_sleep(5)", timeout_ms=200)
        after = await query(dispatcher, sql="SELECT count(*) AS n FROM people")
        too_long = await query(dispatcher, sql="SELECT 1", timeout_ms=60_000)
    failed(slow, ErrorCode.TIMEOUT, "statement_timeout", retryable=True)
    assert slow.error is not None and slow.error.details["sqlstate"] == "57014"
    assert slow.metrics["duration_ms"] < 3000
    assert after.status is Status.SUCCESS and after.output["rows"] == [{"n": 1}]
    failed(too_long, ErrorCode.INVALID_TASK, "over_limit", retryable=False)
    assert too_long.error is not None and "at most 5000 ms" in too_long.error.message


async def test_the_row_limit_cuts_the_rows_and_says_truncated(
    fabric: Fabric, database: str
) -> None:
    async with serving(fabric, settings(database, row_limit=20)) as dispatcher:
        cut = await query(dispatcher, sql="SELECT generate_series(1, 50) AS n", row_limit=10)
        whole = await query(dispatcher, sql="SELECT generate_series(1, 5) AS n")
        too_many = await query(dispatcher, sql="SELECT 1", row_limit=21)
    assert cut.status is Status.SUCCESS, cut.error
    assert cut.output["rows"] == [{"n": n} for n in range(1, 11)]
    assert cut.output["row_count"] == 10 and cut.output["truncated"] is True
    assert cut.output["rowcount"] is None  # the statement was cancelled: its count unknown
    assert cut.metrics["units.db_rows"] == 10
    assert whole.output["row_count"] == 5 and whole.output["truncated"] is False
    assert whole.output["rowcount"] == 5 and whole.output["command"] == "SELECT"
    failed(too_many, ErrorCode.INVALID_TASK, "over_limit", retryable=False)


async def test_a_huge_answer_is_never_read_whole_the_statement_is_cancelled_at_the_limit(
    fabric: Fabric, database: str
) -> None:
    # Given a read-only connection whose results are capped at 64 KiB
    cap = 64 * 1024
    config = DbQuerySettings.model_validate(
        {
            "connections": {
                "main": {"dsn": database, "max_result_bytes": cap, "statement_timeout_ms": 20_000},
                "rw": {"dsn": database, "writable": True, "max_result_bytes": cap},
            }
        }
    )
    huge = "SELECT generate_series(1, 50000000) AS n, repeat('x', 10000) AS pad"
    async with serving(fabric, config) as dispatcher:
        # When a task asks for 50 million rows of 10 kB (500 GB), under a row limit of 1000
        started = time.monotonic()
        capped = await query(dispatcher, sql=huge, row_limit=1000)
        elapsed = time.monotonic() - started
        # and a writable connection's answer is cut to the same bytes
        rw = await dispatcher.run(
            "db.query",
            {
                "connection": "rw",
                "sql": "SELECT repeat('y', 10000) AS pad FROM generate_series(1, 50)",
            },
            wait_s=30,
        )
    # Then it got the rows that fit 64 KiB, flagged, at once: the worker read no further and
    # PostgreSQL stopped producing them (no statement of it still runs)
    assert capped.status is Status.SUCCESS, capped.error
    assert capped.output["truncated"] is True
    assert 1 <= capped.output["row_count"] <= 7, capped.output["row_count"]
    assert elapsed < 10, elapsed
    with psycopg.connect(database, autocommit=True) as conn:
        running = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
            " AND query LIKE '%generate_series(1, 50000000)%' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert running == (0,)
    assert rw.status is Status.SUCCESS, rw.error
    assert rw.output["truncated"] is True and rw.output["row_count"] == 6


TYPES_SQL = """
SELECT 1::int2 AS i2, 2::int4 AS i4, 9007199254740993::int8 AS i8,
       1.5::float4 AS f4, 'NaN'::float8 AS nan, '-Infinity'::float8 AS ninf,
       12.50::numeric(6,2) AS num, 'NaN'::numeric AS num_nan, 0.0000001::numeric AS tiny,
       true AS yes, 'txt'::text AS t, 'v'::varchar(3) AS vc, '\\x00ff'::bytea AS raw,
       '2026-12-02 12:00:00.123456+02'::timestamptz AS tstz,
       '2026-12-02 10:00:00'::timestamp AS ts, '2026-12-02'::date AS d,
       '10:11:12.5'::time AS tm, '1 year 2 mons 3 days 04:05:06.5'::interval AS iv,
       'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid AS id,
       '{"a": [1, {"b": null}], "s": "x", "big": 123456789012345678901}'::jsonb AS doc,
       ARRAY[1, 2, NULL]::int4[] AS ints, ARRAY[1.10, 2.5]::numeric[] AS nums,
       ARRAY[['a', 'b'], ['c', 'd']] AS grid, NULL::text AS nothing,
       'infinity'::timestamptz AS forever, '-infinity'::date AS dawn,
       '192.168.0.1/24'::inet AS net, '[1,5)'::int4range AS span, %s::text AS param
"""

TYPES_EXPECTED = {
    "i2": 1,
    "i4": 2,
    "i8": 9007199254740993,
    "f4": 1.5,
    "num": "12.50",
    "num_nan": "NaN",
    "tiny": "0.0000001",
    "yes": True,
    "t": "txt",
    "vc": "v",
    "raw": b"\x00\xff",
    "tstz": "2026-12-02T10:00:00.123456+00:00",
    "ts": "2026-12-02T10:00:00",
    "d": "2026-12-02",
    "tm": "10:11:12.500000",
    "iv": "P1Y2M3DT4H5M6.5S",
    "id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "doc": {"a": [1, {"b": None}], "s": "x", "big": "123456789012345678901"},
    "ints": [1, 2, None],
    "nums": ["1.10", "2.5"],
    "grid": [["a", "b"], ["c", "d"]],
    "nothing": None,
    "forever": "infinity",
    "dawn": "-infinity",
    "net": "192.168.0.1/24",
    "span": "[1,5)",
    "param": "été",
}


async def test_types_arrive_as_the_types_table_says(fabric: Fabric, database: str) -> None:
    async with serving(fabric, settings(database)) as dispatcher:
        result = await query(dispatcher, sql=TYPES_SQL, params=["été"])
    assert result.status is Status.SUCCESS, result.error
    (row,) = result.output["rows"]
    nan, ninf = row.pop("nan"), row.pop("ninf")
    assert nan != nan and ninf == float("-inf")  # NaN and infinities stay floats
    assert row == TYPES_EXPECTED
    types = {column["name"]: column["type"] for column in result.output["columns"]}
    assert types["tstz"] == "timestamptz" and types["num"] == "numeric"
    assert types["id"] == "uuid" and types["doc"] == "jsonb" and types["i8"] == "int8"
    assert types["ints"] == "_int4" and types["raw"] == "bytea" and types["iv"] == "interval"


async def test_bad_input_and_an_unknown_connection_are_invalid_task(
    fabric: Fabric, database: str
) -> None:
    async with serving(fabric, settings(database)) as dispatcher:
        unknown = await query(dispatcher, connection="nope", sql="SELECT 1")
        empty = await query(dispatcher, sql="")
        wrong_params = await query(dispatcher, sql="SELECT %s", params="x")
        missing = await query(dispatcher, sql="SELECT %s, %s", params=[1])
        extra = await query(dispatcher, sql="SELECT 1", nope=True)
        copy = await query(dispatcher, sql="/* hi */ COPY people TO STDOUT")
        duplicates = await query(dispatcher, sql="SELECT 1 AS a, 2 AS a, 'x' AS b")
    failed(unknown, ErrorCode.INVALID_TASK, "unknown_connection", retryable=False)
    assert unknown.error is not None and "'nope'" in unknown.error.message
    assert "main" in unknown.error.message  # it says which exist
    failed(empty, ErrorCode.INVALID_TASK, None, retryable=False)
    assert empty.error is not None and "input.sql" in empty.error.message
    failed(wrong_params, ErrorCode.INVALID_TASK, None, retryable=False)
    assert wrong_params.error is not None and "input.params" in wrong_params.error.message
    failed(missing, ErrorCode.INVALID_TASK, "bad_params", retryable=False)
    failed(extra, ErrorCode.INVALID_TASK, None, retryable=False)
    failed(copy, ErrorCode.INVALID_TASK, "bad_params", retryable=False)
    # repeated column names get a suffix so each row stays a map
    assert duplicates.output["rows"] == [{"a": 1, "a_2": 2, "b": "x"}]


async def test_an_sql_error_names_sqlstate_and_never_the_values(
    fabric: Fabric, database: str
) -> None:
    async with serving(fabric, settings(database)) as dispatcher:
        missing = await query(dispatcher, sql="SELECT * FROM nowhere")
        bad_value = await query(dispatcher, sql="SELECT %s::int", params=["s3cr3t-value"])
    failed(missing, ErrorCode.EXECUTOR_ERROR, "sql_error", retryable=False)
    assert missing.error is not None and missing.error.details["sqlstate"] == "42P01"
    assert 'relation "nowhere" does not exist' in missing.error.message
    failed(bad_value, ErrorCode.EXECUTOR_ERROR, "sql_error", retryable=False)
    assert bad_value.error is not None and bad_value.error.details["sqlstate"] == "22P02"
    assert "s3cr3t-value" not in bad_value.error.message
    assert "invalid input syntax for type integer" in bad_value.error.message


async def running(url: str, marker: str) -> list[int]:
    """The pids of the backends running a statement that holds ``marker``, or fetching
    from the read-only cursor (a read-only statement runs while it is fetched)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE (query LIKE %s OR query LIKE %s)"
            " AND state = 'active' AND datname = current_database()"
            " AND pid <> pg_backend_pid()",
            [f"%{marker}%", '%FETCH % FROM "wayang_db_query"%'],
        )
        return [pid for (pid,) in await cur.fetchall()]


async def test_a_cancelled_task_cancels_its_statement_and_frees_the_connection(
    fabric: Fabric, database: str
) -> None:
    marker = f"cancel_{secrets.token_hex(4)}"
    config = settings(database, max_size=1, statement_timeout_ms=30_000)
    async with serving(fabric, config) as dispatcher:
        # Given a long statement running
        handle = await dispatcher.submit(
            "db.query", {"connection": "main", "sql": f"SELECT pg_sleep(20) /* {marker} */"}
        )
        await eventually(lambda: _has(running(database, marker)), what="the statement runs")
        # When its task is cancelled
        assert await dispatcher.cancel(handle.task_id, "test")
        result = await handle.result(30)
        # Then the task ends cancelled, the server stopped the statement, the one pooled
        # connection serves the next task
        await eventually(
            lambda: _none(running(database, marker)), timeout_s=10, what="the statement stops"
        )
        after = await query(dispatcher, sql="SELECT 1 AS one", timeout_ms=1000)
    failed(result, ErrorCode.CANCELLED, None, retryable=False)
    assert after.status is Status.SUCCESS and after.output["rows"] == [{"one": 1}]


async def _has(pids: Any) -> bool:
    return bool(await pids)


async def _none(pids: Any) -> bool:
    return not await pids


async def test_a_connection_lost_mid_statement_fails_retryable_and_the_pool_recovers(
    fabric: Fabric, database: str
) -> None:
    marker = f"lost_{secrets.token_hex(4)}"
    config = settings(database, max_size=1, statement_timeout_ms=30_000)
    async with serving(fabric, config) as dispatcher:
        handle = await dispatcher.submit(
            "db.query", {"connection": "main", "sql": f"SELECT pg_sleep(20) /* {marker} */"}
        )
        await eventually(lambda: _has(running(database, marker)), what="the statement runs")
        # When the server ends the session under it
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as admin:
            for pid in await running(database, marker):
                await admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        lost = await handle.result(30)
        after = await query(dispatcher, sql="SELECT 1 AS one")
    failed(lost, ErrorCode.EXECUTOR_ERROR, "connection_failed", retryable=True)
    assert after.status is Status.SUCCESS, after.error


async def test_a_database_down_at_start_fails_its_tasks_retryable(
    fabric: Fabric, database: str
) -> None:
    # Given one connection whose server does not listen (a port just freed)
    down = urlunsplit(urlsplit(database)._replace(netloc=f"wayang@127.0.0.1:{_free_port()}"))
    config = DbQuerySettings.model_validate(
        {
            "connect_timeout_ms": 500,
            "connections": {"down": {"dsn": down}, "main": {"dsn": database}},
        }
    )
    # When the worker starts, it serves; the down one's tasks fail retryable
    async with serving(fabric, config) as dispatcher:
        refused = await query(dispatcher, connection="down", sql="SELECT 1")
        fine = await query(dispatcher, sql="SELECT 1 AS one")
    failed(refused, ErrorCode.EXECUTOR_ERROR, "connection_failed", retryable=True)
    assert fine.status is Status.SUCCESS


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_cli_daemon_takes_its_dsn_by_reference_and_never_logs_the_password(
    fabric: Fabric, database: str, tmp_path: Path
) -> None:
    # Given a DSN with a password (the test server trusts loopback, so any password works),
    # known to the worker only through its environment
    password = "pw-" + secrets.token_hex(12)
    parts = urlsplit(database)
    dsn = urlunsplit(parts._replace(netloc=f"wayang:{password}@{parts.hostname}:{parts.port}"))
    path = tmp_path / "worker.toml"
    path.write_text(
        '[db.query.connections.reporting]\ndsn = {"$secret" = "reporting-dsn"}\nrow_limit = 5\n'
    )
    worker = fabric.spawn_worker(
        ["wayang_workers.db_query:DbQuery"],
        executor_id=f"db-cli-{secrets.token_hex(3)}",
        args=["--config", str(path), "--secrets", "env"],
        env={"WAYANG_SECRET_REPORTING_DSN": dsn},
    )
    try:
        await asyncio.to_thread(worker.wait_started)
        async with fabric.dispatcher() as dispatcher:
            ok = await dispatcher.run(
                "db.query",
                {"connection": "reporting", "sql": "SELECT name FROM people"},
                wait_s=30,
            )
            too_many = await dispatcher.run(
                "db.query",
                {"connection": "reporting", "sql": "SELECT 1", "row_limit": 6},
                wait_s=30,
            )
            # a secret a task hands over could be read back by its SQL: refused
            handed = await dispatcher.run(
                "db.query",
                {
                    "connection": "reporting",
                    "sql": "SELECT reverse(%s)",
                    "params": [{"$secret": "reporting-dsn"}],
                },
                wait_s=30,
            )
    finally:
        worker.stop()
    assert ok.status is Status.SUCCESS, ok.error
    failed(handed, ErrorCode.SECRET_UNAVAILABLE, None, retryable=False)
    assert handed.output is None
    assert ok.output["rows"] == [{"name": "bob"}]
    failed(too_many, ErrorCode.INVALID_TASK, "over_limit", retryable=False)
    assert password not in worker.log()


def test_the_example_settings_file_loads() -> None:
    executor = load_executor("wayang_workers.db_query:DbQuery", WorkerFile.read(EXAMPLE))
    assert isinstance(executor, DbQuery)
    reporting = executor.settings.connections["reporting"]
    assert isinstance(reporting.dsn, SecretRef) and reporting.dsn.name == "reporting-dsn"
    assert not reporting.writable and executor.settings.connections["ledger"].writable
