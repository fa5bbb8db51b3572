"""Compensation: a task that fails for good dispatches the compensation it names."""

from __future__ import annotations

from wayang_mq import ErrorCode, Status
from wayang_mq.harness import Fabric
from wayang_mq.model import Compensation, RetryHints
from workers.demo import Echo, Fail

UNDO = Compensation(capability="demo.echo", input={"undo": "charge-42"})


async def test_a_failed_task_dispatches_its_compensation_and_links_it(fabric: Fabric) -> None:
    async with fabric.worker([Fail(), Echo()]), fabric.dispatcher() as dispatcher:
        failed = await dispatcher.run(
            "demo.fail", {"mode": "permanent"}, compensation=UNDO, wait_s=10
        )
        assert failed.compensation_task_id == f"{failed.task_id}.compensation"
        compensated = await dispatcher.result_of(failed.compensation_task_id, timeout_s=10)
    assert failed.status is Status.FAILED
    assert compensated.status is Status.SUCCESS
    assert compensated.node_id == f"{failed.node_id}:compensate"
    assert compensated.output["undo"] == "charge-42"
    assert compensated.output["compensates"]["task_id"] == failed.task_id
    assert compensated.output["compensates"]["error"]["code"] == "executor_error"


async def test_compensation_waits_for_the_last_attempt(fabric: Fabric) -> None:
    async with fabric.worker([Fail(), Echo()]), fabric.dispatcher() as dispatcher:
        failed = await dispatcher.run(
            "demo.fail",
            {"mode": "retryable"},
            compensation=UNDO,
            retry=RetryHints(max_attempts=2, initial_backoff_ms=100),
            wait_s=20,
        )
        assert failed.compensation_task_id is not None
        compensated = await dispatcher.result_of(failed.compensation_task_id, timeout_s=10)
    assert failed.attempt == 2
    assert failed.error is not None and failed.error.code is ErrorCode.RETRIES_EXHAUSTED
    assert compensated.output["compensates"]["error"]["code"] == "retries_exhausted"


async def test_a_successful_task_is_not_compensated(fabric: Fabric) -> None:
    async with fabric.worker([Echo()]), fabric.dispatcher() as dispatcher:
        result = await dispatcher.run("demo.echo", {"ok": 1}, compensation=UNDO, wait_s=10)
    assert result.status is Status.SUCCESS
    assert result.compensation_task_id is None
