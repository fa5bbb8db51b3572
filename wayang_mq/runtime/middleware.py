"""Middleware: cross-cutting concerns as layers around a delivery, not branches in the worker.

A worker runs its middleware at three points of every delivery (dramatiq's middleware and
Temporal's interceptors are the models):

- ``on_opened``: the task passed size, signature, schema, deadline and capability checks;
- ``on_executed``: the executor finished (or was answered without running); a hook may
  return a changed result, which the next hook and the rest of the pipeline see;
- ``on_settled``: the delivery's :class:`~wayang_mq.amqp.outcome.Outcome` was carried out (every
  delivery ends here exactly once: done, retry, dead letter, requeue, reject).

Each hook takes one frozen input object, so a hook can gain fields without breaking the ones
written against it. Hooks run in the order given; the default of each does nothing. A hook
that raises is logged and skipped: a metrics bug must not fail a task. Task records, envelope
checks, metrics, tracing and secrets are meant to plug in here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wayang_mq.core.model import Result, Task

if TYPE_CHECKING:  # executor code imports this module: keep AMQP out of its import
    from wayang_mq.amqp.outcome import Outcome

log = logging.getLogger("wayang_mq.runtime.middleware")


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


@dataclass(frozen=True, slots=True)
class Settled:
    """A delivery's outcome, carried out (``outcome.result`` is the answer it published)."""

    executor_id: str
    capability: str
    outcome: Outcome


class Middleware:
    """Base of middleware: override the hooks you need."""

    async def on_opened(self, opened: Opened) -> None:
        """The task passed its checks."""

    async def on_executed(self, executed: Executed) -> Result:
        """The task's result; return it, or a changed one."""
        return executed.result

    async def on_settled(self, settled: Settled) -> None:
        """The delivery's outcome was carried out."""


class Chain:
    """The worker's middleware, run in order; a hook that raises is logged and skipped."""

    def __init__(self, middleware: Sequence[Middleware]) -> None:
        self._middleware = tuple(middleware)

    async def opened(self, opened: Opened) -> None:
        """Run every ``on_opened``."""
        for layer in self._middleware:
            try:
                await layer.on_opened(opened)
            except Exception:
                _failed(layer, "on_opened", opened.task.task_id)

    async def executed(self, executed: Executed) -> Result:
        """Run every ``on_executed``; each sees the result the one before returned."""
        result = executed.result
        for layer in self._middleware:
            try:
                result = await layer.on_executed(
                    Executed(executed.executor_id, executed.task, result)
                )
            except Exception:
                _failed(layer, "on_executed", executed.task.task_id)
        return result

    async def settled(self, settled: Settled) -> None:
        """Run every ``on_settled``."""
        for layer in self._middleware:
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
