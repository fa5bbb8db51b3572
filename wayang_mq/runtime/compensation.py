"""Compensation: a failed task may name another task that undoes or reports its effects.

Whoever decides a task has failed for good (the worker after its last attempt, the reaper
for a dead letter it answers, the dispatcher at its own deadline) dispatches the compensation,
signed with its own key, before it publishes the terminal result, and links the compensation's
id in that result, so the caller can follow it.
"""

from __future__ import annotations

import logging

from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp
from wayang_mq.core import logs, names
from wayang_mq.core.errors import WayangError
from wayang_mq.core.fields import NODE_ID_BYTES, TASK_ID_BYTES, derived_id
from wayang_mq.core.model import Result, Status, Task
from wayang_mq.core.signing import Signer
from wayang_mq.core.wire import task_message

log = logging.getLogger("wayang_mq.runtime.compensation")


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
    task_id = derived_id(task.task_id, ".compensation", TASK_ID_BYTES)
    return Task.create(
        spec.capability,
        {**spec.input, "compensates": {"task_id": task.task_id, "error": error}},
        queue_timeout_ms=task.queue_window_ms,
        task_id=task_id,
        idempotency_key=task_id,
        node_id=spec.node_id or derived_id(task.node_id, ":compensate", NODE_ID_BYTES),
        reply_to=task.reply_to,
        issuer=task.issuer,
        retry=task.retry,
    )


async def dispatch_compensation(
    task: Task, result: Result, publisher: ConfirmedPublisher, signer: Signer
) -> Result:
    """Publish the compensation of a task that failed for good; the result, linked to it.

    Published ``mandatory`` and confirmed before the decider acks or answers, so a crash in
    between decides (and compensates) again, under the same derived id. One that cannot be
    published (no queue for its capability, a full queue, no broker) is logged, and the
    FAILED result goes out unlinked: the caller must learn of the failure either way.
    """
    compensation = compensation_for(task, result)
    if compensation is None:
        return result
    message = to_amqp(task_message(compensation, signer))
    try:
        await publisher.publish(
            names.TASKS_EXCHANGE, compensation.capability, message, mandatory=True
        )
    except WayangError as exc:
        logs.event(
            log,
            "compensation.failed",
            logging.ERROR,
            task_id=task.task_id,
            capability=compensation.capability,
            error=exc,
            hint="is the compensation capability in the topology?",
        )
        return result
    logs.event(
        log,
        "compensation.dispatched",
        task_id=task.task_id,
        compensation_task_id=compensation.task_id,
    )
    return result.model_copy(update={"compensation_task_id": compensation.task_id})
