"""Settling a delivery (ack, reject, requeue) safely when its channel may have died.

A delivery tag belongs to the channel it came on. After a reconnect the broker has already
returned that delivery to its queue, and acking the tag on the new channel would ack a
different message, so a settle on a dead channel is skipped and logged, never retried.
"""

from __future__ import annotations

import logging
from typing import Literal

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from wayang_mq import logs

log = logging.getLogger("wayang_mq.delivery")

Settle = Literal["ack", "reject", "requeue"]


async def settle(message: AbstractIncomingMessage, how: Settle) -> None:
    """Ack, reject (to the queue's dead-letter exchange) or requeue ``message``."""
    try:
        if how == "ack":
            await message.ack()
        elif how == "reject":
            await message.reject(requeue=False)
        else:
            await message.nack(requeue=True)
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
