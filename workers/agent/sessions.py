"""Durable conversations: the messages of a session id, in PostgreSQL (schema
``wayang_agent``, created idempotently when the executor sets up).

A task that names a ``session_id`` starts from the messages stored under it and, when it ends
with an answer, stores the conversation back. Two tasks of one session at once: each read
the row's ``version``; the second to store finds it moved on and fails ``session_conflict``
(retryable: its retry starts from the conversation the first one stored), so no turn is lost
silently.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from wayang_mq.core.errors import ExecutorError

#: keeps workers starting together from creating the schema at once
_SCHEMA_LOCK = 0x7761_7961_6E67_41  # "wayangA"

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS wayang_agent;
CREATE TABLE IF NOT EXISTS wayang_agent.sessions (
    session_id  text PRIMARY KEY,
    messages    jsonb NOT NULL,
    version     bigint NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
"""


class SessionStore:
    """Conversations by session id, on a small connection pool."""

    def __init__(self, dsn: str, *, pool_size: int = 4) -> None:
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"options": "-c statement_timeout=10000"},
            name="wayang-agent-sessions",
        )

    async def open(self) -> None:
        """Open the pool and create the schema (a database that cannot be reached stops the
        worker from starting)."""
        await self._pool.open(wait=True, timeout=30)
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])
            await conn.execute(SCHEMA.encode())

    async def close(self) -> None:
        await self._pool.close()

    async def load(self, session_id: str) -> tuple[list[dict[str, Any]], int]:
        """The session's messages and version (none yet: ``[]`` and 0)."""
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT messages, version FROM wayang_agent.sessions WHERE session_id = %s",
                    [session_id],
                )
                row = await cursor.fetchone()
        except psycopg.Error as exc:
            raise _unavailable(exc) from None
        if row is None:
            return [], 0
        messages = row[0] if isinstance(row[0], list) else json.loads(row[0])
        return list(messages), int(row[1])

    async def save(self, session_id: str, messages: list[dict[str, Any]], version: int) -> None:
        """Store the conversation if nobody stored another since ``version`` was read."""
        try:
            async with self._pool.connection() as conn:
                if version == 0:
                    cursor = await conn.execute(
                        "INSERT INTO wayang_agent.sessions (session_id, messages) VALUES (%s, %s)"
                        " ON CONFLICT (session_id) DO NOTHING",
                        [session_id, Jsonb(messages)],
                    )
                else:
                    cursor = await conn.execute(
                        "UPDATE wayang_agent.sessions SET messages = %s, version = version + 1,"
                        " updated_at = now() WHERE session_id = %s AND version = %s",
                        [Jsonb(messages), session_id, version],
                    )
                stored = cursor.rowcount == 1
        except psycopg.Error as exc:
            raise _unavailable(exc) from None
        if not stored:
            raise ExecutorError(
                f"session {session_id!r} was continued by another task meanwhile; "
                "retry to continue from its conversation",
                retryable=True,
                details={"reason": "session_conflict"},
            )


def _unavailable(exc: psycopg.Error) -> ExecutorError:
    return ExecutorError(
        f"the session store is unavailable ({type(exc).__name__}); retry later",
        retryable=True,
        details={"reason": "session_store_unavailable"},
    )
