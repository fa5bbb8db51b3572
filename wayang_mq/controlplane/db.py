"""Connections to PostgreSQL, and the one error every database failure becomes.

The control plane holds a delivery until its facts are committed; when the database is down
it keeps the delivery and tries again with backoff (tenacity), so nothing is acked unwritten
and nothing is lost (see :mod:`wayang_mq.controlplane.daemon`).
"""

from __future__ import annotations

from typing import Any

import psycopg

from wayang_mq.core.errors import DatabaseUnavailable

__all__ = ["DatabaseUnavailable", "connect_async", "connect_sync", "unavailable"]

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
