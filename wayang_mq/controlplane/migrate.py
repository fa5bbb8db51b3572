"""Versioned SQL migrations, applied in order, each once (``wayang-mq db migrate``).

The migrations are plain SQL files in ``migrations/`` named ``NNNN_what.sql``; the table
``schema_migrations`` lists those applied. Applying takes an advisory lock, so two control
planes starting at once do not both migrate; applying again changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from wayang_mq.controlplane.db import DatabaseUnavailable, connect_sync

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x7761_7961_6E67  # "wayang": the advisory lock migrations hold


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found = []
    for entry in resources.files("wayang_mq.controlplane.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest_version() -> int:
    """The schema version this package expects."""
    return migrations()[-1].version


def migrate(database_url: str) -> list[str]:
    """Apply what is missing; return the names applied (empty: already up to date)."""
    applied: list[str] = []
    with connect_sync(database_url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for migration in migrations():
            if migration.version in done:
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied.append(migration.name)
    return applied


def current_version(conn: psycopg.Connection) -> int:
    """The version a database is at (0: never migrated)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def check_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    """Refuse a database behind this package's schema (a daemon's connection)."""
    cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    version = 0
    if row and row[0]:
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        got = await cur.fetchone()
        version = int(got[0]) if got else 0
    if version < latest_version():
        raise DatabaseUnavailable(
            f"the database is at schema version {version}, this wayang-mq needs {latest_version()}",
            hint="run `wayang-mq db migrate`",
        )


def require_current(database_url: str) -> None:
    """Refuse to run against a database that is not migrated to this package's version."""
    with connect_sync(database_url) as conn:
        version = current_version(conn)
    if version < latest_version():
        raise DatabaseUnavailable(
            f"the database is at schema version {version}, this wayang-mq needs {latest_version()}",
            hint="run `wayang-mq db migrate`",
        )
