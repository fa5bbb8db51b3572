"""Micro-benchmark of the CPU meter around an executor's coroutine (wayang_mq.observability.usage):
what awaiting an executor costs with the meter and without, for an executor that returns at once
and for one that awaits 10 and 100 times (each await that suspends is one more metered step).

Run: .venv/bin/python bench/usage_meter.py. Numbers are microseconds per executor call on this
machine (best of 5), and the ratio metered / plain; see docs/observability.md "Usage".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from wayang_mq.observability.usage import Usage

CALLS = 20_000


async def executor(steps: int) -> int:
    """An executor that suspends ``steps`` times (``sleep(0)`` yields to the loop once)."""
    for _ in range(steps):
        await asyncio.sleep(0)
    return steps


async def _time(call: Callable[[], Awaitable[int]], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - started) / calls * 1e6


async def measure(steps: int, calls: int) -> tuple[float, float]:
    """Best-of-5 microseconds per call, plain and metered."""
    usage = Usage()
    plain = min([await _time(lambda: executor(steps), calls) for _ in range(5)])
    metered = min([await _time(lambda: usage.metered(executor(steps)), calls) for _ in range(5)])
    return plain, metered


async def main() -> None:
    print(f"{'executor':<22} {'plain µs':>9} {'metered µs':>11} {'ratio':>6} {'µs/step':>8}")
    for steps in (0, 10, 100):
        calls = CALLS if steps < 100 else CALLS // 10
        plain, metered = await measure(steps, calls)
        per_step = (metered - plain) / (steps + 1)
        name = "returns at once" if steps == 0 else f"awaits {steps} times"
        print(f"{name:<22} {plain:9.2f} {metered:11.2f} {metered / plain:6.2f} {per_step:8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
