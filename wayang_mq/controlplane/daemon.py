"""``wayang-mq control-plane``: the daemon that writes the record.

It consumes ``wayang.record`` (see :mod:`wayang_mq.controlplane.facts` for what is bound
there), verifies each message as its receivers would, and writes it down in PostgreSQL
(:mod:`wayang_mq.controlplane.store`). A delivery is acked only once the transaction that
holds its fact has committed; while PostgreSQL is down the daemon holds what it has (at most
``prefetch`` deliveries), reconnects with backoff, and writes them when it is back. The
fabric does not wait for it: workers and dispatchers never talk to the database.

Several instances may run at once. ``wayang.record`` is a single-active-consumer queue: the
broker delivers to one instance at a time, in queue order, and hands the queue to the next
when that one's channel closes. What the one that died had not acked comes again to the
next; its facts' digests make a second write change nothing. So there is no gap (nothing
is acked before it is committed) and no double write (every write is keyed by what the
message is).

A message that does not verify is never written: it is counted in ``refusals`` and a copy
goes to ``wayang.record.refused`` with the reason, for an operator to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import psycopg
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from wayang_mq.amqp.daemon import Daemon
from wayang_mq.amqp.outcome import LogLine, Send, discard, done, requeue, settle
from wayang_mq.controlplane import claims, gauges, store
from wayang_mq.controlplane.config import ControlPlaneConfig
from wayang_mq.controlplane.db import DatabaseUnavailable, Probe, Reconnecting, unavailable
from wayang_mq.controlplane.facts import Delivery, Fact, Refused, read
from wayang_mq.controlplane.migrate import check_schema
from wayang_mq.controlplane.placement import Placer
from wayang_mq.controlplane.supervision import Supervision, supervise
from wayang_mq.core import logs, names
from wayang_mq.core.envelope import TaskChecks
from wayang_mq.core.errors import ConfigError, WayangError
from wayang_mq.observability.metrics import ControlPlaneMetrics

log = logging.getLogger("wayang_mq.controlplane")

REFUSED_REASON_HEADER = "wayang-refused-reason"
HISTORY_ENTRY_TYPE = "wayang.history-entry.v1"  # deliveries packed (Delivery.pack_many)


def _delivery(message: AbstractIncomingMessage) -> Delivery:
    """What the record reads of a delivery (and what the history keeps of it)."""
    return Delivery(
        exchange=message.exchange or "",
        routing_key=message.routing_key or "",
        body=message.body,
        headers=message.headers or {},
        message_id=message.message_id,
        user_id=message.user_id,
        reply_to=message.reply_to,
        type=message.type,
        timestamp_ms=int(message.timestamp.timestamp() * 1000) if message.timestamp else None,
    )


@dataclass
class Counts:
    """What this instance has done since it started (health answer, tests)."""

    written: int = 0  # facts written
    repeated: int = 0  # facts already recorded (a redelivery, another instance)
    refused: int = 0


class ControlPlane(Daemon):
    """Writes every fact on ``wayang.record`` into PostgreSQL until ``stop()``."""

    kind = "control_plane"

    def __init__(self, config: ControlPlaneConfig) -> None:
        super().__init__(
            config.amqp_url,
            config.control_plane_id,
            prefetch=config.prefetch,
            grace_s=config.grace_s,
            health_port=config.health_port,
            metrics_port=config.metrics_port,
            metrics_host=config.metrics_host,
        )
        self.config = config
        self.counts = Counts()
        self._checks = TaskChecks(audience=config.audience, max_body_bytes=config.max_body_bytes)
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.database = Reconnecting(
            config.database_url, retry_max_s=config.retry_max_s, daemon_id=config.control_plane_id
        )
        self._writer: asyncio.Task[None] | None = None
        self._appended: asyncio.Future[None] | None = None  # the last batch's history append
        self.supervision: Supervision | None = None
        self._claims: claims.ClaimDesk | None = None
        self._placer: Placer | None = None
        self._probe = Probe(config.database_url)  # /readyz
        self._watch: asyncio.Task[None] | None = None
        self._metrics: ControlPlaneMetrics | None = None
        if self.registry is not None:
            self.metrics = self._metrics = ControlPlaneMetrics(
                self.registry, config.control_plane_id, self.ready
            )
            parts = gauges.Parts(lambda: self._claims, lambda: self._placer, self._supervision)
            self.registry.register(gauges.Decisions(parts))

    # -- the daemon's parts ---------------------------------------------------------------------

    async def setup(self) -> None:
        """The database first: a control plane that cannot write consumes nothing."""
        await check_schema(await self.database.get())

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Consume ``wayang.record`` (single active consumer) and start the writer."""
        self._claims = await claims.start(self)  # first: the writer answers with its key
        if not await self.queue_exists(names.HISTORY_QUEUE):
            raise ConfigError(
                f"queue {names.HISTORY_QUEUE} does not exist", hint="run `wayang-mq topology apply`"
            )
        self._writer = asyncio.create_task(self._write_loop())
        await self.consume(
            names.RECORD_QUEUE, self._received, hint="run `wayang-mq topology apply`"
        )
        c = self.config
        self.supervision = supervise(
            c.supervision, c.signer, c.database_url, c.control_plane_id, self.publisher
        )
        self._placer = await Placer.start(self)  # tasks with a placement policy
        if self._metrics is not None and c.audit_interval_s > 0:
            self._watch = asyncio.create_task(
                gauges.watch(self._metrics, c.database_url, c.audit_interval_s)
            )

    async def teardown(self) -> None:
        """Stop the writer, the supervision and the claims; close the database."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._probe.close()
        if self.supervision is not None:
            await self.supervision.stop()
        await claims.stop(self._claims)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self.database.close()
        if self._placer is not None:
            await self._placer.close()

    def describe(self) -> dict[str, Any]:
        """The queue it records from and what it has written."""
        return {
            "queue": names.RECORD_QUEUE,
            "database": "up" if self.database.up else "down",
            "written": self.counts.written,
            "refused": self.counts.refused,
        }

    def ready(self) -> bool:
        """Consuming on a live connection, and the database not known to be down."""
        return super().ready() and self.database.up

    async def ready_checks(self) -> Mapping[str, bool]:
        """The database answers (``SELECT 1``, on a connection of the probe's own)."""
        return {"database": await self._probe.answers()}

    def _supervision(self) -> Supervision | None:
        return self.supervision

    # -- receiving and writing ------------------------------------------------------------------

    async def _received(self, message: AbstractIncomingMessage) -> None:
        await self._inbox.put(message)

    async def _write_loop(self) -> None:
        """Take what has arrived (up to ``batch``) and write it in one transaction; the next
        batch is written once this one committed, while this one's acks go on."""
        while True:
            batch = [await self._inbox.get()]
            while len(batch) < self.config.batch and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            # A handler of the daemon from the start: its drain waits for the whole batch,
            # written and settled, before the connection closes.
            self.spawn(self._process(batch, committed))
            await committed

    async def _process(
        self, batch: list[AbstractIncomingMessage], committed: asyncio.Future[None]
    ) -> None:
        try:
            settle_all = await self._write_batch(batch)
        except Exception:
            # A bug of ours: the deliveries go back to the queue unharmed, after a pause
            # so that a bug that repeats does not spin.
            log.exception("event=record.bug size=%d next=requeued", len(batch))
            await asyncio.sleep(1)
            for message in batch:
                await settle(message, requeue(message.message_id, "a bug (logged above)"))
            return
        finally:
            if not committed.done():
                committed.set_result(None)
        await settle_all

    async def _write_batch(self, batch: list[AbstractIncomingMessage]) -> Coroutine[Any, Any, None]:
        """Commit the batch; return what settles its deliveries (each only once committed)."""
        deliveries = [_delivery(message) for message in batch]
        read_out = [self._read(message, d) for message, d in zip(batch, deliveries, strict=True)]
        started = time.monotonic()
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(DatabaseUnavailable),
            wait=wait_exponential(multiplier=0.2, max=self.config.retry_max_s),
            reraise=True,
        ):
            with attempt:
                outcomes = await self._commit(read_out)
        if self._metrics is not None:
            gauges.count_batch(self._metrics, time.monotonic() - started, read_out, outcomes)
        recorded = [
            d for d, (kind, _) in zip(deliveries, outcomes, strict=True) if kind != "refused"
        ]

        # The history keeps the order batches were committed in: each batch appends after the
        # one before it has (a rebuild then writes in the same order).
        before, mine = self._appended, asyncio.get_running_loop().create_future()
        self._appended = mine

        async def settle_all() -> None:
            # What was recorded (now, or before a crash: a rebuild writes it once, by its
            # digest) is appended to the history as one entry, then each delivery is settled.
            try:
                if before is not None:
                    await asyncio.shield(before)
                appended = await self._append_history(recorded)
            finally:
                mine.set_result(None)
            await asyncio.gather(
                *(
                    self._settle(message, kind, detail, appended)
                    for message, (kind, detail) in zip(batch, outcomes, strict=True)
                )
            )

        return settle_all()

    async def _append_history(self, recorded: list[Delivery]) -> bool:
        """One stream entry for the batch, confirmed; False when the broker did not take it."""
        if not recorded:
            return True
        entry = aio_pika.Message(
            Delivery.pack_many(recorded),
            type=HISTORY_ENTRY_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self.publisher.publish("", names.HISTORY_QUEUE, entry)
        except WayangError as exc:
            logs.event(log, "history.unconfirmed", logging.WARNING, error=exc, next="requeued")
            return False
        return True

    def _read(self, message: AbstractIncomingMessage, delivery: Delivery) -> Fact | Refused:
        try:
            return read(delivery, self.config.keyring, self._checks)
        except Refused as refused:
            return refused
        except Exception as exc:  # a message our reading chokes on is refused, not retried
            log.exception("event=record.unreadable id=%s", message.message_id)
            return Refused("unreadable", f"{type(exc).__name__}: {exc}")

    async def _commit(self, read_out: list[Fact | Refused]) -> list[tuple[str, str]]:
        """One transaction for the batch; what became of each fact.

        Fast path: the whole batch in one pipelined transaction, no savepoints (a savepoint
        per fact costs two round trips). If a fact fails to write (a bug, a constraint), the
        batch is rolled back and written again with a savepoint per fact, so that one fact
        is refused and the others are written."""
        conn = await self.database.get()
        try:
            try:
                async with conn.transaction(), conn.pipeline():
                    facts = [item for item in read_out if isinstance(item, Fact)]
                    new = await store.new_facts(conn, facts)  # one round trip for the batch
                    outcomes = [await self._apply(conn, item, new=new) for item in read_out]
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                logs.event(log, "record.batch_retried", logging.WARNING, error=str(exc)[:300])
                async with conn.transaction():
                    outcomes = [await self._apply(conn, item) for item in read_out]
        except psycopg.OperationalError as exc:
            await self.database.lost(exc)
            raise unavailable(exc) from exc
        return outcomes

    async def _apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        item: Fact | Refused,
        *,
        new: dict[bytes, int] | None = None,
    ) -> tuple[str, str]:
        if isinstance(item, Refused):
            await store.count_refusal(conn, item.reason, item.detail)
            return "refused", f"{item.reason}: {item.detail}"
        if new is not None:  # the fast path: any error rolls the whole batch back (see _commit)
            written = await store.write(conn, item, atomic=False, new=new)
            return ("written" if written else "repeated"), ""
        try:
            written = await store.write(conn, item)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            # The fact's savepoint is rolled back; the batch goes on without it.
            log.exception("event=record.write_failed kind=%s", type(item.payload).__name__)
            await store.count_refusal(conn, "write_failed", str(exc))
            return "refused", f"write_failed: {exc}"
        return ("written" if written else "repeated"), ""

    async def _settle(
        self, message: AbstractIncomingMessage, kind: str, detail: str, appended: bool
    ) -> None:
        if kind == "refused":
            self.counts.refused += 1
            copy = aio_pika.Message(
                message.body,
                headers={
                    **(message.headers or {}),
                    REFUSED_REASON_HEADER: detail[:1000],
                    "wayang-refused-from": f"{message.exchange} {message.routing_key}",
                },
                message_id=message.message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            send = Send("", names.RECORD_REFUSED_QUEUE, copy, if_unconfirmed=None)
            line = LogLine(
                "record.refused",
                logging.WARNING,
                {"id": message.message_id, "key": message.routing_key, "reason": detail[:200]},
            )
            await settle(message, done(message.message_id or "", send, log=line), self.publisher)
            return
        if kind == "written":
            self.counts.written += 1
        else:
            self.counts.repeated += 1
        if not appended:  # not in the history yet: it comes again, and is appended then
            await settle(message, requeue(message.message_id, "history not appended"))
            return
        await settle(message, discard(message.message_id), self.publisher)
