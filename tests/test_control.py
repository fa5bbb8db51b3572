"""Cancel and status over wayang.control, against worker daemons on a real broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from tests.test_cli import wayang
from wayang_mq import ErrorCode, Status
from wayang_mq.amqp.control import StatusSummary
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.core.model import CancelRequest
from wayang_mq.core.names import CONTROL_EXCHANGE, cancel_key
from wayang_mq.core.signing import Signer
from wayang_mq.core.wire import signed_message
from wayang_mq.testing.harness import Fabric, WorkerProcess, eventually


@pytest.fixture(autouse=True)
def _daemons_stopped(fabric: Fabric) -> Iterator[None]:
    """Every worker daemon a test spawns is stopped, whatever the test's outcome."""
    yield
    fabric.stop_processes()


def _busy_worker(fabric: Fabric, executor_id: str) -> WorkerProcess:
    """One task at a time and one held: a second task stays queued while the first runs."""
    daemon = fabric.spawn_worker(
        ["wayang_workers.demo:Sleep"],
        executor_id=executor_id,
        args=["--concurrency", "1", "--grace", "2"],
    )
    daemon.wait_started()
    return daemon


async def test_cancel_of_a_running_task_ends_it_failed_cancelled(fabric: Fabric) -> None:
    # Given a task running on a worker
    daemon = _busy_worker(fabric, "ctl-running")
    async with fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 60})
        await daemon.until_logged(f"task.started task_id={handle.task_id}")
        # When a caller cancels it
        assert await dispatcher.cancel(handle.task_id, "operator said stop")
        result = await handle.result(10)
    # Then it ends FAILED cancelled, with the caller's reason, long before its 60 s
    assert result.status is Status.FAILED
    assert result.error is not None and result.error.code is ErrorCode.CANCELLED
    assert result.error.message == "operator said stop"


async def test_cancel_of_a_queued_task_discards_it_when_it_arrives(fabric: Fabric) -> None:
    # Given a single-slot worker busy with one task, and a second task queued behind it
    await fabric.purge("demo.sleep")
    daemon = _busy_worker(fabric, "ctl-queued")
    async with fabric.dispatcher() as dispatcher:
        first = await dispatcher.submit("demo.sleep", {"seconds": 60})
        queued = await dispatcher.submit("demo.sleep", {"seconds": 60})
        await daemon.until_logged(f"task.started task_id={first.task_id}")
        # When the queued task is cancelled before any executor received it
        assert await dispatcher.cancel(queued.task_id, "not needed any more")
        await daemon.until_logged(
            f"event=task.cancel_requested task_id={queued.task_id} running=False"
        )
        # and the task ahead of it ends, so that the worker receives it
        assert await dispatcher.cancel(first.task_id)
        result = await queued.result(20)
    # Then it ends cancelled, with the caller's reason, and was never executed
    assert result.error is not None and result.error.code is ErrorCode.CANCELLED
    assert result.error.message == "not needed any more"
    assert f"task.started task_id={queued.task_id}" not in daemon.log()
    assert f"task.discarded task_id={queued.task_id}" in daemon.log()


async def test_status_of_queued_running_and_finished_tasks(fabric: Fabric) -> None:
    # Given a single-slot worker running one task, and a second task queued behind it
    await fabric.purge("demo.sleep")
    daemon = _busy_worker(fabric, "ctl-status")
    async with fabric.dispatcher() as dispatcher:
        running = await dispatcher.submit("demo.sleep", {"seconds": 60})
        queued = await dispatcher.submit("demo.sleep", {"seconds": 0.1})
        await daemon.until_logged(f"task.started task_id={running.task_id}")
        # When the caller asks about each
        during = await _once_progressed(dispatcher, running.task_id)
        waiting = await dispatcher.status(queued.task_id, wait_s=0.5)
        assert await dispatcher.cancel(running.task_id)  # no need to wait out the sleep
        await queued.result(20)
        after = await dispatcher.status(queued.task_id)
    # Then the running one is reported where it runs, with its attempt and progress
    assert (during.state, during.executor_id, during.attempt) == ("running", "ctl-status", 1)
    assert during.progress is not None and 0 < during.progress < 1
    # and the queued one as not running, and once answered as finished with its outcome
    assert waiting.state == "not running"
    assert (after.state, after.outcome) == ("finished", "SUCCESS")


async def _once_progressed(dispatcher: Dispatcher, task_id: str) -> StatusSummary:
    """Ask until the executor reports the task running with some progress made."""
    answers: list[StatusSummary] = []

    async def progressed() -> bool:
        answers.append(await dispatcher.status(task_id, wait_s=0.5))
        return answers[-1].state == "running" and bool(answers[-1].progress)

    await eventually(progressed, what=f"a running status with progress for {task_id}")
    return answers[-1]


async def test_a_cancel_signed_by_an_untrusted_key_is_ignored(fabric: Fabric) -> None:
    # Given a task running on a worker
    daemon = _busy_worker(fabric, "ctl-forged")
    async with fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 60})
        await daemon.until_logged(f"task.started task_id={handle.task_id}")
        # When a cancel signed by a key the worker does not trust arrives
        forged = to_amqp(
            signed_message(
                CancelRequest(task_id=handle.task_id, reason="forged"),
                Signer.generate(),
                message_id=handle.task_id,
            ),
            persistent=False,
        )
        assert dispatcher._publisher is not None
        await dispatcher._publisher.publish(CONTROL_EXCHANGE, cancel_key(handle.task_id), forged)
        # Then the worker refuses it, and the task runs on until a trusted cancel ends it
        await daemon.until_logged("event=security.refused")
        assert await dispatcher.cancel(handle.task_id, "trusted")
        result = await handle.result(10)
    assert result.error is not None and result.error.code is ErrorCode.CANCELLED
    assert result.error.message == "trusted"


async def test_cancel_and_status_from_the_cli(fabric: Fabric) -> None:
    daemon = _busy_worker(fabric, "ctl-cli")
    env = {
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
    }
    async with fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 60})
        await daemon.until_logged(f"task.started task_id={handle.task_id}")
        status = await asyncio.to_thread(wayang, "status", handle.task_id, env=env)
        cancel = await asyncio.to_thread(wayang, "cancel", handle.task_id, env=env)
        result = await handle.result(10)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "running"
    assert cancel.returncode == 0, cancel.stderr
    assert result.error is not None and result.error.code is ErrorCode.CANCELLED
