"""How ``db.query`` reports what went wrong at the database: psycopg's errors and the
pool's timeout become the task's :class:`ExecutorError`, with the reason a client branches
on (``statement_timeout``, ``read_only``, ``connection_failed``, ``sql_error``,
``bad_params``), the SQLSTATE, and PostgreSQL's message with the task's values cut out
(an error is logged and stored; the values may be personal or secret)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg.types.json import Jsonb

from wayang_mq import ErrorCode, ExecutorError

from .db_input import Params


def pool_timeout(connection: str, connect_timeout_ms: int) -> ExecutorError:
    """No pooled connection came in time: retryable, the database may be back soon."""
    return ExecutorError(
        f"cannot get a connection to {connection!r} within "
        f"{connect_timeout_ms} ms: the database is down, unreachable, "
        "refuses the worker's credentials, or every pooled connection is busy",
        retryable=True,
        details={"reason": "connection_failed"},
    )


def statement_failed(
    exc: psycopg.Error, connection: str, timeout_ms: int, params: Params
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


def _message(exc: psycopg.Error, params: Params) -> str:
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
