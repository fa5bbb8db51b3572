"""Redaction: known secret values cut out of text, values and log records on their way out.

A process holds one :data:`REDACTOR`. The worker adds each task secret it resolves, the CLI adds
the broker's and the database's passwords; from then on every log record that passes a
:class:`RedactingFilter` (``wayang_mq.core.logs.configure`` installs one), every result, progress
event and heartbeat the worker publishes has those values replaced by ``[secret:<name>]``.

It is exact-match redaction: it finds a value as written, and as the escaped forms our logs
and exceptions write it (``repr``, JSON, logfmt, control characters escaped), nothing else. A
value that was transformed (base64, hashed, split, reversed, upper-cased) is not recognised;
``docs/security.md`` §8 says so. Values shorter than :data:`MIN_LENGTH` are never added: replacing
every ``"1"`` in a log would destroy it and hide nothing (the resolver refuses such secrets).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

from wayang_mq.core.fields import printable

#: shorter values are not redactable (they would match everywhere): refused as secrets
MIN_LENGTH = 4

PLACEHOLDER = "[secret:{name}]"


def _variants(value: str) -> set[str]:
    """The forms in which ``value`` can reach a log line or an error message."""
    logfmt = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    forms = {
        value,
        printable(value, limit=len(value) + 1),  # control characters escaped (log lines)
        repr(value)[1:-1],  # an exception or a dict holding it, in a traceback or a message
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        logfmt,  # a field of wayang_mq.core.logs.line
    }
    return {form for form in forms if len(form) >= MIN_LENGTH}


class Redactor:
    """A set of named secret values, and the means to cut them out of anything.

    Thread-safe for readers: adding a value swaps the compiled pattern in one assignment.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}  # each form of each value -> the name shown instead
        self._text: re.Pattern[str] | None = None
        self._bytes: re.Pattern[bytes] | None = None

    def add(self, name: str, value: str) -> None:
        """Redact ``value`` from now on, shown as ``[secret:<name>]``; short values are ignored."""
        if len(value) < MIN_LENGTH:
            return
        with self._lock:
            new = {form: name for form in _variants(value) if form not in self._names}
            if not new:
                return
            self._names.update(new)
            # longest first: a value that contains another is cut out whole
            forms = sorted(self._names, key=len, reverse=True)
            self._text = re.compile("|".join(re.escape(form) for form in forms))
            self._bytes = re.compile(b"|".join(re.escape(form.encode()) for form in forms))

    def __bool__(self) -> bool:
        return self._text is not None

    def text(self, text: str) -> str:
        """``text`` with every known value replaced by its placeholder."""
        pattern = self._text
        if pattern is None:
            return text
        names = self._names
        return pattern.sub(lambda m: PLACEHOLDER.format(name=names[m.group()]), text)

    def occurs_in(self, text: str) -> bool:
        """True if some known value occurs in ``text``."""
        pattern = self._text
        return pattern is not None and pattern.search(text) is not None

    def found_in(self, data: bytes) -> bool:
        """True if some known value occurs in ``data`` (e.g. a packed msgpack body: strings
        are packed as their UTF-8 bytes, so one C-speed search decides whether to walk it)."""
        pattern = self._bytes
        return pattern is not None and pattern.search(data) is not None

    def value(self, value: Any) -> Any:
        """A copy of a msgpack-like value (maps, arrays, strings, bytes, scalars) with every
        known secret value replaced in its strings, bytes and map keys."""
        if self._text is None:
            return value
        return self._walk(value)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes | bytearray):
            return self._redact_bytes(bytes(value))
        if isinstance(value, Mapping):
            return {self._walk(k): self._walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._walk(item) for item in value)
        return value

    def _redact_bytes(self, data: bytes) -> bytes:
        pattern = self._bytes
        if pattern is None:
            return data
        names = self._names
        return pattern.sub(
            lambda m: PLACEHOLDER.format(name=names[m.group().decode()]).encode(), data
        )


#: the process's redactor: what the worker resolves and the CLI's credentials are added here
REDACTOR = Redactor()


class RedactingFilter(logging.Filter):
    """A handler filter that rewrites each record with known secret values cut out of its
    message, its traceback and its stack: attach it to any handler (``logs.configure`` does
    for the daemons' own). The record is changed in place, so every handler after sees it
    redacted too."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self._redactor = redactor
        self._last_bound: tuple[Mapping[str, Any], dict[str, Any]] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self._redactor
        if not redactor:
            return True
        fields = getattr(record, "wayang_fields", None)
        if isinstance(fields, dict):
            # a structured event (core.logs.event): its fields, in place; its text message is
            # rendered from them (so it needs no pass of its own)
            _redact_fields(redactor, fields)
        else:
            message = record.getMessage()
            redacted = redactor.text(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        bound = getattr(record, "wayang_context", None)
        if bound:
            # the task fields bound to the line: the same mapping for every line of a task
            last = self._last_bound
            if last is None or last[0] is not bound:
                redacted_bound = dict(bound)
                _redact_fields(redactor, redacted_bound)
                last = self._last_bound = (bound, redacted_bound)
            record.wayang_context = last[1]
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redactor.text(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.text(record.stack_info)
        return True


def _redact_fields(redactor: Redactor, fields: dict[str, Any]) -> None:
    """Known secret values cut out of log fields, in place: a field that holds one becomes its
    redacted text; numbers and fields that hold none stay as they are. One search over all of
    them first: the common line holds no secret."""
    texts = {
        key: value if isinstance(value, str) else str(value)
        for key, value in fields.items()
        if value is not None and not isinstance(value, bool | int | float)
    }
    if not texts or not redactor.occurs_in("\x00".join(texts.values())):
        return
    for key, text in texts.items():
        redacted = redactor.text(text)
        if redacted != text:
            fields[key] = redacted
