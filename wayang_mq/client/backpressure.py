"""Publishing a task with backpressure: mandatory and confirmed; a full queue (the broker's
nack under ``x-overflow: reject-publish``) is retried with exponential backoff for a bounded
time, then a typed :class:`Backpressure`; no queue at all is :class:`NoExecutor`. A task whose
policy names an executor or labels is published with routing key ``place.<capability>``, for
the control plane to place (:mod:`wayang_mq.core.placement`)."""

from __future__ import annotations

import logging
import time

import aio_pika
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from wayang_mq.amqp.publisher import ConfirmedPublisher, Rejected, Unroutable
from wayang_mq.core import logs, names, placement
from wayang_mq.core.errors import Backpressure, NoExecutor
from wayang_mq.core.model import Task

log = logging.getLogger("wayang_mq.client.dispatcher")


async def publish_task(
    publisher: ConfirmedPublisher, task: Task, message: aio_pika.Message, wait_s: float
) -> None:
    """Publish mandatory; a full queue (nack) is retried with backoff for a bounded time."""
    started = time.monotonic()
    try:
        try:  # the common case, without building a retry loop per task
            await _publish(publisher, task, message)
            return
        except Rejected:
            logs.event(
                log,
                "task.backpressure",
                logging.WARNING,
                task_id=task.task_id,
                queue=names.task_queue(task.capability),
                next=f"retrying for up to {wait_s}s",
            )
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Rejected),
            stop=stop_after_delay(wait_s),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await _publish(publisher, task, message)
    except Unroutable:
        raise NoExecutor(task.capability) from None
    except Rejected:
        raise Backpressure(names.task_queue(task.capability), time.monotonic() - started) from None


async def _publish(publisher: ConfirmedPublisher, task: Task, message: aio_pika.Message) -> None:
    # A task whose policy needs particular executors goes to the control plane (place.<cap>).
    key = placement.routing_key(task)
    await publisher.publish(names.TASKS_EXCHANGE, key, message, mandatory=True)
