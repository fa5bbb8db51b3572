"""What a dead letter says about itself in its headers, so that the RabbitMQ console (which
shows a msgpack body only as base64) tells the story: which capability, which attempt, why,
when, and a short, redacted preview of the input.

Pure functions over header tables: the worker adds these to the dead-letter copies it
publishes (:meth:`wayang_mq.runtime.decide.Decider.dead_copy`), ``wayang-mq dead show`` reads
them back. Header values are plain strings and integers (the console prints them as they are).

A copy a worker publishes keeps the delivery's headers, and with them the ``x-death`` of an
earlier retry hop (``expired`` from ``wayang.retry.1s``): RabbitMQ adds an ``x-death`` entry
only when *it* dead-letters a message (a rejection, an expiry, a delivery limit), never when
a client republishes one, so a copy's ``x-death`` never states the copy's own reason. The copy
moves that history into :data:`RETRY_HISTORY_HEADER` (text) and drops the broker's ``x-*``
death headers, leaving ``wayang-error-code`` / ``wayang-error-message`` as the only reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from wayang_mq.core.redact import REDACTOR, Redactor

CAPABILITY_HEADER = "wayang-capability"
TASK_ATTEMPT_HEADER = "wayang-task-attempt"  # the attempt that died (wayang-attempt is a record)
DEAD_AT_HEADER = "wayang-dead-at"  # ISO 8601, UTC, milliseconds
INPUT_PREVIEW_HEADER = "wayang-input-preview"  # redacted JSON, at most PREVIEW_BYTES
RETRY_HISTORY_HEADER = "wayang-retry-history"  # earlier x-death entries, as text

#: the input preview's size bound (UTF-8 bytes): enough to recognise a task, never a payload
PREVIEW_BYTES = 1024
#: the retry history's size bound (characters)
HISTORY_CHARS = 1000
#: what a masked value reads as
MASK = "***"

#: the broker's dead-lettering headers, which a republished copy must not carry as its own
_BROKER_DEATH = re.compile(r"^x-(death|first-death-.*|last-death-.*)$")
#: map keys whose values are secrets by their name: ``password``, ``db_password``,
#: ``apiKey``, ``access_token``, ``Authorization`` (not ``max_tokens``): the key ends so
_SECRET_KEY = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|api[-_]?key|authorization|credentials?"
    r"|private[-_]?key|cookie|session[-_]?id)$",
    re.IGNORECASE,
)
_SECRET_REF = "$secret"


def iso_time(ms: int) -> str:
    """An instant as ISO 8601 UTC with milliseconds: ``2025-01-31T12:00:00.123Z``."""
    stamp = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def redacted_input(value: Any, redactor: Redactor = REDACTOR) -> Any:
    """``value`` with the values of secret-looking keys masked and known secret values cut
    out; a ``{"$secret": name}`` reference is kept as it is (it names a secret, holds none)."""
    return _mask(redactor.value(value))


def _mask(value: Any) -> Any:
    if isinstance(value, Mapping):
        if _is_reference(value):
            return dict(value)
        return {
            _key(key): MASK
            if isinstance(key, str)
            and _SECRET_KEY.search(key)
            and item is not None
            and not _is_reference(item)
            else _mask(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_mask(item) for item in value]
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    return value


def _key(key: Any) -> str | int | float | bool | None:
    """A map key JSON can hold: msgpack allows bytes (and other) keys in a task's nested maps."""
    if isinstance(key, bytes | bytearray):
        return bytes(key).decode("utf-8", "replace")
    if key is None or isinstance(key, str | int | float | bool):
        return key
    return str(key)


def _is_reference(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {_SECRET_REF}


def input_preview(value: Any, limit: int = PREVIEW_BYTES, redactor: Redactor = REDACTOR) -> str:
    """Compact JSON of the redacted input, cut to ``limit`` UTF-8 bytes (a cut preview ends
    with ``…`` and is no longer valid JSON: ``wayang-mq dead show`` prints the whole input)."""
    try:
        text = json.dumps(redacted_input(value, redactor), ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        # a hostile input must never stop its dead letter from being kept: say so instead
        text = f"<no preview: {type(exc).__name__}>"
    text = text.replace("\n", " ")
    data = text.encode()
    if len(data) <= limit:
        return text
    marker = "…"
    cut = data[: limit - len(marker.encode())].decode("utf-8", "ignore")
    return cut + marker


def split_history(headers: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``headers`` without the broker's death headers, and those deaths as one line of text
    (None when there were none). The existing history of an earlier copy is kept in front."""
    kept = {key: value for key, value in headers.items() if not _BROKER_DEATH.match(key)}
    deaths = describe_deaths(headers.get("x-death"))
    earlier = headers.get(RETRY_HISTORY_HEADER)
    parts = [p for p in (earlier if isinstance(earlier, str) else None, deaths) if p]
    kept.pop(RETRY_HISTORY_HEADER, None)
    return kept, ("; ".join(parts)[:HISTORY_CHARS] if parts else None)


def describe_deaths(deaths: Any) -> str | None:
    """RabbitMQ's ``x-death`` (most recent first) as text, oldest first:
    ``expired from wayang.retry.1s x2 at 2025-01-31T12:00:00.000Z``."""
    if not isinstance(deaths, Sequence) or isinstance(deaths, str | bytes):
        return None
    lines = [death_line(d) for d in reversed(deaths) if isinstance(d, Mapping)]
    return "; ".join(lines) or None


def death_line(death: Mapping[str, Any]) -> str:
    """One ``x-death`` entry as text."""
    reason = _text(death.get("reason")) or "?"
    queue = _text(death.get("queue")) or "?"
    line = f"{reason} from {queue}"
    count = death.get("count")
    if isinstance(count, int) and count > 1:
        line += f" x{count}"
    when = death.get("time")
    if isinstance(when, datetime):
        line += " at " + iso_time(int(when.timestamp() * 1000))
    return line


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None
