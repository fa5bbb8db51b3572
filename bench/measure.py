"""The two measurements, the same for every system: windowed throughput, sequential latency."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

#: 100 bytes of padding: every task is ``{"n": i, "pad": PAD}``, about 110 bytes of input
PAD = "x" * 100
PROGRESS_INTERVAL_S = 2.0


def payload(index: int) -> dict[str, Any]:
    """The input of task number ``index``."""
    return {"n": index, "pad": PAD}


@dataclass(frozen=True)
class Throughput:
    """``tasks`` round trips, from the first submit to the last result."""

    tasks: int
    window: int
    seconds: float

    @property
    def per_s(self) -> float:
        """Completed tasks per second."""
        return self.tasks / self.seconds


@dataclass(frozen=True)
class Drain:
    """The worker alone: ``tasks`` queued before it started, first result to last result."""

    tasks: int
    seconds: float

    @property
    def per_s(self) -> float:
        """Results per second while the worker emptied its queue."""
        return (self.tasks - 1) / self.seconds

    @classmethod
    def of(cls, arrivals: list[float]) -> Drain:
        """From the results' arrival times (``time.perf_counter``)."""
        return cls(len(arrivals), max(arrivals) - min(arrivals))


@dataclass(frozen=True)
class Latency:
    """Sequential round trips (one outstanding task), in milliseconds."""

    samples: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        """Summarise round-trip times given in seconds."""
        ordered = sorted(s * 1000 for s in seconds)
        return cls(
            samples=len(ordered),
            p50_ms=percentile(ordered, 50),
            p90_ms=percentile(ordered, 90),
            p99_ms=percentile(ordered, 99),
            mean_ms=sum(ordered) / len(ordered),
            max_ms=ordered[-1],
        )


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


class Cancelled(Exception):
    """The measurement was interrupted (Ctrl-C or SIGTERM)."""


class Progress:
    """Prints ``==> <label>: done/total (rate/s)`` every couple of seconds while work runs."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.cancelled = False
        self.held = False  # True while a queue is being filled: nothing to report yet
        self._started = time.perf_counter()

    def tick(self) -> None:
        """One more task finished (called from a worker thread for Celery).

        Raises once the run was cancelled, which is how a blocking client's thread learns
        to stop early instead of finishing its loop after an interrupt.
        """
        if self.cancelled:
            raise Cancelled(self.label)
        self.done += 1

    def restart(self) -> None:
        """Count the rate from now (the queue is filled, the worker starts)."""
        self._started = time.perf_counter()
        self.held = False

    def line(self) -> str:
        """The current progress line."""
        elapsed = time.perf_counter() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return f"==> {self.label}: {self.done}/{self.total} ({rate:,.0f}/s, {elapsed:.1f}s)"

    async def report(self) -> None:
        """Print a line every interval until cancelled (not before ``restart`` if held)."""
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            if not self.held:
                print(self.line(), flush=True)


async def _with_progress(progress: Progress, work: Awaitable[None]) -> float:
    """Run ``work`` while reporting; the wall time it took."""
    reporter = asyncio.create_task(progress.report())
    started = time.perf_counter()
    try:
        await work
    except asyncio.CancelledError:
        progress.cancelled = True  # a thread still running the work stops at its next tick
        raise
    finally:
        reporter.cancel()
    elapsed = time.perf_counter() - started
    print(progress.line(), flush=True)
    return elapsed


async def throughput_async(
    roundtrip: Callable[[dict[str, Any]], Awaitable[None]],
    label: str,
    count: int,
    window: int,
) -> Throughput:
    """``count`` round trips by ``window`` concurrent lanes: a closed loop, never more in flight."""
    progress = Progress(label, count)
    next_index = iter(range(count))

    async def lane() -> None:
        for index in next_index:  # the lanes share one iterator: each index is taken once
            await roundtrip(payload(index))
            progress.tick()

    lanes = min(window, count)
    seconds = await _with_progress(progress, _gather(lane() for _ in range(lanes)))
    return Throughput(count, lanes, seconds)


async def _gather(coroutines: Any) -> None:
    await asyncio.gather(*coroutines)


async def throughput_threaded(
    run_window: Callable[[Callable[[int], dict[str, Any]], int, int, Callable[[], None]], None],
    label: str,
    count: int,
    window: int,
) -> Throughput:
    """The same for a blocking client that keeps its own window (Celery), run in a thread."""
    progress = Progress(label, count)
    work = asyncio.to_thread(run_window, payload, count, window, progress.tick)
    seconds = await _with_progress(progress, work)
    return Throughput(count, window, seconds)


async def drain_async(
    submit: Callable[[dict[str, Any]], Awaitable[asyncio.Future[None]]],
    start_worker: Callable[[], None],
    label: str,
    count: int,
    window: int,
) -> Drain:
    """Queue ``count`` tasks (confirmed) with no worker running, then start it and time it."""
    futures: list[asyncio.Future[None]] = []
    next_index = iter(range(count))

    async def lane() -> None:
        for index in next_index:
            futures.append(await submit(payload(index)))

    await _gather(lane() for _ in range(min(window, count)))
    print(f"==> {label}: {count} tasks queued", flush=True)
    progress = Progress(label, count)
    arrivals: list[float] = []

    def arrived(_: asyncio.Future[None]) -> None:
        arrivals.append(time.perf_counter())
        progress.tick()

    for future in futures:
        future.add_done_callback(arrived)
    start_worker()
    await _with_progress(progress, _gather(futures))
    return Drain.of(arrivals)


async def drain_threaded(
    run_drain: Callable[
        [Callable[[int], dict[str, Any]], int, Callable[[], None], Callable[[], None]],
        list[float],
    ],
    start_worker: Callable[[], None],
    label: str,
    count: int,
) -> Drain:
    """The same for a blocking client (Celery), which queues and collects in a thread."""
    progress = Progress(label, count)
    progress.held = True
    arrivals: list[float] = []

    def start() -> None:
        print(f"==> {label}: {count} tasks queued", flush=True)
        progress.restart()
        start_worker()

    async def work() -> None:
        arrivals.extend(await asyncio.to_thread(run_drain, payload, count, start, progress.tick))

    await _with_progress(progress, work())
    return Drain.of(arrivals)


async def latency_async(
    roundtrip: Callable[[dict[str, Any]], Awaitable[None]], label: str, samples: int
) -> list[float]:
    """``samples`` round trips one after the other; their times in seconds."""
    progress = Progress(label, samples)
    times: list[float] = []

    async def run() -> None:
        for index in range(samples):
            started = time.perf_counter()
            await roundtrip(payload(index))
            times.append(time.perf_counter() - started)
            progress.tick()

    await _with_progress(progress, run())
    return times


async def latency_threaded(
    roundtrip: Callable[[dict[str, Any]], None], label: str, samples: int
) -> list[float]:
    """The same for a blocking client, run in a thread."""
    progress = Progress(label, samples)
    times: list[float] = []

    def run() -> None:
        for index in range(samples):
            started = time.perf_counter()
            roundtrip(payload(index))
            times.append(time.perf_counter() - started)
            progress.tick()

    await _with_progress(progress, asyncio.to_thread(run))
    return times
