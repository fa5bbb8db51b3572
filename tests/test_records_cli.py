"""Reading the record from the command line (real broker, real PostgreSQL): ``executors``,
``tasks``, ``task ID``, ``status`` and ``audit``, run as a user runs them."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import psycopg
import pytest
from wayang_workers.demo import Echo, Fail

from tests.test_cli import wayang
from wayang_mq import ErrorCode, Status
from wayang_mq.cli.exits import Exit
from wayang_mq.controlplane import queries
from wayang_mq.core.model import ErrorInfo, Result, RetryHints, new_id
from wayang_mq.core.names import RESULTS_EXCHANGE
from wayang_mq.core.wire import encode
from wayang_mq.testing.harness import Fabric, eventually

WORKER_ID = "records-cli"


@pytest.fixture(autouse=True)
async def _left_clean(fabric: Fabric) -> AsyncIterator[None]:
    """Start from an empty record queue; leave no unserved task or dead letter behind."""
    await fabric.purge_record()
    await fabric.purge("demo.echo", "demo.sleep", "demo.fail")
    yield
    await fabric.purge("demo.echo", "demo.sleep", "demo.fail")
    await fabric.purge_reaper()


@pytest.fixture
def env(fabric_env: dict[str, str], record_db: str) -> dict[str, str]:
    return fabric_env | {"WAYANG_DATABASE_URL": record_db}


def _scalar(url: str, sql: str, *params: Any) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]


async def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, off the event loop (the control plane keeps recording)."""
    return await asyncio.to_thread(wayang, *args, env=env)


async def test_tasks_task_executors_status_and_a_clean_audit_tell_what_ran(
    fabric: Fabric, record_db: str, env: dict[str, str]
) -> None:
    # Given a task that succeeds and one that succeeds on its second attempt, recorded
    async with (
        fabric.control_plane(record_db),
        fabric.worker([Echo(), Fail()], executor_id=WORKER_ID),
        fabric.dispatcher() as dispatcher,
    ):
        echo = await dispatcher.submit("demo.echo", {"hello": "record"})
        retried = dispatcher.task(
            "demo.fail",
            {"mode": "retryable", "succeed_on_attempt": 2},
            retry=RetryHints(max_attempts=2, initial_backoff_ms=500),
        )
        handle = await dispatcher.submit_task(retried)
        assert (await echo.result(30)).status is Status.SUCCESS
        assert (await handle.result(30)).status is Status.SUCCESS
        ids = [echo.task_id, retried.task_id]
        await eventually(
            lambda: (
                _scalar(
                    record_db,
                    "SELECT count(*) FROM tasks WHERE task_id = ANY(%s) AND state = 'finished'",
                    ids,
                )
                == 2
            ),
            what="both tasks recorded finished",
        )
        # When the CLI reads the record
        listed = await _cli("tasks", "--json", env=env)
        failed_only = await _cli("tasks", "--status", "FAILED", "--since", "10m", env=env)
        story = await _cli("task", retried.task_id, env=env)
        story_json = await _cli("task", retried.task_id, "--json", env=env)
        registry = await _cli("executors", env=env)
        registry_json = await _cli("executors", "--json", env=env)
        status = await _cli("status", echo.task_id, env=env)
        audit = await _cli("audit", env=env)
    # Then tasks lists both, finished SUCCESS on the worker; none FAILED
    assert listed.returncode == Exit.OK, listed.stderr
    rows = {t["task_id"]: t for t in json.loads(listed.stdout)}
    assert set(ids) <= set(rows)
    assert {rows[i]["status"] for i in ids} == {"SUCCESS"}
    assert rows[retried.task_id]["attempt"] == 2
    assert failed_only.returncode == Exit.OK and "no tasks recorded match" in failed_only.stdout
    # the story tells the first attempt's failure, the retry, and the result that won
    assert story.returncode == Exit.OK, story.stderr
    assert "attempt 2 of 2" in story.stdout
    assert f"FAILED executor_error from {WORKER_ID} (attempt 1): retried" in story.stdout
    assert "attempt 2 scheduled to retry" in story.stdout
    assert f"SUCCESS from {WORKER_ID} (attempt 2): won" in story.stdout
    told = json.loads(story_json.stdout)
    assert [(r["attempt"], r["verdict"]) for r in told["results"]] == [(1, "retried"), (2, "won")]
    assert told["events"][0]["kind"] == "task"
    # executors lists the worker, live, with its capabilities
    assert registry.returncode == Exit.OK, registry.stderr
    line = next(line for line in registry.stdout.splitlines() if line.startswith(WORKER_ID))
    assert "live" in line and "demo.echo" in line
    (worker,) = [e for e in json.loads(registry_json.stdout) if e["executor_id"] == WORKER_ID]
    assert worker["state"] == "live" and set(worker["capabilities"]) >= {"demo.echo", "demo.fail"}
    # status answers from the record
    assert status.returncode == Exit.OK, status.stderr
    assert json.loads(status.stdout) | {"attempt": None} == {
        "task_id": echo.task_id,
        "state": "finished",
        "capability": "demo.echo",
        "attempt": None,
        "executor_id": WORKER_ID,
        "outcome": "SUCCESS",
        "source": "record",
    }
    # and the audit finds nothing wrong
    assert audit.returncode == Exit.OK, audit.stdout + audit.stderr
    assert "clean: 2 tasks" in audit.stdout
    # (read in chunks, each reported: how a long scan shows its progress)
    seen: list[tuple[str, int, int]] = []
    with queries.reading(record_db) as conn:
        found = queries.audit(conn, datetime.now(UTC), progress=lambda *p: seen.append(p), chunk=1)
    assert found == [] and seen == [("tasks", 1, 2), ("tasks", 2, 2)]


async def test_audit_exits_7_naming_a_lost_task_and_a_result_without_a_task(
    fabric: Fabric, record_db: str, env: dict[str, str]
) -> None:
    stray_id = new_id()
    # (a dispatcher without supervision: it answers no deadline itself)
    async with fabric.control_plane(record_db), fabric.dispatcher(supervision=None) as dispatcher:
        # Given a task nobody serves (no demo.sleep worker, no reaper) whose deadline passes
        lost = await dispatcher.submit("demo.sleep", {"seconds": 1}, queue_timeout_s=1)
        await eventually(
            lambda: (
                _scalar(
                    record_db,
                    "SELECT deadline_at < now() FROM tasks WHERE task_id = %s",
                    lost.task_id,
                )
                is True
            ),
            what="the unserved task recorded, its deadline passed",
        )
        # and a signed result for a task id the fabric never saw
        await _publish_result(fabric, dispatcher.reply_to, stray_id)
        await eventually(
            lambda: (
                _scalar(record_db, "SELECT count(*) FROM results WHERE task_id = %s", stray_id) == 1
            ),
            what="the stray result recorded",
        )
        # When the audit runs (no grace) and status is asked
        audit = await _cli("audit", "--grace", "0", env=env)
        audit_json = await _cli("audit", "--grace", "0", "--json", env=env)
        status = await _cli("status", lost.task_id, env=env)
        unknown = await _cli("status", new_id(), "--wait", "0.2", env=env)
        missing = await _cli("task", new_id(), env=env)
    # Then it exits 7 and names both, each with a reason
    assert audit.returncode == Exit.AUDIT_FAILED, audit.stdout + audit.stderr
    lost_line = next(line for line in audit.stdout.splitlines() if lost.task_id in line)
    assert lost_line.startswith("lost") and "deadline passed" in lost_line
    stray_line = next(line for line in audit.stdout.splitlines() if stray_id in line)
    assert stray_line.startswith("stray_result") and "no task with this id" in stray_line
    report = json.loads(audit_json.stdout)
    assert audit_json.returncode == Exit.AUDIT_FAILED and report["clean"] is False
    assert {(f["kind"], f["task_id"]) for f in report["findings"]} == {
        ("lost", lost.task_id),
        ("stray_result", stray_id),
    }
    # status tells queued from unknown
    assert json.loads(status.stdout)["state"] == "queued"
    assert json.loads(unknown.stdout)["state"] == "unknown"
    # and a task the record never saw is one line and exit 2
    assert missing.returncode == Exit.USAGE and "holds nothing about task" in missing.stderr


async def test_audit_names_a_task_two_executors_answered(
    fabric: Fabric, record_db: str, env: dict[str, str]
) -> None:
    async with fabric.control_plane(record_db), fabric.dispatcher(supervision=None) as dispatcher:
        # Given a recorded task whose attempt 1 two executors both answered SUCCESS
        handle = await dispatcher.submit("demo.sleep", {"seconds": 1})
        task = handle.task
        for executor in ("twin-a", "twin-b"):
            result = Result(
                task_id=task.task_id,
                token=task.token,
                node_id=task.node_id,
                capability=task.capability,
                status=Status.SUCCESS,
                executor_id=executor,
            )
            await _publish(fabric, dispatcher.reply_to, result)
        await eventually(
            lambda: (
                _scalar(record_db, "SELECT count(*) FROM results WHERE task_id = %s", task.task_id)
                == 2
            ),
            what="both results recorded",
        )
        # When the audit runs
        audit = await _cli("audit", "--json", env=env)
    # Then it exits 7 naming the task and both executors
    assert audit.returncode == Exit.AUDIT_FAILED, audit.stdout + audit.stderr
    (finding,) = json.loads(audit.stdout)["findings"]
    assert (finding["kind"], finding["task_id"]) == ("ran_twice", task.task_id)
    assert "attempt 1 ended 2 times, on twin-a, twin-b" in finding["reason"]


async def _publish_result(fabric: Fabric, reply_to: str, task_id: str) -> None:
    """A FAILED result for ``task_id`` (with a token of its own)."""
    result = Result(
        task_id=task_id,
        token=new_id(),
        node_id=task_id,
        capability="demo.echo",
        status=Status.FAILED,
        executor_id="nobody",
        error=ErrorInfo(code=ErrorCode.EXECUTOR_ERROR, message="for no task"),
    )
    await _publish(fabric, reply_to, result)


async def _publish(fabric: Fabric, reply_to: str, result: Result) -> None:
    """``result``, signed with a trusted key, to ``wayang.results`` as any client could."""
    task_id = result.task_id
    body = encode(result)
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(RESULTS_EXCHANGE)
        message = aio_pika.Message(
            body,
            headers=dict(fabric.signer.headers(body, Result.wire_type)),
            message_id=task_id,
            content_type="application/msgpack",
            type=Result.wire_type,
        )
        await exchange.publish(message, routing_key=reply_to)
