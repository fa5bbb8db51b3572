"""Claims, the control plane's side: one run per task id across the fleet, cancels that
outlive the broadcast, and duplicates answered from the record.

Workers started with ``--claims`` ask before they run a task (see
:mod:`wayang_mq.runtime.claims`): a signed :class:`~wayang_mq.core.model.Claim` on
``wayang.claims`` (``wayang.control``, ``claim.<capability>``). Each is decided in one
transaction (:func:`decide`) and answered, signed, to ``claim-reply.<executor>``:

1. a cancel recorded for the task by its issuer: ``cancelled``;
2. the record holds this attempt (or a later one) with another token, or the task finished
   with this token and this copy is no reissue, or the record marks this copy a duplicate
   publish: ``duplicate``;
3. the first claim of the (task id, attempt): it is held, ``run`` (the task and attempt rows
   say running there);
4. a later claim: another token is a ``duplicate``; the holder asking again runs; another
   executor runs only if the broker redelivered the copy (it does so only once the holder's
   channel closed: the holder is gone) or the copy is a reissue of the same token (a dead
   letter replayed): it takes the claim over. Anything else is a ``duplicate``.

A claim may come before the record has the task (its tap and the claim race): it is then
decided from the claims table alone, and the first claim wins.

Several control planes may consume ``wayang.claims`` at once: the claims table's primary key
and row locks make them agree. While PostgreSQL is down a claim is held and retried; the
worker does not wait for it (it runs the task after its claim timeout), and the claim is
recorded when the database is back.

Duplicates are answered from the record: when the store records a duplicate copy of a
finished task, or a task finishes that has unanswered duplicate copies,
:func:`answer_duplicates` writes the winning result, re-addressed to the copy's token and
reply address and signed by the control plane as ``control-plane:<id>``, into ``outbox``
(published by the control plane's outbox loop) and marks the copy answered, in the same
transaction as the fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import psycopg
from aio_pika.abc import AbstractIncomingMessage
from psycopg.types.json import Jsonb
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from wayang_mq.amqp.outcome import discard, settle
from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp
from wayang_mq.controlplane.config import ControlPlaneConfig, Host
from wayang_mq.controlplane.db import DatabaseUnavailable, connect_async, unavailable
from wayang_mq.core import logs, names
from wayang_mq.core.authority import DECIDED_BY_CONTROL_PLANE, check_executor_event
from wayang_mq.core.errors import WayangError
from wayang_mq.core.model import Claim, ClaimReply, ClaimVerdict, Result, Task
from wayang_mq.core.signing import Signer
from wayang_mq.core.wire import decode, open_signed, signed_message

log = logging.getLogger("wayang_mq.controlplane.claims")

Conn = psycopg.AsyncConnection[Any]
Verdict = tuple[ClaimVerdict, str]


@dataclass(frozen=True, slots=True)
class Answering:
    """Who answers duplicates from the record: the control plane's key and id."""

    signer: Signer
    control_plane_id: str

    @property
    def executor_id(self) -> str:
        """What its answers name as their executor (``check_result`` accepts it)."""
        return f"{DECIDED_BY_CONTROL_PLANE}{self.control_plane_id}"


#: set by :func:`start` in the daemon's task, so the record's writer (started after it)
#: answers duplicates; unset (a rebuild, a control plane without a key): none are answered
ANSWERING: ContextVar[Answering | None] = ContextVar("wayang_answering", default=None)


# -- the control plane's hook -----------------------------------------------------------------


async def start(cp: Host) -> ClaimDesk | None:
    """Answer duplicates with the control plane's key and consume ``wayang.claims``; called
    from the daemon's ``start`` before its writer starts. Without a key nothing is signed."""
    config = cp.config
    if config.signer is None:
        logs.event(log, "claims.off", logging.WARNING, why="the control plane has no key")
        return None
    ANSWERING.set(Answering(config.signer, config.control_plane_id))
    desk = ClaimDesk(config, lambda: cp.publisher)
    await cp.consume(names.CLAIMS_QUEUE, desk.handle, hint="run `wayang-mq topology apply`")
    return desk


async def stop(desk: ClaimDesk | None) -> None:
    """Close the desk's database connection (the daemon's teardown)."""
    if desk is not None:
        await desk.close()


@dataclass
class ClaimCounts:
    """Verdicts given since start (health, tests)."""

    run: int = 0
    duplicate: int = 0
    cancelled: int = 0
    refused: int = 0  # claims that did not verify
    database_retries: int = 0

    def count(self, verdict: ClaimVerdict) -> None:
        """One more of ``verdict``."""
        if verdict is ClaimVerdict.RUN:
            self.run += 1
        elif verdict is ClaimVerdict.DUPLICATE:
            self.duplicate += 1
        else:
            self.cancelled += 1


class ClaimDesk:
    """Consumes claims, decides each in one transaction, answers the executor."""

    def __init__(
        self, config: ControlPlaneConfig, publisher: Callable[[], ConfirmedPublisher]
    ) -> None:
        self.config = config
        self.publisher = publisher
        self.counts = ClaimCounts()
        # one connection, one claim at a time: a decision is a few indexed statements
        self._db: Conn | None = None
        self._lock = asyncio.Lock()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Verify, decide (waiting for the database if it is down), answer, ack."""
        try:
            headers = message.headers or {}
            claim, signer = open_signed(message.body, headers, self.config.keyring, Claim)
            check_executor_event(signer, claim.executor_id, (claim.capability,))
        except WayangError as exc:
            self.counts.refused += 1
            logs.event(log, "claim.refused", logging.WARNING, code=exc.code, error=exc)
            await settle(message, discard(message.message_id))
            return
        verdict, reason = await self._decide(claim)
        self.counts.count(verdict)
        await self._answer(claim, verdict, reason)
        await settle(message, discard(claim.task_id))

    async def close(self) -> None:
        """Close the database connection."""
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()
            self._db = None

    async def _answer(self, claim: Claim, verdict: ClaimVerdict, reason: str) -> None:
        assert self.config.signer is not None  # start() consumes only with a key
        reply = ClaimReply(
            task_id=claim.task_id,
            attempt=claim.attempt,
            token=claim.token,
            verdict=verdict,
            reason=reason,
        )
        signed = signed_message(reply, self.config.signer, message_id=claim.task_id)
        logs.event(
            log,
            "claim.decided",
            logging.DEBUG,
            task_id=claim.task_id,
            attempt=claim.attempt,
            executor=claim.executor_id,
            verdict=verdict,
            why=reason,
        )
        try:
            # Not mandatory: a worker that stopped meanwhile has no queue, and needs no answer.
            await self.publisher().publish_once(
                names.CONTROL_EXCHANGE,
                names.claim_reply_key(claim.executor_id),
                to_amqp(signed, persistent=False),
            )
        except WayangError as exc:
            # The claim is recorded; the worker runs the task after its claim timeout.
            logs.event(log, "claim.unanswered", logging.WARNING, task_id=claim.task_id, error=exc)

    async def _decide(self, claim: Claim) -> Verdict:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(DatabaseUnavailable),
            wait=wait_exponential(multiplier=0.2, max=self.config.retry_max_s),
            reraise=True,
        ):
            with attempt:
                async with self._lock:
                    return await self._decide_once(claim)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _decide_once(self, claim: Claim) -> Verdict:
        try:
            if self._db is None or self._db.closed:
                self._db = await connect_async(self.config.database_url, autocommit=True)
            async with self._db.transaction():
                return await decide(self._db, claim)
        except DatabaseUnavailable:
            self.counts.database_retries += 1
            raise
        except psycopg.OperationalError as exc:
            self.counts.database_retries += 1
            logs.event(log, "database.lost", logging.WARNING, error=str(exc), next="retrying")
            await self.close()
            raise unavailable(exc) from exc


# -- deciding -------------------------------------------------------------------------------


async def decide(conn: Conn, c: Claim) -> Verdict:
    """The verdict on one claim (inside the caller's transaction), with the reason."""
    cancelled = await _cancelled(conn, c)
    if cancelled is not None:
        return ClaimVerdict.CANCELLED, cancelled
    recorded = await _against_record(conn, c)
    if recorded is not None:
        return ClaimVerdict.DUPLICATE, recorded
    cur = await conn.execute(
        "INSERT INTO claims (task_id, attempt, token, executor_id, issued_at_ms)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (task_id, attempt) DO NOTHING RETURNING 1",
        (c.task_id, c.attempt, c.token, c.executor_id, c.issued_at_ms),
    )
    if await cur.fetchone() is not None:
        await _running(conn, c)
        return ClaimVerdict.RUN, "first claim"
    cur = await conn.execute(
        "SELECT token, executor_id, issued_at_ms FROM claims"
        " WHERE task_id = %s AND attempt = %s FOR UPDATE",
        (c.task_id, c.attempt),
    )
    row = await cur.fetchone()
    assert row is not None  # the insert conflicted with it, and claims are never deleted
    token, holder, issued_at_ms = row
    if token != c.token:
        return ClaimVerdict.DUPLICATE, f"attempt {c.attempt} is claimed with another token"
    if holder == c.executor_id and c.issued_at_ms <= issued_at_ms:
        return ClaimVerdict.RUN, "claimed here before"
    if c.redelivered or c.issued_at_ms > issued_at_ms:
        await conn.execute(
            "UPDATE claims SET executor_id = %s, issued_at_ms = greatest(issued_at_ms, %s),"
            " claimed_at = now(), taken_over = taken_over + (executor_id <> %s)::int"
            " WHERE task_id = %s AND attempt = %s",
            (c.executor_id, c.issued_at_ms, c.executor_id, c.task_id, c.attempt),
        )
        await _running(conn, c)
        why = "redelivered" if c.redelivered else "reissued"
        return ClaimVerdict.RUN, f"{why}: taken over from {holder}"
    return ClaimVerdict.DUPLICATE, f"attempt {c.attempt} is claimed by {holder}"


async def _cancelled(conn: Conn, c: Claim) -> str | None:
    """The reason of a cancel recorded for the task by its issuer, not yet forgotten. A
    dispatcher cancels only tasks it issued (as itself or one of its ``--`` instances); a
    cancel under another name is left to the executors' broadcast check."""
    cur = await conn.execute(
        "SELECT requester, reason FROM cancels WHERE task_id = %s AND forget_at > now()",
        (c.task_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    requester, reason = row
    if not c.issuer or (requester != c.issuer and not requester.startswith(f"{c.issuer}--")):
        return None
    return str(reason or f"cancelled by {requester}")


async def _against_record(conn: Conn, c: Claim) -> str | None:
    """Why the record says this copy must not run, if it does."""
    cur = await conn.execute(
        "SELECT token, attempt, state, (extract(epoch FROM issued_at) * 1000)::bigint"
        " FROM tasks WHERE task_id = %s",
        (c.task_id,),
    )
    task = await cur.fetchone()
    if task is not None:
        token, attempt, state, issued_at_ms = task
        if token != c.token and c.attempt <= attempt:
            # a duplicate publish, or an attempt reassigned since (a later one has its token)
            return f"the record holds attempt {attempt} of this task with another token"
        if state == "finished" and token == c.token and c.issued_at_ms <= issued_at_ms:
            return "finished: its answer was sent"
    cur = await conn.execute(
        "SELECT 1 FROM task_copies WHERE task_id = %s AND token = %s AND duplicate",
        (c.task_id, c.token),
    )
    if await cur.fetchone() is not None:
        return "a duplicate publish of the task id"
    return None


async def _running(conn: Conn, c: Claim) -> None:
    """The record shows the attempt running on the claiming executor."""
    await conn.execute(
        "UPDATE tasks SET state = 'running', executor_id = %s WHERE task_id = %s"
        " AND attempt = %s AND token = %s AND state IN ('queued', 'retrying', 'running')",
        (c.executor_id, c.task_id, c.attempt, c.token),
    )
    await conn.execute(
        "UPDATE attempts SET state = 'running', executor_id = %s,"
        " started_at = coalesce(started_at, now()) WHERE task_id = %s AND attempt = %s"
        " AND token = %s AND state IN ('queued', 'retrying', 'running')",
        (c.executor_id, c.task_id, c.attempt, c.token),
    )


# -- answering duplicates from the record (called by the store) -------------------------------


async def duplicate_recorded(conn: Conn, copy: Task, sha: bytes) -> int:
    """The store recorded ``copy`` as a duplicate: keep its node (its answer names it) and
    answer it now if the task has finished."""
    await conn.execute(
        "UPDATE task_copies SET node_id = %s WHERE task_id = %s AND body_sha256 = %s",
        (copy.node_id, copy.task_id, sha),
    )
    return await answer_duplicates(conn, copy.task_id)


async def answer_duplicates(conn: Conn, task_id: str) -> int:
    """Answer the task's unanswered duplicate copies with its winning result, if it has one:
    outbox rows, written in the caller's transaction. Returns how many."""
    answering = ANSWERING.get()
    if answering is None:
        return 0
    cur = await conn.execute(
        "SELECT body_sha256, token, reply_to, node_id FROM task_copies"
        " WHERE task_id = %s AND duplicate AND NOT answered FOR UPDATE",
        (task_id,),
    )
    copies = await cur.fetchall()
    if not copies:  # the common case: nothing to answer, no result to read
        return 0
    cur = await conn.execute(
        "SELECT body FROM results WHERE task_id = %s AND verdict = 'won'", (task_id,)
    )
    won_row = await cur.fetchone()
    if won_row is None:
        return 0
    won = decode(bytes(won_row[0]), Result)
    for sha, token, reply_to, node_id in copies:
        await _outbox_answer(conn, answering, won, token, reply_to, node_id or won.node_id)
        await conn.execute(
            "UPDATE task_copies SET answered = true WHERE task_id = %s AND body_sha256 = %s",
            (task_id, sha),
        )
    return len(copies)


async def _outbox_answer(
    conn: Conn, answering: Answering, won: Result, token: str, reply_to: str, node_id: str
) -> None:
    """The winning result for a duplicate copy: its token and node, the control plane as
    its executor."""
    answer = Result(
        task_id=won.task_id,
        token=token,
        node_id=node_id,
        capability=won.capability,
        status=won.status,
        executor_id=answering.executor_id,
        attempt=won.attempt,
        output=won.output,
        error=won.error,
    )
    message = signed_message(answer, answering.signer, message_id=won.task_id)
    # Only a reply address takes an answer (the control plane's account may publish nowhere
    # else on wayang.results); any other reply_to is answered at noreply.<cap>.
    valid = reply_to and names.valid_reply_address(reply_to)
    routing_key = reply_to if valid else names.noreply_routing_key(won.capability)
    await conn.execute(
        "INSERT INTO outbox (exchange, routing_key, body, headers, message_id, type)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (
            names.RESULTS_EXCHANGE,
            routing_key,
            message.body,
            Jsonb(dict(message.headers)),
            won.task_id,
            Result.wire_type,
        ),
    )
    logs.event(log, "duplicate.answered", task_id=won.task_id, token=token, key=routing_key)
