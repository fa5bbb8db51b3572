"""The control plane's liveness watch (real broker, real PostgreSQL, real worker daemons): an
executor killed with ``kill -9`` is marked lost, and its task is re-dispatched as the next
attempt with a new token, whether or not its dispatcher is still there."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from wayang_mq import Status
from wayang_mq.client.supervisor import SupervisionConfig as DispatcherSupervision
from wayang_mq.controlplane.supervision import SupervisionConfig
from wayang_mq.core.model import RetryHints
from wayang_mq.testing.harness import Fabric, WorkerProcess, eventually

FAST = SupervisionConfig(check_interval_s=0.5, lost_after_s=3.0, publish_interval_s=0.3)
#: the dispatcher leaves silent executors to the control plane
NO_REASSIGN = DispatcherSupervision(reassign_silent=False)


@pytest.fixture(autouse=True)
def _daemons_stopped(fabric: Fabric) -> Iterator[None]:
    yield
    fabric.stop_processes()


def _rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, params).fetchall())


def _attempts(url: str, task_id: str) -> list[tuple[Any, ...]]:
    return _rows(
        url,
        "SELECT attempt, state, executor_id, token, decided_by FROM attempts"
        " WHERE task_id = %s ORDER BY attempt",
        task_id,
    )


def _task_state(url: str, task_id: str) -> tuple[Any, ...] | None:
    rows = _rows(url, "SELECT state, executor_id FROM tasks WHERE task_id = %s", task_id)
    return rows[0] if rows else None


async def _started(fabric: Fabric, executor: str, executor_id: str) -> WorkerProcess:
    daemon = fabric.spawn_worker([f"wayang_workers.demo:{executor}"], executor_id=executor_id)
    await daemon.until_logged("event=worker.started")
    return daemon


async def _killed_and_lost(daemon: WorkerProcess, url: str) -> None:
    """``kill -9`` the daemon; until the control plane has marked it lost."""
    daemon.signal(signal.SIGKILL)
    daemon.wait()

    def lost() -> bool:
        rows = _rows(url, "SELECT state FROM executors WHERE executor_id = %s", daemon.executor_id)
        return rows == [("lost",)]

    await eventually(lost, what=f"{daemon.executor_id} marked lost")


async def test_a_killed_executors_task_is_redispatched_with_its_dispatcher_gone(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    await fabric.purge("demo.sleep")
    async with fabric.control_plane(record_db, supervision=FAST) as cp:
        # Given a long-running task (acked at start: the broker will not give it back)
        # accepted by an executor the record knows, and its dispatcher gone
        doomed = await _started(fabric, "LongSleep", "cp-doomed")
        async with fabric.dispatcher(supervision=NO_REASSIGN) as dispatcher:
            task = dispatcher.task("demo.sleep", {"seconds": 3}, retry=RetryHints(max_attempts=2))
            handle = await dispatcher.submit_task(task)
            assert (await handle.accepted(15)).executor_id == "cp-doomed"
        await eventually(
            lambda: _task_state(record_db, task.task_id) == ("pending", "cp-doomed"),
            what="the task recorded pending on cp-doomed",
        )
        # When its executor is killed (kill -9): its heartbeats stop
        await _killed_and_lost(doomed, record_db)
        # Then the control plane re-dispatches it as attempt 2 with a new token
        await eventually(
            lambda: (
                [a[:2] for a in _attempts(record_db, task.task_id)] == [(1, "lost"), (2, "queued")]
            ),
            what="attempt 1 lost, attempt 2 queued",
        )
        second = _attempts(record_db, task.task_id)[1]
        new_token = second[3]
        assert new_token != task.token and second[4] == cp.config.control_plane_id
        # and a second executor runs attempt 2 and finishes it with the new token
        await _started(fabric, "LongSleep", "cp-survivor")
        await eventually(
            lambda: _task_state(record_db, task.task_id) == ("finished", "cp-survivor"),
            what="the task finished by cp-survivor",
        )
    attempts = _attempts(record_db, task.task_id)
    assert [(a[0], a[1], a[2]) for a in attempts] == [
        (1, "lost", "cp-doomed"),
        (2, "finished", "cp-survivor"),
    ]
    assert attempts[1][3] == new_token
    won = _rows(
        record_db,
        "SELECT attempt, token, executor_id, status FROM results"
        " WHERE task_id = %s AND verdict = 'won'",
        task.task_id,
    )
    assert won == [(2, new_token, "cp-survivor", "SUCCESS")]
    # the notice on wayang.results is in the timeline, not a refused result
    kinds = _rows(record_db, "SELECT kind FROM facts WHERE task_id = %s", task.task_id)
    assert ("redispatch",) in kinds
    assert _rows(record_db, "SELECT reason FROM refusals") == []


async def test_a_dispatcher_still_there_takes_attempt_2s_result(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    await fabric.purge("demo.sleep")
    async with (
        fabric.control_plane(record_db, supervision=FAST),
        fabric.dispatcher(supervision=NO_REASSIGN) as dispatcher,
    ):
        # Given a task asking for heartbeat supervision, running on an executor
        doomed = await _started(fabric, "Sleep", "cp-hb-doomed")
        task = dispatcher.task(
            "demo.sleep",
            {"seconds": 2},
            heartbeat_timeout_s=2,
            retry=RetryHints(max_attempts=2),
        )
        handle = await dispatcher.submit_task(task)
        await doomed.until_logged(f"task.started task_id={task.task_id}")
        await eventually(
            lambda: _task_state(record_db, task.task_id) == ("running", "cp-hb-doomed"),
            what="the task recorded running on cp-hb-doomed",
        )
        # When its executor is killed and the control plane re-dispatches it
        await _killed_and_lost(doomed, record_db)
        await eventually(
            lambda: len(_attempts(record_db, task.task_id)) == 2, what="attempt 2 recorded"
        )
        new_token = _attempts(record_db, task.task_id)[1][3]
        survivor = await _started(fabric, "Sleep", "cp-hb-survivor")
        # Then the dispatcher hands out attempt 2's result: its notice made the new token
        # current (attempt 1's copy the broker gave back, if it runs, is the one fenced)
        result = await handle.result(30)
    assert (result.status, result.attempt, result.token, result.executor_id) == (
        Status.SUCCESS,
        2,
        new_token,
        survivor.executor_id,
    )
    assert dispatcher.pending_tasks() == []


async def test_a_lost_executors_task_with_no_attempt_left_is_answered_failed(
    fabric: Fabric, record_db: str
) -> None:
    await fabric.purge_record()
    await fabric.purge("demo.sleep")
    async with fabric.control_plane(record_db, supervision=FAST) as cp:
        # Given a long-running task with one attempt only, accepted by an executor
        doomed = await _started(fabric, "LongSleep", "cp-last")
        async with fabric.dispatcher(supervision=NO_REASSIGN) as dispatcher:
            task = dispatcher.task("demo.sleep", {"seconds": 30})
            handle = await dispatcher.submit_task(task)
            assert (await handle.accepted(15)).executor_id == "cp-last"
            await eventually(
                lambda: _task_state(record_db, task.task_id) == ("pending", "cp-last"),
                what="the task recorded pending on cp-last",
            )
            # When its executor is killed: it may not run again (max_attempts 1)
            await _killed_and_lost(doomed, record_db)
            # Then the control plane answers it FAILED, and the dispatcher hands that out
            result = await handle.result(30)
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code.value == "executor_error" and "cp-last" in result.error.message
    assert result.executor_id == f"control-plane:{cp.config.control_plane_id}"
    await eventually(
        lambda: (
            _rows(record_db, "SELECT state, status FROM tasks WHERE task_id = %s", task.task_id)
            == [("finished", "FAILED")]
        ),
        what="the record has it finished FAILED",
    )
