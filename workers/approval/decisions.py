"""What a decision is worth on the wire: a counter-proposal's values checked against the
task's ``editable`` types, and the output (or error) each ending of a request answers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.model import ErrorInfo, JsonLike

from .store import Request

#: a person's decisions (SUCCESS), and the endings nobody decided (FAILED)
DECISIONS = ("approved", "rejected", "counter")

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class BadValue(ValueError):
    """A counter-proposal value that does not have its field's type."""


def counter_values(editable: Mapping[str, str], form: Mapping[str, str]) -> dict[str, Any]:
    """The edited values of a counter-proposal, typed: ``form`` maps field → text as typed.
    Fields left empty are left out; at least one is needed. Raises :class:`BadValue` naming
    the field and its type."""
    values: dict[str, Any] = {}
    for name, kind in editable.items():
        text = form.get(name, "").strip()
        if text == "":
            continue
        values[name] = _typed(name, kind, text)
    if not values:
        raise BadValue("a counter-proposal changes at least one value")
    return values


def _typed(name: str, kind: str, text: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "number":
            number = float(text)
            if not math.isfinite(number):
                raise ValueError(text)
            return int(number) if number.is_integer() and "." not in text else number
        if kind == "bool":
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
    except ValueError:
        raise BadValue(f"{name} must be {_KIND_NAMES[kind]}") from None
    return text[:10_000]


_KIND_NAMES = {"int": "a whole number", "number": "a number", "bool": "yes or no"}


def output_of(request: Request) -> JsonLike:
    """The SUCCESS output of a request a person decided."""
    assert request.decided_at is not None
    output: dict[str, JsonLike] = {
        "decision": request.state,
        "by": request.decided_by,
        "at": request.decided_at.isoformat(),
    }
    if request.comment:
        output["comment"] = request.comment
    if request.state == "counter":
        output["values"] = request.counter
    return output


def error_of(request: Request) -> ErrorInfo:
    """The FAILED error of a request that ended undecided (its deadline, a cancel)."""
    if request.state == "timeout":
        return ErrorInfo(
            code=ErrorCode.TIMEOUT,
            message=f"nobody decided {request.title!r} by its deadline",
            details={"reason": "deadline_passed"},
        )
    return ErrorInfo(
        code=ErrorCode.CANCELLED,
        message=request.comment or "cancelled",
        details={"reason": "withdrawn"},
    )
