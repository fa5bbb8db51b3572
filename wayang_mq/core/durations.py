"""One conversion point for time: durations in, the wire's integer milliseconds out.

Callers speak seconds (``timeout_s=2.5``) or ``timedelta``; the wire speaks integer
milliseconds (``timeout_ms``). Everything in between goes through :func:`to_ms`, so no module
multiplies by 1000 on its own (arq's ``to_ms`` is the model).
"""

from __future__ import annotations

import math
from datetime import timedelta

#: a duration as a caller gives it: seconds (int or float) or a timedelta
Seconds = int | float | timedelta


def to_ms(value: Seconds) -> int:
    """``value`` in whole milliseconds; a negative or non-finite duration is a ValueError."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and not negative, got {value!r}")
    return round(seconds * 1000)


def to_ms_or_none(value: Seconds | None) -> int | None:
    """:func:`to_ms`, passing None through (an option left unset)."""
    return None if value is None else to_ms(value)
