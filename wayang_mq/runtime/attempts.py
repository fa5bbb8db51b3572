"""Retries and compensations as their deciders publish them: the issuer's signed task, byte
for byte, with an attempt record signed by the decider (:mod:`wayang_mq.core.envelope`).

Executors and the reaper never sign tasks. A retry is the same task bytes plus "attempt n,
may start until t", through a retry tier; a compensation is the same task bytes plus "the
compensation of this task, for this failure", through the shortest tier (executors may not
publish to ``wayang.tasks``). Whoever receives either derives the task to run from the two
signatures, and checks that each key was allowed to say its part.

Whoever decides a task has failed for good (the worker after its last attempt, the reaper
for a dead letter it answers) dispatches the compensation before it publishes the terminal
result, and links the compensation's id in that result, so the caller can follow it. The
dispatcher, at its own deadline, signs the compensation task itself: it is the issuer.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aio_pika

from wayang_mq.amqp.publisher import ConfirmedPublisher
from wayang_mq.core import logs, names, retry
from wayang_mq.core.envelope import (
    ATTEMPT_HEADER,
    attempt_headers,
    compensation_of,
    issued_headers,
)
from wayang_mq.core.errors import NoExecutor, WayangError, WireError
from wayang_mq.core.model import AttemptRecord, ErrorInfo, Result, Status, Task, now_ms
from wayang_mq.core.names import task_queue
from wayang_mq.core.signing import Signer
from wayang_mq.core.wire import APP_ID, PARTITION_KEY_HEADER, decode
from wayang_mq.observability import tracing
from wayang_mq.topology.spec import RetryTier

log = logging.getLogger("wayang_mq.runtime.compensation")


def derived_message(
    body: bytes,
    headers: Mapping[str, Any],
    task: Task,
    record: AttemptRecord,
    signer: Signer,
) -> aio_pika.Message:
    """The issuer's task bytes and signature, with ``record`` signed by ``signer``; ``task``
    is the attempt the record makes (its id and reply address go in the properties)."""
    out: dict[str, Any] = issued_headers(headers)
    partition = headers.get(PARTITION_KEY_HEADER)
    out[PARTITION_KEY_HEADER] = partition if isinstance(partition, str) else task.task_id
    out.update(attempt_headers(record, signer))
    out.update(tracing.headers())  # the trace of the task whose failure decided it
    return aio_pika.Message(
        body,
        headers=out,
        message_id=task.task_id,
        correlation_id=task.task_id,
        content_type="application/msgpack",
        type=Task.wire_type,
        reply_to=task.reply_to or None,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=now_ms() // 1000,
        app_id=APP_ID,
    )


def issuer_window_ms(body: bytes, task: Task) -> int:
    """The queue window the issuer gave the task (deadline minus issue time, as signed): each
    retry and compensation gets this window again, never the last attempt's (which the
    backoff stretched). ``body`` is a delivery that already opened."""
    try:
        return decode(body, Task).queue_window_ms
    except WireError:
        return task.queue_window_ms


def _carried(headers: Mapping[str, Any]) -> AttemptRecord | None:
    """A delivery's attempt record; only for a delivery that already opened (it verified)."""
    encoded = headers.get(ATTEMPT_HEADER)
    if not isinstance(encoded, str):
        return None
    try:
        return decode(base64.b64decode(encoded), AttemptRecord)
    except (WireError, ValueError):
        return None


def carried_compensation(headers: Mapping[str, Any]) -> ErrorInfo | None:
    """The failure a delivery compensates, read from its attempt record: a retry of a
    compensation stays one. Only for a delivery that already opened (the record verified)."""
    record = _carried(headers)
    return record.compensates if record is not None else None


def carried_token(headers: Mapping[str, Any]) -> str | None:
    """The token a delivery's attempt record gave it (a control plane's re-dispatch): a retry
    of that attempt keeps it, so its result still answers the attempt the record holds."""
    record = _carried(headers)
    return record.token if record is not None else None


async def dispatch_compensation(
    body: bytes,
    headers: Mapping[str, Any],
    task: Task,
    result: Result,
    *,
    publisher: ConfirmedPublisher,
    signer: Signer,
    decider_id: str,
    tiers: Sequence[RetryTier],
    queue_exists: Callable[[str], Awaitable[bool]],
) -> Result:
    """Publish the compensation of a task that failed for good; the result, linked to it.

    ``body`` and ``headers`` are the delivery of the failed task (the issuer's bytes).
    Published ``mandatory`` and confirmed before the decider acks or answers, so a crash in
    between decides (and compensates) again, under the same derived id. One that cannot be
    published (no tier, no queue for its capability, no broker) is logged, and the FAILED
    result goes out unlinked: the caller must learn of the failure either way. Its queue is
    checked first: through a tier the broker would confirm it, then drop it unrouted when the
    tier gives it back to ``wayang.tasks``.
    """
    if result.status is not Status.FAILED or result.error is None:
        return result
    if carried_compensation(headers) is not None:
        return result  # a compensation is not compensated again
    compensation = compensation_of(task, result.error)
    if compensation is None:
        return result
    try:
        if not tiers:
            raise WayangError("the topology has no retry tier to carry it")
        capability = compensation.capability
        if not any(
            [await queue_exists(q) for q in (task_queue(capability), task_queue(capability, 0))]
        ):
            raise NoExecutor(capability)
        tier = retry.pick_tier(0, tiers)
        record = AttemptRecord(
            task_id=task.task_id,
            attempt=1,
            deadline_ms=now_ms() + tier.ttl_ms + issuer_window_ms(body, task),
            executor_id=decider_id,
            compensates=result.error,
        )
        message = derived_message(body, headers, compensation, record, signer)
        key = names.retry_routing_key(tier.name, compensation.capability)
        await publisher.publish(names.RETRY_EXCHANGE, key, message, mandatory=True)
    except WayangError as exc:
        logs.event(
            log,
            "compensation.failed",
            logging.ERROR,
            task_id=task.task_id,
            capability=compensation.capability,
            error=exc,
            hint="is the compensation capability in the topology, with a retry tier?",
        )
        return result
    logs.event(
        log,
        "compensation.dispatched",
        task_id=task.task_id,
        compensation_task_id=compensation.task_id,
    )
    return result.model_copy(update={"compensation_task_id": compensation.task_id})
