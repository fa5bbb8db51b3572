"""Admission: when a delivery may start on a worker. Its capability's limits first (a rate, a
running cap: :mod:`~wayang_mq.runtime.limits`), then one of the worker's ``--concurrency``
slots, so a task waiting for its rate never holds a slot another capability needs.

The worker asks one question per delivery (``async with admission.admit(...)``); everything
about limits a worker must keep (checking them against what it serves, the fleet's shared
rates and their database, the limit metrics, the ``limit.waited`` line, turning waiters back
when it stops) lives here, so the worker daemon stays about deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING

from wayang_mq.core import logs
from wayang_mq.core.errors import ConfigError
from wayang_mq.runtime.executor import Executor
from wayang_mq.runtime.limits import CapabilityLimit, Limits

if TYPE_CHECKING:  # psycopg is imported only by a worker given --limits-db
    from wayang_mq.observability.metrics import WorkerMetrics
    from wayang_mq.runtime.sharedrate import SharedRates

log = logging.getLogger("wayang_mq.runtime.worker")


class Admission:
    """A worker's capability limits and its slots: a delivery takes its limit, then a slot."""

    def __init__(
        self,
        concurrency: int,
        limits: Mapping[str, CapabilityLimit],
        executors: Mapping[str, Executor],
        limits_db_url: str | None = None,
    ) -> None:
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._shared = _shared_rates(limits_db_url)
        self._limits = Limits(
            _checked(limits, executors),
            bucket=self._shared.bucket if self._shared is not None else None,
        )
        self._observe: dict[str, Callable[[float], None]] = {}

    def prefetch(self, capability: str) -> int | None:
        """The prefetch of a limited capability's own channel (what it may run soon: the rest
        waits in the queue), or None for an unlimited one (the worker's channel)."""
        limit = self._limits.limits.get(capability)
        return limit.prefetch(self.concurrency) if limit is not None else None

    def count(self, metrics: WorkerMetrics) -> None:
        """Count waits in the worker's metrics (the limited capabilities' series only)."""
        self._observe = metrics.limits(tuple(self._limits.limits), self._limits.waiting)

    async def open(self) -> None:
        """Reach the shared rates' database, if any (a worker that cannot does not start)."""
        if self._shared is not None:
            await self._shared.open()

    async def aclose(self) -> None:
        """Close the shared rates' database, if any."""
        if self._shared is not None:
            await self._shared.close()

    def close(self) -> None:
        """The worker stops: deliveries waiting for their limit stop waiting (their
        :meth:`admit` raises ``LimitsClosed``) and go back to their queue."""
        self._limits.close()

    @contextlib.asynccontextmanager
    async def admit(self, capability: str, task_id: str | None) -> AsyncIterator[None]:
        """Hold the capability's limit and a worker slot while the block runs."""
        async with self._limits.admit(capability, self._slots) as waited_s:
            self._waited(capability, task_id, waited_s)
            yield

    def _waited(self, capability: str, task_id: str | None, waited_s: float) -> None:
        """A delivery that waited for its capability's limit: the metric, a DEBUG line."""
        if capability not in self._limits.limits:
            return
        observe = self._observe.get(capability)
        if observe is not None:
            observe(waited_s)
        if waited_s >= 0.001:
            logs.event(
                log,
                "limit.waited",
                logging.DEBUG,
                task_id=task_id,
                capability=capability,
                waited_ms=round(waited_s * 1000, 1),
            )


def _shared_rates(database_url: str | None) -> SharedRates | None:
    if database_url is None:
        return None
    from wayang_mq.runtime.sharedrate import SharedRates

    return SharedRates(database_url)


def _checked(
    limits: Mapping[str, CapabilityLimit], executors: Mapping[str, Executor]
) -> Mapping[str, CapabilityLimit]:
    """The limits, each for a capability this worker serves and can hold to it."""
    for capability, limit in limits.items():
        executor = executors.get(capability)
        if executor is None:
            raise ConfigError(
                f"a limit names {capability!r}, which this worker does not serve "
                f"(it serves {', '.join(executors)})",
                hint="limit a capability of one of the worker's executors, e.g. "
                "--rate http.call=10/s",
            )
        if limit.max_running is not None and executor.long_running:
            # Accepted at start and acked, a long-running task frees its delivery at once;
            # waiting ones would be held unacked toward the broker's consumer_timeout.
            raise ConfigError(
                f"--max-running {capability}: its executor is long-running (accepted at "
                "start), which a running cap does not support yet",
                hint=f"use --rate {capability}=..., or run it on a worker of its own with "
                "--concurrency",
            )
    return limits
