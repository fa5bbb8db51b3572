"""One error root for the fabric, and the closed set of error codes that tests and the wire share.

Every error knows whether retrying can help (``retryable``), so the layer that decides ack,
retry or dead-letter never has to guess from an exception's type.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Machine-readable reasons a task ends FAILED. Closed: the wire carries only these."""

    TIMEOUT = "timeout"  # queue, execution or heartbeat deadline passed
    CANCELLED = "cancelled"  # a cancel request reached the task
    INVALID_TASK = "invalid_task"  # body is not msgpack, or fails the task schema
    BAD_SIGNATURE = "bad_signature"  # missing, unknown key id, or forged signature
    TOKEN_EXPIRED = "token_expired"  # the task's deadline had passed when it was received
    NO_EXECUTOR = "no_executor"  # no queue serves the capability, or the worker does not
    DELIVERY_LIMIT = "delivery_limit"  # the task crashed its workers too often (poison)
    EXECUTOR_ERROR = "executor_error"  # the executor raised
    INVALID_RESULT = "invalid_result"  # the executor returned something that is not a result
    OVERSIZED = "oversized"  # body larger than the worker accepts
    RETRIES_EXHAUSTED = "retries_exhausted"  # every attempt the retry policy allowed failed
    BACKPRESSURE = "backpressure"  # the capability's queue is full
    # Security refusals (docs/security.md §6). A task refused with one of these is never
    # answered to its reply address: it goes to the dead queue and the security log.
    UNKNOWN_KEY = "unknown_key"  # signed by a key the receiver does not hold
    KEY_NOT_ALLOWED = "key_not_allowed"  # the key's role may not sign this (executor key, task)
    CAPABILITY_NOT_ALLOWED = "capability_not_allowed"  # the key's scope lacks the capability
    WRONG_AUDIENCE = "wrong_audience"  # meant for another deployment
    NOT_YET_VALID = "not_yet_valid"  # its not-before (or issue time) is still ahead
    REPLAYED = "replayed"  # this task attempt was already received within its validity
    BAD_ATTEMPT = "bad_attempt"  # a retry or compensation record that does not hold
    SECRET_UNAVAILABLE = "secret_unavailable"  # a referenced secret is unknown or unreadable


class WayangError(Exception):
    """Root of every error wayang-mq raises on purpose.

    ``hint`` says what to do about it; the CLI prints ``message`` and ``hint`` on one line.
    """

    code: ErrorCode | None = None
    retryable: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and what to do, as the CLI prints it."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(WayangError):
    """A setting, file or argument is wrong; fix the input and run again."""


class StackError(WayangError):
    """The local broker or database could not be started or reached."""


class BrokerUnreachable(WayangError):
    """The AMQP broker did not answer or refused our credentials."""

    retryable = True


class DatabaseUnavailable(WayangError):
    """PostgreSQL did not answer, refused us, or is not migrated; the message says which."""

    retryable = True


class TopologyError(WayangError):
    """The declarative topology file is malformed or could not be applied."""


class WireError(WayangError):
    """A message could not be decoded; carries the raw body so it can be dead-lettered intact."""

    code = ErrorCode.INVALID_TASK

    def __init__(
        self, message: str, *, body: bytes = b"", hint: str | None = None, task: object = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.body = body
        # The task, when the body verified and decoded but was refused all the same (deadline
        # passed, clock out of bounds, wrong queue): its answer can then carry the real token.
        self.task = task


class InvalidMessage(WireError):
    """The body is not msgpack, or does not match the schema its ``type`` names."""


class OversizedMessage(WireError):
    """The body is larger than the receiver accepts."""

    code = ErrorCode.OVERSIZED


class SignatureError(WireError):
    """The signature is missing, names an unknown key, or does not match the body."""

    code = ErrorCode.BAD_SIGNATURE


class UnknownKey(SignatureError):
    """Signed by a key id the receiver does not hold."""

    code = ErrorCode.UNKNOWN_KEY


class KeyNotAllowed(SignatureError):
    """The signature holds, but the key's role or identity may not sign this message."""

    code = ErrorCode.KEY_NOT_ALLOWED


class CapabilityNotAllowed(SignatureError):
    """The signature holds, but the key's scope does not cover the message's capability."""

    code = ErrorCode.CAPABILITY_NOT_ALLOWED


class WrongAudience(SignatureError):
    """A verified task meant for another deployment."""

    code = ErrorCode.WRONG_AUDIENCE


class NotYetValid(SignatureError):
    """A verified task whose not-before (or issue time) is further ahead than the skew allows."""

    code = ErrorCode.NOT_YET_VALID


class Replayed(SignatureError):
    """A verified task attempt this receiver has already taken within its validity."""

    code = ErrorCode.REPLAYED


class BadAttempt(SignatureError):
    """A retry or compensation whose attempt record is missing a piece or does not hold."""

    code = ErrorCode.BAD_ATTEMPT


class TokenExpired(WireError):
    """The task's deadline had passed before it could start."""

    code = ErrorCode.TOKEN_EXPIRED


class ExecutorError(WayangError):
    """Raised by executor code: says whether the fabric may retry, and after how long."""

    code = ErrorCode.EXECUTOR_ERROR

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        retry_after_s: float | None = None,
        code: ErrorCode = ErrorCode.EXECUTOR_ERROR,
        details: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.code = code
        self.details = details or {}


class WrongCapability(WireError):
    """A task arrived on a queue of a capability it does not name, or the worker does not serve."""

    code = ErrorCode.NO_EXECUTOR


class NoExecutor(WayangError):
    """No queue is bound for the capability: the broker returned the task unrouted."""

    code = ErrorCode.NO_EXECUTOR

    def __init__(self, capability: str) -> None:
        super().__init__(
            f"no queue serves capability {capability!r}: the broker returned the task unrouted",
            hint="add the capability to topology/wayang.toml and run `wayang-mq topology apply`",
        )
        self.capability = capability


class Backpressure(WayangError):
    """The capability's queue is full and stayed full for the whole bounded retry."""

    code = ErrorCode.BACKPRESSURE
    retryable = True

    def __init__(self, queue: str, waited_s: float) -> None:
        super().__init__(
            f"queue {queue} is full (the broker refused the task for {waited_s:.1f}s)",
            hint="start more workers for it, or raise its max_length in topology/wayang.toml",
        )
        self.queue = queue


class BrokerBlocked(Backpressure):
    """The broker blocked publishing (a memory or disk alarm) for longer than we may wait."""

    def __init__(self, waited_s: float) -> None:
        WayangError.__init__(
            self,
            f"the broker blocked publishing for {waited_s:.1f}s (a memory or disk alarm)",
            hint="free memory or disk on the broker (see its alarms in the console), then retry",
        )
        self.queue = ""


class TooManyOutstanding(Backpressure):
    """The dispatcher already has its ``max_outstanding`` tasks waiting for their results,
    and none ended within its bounded wait: the task was not published."""

    def __init__(self, limit: int, waited_s: float) -> None:
        WayangError.__init__(
            self,
            f"{limit} tasks already wait for their results on this dispatcher, its "
            f"max_outstanding (none ended in {waited_s:.1f}s); the task was not published",
            hint="await results before submitting more, or raise DispatcherConfig."
            "max_outstanding (about 7 KB of dispatcher memory per outstanding task)",
        )
        self.queue = ""
        self.limit = limit


class PublishFailed(WayangError):
    """A publish was not confirmed by the broker (channel closed or nack)."""

    retryable = True


class ResultTimeout(WayangError):
    """No terminal result arrived within the caller's wait."""

    code = ErrorCode.TIMEOUT
