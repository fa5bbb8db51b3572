"""Middleware: cross-cutting concerns as layers around a delivery, not branches in the worker.

A worker runs its middleware at four points of every delivery (dramatiq's middleware and
Temporal's interceptors are the models):

- ``on_received``: the raw delivery, before it is decoded (decode hook: envelope headers,
  anything checked before the body is trusted);
- ``on_opened``: the task passed size, signature, schema, deadline and capability checks
  (verify hook: audience, tenant, policy); returning a :class:`Result` answers the task
  without running it (the worker's own recent-results cache is such a layer);
- ``on_executed``: the executor finished (or was answered without running); a hook may
  return a changed result, which the next hook and the rest of the pipeline see;
- ``on_settled``: the delivery's :class:`~wayang_mq.amqp.outcome.Outcome` was carried out
  (every delivery ends here exactly once: done, pending, retry, dead letter, requeue, reject;
  a long-running task's later answer ends here a second time, as done or retry).

Each hook takes one frozen input object, so a hook can gain fields without breaking the ones
written against it. Hooks run in the order given, and only the layers that override a hook
are called for it. A :class:`~wayang_mq.core.errors.WireError` raised by ``on_received`` or
``on_opened`` refuses the task as bad input (dead-lettered with that reason; answered FAILED
from ``on_opened``, where the task verified, and to nobody from ``on_received``).
Any other exception is logged and skipped: a metrics bug must not fail a task. Task records,
envelope checks, metrics and tracing plug in here. Secrets are not a layer: the runtime
resolves and redacts them itself (see :mod:`wayang_mq.runtime.running` for why).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from wayang_mq.core.errors import WireError
from wayang_mq.core.model import Result, Task

if TYPE_CHECKING:  # executor code imports this module: keep AMQP out of its import
    from wayang_mq.amqp.outcome import Outcome

log = logging.getLogger("wayang_mq.runtime.middleware")


@dataclass(frozen=True, slots=True)
class Received:
    """A delivery as it arrived, before its body is decoded or trusted."""

    executor_id: str
    capability: str
    message_id: str | None
    body: bytes
    headers: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Opened:
    """A task that passed every check, about to be answered or run."""

    executor_id: str
    capability: str
    task: Task


@dataclass(frozen=True, slots=True)
class Executed:
    """A task's result, before the pipeline decides its outcome (retry, answer)."""

    executor_id: str
    task: Task
    result: Result
    output_bytes: int = 0  # the packed output's size (0 when it was not run here)


@dataclass(frozen=True, slots=True)
class Settled:
    """A delivery's outcome, carried out (``outcome.result`` is the answer it published)."""

    executor_id: str
    capability: str
    outcome: Outcome


class Middleware:
    """Base of middleware: override the hooks you need."""

    async def on_received(self, received: Received) -> None:
        """A delivery arrived; raise a ``WireError`` to refuse it as bad input."""

    async def on_opened(self, opened: Opened) -> Result | None:
        """The task passed its checks; return a Result to answer it without running it, or
        raise a ``WireError`` to refuse it as bad input."""
        return None

    async def on_executed(self, executed: Executed) -> Result:
        """The task's result; return it, or a changed one."""
        return executed.result

    async def on_settled(self, settled: Settled) -> None:
        """The delivery's outcome was carried out."""


class Chain:
    """The worker's middleware, run in order; a hook that raises is logged and skipped."""

    def __init__(self, middleware: Sequence[Middleware]) -> None:
        # per hook, only the layers that override it: a hook nobody overrides costs nothing
        def overriding(hook: str) -> tuple[Middleware, ...]:
            base = getattr(Middleware, hook)
            return tuple(m for m in middleware if getattr(type(m), hook) is not base)

        self._received = overriding("on_received")
        self._opened = overriding("on_opened")
        self._executed = overriding("on_executed")
        self._settled = overriding("on_settled")

    @property
    def wants_received(self) -> bool:
        """True if some layer looks at raw deliveries (else the worker builds no Received)."""
        return bool(self._received)

    async def received(self, received: Received) -> None:
        """Run every ``on_received``; a ``WireError`` propagates (the delivery is refused)."""
        for layer in self._received:
            try:
                await layer.on_received(received)
            except WireError:
                raise
            except Exception:
                _failed(layer, "on_received", received.message_id)

    async def opened(self, opened: Opened) -> Result | None:
        """Run ``on_opened`` until one answers; a ``WireError`` propagates."""
        for layer in self._opened:
            try:
                answer = await layer.on_opened(opened)
            except WireError:
                raise
            except Exception:
                _failed(layer, "on_opened", opened.task.task_id)
                continue
            if answer is not None:
                return answer
        return None

    async def executed(self, executed: Executed) -> Result:
        """Run every ``on_executed``; each sees the result the one before returned."""
        result = executed.result
        for layer in self._executed:
            try:
                seen = executed if result is executed.result else replace(executed, result=result)
                result = await layer.on_executed(seen)
            except Exception:
                _failed(layer, "on_executed", executed.task.task_id)
        return result

    async def settled(self, settled: Settled) -> None:
        """Run every ``on_settled``."""
        for layer in self._settled:
            try:
                await layer.on_settled(settled)
            except Exception:
                _failed(layer, "on_settled", settled.outcome.task_id)


def _failed(layer: Middleware, hook: str, task_id: str | None) -> None:
    log.exception(
        "event=middleware.failed middleware=%s hook=%s task_id=%s",
        type(layer).__name__,
        hook,
        task_id,
    )
