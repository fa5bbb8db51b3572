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
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as dtime
from functools import cache
from typing import Any
from uuid import UUID

import psycopg
from psycopg import errors as pgerrors
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Loader
from psycopg.types.datetime import DateLoader, TimestampLoader, TimestamptzLoader
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from pydantic import BaseModel, ConfigDict, Field, model_validator

from wayang_mq import ErrorCode, Executor, ExecutorError, Task, current
from wayang_mq.core import logs
from wayang_mq.core.model import JsonLike
from wayang_mq.runtime.settings import SecretRef, parse_input

__all__ = ["ConnectionSettings", "DbQuery", "DbQueryInput", "DbQuerySettings"]

log = logging.getLogger("wayang_workers.db_query")

#: connection names: what a task writes in ``input.connection``
_NAME = r"^[a-z][a-z0-9_-]{0,63}$"
_INT64 = (-(2**63), 2**63 - 1)


# -- settings and input --------------------------------------------------------------------------


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


class DbQueryInput(BaseModel):
    """A task's input (see docs/executors.md, ``db.query``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connection: str = Field(min_length=1, max_length=64)
    sql: str = Field(min_length=1, max_length=100_000)
    #: positional (``%s``) or named (``%(name)s``) values; never interpolated into ``sql``
    params: list[Any] | dict[str, Any] = Field(default_factory=list)
    row_limit: int | None = Field(None, ge=1)
    timeout_ms: int | None = Field(None, ge=1)


# -- the executor --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    """What psycopg gave back for one statement."""

    description: Sequence[psycopg.Column]
    rows: list[tuple[Any, ...]]
    truncated: bool
    rowcount: int | None
    command: str | None


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
                kwargs={"autocommit": True, "prepare_threshold": None, "context": _adapters()},
                configure=_configure(writable=conn.writable),
                reset=_reset,
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
        row_limit = _limit(query.row_limit, self.settings.default_row_limit, conn.row_limit)
        timeout_ms = _timeout(query.timeout_ms, conn.statement_timeout_ms)
        params = _params(query.params)
        _refuse_copy(query.sql)
        if not conn.writable:
            _query_only(query.sql, query.connection)
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
        params: Sequence[Any] | Mapping[str, Any] | None,
        row_limit: int,
        timeout_ms: int,
        conn: ConnectionSettings,
    ) -> _Answer:
        pool = self._pools[query.connection]
        try:
            async with pool.connection() as db:
                raw = await _statement(db, query.sql, params, row_limit, timeout_ms, conn)
                types = await self._column_types(query.connection, db, raw.description)
        except PoolTimeout:
            raise ExecutorError(
                f"cannot get a connection to {query.connection!r} within "
                f"{self.settings.connect_timeout_ms} ms: the database is down, unreachable, "
                "refuses the worker's credentials, or every pooled connection is busy",
                retryable=True,
                details={"reason": "connection_failed"},
            ) from None
        except psycopg.Error as exc:
            raise _failure(exc, query.connection, timeout_ms, params) from None
        names = _column_names([column.name for column in raw.description])
        return _Answer(
            columns=[
                {"name": name, "type": types[column.type_code]}
                for name, column in zip(names, raw.description, strict=True)
            ],
            rows=[
                {name: _value(cell) for name, cell in zip(names, row, strict=True)}
                for row in raw.rows
            ],
            truncated=raw.truncated,
            rowcount=raw.rowcount,
            command=raw.command,
        )

    async def _column_types(
        self, connection: str, db: psycopg.AsyncConnection[Any], description: Sequence[Any]
    ) -> dict[int, str]:
        """PostgreSQL's name of each column's type: psycopg knows the built-in ones; the
        others (enums, domains' arrays, extensions, ``void``) are read from ``pg_type`` once
        per connection name."""
        cache = self._type_names[connection]
        wanted = {column.type_code for column in description}
        for oid in wanted - cache.keys():
            info = psycopg.adapters.types.get(oid)
            if info is not None:
                cache[oid] = f"_{info.name}" if oid == info.array_oid else info.name
        unknown = sorted(wanted - cache.keys())
        if unknown:
            cur = await db.execute(
                "SELECT oid::int8, typname::text FROM pg_type WHERE oid = ANY(%s)", [unknown]
            )
            cache.update({int(oid): str(name) for oid, name in await cur.fetchall()})
        return {oid: cache.get(oid, str(oid)) for oid in wanted}


# -- one statement -------------------------------------------------------------------------------


async def _statement(
    db: psycopg.AsyncConnection[Any],
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None,
    row_limit: int,
    timeout_ms: int,
    conn: ConnectionSettings,
) -> _Raw:
    """Run ``sql`` in a transaction of its own, with its statement timeout: on a read-only
    connection ``READ ONLY``, rolled back and read through a cursor (:func:`_streamed`); on a
    writable
    one committed, its answer read whole (a write must not be cut short by a row limit) and
    at most ``row_limit`` rows and ``max_result_bytes`` kept.

    Both send every statement with the extended protocol (psycopg would use the simple one,
    which runs several commands, for a statement without parameters): here pipeline mode
    does it; a cancelled task interrupts the wait, and psycopg cancels the statement on the
    server."""
    if not conn.writable:
        return await _streamed(db, sql, params, row_limit, timeout_ms, conn.max_result_bytes)
    async with db.transaction(), db.pipeline() as pipeline:
        cur = db.cursor()
        await cur.execute(_SESSION, [str(timeout_ms)])
        await cur.execute(sql, params)
        await pipeline.sync()
        description = cur.description or []
        rows = await cur.fetchmany(row_limit + 1) if description else []
        rowcount = cur.rowcount if cur.rowcount >= 0 else None
        command = (cur.statusmessage or "").split(" ")[0] or None
    kept = _within(rows[:row_limit], conn.max_result_bytes)
    return _Raw(description, kept, len(rows) > len(kept), rowcount, command)


#: each task's transaction: its statement timeout, and intervals written as ISO 8601
_SESSION = (
    "SELECT set_config('statement_timeout', %s, true),"
    " set_config('IntervalStyle', 'iso_8601', true)"
)


async def _streamed(
    db: psycopg.AsyncConnection[Any],
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None,
    row_limit: int,
    timeout_ms: int,
    max_bytes: int,
) -> _Raw:
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
                batch = await cur.fetchmany(min(_BATCH, row_limit + 1 - len(rows)))
                for row in batch:
                    size += _row_bytes(row)
                    if len(rows) == row_limit or size > max_bytes:
                        truncated = True
                        break
                    rows.append(row)
                if not batch:
                    break  # the cursor is exhausted
            description = cur.description or []
    return _Raw(description, rows, truncated, None if truncated else len(rows), "SELECT")


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


def _failure(
    exc: psycopg.Error,
    connection: str,
    timeout_ms: int,
    params: Sequence[Any] | Mapping[str, Any] | None,
) -> ExecutorError:
    """PostgreSQL's refusal as the task's error: the reason a client branches on, the
    SQLSTATE, and PostgreSQL's primary message with the parameters' values cut out."""
    sqlstate = exc.sqlstate
    said = _message(exc, params)
    if sqlstate is None:
        if isinstance(exc, psycopg.ProgrammingError | psycopg.DataError):
            # psycopg's own refusal before sending: placeholders and values do not match,
            # a value it cannot adapt, COPY (which needs a client that streams it)
            return ExecutorError(
                f"input.sql/params: {said}",
                code=ErrorCode.INVALID_TASK,
                retryable=False,
                details={"reason": "bad_params"},
            )
        return _connection_failed(connection, said, {})
    details: dict[str, object] = {"sqlstate": sqlstate}
    if isinstance(exc, pgerrors.QueryCanceled):
        return ExecutorError(
            f"the statement ran past its {timeout_ms} ms timeout on {connection!r} ({said}): "
            "ask for less, or a larger timeout_ms up to the connection's",
            code=ErrorCode.TIMEOUT,
            retryable=True,
            details={"reason": "statement_timeout", **details},
        )
    # a write PostgreSQL refused in a read-only transaction, or in the read-only cursor (a
    # WITH that modifies: "DECLARE CURSOR must not contain data-modifying statements")
    if isinstance(exc, pgerrors.ReadOnlySqlTransaction) or (
        sqlstate == "0A000" and "data-modifying" in said
    ):
        return ExecutorError(
            f"connection {connection!r} is read-only: {said} (a write needs a connection "
            "the worker's settings make writable)",
            retryable=False,
            details={"reason": "read_only", **details},
        )
    if sqlstate[:2] == "08" or sqlstate[:3] == "57P":
        return _connection_failed(connection, said, details)
    transient = sqlstate in ("40001", "40P01", "55P03") or sqlstate[:2] == "53"
    return ExecutorError(
        f"PostgreSQL refused the statement on {connection!r}: {said} (SQLSTATE {sqlstate})",
        retryable=transient,
        details={"reason": "sql_error", **details},
    )


def _connection_failed(connection: str, said: str, details: dict[str, object]) -> ExecutorError:
    return ExecutorError(
        f"the connection to {connection!r} failed during the statement ({said}): a write may "
        "or may not have been committed; retry when the database is back",
        retryable=True,
        details={"reason": "connection_failed", **details},
    )


def _message(exc: psycopg.Error, params: Sequence[Any] | Mapping[str, Any] | None) -> str:
    """PostgreSQL's primary message (never its DETAIL, which quotes rows), without any of
    the task's parameter values: ``invalid input syntax for type integer: "<param>"``."""
    text = exc.diag.message_primary or (str(exc).splitlines() or [type(exc).__name__])[0]
    values = params.values() if isinstance(params, Mapping) else params or []
    for value in sorted(_texts(values), key=len, reverse=True):
        text = text.replace(value, "<param>")
    return text[:500]


def _texts(values: Any) -> list[str]:
    """The text of every parameter value long enough to be worth cutting out."""
    found: list[str] = []
    for value in values:
        if isinstance(value, list):
            found += _texts(value)
        elif isinstance(value, Jsonb):
            found += _texts([json.dumps(value.obj)])
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            found += [str(value)] if len(str(value)) >= 3 else []
        elif isinstance(value, bytes) and len(value) >= 3:
            found.append(value.decode("utf-8", errors="replace"))
    return found


# -- limits and parameters -----------------------------------------------------------------------


def _limit(asked: int | None, default: int, most: int) -> int:
    if asked is None:
        return min(default, most)
    if asked > most:
        raise _too_large(f"input.row_limit: at most {most} rows on this connection")
    return asked


def _timeout(asked: int | None, most: int) -> int:
    if asked is None:
        return most
    if asked > most:
        raise _too_large(f"input.timeout_ms: at most {most} ms on this connection")
    return asked


def _too_large(message: str) -> ExecutorError:
    return ExecutorError(
        message, code=ErrorCode.INVALID_TASK, retryable=False, details={"reason": "over_limit"}
    )


#: a statement's first word, after blanks, comments and opening parentheses
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/|\()*(\w+)", re.DOTALL)


def _refuse_copy(sql: str) -> None:
    """COPY streams data through the client, which a task cannot do: refused up front (one
    that slips past this check fails ``bad_params`` and its connection is discarded)."""
    first = _FIRST_WORD.match(sql)
    if first is not None and first.group(1).upper() == "COPY":
        raise ExecutorError(
            "input.sql: COPY cannot run as a task (it streams through the client); "
            "SELECT the rows instead",
            code=ErrorCode.INVALID_TASK,
            retryable=False,
            details={"reason": "bad_params"},
        )


#: what a read-only connection runs: queries, which a cursor can read a batch at a time
_QUERIES = frozenset({"SELECT", "VALUES", "TABLE", "WITH"})


def _query_only(sql: str, connection: str) -> None:
    """A read-only connection runs queries only: a write (or any other command) is refused
    before it is sent; the ``READ ONLY`` transaction is the second wall (a function that
    writes fails there, ``read_only`` too)."""
    first = _FIRST_WORD.match(sql)
    word = first.group(1).upper() if first is not None else ""
    if word not in _QUERIES:
        raise ExecutorError(
            f"{connection!r} is a read-only connection: it runs queries only (SELECT, VALUES, "
            f"TABLE, WITH ... SELECT), not {word or 'this statement'}; writes need a "
            "connection the worker's settings make writable",
            retryable=False,
            details={"reason": "read_only"},
        )


def _params(params: list[Any] | dict[str, Any]) -> Sequence[Any] | Mapping[str, Any] | None:
    """The task's values as psycopg adapts them: a map becomes ``jsonb``, a list an array.
    None when there are none, so a literal ``%`` in such SQL needs no
    escaping (placeholders are parsed only when values are given)."""
    if not params:
        return None
    if isinstance(params, dict):
        return {key: _param(value, f"params.{key}") for key, value in params.items()}
    return [_param(value, f"params.{index}") for index, value in enumerate(params)]


def _param(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, dict):
        return Jsonb(value)
    if isinstance(value, list):
        return [_param(item, where) for item in value]
    raise ExecutorError(
        f"input.{where}: a {type(value).__name__} cannot be a query parameter",
        code=ErrorCode.INVALID_TASK,
        retryable=False,
        details={"reason": "bad_params"},
    )


# -- values: PostgreSQL's types as msgpack carries them -------------------------------------------

#: types whose psycopg loader is kept (then converted by :func:`_value`); every other type
#: psycopg knows is returned as PostgreSQL's text form (ranges, inet, money, geometry, ...)
_STRUCTURED = frozenset(
    [
        "bool", "int2", "int4", "int8", "oid", "float4", "float8", "text", "varchar",
        "bpchar", "name", "bytea", "json", "jsonb", "uuid", "date", "time", "timetz",
        "timestamp", "timestamptz",
    ]
)  # fmt: skip


class _Text(Loader):
    """PostgreSQL's text form, as it is (numeric's exact decimal, interval's ISO 8601)."""

    def load(self, data: Buffer) -> str:
        return bytes(data).decode("utf-8", errors="replace")


class _Date(DateLoader):
    """A date Python cannot hold (``infinity``, BC, after 9999) as PostgreSQL's text."""

    def load(self, data: Buffer) -> date | str:  # type: ignore[override]
        try:
            return super().load(data)
        except psycopg.DataError:
            return bytes(data).decode()


class _Timestamp(TimestampLoader):
    """A timestamp Python cannot hold as PostgreSQL's text (``infinity``, ``-infinity``)."""

    def load(self, data: Buffer) -> datetime | str:  # type: ignore[override]
        try:
            return super().load(data)
        except psycopg.DataError:
            return bytes(data).decode()


class _Timestamptz(TimestamptzLoader):
    """A timestamptz Python cannot hold as PostgreSQL's text (``infinity``, ``-infinity``)."""

    def load(self, data: Buffer) -> datetime | str:  # type: ignore[override]
        try:
            return super().load(data)
        except psycopg.DataError:
            return bytes(data).decode()


def _json_int(text: str) -> int | str:
    """A JSON integer msgpack cannot carry (beyond 64 bits) as its decimal text."""
    value = int(text)
    return value if _INT64[0] <= value <= _INT64[1] else text


def _json_loads(data: str | bytes) -> Any:
    return json.loads(data, parse_int=_json_int)


@cache
def _adapters() -> AdaptersMap:
    """The loaders of every db.query connection (built once, shared)."""
    adapters = AdaptersMap(psycopg.adapters)
    for info in psycopg.adapters.types:
        if info.name not in _STRUCTURED:
            adapters.register_loader(info.oid, _Text)  # arrays of it load as lists of text
    adapters.register_loader("date", _Date)
    adapters.register_loader("timestamp", _Timestamp)
    adapters.register_loader("timestamptz", _Timestamptz)
    set_json_loads(_json_loads, adapters)
    return adapters


def _value(cell: Any) -> JsonLike:
    """One loaded cell as the output carries it (docs/executors.md, the types table)."""
    if cell is None or isinstance(cell, bool | int | float | str | bytes):
        return cell
    if isinstance(cell, datetime):
        return cell.astimezone(UTC).isoformat() if cell.tzinfo else cell.isoformat()
    if isinstance(cell, date | dtime):
        return cell.isoformat()
    if isinstance(cell, UUID):
        return str(cell)
    if isinstance(cell, list):
        return [_value(item) for item in cell]
    if isinstance(cell, dict):
        return cell  # decoded JSON: already maps, lists, strings, numbers, booleans, nil
    return str(cell)


def _column_names(names: Sequence[str]) -> list[str]:
    """Row maps need unique keys: a repeated column name gets ``_2``, ``_3``, ... (a name
    that suffix would take is skipped to the next number)."""
    taken: set[str] = set()
    unique = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


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


# -- the pool's hooks ----------------------------------------------------------------------------


def _configure(*, writable: bool) -> Any:
    async def configure(db: psycopg.AsyncConnection[Any]) -> None:
        # psycopg begins each transaction() with BEGIN READ ONLY when set (kept across
        # DISCARD ALL: it is the client's, not a session setting)
        await db.set_read_only(not writable)

    return configure


async def _reset(db: psycopg.AsyncConnection[Any]) -> None:
    """What a statement may have left on the session goes before the next task gets it."""
    await db.execute("DISCARD ALL")
