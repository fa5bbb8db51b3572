"""Retry decisions, pure logic: backoff, tier choice, and when a failure is final."""

from __future__ import annotations

import pytest

from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.model import ErrorInfo, RetryHints, Task
from wayang_mq.core.retry import backoff_ms, decide, pick_tier
from wayang_mq.topology.spec import RetryTier

TIERS = (
    RetryTier(name="1s", ttl_ms=1000),
    RetryTier(name="5s", ttl_ms=5000),
    RetryTier(name="30s", ttl_ms=30_000),
)
RETRYABLE = ErrorInfo(code=ErrorCode.EXECUTOR_ERROR, retryable=True)


def _task(attempt: int = 1, **hints: object) -> Task:
    retry = RetryHints(**({"max_attempts": 5} | hints))  # type: ignore[arg-type]
    return Task.create("demo.fail", retry=retry, attempt=attempt)


def test_backoff_grows_by_the_multiplier_and_stops_at_the_cap() -> None:
    delays = [
        backoff_ms(_task(n, initial_backoff_ms=1000, backoff_multiplier=3.0, max_backoff_ms=20_000))
        for n in (1, 2, 3, 4)
    ]
    assert delays == [1000, 3000, 9000, 20_000]


def test_an_executors_retry_after_wins_when_longer() -> None:
    assert backoff_ms(_task(1, initial_backoff_ms=1000), retry_after_ms=7000) == 7000
    assert backoff_ms(_task(1, initial_backoff_ms=1000), retry_after_ms=10) == 1000


@pytest.mark.parametrize(
    ("delay", "tier"), [(10, "1s"), (1000, "1s"), (4999, "1s"), (5000, "5s"), (600_000, "30s")]
)
def test_the_longest_tier_not_longer_than_the_backoff_is_chosen(delay: int, tier: str) -> None:
    assert pick_tier(delay, TIERS).name == tier


def test_a_retryable_failure_with_attempts_left_is_retried_as_the_next_attempt() -> None:
    decision = decide(_task(2, initial_backoff_ms=1000, backoff_multiplier=5.0), RETRYABLE, TIERS)
    assert decision is not None
    assert (decision.attempt, decision.backoff_ms, decision.tier.name) == (3, 5000, "5s")


@pytest.mark.parametrize(
    ("task", "error"),
    [
        (_task(1), ErrorInfo(code=ErrorCode.EXECUTOR_ERROR, retryable=False)),
        (_task(5), RETRYABLE),
        (_task(1, non_retryable=(ErrorCode.EXECUTOR_ERROR,)), RETRYABLE),
        (_task(1), ErrorInfo(code=ErrorCode.CANCELLED, retryable=True)),
        (Task.create("demo.fail"), RETRYABLE),  # default hints: one attempt
    ],
    ids=["permanent", "out of attempts", "excluded code", "cancelled", "default one attempt"],
)
def test_a_final_failure_is_not_retried(task: Task, error: ErrorInfo) -> None:
    assert decide(task, error, TIERS) is None
