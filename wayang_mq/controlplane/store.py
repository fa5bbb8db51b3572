"""Writing facts down: one transaction per fact, written once, projections updated with it.

Every fact but a heartbeat is first inserted into ``facts`` by its digest; when that insert
finds the digest already there, nothing else is written (the message was recorded before:
a redelivery, another instance, a rebuild). Heartbeats are not rows: an executor's summary
is updated when a heartbeat's ``sequence`` is newer than the last one seen.

The projections follow the rules the record promises (docs/control-plane.md):

* the first copy of a task id is the task; a copy with its token is a re-send of it; a copy
  from its issuer with a later attempt and a new token is a reassignment; any other copy is
  a duplicate, recorded and never made the task;
* the first terminal result per task wins; later ones are recorded as duplicates, and a
  result of another token is fenced; nothing is overwritten;
* the winning result and each retried attempt's FAILED result are billed: one ``usage`` row
  per (task, attempt, executor), from the result's metrics (:func:`_bill`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from wayang_mq.controlplane import claims
from wayang_mq.controlplane.facts import (
    Beat,
    CancelSeen,
    DeadSeen,
    Fact,
    ProgressSeen,
    RedispatchSeen,
    Registered,
    ResultSeen,
    TaskSeen,
)
from wayang_mq.core.model import Result, Status, now_ms
from wayang_mq.core.scopes import Role
from wayang_mq.core.wire import decode
from wayang_mq.observability.usage import Billable

Conn = psycopg.AsyncConnection[Any]


def ts(ms: int | None) -> datetime | None:
    """Milliseconds since the epoch as a timestamptz value."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


async def write(
    conn: Conn, fact: Fact, *, atomic: bool = True, new: dict[bytes, int] | None = None
) -> bool:
    """Record ``fact`` in one transaction (a savepoint inside the caller's); False when it
    was recorded before. ``atomic=False`` writes in the caller's transaction as it is: the
    caller's batch then stands or falls whole (see the daemon's fast path). ``new``: the
    facts rows :func:`new_facts` inserted for the batch (a digest is taken out once used)."""
    async with conn.transaction() if atomic else contextlib.nullcontext():
        payload = fact.payload
        if isinstance(payload, Beat):
            return await _beat(conn, payload)
        seq = await _fact_row(conn, fact) if new is None else new.pop(fact.digest, None)
        if seq is None:
            return False
        if isinstance(payload, TaskSeen):
            await _task(conn, payload)
        elif isinstance(payload, ResultSeen):
            await _result(conn, payload)
        elif isinstance(payload, Registered):
            await _registered(conn, payload)
        elif isinstance(payload, ProgressSeen):
            await _progress(conn, payload, seq)
        elif isinstance(payload, CancelSeen):
            await _cancel(conn, payload)
        elif isinstance(payload, DeadSeen):
            await _dead(conn, payload, seq)
        return True


async def count_refusal(conn: Conn, reason: str, detail: str) -> None:
    """Count a message the record refused (its content is never written)."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO refusals (reason, count, last_at, last_detail) VALUES (%s, 1, now(), %s)"
            " ON CONFLICT (reason) DO UPDATE SET count = refusals.count + 1,"
            " last_at = now(), last_detail = excluded.last_detail",
            (reason, detail[:500]),
        )


# -- the facts table ----------------------------------------------------------------------


def _describe(fact: Fact) -> tuple[str, str | None, str | None, int | None, int, dict[str, Any]]:
    """kind, task id, executor id, attempt, when (ms), detail of a fact's row."""
    p = fact.payload
    if isinstance(p, TaskSeen):
        kind = "retry" if p.scheduled else "task"
        detail = {
            "publisher": p.publisher,
            "issuer": p.task.issuer,
            "token": p.task.token,
            "decided_by": p.decider.scope.identity if p.decider else "",
            "retry_due": p.retry_due,
            "deadline_ms": p.task.deadline_ms,
        }
        at = fact.received_at_ms or p.task.issued_at_ms
        return kind, p.task.task_id, None, p.task.attempt, at, detail
    if isinstance(p, ResultSeen):
        r = p.result
        detail = {
            "status": r.status.value,
            "token": r.token,
            "error": r.error.code.value if r.error else None,
            "message": r.error.message if r.error else None,
            "retried": p.retried,
        }
        return "result", r.task_id, r.executor_id, r.attempt, r.finished_at_ms, detail
    if isinstance(p, Registered):
        reg = p.registration
        return "registration", None, reg.executor_id, None, reg.started_at_ms, {}
    if isinstance(p, ProgressSeen):
        pr = p.progress
        detail = {"fraction": pr.fraction, "message": pr.message}
        return "progress", pr.task_id, pr.executor_id, pr.attempt, pr.sent_at_ms, detail
    if isinstance(p, CancelSeen):
        c = p.request
        detail = {"requester": c.requester, "reason": c.reason}
        return "cancel", c.task_id, None, None, c.requested_at_ms, detail
    if isinstance(p, RedispatchSeen):
        # the sweep that decided it wrote the attempt; this is the notice, for the timeline
        rec = p.record
        detail = {"token": rec.token, "deadline_ms": rec.deadline_ms}
        return "redispatch", rec.task_id, rec.executor_id, rec.attempt, rec.issued_at_ms, detail
    if isinstance(p, DeadSeen):
        d = p.dead
        detail = {
            "code": str(d.code),
            "reason": d.reason,
            "queue": d.source_queue,
            "by": d.dead_lettered_by,
        }
        at = d.dead_at_ms or fact.received_at_ms or now_ms()
        return "dead_letter", p.task.task_id, None, p.task.attempt, at, detail
    raise TypeError(f"no fact row for {type(p).__name__}")


async def new_facts(conn: Conn, facts: list[Fact]) -> dict[bytes, int]:
    """Insert the batch's facts rows in one statement (one round trip, in batch order); the
    digests that were new, with their rows' seq. Heartbeats have no row."""
    rows = [(f.digest, *_describe(f)) for f in facts if not isinstance(f.payload, Beat)]
    if not rows:
        return {}
    digests, kinds, tasks, executors, attempts, ats, details = zip(*rows, strict=True)
    cur = await conn.execute(
        "INSERT INTO facts (digest, kind, task_id, executor_id, attempt, at, detail)"
        " SELECT d, k, t, e, a, at, det::jsonb FROM unnest(%s::bytea[], %s::text[],"
        " %s::text[], %s::text[], %s::int[], %s::timestamptz[], %s::text[])"
        " WITH ORDINALITY AS u(d, k, t, e, a, at, det, n) ORDER BY n"
        " ON CONFLICT (digest) DO NOTHING RETURNING digest, seq",
        (
            list(digests),
            list(kinds),
            list(tasks),
            list(executors),
            list(attempts),
            [ts(at) for at in ats],
            [json.dumps(d) for d in details],
        ),
    )
    return {bytes(digest): int(seq) for digest, seq in await cur.fetchall()}


async def _fact_row(conn: Conn, fact: Fact) -> int | None:
    kind, task_id, executor_id, attempt, at, detail = _describe(fact)
    cur = await conn.execute(
        "INSERT INTO facts (digest, kind, task_id, executor_id, attempt, at, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (digest) DO NOTHING RETURNING seq",
        (fact.digest, kind, task_id, executor_id, attempt, ts(at), Jsonb(detail)),
    )
    row = await cur.fetchone()
    return None if row is None else int(row[0])


# -- tasks ----------------------------------------------------------------------------------


async def _task(conn: Conn, seen: TaskSeen) -> None:
    task = seen.task
    cur = await conn.execute(
        "SELECT token, attempt, issuer, state FROM tasks WHERE task_id = %s FOR UPDATE",
        (task.task_id,),
    )
    # a result may have come first (the record queue is not ordered across publishers):
    # True, one won; False, only a retried one (billed); sent with the first: one round trip
    earlier = await conn.execute(
        "SELECT bool_or(verdict = 'won') FROM results"
        " WHERE task_id = %s AND verdict IN ('won', 'retried')",
        (task.task_id,),
    )
    row = await cur.fetchone()
    sha = hashlib.sha256(seen.body).digest()
    if row is None:
        got = await earlier.fetchone()
        await _new_task(conn, seen, result_first=None if got is None else got[0])
        await _copy(conn, seen, sha, duplicate=False)
        return
    token, attempt, issuer, state = row
    decided_by = seen.decider.scope.identity if seen.decider else task.issuer
    if seen.scheduled or seen.retry_due:
        # A retry of the recorded task (its record verified): the attempt it names.
        if task.attempt >= attempt:
            new_state = "retrying" if seen.scheduled else "queued"
            await _set_attempt(conn, seen, new_state, token, decided_by)
        return
    if task.token == token:
        # The same dispatch again (a re-send, a replay of its dead letter, a re-dispatch by
        # the control plane that keeps the token): a copy, never a duplicate. New bytes of a
        # finished task are a replay (`wayang-mq dead replay` reissues it with a fresh
        # deadline): its run's result is recorded as 'replayed'.
        await _copy(conn, seen, sha, duplicate=False, replay=state == "finished")
        if task.attempt > attempt:
            await _set_attempt(conn, seen, "queued", token, decided_by)
        return
    reassigned = (seen.decider is not None and seen.decider.scope.is_(Role.CONTROL_PLANE)) or (
        task.issuer == issuer and task.attempt > attempt and state != "finished"
    )
    if reassigned:
        await _copy(conn, seen, sha, duplicate=False)
        await conn.execute(
            "UPDATE attempts SET state = 'lost' WHERE task_id = %s AND attempt < %s"
            " AND state NOT IN ('finished', 'lost')",
            (task.task_id, task.attempt),
        )
        await _set_attempt(conn, seen, "queued", task.token, decided_by)
        return
    await _copy(conn, seen, sha, duplicate=True)
    await claims.duplicate_recorded(conn, task, sha)  # answered from the record once finished


async def _won(conn: Conn, task_id: str) -> psycopg.AsyncCursor[Any]:
    """The task's winning result, if any (a cursor: in a pipeline, read it after the query
    it was sent with, so both cost one round trip)."""
    return await conn.execute(
        "SELECT 1 FROM results WHERE task_id = %s AND verdict = 'won'", (task_id,)
    )


async def _new_task(conn: Conn, seen: TaskSeen, *, result_first: bool | None) -> None:
    """``result_first``: True, a result recorded before the task won; False, only a retried
    one came first; None, none."""
    task = seen.task
    await conn.execute(
        "INSERT INTO tasks (task_id, capability, node_id, issuer, publisher, key_id, token,"
        " reply_to, attempt, max_attempts, heartbeat_timeout_ms, policy, issued_at,"
        " deadline_at, first_seen, state, body, key_header, signature_header)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            task.task_id,
            task.capability,
            task.node_id,
            task.issuer,
            seen.publisher,
            seen.issuer.key_id,
            task.token,
            task.reply_to,
            task.attempt,
            task.retry.max_attempts,
            task.heartbeat_timeout_ms,
            Jsonb(task.policy.model_dump(mode="json")),
            ts(task.issued_at_ms),
            ts(task.deadline_ms),
            ts(task.issued_at_ms),
            "retrying" if seen.scheduled else "queued",
            seen.body,
            seen.key_header,
            seen.signature_header,
        ),
    )
    await conn.execute(
        "INSERT INTO attempts (task_id, attempt, token, state, queued_at, decided_by)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (
            task.task_id,
            task.attempt,
            task.token,
            "retrying" if seen.scheduled else "queued",
            ts(task.issued_at_ms),
            task.issuer,
        ),
    )
    if result_first is not None:  # billed before its issuer was known
        await conn.execute(
            "UPDATE usage SET issuer = %s WHERE task_id = %s AND issuer = ''",
            (task.issuer, task.task_id),
        )
    if result_first:
        await _finish_from_results(conn, task.task_id)


async def _copy(
    conn: Conn, seen: TaskSeen, sha: bytes, *, duplicate: bool, replay: bool = False
) -> None:
    cur = await conn.execute(
        "INSERT INTO task_copies (task_id, token, body_sha256, reply_to, publisher, seen_at,"
        " duplicate, replay) VALUES (%s, %s, %s, %s, %s, now(), %s, %s) ON CONFLICT DO NOTHING"
        " RETURNING task_id",
        (
            seen.task.task_id,
            seen.task.token,
            sha,
            seen.task.reply_to,
            seen.publisher,
            duplicate,
            replay,
        ),
    )
    if replay and await cur.fetchone() is not None:
        await conn.execute(
            "UPDATE tasks SET replayed_at = now() WHERE task_id = %s", (seen.task.task_id,)
        )
        await _claim_replay_result(conn, seen.task.task_id, seen.task.token, sha)


async def _claim_replay_result(conn: Conn, task_id: str, token: str, sha: bytes) -> None:
    """A replay's run may be recorded before the replayed copy: RabbitMQ keeps order per
    publisher, and the copy (the operator's ``dead replay``) and its run's result (a worker)
    come from two, so the worker's result can reach the record first, where it found no
    replay copy and was recorded a duplicate. The copy claims that result as its run's:
    the verdict is the same whichever of the two the record reads first."""
    cur = await conn.execute(
        "UPDATE results SET verdict = 'replayed' WHERE seq = (SELECT max(seq) FROM results"
        " WHERE task_id = %s AND token = %s AND verdict = 'duplicate') RETURNING 1",
        (task_id, token),
    )
    if await cur.fetchone() is not None:
        await conn.execute(
            "UPDATE task_copies SET answered = true WHERE task_id = %s AND body_sha256 = %s",
            (task_id, sha),
        )


async def _set_attempt(conn: Conn, seen: TaskSeen, state: str, token: str, decided_by: str) -> None:
    task = seen.task
    await conn.execute(
        "INSERT INTO attempts (task_id, attempt, token, state, queued_at, decided_by)"
        " VALUES (%s, %s, %s, %s, now(), %s) ON CONFLICT (task_id, attempt) DO UPDATE"
        " SET state = excluded.state WHERE attempts.state IN ('queued', 'retrying')",
        (task.task_id, task.attempt, token, state, decided_by),
    )
    await conn.execute(
        "UPDATE tasks SET attempt = %s, token = %s, deadline_at = %s, state = %s,"
        " executor_id = NULL WHERE task_id = %s AND state <> 'finished'",
        (task.attempt, token, ts(task.deadline_ms), state, task.task_id),
    )


# -- results --------------------------------------------------------------------------------


async def _result(conn: Conn, seen: ResultSeen) -> None:
    r = seen.result
    cur = await conn.execute(
        "SELECT token, issuer, state, EXISTS (SELECT 1 FROM task_copies c WHERE"
        " c.task_id = tasks.task_id AND c.duplicate AND NOT c.answered)"
        " FROM tasks WHERE task_id = %s FOR UPDATE",
        (r.task_id,),
    )
    won = await _won(conn, r.task_id)  # sent with it: one round trip for both
    task = await cur.fetchone()
    verdict = await _verdict(conn, seen, task, await won.fetchone() is not None)
    await conn.execute(
        "INSERT INTO results (task_id, attempt, token, executor_id, capability, status,"
        " error_code, verdict, finished_at, key_id, body, redelivered)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            r.task_id,
            r.attempt,
            r.token,
            r.executor_id,
            r.capability,
            r.status.value,
            r.error.code.value if r.error else None,
            verdict,
            ts(r.finished_at_ms),
            seen.signer.key_id,
            seen.body,
            r.metrics.get("redelivered", 0.0) > 0,
        ),
    )
    if verdict in ("won", "retried"):
        await _bill(conn, r)
    if verdict == "retried":
        await conn.execute(
            "UPDATE attempts SET state = 'finished', executor_id = %s, finished_at = %s"
            " WHERE task_id = %s AND attempt = %s",
            (r.executor_id, ts(r.finished_at_ms), r.task_id, r.attempt),
        )
    elif verdict == "pending":
        await conn.execute(
            "UPDATE tasks SET state = 'pending', executor_id = %s"
            " WHERE task_id = %s AND state <> 'finished'",
            (r.executor_id, r.task_id),
        )
        await _attempt_state(conn, r.task_id, r.attempt, "pending", r.executor_id, None)
    elif verdict == "won" and task is not None:
        await _finish(conn, seen, has_duplicates=bool(task[3]))


async def _verdict(conn: Conn, seen: ResultSeen, task: Any, won: bool) -> str:
    r = seen.result
    if seen.retried:
        return "retried"
    if task is not None:
        token, issuer, _state, _duplicates = task
        if r.token != token:
            return "fenced"
        if seen.signer.scope.role is Role.DISPATCHER and issuer != seen.signer.scope.identity:
            return "fenced"
    if r.status is Status.PENDING:
        return "pending"
    if not won:
        return "won"
    # A replay's run (one result per replayed copy) is kept as such, not as a duplicate.
    cur = await conn.execute(
        "UPDATE task_copies SET answered = true WHERE ctid = (SELECT ctid FROM task_copies"
        " WHERE task_id = %s AND token = %s AND replay AND NOT answered LIMIT 1) RETURNING 1",
        (r.task_id, r.token),
    )
    return "replayed" if await cur.fetchone() else "duplicate"


async def _finish(conn: Conn, seen: ResultSeen, *, has_duplicates: bool) -> None:
    r = seen.result
    await conn.execute(
        "UPDATE tasks SET state = 'finished', status = %s, error_code = %s, finished_at = %s,"
        " executor_id = %s WHERE task_id = %s",
        (
            r.status.value,
            r.error.code.value if r.error else None,
            ts(r.finished_at_ms),
            r.executor_id,
            r.task_id,
        ),
    )
    await _attempt_state(conn, r.task_id, r.attempt, "finished", r.executor_id, r.finished_at_ms)
    if has_duplicates:
        await claims.answer_duplicates(conn, r.task_id)  # copies published while it ran


async def _bill(conn: Conn, r: Result) -> None:
    """The attempt's usage row, from its result's metrics (validated again: a result is
    anyone's signed input). The first terminal result of an (attempt, executor) is billed;
    the issuer is the task's, or filled in when the task is recorded after its result."""
    used = Billable.of(r.metrics)
    await conn.execute(
        "INSERT INTO usage (task_id, attempt, executor_id, capability, issuer, node_id, wall_ms,"
        " cpu_ms, bytes_in, bytes_out, units, finished_at) VALUES (%s, %s, %s, %s,"
        " coalesce((SELECT issuer FROM tasks WHERE task_id = %s), ''), %s, %s, %s, %s, %s, %s,"
        " %s) ON CONFLICT DO NOTHING",
        (
            r.task_id,
            r.attempt,
            r.executor_id,
            r.capability,
            r.task_id,
            r.node_id,
            used.wall_ms,
            used.cpu_ms,
            used.bytes_in,
            used.bytes_out,
            Jsonb(used.units),
            ts(r.finished_at_ms),
        ),
    )


async def _attempt_state(
    conn: Conn, task_id: str, attempt: int, state: str, executor_id: str, at_ms: int | None
) -> None:
    await conn.execute(
        "UPDATE attempts SET state = %s, executor_id = %s,"
        " finished_at = coalesce(%s, finished_at),"
        " started_at = coalesce(started_at, %s) WHERE task_id = %s AND attempt = %s",
        (state, executor_id, ts(at_ms), ts(at_ms), task_id, attempt),
    )


async def _finish_from_results(conn: Conn, task_id: str) -> None:
    """A task recorded after its result: the result that won finishes it now."""
    cur = await conn.execute(
        "SELECT body, key_id FROM results WHERE task_id = %s AND verdict = 'won'", (task_id,)
    )
    row = await cur.fetchone()
    if row is None:
        return
    r = decode(bytes(row[0]), Result)
    await conn.execute(
        "UPDATE tasks SET state = 'finished', status = %s, error_code = %s, finished_at = %s,"
        " executor_id = %s WHERE task_id = %s",
        (
            r.status.value,
            r.error.code.value if r.error else None,
            ts(r.finished_at_ms),
            r.executor_id,
            task_id,
        ),
    )


# -- executors ------------------------------------------------------------------------------


async def _registered(conn: Conn, seen: Registered) -> None:
    reg = seen.registration
    await conn.execute(
        "INSERT INTO executors (executor_id, capabilities, protocol, metadata, concurrency,"
        " version, key_id, registered_at, started_at, last_seen, state, lost_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, now(), %s, now(), 'live', NULL)"
        " ON CONFLICT (executor_id) DO UPDATE SET capabilities = excluded.capabilities,"
        " protocol = excluded.protocol, metadata = excluded.metadata,"
        " concurrency = excluded.concurrency, version = excluded.version,"
        " key_id = excluded.key_id, registered_at = now(), started_at = excluded.started_at,"
        " last_seen = now(), last_sequence = 0, state = 'live', lost_at = NULL",
        (
            reg.executor_id,
            list(reg.capabilities),
            reg.protocol,
            Jsonb(dict(reg.metadata)),
            reg.concurrency,
            reg.version,
            seen.signer.key_id,
            ts(reg.started_at_ms),
        ),
    )


async def _beat(conn: Conn, seen: Beat) -> bool:
    beat = seen.heartbeat
    cur = await conn.execute(
        "INSERT INTO executors (executor_id, capabilities, concurrency, key_id, last_seen,"
        " last_sequence, in_flight, load, state)"
        " VALUES (%s, %s, %s, %s, now(), %s, %s, %s, 'live')"
        " ON CONFLICT (executor_id) DO UPDATE SET capabilities = excluded.capabilities,"
        " concurrency = excluded.concurrency, key_id = excluded.key_id, last_seen = now(),"
        " last_sequence = excluded.last_sequence, in_flight = excluded.in_flight,"
        " load = excluded.load, state = 'live', lost_at = NULL"
        " WHERE executors.last_sequence < excluded.last_sequence OR excluded.last_sequence = 0"
        " RETURNING executor_id",
        (
            beat.executor_id,
            list(beat.capabilities),
            beat.concurrency,
            seen.signer.key_id,
            beat.sequence,
            list(beat.in_flight),
            beat.load,
        ),
    )
    if await cur.fetchone() is None:
        return False  # an older or repeated heartbeat
    if beat.in_flight:
        # Tasks it lists are running there (only tasks of capabilities its key serves).
        await conn.execute(
            "UPDATE tasks SET state = 'running', executor_id = %s"
            " WHERE task_id = ANY(%s) AND state IN ('queued', 'retrying', 'running')"
            " AND capability = ANY(%s)",
            (beat.executor_id, list(beat.in_flight), _served(seen)),
        )
        await conn.execute(
            "UPDATE attempts a SET state = 'running', executor_id = %s,"
            " started_at = coalesce(a.started_at, now()) FROM tasks t"
            " WHERE t.task_id = a.task_id AND a.attempt = t.attempt"
            " AND t.task_id = ANY(%s) AND t.executor_id = %s AND a.state IN ('queued', 'running')",
            (beat.executor_id, list(beat.in_flight), beat.executor_id),
        )
    return True


def _served(seen: Beat) -> list[str]:
    """The capabilities a heartbeat may claim tasks of (its own, which its key covers)."""
    return [c for c in seen.heartbeat.capabilities if seen.signer.scope.covers(c)]


# -- progress, cancels, dead letters -----------------------------------------------------------


async def _progress(conn: Conn, seen: ProgressSeen, seq: int) -> None:
    p = seen.progress
    await conn.execute(
        "INSERT INTO progress (task_id, attempt, executor_id, fraction, message, details,"
        " sent_at, fact_seq) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            p.task_id,
            p.attempt,
            p.executor_id,
            p.fraction,
            p.message,
            Jsonb(_jsonable(p.details)),
            ts(p.sent_at_ms),
            seq,
        ),
    )
    await conn.execute(
        "UPDATE tasks SET state = 'running', executor_id = %s"
        " WHERE task_id = %s AND state IN ('queued', 'retrying')",
        (p.executor_id, p.task_id),
    )


async def _cancel(conn: Conn, seen: CancelSeen) -> None:
    c = seen.request
    await conn.execute(
        "INSERT INTO cancels (task_id, requester, reason, requested_at, forget_at)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (task_id) DO NOTHING",
        (
            c.task_id,
            c.requester,
            c.reason,
            ts(c.requested_at_ms),
            ts(c.requested_at_ms + c.forget_after_ms),
        ),
    )
    await conn.execute(
        "UPDATE tasks SET cancel_requested_at = %s WHERE task_id = %s"
        " AND cancel_requested_at IS NULL",
        (ts(c.requested_at_ms), c.task_id),
    )


async def _dead(conn: Conn, seen: DeadSeen, seq: int) -> None:
    d = seen.dead
    await conn.execute(
        "INSERT INTO dead_letters (fact_seq, task_id, capability, reason, source_queue,"
        " died_at, by_worker) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            seq,
            seen.task.task_id,
            seen.task.capability,
            str(d.code),
            d.source_queue or "",
            ts(d.dead_at_ms or now_ms()),
            d.dead_lettered_by is not None,
        ),
    )


def _jsonable(value: Mapping[str, Any]) -> dict[str, Any]:
    """Progress details as JSON (bytes become text: the record is for people)."""
    return dict(json.loads(json.dumps(value, default=lambda v: repr(v))))
