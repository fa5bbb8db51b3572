"""What becomes of a task once it has a result: the worker's decisions, as :class:`Outcome`
values (nothing here publishes or acks; :func:`~wayang_mq.amqp.outcome.settle` does).

- a failure the task's retry hints allow again: RETRY, the next attempt (the issuer's task with
  this executor's signed attempt record, :mod:`~wayang_mq.runtime.attempts`) to its tier; if
  no tier queue takes it, the task's final answer instead;
- a PENDING result: PENDING, the result published, the delivery acked;
- otherwise DONE: with retries exhausted, a copy of the delivery kept in the dead queue first,
  then the compensation the task names if it failed for good, then the result;
- a delivery refused as bad input: DEAD_LETTER, a copy with the reason to the dead queue;
  answered FAILED only when the task itself verified and its issuer was allowed to send it
  (otherwise nothing in it, reply address included, is the sender's to choose).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from wayang_mq.amqp.frames import writable_headers
from wayang_mq.amqp.outcome import Kind, LogLine, Outcome, Send, Settle, done
from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp
from wayang_mq.core import deadnotes, names, placement, retry
from wayang_mq.core.envelope import ATTEMPT_HEADERS
from wayang_mq.core.errors import ErrorCode, SignatureError, WireError
from wayang_mq.core.fields import TASK_ID_BYTES, printable, valid_id
from wayang_mq.core.model import AttemptRecord, ErrorInfo, Result, Task, new_id, now_ms
from wayang_mq.core.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Signer
from wayang_mq.core.wire import (
    APP_ID,
    DEAD_LETTERED_BY_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    HEADERS_DROPPED_HEADER,
    PARTITION_KEY_HEADER,
    signed_message,
)
from wayang_mq.observability import tracing
from wayang_mq.runtime.attempts import (
    carried_compensation,
    carried_token,
    derived_message,
    dispatch_compensation,
    issuer_window_ms,
)
from wayang_mq.topology.spec import RetryTier


class Decider:
    """Turns a task and its result (or a refused delivery) into the delivery's Outcome."""

    def __init__(
        self,
        executor_id: str,
        signer: Signer,
        retry_tiers: tuple[RetryTier, ...],
        publisher: Callable[[], ConfirmedPublisher],
        queue_exists: Callable[[str], Awaitable[bool]],
    ) -> None:
        self._queue_exists = queue_exists  # a compensation's queue is checked before it goes
        self._executor_id = executor_id
        self._signer = signer
        self._tiers = retry_tiers
        self._publisher = publisher  # compensations are published while deciding

    async def conclude(
        self, capability: str, message: AbstractIncomingMessage, task: Task, result: Result
    ) -> Outcome:
        """The next attempt through a retry tier, a PENDING acceptance, or the final answer."""
        if message.redelivered:  # ran again after the broker gave it back: the record says so
            result = result.model_copy(update={"metrics": {**result.metrics, "redelivered": 1.0}})
        if not result.terminal:
            return self.accepted(task, result)
        error = result.error
        decision = retry.decide(task, error, self._tiers) if error else None
        if decision is not None:
            return self._retry(capability, message, task, result, decision)
        return await self._final(capability, message, task, result)

    def accepted(self, task: Task, pending: Result) -> Outcome:
        """PENDING: the result published, the delivery acked; the answer comes later."""
        line = LogLine("task.accepted", fields={"attempt": task.attempt})
        send = self.result_send(task, pending)
        return Outcome(Kind.PENDING, Settle.ACK, task.task_id, (send,), pending, line)

    async def _final(
        self, capability: str, message: AbstractIncomingMessage, task: Task, result: Result
    ) -> Outcome:
        """The terminal result; with retries exhausted, a copy kept in the dead queue first."""
        sends: list[Send] = []
        error = result.error
        if error is not None and retry.exhausted(task, error):
            result = _exhausted(result)
            reason = result.error.message if result.error else ""
            sends.append(
                self.dead_copy(
                    capability, message, task.task_id, ErrorCode.RETRIES_EXHAUSTED, reason, task
                )
            )
        result = await dispatch_compensation(
            message.body,
            message.headers or {},
            task,
            result,
            publisher=self._publisher(),
            signer=self._signer,
            decider_id=self._executor_id,
            tiers=self._tiers,
            queue_exists=self._queue_exists,
        )
        sends.append(self.result_send(task, result))
        return done(task.task_id, *sends, result=result)

    def _retry(
        self,
        capability: str,
        message: AbstractIncomingMessage,
        task: Task,
        failed: Result,
        decision: retry.RetryDecision,
    ) -> Outcome:
        """The next attempt to its tier; if no tier queue takes it, the final answer instead.

        The next attempt keeps its schedule-to-start window, counted from when it leaves the
        tier, so a long backoff does not eat the time it may wait for a worker.
        """
        record = AttemptRecord(
            task_id=task.task_id,
            attempt=decision.attempt,
            deadline_ms=now_ms() + decision.tier.ttl_ms + issuer_window_ms(message.body, task),
            executor_id=self._executor_id,
            compensates=carried_compensation(message.headers or {}),
            token=carried_token(message.headers or {}),
        )
        # a placed task's retry comes due at place.<cap> (retry.<tier>.place.<cap>): placed again
        key = names.retry_routing_key(decision.tier.name, placement.routing_key(task))
        headers = message.headers or {}
        message_out = derived_message(message.body, headers, task, record, self._signer)
        send = Send(
            names.RETRY_EXCHANGE,
            key,
            message_out,
            mandatory=True,
            unconfirmed_event="retry.unconfirmed",
        )
        fields = {
            "attempt": decision.attempt,
            "backoff_ms": decision.backoff_ms,
            "tier": decision.tier.name,
            "code": failed.error.code if failed.error else None,
        }
        return Outcome(
            Kind.RETRY,
            Settle.ACK,
            task.task_id,
            (send,),
            result=failed,
            log=LogLine("task.retrying", fields=fields),
            if_unroutable=lambda: self._final(capability, message, task, failed),
        )

    def result_send(self, task: Task, result: Result) -> Send:
        """The result, to be confirmed before the delivery may be acked."""
        routing_key = task.reply_to or names.noreply_routing_key(task.capability)
        signed = signed_message(
            result,
            self._signer,
            message_id=task.task_id,
            reply_to=routing_key,
            extra_headers=tracing.headers(),  # the task's trace, continued
        )
        return Send(names.RESULTS_EXCHANGE, routing_key, to_amqp(signed))

    def bad_input(
        self, capability: str, message: AbstractIncomingMessage, error: WireError
    ) -> Outcome:
        """Bad input: a copy with the reason to the dead queue, then ack; a FAILED answer only
        for a task that verified and that its issuer was allowed to send (refused for its
        deadline, clocks, queue or reply address), with its own ids and token, at its signed
        reply address. Anything else is answered to nobody: a body nobody could verify, or
        a security refusal, would otherwise let its sender choose where a signed FAILED goes
        (docs/security.md §6). Security refusals are logged as ``security.refused``."""
        code = error.code or ErrorCode.INVALID_TASK
        task = error.task if isinstance(error.task, Task) else None
        task_id = task.task_id if task else _property_id(message.message_id, TASK_ID_BYTES)
        task_id = task_id or _property_id(message.correlation_id, TASK_ID_BYTES)
        task_id = task_id or f"unknown-{new_id()}"
        sends = [self.dead_copy(capability, message, task_id, code, error.message, task)]
        if task is not None:
            failure = ErrorInfo(code=code, message=error.message)
            answer = Result.failure(task, self._executor_id, failure)
            reply_to = task.reply_to
            if not names.valid_reply_address(reply_to):
                reply_to = names.noreply_routing_key(task.capability)
            sends.append(self._courtesy(task_id, reply_to, answer))
        fields: dict[str, str | None] = {
            "capability": capability,
            "code": code,
            "reason": printable(error.message),
        }
        event, level = "task.dead_lettered", logging.WARNING
        if isinstance(error, SignatureError):
            key_id = (message.headers or {}).get(KEY_ID_HEADER)
            fields["key_id"] = printable(str(key_id)[:64]) if key_id is not None else None
            fields["answered"] = "yes" if task is not None else "no"
            event = "security.refused"
        return Outcome(
            Kind.DEAD_LETTER,
            Settle.ACK,
            task_id,
            tuple(sends),
            log=LogLine(event, level, fields),
            code=code,
        )

    def _courtesy(self, task_id: str, reply_to: str, answer: Result) -> Send:
        """The FAILED answer to refused input: a courtesy, since the dead copy is what keeps
        the task; it may be lost with a broker (never retried, never blocks the ack)."""
        signed = signed_message(answer, self._signer, message_id=task_id, reply_to=reply_to)
        return Send(names.RESULTS_EXCHANGE, reply_to, to_amqp(signed), if_unconfirmed=None)

    def dead_copy(
        self,
        capability: str,
        message: AbstractIncomingMessage,
        task_id: str,
        code: ErrorCode,
        reason: str,
        task: Task | None = None,
    ) -> Send:
        """A copy of the delivery, with the reason, for ``wayang.dlx``; with the ``task`` (when
        it could be read), its attempt and a redacted preview of its input too.

        If the broker does not confirm it, the delivery is rejected instead, so the queue's
        own dead-lettering (reason ``rejected``) keeps it: never lost.
        """
        kept, dropped = writable_headers(message.headers or {}, _KEPT_ON_COPIES)
        # The retry hop's x-death is history, not this copy's reason (core.deadnotes).
        kept, history = deadnotes.split_history(kept)
        died_ms = now_ms()
        # RabbitMQ sorts a header table by name; with no x-death left, these are its reason.
        headers: dict[str, Any] = {
            ERROR_CODE_HEADER: str(code),
            ERROR_MESSAGE_HEADER: reason[:1000],
            deadnotes.CAPABILITY_HEADER: capability,
            deadnotes.DEAD_AT_HEADER: deadnotes.iso_time(died_ms),
            DEAD_LETTERED_BY_HEADER: self._executor_id,
        }
        if task is not None:
            headers[deadnotes.TASK_ATTEMPT_HEADER] = task.attempt
            headers[deadnotes.INPUT_PREVIEW_HEADER] = deadnotes.input_preview(task.input)
        if history is not None:
            headers[deadnotes.RETRY_HISTORY_HEADER] = history
        headers.update((k, v) for k, v in kept.items() if k not in headers)
        if dropped is not None:
            headers[HEADERS_DROPPED_HEADER] = dropped
        # No expiration on the copy: a dead letter must wait for inspection, not expire.
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            message_id=task_id,
            correlation_id=task_id,
            content_type=message.content_type,
            type=message.type,
            reply_to=message.reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=died_ms // 1000,  # when it died, as the broker's own x-death says
            app_id=APP_ID,
        )
        return Send(
            names.DEAD_COPY_EXCHANGE,
            capability,
            copy,
            if_unconfirmed=Settle.REJECT,
            unconfirmed_event="dead_letter.rejected",
        )


#: what a dead-letter copy keeps when the delivery's headers cannot be copied whole: enough to
#: verify and replay it
_KEPT_ON_COPIES = (KEY_ID_HEADER, SIGNATURE_HEADER, PARTITION_KEY_HEADER, *ATTEMPT_HEADERS)


def _property_id(value: object, max_bytes: int) -> str | None:
    """An AMQP property read off an untrusted delivery, if it can be carried as an id."""
    return value if isinstance(value, str) and valid_id(value, max_bytes) else None


def _exhausted(result: Result) -> Result:
    """The last attempt's failure, restated as the task's terminal ``retries_exhausted``."""
    last = result.error
    assert last is not None
    error = ErrorInfo(
        code=ErrorCode.RETRIES_EXHAUSTED,
        message=f"all {result.attempt} attempts failed; last: {last.code}: {last.message}",
        details={"last_error": last.model_dump(mode="json")},
    )
    return result.model_copy(update={"error": error})
