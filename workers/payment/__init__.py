"""``payment.charge`` and ``payment.refund``: move money once per idempotency key.

Run ``wayang-mq worker wayang_workers.payment:Charge --config worker.toml --secrets env``:
:class:`Charge` serves both capabilities and reads the table ``[payment.charge]``, which
picks the provider (``ledger``: PostgreSQL; ``http``: a Stripe-style API). :class:`Refund`
serves only ``payment.refund`` (table ``[payment.refund]``, same keys), for workers kept apart.
docs/executors.md is the contract.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from pydantic.functional_validators import AfterValidator

from wayang_mq import Executor, Task
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.model import JsonLike
from wayang_mq.runtime.settings import SecretRef, parse_input

from .ledger import Ledger
from .money import MAX_AMOUNT, check_currency
from .providers import ChargeRequest, Provider, RefundRequest
from .stripe import StripeProvider

__all__ = ["Charge", "ChargeInput", "PaymentSettings", "Refund", "RefundInput"]

_ACCOUNT = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"

Account = Annotated[str, Field(pattern=_ACCOUNT)]
Amount = Annotated[StrictInt, Field(ge=1, le=MAX_AMOUNT)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$"), AfterValidator(check_currency)]
Key = Annotated[str, Field(min_length=1, max_length=200)]


class PaymentSettings(BaseModel):
    """``[payment.charge]``: which provider, and how to reach it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["ledger", "http"]
    merchant_account: Account | None = None
    # ledger
    dsn: str | SecretRef | None = None
    pool_size: int = Field(default=10, ge=1, le=200)
    create_schema: bool = True
    statement_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # http
    base_url: str | None = Field(default=None, pattern=r"^https?://")
    api_key: str | SecretRef | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    request_timeout_s: float = Field(default=30.0, gt=0, le=600)
    max_retries: int = Field(default=3, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.5, ge=0, le=60)

    @model_validator(mode="after")
    def _provider_has_what_it_needs(self) -> Self:
        if self.provider == "ledger" and (self.dsn is None or self.merchant_account is None):
            raise ValueError('provider "ledger" needs dsn and merchant_account')
        if self.provider == "http" and (self.base_url is None or self.api_key is None):
            raise ValueError('provider "http" needs base_url and api_key')
        return self


class ChargeInput(BaseModel):
    """A ``payment.charge`` task's input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: Amount  # minor units (cents), an integer
    currency: Currency  # ISO 4217, upper case
    source: Account  # who pays: a ledger account, or a customer / payment method id
    destination: Account | None = None  # who is paid; default the merchant account
    description: Annotated[str, Field(max_length=500)] | None = None
    metadata: Annotated[
        dict[
            Annotated[str, Field(min_length=1, max_length=40)],
            Annotated[str, Field(max_length=500)],
        ],
        Field(max_length=20),
    ] = Field(default_factory=dict)


class RefundInput(BaseModel):
    """A ``payment.refund`` task's input: the charge by id or by its idempotency key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    charge_id: Key | None = None
    charge_key: Key | None = None  # the charge's idempotency key (what a compensation knows)
    amount: Amount | None = None  # default: all that is left of the charge
    reason: Annotated[str, Field(max_length=200)] | None = None
    #: added by the fabric when the refund is a charge's compensation: {task_id, error}
    compensates: dict[str, JsonLike] | None = None

    @model_validator(mode="after")
    def _one_charge(self) -> Self:
        if (self.charge_id is None) == (self.charge_key is None):
            raise ValueError("give exactly one of charge_id and charge_key")
        return self


class Charge(Executor):
    """``payment.charge`` (and ``payment.refund``) through the configured provider."""

    serves: ClassVar[tuple[str, ...]] = ("payment.charge", "payment.refund")
    settings_model = PaymentSettings
    allowed_secrets: ClassVar[
        tuple[str, ...]
    ] = ()  # tasks name no secrets: the provider's are the worker's settings

    def __init__(self, settings: PaymentSettings | None = None) -> None:
        if settings is None:
            raise ConfigError(
                f"{type(self).__name__} needs settings: [payment.charge] provider = ...",
                hint="see docs/executors.md, payment.charge",
            )
        self.settings = settings
        self._provider: Provider | None = None

    async def setup(self) -> None:
        """Resolve the secrets and open the provider (a ledger it cannot reach, or a bad
        secret, stops the worker from starting)."""
        s = self.settings
        provider: Provider
        if s.provider == "ledger":
            assert s.dsn is not None and s.merchant_account is not None
            provider = Ledger(
                await self.reveal(s.dsn),
                s.merchant_account,
                pool_size=s.pool_size,
                create_schema=s.create_schema,
                statement_timeout_s=s.statement_timeout_s,
            )
        else:
            assert s.base_url is not None and s.api_key is not None
            provider = StripeProvider(
                s.base_url,
                await self.reveal(s.api_key),
                merchant_account=s.merchant_account,
                connect_timeout_s=s.connect_timeout_s,
                request_timeout_s=s.request_timeout_s,
                max_retries=s.max_retries,
                retry_backoff_s=s.retry_backoff_s,
            )
        await provider.open()
        self._provider = provider

    async def teardown(self) -> None:
        """Close the provider."""
        if self._provider is not None:
            await self._provider.close()

    @property
    def provider(self) -> Provider:
        """The open provider."""
        if self._provider is None:
            raise RuntimeError(f"{type(self).__name__} is not set up")
        return self._provider

    async def execute(self, task: Task) -> JsonLike:
        # The key: the task's idempotency_key, else its id (kept by redeliveries, retries,
        # re-dispatches and replays, so each of them finds the first charge).
        key = task.idempotency_key or task.task_id
        if task.capability == "payment.refund":
            refund = parse_input(RefundInput, task.input)
            refunded = await self.provider.refund(
                RefundRequest(
                    idempotency_key=key,
                    charge_id=refund.charge_id,
                    charge_key=refund.charge_key,
                    amount=refund.amount,
                    reason=refund.reason,
                    task_id=task.task_id,
                )
            )
            return refunded.output()
        charge = parse_input(ChargeInput, task.input)
        charged = await self.provider.charge(
            ChargeRequest(
                idempotency_key=key,
                amount=charge.amount,
                currency=charge.currency,
                source=charge.source,
                destination=charge.destination,
                description=charge.description,
                metadata=charge.metadata,
                task_id=task.task_id,
            )
        )
        return charged.output()


class Refund(Charge):
    """``payment.refund`` alone (table ``[payment.refund]``, the same keys as
    ``[payment.charge]``), for refunds served by workers of their own."""

    serves = ("payment.refund",)
