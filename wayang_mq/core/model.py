"""The fabric's messages (spec §4–§7) as immutable values.

Field names are the wire names: what ``model_dump`` gives is exactly what goes into the msgpack
map, so ``docs/wire-format.md`` and this module describe one thing. Times are integer
milliseconds since the Unix epoch (``*_ms``), durations integer milliseconds, so a publisher in
any language needs no date parsing. Unknown fields are rejected: a new field means a new
``type`` version, never a silent drop.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.fields import (
    MAX_INT,
    Array,
    Capability,
    Count,
    ExecutorId,
    Key,
    Millis,
    NodeId,
    OptionalKey,
    ReplyTo,
    TaskId,
    Token,
    WireEnum,
)

JsonLike = Any  # any msgpack-representable value: nil, bool, int, float, str, bin, array, map

#: the deployment a task is for when nobody names one (``--audience``, ``WAYANG_AUDIENCE``)
DEFAULT_AUDIENCE = "wayang"


def now_ms() -> int:
    """Wall-clock time in the wire's unit."""
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A fresh task or executor id: a random UUID, lowercase, hyphenated."""
    return str(uuid.uuid4())


def ms_to_datetime(ms: int) -> datetime:
    """For display and logs; the wire stays in integer milliseconds."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class WireModel(BaseModel):
    """Base of every message body: frozen, strict about unknown fields and about types (no
    coercion: see :mod:`wayang_mq.core.fields`), no infinities or NaN."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, allow_inf_nan=False, use_enum_values=False
    )

    #: the AMQP ``type`` property of this body
    wire_type: ClassVar[str]


class Status(StrEnum):
    """Outcome of a task as a result reports it (spec §7)."""

    SUCCESS = "SUCCESS"  # terminal: output is the answer
    FAILED = "FAILED"  # terminal: error says why, output may hold partial work
    PENDING = "PENDING"  # not terminal: accepted and persisted, the answer comes later


class RetryHints(WireModel):
    """How the fabric may retry a failed attempt; a retry builds a new task, never mutates one."""

    max_attempts: int = Field(default=1, ge=1, le=100)
    initial_backoff_ms: Millis = 1000
    backoff_multiplier: float = Field(default=2.0, ge=1.0, le=1000.0)
    max_backoff_ms: Millis = 300_000
    non_retryable: Array[WireEnum[ErrorCode]] = ()


class PolicyConstraints(WireModel):
    """Where and how a task may run (spec §6 'policy constraints')."""

    executor_id: ExecutorId | None = None  # pin to one executor (reassignment off)
    labels: dict[str, str] = Field(default_factory=dict)  # executor metadata that must match
    max_cost: float | None = Field(default=None, ge=0)  # budget hint for agent or paid executors


class Compensation(WireModel):
    """The task to run if this one ends FAILED for good (spec §11, compensation nodes)."""

    capability: Capability
    input: dict[str, JsonLike] = Field(default_factory=dict)
    node_id: NodeId | None = None  # the workflow's compensation node; default "<node>:compensate"


class Task(WireModel):
    """One unit of work for one capability (spec §6). Immutable, idempotent by ``task_id``."""

    wire_type: ClassVar[str] = "wayang.task.v1"

    task_id: TaskId
    token: Token  # execution token: fences late results
    node_id: NodeId  # the workflow node this task executes
    capability: Capability
    input: dict[str, JsonLike] = Field(default_factory=dict)  # the context snapshot
    policy: PolicyConstraints = Field(default_factory=PolicyConstraints)
    retry: RetryHints = Field(default_factory=RetryHints)
    timeout_ms: Count | None = None  # start-to-close execution timeout
    heartbeat_timeout_ms: Count | None = None
    issued_at_ms: Millis
    deadline_ms: Millis  # nothing may start after this instant (the envelope's expiry)
    audience: Key  # the deployment it is for: receivers of another refuse it
    attempt: int = Field(default=1, ge=1, le=MAX_INT)
    reply_to: ReplyTo = ""  # routing key on wayang.results; signed: a result cannot be redirected
    partition_key: Key | None = None  # sharded capabilities keep order per key
    idempotency_key: Key | None = None  # executors with side effects do them once per key
    issuer: OptionalKey = ""  # who signed: a dispatcher id (its key's scope must say so)
    compensation: Compensation | None = None  # dispatched when the task fails for good
    not_before_ms: Millis | None = None  # nothing may start before this instant

    @model_validator(mode="after")
    def _deadline_after_issue(self) -> Self:
        if self.deadline_ms < self.issued_at_ms:
            raise ValueError("deadline_ms is before issued_at_ms")
        if self.not_before_ms is not None and self.not_before_ms > self.deadline_ms:
            raise ValueError("not_before_ms is after deadline_ms")
        return self

    @classmethod
    def create(
        cls,
        capability: str,
        input: dict[str, JsonLike] | None = None,
        *,
        queue_timeout_ms: int = 60_000,
        task_id: str | None = None,
        token: str | None = None,
        node_id: str | None = None,
        reply_to: str = "",
        issuer: str = "",
        policy: PolicyConstraints | None = None,
        retry: RetryHints | None = None,
        timeout_ms: int | None = None,
        heartbeat_timeout_ms: int | None = None,
        partition_key: str | None = None,
        idempotency_key: str | None = None,
        compensation: Compensation | None = None,
        attempt: int = 1,
        audience: str = DEFAULT_AUDIENCE,
        not_before_ms: int | None = None,
    ) -> Task:
        """A new task with fresh ids, issued now, with a deadline ``queue_timeout_ms`` from now."""
        issued = now_ms()
        task_id = task_id or new_id()
        return cls(
            task_id=task_id,
            token=token or new_id(),
            node_id=node_id or task_id,
            capability=capability,
            input=input or {},
            policy=policy or PolicyConstraints(),
            retry=retry or RetryHints(),
            timeout_ms=timeout_ms,
            heartbeat_timeout_ms=heartbeat_timeout_ms,
            issued_at_ms=issued,
            deadline_ms=issued + queue_timeout_ms,
            reply_to=reply_to,
            partition_key=partition_key,
            idempotency_key=idempotency_key,
            issuer=issuer,
            compensation=compensation,
            attempt=attempt,
            audience=audience,
            not_before_ms=not_before_ms,
        )

    @property
    def queue_window_ms(self) -> int:
        """How long the task may wait for an executor: its deadline minus when it was issued.
        A retry, a reassignment or a replay gives the next attempt the same window again."""
        return self.deadline_ms - self.issued_at_ms

    def expired(self, at_ms: int | None = None) -> bool:
        """True when the task may no longer start."""
        return (now_ms() if at_ms is None else at_ms) > self.deadline_ms

    def next_attempt(self, **changes: Any) -> Task:
        """A copy for the next attempt: a new value, the original stays untouched."""
        return self.model_copy(update={"attempt": self.attempt + 1, **changes})


class ErrorInfo(WireModel):
    """Why a task failed, and whether trying again can help."""

    code: WireEnum[ErrorCode]
    message: str = ""
    retryable: bool = False
    retry_after_ms: Millis | None = None
    details: dict[str, JsonLike] = Field(default_factory=dict)


class TaskRef(BaseModel):
    """What it takes to answer a task later: its ids, token, attempt and reply address (see
    :mod:`wayang_mq.runtime.answers`). JSON, and holds no secret: safe to store."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    token: str
    node_id: str
    capability: str
    attempt: int
    reply_to: str | None = None

    @classmethod
    def of(cls, task: Task) -> TaskRef:
        """The reference of a task being executed."""
        return cls(
            task_id=task.task_id,
            token=task.token,
            node_id=task.node_id,
            capability=task.capability,
            attempt=task.attempt,
            reply_to=task.reply_to,
        )


class Result(WireModel):
    """An executor's answer (spec §7), correlated by task id, token and node id."""

    wire_type: ClassVar[str] = "wayang.result.v1"

    task_id: TaskId
    token: Token  # the task's execution token, as the dispatcher issued it
    node_id: NodeId
    capability: Capability
    status: WireEnum[Status]
    executor_id: ExecutorId
    attempt: int = Field(default=1, ge=1, le=MAX_INT)
    output: JsonLike = None  # the answer on SUCCESS, partial output on FAILED
    error: ErrorInfo | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # e.g. duration_ms, queue_ms
    logs: Array[str] = ()
    finished_at_ms: Millis = Field(default_factory=now_ms)
    compensation_task_id: TaskId | None = None  # the compensation dispatched for this failure

    @model_validator(mode="after")
    def _error_matches_status(self) -> Self:
        if self.status is Status.FAILED and self.error is None:
            raise ValueError("a FAILED result needs an error")
        if self.status is not Status.FAILED and self.error is not None:
            raise ValueError(f"a {self.status.value} result cannot carry an error")
        return self

    @property
    def terminal(self) -> bool:
        """SUCCESS and FAILED end a task; PENDING does not."""
        return self.status is not Status.PENDING

    @classmethod
    def answering(
        cls, task: Task | TaskRef, executor_id: str, status: Status, **fields: Any
    ) -> Result:
        """A result correlated with ``task``: its ids, token and attempt."""
        return cls(
            task_id=task.task_id,
            token=task.token,
            node_id=task.node_id,
            capability=task.capability,
            status=status,
            executor_id=executor_id,
            attempt=task.attempt,
            **fields,
        )

    @classmethod
    def failure(cls, task: Task, executor_id: str, error: ErrorInfo, **fields: Any) -> Result:
        """A FAILED result answering ``task``."""
        return cls.answering(task, executor_id, Status.FAILED, error=error, **fields)

    @classmethod
    def accepted(cls, task: Task, executor_id: str, details: dict[str, JsonLike]) -> Result:
        """A PENDING result: the task is accepted, its answer comes later."""
        return cls.answering(task, executor_id, Status.PENDING, output=details)


class AttemptRecord(WireModel):
    """What makes a retry, a re-dispatch or a compensation out of a task, without anyone but
    its issuer signing a task: the issuer's signed task travels unchanged, and this record,
    signed by the executor, reaper or control plane that decided, says which attempt it now
    is, until when it may start, and (a re-dispatch) its new token (see docs/security.md §7).
    Carried in the ``wayang-attempt`` header; the control plane also sends it alone, as a
    ``wayang.attempt.v1`` message, to the task's reply address (the dispatcher's notice)."""

    wire_type: ClassVar[str] = "wayang.attempt.v1"

    task_id: TaskId  # the signed task's id
    attempt: int = Field(ge=1, le=MAX_INT)  # the attempt the receiver runs
    deadline_ms: Millis  # it may not start after this instant
    executor_id: ExecutorId  # who decided: its key must speak for it
    # a compensation of the signed task (its ``compensation`` spec), for this failure
    compensates: ErrorInfo | None = None
    issued_at_ms: Millis = Field(default_factory=now_ms)
    # the attempt's execution token when it is not the issuer's: a re-dispatch by the control
    # plane gives a new one (fencing the lost attempt); a retry of such an attempt keeps it
    token: Token | None = None


class Registration(WireModel):
    """An executor announcing itself to the control plane (spec §4.1)."""

    wire_type: ClassVar[str] = "wayang.registration.v1"

    executor_id: ExecutorId
    capabilities: Array[Capability]
    protocol: str = "amqp-0-9-1"
    metadata: dict[str, str] = Field(default_factory=dict)
    concurrency: Count = 1
    version: str = ""
    started_at_ms: Millis = Field(default_factory=now_ms)


class Heartbeat(WireModel):
    """Liveness and load, sent every few seconds (spec §4.6)."""

    wire_type: ClassVar[str] = "wayang.heartbeat.v1"

    executor_id: ExecutorId
    capabilities: Array[Capability]
    in_flight: Array[TaskId] = ()  # task ids running now
    # task id -> the latest details its executor recorded with ctx.heartbeat(**details);
    # only tasks that recorded any are listed (Temporal's heartbeat details: coalesced)
    details: dict[str, dict[str, JsonLike]] = Field(default_factory=dict)
    concurrency: Count = 1
    sequence: Millis = 0
    sent_at_ms: Millis = Field(default_factory=now_ms)

    @property
    def load(self) -> float:
        """Share of the executor's slots in use, 0.0 to 1.0."""
        return len(self.in_flight) / self.concurrency


class Progress(WireModel):
    """A running task's progress (spec §4.4), for watchers and the heartbeat detail."""

    wire_type: ClassVar[str] = "wayang.progress.v1"

    task_id: TaskId
    executor_id: ExecutorId
    attempt: int = Field(default=1, ge=1, le=MAX_INT)
    fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    message: str = ""
    details: dict[str, JsonLike] = Field(default_factory=dict)
    sent_at_ms: Millis = Field(default_factory=now_ms)


class CancelRequest(WireModel):
    """Ask every executor to cancel a task: running → FAILED ``cancelled``; not yet received →
    answered ``cancelled`` when it arrives. Broadcast on ``wayang.control`` as ``cancel.<task>``."""

    wire_type: ClassVar[str] = "wayang.cancel.v1"

    task_id: TaskId
    reason: str = ""
    requester: OptionalKey = ""
    requested_at_ms: Millis = Field(default_factory=now_ms)
    forget_after_ms: Count = 3_600_000  # how long executors remember it


class StatusRequest(WireModel):
    """Ask every executor what it knows of a task; answers go to ``reply_to`` on
    ``wayang.control`` (``status-reply.<requester>``)."""

    wire_type: ClassVar[str] = "wayang.status-request.v1"

    request_id: Key
    task_id: TaskId
    reply_to: ReplyTo
    requested_at_ms: Millis = Field(default_factory=now_ms)


class TaskState(StrEnum):
    """Where a task stands, as one executor sees it."""

    UNKNOWN = "unknown"  # this executor has not seen it (it may be queued, or elsewhere)
    RUNNING = "running"
    FINISHED = "finished"  # answered recently by this executor


class StatusReport(WireModel):
    """One executor's answer to a status request."""

    wire_type: ClassVar[str] = "wayang.status.v1"

    request_id: Key
    task_id: TaskId
    executor_id: ExecutorId
    state: WireEnum[TaskState]  # running or finished: executors that know nothing stay silent
    attempt: Count | None = None
    progress: Progress | None = None
    outcome: WireEnum[Status] | None = None  # for "finished": how it ended
    sent_at_ms: Millis = Field(default_factory=now_ms)


class ClaimVerdict(StrEnum):
    """What the control plane tells an executor that claims a task (docs/wire-format.md §4.8)."""

    RUN = "run"  # the first claim of this attempt (or a redelivery taking it over): run it
    DUPLICATE = "duplicate"  # another copy runs or ran: ack without running or answering
    CANCELLED = "cancelled"  # a cancel is recorded: answer FAILED ``cancelled``


class Claim(WireModel):
    """An executor asking the control plane, before it runs a verified task, whether it may:
    published on ``wayang.control`` as ``claim.<capability>``, signed by the executor."""

    wire_type: ClassVar[str] = "wayang.claim.v1"

    executor_id: ExecutorId
    task_id: TaskId
    attempt: int = Field(ge=1, le=MAX_INT)
    token: Token
    capability: Capability
    issuer: OptionalKey = ""  # the verified task's issuer: whose cancels apply to it
    issued_at_ms: Millis  # the verified task's: a later one for the same token is a reissue
    redelivered: bool = False  # the broker's flag: the previous holder's channel closed
    sent_at_ms: Millis = Field(default_factory=now_ms)


class ClaimReply(WireModel):
    """The control plane's answer to a :class:`Claim`, on ``wayang.control`` as
    ``claim-reply.<executor>``, signed by the control plane."""

    wire_type: ClassVar[str] = "wayang.claim-reply.v1"

    task_id: TaskId
    attempt: int = Field(ge=1, le=MAX_INT)
    token: Token
    verdict: WireEnum[ClaimVerdict]
    reason: str = ""
    sent_at_ms: Millis = Field(default_factory=now_ms)


WIRE_TYPES: dict[str, type[WireModel]] = {
    model.wire_type: model
    for model in (
        Task,
        Result,
        AttemptRecord,
        Registration,
        Heartbeat,
        Progress,
        CancelRequest,
        StatusRequest,
        StatusReport,
        Claim,
        ClaimReply,
    )
}


@dataclass(frozen=True)
class TaskStatus:
    """The answer to ``status(task_id)``."""

    task_id: str
    state: TaskState
    executor_id: str
    attempt: int | None = None
    progress: Progress | None = None
    outcome: Status | None = None  # for FINISHED: how it ended
