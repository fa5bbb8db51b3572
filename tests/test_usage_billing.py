"""Usage for billing (real broker, real PostgreSQL): results carry CPU time, bytes and the
executor's units; the control plane bills each attempt once, and ``wayang-mq usage`` sums
them per capability, executor, workflow node and issuer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import psycopg
import pytest
from wayang_workers.demo import Fail

from tests.test_cli import wayang
from tests.test_records_cli import _publish
from wayang_mq import Executor, Result, RetryHints, Status, Task, current
from wayang_mq.cli.exits import Exit
from wayang_mq.controlplane import store
from wayang_mq.controlplane.facts import Delivery, read
from wayang_mq.core.envelope import TaskChecks
from wayang_mq.core.model import JsonLike
from wayang_mq.core.names import RESULTS_EXCHANGE, TASKS_EXCHANGE
from wayang_mq.core.wire import decode, encode, task_message
from wayang_mq.testing.harness import Fabric, eventually

WORKER_ID = "usage-worker"


class Burn(Executor):
    """``demo.echo`` here: burns ``burn_ms`` of CPU in 10 ms steps (yielding between them, as
    a worker's tasks share the loop), reports ``tokens`` and one API call, echoes ``pad``."""

    serves = ("demo.echo",)

    async def execute(self, task: Task) -> JsonLike:
        ctx = current()
        end = time.thread_time() + float(task.input.get("burn_ms", 0)) / 1000  # type: ignore[arg-type]
        while time.thread_time() < end:
            step = time.thread_time() + 0.01
            while time.thread_time() < min(step, end):
                pass
            await asyncio.sleep(0)
        ctx.report_usage(tokens=int(task.input.get("tokens", 0)), api_calls=1)  # type: ignore[arg-type]
        ctx.report_usage(tokens=1)  # units add up across calls
        return {"pad": task.input.get("pad", "")}


class Nap(Executor):
    """``demo.sleep`` here: sleeps ``sleep_s`` (no CPU), reports ``tokens``."""

    serves = ("demo.sleep",)

    async def execute(self, task: Task) -> JsonLike:
        await asyncio.sleep(float(task.input.get("sleep_s", 0)))  # type: ignore[arg-type]
        current().report_usage(tokens=int(task.input.get("tokens", 0)))  # type: ignore[arg-type]
        return {"slept": True}


@pytest.fixture(autouse=True)
async def _left_clean(fabric: Fabric) -> AsyncIterator[None]:
    await fabric.purge_record()
    await fabric.purge("demo.echo", "demo.sleep", "demo.fail")
    yield
    await fabric.purge("demo.echo", "demo.sleep", "demo.fail")


def _rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, params).fetchall())


def _packed(value: Any) -> int:
    return len(msgpack.packb(value, use_bin_type=True))


async def test_a_result_carries_its_own_cpu_time_bytes_and_units(fabric: Fabric) -> None:
    # Given a worker running a CPU-busy task and a sleeping one at the same time
    async with (
        fabric.worker([Burn(), Nap()], executor_id=WORKER_ID, concurrency=4),
        fabric.dispatcher() as dispatcher,
    ):
        nap = dispatcher.task("demo.sleep", {"sleep_s": 0.8, "tokens": 7})
        burn = dispatcher.task("demo.echo", {"burn_ms": 300, "tokens": 120, "pad": "x" * 1000})
        # When both run (the nap is running while the burner burns)
        nap_handle = await dispatcher.submit_task(nap)
        burn_handle = await dispatcher.submit_task(burn)
        napped, burnt = await nap_handle.result(30), await burn_handle.result(30)
    # Then the burner's result says the CPU it burnt, the sleeper's next to none
    assert napped.status is burnt.status is Status.SUCCESS
    assert 290 <= burnt.metrics["cpu_ms"] <= 450, burnt.metrics
    assert napped.metrics["cpu_ms"] < 30, napped.metrics
    nap_started = napped.finished_at_ms - napped.metrics["duration_ms"]
    assert nap_started < burnt.finished_at_ms < napped.finished_at_ms  # they overlapped
    # and bytes in are the task's message body, bytes out the packed output
    assert burnt.metrics["bytes_in"] == len(encode(burn))
    assert burnt.metrics["bytes_out"] == _packed({"pad": "x" * 1000})
    assert napped.metrics["bytes_in"] == len(encode(nap))
    assert napped.metrics["bytes_out"] == _packed({"slept": True})
    # and the units the executors reported, summed across calls
    assert burnt.metrics["units.tokens"] == 121 and burnt.metrics["units.api_calls"] == 1
    assert napped.metrics["units.tokens"] == 7 and "units.api_calls" not in napped.metrics


async def _usage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(wayang, "usage", "--since", "10m", *args, env=env)


async def test_usage_by_capability_executor_node_and_issuer_sums_what_the_tasks_did(
    fabric: Fabric, record_db: str, fabric_env: dict[str, str]
) -> None:
    env = fabric_env | {"WAYANG_DATABASE_URL": record_db}
    # Given burns and naps from two issuers on two workflow nodes, and a task that succeeds
    # on its second attempt, recorded by a control plane
    async with (
        fabric.control_plane(record_db),
        fabric.worker([Burn(), Nap(), Fail()], executor_id=WORKER_ID, concurrency=4),
        fabric.dispatcher(dispatcher_id="usage-alice") as alice,
        fabric.dispatcher(dispatcher_id="usage-bob") as bob,
    ):
        tasks = [
            alice.task("demo.echo", {"burn_ms": 20, "tokens": 10, "pad": "a"}, node_id="n-plan"),
            alice.task("demo.echo", {"burn_ms": 5, "tokens": 3, "pad": "bb"}, node_id="n-plan"),
            bob.task("demo.sleep", {"sleep_s": 0.05, "tokens": 4}, node_id="n-plan"),
            bob.task("demo.sleep", {"sleep_s": 0.01, "tokens": 9}, node_id="n-act"),
            bob.task(
                "demo.fail",
                {"mode": "retryable", "succeed_on_attempt": 2},
                retry=RetryHints(max_attempts=2, initial_backoff_ms=500),
                node_id="n-act",
            ),
        ]
        handles = [await (alice if t.issuer == alice.issuer else bob).submit_task(t) for t in tasks]
        won = [await h.result(30) for h in handles]
        assert all(r.status is Status.SUCCESS for r in won)
        ids = [t.task_id for t in tasks]
        await eventually(
            lambda: (
                _rows(record_db, "SELECT count(*) FROM usage WHERE task_id = ANY(%s)", ids)
                == [(6,)]
            ),
            what="six attempts billed",
        )
        # and a duplicate result of the first task, from another executor, with more units
        duplicate = won[0].model_copy(
            update={
                "executor_id": "usage-other",
                "finished_at_ms": won[0].finished_at_ms + 1,
                "metrics": {**won[0].metrics, "units.tokens": 1000.0},
            }
        )
        await _publish(fabric, alice.reply_to, duplicate)
        await eventually(
            lambda: (
                _rows(
                    record_db,
                    "SELECT count(*) FROM results WHERE task_id = %s AND verdict = 'duplicate'",
                    ids[0],
                )
                == [(1,)]
            ),
            what="the duplicate result recorded",
        )
        # When usage is asked for, grouped every way
        runs = {by: await _usage(env, "--by", by, "--json") for by in GROUPINGS}
        total = await _usage(env, "--json")
        text = await _usage(env, "--by", "capability")

    # Then every billed attempt is a won result or the retried attempt's FAILED one
    (retried_body,) = _rows(
        record_db, "SELECT body FROM results WHERE task_id = %s AND verdict = 'retried'", ids[4]
    )[0]
    retried = decode(bytes(retried_body), Result)
    billed = [*won, retried]
    issuer = {t.task_id: t.issuer for t in tasks}
    for by, run in runs.items():
        assert run.returncode == Exit.OK, run.stderr
        report = json.loads(run.stdout)
        assert report["by"] == by
        got = {g["group"]: g for g in report["groups"]}
        want = _expected(billed, lambda r, by=by: GROUPINGS[by](r, issuer))
        assert set(got) == set(want), by
        for group, sums in want.items():
            _assert_sums(got[group], sums)
        _assert_sums(report["total"], _expected(billed, lambda r: "")[""])
    # and the duplicate's 1000 tokens are nowhere: the first task is billed once
    assert json.loads(total.stdout)["total"]["units"]["tokens"] == 10 + 1 + 3 + 1 + 4 + 9
    assert json.loads(total.stdout)["total"]["attempts"] == 6
    # and the table shows one row per capability and the total
    assert text.returncode == Exit.OK, text.stderr
    lines = text.stdout.splitlines()
    assert lines[1].split()[:3] == ["CAPABILITY", "TASKS", "ATTEMPTS"]
    assert lines[1].split()[-2:] == ["API_CALLS", "TOKENS"]
    fail_row = next(line for line in lines if line.startswith("demo.fail"))
    assert fail_row.split()[1:3] == ["1", "2"]  # one task, two billed attempts
    assert lines[-1].startswith("TOTAL") and lines[-1].split()[1:3] == ["5", "6"]


GROUPINGS = {
    "capability": lambda r, issuer: r.capability,
    "executor": lambda r, issuer: r.executor_id,
    "node": lambda r, issuer: r.node_id,
    "issuer": lambda r, issuer: issuer[r.task_id],
}


def _expected(results: list[Result], key: Any) -> dict[str, dict[str, Any]]:
    """What the usage command must say, per group, from the results billed."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        g = out.setdefault(
            key(r),
            {"tasks": set(), "attempts": 0, "wall_ms": 0.0, "cpu_ms": 0.0, "bytes_in": 0,
             "bytes_out": 0, "units": Counter()},
        )  # fmt: skip
        g["tasks"].add(r.task_id)
        g["attempts"] += 1
        g["wall_ms"] += r.metrics["duration_ms"]
        g["cpu_ms"] += r.metrics["cpu_ms"]
        g["bytes_in"] += int(r.metrics["bytes_in"])
        g["bytes_out"] += int(r.metrics["bytes_out"])
        for name, value in r.metrics.items():
            if name.startswith("units."):
                g["units"][name.removeprefix("units.")] += value
    return out


def _assert_sums(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["tasks"] == len(want["tasks"])
    assert got["attempts"] == want["attempts"]
    assert (got["bytes_in"], got["bytes_out"]) == (want["bytes_in"], want["bytes_out"])
    assert got["units"] == dict(want["units"])
    assert got["wall_ms"] == pytest.approx(want["wall_ms"])
    assert got["cpu_ms"] == pytest.approx(want["cpu_ms"])


async def test_a_result_recorded_before_its_task_is_billed_to_the_tasks_issuer(
    fabric: Fabric, record_db: str
) -> None:
    # Given a task's result read by the record before the task itself (the record queue is
    # not ordered across publishers)
    task = Task.create("demo.echo", {"n": 1}, issuer="usage-carol", reply_to="reply.usage-carol")
    result = Result.answering(
        task,
        WORKER_ID,
        Status.SUCCESS,
        output={"n": 1},
        metrics={"duration_ms": 2.5, "cpu_ms": 1.25, "bytes_in": 90.0, "units.tokens": 3.0},
    )
    task_body = task_message(task, fabric.signer)
    result_body = encode(result)
    deliveries = [
        Delivery(
            exchange=RESULTS_EXCHANGE,
            routing_key=task.reply_to,
            body=result_body,
            headers=dict(fabric.signer.headers(result_body, Result.wire_type)),
            message_id=task.task_id,
            type=Result.wire_type,
        ),
        Delivery(
            exchange=TASKS_EXCHANGE,
            routing_key="demo.echo",
            body=task_body.body,
            headers=task_body.headers,
            message_id=task.task_id,
        ),
    ]
    async with await psycopg.AsyncConnection.connect(record_db, autocommit=True) as conn:
        # When the result is written, then the task
        for delivery in deliveries:
            assert await store.write(conn, read(delivery, fabric.keyring, TaskChecks())) is True
    # Then the attempt is billed once, with its metrics, to the task's issuer and node
    rows = _rows(
        record_db,
        "SELECT attempt, executor_id, issuer, node_id, wall_ms, cpu_ms, bytes_in, bytes_out,"
        " units FROM usage WHERE task_id = %s",
        task.task_id,
    )
    assert rows == [(1, WORKER_ID, "usage-carol", task.node_id, 2.5, 1.25, 90, None, {"tokens": 3})]


def test_usage_refuses_an_unknown_grouping_a_bad_time_and_an_empty_window() -> None:
    # Given no database at all: these are refused before one is needed
    for args, needle in (
        (("--since", "10m", "--by", "host"), "--by 'host' is not a grouping"),
        (("--since", "yesterday"), "--since 'yesterday' is neither a time nor a duration"),
        (("--since", "10m", "--until", "soon"), "--until 'soon' is neither"),
        (("--since", "1h", "--until", "2h"), "is not after --since"),
    ):
        run = wayang("usage", *args)
        assert run.returncode == Exit.USAGE, run.stderr
        assert needle in run.stderr and run.stderr.count("\n") == 1, run.stderr
