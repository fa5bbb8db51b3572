"""The record under faults (real broker, real PostgreSQL): thousands of tasks from two kinds
of client while a worker and the active control plane are killed, and PostgreSQL stopped for
20 s mid-run. Every task keeps one row and one terminal result; nothing is written twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pika.exceptions
import psycopg
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from wayang_workers.demo import Echo

from wayang_mq import Status
from wayang_mq.controlplane.migrate import migrate
from wayang_mq.dev.nodes import PostgresNode
from wayang_mq.testing.harness import Fabric, WorkerProcess, eventually
from wayang_mq.testing.plugin import fresh_database, service_dir

from .test_cli import wayang
from .test_interop import ForeignPublisher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PYTHON_TASKS = 5_000
PIKA_TASKS = 500
OUTAGE_S = 20  # how long PostgreSQL stays down: the outage itself, not a wait


def _one(url: str, sql: str, *params: Any) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]


def _spawn_control_plane(
    fabric: Fabric, key_dir: Path, database_url: str, name: str
) -> WorkerProcess:
    """``wayang-mq control-plane`` as its own OS process, exactly as a user runs it."""
    log_path = fabric.workdir / f"{name}.log"
    env = {
        **os.environ,
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_MANAGEMENT_URL": fabric.endpoint.management_url,
        "WAYANG_KEY_DIR": str(key_dir),
        "WAYANG_DATABASE_URL": database_url,
    }
    command = [sys.executable, "-m", "wayang_mq.cli", "--log-format", "text"]
    command += ["control-plane", "--id", name]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    spawned = WorkerProcess(name, process, log_path, started_event="control_plane.started")
    fabric.processes.append(spawned)
    return spawned


def _key_dir_with(fabric: Fabric, foreign: ForeignPublisher, into: Path) -> Path:
    """The fabric's keys plus the foreign publisher's, scoped as a dispatcher of demo.*."""
    shutil.copytree(fabric.key_dir, into)
    (into / f"{foreign.key_id}.toml").write_text(foreign.scope("demo.*").to_toml())
    pem = foreign.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (into / f"{foreign.key_id}.pub").write_bytes(pem)
    return into


async def test_5500_tasks_from_two_clients_through_worker_and_control_plane_kills(
    fabric: Fabric, record_db: str, tmp_path: Path
) -> None:
    await fabric.purge_record()
    await fabric.purge("demo.echo")
    foreign = await asyncio.to_thread(ForeignPublisher, fabric.endpoint.amqp_url)
    key_dir = _key_dir_with(fabric, foreign, tmp_path / "keys")
    env = {"WAYANG_KEY_DIR": str(key_dir)}
    # Two control planes: one active on wayang.record, one standing by; two workers.
    planes = [_spawn_control_plane(fabric, key_dir, record_db, f"cp-{n}") for n in "ab"]
    workers = [
        fabric.spawn_worker(["wayang_workers.demo:Echo"], executor_id=f"rf-{n}", env=env)
        for n in range(2)
    ]
    try:
        for daemon in planes + workers:
            await asyncio.to_thread(daemon.wait_started)
        ids = await _publish_from_two_clients(fabric, foreign, planes[0], workers[0])
        await _every_task_recorded_once(record_db, ids)
        # and `wayang-mq audit` finds nothing lost, nothing run twice, no stray result
        audit = await asyncio.to_thread(
            wayang, "audit", "--json", env={**env, "WAYANG_DATABASE_URL": record_db}
        )
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert "event=database.connected" in planes[1].log()  # the standby took over
    finally:
        # The standby is wayang.record's active consumer now: no later test may stand behind it.
        for daemon in planes + workers:
            await asyncio.to_thread(daemon.stop)
        # Last, and never raising: pika's blocking connection sends no heartbeats while the test
        # waits, so the broker may have closed it already (StreamLostError), and that must not
        # leave the daemons above running into the next tests.
        with contextlib.suppress(pika.exceptions.AMQPError):
            await asyncio.to_thread(foreign.connection.close)


async def _publish_from_two_clients(
    fabric: Fabric, foreign: ForeignPublisher, plane: WorkerProcess, worker: WorkerProcess
) -> list[str]:
    """5,000 tasks from our dispatcher (a worker killed after 1,500, the active control plane
    after 2,500) and 500 from a pika publisher whose results nobody reads; their ids."""
    async with fabric.reaper(), fabric.dispatcher() as dispatcher:
        handles = []
        for start in range(0, PYTHON_TASKS, 500):
            handles += await asyncio.gather(
                *(dispatcher.submit("demo.echo", {"n": n}) for n in range(start, start + 500))
            )
            if start == 1_500:
                worker.process.kill()  # kill -9 a worker mid-run
            if start == 2_500:
                plane.process.kill()  # kill -9 the active control plane mid-run
        pika_ids = [
            await asyncio.to_thread(
                foreign.publish_task, "demo.echo", {"pika": n}, "reply.nobody-listens"
            )
            for n in range(PIKA_TASKS)
        ]
        results = await asyncio.gather(*(h.result(120) for h in handles))
        assert all(r.status is Status.SUCCESS for r in results)
    return [h.task_id for h in handles] + pika_ids


async def _every_task_recorded_once(record_db: str, ids: list[str]) -> None:
    """Every task of both clients has its row, finished, with exactly one winning result, and
    no fact was written twice though a control plane died with deliveries unacked."""

    def finished() -> int:
        sql = "SELECT count(*) FROM tasks WHERE task_id = ANY(%s) AND state = 'finished'"
        return int(_one(record_db, sql, ids))

    try:
        await eventually(lambda: finished() == len(ids), timeout_s=180, what="every task recorded")
    except AssertionError:
        states = _one(
            record_db,
            "SELECT json_object_agg(state, n) FROM (SELECT state, count(*) n FROM tasks"
            " WHERE task_id = ANY(%s) GROUP BY state) s",
            ids,
        )
        raise AssertionError(f"{finished()} of {len(ids)} finished; states {states}") from None
    rows = "SELECT count(DISTINCT task_id) FROM tasks WHERE task_id = ANY(%s)"
    assert _one(record_db, rows, ids) == len(ids)
    won = "SELECT count(*) FROM results WHERE task_id = ANY(%s) AND verdict = 'won'"
    assert _one(record_db, won, ids) == len(ids)
    assert _one(record_db, "SELECT count(*) - count(DISTINCT digest) FROM facts") == 0
    assert _one(record_db, "SELECT count(*) FROM refusals") == 0


async def test_postgres_stopped_for_20_s_mid_run_loses_and_duplicates_no_row(
    fabric: Fabric,
) -> None:
    await fabric.purge_record()
    with service_dir("wayang-pg-outage-") as state_dir:
        await _through_an_outage(fabric, PostgresNode(state_dir))


async def _through_an_outage(fabric: Fabric, node: PostgresNode) -> None:
    node.start()
    try:
        with fresh_database(node.url) as url:
            migrate(url)
            async with (
                fabric.control_plane(url, retry_max_s=1.0) as cp,
                fabric.worker([Echo()]),
                fabric.dispatcher() as dispatcher,
            ):
                first = [await dispatcher.submit("demo.echo", {"n": n}) for n in range(200)]
                await asyncio.gather(*(h.result(30) for h in first))
                await eventually(lambda: cp.counts.written >= 400, what="the first tasks written")
                await asyncio.to_thread(node.stop)
                # While PostgreSQL is down the fabric keeps executing
                during = [await dispatcher.submit("demo.echo", {"n": n}) for n in range(300)]
                results = await asyncio.gather(*(h.result(30) for h in during))
                assert all(r.status is Status.SUCCESS for r in results)
                await asyncio.sleep(OUTAGE_S)
                assert cp.database.retries > 0
                await asyncio.to_thread(node.start)
                ids = [h.task_id for h in first + during]

                def finished() -> int:
                    return int(
                        _one(
                            url,
                            "SELECT count(*) FROM tasks WHERE task_id = ANY(%s)"
                            " AND state = 'finished'",
                            ids,
                        )
                    )

                await eventually(lambda: finished() == 500, timeout_s=60, what="all 500 recorded")
            won = _one(
                url, "SELECT count(*) FROM results WHERE task_id = ANY(%s) AND verdict = 'won'", ids
            )
            assert won == 500
            assert _one(url, "SELECT count(*) - count(DISTINCT digest) FROM facts") == 0
    finally:
        node.stop()
