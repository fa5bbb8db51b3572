"""The wire's field types: strict, bounded, and the same in every language.

Bodies are validated in pydantic's strict mode, so ``"123"`` is not an int, ``true`` is not an
attempt and bytes are not a string: a publisher in another language learns of a wrong type at
once instead of having it coerced. Two things strict mode gets wrong for msgpack are fixed here:
msgpack arrays decode as lists (our frozen models hold tuples), and enum fields must accept the
member's string value, and nothing else (lax enums would take bytes).

Ids are bounded in UTF-8 **bytes**, not characters: they travel in AMQP short strings
(``message_id``, ``correlation_id``, routing keys such as ``progress.<task-id>``), which hold at
most 255 bytes. 128 emoji are 128 characters and 512 bytes: such an id passes a character count
and then cannot be answered. Ids hold no control characters (C0, DEL, C1), so they are safe in
logs, terminals and routing keys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, Strict

from wayang_mq.core.names import CAPABILITY_CHARS, valid_capability

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)

# The byte bounds of the wire's ids; documented in docs/wire-format.md §4.
TASK_ID_BYTES = 128  # routing keys prefix it (progress., attempt., cancel., status.): < 255
EXECUTOR_ID_BYTES = 128  # registered.<id>, heartbeat.<id>
NODE_ID_BYTES = 256  # body only
TOKEN_BYTES = 1024  # body only
REPLY_TO_BYTES = 200  # a routing key on wayang.results or wayang.control
KEY_BYTES = 256  # partition and idempotency keys, request ids, issuers

#: integers on the wire stay within what a JavaScript number holds exactly
MAX_INT = 2**53 - 1

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _as_tuple(value: Any) -> Any:
    """msgpack arrays arrive as lists; the frozen models keep tuples."""
    return tuple(value) if isinstance(value, list) else value


#: a msgpack array of ``T``
Array = Annotated[tuple[T, ...], BeforeValidator(_as_tuple)]


def _string_only(value: Any) -> Any:
    """Enum fields take the member's string value (or a member), never bytes or numbers."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


#: an enum carried as its string value
WireEnum = Annotated[E, Strict(False), BeforeValidator(_string_only)]


def _bounded(max_bytes: int, *, min_bytes: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        # Every task and result runs this for each id: the common case (ASCII) costs two
        # C-level calls; UTF-8 encoding refuses a lone surrogate by itself.
        if value.isascii():
            size = len(value)
            if not value.isprintable():
                raise ValueError("must not contain control characters")
        else:
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise ValueError("must be valid UTF-8 (it holds a lone surrogate)") from None
            if _CONTROL.search(value):
                raise ValueError("must not contain control characters")
        if size < min_bytes:
            raise ValueError("must not be empty")
        if size > max_bytes:
            raise ValueError(f"is {size} bytes in UTF-8, the limit is {max_bytes}")
        return value

    return check


def _id(max_bytes: int, *, min_bytes: int = 1) -> AfterValidator:
    return AfterValidator(_bounded(max_bytes, min_bytes=min_bytes))


def _described(max_bytes: int, *, min_bytes: int = 1) -> Any:
    """The bound in the JSON Schema: ``x-max-utf8-bytes`` (JSON Schema counts characters)."""
    return Field(
        json_schema_extra={
            "minLength": min_bytes,
            "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$",
            "x-max-utf8-bytes": max_bytes,
        }
    )


TaskId = Annotated[str, _id(TASK_ID_BYTES), _described(TASK_ID_BYTES)]
ExecutorId = Annotated[str, _id(EXECUTOR_ID_BYTES), _described(EXECUTOR_ID_BYTES)]
NodeId = Annotated[str, _id(NODE_ID_BYTES), _described(NODE_ID_BYTES)]
Token = Annotated[str, _id(TOKEN_BYTES), _described(TOKEN_BYTES)]
ReplyTo = Annotated[str, _id(REPLY_TO_BYTES, min_bytes=0), _described(REPLY_TO_BYTES, min_bytes=0)]
Key = Annotated[str, _id(KEY_BYTES), _described(KEY_BYTES)]
OptionalKey = Annotated[str, _id(KEY_BYTES, min_bytes=0), _described(KEY_BYTES, min_bytes=0)]


def _capability(value: str) -> str:
    if not valid_capability(value):
        raise ValueError(
            "capability must be dotted lowercase words like 'http.call' "
            f"(letters, digits, '_' or '-'; at most {CAPABILITY_CHARS}; not starting with 'retry.')"
        )
    return value


Capability = Annotated[
    str,
    AfterValidator(_capability),
    Field(
        json_schema_extra={
            "maxLength": CAPABILITY_CHARS,
            "pattern": r"^(?!retry\.)[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$",
        }
    ),
]
#: instants (``*_at_ms``) and durations (``*_ms``) in integer milliseconds
Millis = Annotated[int, Field(ge=0, le=MAX_INT)]
Count = Annotated[int, Field(ge=1, le=MAX_INT)]


def derived_id(base: str, suffix: str, max_bytes: int) -> str:
    """``base + suffix`` when it fits ``max_bytes``; otherwise the first 32 hex digits of
    SHA-256 over ``base``'s UTF-8, then ``suffix``. Deterministic, so every language derives
    the same id (a compensation's id: wire-format §4.1)."""
    joined = base + suffix
    if len(joined.encode("utf-8")) <= max_bytes:
        return joined
    return hashlib.sha256(base.encode("utf-8")).hexdigest()[:32] + suffix


def valid_id(value: object, max_bytes: int) -> bool:
    """True when ``value`` could be carried as an id of ``max_bytes`` (for AMQP properties
    read off a delivery, which nothing has validated)."""
    if not isinstance(value, str):
        return False
    try:
        _bounded(max_bytes, min_bytes=1)(value)
    except ValueError:
        return False
    return True


def printable(text: object, limit: int = 1000) -> str:
    """``text`` safe for one log line: control characters escaped, at most ``limit`` chars.

    Hostile ids and reasons may hold NUL, CR or ESC; written raw they forge log lines or
    drive a terminal.
    """
    value = text if isinstance(text, str) else repr(text)
    if len(value) > limit:
        value = value[:limit] + "…"
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", value)
