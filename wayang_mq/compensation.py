"""Compensation: a failed task may name another task that undoes or reports its effects.

Whoever decides a task has failed for good (the worker after its last attempt, the reaper
for a dead letter it answers, the dispatcher at its own deadline) dispatches the compensation,
signed with its own key, before it publishes the terminal result, and links the compensation's
id in that result, so the caller can follow it.
"""

from __future__ import annotations

from wayang_mq.model import Result, Status, Task


def compensation_for(task: Task, result: Result) -> Task | None:
    """The compensation task for a final FAILED result, or None when there is none to run.

    It is addressed to the same reply address, carries the failed task's id and error in
    its input (``compensates``), and is a task of its own: it is not compensated again.
    Its id (and idempotency key) derive from the failed task's, so a failure decided twice
    (a redelivery after a crash) dispatches the same compensation, which runs once.
    """
    if task.compensation is None or result.status is not Status.FAILED:
        return None
    spec = task.compensation
    error = result.error.model_dump(mode="json") if result.error else None
    return Task.create(
        spec.capability,
        {**spec.input, "compensates": {"task_id": task.task_id, "error": error}},
        queue_timeout_ms=task.deadline_ms - task.issued_at_ms,
        task_id=f"{task.task_id}.compensation",
        idempotency_key=f"{task.task_id}.compensation",
        node_id=spec.node_id or f"{task.node_id}:compensate",
        reply_to=task.reply_to,
        issuer=task.issuer,
        retry=task.retry,
    )
