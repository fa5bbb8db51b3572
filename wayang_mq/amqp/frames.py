"""A narrow shim over pamqp: one message whose properties pamqp cannot decode must not close
the connection that carries every other message.

Why. pamqp 4.0.1, the frame codec under aiormq 7 and aio-pika 10, decodes a content header's
properties strictly, and RabbitMQ does not check what pamqp chokes on (3.10.8 refuses unknown
field-table types, bad table lengths and delivery modes other than 1 and 2, but not these):

- a ``timestamp``, as a property or as a ``T`` value in ``headers``, past the year 9999: pamqp
  reads values above 2**32 as milliseconds, then ``datetime.fromtimestamp`` raises ValueError
  (2**64 - 1 gives "year 584556019 is out of range");
- a short string that is not UTF-8 (``message_id``, ``type``, ``reply_to``, ``content_type``...,
  or a key in ``headers``): UnicodeDecodeError;
- ``headers`` nested deeper than Python's recursion limit: RecursionError.

aiormq turns the first two into ``InvalidFrameError`` and lets the third through as it is; either
way its reader stops and the whole connection closes (mosquito/aiormq#186, open; aiormq 7.2.4
documents decode errors as connection errors). The delivery goes back to its queue, comes again
after the reconnect, and closes the connection again, until the queue's delivery limit, or
forever on a queue without one. A ``basic.deliver`` or ``basic.get-ok`` whose routing key (or
exchange name) is not UTF-8 does the same.

What it changes, and only after pamqp's own decoding has raised (messages pamqp decodes are
untouched): :func:`install` wraps ``unmarshal`` of ``pamqp.commands.Basic.Properties``,
``Basic.Deliver`` and ``Basic.GetOk``, once per process (``wayang_mq.amqp.connect.connect``
calls it; nothing happens at import).

- Properties: decoded again one at a time; one that fails is stepped over by its length
  (every AMQP property has a fixed width or a length prefix) and left unset (``headers``: an
  empty table), and the header ``wayang-undecodable`` names each with pamqp's reason. The
  message reaches its consumer, which refuses it as bad input
  (:func:`wayang_mq.core.wire.check_properties`): a task is dead-lettered with the reason, a
  result or a control message is discarded with a logged reason.
- Deliver / GetOk: a short string that is not UTF-8 is decoded with U+FFFD for the bad bytes,
  and logged (``event=amqp.undecodable``). Nothing can mark the message itself (its properties
  come in the next frame, and aio-pika keeps no link to this one); wayang-mq's consumers read
  no meaning from a routing key except the reaper, which answers by it.

Versions: pyproject pins ``pamqp>=4.0.1,<5``. The shim relies on what pamqp 3 and 4 share
(``Basic.Properties.unmarshal(flags, data)`` walking ``__slots__`` with ``decode.by_type``);
4.0.1 is the version it was tested with, and the first that stops on a malformed field table
or flag word instead of looping forever (gmr/pamqp#63, #64): a hang no wrapper can catch.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping
from typing import Any

from pamqp import base, commands, common, decode, encode

from wayang_mq.core import logs
from wayang_mq.core.wire import UNDECODABLE_HEADER

log = logging.getLogger("wayang_mq.amqp.frames")

#: what one undecodable-properties header may say, at most (it is copied onto dead letters)
MAX_REASON_CHARS = 500
#: bytes of a fixed-width property type; strings and tables carry their own length
_WIDTHS = {"octet": 1, "short": 2, "long": 4, "longlong": 8, "timestamp": 8}
_LENIENT_FRAMES: tuple[type[base.Frame], ...] = (commands.Basic.Deliver, commands.Basic.GetOk)
#: set on ``Basic.Properties`` once :func:`install` has run
INSTALLED_ATTR = "_wayang_lenient"


def install() -> None:
    """Wrap pamqp's decoding of properties and of deliveries, once per process."""
    properties = commands.Basic.Properties
    if getattr(properties, INSTALLED_ATTR, False):
        return
    strict_properties = properties.unmarshal

    def unmarshal_properties(self: commands.Basic.Properties, flags: int, data: bytes) -> None:
        try:
            strict_properties(self, flags, data)
        except Exception:  # anything pamqp raises on bytes from the network
            _decode_leniently(self, flags, data)

    # Set on these classes only: pamqp's base classes, and every other frame, stay as they are.
    setattr(properties, "unmarshal", unmarshal_properties)  # noqa: B010
    for frame_class in _LENIENT_FRAMES:
        setattr(frame_class, "unmarshal", _lenient_frame(frame_class.unmarshal))  # noqa: B010
    setattr(properties, INSTALLED_ATTR, True)


def _decode_leniently(properties: commands.Basic.Properties, flags: int, data: bytes) -> None:
    """Decode ``data`` one property at a time; those that fail are left unset and named, with
    pamqp's reason, in the ``wayang-undecodable`` header."""
    fresh = type(properties)()
    for name in properties.__slots__:
        setattr(properties, name, getattr(fresh, name))
    reasons: list[str] = []
    for name in properties.__slots__:
        if not flags & properties.flags[name]:
            continue
        data_type = properties.amqp_type(name)
        try:
            consumed, value = decode.by_type(data, data_type)
        except Exception as exc:  # RecursionError included: a table nested too deep
            reasons.append(f"{name}: {exc}")
            consumed, value = _extent(data, data_type), None
            if consumed > len(data):
                reasons.append("the properties after it are cut short")
                break
        setattr(properties, name, value)
        data = data[consumed:]
    headers = dict(properties.headers or {})
    headers[UNDECODABLE_HEADER] = "; ".join(reasons or ["pamqp could not decode them"])[
        :MAX_REASON_CHARS
    ]
    properties.headers = headers


def _extent(data: bytes, data_type: str) -> int:
    """How many bytes a property of ``data_type`` takes at the start of ``data``."""
    if data_type == "shortstr":
        return 1 + data[0] if data else 1
    if data_type in ("longstr", "table", "array"):
        return 4 + int(struct.unpack_from(">I", data)[0]) if len(data) >= 4 else 4
    return _WIDTHS[data_type]


def _lenient_frame(
    strict: Callable[[base.Frame, bytes], None],
) -> Callable[[base.Frame, bytes], None]:
    """``strict``, and when a short string in the frame is not UTF-8, the frame decoded with
    U+FFFD in place of the bad bytes."""

    def unmarshal(self: base.Frame, data: bytes) -> None:
        try:
            strict(self, data)
        except UnicodeDecodeError as exc:
            _decode_replacing(self, data)
            logs.event(
                log,
                "amqp.undecodable",
                logging.WARNING,
                frame=self.name,
                delivery_tag=getattr(self, "delivery_tag", None),
                exchange=getattr(self, "exchange", None),
                routing_key=getattr(self, "routing_key", None),
                reason=exc,
                next="delivered with U+FFFD for the bytes that are not UTF-8",
            )

    return unmarshal


def _decode_replacing(frame: base.Frame, data: bytes) -> None:
    """pamqp's ``Frame.unmarshal``, with short strings decoded leniently.

    The frames this serves (Basic.Deliver, Basic.GetOk) have one bit field each, so the bit
    packing of consecutive ``bit`` fields that pamqp handles is not needed here.
    """
    value: common.FieldValue
    for name in frame.__slots__:
        data_type = frame.amqp_type(name)
        if data_type == "shortstr":
            length = data[0]
            consumed, value = 1 + length, data[1 : 1 + length].decode("utf-8", "replace")
        elif data_type == "bit":
            consumed, value = 1, decode.bit(data, 0)[1]
        else:
            consumed, value = decode.by_type(data, data_type)
        setattr(frame, name, value)
        data = data[consumed:]


#: the most a dead-letter copy's headers may take, encoded: well inside one AMQP frame (the
#: broker's frame_max is 131,072 bytes by default, and the content header must fit in one)
COPY_HEADER_BYTES = 64 * 1024


def writable_headers(
    headers: Mapping[str, Any], keep: tuple[str, ...], budget: int = COPY_HEADER_BYTES
) -> tuple[dict[str, Any], str | None]:
    """``headers`` as they can be published again, and why some were dropped (None: none).

    pamqp decodes some values it cannot encode (a longstr that is not UTF-8 comes back as
    bytes; a double beyond float32's range is written as float32), and a header table that
    nearly filled its frame overflows it once error headers are added: the broker then closes
    the connection. Such a table is replaced by the ``keep`` headers that are plain strings.
    """
    try:
        size = len(encode.field_table(dict(headers)))
    except Exception as exc:  # whatever pamqp raises on values it decoded but cannot write
        reason = f"headers that cannot be written again ({type(exc).__name__}: {exc})"
    else:
        if size <= budget:
            return dict(headers), None
        reason = f"{size} bytes of headers (a copy keeps at most {budget})"
    kept = {key: value for key in keep if isinstance(value := headers.get(key), str)}
    return kept, reason[:MAX_REASON_CHARS]
