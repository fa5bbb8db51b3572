"""Connections to PostgreSQL, and the one error every database failure becomes.

The control plane holds a delivery until its facts are committed; when the database is down
it keeps the delivery and tries again with backoff (tenacity), so nothing is acked unwritten
and nothing is lost (see :mod:`wayang_mq.controlplane.daemon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from wayang_mq.core import logs
from wayang_mq.core.errors import DatabaseUnavailable

__all__ = [
    "DatabaseUnavailable",
    "Reconnecting",
    "connect_async",
    "connect_sync",
    "unavailable",
]

log = logging.getLogger("wayang_mq.controlplane")

CONNECT_TIMEOUT_S = 5


def _refused(exc: BaseException, what: str) -> DatabaseUnavailable:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseUnavailable(
        f"{what}: {text}",
        hint="check WAYANG_DATABASE_URL and that PostgreSQL is running "
        "(`wayang-mq dev` starts one)",
    )


def connect_sync(database_url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A blocking connection (CLI commands, migrations)."""
    try:
        return psycopg.connect(database_url, connect_timeout=CONNECT_TIMEOUT_S, **kwargs)
    except psycopg.Error as exc:
        raise _refused(exc, "cannot connect to PostgreSQL") from exc


async def connect_async(database_url: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """A connection for the daemon's event loop."""
    try:
        return await psycopg.AsyncConnection.connect(
            database_url, connect_timeout=CONNECT_TIMEOUT_S, **kwargs
        )
    except psycopg.Error as exc:
        raise _refused(exc, "cannot connect to PostgreSQL") from exc


def unavailable(exc: BaseException) -> DatabaseUnavailable:
    """A database error as the one type callers catch."""
    return _refused(exc, "PostgreSQL failed")


class Reconnecting:
    """One connection a daemon keeps: opened again, with backoff (logged each time), whenever
    PostgreSQL went away, so a caller that holds work just asks for it again."""

    def __init__(self, database_url: str, *, retry_max_s: float, daemon_id: str) -> None:
        self._url = database_url
        self._retry_max_s = retry_max_s
        self._daemon_id = daemon_id
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.up = False
        self.retries = 0  # connections lost or refused since start

    async def get(self) -> psycopg.AsyncConnection[Any]:
        """The open connection; waits (retrying) while PostgreSQL is away."""
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect()
        return self._conn

    async def lost(self, exc: BaseException) -> None:
        """The connection failed: drop it; the next :meth:`get` connects again."""
        self.up = False
        self.retries += 1
        logs.event(log, "database.lost", logging.WARNING, error=str(exc), next="retrying")
        await self.close()

    async def close(self) -> None:
        """Close the connection, if any."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(DatabaseUnavailable),
            wait=wait_exponential(multiplier=0.2, max=self._retry_max_s),
            reraise=True,
        ):
            with attempt:
                try:
                    conn = await connect_async(self._url, autocommit=True)
                except DatabaseUnavailable as exc:
                    self.up = False
                    self.retries += 1
                    logs.event(
                        log, "database.unavailable", logging.WARNING, error=exc, next="retrying"
                    )
                    raise
        self.up = True
        logs.event(log, "database.connected", id=self._daemon_id)
        return conn


class Probe:
    """Does the database answer? ``SELECT 1`` on a connection of the probe's own (never the
    writer's: a probe must not land inside the writer's transaction), within ``timeout_s``;
    a failed probe drops the connection and the next one connects again."""

    def __init__(self, database_url: str, timeout_s: float = 2.0) -> None:
        self._url = database_url
        self._timeout_s = timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def answers(self) -> bool:
        """True if the database answered in time."""
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout_s):
                    if self._conn is None or self._conn.closed:
                        self._conn = await connect_async(self._url, autocommit=True)
                    await self._conn.execute("SELECT 1")
                return True
            except (TimeoutError, DatabaseUnavailable, psycopg.Error):
                await self.close()
                return False

    async def close(self) -> None:
        """Close its connection, if any."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None
