"""Opening a task as a receiver must: every security-relevant claim checked before it runs.

In order, over the raw bytes first: properties, size, the issuer's signature (for the task
type), then msgpack and schema, then what the signer's key may say (a dispatcher's key, as
the task's issuer, for its capability), the audience, not-before and the deadline. A retry or
a compensation is the issuer's task, unchanged, plus an :class:`AttemptRecord` signed by the
executor or reaper that decided it (``wayang-attempt`` headers; a re-dispatch of a lost
executor's task: signed by the control plane, with a new token): the record is verified and
checked against both keys' scopes, and the task it makes is derived from the two, so no one
but an issuer ever signs a task. docs/security.md §5–§7 is this module in prose.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wayang_mq.core.errors import (
    BadAttempt,
    CapabilityNotAllowed,
    InvalidMessage,
    KeyNotAllowed,
    NotYetValid,
    TokenExpired,
    WireError,
    WrongAudience,
)
from wayang_mq.core.fields import NODE_ID_BYTES, TASK_ID_BYTES, derived_id
from wayang_mq.core.model import (
    DEFAULT_AUDIENCE,
    AttemptRecord,
    ErrorInfo,
    Task,
    now_ms,
)
from wayang_mq.core.scopes import KeyScope, Role
from wayang_mq.core.signing import KEY_ID_HEADER, SIGNATURE_HEADER, KeyRing, Signer, Verified
from wayang_mq.core.wire import DEFAULT_MAX_BODY_BYTES, decode, encode, open_signed

ATTEMPT_HEADER = "wayang-attempt"  # base64 of the AttemptRecord's msgpack body
ATTEMPT_KEY_ID_HEADER = "wayang-attempt-key-id"
ATTEMPT_SIGNATURE_HEADER = "wayang-attempt-signature"
ATTEMPT_HEADERS = (ATTEMPT_HEADER, ATTEMPT_KEY_ID_HEADER, ATTEMPT_SIGNATURE_HEADER)
MAX_ATTEMPT_HEADER_CHARS = 16_384  # a record is a few hundred bytes; its error is bounded

#: the longest delay a record may add before the issuer's queue window, unless the issuer's
#: own max_backoff_ms is longer (the shortest tier or an executor's retry_after may exceed it)
LONGEST_RETRY_DELAY_MS = 24 * 3_600_000
DEFAULT_MAX_CLOCK_SKEW_MS = 5 * 60_000
DEFAULT_MAX_QUEUE_WINDOW_MS = 7 * 24 * 3_600_000


@dataclass(frozen=True, slots=True)
class TaskChecks:
    """What a receiver requires of a task besides its signature."""

    audience: str = DEFAULT_AUDIENCE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_clock_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS
    max_queue_window_ms: int = DEFAULT_MAX_QUEUE_WINDOW_MS


@dataclass(frozen=True, slots=True)
class Opened:
    """A task a receiver may act on, and who vouched for it."""

    task: Task  # the attempt to run (a retry or compensation: derived, see module doc)
    issuer: Verified  # the key that signed the task's bytes
    decider: Verified | None = None  # the key that signed the attempt record, if any


def open_task(
    body: bytes,
    headers: Mapping[str, Any],
    keyring: KeyRing,
    checks: TaskChecks = TaskChecks(),
    *,
    at_ms: int | None = None,
    times: bool = True,
) -> Opened:
    """A received task, verified, decoded and checked; raises a WireError subclass whose code
    says which check failed (docs/security.md §6). ``error.task`` is set when the task itself
    verified: only then may a refusal be answered to its reply address. ``times=False``
    skips the clock checks (the reaper answers tasks that died of their deadline)."""
    original, issuer = _open_issued(body, headers, keyring, checks)
    now = now_ms() if at_ms is None else at_ms
    task, decider = original, None
    if any(name in headers for name in ATTEMPT_HEADERS):
        task, decider = _apply_record(original, body, headers, keyring, checks, now)
        if not issuer.scope.covers(task.capability):
            raise CapabilityNotAllowed(
                f"compensation {task.task_id} is for {task.capability!r}, which its issuer "
                f"{issuer.scope.describe()} may not dispatch",
                body=body,
            )
    if times:
        _check_times(task, body, checks, now)
    return Opened(task, issuer, decider)


def _open_issued(
    body: bytes, headers: Mapping[str, Any], keyring: KeyRing, checks: TaskChecks
) -> tuple[Task, Verified]:
    """The issuer's task: signature, schema, and what the issuer's key may sign."""
    task, signer = open_signed(body, headers, keyring, Task, max_body_bytes=checks.max_body_bytes)
    scope = signer.scope
    if not scope.is_(Role.DISPATCHER):
        raise KeyNotAllowed(
            f"task {task.task_id} is signed by {scope.describe()}: only dispatcher and admin "
            "keys sign tasks",
            body=body,
            hint="sign tasks with a dispatcher's key (`wayang-mq keys new --role dispatcher`)",
        )
    if not scope.speaks_for(task.issuer):
        raise KeyNotAllowed(
            f"task {task.task_id} names issuer {task.issuer!r} but is signed by {scope.describe()}",
            body=body,
            hint="a dispatcher signs as itself: issuer must be its key's id",
        )
    if not scope.covers(task.capability):
        raise CapabilityNotAllowed(
            f"task {task.task_id} is for {task.capability!r}, which {scope.describe()} may not "
            "dispatch",
            body=body,
            hint="widen the key's capabilities (`wayang-mq keys new --capability`)",
        )
    if task.audience != checks.audience:
        raise WrongAudience(
            f"task {task.task_id} is for deployment {task.audience!r}, this is {checks.audience!r}",
            body=body,
            hint="set the dispatcher's audience (WAYANG_AUDIENCE) to this deployment's",
        )
    return task, signer


def _check_times(task: Task, body: bytes, checks: TaskChecks, now: int) -> None:
    """Not before its not-before or issue time (within the skew), not after its deadline,
    and no deadline further away than the longest queue window."""
    skew = checks.max_clock_skew_ms
    starts = max(task.issued_at_ms, task.not_before_ms or 0)
    if starts - now > skew:
        raise NotYetValid(
            f"task {task.task_id} is not valid for another {(starts - now) // 1000} s; "
            f"the allowed clock skew is {skew // 1000} s",
            body=body,
            task=task,
            hint="check the publisher's clock (NTP), or raise the workers' --max-clock-skew",
        )
    if task.expired(now):
        raise TokenExpired(
            f"task {task.task_id} passed its deadline before it could start", body=body, task=task
        )
    if task.deadline_ms - now > checks.max_queue_window_ms:
        raise InvalidMessage(
            f"task {task.task_id} has its deadline {(task.deadline_ms - now) // 1000} s away; "
            f"the longest queue window is {checks.max_queue_window_ms // 1000} s",
            body=body,
            task=task,
            hint="give the task a shorter queue timeout, or raise the workers' --max-queue-window",
        )


# -- attempt records: retries and compensations --------------------------------------------


def attempt_headers(record: AttemptRecord, signer: Signer) -> dict[str, str]:
    """The headers that carry ``record``, signed by the executor, reaper or control plane
    that decided."""
    packed = encode(record)
    return {
        ATTEMPT_HEADER: base64.b64encode(packed).decode("ascii"),
        ATTEMPT_KEY_ID_HEADER: signer.key_id,
        ATTEMPT_SIGNATURE_HEADER: base64.b64encode(
            signer.sign(packed, AttemptRecord.wire_type)
        ).decode("ascii"),
    }


def issued_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The issuer's signature headers of a delivery: what a retry or compensation keeps."""
    return {name: headers[name] for name in (KEY_ID_HEADER, SIGNATURE_HEADER) if name in headers}


def _apply_record(
    original: Task,
    body: bytes,
    headers: Mapping[str, Any],
    keyring: KeyRing,
    checks: TaskChecks,
    now: int,
) -> tuple[Task, Verified]:
    """The attempt the record makes of ``original``, after checking who signed it and that
    it stays within what the issuer allowed."""
    record, decider = _read_record(body, headers, keyring)

    def refuse(why: str) -> BadAttempt:
        return BadAttempt(
            f"task {original.task_id}: attempt record by {decider.scope.describe()} refused: {why}",
            body=body,
        )

    why = _not_the_deciders(record, decider.scope, original)
    if why is not None:
        raise refuse(why)
    if record.task_id != original.task_id:
        raise refuse(f"it is for task {record.task_id!r}")
    if record.issued_at_ms - now > checks.max_clock_skew_ms:
        raise refuse("it is issued in the future")
    if record.compensates is not None:
        task = compensation_of(original, record.compensates)
        if task is None:
            raise refuse("the task names no compensation")
    else:
        task = original
        if not 2 <= record.attempt <= original.retry.max_attempts:
            raise refuse(
                f"attempt {record.attempt} is outside 2..{original.retry.max_attempts}, the "
                "issuer's retry limit"
            )
    if record.compensates is not None and not 1 <= record.attempt <= task.retry.max_attempts:
        raise refuse(f"attempt {record.attempt} is outside the compensation's retry limit")
    delay = max(original.retry.max_backoff_ms, LONGEST_RETRY_DELAY_MS)
    latest = record.issued_at_ms + delay + original.queue_window_ms
    if record.deadline_ms > latest:
        raise refuse("its deadline is later than a retry delay and the issuer's queue window allow")
    update: dict[str, Any] = {"attempt": record.attempt, "deadline_ms": record.deadline_ms}
    if record.token is not None:
        update["token"] = record.token  # a re-dispatch's new token (or a retry's of it)
    derived = task.model_copy(update=update)
    return derived, decider


def _not_the_deciders(record: AttemptRecord, scope: KeyScope, original: Task) -> str | None:
    """Why the record's signer may not decide this attempt, or None when it may: executors
    (for their capabilities) and the reaper decide retries and compensations; the control
    plane re-dispatches (a new attempt and token), and decides no compensation."""
    if not scope.is_(Role.EXECUTOR, Role.REAPER, Role.CONTROL_PLANE):
        return (
            "only executor, reaper, control-plane and admin keys decide retries and compensations"
        )
    if scope.role is Role.CONTROL_PLANE and record.compensates is not None:
        return "a control plane re-dispatches tasks; it does not decide compensations"
    if record.compensates is not None and record.token is not None:
        return "a compensation's token is derived from its task's, never given"
    if not scope.speaks_for(record.executor_id):
        return f"it names executor {record.executor_id!r}"
    if scope.role is Role.EXECUTOR and not scope.covers(original.capability):
        return f"the key does not serve {original.capability!r}"
    return None


def _read_record(
    body: bytes, headers: Mapping[str, Any], keyring: KeyRing
) -> tuple[AttemptRecord, Verified]:
    """The record from its headers, verified as an ``wayang.attempt.v1`` body."""
    encoded = headers.get(ATTEMPT_HEADER)
    if isinstance(encoded, bytes):
        encoded = encoded.decode("ascii", "replace")
    if not isinstance(encoded, str) or len(encoded) > MAX_ATTEMPT_HEADER_CHARS:
        raise BadAttempt("the wayang-attempt header is missing or too long", body=body)
    try:
        packed = base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise BadAttempt(f"the wayang-attempt header is not base64: {exc}", body=body) from exc
    signature_headers = {
        KEY_ID_HEADER: headers.get(ATTEMPT_KEY_ID_HEADER),
        SIGNATURE_HEADER: headers.get(ATTEMPT_SIGNATURE_HEADER),
    }
    try:
        decider = keyring.verify(packed, signature_headers, AttemptRecord.wire_type)
        record = decode(packed, AttemptRecord)
    except WireError as exc:
        raise BadAttempt(f"attempt record refused: {exc.message}", body=body) from exc
    return record, decider


def compensation_of(task: Task, error: ErrorInfo) -> Task | None:
    """The compensation task of ``task`` failing with ``error``, derived so that anyone who
    derives it gets the same task: same id, token, node and deadline window. None when the
    task names no compensation. It is addressed to the same reply address and carries the
    failed task's id and error in its input (``compensates``)."""
    spec = task.compensation
    if spec is None:
        return None
    task_id = derived_id(task.task_id, ".compensation", TASK_ID_BYTES)
    token = hashlib.sha256(f"{task.token}\x00compensation".encode()).hexdigest()[:32]
    return Task(
        task_id=task_id,
        token=token,
        node_id=spec.node_id or derived_id(task.node_id, ":compensate", NODE_ID_BYTES),
        capability=spec.capability,
        input={
            **spec.input,
            "compensates": {"task_id": task.task_id, "error": error.model_dump(mode="json")},
        },
        retry=task.retry,
        issued_at_ms=task.issued_at_ms,
        deadline_ms=task.deadline_ms,
        audience=task.audience,
        reply_to=task.reply_to,
        idempotency_key=task_id,
        issuer=task.issuer,
    )
