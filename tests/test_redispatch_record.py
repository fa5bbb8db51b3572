"""Who may re-dispatch a task, and what the re-dispatch runs as (pure: no broker)."""

from __future__ import annotations

import pytest

from wayang_mq.core.envelope import attempt_headers, open_task
from wayang_mq.core.errors import BadAttempt, ErrorCode
from wayang_mq.core.model import AttemptRecord, Compensation, ErrorInfo, RetryHints, Task, now_ms
from wayang_mq.core.scopes import KeyScope, Role
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import task_message

DISPATCHER, CONTROL_PLANE, EXECUTOR = Signer.generate(), Signer.generate(), Signer.generate()
KEYS = KeyRing.scoped(
    [
        (DISPATCHER.public_key, KeyScope(Role.DISPATCHER, "d-1", ("demo.*",))),
        (CONTROL_PLANE.public_key, KeyScope(Role.CONTROL_PLANE, "cp-1")),
        (EXECUTOR.public_key, KeyScope(Role.EXECUTOR, "w-1", ("demo.*",))),
    ]
)


def _task() -> Task:
    return Task.create(
        "demo.echo",
        issuer="d-1",
        retry=RetryHints(max_attempts=3),
        compensation=Compensation(capability="demo.undo"),
    )


def _with_record(task: Task, record: AttemptRecord, signer: Signer) -> tuple[bytes, dict[str, str]]:
    message = task_message(task, DISPATCHER)
    headers = {k: str(v) for k, v in message.headers.items()}
    return message.body, headers | attempt_headers(record, signer)


def test_a_control_plane_redispatch_runs_as_its_attempt_with_its_new_token() -> None:
    task = _task()
    record = AttemptRecord(
        task_id=task.task_id,
        attempt=2,
        deadline_ms=now_ms() + 60_000,
        executor_id="cp-1",
        token="new-token",
    )
    opened = open_task(*_with_record(task, record, CONTROL_PLANE), KEYS)
    assert (opened.task.attempt, opened.task.token) == (2, "new-token")
    assert opened.decider is not None and opened.decider.scope.role is Role.CONTROL_PLANE


def test_a_control_plane_does_not_decide_compensations() -> None:
    task = _task()
    record = AttemptRecord(
        task_id=task.task_id,
        attempt=1,
        deadline_ms=now_ms() + 60_000,
        executor_id="cp-1",
        compensates=ErrorInfo(code=ErrorCode.EXECUTOR_ERROR),
    )
    with pytest.raises(BadAttempt, match="does not decide compensations"):
        open_task(*_with_record(task, record, CONTROL_PLANE), KEYS)


def test_a_compensation_record_carries_no_token() -> None:
    task = _task()
    record = AttemptRecord(
        task_id=task.task_id,
        attempt=1,
        deadline_ms=now_ms() + 60_000,
        executor_id="w-1",
        compensates=ErrorInfo(code=ErrorCode.EXECUTOR_ERROR),
        token="chosen",
    )
    with pytest.raises(BadAttempt, match="never given"):
        open_task(*_with_record(task, record, EXECUTOR), KEYS)


def test_a_control_plane_redispatch_stays_within_the_issuers_attempts() -> None:
    task = _task()
    record = AttemptRecord(
        task_id=task.task_id, attempt=4, deadline_ms=now_ms() + 60_000, executor_id="cp-1"
    )
    with pytest.raises(BadAttempt, match="retry limit"):
        open_task(*_with_record(task, record, CONTROL_PLANE), KEYS)
