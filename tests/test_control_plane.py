"""The control plane's record (real broker, real PostgreSQL): every task, result and event
written once, from any client; the first terminal result wins."""

from __future__ import annotations

from typing import Any

import psycopg
from wayang_workers.demo import Echo, Fail

from wayang_mq import Status
from wayang_mq.controlplane.migrate import migrate
from wayang_mq.core.model import RetryHints
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
