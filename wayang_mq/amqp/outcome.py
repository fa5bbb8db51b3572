"""A delivery's fate as a value (:class:`Outcome`), and :func:`settle`, the one place that
carries it out.

Every consumer (the worker, the reaper, the dispatcher's result consumer, the dead-letter
tools) turns each delivery into exactly one Outcome: what to publish first, then whether to
ack, reject or requeue. ``settle`` publishes each message and waits for the broker's confirm,
and only then settles the delivery: it is the only code in the package that acks. A message
the broker does not confirm changes the delivery's fate instead of being lost: a result not
confirmed sends the delivery back to its queue (it comes again and is answered from recent
results); a dead-letter copy not confirmed rejects it into the queue's own at-least-once
dead-lettering; a retry no queue takes falls back to the task's final answer.

An outcome decided after its delivery was already acked (a long-running task's answer, see
:mod:`wayang_mq.runtime.worker`) has nothing to settle: :func:`deliver` publishes what it
carries, retrying until the broker confirms, since there is no delivery to give back.

A settle on a channel that died meanwhile is skipped and logged, never retried: the delivery
tag belongs to the dead channel, the broker has already returned the delivery to its queue,
and acking the same tag on a new channel would ack a different message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from wayang_mq.amqp import acks
from wayang_mq.amqp.publisher import ConfirmedPublisher, Unroutable
from wayang_mq.core import logs
from wayang_mq.core.errors import WayangError
from wayang_mq.core.model import Result

log = logging.getLogger("wayang_mq.amqp.outcome")


class Settle(StrEnum):
    """How a delivery ends once what its outcome publishes is confirmed."""

    ACK = "ack"  # done with: the broker forgets it
    REJECT = "reject"  # to the queue's dead-letter exchange (reason "rejected")
    REQUEUE = "requeue"  # back to its queue, for this or another consumer
    #: left unsettled: the channel's close returns it to the HEAD of its queue, in order (a
    #: requeue puts it at the back on RabbitMQ 3.10's quorum queues): an ordered shard's way
    LEAVE = "leave"


_PAST = {"ack": "acked", "reject": "rejected", "requeue": "requeued", "leave": "left"}


class Kind(StrEnum):
    """What an outcome means, for logs and for whoever watches outcomes."""

    DONE = "done"  # answered: the result (and anything it needs) is published
    PENDING = "pending"  # accepted: a PENDING result is published, the answer comes later
    RETRY = "retry"  # the next attempt is published to a retry tier
    DEAD_LETTER = "dead_letter"  # bad input: kept with its reason, answered when it can be
    REQUEUE = "requeue"  # given back unharmed: shutdown, a bug, something not confirmed
    REJECT = "reject"  # given to the queue's own dead-lettering
    DISCARD = "discard"  # nothing to do: acked as it is


@dataclass(frozen=True, slots=True)
class LogLine:
    """The structured line an outcome logs once it is carried out."""

    event: str
    level: int = logging.INFO
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Send:
    """One message an outcome publishes, confirmed, before its delivery is settled."""

    exchange: str
    routing_key: str
    message: aio_pika.Message
    mandatory: bool = False
    #: how the delivery ends if the broker does not confirm this message; None: best effort
    #: (a courtesy such as an answer to unreadable input: the failure is logged, not fatal)
    if_unconfirmed: Settle | None = Settle.REQUEUE
    unconfirmed_event: str = "result.unconfirmed"
    #: wait this long before giving the delivery back, so a refusal does not spin: a nack
    #: storm (a cluster node died, see ConfirmedPublisher._fresh_channel) would otherwise
    #: spend a task's delivery limit in a second and dead-letter work that had succeeded
    backoff_s: float = 1.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What becomes of one delivery: messages to publish, then how it is settled."""

    kind: Kind
    settle: Settle
    task_id: str | None = None
    sends: tuple[Send, ...] = ()
    result: Result | None = None  # the answer this outcome carries, if any
    log: LogLine | None = None
    #: a mandatory send no queue took: the outcome to carry out instead
    if_unroutable: Callable[[], Awaitable[Outcome]] | None = field(default=None, repr=False)
    #: why a delivery was refused or dead-lettered (an ErrorCode): for metrics, never free text
    code: str | None = None


def done(
    task_id: str, *sends: Send, result: Result | None = None, log: LogLine | None = None
) -> Outcome:
    """Publish ``sends`` (each confirmed), then ack."""
    return Outcome(Kind.DONE, Settle.ACK, task_id, sends, result, log)


def requeue(task_id: str | None, reason: str, event: str = "delivery.requeued") -> Outcome:
    """Give the delivery back to its queue, unharmed."""
    return Outcome(
        Kind.REQUEUE, Settle.REQUEUE, task_id, log=LogLine(event, fields={"reason": reason})
    )


def leave(task_id: str | None, reason: str, event: str = "delivery.left") -> Outcome:
    """Leave the delivery unsettled until the channel closes (a shard's deliveries on stop:
    the broker returns them to the head of the queue, in order, for the standby consumer)."""
    return Outcome(
        Kind.REQUEUE, Settle.LEAVE, task_id, log=LogLine(event, fields={"reason": reason})
    )


def reject(task_id: str | None, reason: str, event: str = "delivery.rejected") -> Outcome:
    """Hand the delivery to its queue's dead-letter exchange."""
    return Outcome(
        Kind.REJECT, Settle.REJECT, task_id, log=LogLine(event, logging.WARNING, {"reason": reason})
    )


def discard(task_id: str | None, log: LogLine | None = None) -> Outcome:
    """Ack the delivery with nothing to publish."""
    return Outcome(Kind.DISCARD, Settle.ACK, task_id, log=log)


async def settle(
    message: AbstractIncomingMessage,
    outcome: Outcome,
    publisher: ConfirmedPublisher | None = None,
) -> Outcome:
    """Publish what ``outcome`` carries, each message confirmed, then settle the delivery.

    Returns the outcome carried out: ``outcome`` itself, or what replaced it when the broker
    did not confirm a message (see the module's docstring).
    """
    for send in outcome.sends:
        failure = await _publish(send, publisher)
        if failure is None:
            continue
        if isinstance(failure, Unroutable) and outcome.if_unroutable is not None:
            logs.event(
                log,
                f"{outcome.kind}.unroutable",
                logging.ERROR,
                task_id=outcome.task_id,
                key=send.routing_key,
                hint="apply the topology: no queue is bound for it",
            )
            return await settle(message, await outcome.if_unroutable(), publisher)
        if send.if_unconfirmed is None:
            logs.event(log, "send.dropped", logging.DEBUG, key=send.routing_key, error=failure)
            continue
        return await _instead(message, outcome, send, failure)
    await _act(message, outcome.settle)
    _log(outcome)
    return outcome


async def deliver(
    outcome: Outcome, publisher: ConfirmedPublisher, *, retry_s: float = 1.0
) -> Outcome:
    """Publish what ``outcome`` carries when there is no delivery left to settle.

    Each message is retried (every ``retry_s``) until the broker confirms it: there is no
    queue to give the work back to. If the process dies meanwhile, the task's heartbeat
    supervision re-dispatches it. Returns the outcome carried out.
    """
    for send in outcome.sends:
        while (failure := await _publish(send, publisher)) is not None:
            if isinstance(failure, Unroutable) and outcome.if_unroutable is not None:
                return await deliver(await outcome.if_unroutable(), publisher, retry_s=retry_s)
            if send.if_unconfirmed is None:
                break
            logs.event(
                log,
                send.unconfirmed_event,
                logging.WARNING,
                task_id=outcome.task_id,
                error=str(failure),
                next=f"publishing again in {retry_s}s",
            )
            await asyncio.sleep(retry_s)
    _log(outcome)
    return outcome


async def _publish(send: Send, publisher: ConfirmedPublisher | None) -> WayangError | None:
    """Publish one message; the broker's refusal as a value, None when confirmed."""
    if publisher is None:
        raise RuntimeError("an outcome with messages to publish needs a publisher")
    try:
        await publisher.publish(
            send.exchange, send.routing_key, send.message, mandatory=send.mandatory
        )
    except WayangError as exc:
        return exc
    return None


def _log(outcome: Outcome) -> None:
    if outcome.log is not None:
        line = outcome.log
        logs.event(log, line.event, line.level, task_id=outcome.task_id, **line.fields)


async def _instead(
    message: AbstractIncomingMessage, outcome: Outcome, send: Send, failure: WayangError
) -> Outcome:
    """The delivery's fate when one of its messages was not confirmed."""
    assert send.if_unconfirmed is not None
    logs.event(
        log,
        send.unconfirmed_event,
        logging.WARNING,
        task_id=outcome.task_id,
        error=str(failure),
        next=_PAST[send.if_unconfirmed],
    )
    if send.backoff_s:
        await asyncio.sleep(send.backoff_s)
    kind = Kind.REJECT if send.if_unconfirmed is Settle.REJECT else Kind.REQUEUE
    fallback = replace(outcome, kind=kind, settle=send.if_unconfirmed, sends=(), log=None)
    await _act(message, fallback.settle)
    return fallback


async def _act(message: AbstractIncomingMessage, how: Settle) -> None:
    """Ack, reject or requeue; on a channel that died meanwhile, skip it and say so.

    A reject is ``basic.nack`` without requeue: RabbitMQ dead-letters it exactly like
    ``basic.reject`` (reason ``rejected``).
    """
    if how is Settle.LEAVE:
        return
    try:
        if how is Settle.ACK:
            await acks.ack(message)  # with others of its channel, where they are contiguous
        else:
            await message.nack(requeue=how is Settle.REQUEUE)
            acks.forget(message)
    except (
        aio_pika.exceptions.ChannelInvalidStateError,
        aiormq.exceptions.AMQPError,
        ConnectionError,
        RuntimeError,
    ) as exc:
        logs.event(
            log,
            "delivery.unsettled",
            task_id=message.message_id,
            action=how,
            reason=f"channel closed ({type(exc).__name__}); the broker redelivers it",
        )
