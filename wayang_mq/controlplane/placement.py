"""Discovery and placement: which live executors may run a task, and sending it to one.

:func:`select` reads the registry (``executors``, kept by registrations and heartbeats): live
executors that serve the capability and meet the task's policy (a named executor, labels such
as ``region`` and ``trust_domain``: :mod:`wayang_mq.core.placement`), least loaded first, then
the most recently seen.

:class:`Placer` is the control plane's consumer of ``wayang.place``, where clients publish
tasks whose policy needs particular executors (routing key ``place.<capability>``, and their
retries come due). Each task is verified as a worker would verify it, then either forwarded,
the issuer's bytes and headers unchanged, to the chosen executor's own queue (routing key
``executor.<id>``), or, when no live executor meets the policy, answered FAILED
``no_executor`` with the reason, signed as ``control-plane:<id>``, at its reply address. The
delivery is acked only once the broker confirmed what it became. Placement keeps no state:
every control plane instance consumes ``wayang.place`` (it is not single-active).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
import psycopg
from aio_pika.abc import AbstractIncomingMessage

from wayang_mq.amqp.outcome import Kind, LogLine, Outcome, Send, Settle, discard, done, requeue
from wayang_mq.amqp.outcome import settle as settle_delivery
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.controlplane.config import Host
from wayang_mq.controlplane.db import connect_async
from wayang_mq.core import logs, names
from wayang_mq.core.authority import DECIDED_BY_CONTROL_PLANE
from wayang_mq.core.envelope import TaskChecks, open_task
from wayang_mq.core.errors import DatabaseUnavailable, ErrorCode, WireError
from wayang_mq.core.model import ErrorInfo, PolicyConstraints, Result, Task
from wayang_mq.core.placement import CAPABILITY_HEADER, has, needs, unmet
from wayang_mq.core.signing import Signer
from wayang_mq.core.wire import signed_message

log = logging.getLogger("wayang_mq.controlplane.placement")

_SHOWN = 10  # live executors a no_executor reason lists at most


@dataclass(frozen=True, slots=True)
class Choice:
    """A live executor that may run the task, with what ranked it."""

    executor_id: str
    load: float  # in flight / concurrency, from its last heartbeat
    last_seen: datetime
    labels: dict[str, str] = field(default_factory=dict)  # its registration's metadata


async def candidates(conn: psycopg.AsyncConnection[Any], capability: str) -> list[Choice]:
    """Live executors serving ``capability``, least loaded first, then most recently seen."""
    cur = await conn.execute(
        "SELECT executor_id, load, last_seen, metadata FROM executors"
        " WHERE state = 'live' AND %s = ANY(capabilities)"
        " ORDER BY load ASC, last_seen DESC, executor_id",
        (capability,),
    )
    return [
        Choice(row[0], float(row[1]), row[2], {str(k): str(v) for k, v in (row[3] or {}).items()})
        for row in await cur.fetchall()
    ]


def matching(live: list[Choice], policy: PolicyConstraints) -> list[Choice]:
    """The candidates that meet the policy, in their rank order."""
    return [c for c in live if not unmet(policy, c.executor_id, c.labels)]


async def select(
    conn: psycopg.AsyncConnection[Any], capability: str, policy: PolicyConstraints
) -> list[Choice]:
    """Live executors matching the capability and the policy, best first (empty: none)."""
    return matching(await candidates(conn, capability), policy)


def reason(capability: str, policy: PolicyConstraints, live: list[Choice]) -> str:
    """Why no executor was chosen: ``no live executor of demo.echo has region=eu; live: w1
    (region=us)``."""
    if not live:
        return f"no live executor serves {capability}"
    keys = sorted(policy.labels)
    shown = [f"{c.executor_id} ({has(c.labels, keys)})" if keys else c.executor_id for c in live]
    more = f" and {len(live) - _SHOWN} more" if len(live) > _SHOWN else ""
    return (
        f"no live executor of {capability} has {needs(policy)}; "
        f"live: {', '.join(shown[:_SHOWN])}{more}"
    )


class Placer:
    """Consumes ``wayang.place`` for one control plane: forwards or answers each task."""

    def __init__(self, daemon: Host, signer: Signer) -> None:
        self._daemon = daemon
        self._signer = signer
        config = daemon.config
        self._decided_by = f"{DECIDED_BY_CONTROL_PLANE}{config.control_plane_id}"
        self._checks = TaskChecks(audience=config.audience, max_body_bytes=config.max_body_bytes)
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._connecting = asyncio.Lock()
        #: outcomes since start (metrics): placed, answered (not placed), refused, requeued
        self.counts: Counter[str] = Counter()

    @classmethod
    async def start(cls, daemon: Host) -> Placer | None:
        """Consume ``wayang.place``; without a signing key there is no answering, so none."""
        if daemon.config.signer is None:
            logs.event(log, "placement.disabled", logging.WARNING, reason="no signing key")
            return None
        placer = cls(daemon, daemon.config.signer)
        await daemon.consume(
            names.PLACE_QUEUE, placer.received, hint="run `wayang-mq topology apply`"
        )
        return placer

    async def close(self) -> None:
        """Close its database connection."""
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()

    async def received(self, message: AbstractIncomingMessage) -> None:
        """One task: placed, answered, or (database away, a bug) given back after a pause."""
        try:
            outcome = await self._decide(message)
        except asyncio.CancelledError:
            raise
        except (DatabaseUnavailable, psycopg.OperationalError) as exc:
            await self.close()
            self._db = None
            logs.event(log, "placement.database_unavailable", logging.WARNING, error=str(exc))
            await asyncio.sleep(1)  # so a database that stays away does not spin the queue
            outcome = requeue(message.message_id, "database unavailable")
        except Exception:
            log.exception("event=placement.bug id=%s next=requeued", message.message_id)
            await asyncio.sleep(1)
            outcome = requeue(message.message_id, "a bug in placement (logged above)")
        applied = await settle_delivery(message, outcome, self._daemon.publisher)
        self.counts[_placement_outcome(applied)] += 1

    async def _decide(self, message: AbstractIncomingMessage) -> Outcome:
        try:
            task = open_task(
                message.body, message.headers or {}, self._daemon.config.keyring, self._checks
            ).task
        except WireError as exc:
            if isinstance(exc.task, Task):  # verified, refused all the same (its deadline)
                return self._answer(exc.task, exc.code or ErrorCode.INVALID_TASK, exc.message)
            # The record (bound to place.# too) counts it and sets it aside with the reason.
            line = LogLine("placement.refused", logging.WARNING, {"reason": exc.message[:200]})
            return discard(message.message_id, line)
        live = await candidates(await self._database(), task.capability)
        chosen = matching(live, task.policy)
        if not chosen:
            return self._answer(
                task, ErrorCode.NO_EXECUTOR, reason(task.capability, task.policy, live)
            )
        return self._forward(message, task, chosen)

    def _forward(
        self, message: AbstractIncomingMessage, task: Task, chosen: list[Choice]
    ) -> Outcome:
        """The issuer's bytes and headers (signature, attempt record) to the first chosen
        executor's queue; to the next if that one has no queue, answered when none has."""
        choice = chosen[0]
        headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith("x-")}
        headers[CAPABILITY_HEADER] = task.capability
        # No expiration: a copy that waits past its deadline is refused and answered by the
        # worker (token_expired), where an expired one would vanish unanswered.
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            type=message.type,
            timestamp=message.timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        key = names.executor_routing_key(choice.executor_id)
        send = Send(names.TASKS_EXCHANGE, key, copy, mandatory=True)
        fields = {"executor": choice.executor_id, "load": choice.load}

        async def unroutable() -> Outcome:
            if len(chosen) > 1:
                return self._forward(message, task, chosen[1:])
            why = f"executor {choice.executor_id} was chosen but has no queue bound to {key}"
            return self._answer(task, ErrorCode.NO_EXECUTOR, why)

        line = LogLine("task.placed", fields=fields)
        return Outcome(
            Kind.DONE, Settle.ACK, task.task_id, (send,), log=line, if_unroutable=unroutable
        )

    def _answer(self, task: Task, code: ErrorCode, why: str) -> Outcome:
        """FAILED at the task's reply address, signed as control-plane:<id>."""
        result = Result.failure(task, self._decided_by, ErrorInfo(code=code, message=why))
        key = task.reply_to
        if not names.valid_reply_address(key):
            key = names.noreply_routing_key(task.capability)
        signed = signed_message(result, self._signer, message_id=task.task_id, reply_to=key)
        line = LogLine("task.not_placed", logging.WARNING, {"reason": why[:300]})
        send = Send(names.RESULTS_EXCHANGE, key, to_amqp(signed))
        return done(task.task_id, send, result=result, log=line)

    async def _database(self) -> psycopg.AsyncConnection[Any]:
        async with self._connecting:  # one connection, however many tasks arrive at once
            if self._db is None or self._db.closed:
                url = self._daemon.config.database_url
                self._db = await connect_async(url, autocommit=True)
            return self._db


def _placement_outcome(applied: Outcome) -> str:
    """What became of a task sent for placement, in one word (metrics)."""
    if applied.result is not None:
        return "answered"  # FAILED at its reply address: no executor, or refused verified
    return {Kind.DONE: "placed", Kind.DISCARD: "refused"}.get(applied.kind, "requeued")
