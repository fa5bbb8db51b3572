"""What a payment provider does for the executors: charge once per key, refund once per key.

A provider is the ledger in PostgreSQL (:mod:`.ledger`) or a Stripe-style HTTP API
(:mod:`.stripe`). Both promise the same thing: a request repeated with the same idempotency
key (a redelivery, a retry, a replay) charges or refunds at most once, and answers with what
the first one did, marked ``already_charged`` / ``already_refunded``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from wayang_mq import ErrorCode, ExecutorError

__all__ = [
    "ChargeRequest",
    "Charged",
    "Provider",
    "RefundRequest",
    "Refunded",
    "refused",
    "unavailable",
]


@dataclass(frozen=True)
class ChargeRequest:
    """Move ``amount`` minor units of ``currency`` from ``source`` to ``destination``."""

    idempotency_key: str
    amount: int
    currency: str
    source: str
    destination: str | None  # None: the provider's merchant account
    description: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    task_id: str = ""


@dataclass(frozen=True)
class Charged:
    """A charge that happened (now, or before under the same key)."""

    charge_id: str
    amount: int
    currency: str
    source: str
    destination: str | None
    idempotency_key: str
    already_charged: bool

    def output(self) -> dict[str, Any]:
        """The task's output."""
        return {
            "charge_id": self.charge_id,
            "amount": self.amount,
            "currency": self.currency,
            "source": self.source,
            "destination": self.destination,
            "status": "succeeded",
            "idempotency_key": self.idempotency_key,
            "already_charged": self.already_charged,
        }


@dataclass(frozen=True)
class RefundRequest:
    """Give back (part of) a charge named by its id or by its idempotency key."""

    idempotency_key: str
    charge_id: str | None
    charge_key: str | None
    amount: int | None  # None: all that is left of the charge
    reason: str | None = None
    task_id: str = ""


@dataclass(frozen=True)
class Refunded:
    """A refund that happened, or the void of a charge that never happened."""

    refund_id: str
    amount: int
    currency: str | None
    charge_id: str | None
    idempotency_key: str
    already_refunded: bool
    voided: bool = False  # the charge's key never charged: now it never will

    def output(self) -> dict[str, Any]:
        """The task's output."""
        return {
            "refund_id": self.refund_id,
            "amount": self.amount,
            "currency": self.currency,
            "charge_id": self.charge_id,
            "idempotency_key": self.idempotency_key,
            "already_refunded": self.already_refunded,
            "voided": self.voided,
        }


class Provider(Protocol):
    """A place where money moves. ``open`` before the first request, ``close`` after the last."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def charge(self, request: ChargeRequest) -> Charged: ...

    async def refund(self, request: RefundRequest) -> Refunded: ...


def refused(reason: str, message: str, **details: object) -> ExecutorError:
    """A permanent refusal (not retryable): ``details.reason`` says which."""
    return ExecutorError(
        message,
        code=ErrorCode.EXECUTOR_ERROR,
        retryable=False,
        details={"reason": reason, **details},
    )


def unavailable(
    reason: str, message: str, retry_after_s: float | None = None, **details: object
) -> ExecutorError:
    """A transient failure: retrying the task (with the same key) is safe."""
    return ExecutorError(
        message,
        code=ErrorCode.EXECUTOR_ERROR,
        retryable=True,
        retry_after_s=retry_after_s,
        details={"reason": reason, **details},
    )
