"""The transactional outbox: messages the control plane decided in a transaction, published
after it committed.

A re-dispatch is decided in the same transaction that records it (see
:mod:`wayang_mq.controlplane.supervision`), so the record and what goes on the wire cannot
disagree: the messages wait in ``outbox`` until a publisher sends them, confirmed, in the
order they were written, and deletes each row once the broker confirmed it. A crash between
the confirm and the delete sends the same message again, with the same message id: its
receivers treat it as the re-send it is (a worker joins or refuses a copy of an attempt it
holds; the dispatcher's reply book ignores a notice of an attempt it already has).

Only one publisher sends at a time (a session advisory lock), so with several control plane
instances a notice is never overtaken by the task it announces.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any

import aio_pika
import psycopg
from psycopg.types.json import Jsonb

from wayang_mq.amqp.publisher import ConfirmedPublisher, Rejected, Unroutable
from wayang_mq.core import logs, names
from wayang_mq.core.envelope import ATTEMPT_HEADER
from wayang_mq.core.errors import WayangError, WireError
from wayang_mq.core.model import AttemptRecord, Task, now_ms
from wayang_mq.core.wire import APP_ID, CONTENT_TYPE, WireMessage, decode

log = logging.getLogger("wayang_mq.controlplane.outbox")

Conn = psycopg.AsyncConnection[Any]

#: pg advisory lock held while one instance publishes the outbox (any constant of our own)
OUTBOX_LOCK = 0x7761_7961_6E67_0002
BATCH = 100


async def put(conn: Conn, exchange: str, routing_key: str, message: WireMessage) -> None:
    """Queue ``message`` for publishing once the caller's transaction commits."""
    await conn.execute(
        "INSERT INTO outbox (exchange, routing_key, body, headers, message_id, type)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (
            exchange,
            routing_key,
            message.body,
            Jsonb(dict(message.headers)),
            message.message_id,
            message.type,
        ),
    )


async def publish(conn: Conn, publisher: ConfirmedPublisher) -> int:
    """Publish what the outbox holds, in order; how many were sent. ``conn`` is autocommit:
    each row is deleted (committed) as soon as its confirm came."""
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (OUTBOX_LOCK,))
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0  # another instance is publishing it
    sent = 0
    try:
        cur = await conn.execute(
            "SELECT id, exchange, routing_key, body, headers, message_id, type FROM outbox"
            " ORDER BY id LIMIT %s",
            (BATCH,),
        )
        for row_id, exchange, key, body, headers, message_id, kind in await cur.fetchall():
            if not await _send(publisher, exchange, key, bytes(body), headers, message_id, kind):
                break  # the broker is away or the queue full: the rest waits, in order
            await conn.execute("DELETE FROM outbox WHERE id = %s", (row_id,))
            sent += 1
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (OUTBOX_LOCK,))
    return sent


async def _send(
    publisher: ConfirmedPublisher,
    exchange: str,
    key: str,
    body: bytes,
    headers: Mapping[str, Any],
    message_id: str,
    kind: str,
) -> bool:
    """Publish one row; False to keep it (try later), True when it is done with."""
    message = _message(body, headers, message_id, kind)
    is_task = exchange == names.TASKS_EXCHANGE
    try:
        await publisher.publish(exchange, key, message, mandatory=is_task)
    except Unroutable as exc:
        # No queue serves the capability any more: nothing would run it. The record keeps the
        # attempt queued, so `wayang-mq audit` shows the task; the row is dropped.
        logs.event(
            log, "outbox.unroutable", logging.ERROR, id=message_id, key=key, error=exc.message
        )
        return True
    except Rejected:
        logs.event(log, "outbox.backpressure", logging.WARNING, id=message_id, key=key)
        return False
    except WayangError as exc:
        logs.event(log, "outbox.publish_failed", logging.WARNING, id=message_id, error=exc)
        return False
    logs.event(log, "outbox.published", id=message_id, type=kind, key=key)
    return True


def _message(
    body: bytes, headers: Mapping[str, Any], message_id: str, kind: str
) -> aio_pika.Message:
    """The AMQP message of a row; a task also gets its reply address and the time left until
    its attempt's deadline (expired in its queue, it is dead-lettered and answered)."""
    reply_to: str | None = None
    expiration: float | None = None
    if kind == Task.wire_type:
        reply_to, deadline_ms = _task_properties(body, headers)
        if deadline_ms is not None:
            expiration = max(1, deadline_ms - now_ms()) / 1000
    return aio_pika.Message(
        body,
        headers=dict(headers),
        message_id=message_id,
        correlation_id=message_id,
        content_type=CONTENT_TYPE,
        type=kind,
        reply_to=reply_to,
        expiration=expiration,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=now_ms() // 1000,
        app_id=APP_ID,
    )


def _task_properties(body: bytes, headers: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """Reply address and attempt deadline of a task row (our own, verified when recorded)."""
    try:
        task = decode(body, Task)
        encoded = headers.get(ATTEMPT_HEADER)
        record = (
            decode(base64.b64decode(encoded), AttemptRecord) if isinstance(encoded, str) else None
        )
    except (WireError, ValueError):
        return None, None
    return task.reply_to or None, record.deadline_ms if record else task.deadline_ms
