"""A rate shared by every worker of a fleet, through PostgreSQL (``--limits-db URL``).

Without it, ``--rate`` is per worker process (:mod:`wayang_mq.runtime.limits`). With it, each
rate-limited capability has a row in the control plane's table ``rate_limits`` (migration
0006: run ``wayang-mq db migrate``) holding its *theoretical arrival time* (TAT) of GCRA, the
generic cell rate algorithm: with ``T = 1/rate`` and a tolerance ``τ = (burst - 1)·T``, a
start may happen at ``max(now, TAT - τ)``, and then ``TAT = max(TAT, now) + T``.

A worker *reserves* its next start with one statement (below), atomic under PostgreSQL's row
lock, on the database's clock (so workers' clocks may disagree), and sleeps until then. A
waiter cancelled after its reservation (the worker stops) leaves its start unused: the fleet
then runs a little below its rate, never above it. Every worker must give the capability the
same rate; the reservations of one process are made one at a time, in the order they came.

While the database is away the reservation is retried every second and the delivery waits:
a quota is kept even then (the tasks wait in the queue, the worker holding only its prefetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from wayang_mq.core import logs
from wayang_mq.core.errors import ConfigError, DatabaseUnavailable
from wayang_mq.runtime.limits import Rate

log = logging.getLogger("wayang_mq.runtime.limits")

CONNECT_TIMEOUT_S = 5
RETRY_S = 1.0

# now: the statement's own timestamp, the same everywhere in the statement; the RETURNING
# clause sees the updated row, so r.tat - T is the TAT before it (or now, for a new row).
_RESERVE = """
INSERT INTO rate_limits AS r (key, tat)
VALUES (%(key)s, extract(epoch FROM statement_timestamp())::float8 + %(t)s)
ON CONFLICT (key) DO UPDATE
    SET tat = greatest(r.tat, extract(epoch FROM statement_timestamp())::float8) + %(t)s
RETURNING greatest(0, r.tat - %(t)s - %(tau)s - extract(epoch FROM statement_timestamp())::float8)
"""


class SharedRates:
    """One worker's connection to the shared rates; :meth:`bucket` for each capability."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()  # one statement at a time, in arrival order (FIFO)

    def __repr__(self) -> str:
        return "SharedRates(<database url hidden>)"

    async def open(self) -> None:
        """Connect and check the table is there; ConfigError (what to run) if not."""
        try:
            self._conn = await self._connect()
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(
                f"--limits-db: cannot connect to PostgreSQL: {exc}",
                hint="check the URL and that PostgreSQL is running",
            ) from None
        try:
            await self._conn.execute("SELECT 1 FROM rate_limits LIMIT 0")
        except psycopg.errors.UndefinedTable:
            await self.close()
            raise ConfigError(
                "--limits-db: the database has no rate_limits table",
                hint="run `wayang-mq db migrate` with WAYANG_DATABASE_URL set to it",
            ) from None

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None

    def bucket(self, key: str, rate: Rate) -> SharedBucket:
        """The fleet-wide bucket of ``key`` (the capability) at ``rate``."""
        return SharedBucket(self, key, rate)

    async def reserve(self, key: str, rate: Rate) -> float:
        """Reserve the next start of ``key``; the seconds to wait for it. Retries while the
        database is away (the caller keeps waiting)."""
        interval = 1 / rate.per_second
        params = {"key": key, "t": interval, "tau": (rate.burst - 1) * interval}
        async with self._lock:
            while True:
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = await self._connect()
                    cursor = await self._conn.execute(_RESERVE, params)
                    row = await cursor.fetchone()
                    assert row is not None
                    return float(row[0])
                except psycopg.OperationalError as exc:
                    logs.event(
                        log,
                        "limit.db_unavailable",
                        logging.WARNING,
                        capability=key,
                        error=str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                        next=f"retry in {RETRY_S:g}s",
                    )
                    await self.close()
                    await asyncio.sleep(RETRY_S)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(
                self._url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True
            )
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise psycopg.OperationalError(first) from None


class SharedBucket:
    """A capability's rate across the fleet: :meth:`acquire` reserves a start, then sleeps
    until it. Same interface as :class:`~wayang_mq.runtime.limits.TokenBucket`."""

    def __init__(self, rates: SharedRates, key: str, rate: Rate) -> None:
        self._rates = rates
        self.key = key
        self.rate = rate

    async def acquire(self) -> None:
        """Wait for this worker's turn in the fleet's rate."""
        wait_s = await self._rates.reserve(self.key, self.rate)
        if wait_s > 0:
            await asyncio.sleep(wait_s)
