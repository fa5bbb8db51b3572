"""The wire codec: msgpack bodies, their AMQP properties and headers, and the checks a
receiver runs in order (properties, size, signature, msgpack, schema, deadline) before trusting
a task.

Kept free of any AMQP client so that the same code serves aio-pika, pika and the docs' vector.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
from pydantic import ValidationError

from wayang_mq.core.errors import InvalidMessage, OversizedMessage
from wayang_mq.core.model import Task, WireModel, now_ms
from wayang_mq.core.signing import KeyRing, Signer, Verified
from wayang_mq.version import __version__

CONTENT_TYPE = "application/msgpack"
#: every message the fabric publishes says what published it (the console shows it)
APP_ID = f"wayang-mq/{__version__}"
PARTITION_KEY_HEADER = "x-partition-key"  # what sharded capabilities hash on
# On dead letters wayang-mq publishes itself (the broker's own carry x-death instead):
ERROR_CODE_HEADER = "wayang-error-code"
ERROR_MESSAGE_HEADER = "wayang-error-message"
DEAD_LETTERED_BY_HEADER = "wayang-dead-lettered-by"  # present: a result was already sent
# On a dead-letter copy whose delivery's headers could not be copied whole: why not.
HEADERS_DROPPED_HEADER = "wayang-headers-dropped"
# Set on receipt, never by a publisher: the AMQP properties the client could not decode, and
# why (see wayang_mq.amqp.frames); kept on the dead-letter copy of such a message.
UNDECODABLE_HEADER = "wayang-undecodable"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

M = TypeVar("M", bound=WireModel)


def encode(model: WireModel) -> bytes:
    """The msgpack body: a map in field order, strings as str, binary as bin.

    Fields still at their default are left out (readers fill them back in), which keeps a
    small task around 200 bytes.
    """
    fields = model.model_dump(mode="python", exclude_defaults=True)
    stamped = _timestamps(type(model))
    if any(name not in fields for name in stamped):
        # exclude_defaults compares a field with a default factory to a fresh call of it: a
        # timestamp (``now_ms``) encoded within the millisecond it was taken would be left
        # out, and the reader would fill in its own clock. Timestamps are always written.
        fields = {
            name: fields[name] if name in fields else getattr(model, name)
            for name in type(model).model_fields
            if name in fields or name in stamped
        }
    packed = msgpack.packb(fields, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


@functools.cache
def _timestamps(model: type[WireModel]) -> frozenset[str]:
    """The model's fields that default to the time they were made."""
    return frozenset(
        name for name, info in model.model_fields.items() if info.default_factory is now_ms
    )


def decode(body: bytes, model: type[M]) -> M:
    """Parse and validate a body as ``model``; raises InvalidMessage carrying the body."""
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidMessage(f"body is not valid msgpack: {exc}", body=body) from exc
    if not isinstance(raw, dict):
        raise InvalidMessage(f"body is a msgpack {type(raw).__name__}, expected a map", body=body)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InvalidMessage(
            f"body does not match {model.wire_type}: {_summarise(exc)}", body=body
        ) from exc


def _no_ext(code: int, data: bytes) -> Any:
    """msgpack ext types (timestamps included) are not part of the wire: no model could carry
    one back unchanged, so a body holding one is refused, not altered."""
    raise ValueError(f"msgpack ext type {code} is not part of the wire format")


def _summarise(exc: ValidationError) -> str:
    """pydantic's errors as one line: 'field: problem; field: problem'."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class WireMessage:
    """A body with the AMQP properties that travel with it, independent of any client."""

    body: bytes
    type: str
    message_id: str
    correlation_id: str
    timestamp_s: int
    reply_to: str | None = None
    expiration_ms: int | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    content_type: str = CONTENT_TYPE
    delivery_mode: int = 2  # persistent: survives a broker restart
    app_id: str = APP_ID

    def amqp_properties(self) -> dict[str, Any]:
        """Properties as keyword arguments for ``aio_pika.Message``."""
        props: dict[str, Any] = {
            "content_type": self.content_type,
            "type": self.type,
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "timestamp": self.timestamp_s,
            "delivery_mode": self.delivery_mode,
            "app_id": self.app_id,
            "headers": dict(self.headers),
        }
        if self.reply_to is not None:
            props["reply_to"] = self.reply_to
        if self.expiration_ms is not None:
            # AMQP carries expiration as a string of milliseconds; aio-pika takes seconds.
            props["expiration"] = self.expiration_ms / 1000
        return props


def signed_message(
    model: WireModel,
    signer: Signer,
    *,
    message_id: str,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    expiration_ms: int | None = None,
    extra_headers: Mapping[str, Any] | None = None,
) -> WireMessage:
    """Encode ``model``, sign the exact bytes, and attach the standard properties."""
    body = encode(model)
    headers: dict[str, Any] = dict(extra_headers or {})
    headers.update(signer.headers(body, model.wire_type))
    return WireMessage(
        body=body,
        type=model.wire_type,
        message_id=message_id,
        correlation_id=correlation_id or message_id,
        timestamp_s=now_ms() // 1000,
        reply_to=reply_to,
        expiration_ms=expiration_ms,
        headers=headers,
    )


def task_message(task: Task, signer: Signer, *, expire: bool = True) -> WireMessage:
    """A task as the dispatcher publishes it: expiration = time left until its deadline.

    Retries pass ``expire=False``: they wait in a retry tier whose queue TTL is the delay, and
    the worker's deadline check still refuses them if they arrive too late.
    """
    headers = {PARTITION_KEY_HEADER: task.partition_key or task.task_id}
    return signed_message(
        task,
        signer,
        message_id=task.task_id,
        reply_to=task.reply_to or None,
        expiration_ms=max(1, task.deadline_ms - now_ms()) if expire else None,
        extra_headers=headers,
    )


def check_properties(headers: Mapping[str, Any], body: bytes = b"") -> None:
    """Refuse a message whose AMQP properties could not be decoded (InvalidMessage).

    The client delivers such a message with those properties left out and the reason in the
    ``wayang-undecodable`` header (:mod:`wayang_mq.amqp.frames`): what is left of it may be
    read for correlation, never trusted.
    """
    reason = headers.get(UNDECODABLE_HEADER)
    if reason is not None:
        raise InvalidMessage(f"its AMQP properties could not be decoded: {reason}", body=body)


def open_unverified(body: bytes, headers: Mapping[str, Any], model: type[M]) -> M:
    """Properties, then msgpack and schema, for a receiver that checks no signature."""
    check_properties(headers, body)
    return decode(body, model)


def open_signed(
    body: bytes,
    headers: Mapping[str, Any],
    keyring: KeyRing,
    model: type[M],
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> tuple[M, Verified]:
    """Properties, size, then the signature (made for ``model``'s type), then msgpack and
    schema: nothing is parsed before it is trusted. Returns the message and who signed it;
    what that signer may say is the caller's to check (see :mod:`wayang_mq.core.scopes`)."""
    check_properties(headers, body)
    if len(body) > max_body_bytes:
        raise OversizedMessage(
            f"body is {len(body)} bytes, the limit is {max_body_bytes}",
            body=body,
            hint="pass large inputs by reference (a URL or object key), not inline",
        )
    signer = keyring.verify(body, headers, model.wire_type)
    return decode(body, model), signer


def open_verified(
    body: bytes,
    headers: Mapping[str, Any],
    keyring: KeyRing,
    model: type[M],
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> M:
    """:func:`open_signed` for a receiver that needs only the message."""
    return open_signed(body, headers, keyring, model, max_body_bytes=max_body_bytes)[0]
