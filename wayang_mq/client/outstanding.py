"""How many tasks a dispatcher may have outstanding: submitted, with no terminal result yet.

Each outstanding task costs the dispatcher memory until its answer comes (its Task, two
futures, its handle and trace: about 7 KB, measured by ``bench/backlog.py``), so a caller that
submits faster than the fleet answers would grow it without limit. :class:`Slots` is the gate:
a submit past the limit waits, first come first served, for an outstanding task to end, for a
bounded time, and is then refused (a typed ``TooManyOutstanding``, a ``Backpressure``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Slots:
    """A FIFO-fair counting gate: ``limit`` slots, taken by submits, given back when a task
    ends. Unlike ``asyncio.Semaphore``, a wait is bounded and a waiter that gives up (or is
    cancelled) after a slot was handed to it passes the slot on instead of losing it."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_outstanding must be at least 1, not {limit}")
        self.limit = limit
        self._taken = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def taken(self) -> int:
        """Slots held now (may exceed ``limit`` by the slots taken with :meth:`take_now`)."""
        return self._taken

    @property
    def waiting(self) -> int:
        """Submits waiting for a slot now."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    def take_now(self) -> None:
        """Take a slot without waiting, past the limit if need be: for a task that replaces
        one about to end (a compensation of an expired task), which must not wait on itself."""
        self._taken += 1

    async def take(self, wait_s: float) -> bool:
        """Take a slot, waiting up to ``wait_s`` behind earlier waiters; False if none freed."""
        if self._taken < self.limit and not self._waiters:
            self._taken += 1
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=max(0.0, wait_s))
        except BaseException:  # cancelled while waiting
            self._abandon(waiter)
            raise
        if waiter.done():
            return True
        self._abandon(waiter)
        return False

    def give_back(self) -> None:
        """A task ended (answered, expired, forgotten): its slot goes to the first waiter."""
        self._taken -= 1
        while self._waiters and self._taken < self.limit:
            waiter = self._waiters.popleft()
            if waiter.done():  # gave up or cancelled
                continue
            self._taken += 1
            waiter.set_result(None)

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        """A waiter stops waiting: a slot handed to it meanwhile is passed on, not lost."""
        if waiter.done() and not waiter.cancelled():
            self.give_back()
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
