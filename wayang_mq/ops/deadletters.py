"""Dead letters: what one says (which task, why, when), and listing, replaying and purging them.

A task reaches ``wayang.dlx`` in one of two ways:

- **the broker** dead-letters it from its capability queue: it expired there (``expired``), it
  crashed or lost its worker too often (``delivery_limit``), a consumer rejected it
  (``rejected``) or the queue was full (``maxlen``). RabbitMQ says why in ``x-death``, an
  array with the most recent event first (``x-first-death-reason`` names the *first* event
  only, which for a retried task is its expiry in a retry tier, so it is only a fallback);
- **a worker** copies a task it cannot run (bad input, retries exhausted) with its own
  ``wayang-error-code`` / ``wayang-error-message`` / ``wayang-dead-lettered-by`` headers, after
  publishing the FAILED result itself.

``wayang.dlx`` routes every dead letter both to ``wayang.dead.<capability>``, which nothing
consumes (kept for inspection and replay), and to ``wayang.reaper``, whose daemon answers the
broker's dead letters with FAILED results (see :mod:`wayang_mq.ops.reaper`).

Listing, replaying and purging work over AMQP rather than the management API's
``get-messages``: that endpoint does the same ``basic.get`` and requeue inside the broker, but
hands bodies back as base64 JSON and timestamps as text, while here the body stays bytes for
the signature check and a replay publishes and acks on the same connection. Either way a look
at a quorum-queue message counts as a delivery (``x-delivery-count`` grows); dead queues carry
no delivery limit, so looking never dead-letters them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.outcome import discard, requeue, settle
from wayang_mq.amqp.publisher import ConfirmedPublisher, Rejected, Unroutable, to_amqp
from wayang_mq.core import names, placement
from wayang_mq.core.deadnotes import (
    RETRY_HISTORY_HEADER,
    TASK_ATTEMPT_HEADER,
    death_line,
    iso_time,
    redacted_input,
)
from wayang_mq.core.errors import ConfigError, ErrorCode, PublishFailed, WireError
from wayang_mq.core.model import Task, new_id, now_ms
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import (
    DEAD_LETTERED_BY_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    UNDECODABLE_HEADER,
    open_unverified,
    open_verified,
    task_message,
)

#: how the broker's dead-letter reasons read as error codes, and in words ({queue}, {ttl})
BROKER_REASONS: Mapping[str, tuple[ErrorCode, str]] = {
    "expired": (
        ErrorCode.TIMEOUT,
        "waited in {queue} past its queue timeout{ttl} and was never started",
    ),
    "delivery_limit": (
        ErrorCode.DELIVERY_LIMIT,
        "was returned to {queue} more often than its delivery limit allows: it crashed or lost"
        " its worker every time (a poison task)",
    ),
    # Our workers never reject a task they could read: they answer or copy it themselves. A
    # plain rejection is a worker that could not keep its dead-letter copy, or a foreign
    # consumer; the reaper refines the code when the body shows what was wrong with it.
    "rejected": (
        ErrorCode.EXECUTOR_ERROR,
        "was rejected by a consumer of {queue} without a result",
    ),
    "maxlen": (ErrorCode.BACKPRESSURE, "was dropped from {queue} because the queue was full"),
}

#: what list/replay look at in one go, at most (they hold the messages unacked meanwhile)
DEFAULT_LIMIT = 1000


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered task as its AMQP properties and headers describe it.

    Nothing here comes from the body: ``attempt`` is filled in only by callers that verified
    the body's signature (see :func:`list_dead_letters`).
    """

    task_id: str
    capability: str
    code: ErrorCode  # the reason as the wire's error code
    message: str  # the reason in words
    broker_reason: str | None  # RabbitMQ's reason; None when a wayang-mq worker dead-lettered it
    dead_lettered_by: str | None  # the worker (or daemon) that copied it here
    source_queue: str | None  # the queue it died in, when the broker dead-lettered it
    dead_at_ms: int | None  # when it died (the broker's x-death time, else the message's time)
    deaths: int  # how often it was dead-lettered for this reason from that queue (x-death count)
    reply_to: str | None  # the AMQP reply address (unverified: the body's is the one to trust)
    attempt: int | None = None  # the task's attempt, from a verified body

    @property
    def answered(self) -> bool:
        """True when whoever dead-lettered it has already published its FAILED result.

        wayang-mq workers always do, and mark their copies with ``wayang-dead-lettered-by``;
        the broker never does.
        """
        return self.dead_lettered_by is not None

    @property
    def reason(self) -> str:
        """For people: the error code, with RabbitMQ's word for it when that differs."""
        if self.broker_reason is None or self.broker_reason == self.code:
            return str(self.code)
        return f"{self.code} ({self.broker_reason})"

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready summary (for ``wayang-mq dead list --json``)."""
        fields = dataclasses.asdict(self)
        fields["code"] = str(self.code)
        return fields


def read_dead_letter(
    headers: Mapping[str, Any],
    *,
    capability: str,
    message_id: str | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    timestamp: datetime | None = None,
) -> DeadLetter:
    """Describe a dead letter from its headers and AMQP properties; never fails on odd input."""
    task_id = message_id or correlation_id or f"unknown-{new_id()}"
    stamped = _ms(timestamp)
    by = _text(headers.get(DEAD_LETTERED_BY_HEADER))
    if by is not None:
        return DeadLetter(
            task_id=task_id,
            capability=capability,
            code=_code(headers.get(ERROR_CODE_HEADER)),
            message=_text(headers.get(ERROR_MESSAGE_HEADER)) or "dead-lettered by " + by,
            broker_reason=None,
            dead_lettered_by=by,
            source_queue=None,
            dead_at_ms=stamped,
            deaths=1,
            reply_to=reply_to,
        )
    death = _latest_death(headers)
    reason = _text(death.get("reason")) or _text(headers.get("x-first-death-reason"))
    queue = _text(death.get("queue")) or _text(headers.get("x-first-death-queue"))
    code, words = BROKER_REASONS.get(
        reason or "",
        (ErrorCode.EXECUTOR_ERROR, "was dead-lettered from {queue} for no known reason"),
    )
    ttl = _text(death.get("original-expiration"))
    count = death.get("count")
    undecodable = _text(headers.get(UNDECODABLE_HEADER))  # its reason may be among them
    return DeadLetter(
        task_id=task_id,
        capability=capability,
        code=code,
        message="task "
        + words.format(queue=queue or "its queue", ttl=f" ({ttl} ms)" if ttl else "")
        + (f"; its AMQP properties could not be decoded: {undecodable}" if undecodable else ""),
        broker_reason=reason,
        dead_lettered_by=None,
        source_queue=queue,
        dead_at_ms=_ms(death.get("time")) or stamped,
        deaths=count if isinstance(count, int) else 1,
        reply_to=reply_to,
    )


def dead_letter_of(message: AbstractIncomingMessage, capability: str | None = None) -> DeadLetter:
    """:func:`read_dead_letter` for a delivery; the capability defaults to the one its routing
    key names: the task's own key (``<capability>``, or ``retry.<tier>.<capability>`` for a
    retry that came due), kept by the broker's dead-lettering, and what workers publish with."""
    return read_dead_letter(
        message.headers or {},
        capability=capability or names.capability_of_key(message.routing_key or ""),
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=message.timestamp,
    )


def _latest_death(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    # x-death is most-recent-first: a retried task that later hits its delivery limit carries
    # [delivery_limit from the task queue, expired from the retry tier].
    deaths = headers.get("x-death")
    if isinstance(deaths, Sequence) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return {}


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _code(value: Any) -> ErrorCode:
    try:
        return ErrorCode(_text(value) or "")
    except ValueError:
        return ErrorCode.INVALID_TASK  # a copy that names no code we know is still bad input


def _ms(value: Any) -> int | None:
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else None


# -- the dead queue, held ----------------------------------------------------------------------


@dataclass
class _Held:
    """A dead queue's ready messages, taken with ``basic.get`` and held unacked."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    messages: list[AbstractIncomingMessage]


@contextlib.asynccontextmanager
async def _hold(amqp_url: str, capability: str, limit: int) -> AsyncIterator[_Held]:
    """Take up to ``limit`` ready messages of ``wayang.dead.<capability>``; whatever the block
    does not ack goes back when it ends, in the order it was in: 3.10 requeues a returned
    message at the back of a quorum queue without a delivery limit, so returning them one by
    one, oldest first, rebuilds the queue as it was (a dead letter that arrived meanwhile ends
    up ahead of them).

    Only the messages ready when it starts are taken, so a task that dies again while the
    block runs (a replay that expires at once) is not picked up a second time.
    """
    connection = await connect(amqp_url, f"wayang-mq dead {new_id()[:8]}")
    try:
        channel = await connection.channel()
        ready = await _ready_count(channel, capability)
        queue = await channel.get_queue(names.dead_queue(capability), ensure=False)
        messages: list[AbstractIncomingMessage] = []
        while len(messages) < min(ready, limit):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            messages.append(message)
        try:
            yield _Held(connection, channel, messages)
        finally:
            returned = 0
            for message in messages:
                if not message.processed and not channel.is_closed:
                    await settle(message, requeue(message.message_id, "listed, put back"))
                    returned += 1
            if returned and not channel.is_closed:
                await _until_ready_again(channel, capability, ready - len(messages) + returned)
    finally:
        await connection.close()


async def _until_ready_again(
    channel: AbstractChannel, capability: str, expected: int, timeout_s: float = 2.0
) -> None:
    """Wait (briefly) until the returned messages are ready again.

    A quorum queue applies a return through its log, after the nack (which has no reply)
    has left: without this wait, a listing right after this one could miss them.
    """
    deadline = time.monotonic() + timeout_s
    while await _ready_count(channel, capability) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def _ready_count(channel: AbstractChannel, capability: str) -> int:
    name = names.dead_queue(capability)
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise ConfigError(
            f"queue {name} does not exist",
            hint=f"is {capability!r} in topology/wayang.toml? run `wayang-mq topology apply`",
        ) from None
    result = queue.declaration_result
    return int(result.message_count or 0) if result is not None else 0


# -- list, replay, purge --------------------------------------------------------------------------


async def list_dead_letters(
    amqp_url: str,
    capability: str,
    *,
    keyring: KeyRing | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[DeadLetter]:
    """The dead letters waiting in ``wayang.dead.<capability>``, in queue order; none is
    removed.

    With a ``keyring``, bodies that verify also give the task's attempt.
    """
    async with _hold(amqp_url, capability, limit) as held:
        return [_with_attempt(dead_letter_of(m, capability), m, keyring) for m in held.messages]


def _with_attempt(
    dead: DeadLetter, message: AbstractIncomingMessage, keyring: KeyRing | None
) -> DeadLetter:
    # a worker's copy says which attempt died (a retry's body is the issuer's attempt 1)
    copied = _copied_attempt(message.headers or {})
    if copied is not None:
        return dataclasses.replace(dead, attempt=copied)
    if keyring is None:
        return dead
    try:
        task = open_verified(message.body, message.headers or {}, keyring, Task)
    except WireError:
        return dead
    return dataclasses.replace(dead, attempt=task.attempt)


def _copied_attempt(headers: Mapping[str, Any]) -> int | None:
    copied = headers.get(TASK_ATTEMPT_HEADER)
    if isinstance(copied, int) and not isinstance(copied, bool) and copied >= 1:
        return copied
    return None


@dataclass(frozen=True)
class DeadLetterView:
    """One dead letter decoded for people (``wayang-mq dead show``): what its headers say,
    the task its body holds (input redacted), and every death it went through."""

    dead: DeadLetter
    verified: bool  # the body's signature verified (False: shown as read, not trusted)
    task: dict[str, Any] | None  # the task's fields, input redacted; None: unreadable body
    unreadable: str | None  # why the body could not be read as a task
    notes: dict[str, Any]  # the wayang-* headers a worker's copy carries (preview, time, ...)
    deaths: list[str]  # RabbitMQ's x-death, oldest first, then a copy's retry history
    headers: dict[str, Any]  # every header, as JSON-ready text (time and tables made text)
    app_id: str | None = None  # what published it (wayang-mq/<version> for a worker's copy)

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready document (for ``wayang-mq dead show --json``)."""
        return {
            **self.dead.as_json(),
            "dead_at": None if self.dead.dead_at_ms is None else iso_time(self.dead.dead_at_ms),
            "verified": self.verified,
            "task": self.task,
            "unreadable": self.unreadable,
            "deaths": self.deaths,
            "headers": self.headers,
            "app_id": self.app_id,
        }


def view_of(
    message: AbstractIncomingMessage, capability: str, keyring: KeyRing | None
) -> DeadLetterView:
    """Decode one dead letter for people; never fails on odd input."""
    headers = message.headers or {}
    dead = dead_letter_of(message, capability)
    verified, unreadable, task = False, None, None
    try:
        if keyring is not None:
            task, verified = open_verified(message.body, headers, keyring, Task), True
        else:
            task = open_unverified(message.body, headers, Task)
    except WireError as exc:
        unreadable = exc.message
        if keyring is not None:  # a body that does not verify is still worth showing
            with contextlib.suppress(WireError):
                task = open_unverified(message.body, headers, Task)
    fields = None
    # A retry's body is the issuer's task (attempt 1) and its attempt record a header: the
    # worker's copy says which attempt died; else a verified body's attempt.
    copied = _copied_attempt(headers)
    if copied is not None:
        dead = dataclasses.replace(dead, attempt=copied)
    elif task is not None and verified:
        dead = dataclasses.replace(dead, attempt=task.attempt)
    if task is not None:
        fields = task.model_dump(mode="json")
        fields["input"] = redacted_input(fields.get("input"))
    x_death = headers.get("x-death")
    deaths = (
        [death_line(d) for d in reversed(x_death) if isinstance(d, dict)]
        if isinstance(x_death, list)
        else []
    )
    history = headers.get(RETRY_HISTORY_HEADER)
    if isinstance(history, str):
        deaths.insert(0, f"(before the copy) {history}")
    notes = {k: _json_safe(v) for k, v in headers.items() if k.startswith("wayang-")}
    return DeadLetterView(
        dead=dead,
        verified=verified,
        task=fields,
        unreadable=unreadable,
        notes=notes,
        deaths=deaths,
        headers={k: _json_safe(v) for k, v in headers.items()},
        app_id=message.app_id,
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_time(int(value.timestamp() * 1000))
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


async def show_dead_letters(
    amqp_url: str,
    task_id: str,
    capabilities: Sequence[str],
    *,
    keyring: KeyRing | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[DeadLetterView]:
    """Every dead letter of ``task_id`` in the dead queues of ``capabilities``, decoded; like
    :func:`list_dead_letters`, each is looked at and put back, none removed."""
    found: list[DeadLetterView] = []
    for capability in capabilities:
        async with _hold(amqp_url, capability, limit) as held:
            for message in held.messages:
                if dead_letter_of(message, capability).task_id == task_id:
                    found.append(view_of(message, capability, keyring))
    return found


@dataclass(frozen=True)
class ReplayOutcome:
    """What replay did with one dead letter."""

    task_id: str
    replayed: bool
    detail: str  # the new deadline, or why it was left in the dead queue

    def line(self) -> str:
        """One line for the CLI."""
        return f"{'replayed' if self.replayed else 'left    '}  {self.task_id}  {self.detail}"


def reissue(
    task: Task, *, issuer: str, queue_timeout_ms: int | None = None, at_ms: int | None = None
) -> Task:
    """The same task, issued again now: a fresh deadline, the original queue window by default.

    Everything else is kept, the attempt number included: the replay is that attempt run
    again (as a broker redelivery would be), so its result answers the same task, token and
    attempt, and it gets what was left of its retry budget, not a new one.
    """
    issued = now_ms() if at_ms is None else at_ms
    window = task.queue_window_ms if queue_timeout_ms is None else queue_timeout_ms
    fields = task.model_dump()
    fields.update(issued_at_ms=issued, deadline_ms=issued + window, issuer=issuer)
    return Task.model_validate(fields)


async def replay(
    amqp_url: str,
    capability: str,
    *,
    keyring: KeyRing,
    signer: Signer,
    task_id: str | None = None,
    issuer: str = "dead-replay",
    queue_timeout_ms: int | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[ReplayOutcome]:
    """Re-dispatch dead tasks of ``capability`` (one by ``task_id``, or all of them).

    Each is verified, reissued (:func:`reissue`), signed with ``signer``, published
    ``mandatory`` to ``wayang.tasks`` and confirmed, and only then acked out of the dead
    queue. One that cannot be (garbage body, bad signature, no queue, full queue) stays
    there, with the reason in its outcome.
    """
    outcomes: list[ReplayOutcome] = []
    async with _hold(amqp_url, capability, limit) as held:
        channel = await held.connection.channel(publisher_confirms=True, on_return_raises=True)
        publisher = ConfirmedPublisher(channel, reconnect_wait_s=10.0)
        for message in held.messages:
            dead = dead_letter_of(message, capability)
            if task_id is not None and (dead.task_id != task_id or outcomes):
                continue
            outcome = await _replay_one(
                message, dead, publisher, keyring, signer, issuer, queue_timeout_ms
            )
            if outcome.replayed:
                await settle(message, discard(outcome.task_id))
            outcomes.append(outcome)
    return outcomes


async def _replay_one(
    message: AbstractIncomingMessage,
    dead: DeadLetter,
    publisher: ConfirmedPublisher,
    keyring: KeyRing,
    signer: Signer,
    issuer: str,
    queue_timeout_ms: int | None,
) -> ReplayOutcome:
    try:
        task = open_verified(message.body, message.headers or {}, keyring, Task)
    except WireError as exc:
        return ReplayOutcome(dead.task_id, False, f"cannot be replayed: {exc.message}")
    fresh = reissue(task, issuer=issuer, queue_timeout_ms=queue_timeout_ms)
    try:
        await publisher.publish(
            names.TASKS_EXCHANGE,
            placement.routing_key(fresh),  # a policy's task is placed again
            to_amqp(task_message(fresh, signer)),
            mandatory=True,
        )
    except Unroutable:
        return ReplayOutcome(dead.task_id, False, f"no queue serves {fresh.capability!r}")
    except Rejected:
        return ReplayOutcome(dead.task_id, False, f"{names.task_queue(fresh.capability)} is full")
    except PublishFailed as exc:
        return ReplayOutcome(dead.task_id, False, f"not confirmed by the broker: {exc.message}")
    window_s = fresh.queue_window_ms / 1000
    return ReplayOutcome(
        dead.task_id,
        True,
        f"to {fresh.capability} as attempt {fresh.attempt}, deadline in {window_s:g}s",
    )


async def purge(amqp_url: str, capability: str) -> int:
    """Delete every ready dead letter of ``capability``; returns how many."""
    connection = await connect(amqp_url, f"wayang-mq dead {new_id()[:8]}")
    try:
        channel = await connection.channel()
        await _ready_count(channel, capability)  # a clear error when the queue is missing
        queue = await channel.get_queue(names.dead_queue(capability), ensure=False)
        purged = await queue.purge()
        return int(purged.message_count or 0)
    finally:
        await connection.close()
