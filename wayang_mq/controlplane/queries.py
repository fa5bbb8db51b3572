"""Reading the record: the registry, the tasks, one task's story, where a task stands, and
the audit that answers "was anything lost?".

Everything here only reads (the connection is opened read-only), so any number of people
and scripts can ask while the control plane writes. The tables are the projections the
store keeps (``migrations/0001_records.sql``); a task's story also reads ``facts``, the
messages themselves, because only they are in the order things happened.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import IsolationLevel
from psycopg.rows import dict_row

from wayang_mq.controlplane.db import connect_sync, unavailable
from wayang_mq.core.authority import DECIDED_BY_CONTROL_PLANE, DECIDED_BY_DISPATCHER
from wayang_mq.core.errors import ConfigError, DatabaseUnavailable

Conn = psycopg.Connection[Any]
Row = dict[str, Any]

#: the values of ``tasks.state``; ``--status`` takes these or a terminal status
TASK_STATES = ("queued", "retrying", "running", "pending", "finished")
TERMINAL_STATUSES = ("SUCCESS", "FAILED")
#: how many tasks the audit reads at a time (each chunk reports progress)
AUDIT_CHUNK = 10_000
DEFAULT_GRACE_S = 30.0


@contextmanager
def reading(database_url: str) -> Iterator[Conn]:
    """A read-only connection to a migrated record, in one snapshot (repeatable read: an
    audit's chunks agree with each other while the control plane goes on writing)."""
    from wayang_mq.controlplane.migrate import current_version, latest_version

    conn = connect_sync(database_url)
    try:
        conn.read_only = True
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        version = current_version(conn)
        conn.row_factory = dict_row
        if version < latest_version():
            raise DatabaseUnavailable(
                f"the record is at schema version {version}, this wayang-mq reads "
                f"{latest_version()}",
                hint="run `wayang-mq db migrate` (and `wayang-mq control-plane` to fill it)",
            )
        yield conn
    except psycopg.Error as exc:
        raise unavailable(exc) from exc
    finally:
        conn.close()


def _rows(conn: Conn, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    return list(conn.execute(sql, params).fetchall())


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _jsonable(row: Row) -> Row:
    return {k: _iso(v) if isinstance(v, datetime) else v for k, v in row.items()}


# -- executors --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """One executor as the registry knows it."""

    executor_id: str
    capabilities: list[str]
    state: str  # live, or lost (missed its heartbeats)
    last_seen: datetime
    last_seen_age_s: float
    load: float  # in flight / concurrency
    in_flight: list[str]
    concurrency: int
    version: str
    metadata: dict[str, Any]

    def as_json(self) -> Row:
        """For ``--json``."""
        return _jsonable(asdict(self))


def executors(conn: Conn, now: datetime) -> list[ExecutorInfo]:
    """Every executor ever seen, live ones first, then by id."""
    rows = _rows(
        conn,
        "SELECT executor_id, capabilities, state, last_seen, load, in_flight, concurrency,"
        " version, metadata FROM executors ORDER BY state <> 'live', executor_id",
    )
    return [
        ExecutorInfo(
            last_seen_age_s=max(0.0, (now - r["last_seen"]).total_seconds()),
            load=float(r["load"]),
            **{k: v for k, v in r.items() if k != "load"},
        )
        for r in rows
    ]


# -- tasks ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """What ``wayang-mq tasks`` narrows the list to."""

    capability: str | None = None
    status: str | None = None  # SUCCESS, FAILED, or one of TASK_STATES
    since: datetime | None = None
    limit: int = 100


def status_filter(text: str) -> str:
    """``text`` as a status (SUCCESS, FAILED) or a state (queued, ...); else a ConfigError."""
    if text.upper() in TERMINAL_STATUSES:
        return text.upper()
    if text.lower() in TASK_STATES:
        return text.lower()
    raise ConfigError(
        f"--status {text!r} is neither a result nor a state",
        hint=f"use one of {', '.join(TERMINAL_STATUSES + TASK_STATES)}",
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime, flag: str = "--since") -> datetime:
    """A time (ISO 8601, UTC unless it says) or a duration back from ``now`` (``10m``);
    ``flag`` names the option in the error."""
    match = _DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_S[match.group(2).lower()]
        return now - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r} is neither a time nor a duration",
            hint=f"e.g. {flag} 10m, {flag} 2h, {flag} 2025-01-31T12:00",
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class TaskRow:
    """One line of ``wayang-mq tasks``."""

    task_id: str
    capability: str
    state: str
    status: str | None
    error_code: str | None
    attempt: int
    executor_id: str | None
    issuer: str
    first_seen: datetime
    finished_at: datetime | None

    def as_json(self) -> Row:
        """For ``--json``."""
        return _jsonable(asdict(self))


def tasks(conn: Conn, which: TaskFilter) -> list[TaskRow]:
    """The newest tasks first, narrowed by ``which``."""
    where, params = ["true"], list[Any]()
    if which.capability is not None:
        where.append("capability = %s")
        params.append(which.capability)
    if which.status in TERMINAL_STATUSES:
        where.append("status = %s")
        params.append(which.status)
    elif which.status is not None:
        where.append("state = %s")
        params.append(which.status)
    if which.since is not None:
        where.append("first_seen >= %s")
        params.append(which.since)
    rows = _rows(
        conn,
        "SELECT task_id, capability, state, status, error_code, attempt, executor_id, issuer,"
        f" first_seen, finished_at FROM tasks WHERE {' AND '.join(where)}"
        " ORDER BY first_seen DESC, task_id LIMIT %s",
        [*params, which.limit],
    )
    return [TaskRow(**r) for r in rows]


# -- where one task stands (`wayang-mq status`) -------------------------------------------------

#: the words ``status`` answers with, for each ``tasks.state``
STATE_WORDS = {
    "queued": "queued",
    "retrying": "waiting to retry",
    "running": "running",
    "pending": "pending",
    "finished": "finished",
}


@dataclass(frozen=True, slots=True)
class RecordedState:
    """Where the record says a task stands."""

    task_id: str
    state: str  # queued, waiting to retry, running, pending, finished, unknown
    capability: str | None = None
    attempt: int | None = None
    executor_id: str | None = None
    outcome: str | None = None  # SUCCESS or FAILED, once finished
    error_code: str | None = None
    progress: float | None = None
    message: str = ""
    source: str = "record"

    def as_dict(self) -> Row:
        """For JSON output; empty fields left out (as the executors' answer does)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def task_state(conn: Conn, task_id: str) -> RecordedState:
    """Where ``task_id`` stands; ``unknown`` when the record never saw it."""
    rows = _rows(
        conn,
        "SELECT t.capability, t.state, t.attempt, t.executor_id, t.status, t.error_code,"
        " t.cancel_requested_at, p.fraction, p.message FROM tasks t LEFT JOIN LATERAL"
        " (SELECT fraction, message FROM progress WHERE task_id = t.task_id"
        "  AND attempt = t.attempt ORDER BY sent_at DESC LIMIT 1) p ON true"
        " WHERE t.task_id = %s",
        (task_id,),
    )
    if not rows:
        return RecordedState(task_id, "unknown", message="the record has no task with this id")
    r = rows[0]
    running = r["state"] in ("running", "pending")
    message = r["message"] or "" if running else ""
    if r["cancel_requested_at"] is not None and r["state"] != "finished":
        message = f"cancel requested at {_iso(r['cancel_requested_at'])}"
    return RecordedState(
        task_id,
        STATE_WORDS.get(str(r["state"]), str(r["state"])),
        capability=r["capability"],
        attempt=r["attempt"],
        executor_id=r["executor_id"] if running or r["state"] == "finished" else None,
        outcome=r["status"],
        error_code=r["error_code"],
        progress=r["fraction"] if running else None,
        message=message,
    )


# -- one task's whole story (`wayang-mq task ID`) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoryEvent:
    """One thing that happened to a task, in words."""

    at: datetime
    kind: str  # task, duplicate, retry, started, progress, result, dead_letter, cancel, ...
    text: str
    attempt: int | None = None
    executor_id: str | None = None

    def as_json(self) -> Row:
        """For ``--json``."""
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class TaskStory:
    """Everything the record holds about one task id: its row, and what happened, in order."""

    task_id: str
    task: Row | None  # the tasks row (None: results or events of a task never recorded)
    copies: list[Row] = field(default_factory=list)
    attempts: list[Row] = field(default_factory=list)
    results: list[Row] = field(default_factory=list)
    dead_letters: list[Row] = field(default_factory=list)
    cancels: list[Row] = field(default_factory=list)
    events: list[StoryEvent] = field(default_factory=list)

    def as_json(self) -> Row:
        """For ``--json``."""
        return {
            "task_id": self.task_id,
            "task": None if self.task is None else _jsonable(self.task),
            **{
                name: [_jsonable(r) for r in getattr(self, name)]
                for name in ("copies", "attempts", "results", "dead_letters", "cancels")
            },
            "events": [e.as_json() for e in self.events],
        }


def task_story(conn: Conn, task_id: str) -> TaskStory | None:
    """The story of ``task_id``; None when the record holds nothing about it."""
    task = _rows(
        conn,
        "SELECT task_id, capability, node_id, issuer, publisher, key_id, token, reply_to,"
        " attempt, max_attempts, state, executor_id, status, error_code, issued_at,"
        " deadline_at, first_seen, finished_at, cancel_requested_at, policy"
        " FROM tasks WHERE task_id = %s",
        (task_id,),
    )

    def of(sql: str) -> list[Row]:
        return _rows(conn, sql, (task_id,))

    story = TaskStory(
        task_id,
        task[0] if task else None,
        copies=of(
            "SELECT token, publisher, reply_to, seen_at, duplicate, answered FROM task_copies"
            " WHERE task_id = %s ORDER BY seen_at"
        ),
        attempts=of(
            "SELECT attempt, token, executor_id, state, queued_at, started_at, finished_at,"
            " decided_by FROM attempts WHERE task_id = %s ORDER BY attempt"
        ),
        results=of(
            "SELECT seq, attempt, token, executor_id, status, error_code, verdict, finished_at,"
            " recorded_at, key_id FROM results WHERE task_id = %s ORDER BY seq"
        ),
        dead_letters=of(
            "SELECT reason, source_queue, died_at, by_worker FROM dead_letters"
            " WHERE task_id = %s ORDER BY died_at"
        ),
        cancels=of(
            "SELECT requester, reason, requested_at, forget_at FROM cancels WHERE task_id = %s"
        ),
    )
    facts = of(
        "SELECT seq, kind, executor_id, attempt, at, detail FROM facts WHERE task_id = %s"
        " ORDER BY seq"
    )
    if story.task is None and not facts and not story.results:
        return None
    story.events.extend(_timeline(story, facts))
    return story


def _timeline(story: TaskStory, facts: list[Row]) -> list[StoryEvent]:
    """The facts in words, with what only the projections know (a result's verdict, when an
    attempt started running).

    The order is the record's (``facts.seq``): the order the messages reached the record
    queue, which follows cause and effect (a message's own time may be the broker's, in
    whole seconds). An attempt's start, known from heartbeats, goes before its first
    progress or result."""
    duplicates = {c["token"] for c in story.copies if c["duplicate"]}
    verdicts = {
        (r["attempt"], r["executor_id"], r["token"], r["finished_at"]): r["verdict"]
        for r in story.results
    }
    starts = {
        a["attempt"]: StoryEvent(
            a["started_at"],
            "started",
            f"attempt {a['attempt']} running on {a['executor_id']}",
            a["attempt"],
            a["executor_id"],
        )
        for a in story.attempts
        # a start first known from the attempt's result says nothing the result does not
        if a["started_at"] is not None and a["executor_id"] and a["started_at"] != a["finished_at"]
    }
    events: list[StoryEvent] = []
    for fact in facts:
        event = _fact_event(fact, duplicates, verdicts)
        if event.kind in ("progress", "result") and event.attempt in starts:
            events.append(starts.pop(event.attempt))
        events.append(event)
    return events + sorted(starts.values(), key=lambda e: e.at)


def _fact_event(
    fact: Row, duplicates: set[str], verdicts: dict[tuple[Any, ...], str]
) -> StoryEvent:
    kind, d = fact["kind"], fact["detail"] or {}
    attempt, executor = fact["attempt"], fact["executor_id"]
    text = f"{kind}: {d}"
    if kind == "task" and d.get("token") in duplicates:
        kind = "duplicate"
        text = f"published again by {d.get('publisher') or d.get('issuer')}: a duplicate, not run"
    elif kind == "task" and d.get("retry_due"):
        text = f"attempt {attempt} back from its retry tier, queued"
    elif kind == "task":
        who = d.get("publisher") or "?"
        text = f"attempt {attempt} published by {who} (issuer {d.get('issuer') or '?'})"
        if d.get("decided_by") and d.get("decided_by") != d.get("issuer"):
            text += f", decided by {d['decided_by']}"
    elif kind == "retry":
        text = f"attempt {attempt} scheduled to retry (by {d.get('decided_by') or '?'})"
    elif kind == "result":
        verdict = verdicts.get((attempt, executor, d.get("token"), fact["at"]), "?")
        error = f" {d['error']}" if d.get("error") else ""
        text = f"{d.get('status')}{error} from {executor} (attempt {attempt}): {verdict}"
        if d.get("message"):
            text += f" — {d['message']}"
    elif kind == "progress":
        fraction = d.get("fraction")
        share = "" if fraction is None else f"{fraction:.0%} "
        text = f"progress {share}from {executor}: {d.get('message') or ''}".rstrip(": ")
    elif kind == "dead_letter":
        by = f" by {d['by']}" if d.get("by") else ""
        text = f"dead-lettered ({d.get('code')}) from {d.get('queue') or '?'}{by}"
    elif kind == "cancel":
        text = f"cancel requested by {d.get('requester')}: {d.get('reason') or 'no reason'}"
    return StoryEvent(fact["at"], kind, text, attempt, executor)


# -- the audit (`wayang-mq audit`) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """Something wrong in the record, for a person: what kind, which task, and why."""

    kind: str  # lost, ran_twice, stray_result
    task_id: str
    reason: str

    def as_json(self) -> Row:
        """For ``--json``."""
        return asdict(self)


#: called with (what is scanned, how many so far, how many in all)
Progress = Callable[[str, int, int], None]


def audit(
    conn: Conn,
    now: datetime,
    grace_s: float = DEFAULT_GRACE_S,
    progress: Progress | None = None,
    chunk: int = AUDIT_CHUNK,
) -> list[Finding]:
    """Every task lost (no terminal result, past its deadline plus ``grace_s``), every task
    run more than once, and every result whose task the record never saw; ``progress`` is
    called after each ``chunk`` of tasks read."""
    cutoff = now - timedelta(seconds=grace_s)
    findings = list(_lost(conn, now, cutoff, progress, chunk))
    findings += _ran_twice(conn)
    findings += _stray_results(conn, cutoff)
    return findings


def _lost(
    conn: Conn, now: datetime, cutoff: datetime, progress: Progress | None, size: int
) -> Iterator[Finding]:
    """Tasks without a winning result, read in chunks by task id (keyset pagination, so a
    chunk costs the same however far the scan is)."""
    total = int(_rows(conn, "SELECT count(*) AS n FROM tasks")[0]["n"])
    scanned, after = 0, ""
    while True:
        chunk = _rows(
            conn,
            "SELECT t.task_id, t.capability, t.state, t.deadline_at, t.executor_id,"
            " e.state AS executor_state, e.lost_at, t.task_id = ANY(e.in_flight) AS listed,"
            " (SELECT d.reason FROM dead_letters d WHERE d.task_id = t.task_id"
            "  ORDER BY d.died_at DESC LIMIT 1) AS dead_reason,"
            " EXISTS (SELECT 1 FROM results r WHERE r.task_id = t.task_id"
            "  AND r.verdict = 'won') AS answered"
            " FROM tasks t LEFT JOIN executors e ON e.executor_id = t.executor_id"
            " WHERE t.task_id > %s ORDER BY t.task_id LIMIT %s",
            (after, size),
        )
        if not chunk:
            break
        for row in chunk:
            if not row["answered"]:
                reason = _why_lost(row, now, cutoff)
                if reason is not None:
                    yield Finding("lost", row["task_id"], reason)
        scanned += len(chunk)
        after = chunk[-1]["task_id"]
        if progress is not None:
            progress("tasks", scanned, total)


def _ago(now: datetime, then: datetime) -> str:
    seconds = int((now - then).total_seconds())
    if seconds < 120:
        return f"{seconds}s ago"
    return f"{seconds // 60} min ago" if seconds < 7200 else f"{seconds // 3600} h ago"


def _why_lost(row: Row, now: datetime, cutoff: datetime) -> str | None:
    """Why a task without a terminal result counts as lost, or None while it is not.

    A pending task (accepted, the answer to come later) and a running one its executor
    still lists in its heartbeats are only lost once that executor is; anything else is
    lost once its deadline (nothing may start after it) is ``grace`` behind us."""
    state, executor = row["state"], row["executor_id"]
    if row["executor_state"] == "lost" and state in ("running", "pending"):
        when = f" {_ago(now, row['lost_at'])}" if row["lost_at"] else ""
        return f"{state} on executor {executor}, which was lost{when}; no result"
    if state == "pending" or (state == "running" and row["listed"]):
        return None
    if row["deadline_at"] >= cutoff:
        return None
    deadline = f"deadline passed {_ago(now, row['deadline_at'])}"
    if state == "running":
        return f"running on {executor} but no longer in its heartbeats; {deadline}; no result"
    if state == "finished":
        return f"marked finished but no result won; {deadline}"
    word = STATE_WORDS.get(state, state)
    if row["dead_reason"]:
        return (
            f"{word} for {row['capability']}, dead-lettered ({row['dead_reason']}) and never"
            f" answered (is a reaper running?); {deadline}"
        )
    return f"{word} for {row['capability']}, {deadline}, and no result came"


#: results that ran nothing: a dispatcher's answer to its own deadline, the control plane's
#: answer from its record (to a duplicate, or a policy no executor meets)
_NOT_RUN = (
    f"r.executor_id NOT LIKE '{DECIDED_BY_DISPATCHER}%%'"
    f" AND r.executor_id NOT LIKE '{DECIDED_BY_CONTROL_PLANE}%%'"
)


def reruns(conn: Conn) -> int:
    """Attempts that ran again after the broker redelivered them (their worker died, or gave
    them back, before acking): what at-least-once execution allows, reported apart."""
    rows = _rows(
        conn,
        f"SELECT count(DISTINCT (task_id, attempt)) AS n FROM results r WHERE {_NOT_RUN}"
        " AND redelivered AND status IN ('SUCCESS', 'FAILED')",
    )
    return int(rows[0]["n"]) if rows else 0


def _ran_twice(conn: Conn) -> list[Finding]:
    """One attempt answered by two executors, or a duplicate copy that got its own result
    (a duplicate is never to be run: the first copy of a task id is the task). Answers that
    ran nothing (``_NOT_RUN``) do not count."""
    found = [
        Finding(
            "ran_twice",
            r["task_id"],
            f"attempt {r['attempt']} ended {r['n']} times, on {', '.join(sorted(r['executors']))}",
        )
        for r in _rows(
            conn,
            "SELECT task_id, attempt, count(*) AS n, array_agg(DISTINCT executor_id) AS executors"
            f" FROM results r WHERE {_NOT_RUN} AND status IN ('SUCCESS', 'FAILED')"
            " AND verdict IN ('won', 'duplicate') GROUP BY task_id, attempt"
            # a run the broker redelivered (its worker died before acking) is at-least-once
            # doing its job: counted by reruns(), not a finding, unless two runs came first-hand
            " HAVING count(DISTINCT executor_id) > 1"
            " AND count(*) FILTER (WHERE NOT redelivered) > 1 ORDER BY task_id",
        )
    ]
    found += [
        Finding(
            "ran_twice",
            r["task_id"],
            f"a duplicate copy published by {r['publisher'] or '?'} ran on {r['executor_id']}"
            f" ({r['status']}), though the task was already recorded",
        )
        for r in _rows(
            conn,
            "SELECT DISTINCT r.task_id, c.publisher, r.executor_id, r.status FROM results r"
            " JOIN task_copies c ON c.task_id = r.task_id AND c.token = r.token"
            f" WHERE {_NOT_RUN} AND c.duplicate AND r.status IN ('SUCCESS', 'FAILED')"
            " ORDER BY r.task_id",
        )
    ]
    return found


def _stray_results(conn: Conn, cutoff: datetime) -> list[Finding]:
    """Results of task ids the record has no task for. A result may be recorded before its
    task (the record queue has no order across publishers): only those older than the grace
    count."""
    return [
        Finding(
            "stray_result",
            r["task_id"],
            f"{r['n']} result(s) ({r['statuses']}) from {', '.join(sorted(r['executors']))},"
            " but no task with this id was ever recorded",
        )
        for r in _rows(
            conn,
            "SELECT task_id, count(*) AS n, string_agg(DISTINCT status, '/') AS statuses,"
            " array_agg(DISTINCT executor_id) AS executors FROM results r"
            " WHERE recorded_at < %s AND NOT EXISTS"
            " (SELECT 1 FROM tasks t WHERE t.task_id = r.task_id)"
            " GROUP BY task_id ORDER BY task_id",
            (cutoff,),
        )
    ]
