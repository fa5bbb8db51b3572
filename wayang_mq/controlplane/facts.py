"""What one message on ``wayang.record`` says, verified, as a value the store writes down.

The queue ``wayang.record`` is bound to every flow of the fabric, so the record does not
depend on who published: a task from a plain AMQP client is recorded like one from our
dispatcher. A delivery's exchange and routing key say which flow it came from:

==================  =====================  =============================================
exchange            routing key            fact
==================  =====================  =============================================
wayang.tasks        <capability>           a task published (or a retry come due:
                    retry.<tier>.<cap>     its attempt record says which attempt)
wayang.retry        retry.<tier>.<cap>     a retry scheduled (waiting in a tier)
wayang.results      reply.<id>, noreply.*  a result (type ``wayang.attempt.v1``: the control
                                           plane's notice of a re-dispatch)
wayang.events       registered.<executor>  a registration
                    heartbeat.<executor>   a heartbeat
                    progress.<task>        progress
                    attempt.<task>         the FAILED result of an attempt that is retried
wayang.control      cancel.<task>          a cancel request
wayang.dlx          <capability>           a dead letter (the broker's)
wayang.dead         <capability>           a worker's copy of input it refused
==================  =====================  =============================================

Everything is verified as its receivers verify it (signature, key scope), so the record
holds only what the fabric itself would act on; anything else is a :class:`Refused` with the
reason, counted and set aside, never written. Each fact carries a ``digest``: the same
message read twice (a redelivery, a second control plane, a rebuild from the stream) has the
same digest, and the store writes it once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgpack

from wayang_mq.core import names
from wayang_mq.core.authority import check_cancel, check_executor_event, check_result
from wayang_mq.core.envelope import (
    ATTEMPT_HEADER,
    Opened,
    TaskChecks,
    open_task,
)
from wayang_mq.core.errors import WireError
from wayang_mq.core.model import (
    AttemptRecord,
    CancelRequest,
    Heartbeat,
    Progress,
    Registration,
    Result,
    Task,
)
from wayang_mq.core.scopes import Role
from wayang_mq.core.signing import KEY_ID_HEADER, SIGNATURE_HEADER, KeyRing, Verified
from wayang_mq.core.wire import DEAD_LETTERED_BY_HEADER, decode, open_signed
from wayang_mq.ops.deadletters import DeadLetter, read_dead_letter


class Refused(Exception):
    """A message the record will not hold; ``reason`` is a short word for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Delivery:
    """The parts of a delivery the record reads (an AMQP message, or a stream entry)."""

    exchange: str
    routing_key: str
    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None = None
    user_id: str | None = None
    reply_to: str | None = None
    timestamp_ms: int | None = None
    type: str | None = None  # the AMQP type property (a notice on wayang.results has its own)

    @staticmethod
    def pack_many(deliveries: Sequence[Delivery]) -> bytes:
        """Deliveries as one msgpack array of maps: one entry of ``wayang.history`` (a batch
        the control plane wrote). The stream gets our bytes, not the messages' AMQP headers:
        RabbitMQ 3.10 converts a stream message's headers to AMQP 1.0, and some types anyone
        may publish (a decimal, an array of tables) crash the publishing channel there
        (rabbitmq-server#3564)."""
        maps = [
            {f: getattr(d, f) for f in d.__slots__} | {"headers": dict(d.headers)}
            for d in deliveries
        ]
        return bytes(msgpack.packb(maps, use_bin_type=True, default=_to_history))

    @classmethod
    def unpack_many(cls, packed: bytes) -> list[Delivery]:
        """The deliveries of one history entry (see :meth:`pack_many`)."""
        maps = msgpack.unpackb(packed, raw=False, object_hook=_from_history)
        return [cls(**fields) for fields in maps]

    def digest(self) -> bytes:
        """Identity of the message: where it went, its body, and what its headers add that
        changes its meaning (an attempt record, the broker's death count)."""
        h = hashlib.sha256()
        for part in (self.exchange, self.routing_key):
            h.update(part.encode("utf-8", "replace") + b"\0")
        h.update(self.body)
        record = self.headers.get(ATTEMPT_HEADER)
        if isinstance(record, str | bytes):
            h.update(b"\0attempt\0" + (record if isinstance(record, bytes) else record.encode()))
        deaths = self.headers.get("x-death")
        if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
            first = deaths[0]
            h.update(f"\0death\0{first.get('queue')}\0{first.get('count')}".encode())
        by = self.headers.get(DEAD_LETTERED_BY_HEADER)
        if by is not None:
            h.update(b"\0by\0" + str(by).encode("utf-8", "replace"))
        return h.digest()


_INSTANT = "$wayang-instant-ms"  # a datetime header value (x-death's time), in the history
_DECIMAL = "$wayang-decimal"


def _to_history(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return {_INSTANT: int(aware.timestamp() * 1000)}
    if isinstance(value, Decimal):
        return {_DECIMAL: str(value)}
    raise TypeError(f"no history form for {type(value).__name__}")


def _from_history(value: dict[str, Any]) -> Any:
    if len(value) == 1 and _INSTANT in value:
        return datetime.fromtimestamp(value[_INSTANT] / 1000, UTC)
    if len(value) == 1 and _DECIMAL in value:
        return Decimal(value[_DECIMAL])
    return value


@dataclass(frozen=True, slots=True)
class TaskSeen:
    """A task on ``wayang.tasks`` (``retry_due``: a retry back from its tier) or scheduled on
    ``wayang.retry`` (``scheduled``)."""

    task: Task  # the attempt (a retry: derived from its record)
    issued: Task  # the issuer's task as signed
    issuer: Verified
    decider: Verified | None
    body: bytes
    key_header: str
    signature_header: str
    publisher: str
    scheduled: bool = False  # waiting in a retry tier
    retry_due: bool = False


@dataclass(frozen=True, slots=True)
class ResultSeen:
    """A result (``retried``: the FAILED result of an attempt that is tried again)."""

    result: Result
    signer: Verified
    body: bytes
    retried: bool = False


@dataclass(frozen=True, slots=True)
class Registered:
    registration: Registration
    signer: Verified


@dataclass(frozen=True, slots=True)
class Beat:
    heartbeat: Heartbeat
    signer: Verified


@dataclass(frozen=True, slots=True)
class ProgressSeen:
    progress: Progress
    signer: Verified


@dataclass(frozen=True, slots=True)
class CancelSeen:
    request: CancelRequest
    signer: Verified


@dataclass(frozen=True, slots=True)
class DeadSeen:
    """A dead letter whose body verified as a task."""

    dead: DeadLetter
    task: Task
    body: bytes


@dataclass(frozen=True, slots=True)
class RedispatchSeen:
    """A control plane's notice that it re-dispatched a task (its attempt record)."""

    record: AttemptRecord
    signer: Verified


Payload = (
    TaskSeen
    | ResultSeen
    | Registered
    | Beat
    | ProgressSeen
    | CancelSeen
    | DeadSeen
    | RedispatchSeen
)


@dataclass(frozen=True, slots=True)
class Fact:
    """One verified message and its identity."""

    digest: bytes
    payload: Payload
    received_at_ms: int | None = field(default=None)


def read(delivery: Delivery, keyring: KeyRing, checks: TaskChecks) -> Fact:
    """The fact a delivery states; raises :class:`Refused` for anything not to be written."""
    try:
        payload = _payload(delivery, keyring, checks)
    except WireError as exc:
        raise Refused(str(exc.code or "invalid"), exc.message) from exc
    return Fact(delivery.digest(), payload, delivery.timestamp_ms)


def _payload(d: Delivery, keyring: KeyRing, checks: TaskChecks) -> Payload:
    exchange, key = d.exchange, d.routing_key
    if exchange in (names.TASKS_EXCHANGE, names.RETRY_EXCHANGE):
        return _task(d, keyring, checks)
    if exchange == names.RESULTS_EXCHANGE and d.type == AttemptRecord.wire_type:
        return _notice(d, keyring)
    if exchange == names.RESULTS_EXCHANGE:
        result, signer = open_signed(d.body, d.headers, keyring, Result)
        check_result(signer, result)
        return ResultSeen(result, signer, d.body)
    if exchange == names.EVENTS_EXCHANGE:
        return _event(d, keyring)
    if exchange == names.CONTROL_EXCHANGE and key.startswith("cancel."):
        request, signer = open_signed(d.body, d.headers, keyring, CancelRequest)
        check_cancel(signer, request, None)
        return CancelSeen(request, signer)
    if exchange in (names.DEAD_LETTER_EXCHANGE, names.DEAD_COPY_EXCHANGE):
        return _dead(d, keyring, checks)
    raise Refused("unexpected", f"nothing is recorded from {exchange or '(default)'} {key}")


def _task(d: Delivery, keyring: KeyRing, checks: TaskChecks) -> TaskSeen:
    opened: Opened = open_task(d.body, d.headers, keyring, checks, times=False)
    issued = opened.task
    if opened.decider is not None:  # the issuer's task is the body itself
        issued = decode(d.body, Task)
    return TaskSeen(
        task=opened.task,
        issued=issued,
        issuer=opened.issuer,
        decider=opened.decider,
        body=d.body,
        key_header=str(d.headers.get(KEY_ID_HEADER, "")),
        signature_header=str(d.headers.get(SIGNATURE_HEADER, "")),
        publisher=d.user_id or "",
        scheduled=d.exchange == names.RETRY_EXCHANGE,
        retry_due=d.exchange == names.TASKS_EXCHANGE and d.routing_key.startswith("retry."),
    )


def _notice(d: Delivery, keyring: KeyRing) -> RedispatchSeen:
    record, signer = open_signed(d.body, d.headers, keyring, AttemptRecord)
    if not signer.scope.is_(Role.CONTROL_PLANE) or not signer.scope.speaks_for(record.executor_id):
        raise Refused(
            "key_not_allowed",
            f"a re-dispatch notice for task {record.task_id} signed by {signer.scope.describe()}",
        )
    return RedispatchSeen(record, signer)


def _event(d: Delivery, keyring: KeyRing) -> Payload:
    kind = d.routing_key.split(".", 1)[0]
    if kind == "registered":
        registration, signer = open_signed(d.body, d.headers, keyring, Registration)
        check_executor_event(signer, registration.executor_id, registration.capabilities)
        return Registered(registration, signer)
    if kind == "heartbeat":
        beat, signer = open_signed(d.body, d.headers, keyring, Heartbeat)
        check_executor_event(signer, beat.executor_id, beat.capabilities)
        return Beat(beat, signer)
    if kind == "progress":
        progress, signer = open_signed(d.body, d.headers, keyring, Progress)
        check_executor_event(signer, progress.executor_id, ())
        return ProgressSeen(progress, signer)
    if kind == "attempt":
        result, signer = open_signed(d.body, d.headers, keyring, Result)
        check_result(signer, result)
        return ResultSeen(result, signer, d.body, retried=True)
    raise Refused("unexpected", f"no event kind {kind!r} is recorded")


def _dead(d: Delivery, keyring: KeyRing, checks: TaskChecks) -> DeadSeen:
    dead = read_dead_letter(
        d.headers,
        capability=names.capability_of_key(d.routing_key),
        message_id=d.message_id,
        reply_to=d.reply_to,
    )
    # Garbage dies too; it is refused here like any unverifiable message (counted, set aside).
    task = open_task(d.body, d.headers, keyring, checks, times=False).task
    return DeadSeen(dead, task, d.body)
