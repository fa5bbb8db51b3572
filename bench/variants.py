"""Bench-only switches that take one guarantee out of wayang-mq, to price it (bench/prices.py).

The product has no such switches, on purpose: these are monkeypatches applied by a bench
process to itself, never options a deployment could turn on. A worker gets them from
``python -m bench.variant_worker --off SWITCH -- <wayang-mq args>``; the dispatcher side is
patched in the bench process with :func:`off` around one variant's turn and restored after it.

Each switch patches a method or function at one stable API point, looked up at call time by
every caller (a class attribute, or a module global the caller reads through its module), so
the patches stay few and easy to re-point when the hot path changes:

- ``signatures``: ``wayang_mq.core.signing.Signer.sign``, ``KeyRing.verify``
- ``schema``: ``wayang_mq.core.wire.decode`` (what ``open_signed`` calls)
- ``result-confirms``: ``wayang_mq.amqp.publisher.ConfirmedPublisher.publish``
- ``heartbeats``: ``wayang_mq.amqp.daemon.Daemon._beat_loop``

The record (``record = false``) and metrics (``--metrics-port``) need no patch: the first is the
topology's bindings, the second a flag (bench/prices.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
from pydantic import BaseModel

from wayang_mq.amqp import daemon as daemon_module
from wayang_mq.amqp import publisher as publisher_module
from wayang_mq.core import names, signing, wire

#: what a switched-off signer "signs" with: the right length, no Ed25519 work
NO_SIGNATURE = bytes(64)


@dataclass(frozen=True)
class Patch:
    """One attribute replaced on one object (a class or a module)."""

    owner: Any
    name: str
    replacement: Any


@dataclass(frozen=True)
class Switch:
    """One guarantee and the patches that take it out."""

    name: str
    removes: str  # one line for tables and the JSON; the function's docstring says more
    patches: tuple[Patch, ...]


# -- signatures ------------------------------------------------------------------------------

_verify = signing.KeyRing.verify


def _sign_nothing(self: signing.Signer, body: bytes, wire_type: str = signing.TASK_TYPE) -> bytes:
    """No Ed25519 signature: 64 zero bytes, so the headers keep their shape and key id."""
    return NO_SIGNATURE


def _verify_scope_only(
    self: signing.KeyRing,
    body: bytes,
    headers: Mapping[str, object],
    wire_type: str = signing.TASK_TYPE,
) -> signing.Verified:
    """No Ed25519 verification; the key id and its scope are still looked up (the scope
    checks after it still run). A key id the ring does not know, or one without a scope,
    goes to the real verify, which refuses it as before."""
    key_id = headers.get(signing.KEY_ID_HEADER)
    if isinstance(key_id, bytes):
        key_id = key_id.decode("utf-8", "replace")
    scope = self.scope(key_id) if isinstance(key_id, str) else None
    if key_id is None or scope is None:
        return _verify(self, body, headers, wire_type)
    return signing.Verified(str(key_id), scope)


SIGNATURES = Switch(
    "signatures",
    "Ed25519: no signing (tasks, results, events), no verifying (tasks, results); "
    "key ids and scopes still checked",
    (
        Patch(signing.Signer, "sign", _sign_nothing),
        Patch(signing.KeyRing, "verify", _verify_scope_only),
    ),
)


# -- schema ----------------------------------------------------------------------------------


def _decode_unchecked(body: bytes, model: type[wire.M]) -> wire.M:
    """msgpack, then ``model_construct``: no pydantic validation of the body (types, bounds,
    ids, unknown fields, the models' own validators). Enum values and nested models are
    still turned into their types, or the receiver could not use the message at all."""
    constructed: wire.M = _construct(model, msgpack.unpackb(body, raw=False, strict_map_key=True))
    return constructed


def _construct(model: type[BaseModel], raw: dict[str, Any]) -> Any:
    converters = _converters(model)
    fields = {
        name: converters[name](value) if name in converters and value is not None else value
        for name, value in raw.items()
    }
    return model.model_construct(**fields)


@functools.cache
def _converters(model: type[BaseModel]) -> dict[str, Callable[[Any], Any]]:
    """Per field whose type is an enum or a model (or an optional one): how to make it one."""
    found: dict[str, Callable[[Any], Any]] = {}
    for name, info in model.model_fields.items():
        for kind in _types_in(info.annotation):
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                found[name] = kind
            elif isinstance(kind, type) and issubclass(kind, BaseModel):
                found[name] = functools.partial(_construct_if_map, kind)
    return found


def _types_in(annotation: Any) -> tuple[Any, ...]:
    """``X``, ``X | None``, ``Optional[X]``: the types it names."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _construct_if_map(model: type[BaseModel], value: Any) -> Any:
    return _construct(model, value) if isinstance(value, dict) else value


SCHEMA = Switch(
    "schema",
    "pydantic validation of received bodies (tasks at the worker, results at the dispatcher)",
    (Patch(wire, "decode", _decode_unchecked),),
)


# -- result confirms ------------------------------------------------------------------------

_publish = publisher_module.ConfirmedPublisher.publish
_unwaited: set[asyncio.Task[None]] = set()


async def _publish_results_unwaited(
    self: publisher_module.ConfirmedPublisher,
    exchange: str,
    routing_key: str,
    message: Any,
    *,
    mandatory: bool = False,
) -> None:
    """A result is handed to the client and not waited for: the worker acks its task at once,
    before the broker has the result (a crash then loses the answer). The channel is still
    in confirm mode, so the confirm still comes back and is handled, in the background; what
    is removed is the wait. Other publishes (events, retries, dead copies) are unchanged."""
    if exchange != names.RESULTS_EXCHANGE:
        await _publish(self, exchange, routing_key, message, mandatory=mandatory)
        return
    background = asyncio.create_task(
        _publish(self, exchange, routing_key, message, mandatory=mandatory)
    )
    _unwaited.add(background)
    background.add_done_callback(_forget)


def _forget(task: asyncio.Task[None]) -> None:
    _unwaited.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a failure is the removed guarantee, not a crash


RESULT_CONFIRMS = Switch(
    "result-confirms",
    "the worker's wait for the broker's confirm of each result before it acks the task",
    (Patch(publisher_module.ConfirmedPublisher, "publish", _publish_results_unwaited),),
)


# -- heartbeats -----------------------------------------------------------------------------


async def _no_beat_loop(self: daemon_module.Daemon, interval_s: float) -> None:
    """No heartbeat loop: nothing on ``wayang.events`` every ``--heartbeat`` seconds. (A task
    with a heartbeat timeout still makes its worker beat once as it starts; the bench's tasks
    have none, and an echo task emits no other event: progress and attempt events come only
    from executors that report progress and from retries.)"""


HEARTBEATS = Switch(
    "heartbeats",
    "the worker's heartbeat loop (an event every 5 s; echo tasks emit no events of their own)",
    (Patch(daemon_module.Daemon, "_beat_loop", _no_beat_loop),),
)


SWITCHES: dict[str, Switch] = {s.name: s for s in (SIGNATURES, SCHEMA, RESULT_CONFIRMS, HEARTBEATS)}
# The originals, taken once at import: off() restores exactly these.
_ORIGINALS = {
    (id(p.owner), p.name): getattr(p.owner, p.name) for s in SWITCHES.values() for p in s.patches
}


def apply(switches: Iterable[str]) -> None:
    """Take the named guarantees out of this process for good (a bench worker)."""
    for name in switches:
        for patch in _switch(name).patches:
            setattr(patch.owner, patch.name, patch.replacement)


def restore() -> None:
    """Put every patched attribute back."""
    for switch in SWITCHES.values():
        for patch in switch.patches:
            setattr(patch.owner, patch.name, _ORIGINALS[(id(patch.owner), patch.name)])


@contextlib.contextmanager
def off(switches: Iterable[str]) -> Iterator[None]:
    """The named guarantees out of this process while the block runs (a dispatcher's turn)."""
    names_ = tuple(switches)
    apply(names_)
    try:
        yield
    finally:
        restore()


def _switch(name: str) -> Switch:
    try:
        return SWITCHES[name]
    except KeyError:
        raise SystemExit(f"no switch {name!r}: choose from {', '.join(SWITCHES)}") from None
