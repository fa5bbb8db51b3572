"""approval.request's PostgreSQL store: the truth about every request. A worker that restarts
(or another one on the same database) serves the same pending requests; a decision is a
conditional UPDATE, so of two people deciding at once exactly one wins."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Json, Jsonb
from psycopg_pool import AsyncConnectionPool

from wayang_mq.core.model import TaskRef

#: keeps workers starting together from creating the schema at once (concurrent
#: CREATE ... IF NOT EXISTS can still fail on the catalog's unique index)
_SCHEMA_LOCK = 0x7761_7961_6E67_41  # "wayangA"

_COLUMNS = (
    "task_id, attempt, ref, issuer, capability, title, requester, context, assignees, groups, "
    "editable, deadline, escalate_to, escalated, state, decided_by, decided_at, comment, "
    "counter, answered, created_at"
)


@dataclass(frozen=True)
class Request:
    """A request as stored."""

    task_id: str
    attempt: int
    ref: TaskRef
    issuer: str
    capability: str
    title: str
    requester: str
    context: dict[str, Any]
    assignees: tuple[str, ...]
    groups: tuple[str, ...]
    editable: dict[str, str]
    deadline: datetime | None
    escalate_to: str | None
    escalated: bool
    state: str
    decided_by: str | None
    decided_at: datetime | None
    comment: str | None
    counter: dict[str, Any] | None
    answered: bool
    created_at: datetime

    @classmethod
    def of(cls, row: DictRow) -> Request:
        """From a row of ``requests``."""
        values = dict(row)
        values["ref"] = TaskRef.model_validate(values["ref"])
        values["assignees"] = tuple(values["assignees"])
        values["groups"] = tuple(values["groups"])
        return cls(**values)

    def visible_to(self, user: str, groups: tuple[str, ...]) -> bool:
        """Assigned to ``user`` or one of their groups."""
        return user in self.assignees or bool(set(groups) & set(self.groups))


@dataclass(frozen=True)
class Filed:
    """What a task asks, ready to store."""

    ref: TaskRef
    issuer: str
    title: str
    requester: str
    context: dict[str, Any]
    assignees: tuple[str, ...]
    groups: tuple[str, ...]
    editable: dict[str, str]
    deadline: datetime | None
    escalate_to: str | None


@dataclass(frozen=True)
class Audit:
    """One audit line."""

    at: datetime
    actor: str
    action: str
    detail: dict[str, Any]
    ip: str | None


def schema_sql() -> str:
    """The store's DDL (``schema.sql``), idempotent."""
    return resources.files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Store:
    """A connection pool on ``dsn`` and the queries approval.request makes."""

    def __init__(self, dsn: str, *, pool_size: int = 5) -> None:
        self._pool: AsyncConnectionPool[AsyncConnection[DictRow]] = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"row_factory": dict_row, "autocommit": True},
        )

    async def open(self, *, create_schema: bool = True) -> None:
        """Open the pool (waiting for the first connection) and apply the schema."""
        await self._pool.open(wait=True, timeout=30)
        if create_schema:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])
                await conn.execute(schema_sql().encode())

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()

    # -- requests -------------------------------------------------------------------------

    async def file(self, filed: Filed) -> None:
        """Store a request; idempotent per task and attempt. A newer attempt of a request
        still pending takes over its reference (the older token is fenced by the dispatcher)."""
        ref = filed.ref
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO wayang_approval.requests (task_id, attempt, ref, issuer, "
                "capability, title, requester, context, assignees, groups, editable, deadline, "
                "escalate_to) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (task_id) DO UPDATE SET attempt = excluded.attempt, "
                "ref = excluded.ref WHERE requests.attempt < excluded.attempt "
                "AND requests.state = 'pending'",
                [
                    ref.task_id,
                    ref.attempt,
                    Jsonb(ref.model_dump(mode="json")),
                    filed.issuer,
                    ref.capability,
                    filed.title,
                    filed.requester,
                    Json(filed.context),  # json, not jsonb: the key order is kept
                    list(filed.assignees),
                    list(filed.groups),
                    Json(filed.editable),
                    filed.deadline,
                    filed.escalate_to,
                ],
            )

    async def get(self, task_id: str) -> Request | None:
        """One request, whatever its state."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM wayang_approval.requests WHERE task_id = %s", [task_id]
            )
            row = await cursor.fetchone()
        return Request.of(row) if row else None

    async def inbox(
        self,
        user: str,
        groups: tuple[str, ...],
        *,
        assignee: str = "",
        group: str = "",
        capability: str = "",
    ) -> list[Request]:
        """The pending requests ``user`` may decide, soonest deadline first, filtered."""
        sql = (
            f"SELECT {_COLUMNS} FROM wayang_approval.requests WHERE state = 'pending' "
            "AND (%s = ANY(assignees) OR groups && %s::text[])"
        )
        params: list[Any] = [user, list(groups)]
        if assignee:
            sql += " AND %s = ANY(assignees)"
            params.append(assignee)
        if group:
            sql += " AND %s = ANY(groups)"
            params.append(group)
        if capability:
            sql += " AND capability = %s"
            params.append(capability)
        sql += " ORDER BY deadline ASC NULLS LAST, created_at ASC LIMIT 500"
        async with self._pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            return [Request.of(row) for row in await cursor.fetchall()]

    async def decide(
        self,
        task_id: str,
        state: str,
        actor: str,
        *,
        comment: str | None = None,
        counter: dict[str, Any] | None = None,
        ip: str | None = None,
    ) -> Request | None:
        """End a pending request with ``state``; None when it was no longer pending (someone
        else decided first: read who with :meth:`get`). The decision is audited in the same
        transaction."""
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE wayang_approval.requests SET state = %s, decided_by = %s, "
                "decided_at = now(), comment = %s, counter = %s "
                f"WHERE task_id = %s AND state = 'pending' RETURNING {_COLUMNS}",
                [state, actor, comment, Jsonb(counter) if counter is not None else None, task_id],
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            detail = {"comment": comment, "values": counter}
            await self._audit(conn, task_id, actor, state, detail, ip)
        return Request.of(row)

    async def withdraw(self, task_id: str, requester: str | None, reason: str) -> Request | None:
        """Cancel a pending request issued by ``requester`` (None: an admin, any request)."""
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE wayang_approval.requests SET state = 'cancelled', decided_by = %s, "
                "decided_at = now(), comment = %s WHERE task_id = %s AND state = 'pending' "
                f"AND (%s::text IS NULL OR issuer = %s) RETURNING {_COLUMNS}",
                [requester or "admin", reason, task_id, requester, requester],
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            actor = requester or "admin"
            await self._audit(conn, task_id, actor, "cancelled", {"reason": reason}, None)
        return Request.of(row)

    async def overdue(self) -> list[Request]:
        """Pending requests past their deadline."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM wayang_approval.requests WHERE state = 'pending' "
                "AND deadline < now() ORDER BY deadline LIMIT 200"
            )
            return [Request.of(row) for row in await cursor.fetchall()]

    async def escalate(self, request: Request, deadline: datetime) -> bool:
        """Hand a pending, overdue request to its escalation group, once, until ``deadline``."""
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE wayang_approval.requests SET groups = ARRAY[escalate_to], "
                "assignees = '{}', escalated = true, deadline = %s "
                "WHERE task_id = %s AND state = 'pending' AND NOT escalated "
                "AND escalate_to IS NOT NULL",
                [deadline, request.task_id],
            )
            if cursor.rowcount != 1:
                return False
            detail = {"to": request.escalate_to, "until": deadline.isoformat()}
            await self._audit(conn, request.task_id, "deadline", "escalated", detail, None)
        return True

    async def unanswered(self) -> list[Request]:
        """Ended requests whose result the broker has not confirmed yet (to publish again)."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM wayang_approval.requests WHERE state <> 'pending' "
                "AND NOT answered LIMIT 200"
            )
            return [Request.of(row) for row in await cursor.fetchall()]

    async def mark_answered(self, task_id: str) -> None:
        """Its result is on the broker."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE wayang_approval.requests SET answered = true WHERE task_id = %s",
                [task_id],
            )

    # -- audit ---------------------------------------------------------------------------

    async def audit(
        self, task_id: str, actor: str, action: str, detail: dict[str, Any], ip: str | None
    ) -> None:
        """Record an action on a request (a refused one included)."""
        async with self._pool.connection() as conn:
            await self._audit(conn, task_id, actor, action, detail, ip)

    async def history(self, task_id: str) -> list[Audit]:
        """A request's audit lines, oldest first."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT at, actor, action, detail, ip FROM wayang_approval.audit "
                "WHERE task_id = %s ORDER BY id",
                [task_id],
            )
            return [Audit(**row) for row in await cursor.fetchall()]

    @staticmethod
    async def _audit(
        conn: AsyncConnection[DictRow],
        task_id: str,
        actor: str,
        action: str,
        detail: dict[str, Any],
        ip: str | None,
    ) -> None:
        await conn.execute(
            "INSERT INTO wayang_approval.audit (task_id, actor, action, detail, ip) "
            "VALUES (%s, %s, %s, %s, %s)",
            [task_id, actor, action, Jsonb(json.loads(json.dumps(detail, default=str))), ip],
        )

    # -- sessions --------------------------------------------------------------------------

    async def new_session(self, username: str, lifetime: timedelta) -> tuple[str, str]:
        """A session for ``username``: its id (for the cookie) and its CSRF token."""
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        async with self._pool.connection() as conn:
            await conn.execute("DELETE FROM wayang_approval.sessions WHERE expires_at < now()")
            await conn.execute(
                "INSERT INTO wayang_approval.sessions (id_hash, username, csrf, expires_at) "
                "VALUES (%s, %s, %s, now() + %s)",
                [_digest(session_id), username, csrf, lifetime],
            )
        return session_id, csrf

    async def session(self, session_id: str) -> tuple[str, str] | None:
        """The user and CSRF token of a live session."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT username, csrf FROM wayang_approval.sessions "
                "WHERE id_hash = %s AND expires_at > now()",
                [_digest(session_id)],
            )
            row = await cursor.fetchone()
        return (row["username"], row["csrf"]) if row else None

    async def end_session(self, session_id: str) -> None:
        """Sign out."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "DELETE FROM wayang_approval.sessions WHERE id_hash = %s", [_digest(session_id)]
            )
