"""How a request reads in the inbox: a task's context shown readably (maps as tables, URLs as
links, ``{amount, currency}`` in minor units as money) and times as people say them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

#: ISO 4217 currencies whose minor unit is not a hundredth (the rest have two decimals)
_ZERO = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_THREE = "BHD IQD JOD KWD LYD OMR TND"
_EXPONENTS = {
    **dict.fromkeys(_ZERO.split(), 0),
    **dict.fromkeys(_THREE.split(), 3),
    "CLF": 4,
    "UYW": 4,
}
_SYMBOLS = {"EUR": "€", "USD": "$", "GBP": "£", "JPY": "¥", "CHF": "CHF "}


def is_money(value: Any) -> bool:
    """``{"amount": int, "currency": "EUR"}`` (more keys allowed are not: it is then a map)."""
    return (
        isinstance(value, Mapping)
        and set(value) == {"amount", "currency"}
        and isinstance(value["amount"], int)
        and not isinstance(value["amount"], bool)
        and isinstance(value["currency"], str)
        and len(value["currency"]) == 3
        and value["currency"].isalpha()
    )


def money(value: Mapping[str, Any]) -> str:
    """``{"amount": 125000, "currency": "EUR"}`` → ``€1,250.00``."""
    currency = str(value["currency"]).upper()
    exponent = _EXPONENTS.get(currency, 2)
    amount = int(value["amount"])
    sign, amount = ("-" if amount < 0 else ""), abs(amount)
    whole, minor = divmod(amount, 10**exponent)
    text = f"{whole:,}" + (f".{minor:0{exponent}d}" if exponent else "")
    symbol = _SYMBOLS.get(currency)
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {currency}"


def is_rows(value: Any) -> bool:
    """A list of maps with the same keys (at most 8, no nested maps or lists): a table."""
    if not isinstance(value, list) or not value or not isinstance(value[0], Mapping):
        return False
    keys = list(value[0])
    return (
        0 < len(keys) <= 8
        and all(isinstance(row, Mapping) and list(row) == keys for row in value)
        and not any(isinstance(cell, Mapping | list) for row in value for cell in row.values())
    )


def is_url(value: Any) -> bool:
    """An http(s) URL (other schemes, ``javascript:`` among them, stay text)."""
    if not isinstance(value, str) or len(value) > 2000 or any(c.isspace() for c in value):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def when(moment: datetime | None) -> str:
    """``2026-12-03 18:00 UTC``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else ""


def time_left(deadline: datetime | None, now: datetime | None = None) -> str:
    """``2 h 5 min left``, ``overdue`` or ``no deadline``."""
    if deadline is None:
        return "no deadline"
    seconds = int((deadline - (now or datetime.now(UTC))).total_seconds())
    if seconds <= 0:
        return "overdue"
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h left"
    if hours:
        return f"{hours} h {minutes} min left"
    if minutes:
        return f"{minutes} min left"
    return f"{seconds} s left"
