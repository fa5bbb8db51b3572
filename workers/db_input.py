"""What a ``db.query`` task may ask, checked before anything is sent: its input, the row
limit and timeout within its connection's, the statements it may send (no COPY; queries
only on a read-only connection), and its values as psycopg's parameters."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field

from wayang_mq import ErrorCode, ExecutorError

#: a task's values as psycopg gets them: positional, named, or none at all
Params = Sequence[Any] | Mapping[str, Any] | None


class DbQueryInput(BaseModel):
    """A task's input (see docs/executors.md, ``db.query``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connection: str = Field(min_length=1, max_length=64)
    sql: str = Field(min_length=1, max_length=100_000)
    #: positional (``%s``) or named (``%(name)s``) values; never interpolated into ``sql``
    params: list[Any] | dict[str, Any] = Field(default_factory=list)
    row_limit: int | None = Field(None, ge=1)
    timeout_ms: int | None = Field(None, ge=1)


# -- limits --------------------------------------------------------------------------------------


def row_limit(asked: int | None, default: int, most: int) -> int:
    """The rows a task gets: what it asked, else the default; asking past ``most`` fails."""
    if asked is None:
        return min(default, most)
    if asked > most:
        raise _too_large(f"input.row_limit: at most {most} rows on this connection")
    return asked


def timeout_ms(asked: int | None, most: int) -> int:
    """A task's statement timeout: what it asked, else ``most``; asking past it fails."""
    if asked is None:
        return most
    if asked > most:
        raise _too_large(f"input.timeout_ms: at most {most} ms on this connection")
    return asked


def _too_large(message: str) -> ExecutorError:
    return ExecutorError(
        message, code=ErrorCode.INVALID_TASK, retryable=False, details={"reason": "over_limit"}
    )


# -- statements ----------------------------------------------------------------------------------

#: a statement's first word, after blanks, comments and opening parentheses
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/|\()*(\w+)", re.DOTALL)


def refuse_copy(sql: str) -> None:
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


def query_only(sql: str, connection: str) -> None:
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


# -- values --------------------------------------------------------------------------------------


def params(values: list[Any] | dict[str, Any]) -> Params:
    """The task's values as psycopg adapts them: a map becomes ``jsonb``, a list an array.
    None when there are none, so a literal ``%`` in such SQL needs no
    escaping (placeholders are parsed only when values are given)."""
    if not values:
        return None
    if isinstance(values, dict):
        return {key: _param(value, f"params.{key}") for key, value in values.items()}
    return [_param(value, f"params.{index}") for index, value in enumerate(values)]


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
