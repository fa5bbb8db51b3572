"""``wayang-mq db rebuild``: a fresh database made again from ``wayang.history``.

The history holds every message the control plane recorded from ``wayang.record`` (it appends
each after writing it), so replaying it
through the control plane's own reading (:func:`facts.read`, verified with the same key ring)
and writing (:func:`store.write`) gives the same record. Facts are keyed by digest, and a
stream delivery yields the same digest as the record's, so the result does not depend on
how often a message is read. Only a database that is migrated and holds no facts is
accepted: mixing a replay with another record would hide what the history says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from wayang_mq.controlplane import store
from wayang_mq.controlplane.db import connect_async, connect_sync, unavailable
from wayang_mq.controlplane.facts import Fact, Refused, read
from wayang_mq.controlplane.history import Entry, History, Start
from wayang_mq.controlplane.migrate import require_current
from wayang_mq.core import logs
from wayang_mq.core.envelope import TaskChecks
from wayang_mq.core.errors import ConfigError, WayangError
from wayang_mq.core.signing import KeyRing

log = logging.getLogger("wayang_mq.controlplane.rebuild")

#: called with (messages read, messages to read) after each batch
Progress = Callable[[int, int], None]


@dataclass
class RebuildReport:
    """What a rebuild read and wrote."""

    first: int | None = None  # offsets read, first to last (None: nothing to read)
    last: int | None = None
    read: int = 0  # messages (an entry of the history holds a batch of them)
    written: int = 0
    repeated: int = 0
    refused: int = 0


async def rebuild(
    amqp_url: str,
    database_url: str,
    keyring: KeyRing,
    *,
    checks: TaskChecks | None = None,
    from_offset: Start = "first",
    batch: int = 256,
    progress: Progress | None = None,
) -> RebuildReport:
    """Replay the history from ``from_offset`` to its current end into ``database_url``."""
    await asyncio.to_thread(require_empty, database_url)
    checks = checks or TaskChecks()
    report = RebuildReport()
    async with History(amqp_url, prefetch=batch * 2) as history:
        end = await history.last_offset()
        if end is None:
            return report
        conn = await connect_async(database_url, autocommit=True)
        try:
            pending: list[Entry] = []
            async for entry in history.entries(from_offset, end=end):
                if report.first is None:
                    report.first = entry.offset
                pending.append(entry)
                if len(pending) >= batch:
                    await _write(conn, pending, keyring, checks, report)
                    _tell(progress, report, end)
                    pending = []
            await _write(conn, pending, keyring, checks, report)
            _tell(progress, report, end)
        finally:
            await conn.close()
    if report.read and report.last != end:
        raise WayangError(
            f"the history paused at offset {report.last} before its end {end}",
            hint="is the broker overloaded? drop and recreate the database, then run again",
        )
    logs.event(log, "rebuild.done", **{k: v for k, v in vars(report).items() if v is not None})
    return report


def require_empty(database_url: str) -> None:
    """Refuse a database that is not at this package's schema or already holds a record."""
    require_current(database_url)
    with connect_sync(database_url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM facts), (SELECT count(*) FROM executors)"
        ).fetchone()
    facts, executors = row if row else (0, 0)
    if facts or executors:
        raise ConfigError(
            f"the database already holds a record ({facts} facts, {executors} executors):"
            " a rebuild writes into a fresh one",
            hint="create an empty database, run `wayang-mq db migrate` on it and point "
            "WAYANG_DATABASE_URL at it",
        )


def _tell(progress: Progress | None, report: RebuildReport, end: int) -> None:
    """Progress in history entries (offsets) read of those to read; an entry holds a batch."""
    if progress is not None and report.first is not None and report.last is not None:
        progress(report.last - report.first + 1, end - report.first + 1)


async def _write(
    conn: psycopg.AsyncConnection[Any],
    entries: list[Entry],
    keyring: KeyRing,
    checks: TaskChecks,
    report: RebuildReport,
) -> None:
    """One transaction per batch, a savepoint per fact (as the control plane writes)."""
    if not entries:
        return
    read_out = [_read(entry, keyring, checks) for entry in entries]
    try:
        async with conn.transaction():
            for item in read_out:
                await _apply(conn, item, report)
    except psycopg.OperationalError as exc:
        raise unavailable(exc) from exc
    report.read += len(entries)
    report.last = entries[-1].offset


def _read(entry: Entry, keyring: KeyRing, checks: TaskChecks) -> Fact | Refused:
    try:
        return read(entry.delivery, keyring, checks)
    except Refused as refused:
        return refused
    except Exception as exc:  # what our reading chokes on is refused, as the daemon does
        log.exception("event=rebuild.unreadable offset=%d", entry.offset)
        return Refused("unreadable", f"{type(exc).__name__}: {exc}")


async def _apply(
    conn: psycopg.AsyncConnection[Any], item: Fact | Refused, report: RebuildReport
) -> None:
    if isinstance(item, Refused):
        report.refused += 1
        await store.count_refusal(conn, item.reason, item.detail)
        return
    try:
        written = await store.write(conn, item)
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        report.refused += 1
        await store.count_refusal(conn, "write_failed", str(exc))
        return
    if written:
        report.written += 1
    else:
        report.repeated += 1
