"""Provider ``http``: a Stripe-style PaymentIntents API over aiohttp.

A charge is ``POST {base_url}/v1/payment_intents`` (form-encoded, ``confirm=true``), a
refund ``POST {base_url}/v1/refunds``; both carry ``Idempotency-Key``. The provider keeps the
first answer to a key and replays it for every later request with that key (Stripe: for 24
hours, with the response header ``Idempotent-Replayed: true``), so a retry charges nothing
new. Every retry here, and every retry of the task, sends the SAME key: the charge's
idempotency key, or ``refund-`` + the refund's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from wayang_mq.core import logs

from .providers import (
    Charged,
    ChargeRequest,
    Refunded,
    RefundRequest,
    refused,
    unavailable,
)

log = logging.getLogger(__name__)

#: statuses worth asking again with the same key: 409 (Stripe: a request with this key is
#: still in progress), 429 (rate limited) and the server's own failures
_TRANSIENT = frozenset({409, 429, 500, 502, 503, 504})


class _Transient(Exception):
    """An answer (or no answer) worth retrying with the same key."""

    def __init__(self, what: str, retry_after_s: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.retry_after_s = retry_after_s


class StripeProvider:
    """The ``http`` provider; ``merchant_account`` is what the output names as destination
    when the task names none (the API key's own account)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        merchant_account: str | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 30.0,
        max_retries: int = 3,
        retry_backoff_s: float = 0.5,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.merchant_account = merchant_account
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, connect=connect_timeout_s)
        self._max_retries = max_retries
        self._backoff_s = retry_backoff_s
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Start the HTTP client."""
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        """Stop the HTTP client."""
        if self._session is not None:
            await self._session.close()

    async def charge(self, request: ChargeRequest) -> Charged:
        """Create and confirm a PaymentIntent, once per key."""
        form = {
            "amount": str(request.amount),
            "currency": request.currency.lower(),  # Stripe's codes are lower case
            # a payment method id pays directly; anything else is the customer to charge
            ("payment_method" if request.source.startswith("pm_") else "customer"): (
                request.source
            ),
            "confirm": "true",
            "metadata[idempotency_key]": request.idempotency_key,
        }
        if request.description:
            form["description"] = request.description
        if request.destination:
            form["transfer_data[destination]"] = request.destination
        form.update({f"metadata[{k}]": v for k, v in request.metadata.items()})
        body, replayed = await self._post("/v1/payment_intents", form, request.idempotency_key)
        status = body.get("status")
        if status != "succeeded":
            raise refused(
                "provider_incomplete",
                f"the payment intent is {status!r}, not succeeded (it may need the customer)",
                charge_id=body.get("id"),
                provider_status=status,
            )
        return Charged(
            charge_id=str(body["id"]),
            amount=request.amount,
            currency=request.currency,
            source=request.source,
            destination=request.destination or self.merchant_account,
            idempotency_key=request.idempotency_key,
            already_charged=replayed,
        )

    async def refund(self, request: RefundRequest) -> Refunded:
        """Refund a PaymentIntent by its id, once per key."""
        if request.charge_id is None:
            # The API finds a payment by its id only; a key that never charged cannot be
            # voided there. A compensation must name the charge_id (or use the ledger).
            raise refused(
                "unsupported", "the http provider refunds by charge_id only, not by charge_key"
            )
        form = {"payment_intent": request.charge_id}
        if request.amount is not None:
            form["amount"] = str(request.amount)
        if request.reason:
            form["metadata[reason]"] = request.reason
        key = "refund-" + request.idempotency_key
        body, replayed = await self._post("/v1/refunds", form, key)
        currency = body.get("currency")
        return Refunded(
            refund_id=str(body["id"]),
            amount=int(body.get("amount") or request.amount or 0),
            currency=currency.upper() if isinstance(currency, str) else None,
            charge_id=request.charge_id,
            idempotency_key=request.idempotency_key,
            already_refunded=replayed,
        )

    # -- the request, retried with the same key ----------------------------------------------

    async def _post(
        self, path: str, form: Mapping[str, str], key: str
    ) -> tuple[dict[str, Any], bool]:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_retries + 1),
            wait=wait_exponential(multiplier=self._backoff_s, max=10 * self._backoff_s + 1),
            retry=retry_if_exception_type(_Transient),
            before_sleep=lambda state: logs.event(
                log,
                "payment.http.retry",
                level=logging.WARNING,
                path=path,
                attempt=state.attempt_number,
                why=_why(state.outcome.exception() if state.outcome else None),
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._post_once(path, form, key)
        except _Transient as exc:
            raise unavailable(
                "provider_unavailable",
                f"the payment provider did not answer {path} ({exc.what}) after"
                f" {self._max_retries + 1} tries; retrying the task reuses the same key",
                retry_after_s=exc.retry_after_s,
            ) from None
        raise AssertionError("unreachable")  # AsyncRetrying either returns or raises

    async def _post_once(
        self, path: str, form: Mapping[str, str], key: str
    ) -> tuple[dict[str, Any], bool]:
        if self._session is None:
            raise RuntimeError("the http provider is not open")
        headers = {"Authorization": f"Bearer {self._api_key}", "Idempotency-Key": key}
        try:
            async with self._session.post(
                self._base_url + path, data=dict(form), headers=headers
            ) as response:
                body = await _json(response)
                replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            raise _Transient(type(exc).__name__) from None
        if status in _TRANSIENT:
            raise _Transient(f"HTTP {status}", retry_after)
        if 200 <= status < 300 and "id" in body:
            return body, replayed
        raise _refusal(status, body)


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _refusal(status: int, body: Mapping[str, Any]) -> Exception:
    error = body.get("error")
    error = error if isinstance(error, dict) else {}
    said = str(error.get("message") or "")[:300]
    details = {k: str(error[k])[:100] for k in ("type", "code", "decline_code") if error.get(k)}
    if status == 402:
        return refused(
            "card_declined", f"the card was declined: {said or 'no reason given'}", **details
        )
    return refused(
        "provider_refused",
        f"the payment provider refused the request (HTTP {status}): {said or 'no reason given'}",
        http_status=status,
        **details,
    )


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 300.0) if value else None
    except ValueError:
        return None


def _why(exc: BaseException | None) -> str:
    return exc.what if isinstance(exc, _Transient) else type(exc).__name__
