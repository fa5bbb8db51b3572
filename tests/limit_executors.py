"""Executors for tests/test_limits.py.

``Fetch`` serves ``http.call`` (a stand-in until the real ``wayang_workers.http_call`` is
merged): it GETs ``task.input["url"]`` and answers with the status. Run it as
``wayang-mq worker tests.limit_executors:Fetch --rate http.call=20/s``.
``Tally`` serves ``demo.sleep`` in-process and records how many of its tasks run at once.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from wayang_mq import Executor, Task
from wayang_mq.core.model import JsonLike


class Fetch(Executor):
    """``http.call``: ``GET input.url``; answers ``{"status": N}``."""

    serves = ("http.call",)

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def setup(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def teardown(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def execute(self, task: Task) -> JsonLike:
        assert self._session is not None
        async with self._session.get(str(task.input["url"])) as response:
            return {"status": response.status}


class Tally(Executor):
    """``demo.sleep``: sleeps ``seconds``; records each run's start and end, and the most
    that ran at once."""

    serves = ("demo.sleep",)

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.spans: list[tuple[float, float]] = []

    async def execute(self, task: Task) -> JsonLike:
        started = time.monotonic()
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(float(str(task.input.get("seconds", 0.5))))
        finally:
            self.running -= 1
            self.spans.append((started, time.monotonic()))
        return {"started": started}


class ShardTally(Tally):
    """``db.query`` (sharded over 4 queues in the default topology), counted like Tally."""

    serves = ("db.query",)


class Stamp(Executor):
    """``demo.echo``: records when each of its tasks started; answers its input."""

    serves = ("demo.echo",)

    def __init__(self) -> None:
        self.starts: list[float] = []

    async def execute(self, task: Task) -> JsonLike:
        self.starts.append(time.monotonic())
        return task.input
