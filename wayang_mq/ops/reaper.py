"""The reaper: turns the broker's dead letters into terminal FAILED results.

When RabbitMQ dead-letters a task (it expired in its queue, crashed its workers past the
delivery limit, was rejected, or fell off a full queue), nobody has answered it: the worker
never got it, or died with it. The reaper consumes ``wayang.reaper``, which ``wayang.dlx``
fills with a copy of every dead letter, and for each one reads the reason, opens the task if
its signature verifies, dispatches the compensation the task names (the reaper decided this
failure, so it compensates, as a worker does for the failures it decides), publishes a FAILED
result to the task's reply address, waits for the broker's confirm, and only then acks. Copies
that a worker made itself (header ``wayang-dead-lettered-by``) were answered by that worker
already: they are acked and nothing else. The other copy of each dead letter stays in
``wayang.dead.<capability>``.

Run it with ``wayang-mq reaper``; one is enough, more share the queue.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from wayang_mq.amqp.daemon import Daemon
from wayang_mq.amqp.outcome import (
    LogLine,
    Outcome,
    Send,
    Settle,
    discard,
    done,
    reject,
    requeue,
    settle,
)
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.core import names
from wayang_mq.core.bounded import LastSeen
from wayang_mq.core.envelope import TaskChecks, open_task
from wayang_mq.core.errors import ConfigError, ErrorCode, SignatureError, WireError
from wayang_mq.core.fields import printable
from wayang_mq.core.model import DEFAULT_AUDIENCE, ErrorInfo, JsonLike, Result, Task
from wayang_mq.core.signing import KEY_ID_HEADER, KeyRing, Signer
from wayang_mq.core.wire import DEFAULT_MAX_BODY_BYTES, signed_message
from wayang_mq.observability import tracing
from wayang_mq.observability.metrics import ReaperMetrics
from wayang_mq.ops.deadletters import DeadLetter, dead_letter_of
from wayang_mq.runtime.attempts import dispatch_compensation
from wayang_mq.topology.spec import RetryTier

log = logging.getLogger("wayang_mq.ops.reaper")

#: codes a workflow engine may try again (a fresh task): the task itself was not at fault
_RETRYABLE = frozenset({ErrorCode.TIMEOUT, ErrorCode.BACKPRESSURE})


@dataclass(frozen=True)
class ReaperConfig:
    """How one reaper runs; built once by the CLI or a test."""

    amqp_url: str = field(repr=False)
    keyring: KeyRing  # tasks whose signature verifies are answered with their own ids and token
    signer: Signer  # results and compensations are signed like an executor's
    reaper_id: str = field(default_factory=lambda: names.default_id("reaper"))
    prefetch: int = 32
    grace_s: float = 10.0  # on stop: how long answers in flight may finish
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    audience: str = DEFAULT_AUDIENCE  # the deployment: tasks for another are not answered
    retry_tiers: tuple[RetryTier, ...] = ()  # compensations travel through the shortest
    recent: int = 10_000  # outcomes remembered, by task id (tests and status)
    health_port: int | None = None  # answer health probes over HTTP on this port (0: any)
    metrics_port: int | None = None  # count, and serve /metrics on this port (0: any)
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.prefetch < 1:
            raise ConfigError("prefetch must be at least 1")
        if not names.valid_word(self.reaper_id):
            raise ConfigError(
                f"reaper id {self.reaper_id!r} must be lowercase letters, digits, '-' or '_'"
            )


class Handled(StrEnum):
    """What the reaper did with a dead letter."""

    ANSWERED = "answered"  # it published the FAILED result
    SKIPPED = "skipped"  # a worker dead-lettered it and had answered it already


class Reaper(Daemon):
    """Answers dead-lettered tasks with FAILED results until ``stop()``."""

    kind = "reaper"

    def __init__(self, config: ReaperConfig) -> None:
        super().__init__(
            config.amqp_url,
            config.reaper_id,
            prefetch=config.prefetch,
            grace_s=config.grace_s,
            health_port=config.health_port,
            metrics_port=config.metrics_port,
            metrics_host=config.metrics_host,
        )
        self.config = config
        self.reaper_id = config.reaper_id
        self._recent: LastSeen[Handled] = LastSeen(config.recent)
        self._metrics: ReaperMetrics | None = None
        if self.registry is not None:
            self.metrics = self._metrics = ReaperMetrics(self.registry, self.reaper_id, self.ready)

    def handled(self, task_id: str) -> Handled | None:
        """What became of a recent dead letter of ``task_id``, if this reaper saw one."""
        return self._recent.get(task_id)

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Consume ``wayang.reaper``; the queue belongs to the topology."""
        await self.consume(names.REAPER_QUEUE, self._handle, hint="run `wayang-mq topology apply`")

    def describe(self) -> dict[str, Any]:
        """The queue it answers."""
        return {"queue": names.REAPER_QUEUE}

    # -- one dead letter ------------------------------------------------------------------

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """Every dead letter becomes one Outcome, carried out by ``settle``."""
        dead = dead_letter_of(message)
        if self._metrics is not None:
            self._metrics.received(dead.capability, dead.code)
        try:
            try:
                outcome = await self._decide(dead, message)
            except Exception:
                # A bug here must not loop: drop this copy; the one in wayang.dead.<cap> stays.
                log.exception("event=dead_letter.unanswerable task_id=%s", dead.task_id)
                outcome = reject(dead.task_id, "a bug in the reaper (logged above)")
            applied = await settle(message, outcome, self.publisher)
        except asyncio.CancelledError:
            # stopped mid-answer: the next reaper answers it
            await settle(message, requeue(dead.task_id, "the reaper stopped"))
            raise
        except Exception:
            # A bug in carrying the outcome out must not strand the dead letter either.
            log.exception("event=dead_letter.unanswerable task_id=%s", dead.task_id)
            await settle(message, requeue(dead.task_id, "a bug in settling (logged above)"))
            return
        if applied.settle is Settle.ACK:
            self._recent.put(dead.task_id, Handled.ANSWERED if applied.sends else Handled.SKIPPED)
            if self._metrics is not None:
                self._metrics.handled(dead.capability, _handled(dead, applied))

    async def _decide(self, dead: DeadLetter, message: AbstractIncomingMessage) -> Outcome:
        """Skip a copy a worker answered already; otherwise compensate and answer it."""
        if dead.answered:
            skipped = {
                "capability": dead.capability,
                "code": dead.code,
                "by": dead.dead_lettered_by,
            }
            return discard(dead.task_id, LogLine("dead_letter.skipped", fields=skipped))
        task, unread = self._open(message.body, message.headers or {})
        if task is None:
            # Nothing in a body nobody could verify may choose where a signed FAILED goes:
            # the copy in wayang.dead.<cap> (if any) stays for inspection.
            why: dict[str, Any] = {
                "capability": printable(dead.capability),
                "reason": dead.broker_reason,
                "code": unread.code if unread is not None else None,
                "why": unread.message if unread is not None else None,
                "answered": "no",
            }
            event = "dead_letter.unanswerable"
            if isinstance(unread, SignatureError):
                key_id = (message.headers or {}).get(KEY_ID_HEADER)
                why["key_id"] = printable(str(key_id)[:64]) if key_id is not None else None
                event = "security.refused"
            return discard(dead.task_id, LogLine(event, logging.WARNING, why))
        # its answer and compensation continue the task's trace, and its lines carry it
        incoming = tracing.from_headers(message.headers)
        trace = incoming.child() if incoming is not None else tracing.new_trace()
        tracing.bind_task(task, self.reaper_id, trace)
        result, reply_to = _failure(dead, task, self.reaper_id)
        result = await self._compensate(message, task, result)
        signed = signed_message(
            result,
            self.config.signer,
            message_id=result.task_id,
            reply_to=reply_to,
            extra_headers=trace.headers(),
        )
        # Not confirmed (the broker went away past the publisher's reconnect wait, or refused
        # it): back to the queue after a pause, to be answered once the broker takes results.
        answer = Send(
            names.RESULTS_EXCHANGE,
            reply_to,
            to_amqp(signed),
            unconfirmed_event="dead_letter.unanswered",
            backoff_s=1.0,
        )
        assert result.error is not None
        fields: dict[str, Any] = {
            "capability": result.capability,
            "code": result.error.code,
            "reason": dead.broker_reason,
            "queue": dead.source_queue,
            "reply_to": reply_to,
            "compensation_task_id": result.compensation_task_id,
        }
        line = LogLine("dead_letter.answered", logging.WARNING, fields)
        return done(result.task_id, answer, result=result, log=line)

    def _open(self, body: bytes, headers: dict[str, Any]) -> tuple[Task | None, WireError | None]:
        """The task if it verifies and its issuer may send it, else why not. Its deadline
        is not checked: many dead letters died of it."""
        checks = TaskChecks(
            audience=self.config.audience, max_body_bytes=self.config.max_body_bytes
        )
        try:
            return open_task(body, headers, self.config.keyring, checks, times=False).task, None
        except WireError as exc:
            return None, exc

    async def _compensate(
        self, message: AbstractIncomingMessage, task: Task, result: Result
    ) -> Result:
        """The reaper decided this failure, so it dispatches the compensation (the issuer's
        task with the reaper's signed attempt record)."""
        return await dispatch_compensation(
            message.body,
            message.headers or {},
            task,
            result,
            publisher=self.publisher,
            signer=self.config.signer,
            decider_id=self.reaper_id,
            tiers=self.config.retry_tiers,
            queue_exists=self.queue_exists,
        )


def _handled(dead: DeadLetter, applied: Outcome) -> str:
    """The metrics' word for an acked dead letter."""
    if applied.sends:
        return "answered"
    return "skipped" if dead.answered else "unanswerable"


def _failure(dead: DeadLetter, task: Task, reaper_id: str) -> tuple[Result, str]:
    """The FAILED result and its routing key: the task's own ids and signed reply address."""
    result = Result.failure(task, reaper_id, _error_info(dead))
    return result, task.reply_to or names.noreply_routing_key(task.capability)


def _error_info(dead: DeadLetter) -> ErrorInfo:
    """The broker's reason as an error."""
    code, message = dead.code, dead.message
    details: dict[str, JsonLike] = {
        "dead_letter_reason": dead.broker_reason,
        "queue": dead.source_queue,
        "dead_letter_queue": names.dead_queue(dead.capability),
        "dead_at_ms": dead.dead_at_ms,
    }
    return ErrorInfo(
        code=code,
        message=message,
        retryable=code in _RETRYABLE,
        details={k: v for k, v in details.items() if v is not None},
    )
