"""Retry decisions: whether a failed attempt is tried again, after how long, through which tier.

Delays are served by the topology's fixed-TTL tiers (``wayang.retry.<tier>``) rather than by
per-message TTL in one queue, because RabbitMQ expires messages only at the head of a queue:
a 5-minute retry would hold back every 1-second retry behind it. The delay a retry really
waits is therefore the TTL of the tier chosen for it: the longest tier not longer than the
backoff asks, or the shortest tier when the backoff is shorter than all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from wayang_mq.core import names
from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.model import ErrorInfo, Task

#: a positive count (strict: a TOML string is refused, not coerced)
Count = Annotated[int, Field(strict=True, ge=1)]


class RetryTier(BaseModel):
    """A fixed delay: retries wait ``ttl_ms`` in the tier's queue, then route back (declared in
    the topology's ``[[retry_tiers]]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    ttl_ms: Count
    max_length: Count | None = None

    @field_validator("name")
    @classmethod
    def _one_word(cls, name: str) -> str:
        # The tier is one word of the routing key retry.<tier>.<capability>.
        if not names.valid_word(name):
            raise ValueError(f"tier name {name!r} must be one lowercase word (e.g. 5s)")
        return name

    @property
    def queue(self) -> str:
        """The tier's queue."""
        return names.retry_queue(self.name)


@dataclass(frozen=True)
class RetryDecision:
    """Retry ``task`` as attempt ``attempt`` after ``tier.ttl_ms`` (asked: ``backoff_ms``)."""

    attempt: int
    backoff_ms: int
    tier: RetryTier


def backoff_ms(task: Task, retry_after_ms: int | None = None) -> int:
    """Exponential backoff for the attempt after ``task.attempt``, capped; an executor's
    ``retry_after`` wins when it asks for longer."""
    hints = task.retry
    delay = hints.initial_backoff_ms * hints.backoff_multiplier ** (task.attempt - 1)
    delay = min(delay, hints.max_backoff_ms)
    return int(max(delay, retry_after_ms or 0))


def pick_tier(delay_ms: int, tiers: Sequence[RetryTier]) -> RetryTier:
    """The longest tier not longer than ``delay_ms``; the shortest if all are longer."""
    if not tiers:
        raise ValueError("no retry tiers in the topology")
    ordered = sorted(tiers, key=lambda tier: tier.ttl_ms)
    fitting = [tier for tier in ordered if tier.ttl_ms <= delay_ms]
    return fitting[-1] if fitting else ordered[0]


def decide(task: Task, error: ErrorInfo, tiers: Sequence[RetryTier]) -> RetryDecision | None:
    """A retry, or None when the failure is final (not retryable, excluded, or out of attempts)."""
    if not tiers or not error.retryable:
        return None
    if error.code in task.retry.non_retryable or error.code is ErrorCode.CANCELLED:
        return None
    if task.attempt >= task.retry.max_attempts:
        return None
    delay = backoff_ms(task, error.retry_after_ms)
    return RetryDecision(task.attempt + 1, delay, pick_tier(delay, tiers))


def exhausted(task: Task, error: ErrorInfo) -> bool:
    """True when a retryable failure ends the task only because its attempts ran out."""
    excluded = error.code in task.retry.non_retryable or error.code is ErrorCode.CANCELLED
    return (
        error.retryable
        and not excluded
        and task.retry.max_attempts > 1
        and task.attempt >= task.retry.max_attempts
    )
