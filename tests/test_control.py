"""Cancel and status over wayang.control, against worker daemons on a real broker."""

from __future__ import annotations

import asyncio
import json
import time

from tests.test_cli import wayang
from wayang_mq import ErrorCode, Status
from wayang_mq.harness import Fabric, WorkerProcess
from wayang_mq.model import CancelRequest
from wayang_mq.names import CONTROL_EXCHANGE, cancel_key
from wayang_mq.publisher import to_amqp
from wayang_mq.signing import Signer
from wayang_mq.wire import signed_message


async def _until_logged(daemon: WorkerProcess, text: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{daemon.executor_id} never logged {text!r}"
        await asyncio.sleep(0.05)


def _busy_worker(fabric: Fabric, executor_id: str) -> WorkerProcess:
    """One task at a time and one held: a second task stays queued while the first runs."""
    daemon = fabric.spawn_worker(
        ["workers.demo:Sleep"], executor_id=executor_id, args=["--concurrency", "1"]
    )
    daemon.wait_started()
    return daemon


async def test_cancel_of_a_running_task_ends_it_failed_cancelled(fabric: Fabric) -> None:
    daemon = _busy_worker(fabric, "ctl-running")
    async with fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 60})
        await _until_logged(daemon, f"task.started task_id={handle.task_id}")
        assert await dispatcher.cancel(handle.task_id, "operator said stop")
        result = await handle.result(10)
    daemon.stop()
    assert result.status is Status.FAILED
    assert result.error is not None and result.error.code is ErrorCode.CANCELLED
    assert result.error.message == "operator said stop"


async def test_cancel_of_a_queued_task_discards_it_when_it_arrives(fabric: Fabric) -> None:
    await fabric.purge("demo.sleep")
    daemon = _busy_worker(fabric, "ctl-queued")
    async with fabric.dispatcher() as dispatcher:
        first = await dispatcher.submit("demo.sleep", {"seconds": 1.5})
        queued = await dispatcher.submit("demo.sleep", {"seconds": 60})
        await _until_logged(daemon, f"task.started task_id={first.task_id}")
        # When the queued task is cancelled before any executor received it
        assert await dispatcher.cancel(queued.task_id)
        result = await queued.result(20)
        assert (await first.result(10)).status is Status.SUCCESS
    daemon.stop()
    # Then it ends cancelled and was never executed
    assert result.error is not None and result.error.code is ErrorCode.CANCELLED
    assert f"task.started task_id={queued.task_id}" not in daemon.log()
    assert f"task.discarded task_id={queued.task_id}" in daemon.log()


async def test_status_of_queued_running_and_finished_tasks(fabric: Fabric) -> None:
    await fabric.purge("demo.sleep")
    daemon = _busy_worker(fabric, "ctl-status")
    async with fabric.dispatcher() as dispatcher:
        running = await dispatcher.submit("demo.sleep", {"seconds": 6})
        queued = await dispatcher.submit("demo.sleep", {"seconds": 0.1})
        await _until_logged(daemon, f"task.started task_id={running.task_id}")
        await asyncio.sleep(1.2)  # one progress report in
        during = await dispatcher.status(running.task_id, wait_s=0.5)
        waiting = await dispatcher.status(queued.task_id, wait_s=0.5)
        await dispatcher.cancel(running.task_id)  # no need to wait out the sleep
        await queued.result(20)
        after = await dispatcher.status(queued.task_id)
    daemon.stop()
    assert (during.state, during.executor_id, during.attempt) == ("running", "ctl-status", 1)
    assert during.progress is not None and 0 < during.progress < 1
    assert waiting.state == "not running"
    assert (after.state, after.outcome) == ("finished", "SUCCESS")


async def test_a_cancel_signed_by_an_untrusted_key_is_ignored(fabric: Fabric) -> None:
    daemon = _busy_worker(fabric, "ctl-forged")
    async with fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 1.5})
        await _until_logged(daemon, f"task.started task_id={handle.task_id}")
        forged = to_amqp(
            signed_message(
                CancelRequest(task_id=handle.task_id), Signer.generate(), message_id=handle.task_id
            ),
            persistent=False,
        )
        assert dispatcher._publisher is not None
        await dispatcher._publisher.publish(CONTROL_EXCHANGE, cancel_key(handle.task_id), forged)
        result = await handle.result(10)
    daemon.stop()
    assert result.status is Status.SUCCESS
    assert "event=control.refused" in daemon.log()


async def test_cancel_and_status_from_the_cli(fabric: Fabric) -> None:
    daemon = _busy_worker(fabric, "ctl-cli")
    env = {
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
    }
    async with fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("demo.sleep", {"seconds": 60})
        await _until_logged(daemon, f"task.started task_id={handle.task_id}")
        status = await asyncio.to_thread(wayang, "status", handle.task_id, env=env)
        cancel = await asyncio.to_thread(wayang, "cancel", handle.task_id, env=env)
        result = await handle.result(10)
    daemon.stop()
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "running"
    assert cancel.returncode == 0, cancel.stderr
    assert result.error is not None and result.error.code is ErrorCode.CANCELLED
