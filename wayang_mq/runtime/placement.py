"""A worker's side of placement: its own queue, and the refusal of tasks not meant for it.

The control plane places a task whose policy needs particular executors (a named executor,
labels) by forwarding it to ``wayang.tasks`` with routing key ``executor.<id>``; each worker
declares and consumes its own queue ``wayang.executor.<id>`` bound to that key. The worker
declares it (not the topology) because only the worker knows its id; it is a durable quorum
queue, so what was placed on a worker that restarts waits for it.

Whatever way a task arrives, the worker checks its policy (:class:`PolicyGuard`, the first
middleware layer): a task whose policy it does not satisfy is answered FAILED ``no_executor``
with what did not match, and never runs. That is what enforces a policy against a client that
publishes a labelled task straight to the capability's queue.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from wayang_mq.amqp.daemon import Daemon
from wayang_mq.core import logs, names
from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.model import ErrorInfo, Result
from wayang_mq.core.placement import CAPABILITY_HEADER, has, unmet
from wayang_mq.runtime.middleware import Middleware, Opened

log = logging.getLogger("wayang_mq.runtime.placement")

TaskHandler = Callable[[str, AbstractIncomingMessage], Awaitable[None]]


class PolicyGuard(Middleware):
    """Answers FAILED ``no_executor`` a task whose policy this executor does not satisfy."""

    def __init__(self, executor_id: str, labels: Mapping[str, str]) -> None:
        self._executor_id = executor_id
        self._labels = dict(labels)

    async def on_opened(self, opened: Opened) -> Result | None:
        """None when the policy is met; else the refusal, saying what did not match."""
        task = opened.task
        missing = unmet(task.policy, self._executor_id, self._labels)
        if not missing:
            return None
        keys = sorted(task.policy.labels)
        mine = f" ({has(self._labels, keys)})" if keys else ""
        message = (
            f"task {task.task_id} needs {', '.join(missing)}, which executor "
            f"{self._executor_id}{mine} does not have: a task with a placement policy is "
            f"published with routing key {names.place_routing_key(task.capability)}, and the "
            "control plane places it on an executor that meets it"
        )
        error = ErrorInfo(code=ErrorCode.NO_EXECUTOR, message=message, retryable=False)
        return Result.failure(task, self._executor_id, error)


async def consume_own_queue(
    worker: Daemon,
    connection: AbstractRobustConnection,
    capabilities: Collection[str],
    handle: TaskHandler,
) -> None:
    """Declare ``wayang.executor.<id>``, bind it to ``executor.<id>`` and consume it; each
    placed task goes to the handler of the capability the control plane said (the handler
    still checks the signed task names it)."""
    queue_name = names.executor_queue(worker.daemon_id)
    key = names.executor_routing_key(worker.daemon_id)
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(names.TASKS_EXCHANGE, key)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        # Not fatal: the worker still serves its capabilities' queues; the control plane
        # finds no queue at executor.<id> and places its tasks elsewhere, or answers why.
        logs.event(
            log,
            "placement.no_own_queue",
            logging.WARNING,
            queue=queue_name,
            error=str(exc),
            hint="grant the executor's account configure and read on wayang.executor.<id> "
            "and read on wayang.tasks for executor.<id> (docs/security.md)",
        )
        return
    finally:
        if not channel.is_closed:
            await channel.close()
    served = list(capabilities)

    async def placed(message: AbstractIncomingMessage) -> None:
        capability = str((message.headers or {}).get(CAPABILITY_HEADER, ""))
        await handle(capability if capability in served else served[0], message)

    await worker.consume(queue_name, placed, hint="it was declared just above", label="placed")
