"""Fuzzing the wire: 10,000 generated hostile messages at every consumer a stranger can reach.

Hypothesis generates them up front, derandomized (every run sends the same ones), and they are
published raw (the AMQP property bytes exactly as generated) in bulk over one confirmed
channel:

- **4,000 tasks at a worker** (``wayang.tasks``, ``demo.echo``): 600 valid signed tasks with odd
  inputs (the verifiable ones: each must get exactly one terminal result), 1,200 signed tasks
  with one to three fields of the wrong type, out of range, oversized, holding control
  characters or invalid UTF-8, unknown or missing, 1,000 broken bodies signed, unsigned,
  forged or signed by an unknown key (truncated, trailing bytes, nesting past every limit,
  lengths declaring 4 GiB, ext types, invalid UTF-8, not a map, random bytes, oversized), 600
  valid tasks with hostile signature headers (wrong AMQP types, a bad signature, none) and
  600 whose properties pamqp cannot decode or that carry ``wayang-undecodable`` themselves;
- **3,000 dead letters at the reaper** (``wayang.dlx``, ``demo.echo``): 500 valid signed tasks,
  1,000 hostile bodies it can correlate, 500 marked as answered by a worker already and 1,000
  whose ids and properties are hostile too, most with hostile ``x-death`` headers;
- **3,000 results at a dispatcher's reply queue** (``wayang.results``, ``reply.<id>``): 800
  broken bodies, 1,000 signed results with wrong fields, 500 valid signed results for tasks
  it never sent, 500 for 100 tasks it waits for (some with a stale token) and 200 valid
  results not signed by a key it trusts.

Every message carries hostile properties: message ids and reply addresses up to the 255-byte
short-string limit, with control characters or not UTF-8; priorities, delivery modes and
expirations; header tables with every AMQP field type, negative and huge numbers, strings up
to 60 KB, nested tables and arrays, keys up to 255 bytes; timestamps past the year 9999;
tables nested past Python's recursion limit. Hypothesis draws a few thousand examples a
second, not ten thousand: it generates a quarter as many bodies and property sets, and each
body goes out four times, each time with other properties.

Then each daemon is still connected (no ``broker.disconnected``) and serving, every verifiable
task got exactly one terminal result at its reply address, and every message is accounted
for: a task ran (SUCCESS, its input echoed) or waits in ``wayang.dead.demo.echo`` with its body
intact, answered FAILED only when it verified (nobody else chooses where a signed answer goes);
a dead letter was answered (when it verified) or skipped (or refused, logged), and kept; a
result was consumed with the verdict it calls for, and the reply queue is empty.

What the fuzzing found (four bugs, now fixed) is at the end of this file, each as a test of its
own with its minimal message; the corpus still leaves those inputs out where they were found,
since those tests cover them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import struct
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import aio_pika
import aiormq
import msgpack
import pamqp.decode
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp import commands
from wayang_workers.demo import Echo

from wayang_mq import ErrorCode, Status
from wayang_mq.amqp import frames
from wayang_mq.client.replies import ResultSeen, Verdict
from wayang_mq.core.envelope import open_task
from wayang_mq.core.errors import WireError
from wayang_mq.core.model import Result, Task, now_ms
from wayang_mq.core.names import (
    DEAD_LETTER_EXCHANGE,
    RESULTS_EXCHANGE,
    TASKS_EXCHANGE,
    dead_queue,
    reply_queue,
    task_queue,
)
from wayang_mq.core.signing import KEY_ID_HEADER, SIGNATURE_HEADER, KeyRing, Signer
from wayang_mq.core.wire import (
    DEAD_LETTERED_BY_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    UNDECODABLE_HEADER,
    decode,
)
from wayang_mq.testing.harness import Fabric, eventually

pytestmark = pytest.mark.timeout(300)

T = TypeVar("T")
PROPERTIES = commands.Basic.Properties
CAPABILITY = "demo.echo"
MAX_BODY = 64 * 1024  # the worker's and the reaper's max_body_bytes here: oversize is cheap
#: a content header's payload, at most: the broker's frame_max (131,072) less 8 bytes of frame
FRAME_PAYLOAD = 131_064
#: what a worker answers a refused task with (wire-format §6), and the reaper's expiry
REFUSAL_CODES = {
    ErrorCode.INVALID_TASK,
    ErrorCode.BAD_SIGNATURE,
    ErrorCode.OVERSIZED,
    ErrorCode.TOKEN_EXPIRED,
    ErrorCode.NO_EXECUTOR,
    ErrorCode.TIMEOUT,
}
#: the last millisecond of the year 9999: pamqp decodes a timestamp up to it (above 2**32 it
#: reads milliseconds), and no further
LAST_DECODABLE_TIMESTAMP = 253_402_300_799_999
FLOAT32_MAX = 3.4028234663852886e38

# -- raw AMQP: what a hostile client can put on the wire --------------------------------------

#: an AMQP field-table value as (type letter, value): the type is part of what is hostile
Field = tuple[str, Any]
Entries = tuple[tuple[bytes, Field], ...]
_FIXED = {
    "t": ">?",
    "b": ">b",
    "B": ">B",
    "s": ">h",
    "u": ">H",
    "I": ">i",
    "i": ">I",
    "l": ">q",
    "f": ">f",
    "d": ">d",
    "T": ">Q",
}


def _field(value: Field) -> bytes:
    """One field-table value as RabbitMQ reads it (``raw``: bytes written as they are)."""
    tag, content = value
    if tag in _FIXED:
        return tag.encode() + struct.pack(_FIXED[tag], content)
    if tag in ("S", "x"):
        return tag.encode() + struct.pack(">I", len(content)) + bytes(content)
    if tag == "D":
        return b"D" + struct.pack(">Bi", *content)
    if tag == "A":
        items = b"".join(_field(item) for item in content)
        return b"A" + struct.pack(">I", len(items)) + items
    if tag == "F":
        return b"F" + _table(content)
    if tag == "V":
        return b"V"
    assert tag == "raw", tag
    return bytes(content)


def _table(entries: Entries) -> bytes:
    items = b"".join(_shortstr(key) + _field(value) for key, value in entries)
    return struct.pack(">I", len(items)) + items


def _shortstr(raw: bytes) -> bytes:
    assert len(raw) <= 255
    return bytes([len(raw)]) + raw


def _nested(depth: int) -> Field:
    """A field table holding itself ``depth`` times: past Python's recursion limit, pamqp
    cannot decode it (RabbitMQ takes it)."""
    table = struct.pack(">I", 0)
    for _ in range(depth):
        entry = _shortstr(b"n") + b"F" + table
        table = struct.pack(">I", len(entry)) + entry
    return ("raw", b"F" + table)


def _decodes(raw: bytes) -> bool:
    """True when pamqp decodes every property of ``raw`` (flags, then the property list):
    what the client library itself makes of it, without wayang-mq's shim."""
    (flags,), data = struct.unpack_from(">H", raw), raw[2:]
    for name in PROPERTIES.__slots__:
        if flags & PROPERTIES.flags[name]:
            try:
                consumed, _ = pamqp.decode.by_type(data, PROPERTIES.amqp_type(name))
            except Exception:  # ValueError, UnicodeDecodeError, RecursionError
                return False
            data = data[consumed:]
    return True


class _RawProperties(PROPERTIES):
    """Properties whose bytes go on the wire exactly as generated (aiormq marshals the
    content header with ``properties.marshal()``)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self._raw = raw

    def marshal(self) -> bytes:
        return self._raw


async def _publish_all(
    amqp_url: str, exchange: str, routing_key: str, messages: Sequence[Sent]
) -> None:
    """Publish every message over one confirmed channel, pipelined; each must be confirmed
    (a properties frame the broker refuses would close the channel instead)."""
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        window = asyncio.Semaphore(256)

        async def publish(message: Sent) -> None:
            async with window:
                confirm = await channel.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=_RawProperties(message.properties),
                )
            assert isinstance(confirm, commands.Basic.Ack), confirm

        await asyncio.gather(*(publish(message) for message in messages))
    finally:
        await connection.close()


# -- what is generated: recipes, filled in with ids and clocks when sent ----------------------


class Ref(Enum):
    """A value the builder fills in per message."""

    OWN_ID = "the message's own unique id"
    REPLY = "the test's reply address"


class Sign(Enum):
    """How a body is signed."""

    GOOD = "by the fabric's key"
    NONE = "not at all"
    UNKNOWN_KEY = "by a key nobody trusts"
    FORGED = "the fabric's key id, the signature of other bytes"


#: a short-string property: absent, text, raw bytes (not UTF-8), or filled in
Short = str | bytes | Ref | None
DELETE = object()  # a change that removes the key


@dataclass(frozen=True)
class Packed:
    """A msgpack value given as its bytes (what msgpack-python will not write: invalid
    UTF-8, a lone surrogate, a map with odd keys)."""

    raw: bytes


@dataclass(frozen=True)
class Rel:
    """An instant relative to when the message is built, in milliseconds."""

    offset_ms: int


@dataclass(frozen=True)
class Props:
    """Hostile AMQP properties."""

    message_id: Short = Ref.OWN_ID
    reply_to: Short = Ref.REPLY
    correlation_id: Short = None
    content_type: Short = None
    content_encoding: Short = None
    message_type: Short = None
    app_id: Short = None
    cluster_id: Short = None
    delivery_mode: int | None = None
    priority: int | None = None
    expiration: str | None = None
    timestamp: int | None = None
    headers: Entries = ()


@dataclass(frozen=True)
class ValidBody:
    """The message's own task (or result), valid; a task's input holds ``value`` (odd but
    legal msgpack) and, ``deep`` arrays down, a 1."""

    value: Any = None
    deep: int = 0
    status: str = "SUCCESS"  # results: SUCCESS, FAILED (with an error) or PENDING
    pending: int | None = None  # results: answers the dispatcher's pending task of that index
    stale_token: bool = False  # results: with a token the pending task does not have


@dataclass(frozen=True)
class Mutated:
    """The message's own task (or result) with fields replaced or removed, each change
    making it invalid."""

    changes: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Broken:
    """A body that is not a task (or result) at all; ``kind`` names the builder."""

    kind: str
    arg: Any


Body = ValidBody | Mutated | Broken


@dataclass(frozen=True)
class Recipe:
    """One generated message before its ids and clocks are filled in."""

    body: Body
    sign: Sign
    props: Props
    #: hostile values for the signature headers, written after the real ones (they win)
    signature_headers: Entries = ()


@dataclass(frozen=True)
class Sent:
    """One message as published, and what must become of it."""

    own_id: str
    properties: bytes
    body: bytes
    #: a valid body with a trusted signature and properties that decode: its receiver
    #: must accept it (a task gets exactly one terminal result)
    verifiable: bool
    #: message_id is the own id and reply_to the test's address, both readable: a refusal
    #: is answered there
    correlatable: bool
    #: the worker must run it: verifiable, with no AMQP reply_to other than the body's
    succeeds: bool
    #: a dead letter a worker says it answered already (the reaper must not answer again)
    answered_before: bool
    recipe: Recipe


# -- strategies ----------------------------------------------------------------------------


def _fit(text: str, limit: int = 255) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes (a short string holds 255)."""
    return text.encode()[:limit].decode("utf-8", "ignore")


ODD_TEXTS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\r\nevent=forged",
    "\x1b[31m",
    "\x7f",
    "\x85",
    "\u2028",
    "\ufeff",
    "\U0001f600" * 63,  # 252 bytes
    "é" * 127,  # 254 bytes
    "x" * 255,
    "x" * 129,
    "x" * 201,
    "reply.",
    "#",
    "*.*",
    "noreply.demo.echo",
    "unknown-00000000-0000-4000-8000-000000000000",
]
_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(ODD_TEXTS),
    st.integers(0, 255).map(lambda n: "x" * n),
).map(_fit)
_not_utf8 = st.binary(max_size=30).map(lambda raw: b"\xff" + raw)


def _shorts(*, readable: bool = True) -> st.SearchStrategy[Short]:
    """An optional short-string property, unreadable (not UTF-8) unless ``readable``."""
    options: list[st.SearchStrategy[Short]] = [st.none(), _text]
    if not readable:
        options.append(_not_utf8)
    return st.one_of(options)


_keys = st.one_of(
    st.sampled_from([b"", b"k", b"x-death", b"x-partition-key", b"wayang-error-code", b"\x00"]),
    st.sampled_from(ODD_TEXTS).map(str.encode),
    st.integers(129, 255).map(lambda n: b"k" * n),  # pamqp cuts keys past 128 bytes on encode
    st.text(max_size=6).map(str.encode),
)


def _header_values(*, copyable: bool) -> st.SearchStrategy[Field]:
    """Any field-table value. ``copyable``: one pamqp encodes again once it has decoded it
    (a worker copies a refused task's headers onto its dead letter): no longstr that is not
    UTF-8, no double beyond float32 (pamqp writes floats as float32)."""
    # RabbitMQ cannot take NaN or an infinity in a header (its parser crashes the channel
    # with INTERNAL_ERROR and closes the publisher's connection): they never reach a consumer.
    doubles = (
        st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX)
        if copyable
        else st.floats(allow_nan=False, allow_infinity=False)
    )
    strings = [
        st.tuples(st.just("S"), st.text(max_size=20).map(str.encode)),
        st.tuples(st.just("S"), st.integers(256, 30_000).map(lambda n: b"v" * n)),
        st.tuples(st.just("x"), st.binary(max_size=20)),
    ]
    if not copyable:
        strings.append(st.tuples(st.just("S"), _not_utf8))
    leaves = st.one_of(
        st.tuples(st.just("t"), st.booleans()),
        st.tuples(st.just("b"), st.integers(-(2**7), 2**7 - 1)),
        st.tuples(st.just("B"), st.integers(0, 2**8 - 1)),
        st.tuples(st.just("s"), st.integers(-(2**15), 2**15 - 1)),
        st.tuples(st.just("u"), st.integers(0, 2**16 - 1)),
        st.tuples(st.just("I"), st.integers(-(2**31), 2**31 - 1)),
        st.tuples(st.just("i"), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("l"), st.integers(-(2**63), 2**63 - 1)),
        st.tuples(st.just("f"), st.floats(width=32, allow_nan=False, allow_infinity=False)),
        st.tuples(st.just("d"), doubles),
        st.tuples(st.just("D"), st.tuples(st.integers(0, 255), st.integers(-(2**31), 2**31 - 1))),
        st.tuples(st.just("T"), st.integers(0, LAST_DECODABLE_TIMESTAMP)),
        st.tuples(st.just("V"), st.none()),
        *strings,
    )
    return st.one_of(
        leaves,
        st.tuples(st.just("A"), st.lists(leaves, max_size=3)),
        st.tuples(st.just("F"), st.lists(st.tuples(_keys, leaves), max_size=3).map(tuple)),
        st.integers(2, 60).map(_tables_down),
    )


def _tables_down(depth: int) -> Field:
    """Tables nested ``depth`` deep (well within what pamqp decodes)."""
    value: Field = ("t", True)
    for _ in range(depth):
        value = ("F", ((b"n", value),))
    return value


def _headers(*, copyable: bool) -> st.SearchStrategy[Entries]:
    return st.lists(st.tuples(_keys, _header_values(copyable=copyable)), max_size=6).map(tuple)


NO_HEADERS: st.SearchStrategy[Entries] = st.just(())
SIGNED = st.just(Sign.GOOD)
UNSIGNED = st.just(Sign.NONE)
#: a header table pamqp cannot decode, one way each (wayang-mq's shim marks the message)
_unreadable_header = st.one_of(
    st.just((b"deep", _nested(1_500))),
    st.integers(LAST_DECODABLE_TIMESTAMP + 1, 2**64 - 1).map(lambda ts: (b"ts", ("T", ts))),
    _not_utf8.map(lambda key: (key, ("t", True))),
)


def _props(
    *,
    message_id: st.SearchStrategy[Short],
    reply_to: st.SearchStrategy[Short],
    readable: bool = True,
    copyable: bool = True,
    extra_headers: st.SearchStrategy[Entries] = NO_HEADERS,
    expiration: bool = False,
) -> st.SearchStrategy[Props]:
    """Hostile properties; ``readable``: every one of them decodes."""
    return st.builds(
        Props,
        message_id=message_id,
        reply_to=reply_to,
        correlation_id=st.one_of(st.just(Ref.OWN_ID), _shorts(readable=readable)),
        content_type=st.one_of(st.just("application/msgpack"), _shorts(readable=readable)),
        content_encoding=_shorts(readable=readable),
        message_type=st.one_of(st.just("wayang.task.v1"), _shorts(readable=readable)),
        app_id=_shorts(readable=readable),
        cluster_id=_shorts(readable=readable),
        delivery_mode=st.sampled_from([None, 1, 2]),
        priority=st.none() | st.integers(0, 255),
        expiration=st.sampled_from([None, "0", "1", "10", "86400000"]) if expiration else st.none(),
        timestamp=st.none()
        | st.integers(0, LAST_DECODABLE_TIMESTAMP)
        | (st.integers(LAST_DECODABLE_TIMESTAMP + 1, 2**64 - 1) if not readable else st.nothing()),
        headers=st.tuples(_headers(copyable=copyable), extra_headers).map(lambda h: h[0] + h[1]),
    )


# Values no field of the schema accepts for its type (wire-format §4: no coercion).
#: every integer msgpack can carry (it has no form for one beyond 64 bits)
_ints = st.integers(-(2**63), 2**64 - 1)
_ext = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))


def _timestamp_ext(data: bytes) -> Packed:
    """Ext type -1 (a msgpack timestamp) of any length: only 4, 8 and 12 are timestamps."""
    return Packed(b"\xc7" + bytes([len(data)]) + b"\xff" + data)


_not_a_string = st.one_of(
    _ints,
    st.booleans(),
    st.binary(max_size=8),
    st.floats(),
    st.sampled_from([[], {}, ["x"], {"x": "y"}, msgpack.Timestamp(0)]),
    _ext,
)
_not_an_int = st.one_of(
    st.text(alphabet="0123456789", min_size=1, max_size=6),
    st.sampled_from([str(2**64), str(10**40), "-1", "1e3", "0x10"]),
    st.booleans(),
    st.floats(),
    st.binary(max_size=4),
    st.sampled_from([[1], {"n": 1}, msgpack.Timestamp(1)]),
    _ext,
)
_not_a_map = st.one_of(
    _ints, st.text(max_size=8), st.binary(max_size=8), st.lists(_ints, max_size=2)
)
_bad_utf8 = st.sampled_from(
    [
        Packed(b"\xa2\xff\xfe"),  # not UTF-8
        Packed(b"\xa3\xed\xa0\x80"),  # a lone surrogate, encoded
        Packed(b"\xa1\x80"),  # a continuation byte alone
        Packed(b"\xd9\x02\xc3\x28"),  # str8: an invalid two-byte sequence
    ]
)
_controls = st.tuples(
    st.text(max_size=6), st.sampled_from("\x00\x07\x1b\n\r\x7f\x85\x9f"), st.text(max_size=6)
).map("".join)


def _oversized(limit: int) -> st.SearchStrategy[str]:
    """Text one to eight characters past ``limit`` UTF-8 bytes (multi-byte ones too)."""
    return st.tuples(st.sampled_from(["x", "é", "€", "\U0001f600"]), st.integers(1, 8)).map(
        lambda unit: unit[0] * (limit // len(unit[0].encode()) + unit[1])
    )


def _bad_id(limit: int, *, nullable: bool = False, empty_ok: bool = False) -> st.SearchStrategy:
    options = [_not_a_string, _bad_utf8, _controls, _oversized(limit)]
    if not empty_ok:
        options.append(st.just(""))
    if not nullable:
        options.append(st.none())
    return st.one_of(options)


def _bad_count(*, nullable: bool = False) -> st.SearchStrategy:
    """Not an integer of 1 to 2**53 - 1."""
    options = [
        _not_an_int,
        st.integers(-(2**63), 0),
        st.integers(2**53, 2**64 - 1),
    ]
    if not nullable:
        options.append(st.none())
    return st.one_of(options)


_bad_millis = st.one_of(
    _not_an_int, st.none(), st.integers(-(2**63), -1), st.integers(2**53, 2**64 - 1)
)
_bad_capability = st.one_of(
    _bad_id(128),
    st.sampled_from(
        [
            *["DEMO.ECHO", "retry.demo.echo", "demo..echo", "demo.echo ", ".demo", "x" * 129],
            *["demo.sleep", "nobody.serves.this"],  # valid, but not this queue's
        ]
    ),
)

#: for each task field, changes that make a task invalid (or refused: clocks, capability)
TASK_CHANGES: dict[str, st.SearchStrategy] = {
    "task_id": _bad_id(128),
    "token": _bad_id(1024),
    "node_id": _bad_id(256),
    "capability": _bad_capability,
    "input": st.one_of(
        _not_a_map,
        st.none(),
        st.sampled_from(
            [
                Packed(b"\x81\x01\x01"),  # an integer key
                Packed(b"\x81\xc4\x01k\x01"),  # a bin key
                Packed(b"\x81\x91\x01\x01"),  # an array key
                Packed(b"\x81\xa1k\x81\x01\x01"),  # an integer key, nested
            ]
        ),
    ),
    "policy": st.one_of(
        _not_a_map,
        st.none(),
        _bad_id(128, nullable=True).map(lambda v: {"executor_id": v}),
        st.sampled_from([{"labels": {"a": 1}}, {"labels": ["a"]}, {"unknown": 1}]),
        st.one_of(st.floats(max_value=-1e-9), st.sampled_from([math.nan, math.inf, "1"])).map(
            lambda v: {"max_cost": v}
        ),
    ),
    "retry": st.one_of(
        _not_a_map,
        st.none(),
        st.one_of(st.integers(-5, 0), st.integers(101, 2**40), _not_an_int).map(
            lambda v: {"max_attempts": v}
        ),
        st.one_of(st.floats(max_value=0.99), st.floats(min_value=1000.01), st.just("2")).map(
            lambda v: {"backoff_multiplier": v}
        ),
        _bad_millis.map(lambda v: {"initial_backoff_ms": v}),
        st.sampled_from([["nope"], "timeout", [1], [None]]).map(lambda v: {"non_retryable": v}),
        st.just({"jitter": True}),
    ),
    "timeout_ms": _bad_count(nullable=True),
    "heartbeat_timeout_ms": _bad_count(nullable=True),
    "issued_at_ms": st.one_of(_bad_millis, st.just(Rel(3_600_000))),  # an hour ahead
    "deadline_ms": st.one_of(
        _bad_millis,
        st.sampled_from([Rel(-1), Rel(-3_600_000), Rel(30 * 86_400_000)]),  # past, or too far
    ),
    "attempt": _bad_count(),
    "reply_to": _bad_id(200, empty_ok=True),
    "partition_key": _bad_id(256, nullable=True),
    "idempotency_key": _bad_id(256, nullable=True),
    "issuer": _bad_id(256, empty_ok=True),
    "compensation": st.one_of(
        _not_a_map,
        st.sampled_from(
            [
                {},
                {"capability": "NOT A CAPABILITY"},
                {"capability": "demo.echo", "node_id": ""},
                {"capability": "demo.echo", "input": 1},
                {"capability": "demo.echo", "extra": 1},
            ]
        ),
    ),
}
REQUIRED_TASK_FIELDS = ["task_id", "token", "node_id", "capability", "issued_at_ms", "deadline_ms"]

#: the same for a result
RESULT_CHANGES: dict[str, st.SearchStrategy] = {
    "task_id": _bad_id(128),
    "token": _bad_id(1024, empty_ok=True),
    "node_id": _bad_id(256, empty_ok=True),
    "capability": _bad_id(128) | st.sampled_from(["DEMO.ECHO", "retry.x", "x" * 129]),
    "status": st.one_of(
        _not_a_string, st.sampled_from(["DONE", "success", "", "FAILED", "SUCCESS "])
    ),
    "executor_id": _bad_id(128),
    "attempt": _bad_count(),
    "error": st.one_of(
        _not_a_map,
        st.sampled_from(
            [
                {},
                {"code": "nope"},
                {"code": 1},
                {"code": b"timeout"},
                {"code": "timeout", "retryable": "yes"},
                {"code": "timeout", "retry_after_ms": -1},
                {"code": "timeout", "extra": 1},
            ]
        ),
    ),
    "metrics": st.one_of(
        _not_a_map, st.sampled_from([{"a": "1"}, {"a": math.nan}, {"a": math.inf}, {"a": None}])
    ),
    "logs": st.one_of(_ints, st.sampled_from([[1], [b"x"], [None], {"a": "b"}])),
    "finished_at_ms": _bad_millis.filter(lambda v: v is not None),
    "compensation_task_id": _bad_id(128, nullable=True),
}
REQUIRED_RESULT_FIELDS = ["task_id", "token", "node_id", "capability", "status", "executor_id"]


def _changes(
    fields: Mapping[str, st.SearchStrategy], required: Sequence[str]
) -> st.SearchStrategy[Mutated]:
    one = st.one_of(
        *(st.tuples(st.just(name), values) for name, values in fields.items()),
        st.tuples(st.sampled_from(required), st.just(DELETE)),
        st.tuples(st.text(min_size=1, max_size=10).map(lambda k: f"x-{k}"), _not_a_string),
    )
    return st.lists(one, min_size=1, max_size=3, unique_by=lambda change: change[0]).map(
        lambda changes: Mutated(tuple(changes))
    )


#: legal msgpack for a task's input: nil, bools, integers to the uint64 limit, NaN and the
#: infinities, any text, bin, timestamps, arrays, maps with str or bin keys (ext types are
#: refused: see the test at the end)
_input_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
    ),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.binary(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
_valid_task = st.builds(
    ValidBody,
    value=_input_values,
    deep=st.one_of(st.just(0), st.integers(1, 1_019)),  # 1,022 is msgpack's own limit
)

_NESTING_UNITS = [b"\x91", b"\x81\xa1a", b"\xdc\x00\x01", b"\xde\x00\x01\xa0"]
_HUGE_LENGTHS = [
    b"\xdb\xff\xff\xff\xff",  # str 32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin 32
    b"\xdd\xff\xff\xff\xff",  # array 32 of 4 billion items
    b"\xdf\xff\xff\xff\xff",  # map 32
    b"\xc9\xff\xff\xff\xff\x01",  # ext 32
    b"\xda\xff\xff",  # str 16
    b"\xdc\xff\xff",  # array 16
    b"\xde\xff\xff",  # map 16
]
_broken = st.one_of(
    st.builds(Broken, st.just("truncated"), st.floats(0, 1, exclude_max=True)),
    st.builds(Broken, st.just("trailing"), st.binary(min_size=1, max_size=16)),
    st.builds(
        Broken,
        st.just("nested"),
        st.tuples(st.sampled_from(_NESTING_UNITS), st.integers(1_023, 12_000), st.booleans()),
    ),
    st.builds(
        Broken,
        st.just("huge"),
        st.tuples(st.sampled_from(_HUGE_LENGTHS), st.binary(max_size=8), st.booleans()),
    ),
    st.builds(
        Broken,
        st.just("ext"),
        st.tuples(
            _ext | st.binary(max_size=13).map(_timestamp_ext),
            st.sampled_from([None, "task_id", "deadline_ms", "attempt", "capability"]),
        ),
    ),
    st.builds(
        Broken,
        st.just("bad_utf8"),
        st.tuples(_bad_utf8, st.sampled_from([None, "task_id", "token", "capability"])),
    ),
    st.builds(
        Broken,
        st.just("not_a_map"),
        st.one_of(_not_a_map, st.none(), st.booleans(), st.floats(), _ext),
    ),
    st.builds(Broken, st.just("random"), st.binary(max_size=64)),
    st.builds(Broken, st.just("oversized"), st.integers(1, 4_096)),
)


def _signature_headers(key_id: Field, signature: Field) -> Entries:
    return ((KEY_ID_HEADER.encode(), key_id), (SIGNATURE_HEADER.encode(), signature))


_odd_field = st.one_of(
    st.tuples(st.just("l"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("x"), st.binary(max_size=70)),
    st.tuples(st.just("A"), st.lists(st.tuples(st.just("S"), st.text(max_size=4).map(str.encode)))),
    st.tuples(st.just("F"), st.just(((b"k", ("S", b"v")),))),
    st.tuples(st.just("t"), st.booleans()),
    st.tuples(st.just("V"), st.none()),
    st.tuples(st.just("d"), st.floats(width=32, allow_nan=False, allow_infinity=False)),
    st.tuples(st.just("T"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("S"), st.text(max_size=30).map(str.encode)),
    st.tuples(st.just("S"), st.integers(1_000, 60_000).map(lambda n: b"A" * n)),
)
_bad_signature_value = st.one_of(
    _odd_field,
    st.sampled_from(
        [
            ("S", b"not base64!"),
            ("S", base64.b64encode(bytes(63))),  # 63 bytes
            ("S", base64.b64encode(bytes(64))),  # the right length, not a signature
            ("S", base64.b64encode(bytes(64)).rstrip(b"=")),
        ]
    ),
)
#: signature headers of a task that must not verify (the real key id with a hostile
#: signature, a hostile key id, or both)
_hostile_signature = st.one_of(
    _bad_signature_value.map(lambda sig: _signature_headers(("S", b"<key id>"), sig)),
    _odd_field.map(lambda key_id: _signature_headers(key_id, ("S", b"<signature>"))),
    st.tuples(_odd_field, _bad_signature_value).map(lambda both: _signature_headers(*both)),
    st.just(((KEY_ID_HEADER.encode(), ("S", b"<key id>")),)),  # a key id and no signature
)


def _x_death() -> st.SearchStrategy[Entries]:
    """Dead-letter headers as RabbitMQ writes them, or nearly (hostile types, counts, times)."""
    reasons = st.sampled_from(["expired", "rejected", "maxlen", "delivery_limit", "", "?"])
    death = st.lists(
        st.one_of(
            reasons.map(lambda r: (b"reason", ("S", r.encode()))),
            st.tuples(st.just(b"reason"), _odd_field),
            st.integers(-(2**63), 2**63 - 1).map(lambda n: (b"count", ("l", n))),
            st.integers(0, LAST_DECODABLE_TIMESTAMP).map(lambda t: (b"time", ("T", t))),
            _text.map(lambda q: (b"queue", ("S", q.encode()))),
            st.just((b"original-expiration", ("S", b"60000"))),
        ),
        max_size=6,
    ).map(tuple)
    deaths = st.one_of(
        st.lists(death.map(lambda d: ("F", d)), min_size=1, max_size=3).map(lambda ds: ("A", ds)),
        _odd_field,
    )
    return st.lists(
        st.one_of(
            deaths.map(lambda d: (b"x-death", d)),
            reasons.map(lambda r: (b"x-first-death-reason", ("S", r.encode()))),
            _odd_field.map(lambda v: (ERROR_CODE_HEADER.encode(), v)),
            _odd_field.map(lambda v: (ERROR_MESSAGE_HEADER.encode(), v)),
        ),
        max_size=3,
    ).map(tuple)


@dataclass(frozen=True)
class Kind:
    """One kind of message: how its bodies are made and signed, its properties, how many."""

    bodies: st.SearchStrategy[tuple[Body, Sign, Entries]]
    props: st.SearchStrategy[Props]
    count: int


def _kind(
    body: st.SearchStrategy[Body],
    props: st.SearchStrategy[Props],
    count: int,
    sign: st.SearchStrategy[Sign] = SIGNED,
    signature_headers: st.SearchStrategy[Entries] = NO_HEADERS,
) -> Kind:
    return Kind(st.tuples(body, sign, signature_headers), props, count)


_any_sign = st.sampled_from(list(Sign))
#: the header only a receiver sets, set by the publisher: refused all the same
_marked = st.just(((UNDECODABLE_HEADER.encode(), ("S", b"set by the publisher")),))
_own_or_readable = st.one_of(st.just(Ref.OWN_ID), _shorts())
_reply_or_readable = st.one_of(st.just(Ref.REPLY), _shorts())


def _worker_corpus() -> dict[str, Kind]:
    """What goes to the worker, by kind. Its headers are ``copyable``: the worker copies them
    onto the dead letter whole (the tests at the end cover those it cannot)."""
    readable = _props(message_id=_own_or_readable, reply_to=_reply_or_readable)
    correlatable = _props(message_id=st.just(Ref.OWN_ID), reply_to=st.just(Ref.REPLY))
    anything = _props(
        message_id=_own_or_readable | _not_utf8,
        reply_to=_reply_or_readable | _not_utf8,
        readable=False,
        expiration=True,
    )
    unreadable = _props(
        message_id=_own_or_readable | _not_utf8,
        reply_to=_reply_or_readable | _not_utf8,
        readable=False,
        extra_headers=_unreadable_header.map(lambda h: (h,)) | _marked,
    )
    mutated = _changes(TASK_CHANGES, REQUIRED_TASK_FIELDS)
    return {
        "valid": _kind(_valid_task, readable, 600),
        "mutated": _kind(mutated, correlatable, 1_200),
        "broken": _kind(_broken, anything, 1_000, _any_sign),
        "signature": _kind(_valid_task, correlatable, 600, UNSIGNED, _hostile_signature),
        "properties": _kind(_valid_task, unreadable, 600),
    }


def _reaper_corpus() -> dict[str, Kind]:
    """What goes to the reaper, by kind; its headers need not be copyable (it copies none)."""
    deaths = _x_death()
    bodies = st.one_of(_changes(TASK_CHANGES, REQUIRED_TASK_FIELDS), _broken)
    answered = st.tuples(deaths, st.just((DEAD_LETTERED_BY_HEADER.encode(), ("S", b"wk-1"))))
    readable = _props(
        message_id=_own_or_readable,
        reply_to=_reply_or_readable,
        copyable=False,
        extra_headers=deaths,
    )
    correlatable = _props(
        message_id=st.just(Ref.OWN_ID),
        reply_to=st.just(Ref.REPLY),
        readable=False,
        copyable=False,
        extra_headers=deaths,
    )
    answered_before = _props(
        message_id=st.just(Ref.OWN_ID),
        reply_to=st.just(Ref.REPLY),
        copyable=False,
        extra_headers=answered.map(lambda h: (*h[0], h[1])),
    )
    anything = _props(
        message_id=_shorts(readable=False),
        reply_to=_shorts(readable=False),
        readable=False,
        copyable=False,
        extra_headers=deaths | _unreadable_header.map(lambda h: (h,)) | _marked,
    )
    return {
        "valid": _kind(_valid_task, readable, 500),
        "correlatable": _kind(bodies, correlatable, 1_000, _any_sign),
        "answered": _kind(bodies | _valid_task, answered_before, 500, _any_sign),
        "hostile": _kind(bodies | _valid_task, anything, 1_000, _any_sign),
    }


PENDING_TASKS = 100


def _reply_corpus() -> dict[str, Kind]:
    """What goes to the dispatcher's reply queue, by kind."""
    anything = _props(
        message_id=_shorts(readable=False),
        reply_to=_shorts(readable=False),
        readable=False,
        copyable=False,
        extra_headers=NO_HEADERS | _unreadable_header.map(lambda h: (h,)) | _marked,
    )
    readable = _props(message_id=_own_or_readable, reply_to=_reply_or_readable, copyable=False)
    statuses = st.sampled_from(["SUCCESS", "FAILED", "PENDING"])
    unknown = st.builds(ValidBody, value=_input_values, status=statuses)
    answering = st.builds(
        ValidBody,
        value=_input_values,
        status=statuses,
        pending=st.integers(0, PENDING_TASKS - 1),
        stale_token=st.booleans(),
    )
    untrusted = st.sampled_from([Sign.NONE, Sign.UNKNOWN_KEY, Sign.FORGED])
    return {
        "broken": _kind(_broken, anything, 800, _any_sign),
        "mutated": _kind(_changes(RESULT_CHANGES, REQUIRED_RESULT_FIELDS), readable, 1_000),
        "unknown": _kind(unknown, anything, 500),
        "answering": _kind(answering, readable, 500),
        "untrusted": _kind(unknown | answering, readable, 200, untrusted),
    }


def _generate(strategy: st.SearchStrategy[T], count: int) -> list[T]:
    """``count`` examples of ``strategy``, the same ones every run."""
    examples: list[T] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: T) -> None:
        examples.append(example)

    collect()
    assert len(examples) == count, f"hypothesis generated {len(examples)} of {count}"
    return examples


Corpus = dict[str, list[Recipe]]
#: each generated body goes out with this many generated property sets, each a different one
#: (hypothesis draws a few thousand examples a second on a busy machine, not ten thousand)
PAIRING = 4


def _corpus(kinds: Mapping[str, Kind]) -> Corpus:
    """Each kind's messages: body ``i % n`` with property set ``(i + i // n) % n``."""
    corpus: Corpus = {}
    for name, kind in kinds.items():
        n = -(-kind.count // PAIRING)
        bodies, props = _generate(kind.bodies, n), _generate(kind.props, n)
        corpus[name] = [
            Recipe(*bodies[i % n][:2], props[(i + i // n) % n], bodies[i % n][2])
            for i in range(kind.count)
        ]
    return corpus


WORKER_MESSAGES = 4_000
REAPER_MESSAGES = 3_000
REPLY_MESSAGES = 3_000
assert WORKER_MESSAGES + REAPER_MESSAGES + REPLY_MESSAGES >= 10_000


@pytest.fixture(scope="module")
def corpora() -> dict[str, Corpus]:
    """Every recipe, generated once for the module (it takes seconds, not minutes)."""
    return {
        "worker": _corpus(_worker_corpus()),
        "reaper": _corpus(_reaper_corpus()),
        "reply": _corpus(_reply_corpus()),
    }


# -- building: recipes become bytes -----------------------------------------------------------

SHORT_PROPERTIES = [
    name
    for name in PROPERTIES.__slots__
    if PROPERTIES.amqp_type(name) == "shortstr" and name != "user_id"  # the broker checks it
]


@dataclass
class Builder:
    """Fills recipes in: the message's own id, the reply address, clocks, signatures."""

    target: str
    reply_to: str
    signer: Signer
    stranger: Signer = field(default_factory=Signer.generate)
    results: bool = False  # bodies are results (else tasks)
    pending: Sequence[Mapping[str, str]] = ()  # results: ids and tokens of the waited-for tasks
    header_budget: int = 64 * 1024
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def build(self, recipes: Sequence[Recipe], kind: str) -> list[Sent]:
        return [
            self._one(recipe, f"fz-{self.run}-{self.target}-{kind}-{i}")
            for i, recipe in enumerate(recipes)
        ]

    def _one(self, recipe: Recipe, own_id: str) -> Sent:
        body = self._body(recipe.body, own_id)
        signature = self._signature(recipe.sign, body)
        signature += tuple(self._filled(recipe.signature_headers, body))
        properties, headers = self._properties(recipe.props, own_id, signature)
        keys = {key for key, _ in headers}
        trusted = (
            isinstance(recipe.body, ValidBody)
            and recipe.sign is Sign.GOOD
            and not recipe.signature_headers
            and _decodes(properties)
            and UNDECODABLE_HEADER.encode() not in keys
        )
        props = recipe.props
        return Sent(
            own_id=own_id,
            properties=properties,
            body=body,
            verifiable=trusted,
            correlatable=props.message_id is Ref.OWN_ID and props.reply_to is Ref.REPLY,
            # aio-pika reads an empty short string as no property at all
            succeeds=trusted and props.reply_to in (None, "", Ref.REPLY),
            answered_before=DEAD_LETTERED_BY_HEADER.encode() in keys,
            recipe=recipe,
        )

    # -- bodies

    def _template(self, own_id: str) -> dict[str, Any]:
        now = now_ms()
        if self.results:
            return {
                "task_id": own_id,
                "token": f"tok-{own_id}",
                "node_id": "node",
                "capability": CAPABILITY,
                "status": "SUCCESS",
                "executor_id": "fuzzer",
                "finished_at_ms": now,
            }
        return {
            "task_id": own_id,
            "token": f"tok-{own_id}",
            "node_id": "node",
            "capability": CAPABILITY,
            "input": {"fuzz": True},
            "issued_at_ms": now,
            "deadline_ms": now + 5 * 60_000,
            "audience": "wayang",
            "reply_to": self.reply_to,
            "issuer": "fuzzer",
        }

    def _body(self, body: Body, own_id: str) -> bytes:
        template = self._template(own_id)
        if isinstance(body, ValidBody):
            return self._valid(body, template)
        if isinstance(body, Mutated):
            fields = dict(template)
            for name, value in body.changes:
                if value is DELETE:
                    fields.pop(name, None)
                else:
                    fields[name] = now_ms() + value.offset_ms if isinstance(value, Rel) else value
            return _map(fields)
        return BROKEN[body.kind](template, body.arg)

    def _valid(self, body: ValidBody, fields: dict[str, Any]) -> bytes:
        if not self.results:
            nested = Packed(b"\x91" * body.deep + b"\x01") if body.deep else 1
            return _map(fields | {"input": {"value": body.value, "deep": nested}})
        fields = fields | {"status": body.status, "output": body.value}
        if body.status == "FAILED":
            fields["error"] = {"code": "executor_error", "message": "fuzzed"}
        if body.pending is not None:
            task = self.pending[body.pending]
            fields |= {
                "task_id": task["task_id"],
                "token": task["token"],
                "node_id": task["task_id"],
                # a result for another capability than the task's is fenced (not its answer)
                "capability": task["capability"],
            }
            if body.stale_token:
                fields["token"] = "a-stale-token"
        return _map(fields)

    def _signature(self, sign: Sign, body: bytes) -> Entries:
        if sign is Sign.NONE:
            return ()
        signer = self.stranger if sign is Sign.UNKNOWN_KEY else self.signer
        wire_type = Result.wire_type if self.results else Task.wire_type
        headers = signer.headers(body if sign is not Sign.FORGED else body + b"!", wire_type)
        return _signature_headers(
            ("S", headers[KEY_ID_HEADER].encode()), ("S", headers[SIGNATURE_HEADER].encode())
        )

    # -- properties

    def _properties(self, props: Props, own_id: str, signature: Entries) -> tuple[bytes, Entries]:
        """The property bytes, and the header entries they hold."""
        values: dict[str, bytes] = {}
        for name in SHORT_PROPERTIES:
            self._short(values, name, getattr(props, name), own_id)
        if props.delivery_mode is not None:
            values["delivery_mode"] = bytes([props.delivery_mode])
        if props.priority is not None:
            values["priority"] = bytes([props.priority])
        if props.timestamp is not None:
            values["timestamp"] = struct.pack(">Q", props.timestamp)
        entries = signature + props.headers
        while len(_table(entries)) > self.header_budget:
            entries = entries[:-1]  # what a frame cannot hold is left out
        if entries or props.headers:
            values["headers"] = _table(entries)
        flags, parts = 0, []
        for name in PROPERTIES.__slots__:
            if name in values:
                flags |= PROPERTIES.flags[name]
                parts.append(values[name])
        raw = struct.pack(">H", flags) + b"".join(parts)
        assert len(raw) + 12 <= FRAME_PAYLOAD
        return raw, entries

    def _short(self, values: dict[str, bytes], name: str, value: Short, own_id: str) -> None:
        if value is None:
            return
        if value is Ref.OWN_ID:
            value = own_id
        elif value is Ref.REPLY:
            value = self.reply_to
        values[name] = _shortstr(value.encode() if isinstance(value, str) else value)

    def _filled(self, signature: Entries, body: bytes) -> Iterator[tuple[bytes, Field]]:
        """Hostile signature headers, their placeholders filled in for ``body``."""
        real = dict(self._signature(Sign.GOOD, body))
        for key, (tag, value) in signature:
            if value == b"<key id>":
                yield key, ("S", self.signer.key_id.encode())
            elif value == b"<signature>":
                yield key, real[SIGNATURE_HEADER.encode()]
            else:
                yield key, (tag, value)


def _pack(value: Any) -> bytes:
    if isinstance(value, Packed):
        return value.raw
    if isinstance(value, dict):
        return _map(value)
    if isinstance(value, list):
        return _array_header(len(value)) + b"".join(_pack(item) for item in value)
    packed = msgpack.packb(value, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def _map(fields: Mapping[Any, Any]) -> bytes:
    """A msgpack map whose values may hold :class:`Packed` bytes."""
    count = len(fields)
    head = bytes([0x80 | count]) if count < 16 else b"\xde" + struct.pack(">H", count)
    return head + b"".join(_pack(key) + _pack(value) for key, value in fields.items())


def _array_header(count: int) -> bytes:
    return bytes([0x90 | count]) if count < 16 else b"\xdc" + struct.pack(">H", count)


def _nested_body(fields: dict[str, Any], arg: tuple[bytes, int, bool]) -> bytes:
    unit, depth, inside = arg
    depth = min(depth, (MAX_BODY - 400) // len(unit))
    nested = Packed(unit * depth + b"\xc0")
    return _map(fields | {"input": {"x": nested}}) if inside else nested.raw


def _huge_body(fields: dict[str, Any], arg: tuple[bytes, bytes, bool]) -> bytes:
    prefix, tail, inside = arg
    return _map(fields | {"input": Packed(prefix + tail)}) if inside else prefix + tail


def _in_field(fields: dict[str, Any], where: str | None, value: Any) -> bytes:
    return _pack(value) if where is None else _map(fields | {where: value})


def _bad_key(fields: dict[str, Any], arg: tuple[Packed, str | None]) -> bytes:
    value, where = arg
    if where is None:  # the key itself
        return _map(fields | {value: 1})
    return _map(fields | {where: value})


def _oversized_body(fields: dict[str, Any], extra: int) -> bytes:
    padding = MAX_BODY + extra - len(_map(fields))
    return _map(fields | {"input": {"pad": "p" * padding}})


BROKEN: dict[str, Callable[[dict[str, Any], Any], bytes]] = {
    "truncated": lambda fields, cut: (full := _map(fields))[: int(len(full) * cut)],
    "trailing": lambda fields, extra: _map(fields) + extra,
    "nested": _nested_body,
    "huge": _huge_body,
    "ext": lambda fields, arg: _in_field(fields, arg[1], arg[0]),
    "bad_utf8": _bad_key,
    "not_a_map": lambda fields, value: _pack(value),
    "random": lambda fields, raw: raw,
    "oversized": _oversized_body,
}


# -- watching: results on the wire, queue depths, log events --------------------------------


@dataclass
class Tap:
    """Every result published on ``wayang.results`` while it runs, by task id."""

    results: dict[str, list[Result]] = field(default_factory=lambda: defaultdict(list))
    routes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unreadable: list[bytes] = field(default_factory=list)

    def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            result = decode(message.body, Result)
        except Exception:  # kept, and reported: the fabric sent a bad result
            self.unreadable.append(message.body)
            return
        self.results[result.task_id].append(result)
        self.routes[result.task_id].append(message.routing_key or "")

    def count(self) -> int:
        return sum(len(results) for results in self.results.values())

    def succeeded(self, task_ids: set[str]) -> int:
        """How many of ``task_ids`` were answered SUCCESS."""
        return sum(
            any(r.status is Status.SUCCESS for r in self.results.get(task_id, ()))
            for task_id in task_ids
        )


@asynccontextmanager
async def _tap(amqp_url: str) -> AsyncIterator[Tap]:
    frames.install()  # a consumer of our own must survive what it sees too
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1_000)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(RESULTS_EXCHANGE, "#")
        tap = Tap()

        async def consume(message: AbstractIncomingMessage) -> None:
            tap.on_message(message)

        await queue.consume(consume, no_ack=True)
        yield tap


async def _depth(channel: AbstractChannel, name: str) -> int:
    """Ready messages in ``name`` (a passive declare)."""
    queue = await channel.declare_queue(name, passive=True)
    count = queue.declaration_result.message_count
    assert count is not None
    return count


async def _bodies(channel: AbstractChannel, name: str, count: int) -> Counter[bytes]:
    """The bodies of the next ``count`` messages of ``name``, consumed."""
    bodies: Counter[bytes] = Counter()
    queue = await channel.declare_queue(name, passive=True)
    done = asyncio.Event()

    async def take(message: AbstractIncomingMessage) -> None:
        bodies[message.body] += 1
        if bodies.total() >= count:
            done.set()

    tag = await queue.consume(take, no_ack=True)
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await queue.cancel(tag)
    return bodies


class Events(logging.Handler):
    """Counts the fabric's structured log events by name (``event=NAME ...``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("event="):
            self.counts[message[6:].split(" ", 1)[0]] += 1

    def of(self, *names: str) -> int:
        return sum(self.counts[name] for name in names)


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Iterator[Events]:
    caplog.set_level(logging.INFO, logger="wayang_mq")
    counter = Events()
    logger = logging.getLogger("wayang_mq")
    logger.addHandler(counter)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)


def _assert_never_reconnected(events: Events) -> None:
    assert events.of("broker.disconnected", "broker.reconnected") == 0, events.counts


def _sent(builder: Builder, corpus: Corpus) -> list[Sent]:
    return [sent for kind, recipes in corpus.items() for sent in builder.build(recipes, kind)]


def _reply_key() -> str:
    return f"reply.fuzz-{uuid.uuid4().hex[:8]}"


# -- the worker -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_4000_hostile_tasks_leave_the_worker_serving_each_answered_or_dead_lettered(
    fabric: Fabric, events: Events, corpora: dict[str, Corpus]
) -> None:
    """4,000 tasks at a worker (the reaper behind it answers what the broker dead-letters):
    each of the 600 valid signed ones gets exactly one terminal result, SUCCESS with its
    input unless its AMQP reply_to contradicts the signed one; every other task is never
    run, waits in the dead queue with its body intact, and is answered FAILED, once, when
    it can be correlated."""
    url = fabric.endpoint.amqp_url
    builder = Builder("w", _reply_key(), fabric.signer)
    await fabric.purge(CAPABILITY)
    await fabric.purge_reaper()
    async with (
        _tap(url) as tap,
        await aio_pika.connect(url) as connection,
        fabric.reaper(max_body_bytes=MAX_BODY) as reaper,
        fabric.worker(
            [Echo()], executor_id="fuzz-worker", concurrency=32, max_body_bytes=MAX_BODY
        ) as worker,
        fabric.dispatcher() as dispatcher,
    ):
        channel = await connection.channel()
        # Given 4,000 generated tasks
        sent = _sent(builder, corpora["worker"])
        assert len(sent) == WORKER_MESSAGES
        dead = Counter(message.body for message in sent if not message.succeeds)
        # When they are published to the worker's queue
        await _publish_all(url, TASKS_EXCHANGE, CAPABILITY, sent)
        # Then every task either ran or waits in the dead queue
        own_ids = {message.own_id for message in sent}

        async def settled() -> bool:
            depth = await _depth(channel, dead_queue(CAPABILITY))
            return depth + tap.succeeded(own_ids) >= len(sent)

        await eventually(settled, timeout_s=150, what="every task run or dead-lettered")
        # and the same worker runs the next task
        good = await dispatcher.run(CAPABILITY, {"after": "fuzz"}, wait_s=60)
        assert good.status is Status.SUCCESS and good.output == {"after": "fuzz"}
        # and every verifiable task gets its answer (the rest are answered to nobody:
        # docs/security.md §6)
        expected = [m for m in sent if m.verifiable]
        await eventually(
            lambda: all(m.own_id in tap.results for m in expected),
            timeout_s=60,
            what="an answer to every verifiable task",
        )
        await asyncio.sleep(1.0)  # a second answer to anything would be here by now
        # and nothing is left behind: the task queue is empty, the dead queue holds exactly
        # the bodies of the tasks that did not run
        assert await _depth(channel, task_queue(CAPABILITY)) == 0
        assert await _depth(channel, dead_queue(CAPABILITY)) == dead.total()
        assert await _bodies(channel, dead_queue(CAPABILITY), dead.total()) == dead
        assert worker.health().ok and reaper.health().ok
    _check_worker_answers(sent, tap, builder.reply_to)
    assert not tap.unreadable
    assert events.of("worker.bug") == 0
    assert events.of("task.dead_lettered", "security.refused") <= dead.total()
    _assert_never_reconnected(events)


def _check_worker_answers(sent: Sequence[Sent], tap: Tap, reply_to: str) -> None:
    """Each verifiable task: one terminal result at its reply address, SUCCESS with its input
    when it ran, else FAILED with a refusal's code; nothing else ever answered (a sender who
    could not be verified does not choose where a signed FAILED goes)."""
    for message in sent:
        answers = tap.results.get(message.own_id, [])
        if message.verifiable:
            assert len(answers) == 1, (message, answers)
            assert tap.routes[message.own_id] == [reply_to], message
        else:
            assert answers == [], (message, answers)
        for answer in answers:
            if message.succeeds:
                assert answer.status is Status.SUCCESS, answer
                assert msgpack.packb(answer.output) == _echo_of(message.body), answer
            else:
                assert answer.status is Status.FAILED, (message, answer)
                assert answer.error is not None and answer.error.code in REFUSAL_CODES, answer
    ran = {
        task_id
        for task_id, answers in tap.results.items()
        if any(answer.status is Status.SUCCESS for answer in answers)
    }
    assert ran & {m.own_id for m in sent} == {m.own_id for m in sent if m.succeeds}


def _echo_of(body: bytes) -> bytes:
    """What Echo answers a valid task with: its input, as msgpack."""
    task = msgpack.unpackb(body, raw=False, strict_map_key=False)
    packed = msgpack.packb(task["input"])
    assert isinstance(packed, bytes)
    return packed


# -- the reaper -------------------------------------------------------------------------------

#: what the reaper logs for each dead letter it consumes (the last: one it refused)
REAPER_EVENTS = (
    "dead_letter.answered",
    "dead_letter.skipped",
    "dead_letter.unanswerable",
    "security.refused",
)


@pytest.mark.slow
async def test_3000_hostile_dead_letters_leave_the_reaper_serving_each_answered_or_skipped(
    fabric: Fabric, events: Events, corpora: dict[str, Corpus]
) -> None:
    """3,000 dead letters at the reaper: each verifiable one is answered FAILED exactly once,
    none other is answered; none a worker says it answered is answered again; every one is
    accounted for in the reaper's log and kept in the dead queue with its body intact."""
    url = fabric.endpoint.amqp_url
    reply_to = _reply_key()
    builder = Builder("r", reply_to, fabric.signer, header_budget=120 * 1024)
    await fabric.purge(CAPABILITY)
    await fabric.purge_reaper()
    async with (
        _tap(url) as tap,
        await aio_pika.connect(url) as connection,
        fabric.reaper(max_body_bytes=MAX_BODY) as reaper,
    ):
        channel = await connection.channel()
        # Given 3,000 generated dead letters
        sent = _sent(builder, corpora["reaper"])
        assert len(sent) == REAPER_MESSAGES
        # When they are published to wayang.dlx
        await _publish_all(url, DEAD_LETTER_EXCHANGE, CAPABILITY, sent)
        # Then the reaper gets through every one
        await eventually(
            lambda: events.of(*REAPER_EVENTS) >= len(sent),
            timeout_s=150,
            what="every dead letter handled",
        )
        # and still answers a fresh one
        fresh = Builder("r", reply_to, fabric.signer).build(
            [Recipe(ValidBody(), Sign.GOOD, Props())], "fresh"
        )
        await _publish_all(url, DEAD_LETTER_EXCHANGE, CAPABILITY, fresh)
        await eventually(lambda: fresh[0].own_id in tap.results, what="the fresh one answered")
        await asyncio.sleep(1.0)  # a second answer to anything would be here by now
        # and nothing is left behind
        assert await _depth(channel, "wayang.reaper") == 0
        dead = Counter(message.body for message in [*sent, *fresh])
        assert await _depth(channel, dead_queue(CAPABILITY)) == dead.total()
        assert await _bodies(channel, dead_queue(CAPABILITY), dead.total()) == dead
        assert reaper.health().ok
    assert events.of(*REAPER_EVENTS) == len(sent) + 1
    assert tap.count() == events.of("dead_letter.answered") and not tap.unreadable
    for message in sent:
        answers = tap.results.get(message.own_id, [])
        if message.answered_before:
            assert answers == [], message
        elif message.verifiable:
            assert len(answers) == 1, (message, answers)
            assert tap.routes[message.own_id] == [reply_to], message
        else:
            assert answers == [], (message, answers)
        for answer in answers:
            assert answer.status is Status.FAILED and answer.error is not None, answer
    _assert_never_reconnected(events)


# -- the dispatcher's reply queue ------------------------------------------------------------


@pytest.mark.slow
async def test_3000_hostile_results_leave_the_dispatcher_serving_each_consumed_with_a_verdict(
    fabric: Fabric, events: Events, corpora: dict[str, Corpus]
) -> None:
    """3,000 results at a dispatcher's reply queue (it trusts the fabric's key): each is
    consumed with exactly the verdict it calls for, the queue ends empty, each task it waits
    for is handed the first trusted terminal result with its token, and real results still
    reach it."""
    url = fabric.endpoint.amqp_url
    await fabric.purge("demo.sleep", CAPABILITY)
    seen: list[ResultSeen] = []
    try:
        async with (
            await aio_pika.connect(url) as connection,
            fabric.dispatcher(results_keyring=fabric.keyring) as dispatcher,
        ):
            channel = await connection.channel()
            dispatcher.observe(seen.append)
            # Given tasks it waits for (nobody serves demo.sleep here: they stay queued)
            handles = [
                await dispatcher.submit("demo.sleep", {"i": i}, queue_timeout_s=600)
                for i in range(PENDING_TASKS)
            ]
            pending = [
                {"task_id": h.task_id, "token": h.task.token, "capability": h.task.capability}
                for h in handles
            ]
            builder = Builder(
                "d",
                dispatcher.reply_to,
                fabric.signer,
                results=True,
                pending=pending,
                header_budget=120 * 1024,
            )
            sent = _sent(builder, corpora["reply"])
            assert len(sent) == REPLY_MESSAGES
            # When 3,000 generated results reach its reply queue
            await _publish_all(url, RESULTS_EXCHANGE, dispatcher.reply_to, sent)
            # Then each is consumed with one verdict, and the reply queue ends empty
            await eventually(
                lambda: len(seen) >= len(sent), timeout_s=120, what="a verdict on every result"
            )
            assert await _depth(channel, reply_queue(dispatcher.dispatcher_id)) == 0
            assert len(seen) == len(sent)
            # and the verdicts are the ones each result calls for
            _check_verdicts(sent, Counter(s.verdict for s in seen))
            # and each waiting task that got a trusted answer for its token was handed it
            for handle in handles:
                if handle.done():
                    result = await handle.result(1)
                    assert result.token == handle.task.token and result.terminal
            # and real results still reach it
            async with fabric.worker([Echo()], executor_id="fuzz-replies"):
                good = await dispatcher.run(CAPABILITY, {"after": "fuzz"}, wait_s=60)
            assert good.status is Status.SUCCESS and good.output == {"after": "fuzz"}
    finally:
        await fabric.purge("demo.sleep", CAPABILITY)
    _assert_never_reconnected(events)


def _check_verdicts(sent: Sequence[Sent], verdicts: Counter[Verdict]) -> None:
    """Untrusted or unreadable: INVALID; PENDING: not terminal; an unknown task id:
    unclaimed; a waited-for task's first trusted terminal result with its token: handed
    out; the rest fenced (a stale token) or duplicates (order decides which)."""
    expected: Counter[Verdict] = Counter()
    answered: set[int] = set()
    later = 0
    for message in sent:
        body = message.recipe.body
        if not message.verifiable:
            expected[Verdict.INVALID] += 1
            continue
        assert isinstance(body, ValidBody)
        if body.status == "PENDING":
            expected[Verdict.NOT_TERMINAL] += 1
        elif body.pending is None:
            expected[Verdict.UNCLAIMED] += 1
        elif body.stale_token or body.pending in answered:
            later += 1
        else:
            answered.add(body.pending)
            expected[Verdict.HANDED_OUT] += 1
    got = Counter(verdicts)
    assert got[Verdict.FENCED] + got[Verdict.DUPLICATE] == later, got
    del got[Verdict.FENCED], got[Verdict.DUPLICATE]
    assert +got == +expected


# -- what the fuzzing found, each fixed and kept as a test -------------------------------------
#
# Each reproduces one finding with its minimal message. The corpus above leaves these inputs
# out at the consumer they break: headers pamqp cannot write again and header tables that
# fill a frame (at the worker, which copies headers onto its dead letters), ext types in the
# valid tasks' inputs.


def _one(
    reply_to: str, signer: Signer, props: Props, body: Body = Broken("random", b"\xc1")
) -> Sent:
    """One message of ``body`` (by default a byte that is not msgpack), unsigned."""
    builder = Builder("bug", reply_to, signer, header_budget=FRAME_PAYLOAD)
    return builder.build([Recipe(body, Sign.NONE, props)], "minimal")[0]


#: header values pamqp decodes but cannot encode again
UNWRITABLE_HEADERS: dict[str, Field] = {
    "a longstr that is not UTF-8": ("S", b"\xff\xfe"),  # decoded as bytes: "Unknown type"
    "a double beyond float32": ("d", 1e300),  # written back as a float32: OverflowError
}


@pytest.mark.parametrize("case", list(UNWRITABLE_HEADERS))
async def test_a_refused_task_whose_headers_pamqp_cannot_write_again_is_dead_lettered_at_once(
    fabric: Fabric, events: Events, case: str
) -> None:
    url, reply_to = fabric.endpoint.amqp_url, _reply_key()
    task = _one(reply_to, fabric.signer, Props(headers=((b"h", UNWRITABLE_HEADERS[case]),)))
    await fabric.purge(CAPABILITY)
    await fabric.purge_reaper()
    try:
        async with (
            _tap(url) as tap,
            fabric.reaper(),
            fabric.worker([Echo()], executor_id="fuzz-unwritable", concurrency=1),
        ):
            # When an unsigned task carries a header pamqp reads but cannot write
            await _publish_all(url, TASKS_EXCHANGE, CAPABILITY, [task])
            await eventually(lambda: events.of("security.refused") >= 1, what="its refusal")
            await asyncio.sleep(0.5)  # an answer, were there one, would be here by now
        # Then it is refused at once, as any unsigned task: dead-lettered, answered to nobody
        assert task.own_id not in tap.results
        assert events.of("worker.bug") == 0
    finally:
        await fabric.purge(CAPABILITY)
        await fabric.purge_reaper()


async def test_a_task_whose_headers_nearly_fill_a_frame_leaves_the_worker_connected(
    fabric: Fabric, events: Events
) -> None:
    url, reply_to = fabric.endpoint.amqp_url, _reply_key()
    # 130,900 bytes of header: the broker takes it (its frames hold 131,064), not with more
    task = _one(reply_to, fabric.signer, Props(headers=((b"h", ("S", b"v" * 130_900)),)))
    await fabric.purge(CAPABILITY)
    try:
        async with (
            _tap(url) as tap,
            fabric.worker([Echo()], executor_id="fuzz-frame", concurrency=1, grace_s=1.0),
        ):
            # When an unsigned task carries a header table that nearly fills a frame
            await _publish_all(url, TASKS_EXCHANGE, CAPABILITY, [task])
            await eventually(
                lambda: events.of("security.refused") > 0 or events.of("broker.disconnected") > 0,
                what="its refusal, or a lost connection",
            )
            # Then the worker keeps its connection, and refuses it as any unsigned task
            # (dead-lettered, answered to nobody)
            assert events.of("broker.disconnected") == 0
            assert task.own_id not in tap.results
    finally:
        await fabric.purge(CAPABILITY)
        await fabric.purge_reaper()


def test_an_ext_type_in_a_tasks_input_is_refused_not_altered() -> None:
    signer = Signer.generate()
    # Given a signed, valid task whose input holds an ext type (no model could carry it back
    # unchanged: pydantic would dump it as a two-item array)
    body = _one("reply.x", signer, Props(), ValidBody(value=msgpack.ExtType(5, b"abc"))).body
    # Then it is refused as bad input, naming the ext type
    with pytest.raises(WireError, match="ext type 5"):
        open_task(body, signer.headers(body), KeyRing.of([signer.public_key]))


@pytest.mark.parametrize("message_id", ["x" * 129, "a\x00b"])
async def test_a_dead_letter_whose_message_id_cannot_be_a_task_id_is_not_logged_as_a_bug(
    fabric: Fabric, caplog: pytest.LogCaptureFixture, events: Events, message_id: str
) -> None:
    url = fabric.endpoint.amqp_url
    letter = _one(_reply_key(), fabric.signer, Props(message_id=message_id))
    await fabric.purge(CAPABILITY)
    await fabric.purge_reaper()
    try:
        async with fabric.reaper():
            # When a dead letter arrives whose message id is too long, or holds a NUL
            await _publish_all(url, DEAD_LETTER_EXCHANGE, CAPABILITY, [letter])
            await eventually(lambda: events.of(*REAPER_EVENTS) >= 1, what="it handled")
        # Then it is set aside as hostile input, not as a bug of the reaper's
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage()[:200] for r in errors]
    finally:
        await fabric.purge(CAPABILITY)
        await fabric.purge_reaper()
