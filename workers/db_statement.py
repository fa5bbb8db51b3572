"""One ``db.query`` statement on a pooled connection: its transaction and statement
timeout, a read-only statement read through a server-side cursor a batch at a time, a
writable one committed, each cut at the row limit and the result's byte budget; and the
pool's hooks that make a connection read-only and clear what a statement left on it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from .db_input import Params


@dataclass(frozen=True)
class Raw:
    """What psycopg gave back for one statement."""

    description: Sequence[psycopg.Column]
    rows: list[tuple[Any, ...]]
    truncated: bool
    rowcount: int | None
    command: str | None


async def run_statement(
    db: psycopg.AsyncConnection[Any],
    sql: str,
    params: Params,
    *,
    row_limit: int,
    timeout_ms: int,
    writable: bool,
    max_bytes: int,
) -> Raw:
    """Run ``sql`` in a transaction of its own, with its statement timeout: on a read-only
    connection ``READ ONLY``, rolled back and read through a cursor (:func:`_streamed`); on a
    writable one committed, its answer read whole (a write must not be cut short by a row
    limit) and at most ``row_limit`` rows and ``max_bytes`` kept.

    Both send every statement with the extended protocol (psycopg would use the simple one,
    which runs several commands, for a statement without parameters): here pipeline mode
    does it; a cancelled task interrupts the wait, and psycopg cancels the statement on the
    server."""
    if not writable:
        return await _streamed(db, sql, params, row_limit, timeout_ms, max_bytes)
    async with db.transaction(), db.pipeline() as pipeline:
        cur = db.cursor()
        await cur.execute(_SESSION, [str(timeout_ms)])
        await cur.execute(sql, params)
        await pipeline.sync()
        description = cur.description or []
        rows = await cur.fetchmany(row_limit + 1) if description else []
        rowcount = cur.rowcount if cur.rowcount >= 0 else None
        command = (cur.statusmessage or "").split(" ")[0] or None
    kept = _within(rows[:row_limit], max_bytes)
    return Raw(description, kept, len(rows) > len(kept), rowcount, command)


#: each task's transaction: its statement timeout, and intervals written as ISO 8601
_SESSION = (
    "SELECT set_config('statement_timeout', %s, true),"
    " set_config('IntervalStyle', 'iso_8601', true)"
)


async def _streamed(
    db: psycopg.AsyncConnection[Any],
    sql: str,
    params: Params,
    row_limit: int,
    timeout_ms: int,
    max_bytes: int,
) -> Raw:
    """A read-only statement through a server-side cursor (``DECLARE ... CURSOR FOR``),
    fetched in batches until ``row_limit`` rows or ``max_bytes`` are read: PostgreSQL makes
    the rows as they are fetched, so a hostile ``SELECT`` of a billion rows costs the worker
    a batch of memory, not the whole answer. ``DECLARE`` goes with the extended protocol (two
    statements are refused) and takes a query (``SELECT``, ``VALUES``, ``TABLE``, ``WITH``);
    the transaction is rolled back whatever happens."""
    rows: list[tuple[Any, ...]] = []
    size, truncated = 0, False
    async with db.transaction(force_rollback=True):
        await db.execute(_SESSION, [str(timeout_ms)])
        async with db.cursor(name="wayang_db_query") as cur:
            await cur.execute(sql, params)
            while not truncated:
                wanted = min(_BATCH, row_limit + 1 - len(rows))
                batch = await cur.fetchmany(wanted)
                for row in batch:
                    size += _row_bytes(row)
                    if len(rows) == row_limit or size > max_bytes:
                        truncated = True
                        break
                    rows.append(row)
                if len(batch) < wanted:
                    break  # the cursor is exhausted: no FETCH more to learn it
            description = cur.description or []
    return Raw(description, rows, truncated, None if truncated else len(rows), "SELECT")


#: rows fetched at once from a read-only statement's cursor
_BATCH = 100


def _row_bytes(row: tuple[Any, ...]) -> int:
    """A row's size as the result's budget counts it: bytes as they are, the rest as text."""
    return sum(len(c) if isinstance(c, bytes) else len(str(c)) for c in row if c is not None)


def _within(rows: list[tuple[Any, ...]], max_bytes: int) -> list[tuple[Any, ...]]:
    """The leading rows whose values' sizes (as text, bytes as they are) fit ``max_bytes``."""
    size = 0
    for n, row in enumerate(rows):
        size += _row_bytes(row)
        if size > max_bytes:
            return rows[:n]
    return rows


# -- the pool's hooks ----------------------------------------------------------------------------


def configure_session(
    *, writable: bool
) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    """The pool's ``configure`` hook for a connection: read-only unless ``writable``."""

    async def configure(db: psycopg.AsyncConnection[Any]) -> None:
        # psycopg begins each transaction() with BEGIN READ ONLY when set (kept across
        # DISCARD ALL: it is the client's, not a session setting)
        await db.set_read_only(not writable)

    return configure


async def reset_session(db: psycopg.AsyncConnection[Any]) -> None:
    """What a statement may have left on the session goes before the next task gets it."""
    await db.execute("DISCARD ALL")
