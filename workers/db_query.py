"""``db.query``: one parameterized SQL statement on a PostgreSQL database the worker's
operator named, read-only unless the operator made that connection writable.

Run it with ``wayang-mq worker wayang_workers.db_query:DbQuery --config worker.toml
--secrets env``; the contract (settings, input, output, the types table, error reasons) is
``docs/executors.md``, section ``db.query``.

What a task cannot do, and why:

- name a database: it names a connection (``reporting``) from the settings; the DSN, and
  whether writes are allowed, are the operator's.
- put values into the SQL text: values travel as server-side parameters, and the statement is
  always sent with the extended protocol (psycopg's pipeline mode), which PostgreSQL refuses
  to run with more than one command in it (``SELECT 1; DROP TABLE x`` is a syntax error).
- write through a read-only connection: its transactions begin ``READ ONLY`` and are always
  rolled back (so even a session ``set_config`` a statement makes does not survive it).
- outlast its timeout: ``statement_timeout`` is set for its transaction.
- leave anything on the pooled connection for the next task: it is reset with
  ``DISCARD ALL`` (settings, temporary tables, advisory locks, prepared statements, LISTEN)
  when returned to the pool.

Where the parts live: ``db_input`` (what a task may ask, checked before anything is sent),
``db_statement`` (one statement in its transaction, and the pool's hooks), ``db_values``
(PostgreSQL's values as output) and ``db_errors`` (the database's refusals as the task's
errors); this module holds the settings and the executor that joins them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from pydantic import BaseModel, ConfigDict, Field, model_validator

from wayang_mq import ErrorCode, Executor, ExecutorError, Task, current
from wayang_mq.core import logs
from wayang_mq.core.model import JsonLike
from wayang_mq.runtime.settings import SecretRef, parse_input

from . import db_input
from .db_errors import pool_timeout, statement_failed
from .db_input import DbQueryInput, Params
from .db_statement import configure_session, reset_session, run_statement
from .db_values import column_names, column_types, loaders, output_value

__all__ = ["ConnectionSettings", "DbQuery", "DbQueryInput", "DbQuerySettings"]

log = logging.getLogger("wayang_workers.db_query")

#: connection names: what a task writes in ``input.connection``
_NAME = r"^[a-z][a-z0-9_-]{0,63}$"


# -- settings ------------------------------------------------------------------------------------


class ConnectionSettings(BaseModel):
    """``[db.query.connections.NAME]``: one database a task may name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the libpq DSN (``postgresql://user:password@host/db``); give it by reference
    dsn: str | SecretRef
    #: False: every transaction is ``READ ONLY`` and rolled back; True: committed
    writable: bool = False
    min_size: int = Field(1, ge=0, le=100)
    max_size: int = Field(4, ge=1, le=100)
    #: the longest a statement may run, and the most ``timeout_ms`` a task may ask
    statement_timeout_ms: int = Field(5000, ge=1)
    #: the most rows a task may ask for (``row_limit``)
    row_limit: int = Field(1000, ge=1, le=100_000)
    #: refuse a result with a cell larger than this (text/bytea bytes); None: no limit
    max_cell_bytes: int | None = Field(None, ge=1)
    #: the rows' bytes (as PostgreSQL sent them) a task gets at most: the rows past it are
    #: cut, ``truncated``; a read-only statement is cancelled there, never read further
    max_result_bytes: int = Field(1024 * 1024, ge=1, le=4 * 1024 * 1024)

    @model_validator(mode="after")
    def _sizes(self) -> ConnectionSettings:
        if self.max_size < self.min_size:
            raise ValueError("max_size must be at least min_size")
        return self


class DbQuerySettings(BaseModel):
    """``[db.query]``: the named connections and what a task gets when it does not ask."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connections: dict[str, ConnectionSettings] = Field(default_factory=dict)
    #: rows returned when the task gives no ``row_limit`` (capped by the connection's)
    default_row_limit: int = Field(100, ge=1)
    #: how long a task waits for a pooled connection before failing ``connection_failed``
    connect_timeout_ms: int = Field(5000, ge=1)

    @model_validator(mode="after")
    def _names(self) -> DbQuerySettings:
        for name in self.connections:
            if not re.match(_NAME, name):
                raise ValueError(f"connection name {name!r} must match {_NAME}")
        return self


# -- the executor --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """What one statement gave back, before it becomes the task's output."""

    columns: list[dict[str, str]]
    rows: list[dict[str, JsonLike]]
    truncated: bool
    rowcount: int | None
    command: str | None


class DbQuery(Executor):
    """``db.query``: one parameterized statement on a named connection (docs/executors.md)."""

    serves = ("db.query",)
    settings_model = DbQuerySettings
    #: none: a task's SQL could read any secret it was handed back out (``reverse(%s)``,
    #: ``md5``), past the redactor, so a task referencing one fails ``secret_unavailable``
    allowed_secrets = ()

    def __init__(self, settings: DbQuerySettings | None = None) -> None:
        self.settings = settings or DbQuerySettings()
        self._pools: dict[str, AsyncConnectionPool[psycopg.AsyncConnection[Any]]] = {}
        #: per connection name, the type names read from its ``pg_type`` (OIDs are a database's)
        self._type_names: dict[str, dict[int, str]] = {}

    async def setup(self) -> None:
        """One pool per connection, connecting in the background: a database that is down
        when the worker starts fails its tasks ``connection_failed`` (retryable), it does
        not stop the worker from serving the others."""
        for name, conn in self.settings.connections.items():
            dsn = await self.reveal(conn.dsn)
            pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
                dsn,
                min_size=conn.min_size,
                max_size=conn.max_size,
                open=False,
                name=f"db.query.{name}",
                kwargs={"autocommit": True, "prepare_threshold": None, "context": loaders()},
                configure=configure_session(writable=conn.writable),
                reset=reset_session,
                timeout=self.settings.connect_timeout_ms / 1000,
            )
            await pool.open(wait=False)
            self._pools[name] = pool
            self._type_names[name] = {}
            logs.event(log, "db.pool.opened", connection=name, writable=conn.writable)

    async def teardown(self) -> None:
        """Close the pools (running statements were cancelled with their tasks)."""
        for pool in self._pools.values():
            await pool.close(timeout=5)
        self._pools.clear()

    async def execute(self, task: Task) -> JsonLike:
        query = parse_input(DbQueryInput, task.input)
        conn = self._connection(query.connection)
        row_limit = db_input.row_limit(
            query.row_limit, self.settings.default_row_limit, conn.row_limit
        )
        timeout_ms = db_input.timeout_ms(query.timeout_ms, conn.statement_timeout_ms)
        params = db_input.params(query.params)
        db_input.refuse_copy(query.sql)
        if not conn.writable:
            db_input.query_only(query.sql, query.connection)
        started = time.monotonic()
        answer = await self._run(query, params, row_limit, timeout_ms, conn)
        if conn.max_cell_bytes is not None:
            _check_cells(answer, conn.max_cell_bytes)
        current().report_usage(db_rows=len(answer.rows))
        return {
            "columns": answer.columns,
            "rows": answer.rows,
            "row_count": len(answer.rows),
            "truncated": answer.truncated,
            "rowcount": answer.rowcount,
            "command": answer.command,
            "elapsed_ms": round((time.monotonic() - started) * 1000, 3),
        }

    def _connection(self, name: str) -> ConnectionSettings:
        found = self.settings.connections.get(name)
        if found is None or name not in self._pools:
            known = ", ".join(sorted(self.settings.connections)) or "none"
            raise ExecutorError(
                f"input.connection: no connection {name!r} in this worker's settings "
                f"(known: {known})",
                code=ErrorCode.INVALID_TASK,
                retryable=False,
                details={"reason": "unknown_connection"},
            )
        return found

    async def _run(
        self,
        query: DbQueryInput,
        params: Params,
        row_limit: int,
        timeout_ms: int,
        conn: ConnectionSettings,
    ) -> _Answer:
        pool = self._pools[query.connection]
        try:
            async with pool.connection() as db:
                raw = await run_statement(
                    db,
                    query.sql,
                    params,
                    row_limit=row_limit,
                    timeout_ms=timeout_ms,
                    writable=conn.writable,
                    max_bytes=conn.max_result_bytes,
                )
                known = self._type_names[query.connection]
                types = await column_types(db, raw.description, known)
        except PoolTimeout:
            raise pool_timeout(query.connection, self.settings.connect_timeout_ms) from None
        except psycopg.Error as exc:
            raise statement_failed(exc, query.connection, timeout_ms, params) from None
        names = column_names([column.name for column in raw.description])
        return _Answer(
            columns=[
                {"name": name, "type": types[column.type_code]}
                for name, column in zip(names, raw.description, strict=True)
            ],
            rows=[
                {name: output_value(cell) for name, cell in zip(names, row, strict=True)}
                for row in raw.rows
            ],
            truncated=raw.truncated,
            rowcount=raw.rowcount,
            command=raw.command,
        )


# -- the output's cells --------------------------------------------------------------------------


def _cell_bytes(cell: JsonLike) -> int:
    if isinstance(cell, str):
        return len(cell.encode())
    if isinstance(cell, bytes):
        return len(cell)
    if isinstance(cell, list):
        return sum(_cell_bytes(item) for item in cell)
    if isinstance(cell, dict):
        return sum(_cell_bytes(k) + _cell_bytes(v) for k, v in cell.items())
    return 8


def _check_cells(answer: _Answer, most: int) -> None:
    for row in answer.rows:
        for name, cell in row.items():
            if _cell_bytes(cell) > most:
                raise ExecutorError(
                    f"column {name!r} holds a value over this connection's max_cell_bytes "
                    f"({most}): select less of it (substring, a projection of the JSON)",
                    retryable=False,
                    details={"reason": "cell_too_large"},
                )
