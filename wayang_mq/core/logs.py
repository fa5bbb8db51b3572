"""Structured log lines: one line per event, as JSON or as readable ``event=NAME k=v`` text.

``event(logger, "task.finished", task_id=..., duration_ms=...)`` is the one way the package
logs an event. The record keeps the event's name and fields, so a formatter can write them as
a JSON object (one per line, for a log shipper) or as logfmt text (for a person at a terminal,
and for ``caplog``: the record's message is always the text form).

While a task is handled, the worker binds its fields (task id, node id, capability, executor
id, attempt, trace id) in a contextvar (:func:`bind`); every line logged meanwhile, by any
logger, carries them: the formatter reads them off the record (:class:`ContextFilter` stamps
them on records that do not come from :func:`event`). A field the event names itself wins over
the bound one of the same name: a key appears once per line.

Both formats are safe for hostile values: the text escapes control characters
(:class:`PrintableFormatter`), the JSON escapes them (and everything outside ASCII), and both
cap a line's length; known secret values are cut out first (:class:`RedactingFilter`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from wayang_mq.core.fields import printable
from wayang_mq.core.redact import RedactingFilter

#: what ``--log-format`` and ``WAYANG_LOG_FORMAT`` take
LogFormat = Literal["auto", "json", "text"]
FORMATS: tuple[LogFormat, ...] = ("auto", "json", "text")

#: the fields the worker binds while it handles a task (docs/observability.md, "Logs")
TASK_FIELDS = ("task_id", "node_id", "capability", "executor_id", "attempt", "trace_id")

_EMPTY: Mapping[str, Any] = {}
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "wayang_log_context", default=_EMPTY
)

# Record attributes (``extra``) an event carries for the formatters.
_EVENT, _FIELDS, _CONTEXT = "wayang_event", "wayang_fields", "wayang_context"


def _value(value: Any) -> str:
    text = str(value)
    if text == "" or any(ch in text for ch in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def line(name: str, **fields: Any) -> str:
    """One structured line, ``event=NAME key=value ...``: the fields in the order given."""
    pairs = " ".join(f"{key}={_value(val)}" for key, val in fields.items() if val is not None)
    return f"event={name} {pairs}"


class _Line:
    """An event's text, rendered only when something reads the record's message (a text
    handler, caplog): a JSON handler never pays for it. Renders the fields as they are then,
    so a redaction applied to them in place shows in the text too."""

    __slots__ = ("fields", "name")

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self.name, self.fields = name, fields

    def __str__(self) -> str:
        return line(self.name, **self.fields)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured line: the event name, then the fields in the order given (None
    values are left out), then the fields bound for the task being handled, if any."""
    if logger.isEnabledFor(level):
        fields = {key: val for key, val in fields.items() if val is not None}
        extra = {_EVENT: name, _FIELDS: fields, _CONTEXT: _context.get()}
        logger.log(level, _Line(name, fields), extra=extra)


# -- the fields bound while a task is handled ----------------------------------------------------


def bind(**fields: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Add ``fields`` (None values left out) to every line logged from now on in this context
    (an asyncio task and the tasks it starts); :func:`unbind` with the token undoes it."""
    merged = {**_context.get(), **{key: val for key, val in fields.items() if val is not None}}
    return _context.set(merged)


def unbind(token: contextvars.Token[Mapping[str, Any]]) -> None:
    """Undo :func:`bind`. A coroutine closed by the garbage collector (abandoned while
    suspended inside :func:`bound`) unwinds in another context, where its token is foreign:
    that context is gone with the coroutine, so there is nothing left to undo."""
    with contextlib.suppress(ValueError):
        _context.reset(token)


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """``fields`` on every line logged inside the block."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def context() -> Mapping[str, Any]:
    """The fields bound in the current context."""
    return _context.get()


class ContextFilter(logging.Filter):
    """Stamps the bound fields on records that do not carry them yet (any logger's, not only
    :func:`event`'s). Handlers run in the logging call's context, so this is the caller's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, _CONTEXT):
            setattr(record, _CONTEXT, _context.get())
        return True


# -- formats -------------------------------------------------------------------------------------

_LINE_LIMIT = 16_000  # characters per line, in either format
_VALUE_LIMIT = 4_000  # characters per JSON value (the traceback: the rest of the line)
_SHORT_LIMIT = 200  # per value, when a line is still too long


class PrintableFormatter(logging.Formatter):
    """Escapes control characters in the message (not the traceback after it): a hostile
    task id holding CR, NUL or ESC must not forge a log line or drive a terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record), limit=_LINE_LIMIT)


class TextFormatter(PrintableFormatter):
    """``TIME LEVEL logger event=NAME k=v ...``, then the bound task fields the line does not
    name itself; control characters escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        bound_fields = getattr(record, _CONTEXT, _EMPTY)
        if not bound_fields:
            return super().formatMessage(record)
        own = getattr(record, _FIELDS, None)
        if own is None:  # a plain message: skip what it already says as key=
            message = record.getMessage()
            extra = {k: v for k, v in bound_fields.items() if f"{k}=" not in message}
        else:
            extra = {k: v for k, v in bound_fields.items() if k not in own}
        suffix = " ".join(f"{key}={_value(val)}" for key, val in extra.items())
        text = logging.Formatter.formatMessage(self, record)
        return printable(f"{text} {suffix}" if suffix else text, limit=_LINE_LIMIT)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601 UTC, milliseconds), ``level``, ``logger``,
    ``event`` and its fields (or ``msg`` for a record that is no event), the bound task fields,
    and ``exc`` (the traceback) when there is one. ASCII only, control characters escaped, at
    most 16,000 characters (long values are cut, and ``truncated`` says so)."""

    def format(self, record: logging.LogRecord) -> str:
        head: dict[str, Any] = {
            "ts": _iso_utc(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
        }
        body: dict[str, Any] = {}
        name = getattr(record, _EVENT, None)
        own = getattr(record, _FIELDS, None)
        if name is None:
            parsed = _parse_line(record.getMessage())
            if parsed is None:
                body["msg"] = record.getMessage()
            else:
                name, own = parsed
        if name is not None:
            head["event"] = _jsonable(name, _SHORT_LIMIT)
            body.update(own or {})
        for key, val in getattr(record, _CONTEXT, _EMPTY).items():
            body.setdefault(key, val)
        exc = self._exception(record)
        if exc:
            body["exc"] = exc
        return _dumps(head, body)

    def _exception(self, record: logging.LogRecord) -> str:
        text = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else "")
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}".lstrip("\n")
        return text


def _iso_utc(created: float, msecs: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"


def _jsonable(value: Any, limit: int) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _dumps(head: dict[str, Any], body: dict[str, Any]) -> str:
    """The line, within the limit: long values cut, then (still too long) every value cut
    short, then (still) only the head; ``truncated`` says when anything was cut short."""
    fields = {
        k: _jsonable(v, _LINE_LIMIT // 2 if k == "exc" else _VALUE_LIMIT) for k, v in body.items()
    }
    text = _encode({**head, **fields})
    if len(text) <= _LINE_LIMIT:
        return text
    fields = {k: _jsonable(v, _SHORT_LIMIT) for k, v in body.items()}
    text = _encode({**head, **fields, "truncated": True})
    if len(text) <= _LINE_LIMIT:
        return text
    return _encode({**head, "truncated": True})


def _encode(obj: dict[str, Any]) -> str:
    # ensure_ascii escapes C1 controls and every non-ASCII character; DEL is ASCII, escape it too
    return json.dumps(obj, ensure_ascii=True).replace("\x7f", "\\u007f")


_LOGFMT = re.compile(r'event=(\S+)((?: [A-Za-z_][\w.-]*=(?:"(?:[^"\\]|\\.)*"|[^\s"]*))*) ?')
_PAIR = re.compile(r' ([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
_UNESCAPE = re.compile(r"\\(.)")


def _parse_line(message: str) -> tuple[str, dict[str, Any]] | None:
    """An ``event=NAME k=v`` message logged as text (``log.exception("event=...")``) read back
    into its name and fields, so it is structured in JSON too; None if it is not one."""
    if not message.startswith("event="):
        return None
    matched = _LOGFMT.fullmatch(message)
    if matched is None:
        return None
    fields: dict[str, Any] = {}
    for key, raw in _PAIR.findall(matched.group(2)):
        if raw.startswith('"'):
            raw = _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), raw[1:-1])
        fields[key] = raw
    return matched.group(1), fields


def resolve_format(flag: str | None, env: str | None) -> LogFormat:
    """The format asked for: the flag, else the environment's ``WAYANG_LOG_FORMAT``, else
    ``auto``; ValueError naming the bad value otherwise."""
    chosen = (flag or env or "auto").strip().lower()
    for known in FORMATS:
        if chosen == known:
            return known
    raise ValueError(f"log format {chosen!r} is not one of {', '.join(FORMATS)}")


def formatter_for(log_format: LogFormat, stream: Any = None) -> logging.Formatter:
    """The formatter of a format; ``auto`` is text when ``stream`` (stderr) is a terminal,
    JSON otherwise (a daemon's log file, a pipe, a container's log)."""
    if log_format == "auto":
        isatty = getattr(stream if stream is not None else sys.stderr, "isatty", None)
        log_format = "text" if callable(isatty) and isatty() else "json"
    return TextFormatter() if log_format == "text" else JsonFormatter()


def configure(level: str = "INFO", log_format: LogFormat = "auto") -> None:
    """Daemon logging to stderr in ``log_format``; called once by the CLI. Known secret values
    and passwords are cut out of every record (see core.redact), in either format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter())
    handler.setFormatter(formatter_for(log_format, sys.stderr))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # aiormq logs a dropped connection as an ERROR with a traceback; our own
    # broker.disconnected / broker.reconnected lines say what happened and what comes next.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
