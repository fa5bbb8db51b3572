"""How ``db.query`` turns PostgreSQL's values into its output: the loaders its connections
use (PostgreSQL's text form for what msgpack cannot carry exactly, ``infinity`` dates as
text, JSON integers past 64 bits as text), each loaded cell as output, unique column names
and each column's type name. The types table in docs/executors.md is the contract."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, date, datetime
from datetime import time as dtime
from functools import cache
from typing import Any
from uuid import UUID

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Loader
from psycopg.types.datetime import DateLoader, TimestampLoader, TimestamptzLoader
from psycopg.types.json import set_json_loads

from wayang_mq.core.model import JsonLike

_INT64 = (-(2**63), 2**63 - 1)

#: types whose psycopg loader is kept (then converted by :func:`output_value`); every other
#: type psycopg knows is returned as PostgreSQL's text form (ranges, inet, money, geometry, ...)
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
def loaders() -> AdaptersMap:
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


def output_value(cell: Any) -> JsonLike:
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
        return [output_value(item) for item in cell]
    if isinstance(cell, dict):
        return cell  # decoded JSON: already maps, lists, strings, numbers, booleans, nil
    return str(cell)


def column_names(names: Sequence[str]) -> list[str]:
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


async def column_types(
    db: psycopg.AsyncConnection[Any], description: Sequence[Any], known: dict[int, str]
) -> dict[int, str]:
    """PostgreSQL's name of each column's type: psycopg knows the built-in ones; the
    others (enums, domains' arrays, extensions, ``void``) are read from ``pg_type`` once
    and kept in ``known`` (the caller keeps one per connection name: OIDs are a database's)."""
    wanted = {column.type_code for column in description}
    for oid in wanted - known.keys():
        info = psycopg.adapters.types.get(oid)
        if info is not None:
            known[oid] = f"_{info.name}" if oid == info.array_oid else info.name
    unknown = sorted(wanted - known.keys())
    if unknown:
        cur = await db.execute(
            "SELECT oid::int8, typname::text FROM pg_type WHERE oid = ANY(%s)", [unknown]
        )
        known.update({int(oid): str(name) for oid, name in await cur.fetchall()})
    return {oid: known.get(oid, str(oid)) for oid in wanted}
