"""Provider ``ledger``: double-entry bookkeeping in PostgreSQL (schema ``wayang_ledger``,
``ledger.sql`` beside this module).

Why a charge never happens twice here: the transfer row, keyed by its idempotency key
(unique), and its two postings and the two balances are written in ONE transaction. Whatever
repeats the request (a broker redelivery after a ``kill -9``, a retry, a dead letter
replayed, a second task with the same key) either finds the committed row and answers with
it (``already_charged``), or waits on the unique key for a transaction still running and then
finds it, or finds nothing because the first one rolled back and nothing was posted.

Locking: a charge locks its two accounts ``FOR NO KEY UPDATE`` in the order of their ids (so
two charges never wait for each other in a cycle) before it claims its key; a refund locks
its charge's row first, then the accounts the same way. ``FOR NO KEY UPDATE`` and not ``FOR
UPDATE``: the transfers' foreign keys take ``KEY SHARE`` locks on the accounts, which ``FOR
UPDATE`` would conflict with (and deadlock on).
"""

from __future__ import annotations

import logging
import uuid
from importlib import resources
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

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

#: the advisory lock that keeps workers starting together from creating the schema at once
#: (concurrent CREATE ... IF NOT EXISTS can still fail on the catalog's unique index)
_SCHEMA_LOCK = 0x7761_7961_6E67_4C  # "wayangL"

_TRANSFER_COLUMNS = (
    "id, kind, amount, currency, from_account, to_account, charge_id, idempotency_key"
)


def schema_sql() -> str:
    """The ledger's DDL (``ledger.sql``), idempotent."""
    return resources.files(__package__).joinpath("ledger.sql").read_text(encoding="utf-8")


async def apply_schema(conn: AsyncConnection[Any]) -> None:
    """Create the ledger's schema and tables if they are missing (one transaction)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])
        await conn.execute(schema_sql().encode())


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Ledger:
    """The ledger provider: a connection pool on ``dsn``; ``merchant_account`` receives
    charges that name no destination."""

    def __init__(
        self,
        dsn: str,
        merchant_account: str,
        *,
        pool_size: int = 10,
        create_schema: bool = True,
        statement_timeout_s: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self.merchant_account = merchant_account
        self._create_schema = create_schema
        self._pool: AsyncConnectionPool[AsyncConnection[DictRow]] = AsyncConnectionPool(
            dsn,
            connection_class=AsyncConnection[DictRow],
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={
                "row_factory": dict_row,
                "options": f"-c statement_timeout={int(statement_timeout_s * 1000)}",
            },
            name="wayang-ledger",
        )

    async def open(self) -> None:
        """Open the pool (and create the schema); a database that cannot be reached stops
        the worker from starting."""
        await self._pool.open(wait=True, timeout=30)
        if self._create_schema:
            async with self._pool.connection() as conn:
                await apply_schema(conn)

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()

    # -- charge ------------------------------------------------------------------------------

    async def charge(self, request: ChargeRequest) -> Charged:
        """Charge once per key (see the module docstring)."""
        destination = request.destination or self.merchant_account
        if destination == request.source:
            raise refused("same_account", "source and destination are the same account")
        try:
            async with self._pool.connection() as conn, conn.transaction():
                return await self._charge(conn, request, destination)
        except psycopg.OperationalError as exc:
            raise _unreachable(exc) from None

    async def _charge(
        self, conn: AsyncConnection[DictRow], request: ChargeRequest, destination: str
    ) -> Charged:
        earlier = await _transfer_by_key(conn, "charge", request.idempotency_key)
        if earlier is not None:  # the fast path of a repeat: no account lock needed
            return _charged_before(earlier, request, destination)
        accounts = await _lock_accounts(conn, request.source, destination)
        _check_accounts(accounts, request.currency, request.source, destination)
        charge_id = _new_id("ch")
        inserted = await conn.execute(
            "INSERT INTO wayang_ledger.transfers (id, key_space, idempotency_key, kind, amount,"
            " currency, from_account, to_account, description, metadata, task_id)"
            " VALUES (%s, 'charge', %s, 'charge', %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (key_space, idempotency_key) DO NOTHING RETURNING id",
            [
                charge_id,
                request.idempotency_key,
                request.amount,
                request.currency,
                request.source,
                destination,
                request.description,
                Jsonb(dict(request.metadata)),
                request.task_id,
            ],
        )
        if await inserted.fetchone() is None:  # the same key committed meanwhile: it wins
            earlier = await _transfer_by_key(conn, "charge", request.idempotency_key)
            assert earlier is not None  # the conflict was a committed row
            return _charged_before(earlier, request, destination)
        _check_funds(accounts[request.source], request.amount)
        await _post(conn, charge_id, request.source, destination, request.amount)
        logs.event(log, "payment.charged", charge_id=charge_id, amount=request.amount)
        return Charged(
            charge_id=charge_id,
            amount=request.amount,
            currency=request.currency,
            source=request.source,
            destination=destination,
            idempotency_key=request.idempotency_key,
            already_charged=False,
        )

    # -- refund ------------------------------------------------------------------------------

    async def refund(self, request: RefundRequest) -> Refunded:
        """Refund once per key, never more than was charged; void a key that never charged."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                return await self._refund(conn, request)
        except psycopg.OperationalError as exc:
            raise _unreachable(exc) from None

    async def _refund(self, conn: AsyncConnection[DictRow], request: RefundRequest) -> Refunded:
        charge, voided_now = await self._lock_charge(conn, request)
        if charge["kind"] == "void":
            return Refunded(
                refund_id=charge["id"],
                amount=0,
                currency=None,
                charge_id=None,
                idempotency_key=request.idempotency_key,
                already_refunded=not voided_now,
                voided=True,
            )
        earlier = await _transfer_by_key(conn, "refund", request.idempotency_key)
        if earlier is not None:
            return _refunded_before(earlier, request, charge)
        merchant, payer = charge["to_account"], charge["from_account"]
        accounts = await _lock_accounts(conn, payer, merchant)
        remaining = charge["amount"] - await _refunded_so_far(conn, charge["id"])
        amount = remaining if request.amount is None else request.amount
        if amount <= 0 or amount > remaining:
            raise refused(
                "refund_exceeds_charge",
                f"the refund ({amount}) exceeds what is left of the charge ({remaining})",
                charge_id=charge["id"],
                remaining=remaining,
            )
        _check_funds(accounts[merchant], amount)
        refund_id = _new_id("re")
        await conn.execute(
            "INSERT INTO wayang_ledger.transfers (id, key_space, idempotency_key, kind, amount,"
            " currency, from_account, to_account, charge_id, description, task_id)"
            " VALUES (%s, 'refund', %s, 'refund', %s, %s, %s, %s, %s, %s, %s)",
            [
                refund_id,
                request.idempotency_key,
                amount,
                charge["currency"],
                merchant,
                payer,
                charge["id"],
                request.reason,
                request.task_id,
            ],
        )
        await _post(conn, refund_id, merchant, payer, amount)
        logs.event(log, "payment.refunded", refund_id=refund_id, charge_id=charge["id"])
        return Refunded(
            refund_id=refund_id,
            amount=amount,
            currency=charge["currency"],
            charge_id=charge["id"],
            idempotency_key=request.idempotency_key,
            already_refunded=False,
        )

    async def _lock_charge(
        self, conn: AsyncConnection[DictRow], request: RefundRequest
    ) -> tuple[DictRow, bool]:
        """The charge's row, locked (refunds of one charge run one at a time); for a key that
        never charged, its void, written now (True) or before (False)."""
        if request.charge_id is not None:
            cursor = await conn.execute(
                f"SELECT {_TRANSFER_COLUMNS} FROM wayang_ledger.transfers"
                " WHERE id = %s AND kind = 'charge' FOR UPDATE",
                [request.charge_id],
            )
            row = await cursor.fetchone()
            if row is None:
                raise refused("unknown_charge", "no charge has this charge_id in the ledger")
            return row, False
        assert request.charge_key is not None
        while True:
            row = await _transfer_by_key(conn, "charge", request.charge_key, lock=True)
            if row is not None:
                return row, False
            inserted = await conn.execute(
                "INSERT INTO wayang_ledger.transfers (id, key_space, idempotency_key, kind,"
                " amount, description, task_id) VALUES (%s, 'charge', %s, 'void', 0, %s, %s)"
                " ON CONFLICT (key_space, idempotency_key) DO NOTHING"
                f" RETURNING {_TRANSFER_COLUMNS}",
                [_new_id("vo"), request.charge_key, request.reason, request.task_id],
            )
            row = await inserted.fetchone()
            if row is not None:
                logs.event(log, "payment.voided", void_id=row["id"])
                return row, True
            # a charge (or void) of that key committed meanwhile: lock and read it


# -- the SQL steps ---------------------------------------------------------------------------


async def _transfer_by_key(
    conn: AsyncConnection[DictRow], space: str, key: str, *, lock: bool = False
) -> DictRow | None:
    cursor = await conn.execute(
        f"SELECT {_TRANSFER_COLUMNS} FROM wayang_ledger.transfers"
        " WHERE key_space = %s AND idempotency_key = %s" + (" FOR UPDATE" if lock else ""),
        [space, key],
    )
    return await cursor.fetchone()


async def _lock_accounts(conn: AsyncConnection[DictRow], *ids: str) -> dict[str, DictRow]:
    # In id order, always: two transactions locking the same accounts never deadlock.
    cursor = await conn.execute(
        "SELECT id, currency, allow_negative, balance FROM wayang_ledger.accounts"
        " WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE",
        [sorted(set(ids))],
    )
    return {row["id"]: row for row in await cursor.fetchall()}


def _check_accounts(
    accounts: dict[str, DictRow], currency: str, source: str, destination: str
) -> None:
    for account in (source, destination):
        if account not in accounts:
            raise refused(
                "unknown_account",
                f"account {account!r} does not exist in the ledger; open it first",
                account=account,
            )
        if accounts[account]["currency"] != currency:
            raise refused(
                "currency_mismatch",
                f"account {account!r} holds {accounts[account]['currency']}, not {currency}",
                account=account,
            )


def _check_funds(account: DictRow, amount: int) -> None:
    if not account["allow_negative"] and account["balance"] < amount:
        # raised inside the transaction: it rolls back, the key included, nothing is posted
        raise refused(
            "insufficient_funds",
            f"account {account['id']!r} cannot cover {amount}",
            account=account["id"],
        )


async def _post(
    conn: AsyncConnection[DictRow], transfer_id: str, debit: str, credit: str, amount: int
) -> None:
    await conn.execute(
        "INSERT INTO wayang_ledger.postings (transfer_id, account, amount)"
        " VALUES (%s, %s, %s), (%s, %s, %s)",
        [transfer_id, debit, -amount, transfer_id, credit, amount],
    )
    await conn.execute(
        "UPDATE wayang_ledger.accounts SET balance = balance + CASE id WHEN %s THEN %s ELSE %s END"
        " WHERE id IN (%s, %s)",
        [debit, -amount, amount, debit, credit],
    )


async def _refunded_so_far(conn: AsyncConnection[DictRow], charge_id: str) -> int:
    cursor = await conn.execute(
        "SELECT coalesce(sum(amount), 0)::bigint AS total FROM wayang_ledger.transfers"
        " WHERE kind = 'refund' AND charge_id = %s",
        [charge_id],
    )
    row = await cursor.fetchone()
    return int(row["total"]) if row is not None else 0


def _charged_before(row: DictRow, request: ChargeRequest, destination: str) -> Charged:
    if row["kind"] == "void":
        raise refused(
            "voided",
            "this idempotency key was voided by a refund before it charged; use a new key",
            void_id=row["id"],
        )
    same = (row["amount"], row["currency"], row["from_account"], row["to_account"]) == (
        request.amount,
        request.currency,
        request.source,
        destination,
    )
    if not same:
        raise refused(
            "idempotency_conflict",
            "this idempotency key already charged a different amount, currency or account",
            charge_id=row["id"],
        )
    return Charged(
        charge_id=row["id"],
        amount=row["amount"],
        currency=row["currency"],
        source=row["from_account"],
        destination=row["to_account"],
        idempotency_key=request.idempotency_key,
        already_charged=True,
    )


def _refunded_before(row: DictRow, request: RefundRequest, charge: DictRow) -> Refunded:
    if row["charge_id"] != charge["id"] or (
        request.amount is not None and request.amount != row["amount"]
    ):
        raise refused(
            "idempotency_conflict",
            "this idempotency key already refunded another charge or amount",
            refund_id=row["id"],
        )
    return Refunded(
        refund_id=row["id"],
        amount=row["amount"],
        currency=row["currency"],
        charge_id=row["charge_id"],
        idempotency_key=request.idempotency_key,
        already_refunded=True,
    )


def _unreachable(exc: psycopg.OperationalError) -> Exception:
    # The commit's outcome may be unknown: a retry with the same key finds out, safely.
    logs.event(log, "payment.ledger_unavailable", level=logging.WARNING, error=type(exc).__name__)
    return unavailable(
        "ledger_unavailable",
        "the ledger's database did not answer; the task may be retried with the same key",
        retry_after_s=1.0,
    )
