"""Liveness: executors that stop heartbeating are marked lost, and their tasks re-dispatched.

The dispatcher watches its own tasks (:mod:`wayang_mq.client.supervisor`), but a task whose
dispatcher is gone has nobody watching it. The control plane has every executor's last
heartbeat and every task's state in its record, so it watches them all: every
``check_interval_s`` one sweep, in one transaction,

* marks ``lost`` every live executor whose last heartbeat was written more than
  ``lost_after_s`` ago (a heartbeat makes it live again);
* re-dispatches the tasks running on a lost executor that the broker will not give back:
  those answered PENDING (acked at start: a long-running task), and those whose issuer asked
  for heartbeat supervision (``heartbeat_timeout_ms``: a hung executor keeps its connection,
  so the broker keeps its delivery). Other tasks of a dead executor come back from the broker
  when its connection closes; re-dispatching them too would run them twice. Tasks pinned to
  that executor (``policy.executor_id``), cancelled ones, and those at their issuer's
  ``max_attempts`` are not re-dispatched: their attempt is recorded lost and the control
  plane answers them FAILED (``executor_error``, or ``cancelled``), so none waits forever.

A re-dispatch is the issuer's signed task, byte for byte, with an attempt record signed by
the control plane: the next attempt, a fresh queue window, and a new token, so the lost
attempt's late result is fenced. The record is updated and the messages are put in the
outbox (:mod:`wayang_mq.controlplane.outbox`) in that same transaction: first a notice to
the task's reply address (the record alone, ``wayang.attempt.v1``, so a dispatcher still
alive accepts the new token), then the task to ``wayang.tasks``.

Several instances may sweep: ``pg_try_advisory_xact_lock`` lets one sweep at a time, and the
sweep reads and changes rows under that lock, so no task is re-dispatched twice.

A known limit: ``last_seen`` is when a heartbeat was *written*. A record that stops being
written (PostgreSQL away, every instance down) and then catches up may mark a live executor
lost before its queued heartbeats are written; its task then runs again, and the first
attempt's result is fenced. Nothing is lost; some work is done twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from wayang_mq.amqp.publisher import ConfirmedPublisher
from wayang_mq.controlplane import outbox
from wayang_mq.controlplane.db import DatabaseUnavailable, connect_async
from wayang_mq.core import logs, names, placement
from wayang_mq.core.authority import DECIDED_BY_CONTROL_PLANE
from wayang_mq.core.envelope import attempt_headers
from wayang_mq.core.errors import ConfigError, ErrorCode, WireError
from wayang_mq.core.model import AttemptRecord, ErrorInfo, Result, Task, new_id, now_ms
from wayang_mq.core.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Signer
from wayang_mq.core.wire import PARTITION_KEY_HEADER, WireMessage, decode, signed_message

log = logging.getLogger("wayang_mq.controlplane.supervision")

Conn = psycopg.AsyncConnection[Any]
T = TypeVar("T")

#: pg advisory lock of the sweep (any constant of our own; the outbox has another)
SWEEP_LOCK = 0x7761_7961_6E67_0001


@dataclass(frozen=True)
class SupervisionConfig:
    """How closely the control plane watches executors."""

    check_interval_s: float = 5.0
    lost_after_s: float = 15.0  # three missed heartbeats at the workers' default 5 s
    publish_interval_s: float = 1.0  # how often the outbox is looked at besides after a sweep

    def __post_init__(self) -> None:
        if min(self.check_interval_s, self.lost_after_s, self.publish_interval_s) <= 0:
            raise ConfigError("supervision intervals must be positive")


@dataclass(frozen=True)
class Swept:
    """What one sweep did."""

    lost: tuple[str, ...] = ()  # executors marked lost
    redispatched: tuple[tuple[str, int], ...] = ()  # (task id, new attempt)
    abandoned: tuple[str, ...] = ()  # tasks whose lost attempt was not re-dispatched


_ORPHANS = """
SELECT t.task_id, t.attempt, t.max_attempts, t.executor_id, t.body, t.key_header,
       t.signature_header, t.cancel_requested_at IS NOT NULL, t.token
FROM tasks t JOIN executors e ON e.executor_id = t.executor_id
WHERE e.state = 'lost' AND t.state IN ('running', 'pending')
  AND (t.heartbeat_timeout_ms IS NOT NULL OR t.state = 'pending')
  AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.task_id = t.task_id
                  AND a.attempt = t.attempt AND a.state = 'lost')
ORDER BY t.task_id
FOR UPDATE OF t
"""


async def sweep(conn: Conn, config: SupervisionConfig, signer: Signer, decider: str) -> Swept:
    """One sweep in one transaction (``conn`` autocommit); an empty result when another
    instance holds the sweep."""
    lines: list[tuple[str, dict[str, Any]]] = []
    async with conn.transaction():
        cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (SWEEP_LOCK,))
        got = await cur.fetchone()
        if got is None or not got[0]:
            return Swept()
        cur = await conn.execute(
            "UPDATE executors SET state = 'lost', lost_at = now() WHERE state = 'live'"
            " AND last_seen < now() - make_interval(secs => %s) RETURNING executor_id",
            (config.lost_after_s,),
        )
        lost = tuple(str(r[0]) for r in await cur.fetchall())
        lines += [("executor.lost", {"executor": executor}) for executor in lost]
        cur = await conn.execute(_ORPHANS)
        for row in await cur.fetchall():
            lines.append(await _orphan(conn, row, signer, decider))
    for name, fields in lines:  # logged once committed: a sweep rolled back did nothing
        logs.event(log, name, logging.WARNING, **fields)
    redispatched = tuple(
        (str(f["task_id"]), int(f["attempt"])) for n, f in lines if n == "task.redispatched"
    )
    abandoned = tuple(str(f["task_id"]) for n, f in lines if n == "task.lost")
    return Swept(lost, redispatched, abandoned)


async def _orphan(
    conn: Conn, row: tuple[Any, ...], signer: Signer, decider: str
) -> tuple[str, dict[str, Any]]:
    """Record a lost executor's task's attempt lost, and re-dispatch it if it may be."""
    task_id, attempt, max_attempts, executor, body, key_id, signature, cancelled, token = row
    body = bytes(body)
    await _lose(conn, task_id, attempt)
    why = _why_not(body, attempt, max_attempts, cancelled)
    if why is not None:
        if why != _UNDECODABLE:  # nobody else will answer it: the control plane does
            current = decode(body, Task).model_copy(update={"attempt": attempt, "token": token})
            await _answer_lost(conn, current, executor, why, cancelled, (signer, decider))
        return "task.lost", {"task_id": task_id, "executor": executor, "why": why}
    issued = decode(body, Task)
    await _redispatch(conn, issued, attempt + 1, (body, key_id, signature), signer, decider)
    return "task.redispatched", {
        "task_id": task_id,
        "lost_executor": executor,
        "attempt": attempt + 1,
    }


def _why_not(body: bytes, attempt: int, max_attempts: int, cancelled: bool) -> str | None:
    """Why a lost attempt is not re-dispatched, or None when it is."""
    if cancelled:
        return "cancelled"
    if attempt >= max_attempts:
        return f"attempt {attempt} is the issuer's max_attempts"
    try:
        if decode(body, Task).policy.executor_id is not None:
            return "pinned to its executor (policy.executor_id)"
    except WireError:
        return _UNDECODABLE
    return None


_UNDECODABLE = "its recorded body does not decode"


async def _answer_lost(
    conn: Conn, task: Task, executor: str, why: str, cancelled: bool, me: tuple[Signer, str]
) -> None:
    """A task whose executor was lost and that may not run again ends FAILED, answered by
    the control plane (``control-plane:<id>``) at its reply address, so no task is left
    waiting on an executor that is gone."""
    if cancelled:
        error = ErrorInfo(code=ErrorCode.CANCELLED, message=f"cancelled; executor {executor} lost")
    else:
        error = ErrorInfo(
            code=ErrorCode.EXECUTOR_ERROR,
            message=f"executor {executor} was lost (no heartbeat) running attempt "
            f"{task.attempt}, and the task is not re-dispatched: {why}",
            retryable=True,
        )
    signer, control_plane_id = me
    result = Result.failure(task, f"{DECIDED_BY_CONTROL_PLANE}{control_plane_id}", error)
    key = task.reply_to if names.valid_reply_address(task.reply_to) else None
    message = signed_message(result, signer, message_id=task.task_id)
    await outbox.put(
        conn, names.RESULTS_EXCHANGE, key or names.noreply_routing_key(task.capability), message
    )


async def _lose(conn: Conn, task_id: str, attempt: int) -> None:
    await conn.execute(
        "UPDATE attempts SET state = 'lost' WHERE task_id = %s AND attempt = %s"
        " AND state <> 'finished'",
        (task_id, attempt),
    )


async def _redispatch(
    conn: Conn,
    issued: Task,
    attempt: int,
    signed: tuple[bytes, str, str],
    signer: Signer,
    decider: str,
) -> None:
    """Record attempt ``attempt`` queued with a new token; its notice and task to the outbox."""
    token = new_id()
    record = AttemptRecord(
        task_id=issued.task_id,
        attempt=attempt,
        deadline_ms=now_ms() + issued.queue_window_ms,
        executor_id=decider,
        token=token,
    )
    await conn.execute(
        "INSERT INTO attempts (task_id, attempt, token, state, queued_at, decided_by)"
        " VALUES (%s, %s, %s, 'queued', now(), %s) ON CONFLICT (task_id, attempt) DO NOTHING",
        (issued.task_id, attempt, token, decider),
    )
    await conn.execute(
        "UPDATE tasks SET attempt = %s, token = %s, deadline_at = to_timestamp(%s / 1000.0),"
        " state = 'queued', executor_id = NULL WHERE task_id = %s",
        (attempt, token, record.deadline_ms, issued.task_id),
    )
    if issued.reply_to and names.valid_reply_address(issued.reply_to):
        notice = signed_message(record, signer, message_id=issued.task_id)
        await outbox.put(conn, names.RESULTS_EXCHANGE, issued.reply_to, notice)
    task = _task(issued, record, signed, signer)
    # a placed task goes back through placement (its policy still holds)
    await outbox.put(conn, names.TASKS_EXCHANGE, placement.routing_key(issued), task)


def _task(
    issued: Task, record: AttemptRecord, signed: tuple[bytes, str, str], signer: Signer
) -> WireMessage:
    """The issuer's bytes and signature, with the control plane's attempt record."""
    body, key_id, signature = signed
    headers: dict[str, Any] = {
        KEY_ID_HEADER: key_id,
        SIGNATURE_HEADER: signature,
        PARTITION_KEY_HEADER: issued.partition_key or issued.task_id,
        **attempt_headers(record, signer),
    }
    return WireMessage(
        body=body,
        type=Task.wire_type,
        message_id=issued.task_id,
        correlation_id=issued.task_id,
        timestamp_s=now_ms() // 1000,
        reply_to=issued.reply_to or None,
        headers=headers,
    )


class Supervision:
    """The control plane's sweep and outbox loops, each on a database connection of its own
    (a sweep's transaction must not take in the outbox's deletes)."""

    def __init__(
        self,
        config: SupervisionConfig,
        database_url: str,
        signer: Signer,
        decider: str,
        publisher: ConfirmedPublisher,
    ) -> None:
        self._config = config
        self._database_url = database_url
        self._signer = signer
        self._decider = decider  # the control plane's id: its key must speak for it
        self._publisher = publisher
        self._conns: dict[str, Conn] = {}
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self.redispatched = 0
        self.lost = 0  # executors this instance marked lost

    def start(self) -> None:
        """Start sweeping and publishing."""
        self._loops = [
            asyncio.create_task(self._sweep_loop()),
            asyncio.create_task(self._outbox_loop()),
        ]

    async def stop(self) -> None:
        """Stop both loops; close their connections."""
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                await conn.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.check_interval_s)
            swept = await self._guarded(
                "sweep", lambda conn: sweep(conn, self._config, self._signer, self._decider)
            )
            if swept is not None:
                self.lost += len(swept.lost)
            if swept is not None and swept.redispatched:
                self.redispatched += len(swept.redispatched)
                self._wake.set()

    async def _outbox_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.publish_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            await self._guarded("outbox", lambda conn: outbox.publish(conn, self._publisher))

    async def _guarded(self, name: str, work: Callable[[Conn], Awaitable[T]]) -> T | None:
        """Run ``work`` on the loop's connection; a database that is away is logged and
        tried again next round (nothing was committed)."""
        try:
            conn = self._conns.get(name)
            if conn is None or conn.closed:
                conn = await connect_async(self._database_url, autocommit=True)
                self._conns[name] = conn
            return await work(conn)
        except (DatabaseUnavailable, psycopg.OperationalError) as exc:
            logs.event(log, "supervision.database_unavailable", logging.WARNING, error=str(exc))
            stale = self._conns.pop(name, None)
            if stale is not None:
                with contextlib.suppress(Exception):
                    await stale.close()
            return None


def supervise(
    config: SupervisionConfig | None,
    signer: Signer | None,
    database_url: str,
    decider: str,
    publisher: ConfirmedPublisher,
) -> Supervision | None:
    """Start watching executors, unless configured off (a re-dispatch is signed by the
    control plane: without its key there is none)."""
    if config is None:
        return None
    if signer is None:
        logs.event(log, "supervision.off", logging.WARNING, reason="the control plane has no key")
        return None
    supervision = Supervision(config, database_url, signer, decider, publisher)
    supervision.start()
    return supervision
