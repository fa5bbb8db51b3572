"""Structured log lines: ``event=task.done task_id=... executor=... duration_ms=...``.

One line per event, key=value (logfmt), so a daemon's log can be grepped by task id and parsed
by any log shipper without a JSON dependency.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from wayang_mq.core.fields import printable
from wayang_mq.core.redact import RedactingFilter


def _value(value: Any) -> str:
    text = str(value)
    if text == "" or any(ch in text for ch in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def line(name: str, **fields: Any) -> str:
    """One structured line, ``event=NAME key=value ...``: the fields in the order given."""
    pairs = " ".join(f"{key}={_value(val)}" for key, val in fields.items() if val is not None)
    return f"event={name} {pairs}"


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured line: the event name, then the fields in the order given."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", line(name, **fields))


class PrintableFormatter(logging.Formatter):
    """Escapes control characters in the message (not the traceback after it): a hostile
    task id holding CR, NUL or ESC must not forge a log line or drive a terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record), limit=_LINE_LIMIT)


_LINE_LIMIT = 16_000


def configure(level: str = "INFO") -> None:
    """Daemon logging to stderr with a timestamp and the logger name; called once by the CLI.
    Known secret values and passwords are cut out of every record (see core.redact)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # aiormq logs a dropped connection as an ERROR with a traceback; our own
    # broker.disconnected / broker.reconnected lines say what happened and what comes next.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
