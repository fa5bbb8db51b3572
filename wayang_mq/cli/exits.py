"""Exit codes of the ``wayang-mq`` command, and which error maps to which."""

from __future__ import annotations

from enum import IntEnum

from wayang_mq.core.errors import (
    Backpressure,
    BrokerUnreachable,
    DatabaseUnavailable,
    NoExecutor,
    ResultTimeout,
    WayangError,
)


class Exit(IntEnum):
    """Exit codes, documented in README.md."""

    OK = 0
    TASK_FAILED = 1  # the task ended FAILED (or PENDING without --wait answering)
    USAGE = 2  # bad arguments, settings, files
    UNREACHABLE = 3  # broker down or credentials refused
    NO_EXECUTOR = 4  # no queue serves the capability
    BACKPRESSURE = 5  # the capability's queue stayed full
    TIMEOUT = 6  # no result within --timeout
    AUDIT_FAILED = 7  # `wayang-mq audit` found a task lost, run twice, or a stray result
    INTERRUPTED = 130


_EXIT_FOR: list[tuple[type[WayangError], Exit]] = [
    (NoExecutor, Exit.NO_EXECUTOR),
    (Backpressure, Exit.BACKPRESSURE),
    (ResultTimeout, Exit.TIMEOUT),
    (BrokerUnreachable, Exit.UNREACHABLE),
    (DatabaseUnavailable, Exit.UNREACHABLE),
]


def exit_code_for(error: WayangError) -> Exit:
    """The exit code a WayangError maps to."""
    for kind, code in _EXIT_FOR:
        if isinstance(error, kind):
            return code
    return Exit.USAGE
