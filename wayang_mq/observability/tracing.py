"""Traces: W3C Trace Context carried in AMQP headers, and OpenTelemetry spans when configured.

A task carries ``traceparent`` (and maybe ``tracestate``) as AMQP headers, in W3C Trace Context
format, version 00 (https://www.w3.org/TR/trace-context/): ``00-<trace id>-<parent id>-<flags>``.
The dispatcher starts a trace per task (or continues the caller's); the worker continues it,
and everything it publishes for the task (the result, progress events, the retry's copy, the
compensation) carries a child of it, so one trace id follows the task's whole story. The
headers are not signed: they are advisory, any client may set them, and a value that is not
valid is ignored (a new trace starts): it never fails a task.

While a task is handled, its trace context is current (:func:`current`, a contextvar): the
worker's publishers read it there (:func:`headers`), and an executor reads it as
``ctx.traceparent`` to pass it on to the tasks it dispatches.

OpenTelemetry is optional (the ``otel`` extra). Spans are made only when its SDK is installed
*and* the process configured a ``TracerProvider``; otherwise nothing is imported on the hot
path and no span object exists (:func:`start_span` then only makes the ids). The worker's
spans are made by its trace layer, :class:`~wayang_mq.runtime.traced.TaskTracing`:
``queue wait`` (from the task's issue to its delivery), ``execute`` (its parent is the task's
``traceparent``) and ``publish result``; the dispatcher makes ``publish``.
"""

from __future__ import annotations

import contextvars
import functools
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Literal

from wayang_mq.core import logs
from wayang_mq.core.model import Task

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

#: tracestate bounds (W3C: 32 list members; 512 characters is what a vendor must propagate)
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_CHARS = 512
#: a traceparent of a later version may be longer (its fields after ours); beyond this: invalid
MAX_TRACEPARENT_CHARS = 512

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_KEY = r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
_MEMBER = re.compile(_KEY + r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
SAMPLED = 0x01


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A span's place in a trace: what a ``traceparent`` (and ``tracestate``) header says."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero: the parent-id of what it sends
    flags: int = SAMPLED  # trace-flags; bit 0: the caller may record (sampled)
    state: str = ""  # tracestate, validated ("" when none)

    @property
    def sampled(self) -> bool:
        """The caller may have recorded it: whoever records spans should record theirs."""
        return bool(self.flags & SAMPLED)

    @property
    def traceparent(self) -> str:
        """The ``traceparent`` header value (version 00)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def child(self) -> TraceContext:
        """A new span in the same trace (same flags and state)."""
        return TraceContext(self.trace_id, new_span_id(), self.flags, self.state)

    def headers(self) -> dict[str, str]:
        """The AMQP headers that carry it."""
        out = {TRACEPARENT_HEADER: self.traceparent}
        if self.state:
            out[TRACESTATE_HEADER] = self.state
        return out


# Ids are random, not secret (as OpenTelemetry's own generator makes them): the fast PRNG.
def new_trace_id() -> str:
    """32 random lowercase hex digits, not all zero."""
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    """16 random lowercase hex digits, not all zero."""
    return f"{random.getrandbits(64) or 1:016x}"


def new_trace() -> TraceContext:
    """The root span of a new trace, sampled (whoever records downstream may record it)."""
    return TraceContext(new_trace_id(), new_span_id())


def _text(value: object) -> str | None:
    """A header value as text: AMQP may hand a long string over as bytes."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def parse_traceparent(value: object, state: str = "") -> TraceContext | None:
    """A ``traceparent`` value, strictly: version 00 is exactly 55 characters, lowercase hex,
    ids not all zero; version ``ff`` is invalid; a later version is read for its first four
    fields when what follows them starts with ``-`` (W3C). None when invalid. ``state``: the
    (already validated) tracestate that goes with it."""
    text = _text(value)
    if text is None or len(text) < 55 or len(text) > MAX_TRACEPARENT_CHARS:
        return None
    matched = _TRACEPARENT.fullmatch(text[:55])
    if matched is None:
        return None
    version, trace_id, span_id, flags = matched.groups()
    if version == "ff" or (version == "00" and len(text) != 55):
        return None
    if len(text) > 55 and text[55] != "-":
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    bits = int(flags, 16)
    return TraceContext(trace_id, span_id, bits if version == "00" else bits & SAMPLED, state)


def parse_tracestate(value: object) -> str:
    """A ``tracestate`` value, validated and normalised (members joined by ``,``): at most 32
    members, 512 characters, well-formed and without a repeated key; "" otherwise (dropped
    whole: a member cannot be trusted to mean what it says once its list is malformed)."""
    text = _text(value)
    if not text or len(text) > MAX_TRACESTATE_CHARS:
        return ""
    members = [member.strip(" \t") for member in text.split(",")]
    members = [member for member in members if member]
    if len(members) > MAX_TRACESTATE_MEMBERS:
        return ""
    keys = set()
    for member in members:
        if _MEMBER.fullmatch(member) is None:
            return ""
        keys.add(member.split("=", 1)[0])
    return ",".join(members) if len(keys) == len(members) else ""


def parse(traceparent: object, tracestate: object = None) -> TraceContext | None:
    """The context the two header values say; None when ``traceparent`` is not valid (its
    ``tracestate`` then means nothing either)."""
    if tracestate is None:
        return parse_traceparent(traceparent)
    context = parse_traceparent(traceparent)
    if context is None:
        return None
    state = parse_tracestate(tracestate)
    return (
        TraceContext(context.trace_id, context.span_id, context.flags, state) if state else context
    )


def from_headers(headers: Mapping[str, Any] | None) -> TraceContext | None:
    """The trace context a message's AMQP headers carry, if valid."""
    if not headers or TRACEPARENT_HEADER not in headers:
        return None
    return parse(headers.get(TRACEPARENT_HEADER), headers.get(TRACESTATE_HEADER))


# -- the current task's trace ---------------------------------------------------------------

_current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "wayang_trace", default=None
)


def current() -> TraceContext | None:
    """The trace context of the task being handled here (its span: what it sends is its child)."""
    return _current.get()


def use(context: TraceContext | None) -> contextvars.Token[TraceContext | None]:
    """Make ``context`` current in this context (an asyncio task and what it starts)."""
    return _current.set(context)


def headers() -> dict[str, str]:
    """The trace headers for a message sent on behalf of the current task ({} if none)."""
    context = _current.get()
    return context.headers() if context is not None else {}


def bind_task(task: Task, executor_id: str, context: TraceContext) -> None:
    """``context`` current, and the task's fields on every log line from here on."""
    _current.set(context)
    logs.bind(
        task_id=task.task_id,
        node_id=task.node_id,
        capability=task.capability,
        executor_id=executor_id,
        attempt=task.attempt,
        trace_id=context.trace_id,
    )


# -- OpenTelemetry, when installed and configured ------------------------------------------------

SpanKind = Literal["internal", "producer", "consumer"]


@functools.cache
def _otel_api() -> ModuleType | None:
    """``opentelemetry.trace``, imported once, on first use; None when not installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


def otel_active() -> bool:
    """True when OpenTelemetry is installed and a real TracerProvider was configured (not the
    API's default proxy or no-op one): only then are spans made."""
    api = _otel_api()
    if api is None:
        return False
    # Asked for every task, both sides: the API's get_tracer_provider() reads os.environ each
    # time no provider is set (a measured 1.4% of a dispatcher's CPU). No provider set and
    # none named in the environment is the API's proxy: not active, without asking.
    if getattr(api, "_TRACER_PROVIDER", _UNKNOWN) is None and not _provider_in_environment():
        return False
    provider = api.get_tracer_provider()
    return not isinstance(provider, (api.ProxyTracerProvider, api.NoOpTracerProvider))


_UNKNOWN = object()  # the API no longer keeps _TRACER_PROVIDER: always ask it


@functools.cache
def _provider_in_environment() -> bool:
    """OTEL_PYTHON_TRACER_PROVIDER names a provider the API makes on first use (read once)."""
    return "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def ambient() -> TraceContext | None:
    """What a new task's trace continues when its caller names none: OpenTelemetry's current
    span (None here: :func:`start_span` finds it itself), else the task being handled here
    (an executor dispatching), else nothing (a new trace)."""
    if otel_active():
        api = _otel_api()
        assert api is not None
        if api.get_current_span().get_span_context().is_valid:
            return None
    return _current.get()


@dataclass(slots=True)
class Span:
    """A span: its trace context, and the OpenTelemetry span when one is recorded."""

    context: TraceContext
    otel: Any = field(default=None, repr=False)

    def end(self, *, end_ns: int | None = None, error: str | None = None) -> None:
        """End it (once; later calls do nothing), marked an error when ``error`` says why."""
        span, self.otel = self.otel, None
        if span is None:
            return
        if error is not None:
            from opentelemetry.trace import Status as OtelStatus
            from opentelemetry.trace import StatusCode

            span.set_status(OtelStatus(StatusCode.ERROR, error))
        span.end(end_time=end_ns)

    def attach(self) -> None:
        """Make it OpenTelemetry's current span in this context (executor code that uses
        OpenTelemetry instrumentation nests its spans under it)."""
        if self.otel is not None:
            from opentelemetry import context as otel_context
            from opentelemetry import trace

            otel_context.attach(trace.set_span_in_context(self.otel))


def start_span(
    name: str,
    *,
    kind: SpanKind = "internal",
    parent: TraceContext | None,
    start_ns: int | None = None,
    attributes: Mapping[str, str | int] | None = None,
) -> Span:
    """A span, child of ``parent`` (None: OpenTelemetry's current span, else a new trace).
    Without OpenTelemetry: only its ids, no cost beyond them."""
    if not otel_active():
        return Span(parent.child() if parent is not None else new_trace())
    return otel_span(name, kind, parent, start_ns, attributes)


def otel_span(
    name: str,
    kind: SpanKind,
    parent: TraceContext | None,
    start_ns: int | None,
    attributes: Mapping[str, str | int] | None,
) -> Span:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    from wayang_mq.version import __version__

    parent_context = None
    if parent is not None:
        remote = SpanContext(
            trace_id=int(parent.trace_id, 16),
            span_id=int(parent.span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(parent.flags),
            trace_state=TraceState.from_header([parent.state]) if parent.state else None,
        )
        parent_context = trace.set_span_in_context(NonRecordingSpan(remote))
    tracer = trace.get_tracer("wayang_mq", __version__)
    span = tracer.start_span(
        name,
        context=parent_context,
        kind=getattr(trace.SpanKind, kind.upper()),
        attributes=dict(attributes or {}),
        start_time=start_ns,
    )
    own = span.get_span_context()
    state = parent.state if parent is not None else own.trace_state.to_header()
    context = TraceContext(f"{own.trace_id:032x}", f"{own.span_id:016x}", int(own.trace_flags))
    return Span(replace(context, state=parse_tracestate(state)), span)


# -- the worker's layer ---------------------------------------------------------------------------
