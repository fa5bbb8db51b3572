"""A mixed load for a running fabric, to watch it: dashboards, ``wayang-mq top``, alerts.

Against the broker the CLI would use (``wayang-mq dev``'s, found through ``.wayang/``, or
``WAYANG_AMQP_URL`` and ``WAYANG_KEY_DIR``), for ``--minutes``, at about ``--rate`` tasks/s:
mostly ``demo.echo``; ``demo.sleep`` of 1-4 s (progress events, queue wait); ``demo.fail``
permanent (FAILED), retryable once then succeeding (a retry through the 1 s tier), and
retryable past its retries (a dead letter); a cancel of a sleeping task now and then; and a
burst every few minutes (a backlog that drains). Prints one progress line every 10 s.

    .venv/bin/python bench/mixed_load.py --minutes 10 --rate 40
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter

from wayang_mq.cli.common import dispatcher_config
from wayang_mq.client.dispatcher import Dispatcher, TaskHandle
from wayang_mq.config import Settings
from wayang_mq.core.model import RetryHints

RETRY_ONCE = RetryHints(max_attempts=2, initial_backoff_ms=1_000)


async def one(dispatcher: Dispatcher, rng: random.Random) -> TaskHandle:
    """Submit one task of the mix."""
    roll = rng.random()
    if roll < 0.80:
        return await dispatcher.submit("demo.echo", {"n": rng.randrange(1000)})
    if roll < 0.90:
        return await dispatcher.submit("demo.sleep", {"seconds": rng.choice([1, 2, 3, 4])})
    if roll < 0.94:
        return await dispatcher.submit("demo.fail", {"mode": "permanent"})
    if roll < 0.98:
        retried = {"mode": "retryable", "succeed_on_attempt": 2}
        return await dispatcher.submit("demo.fail", retried, retry=RETRY_ONCE)
    # retryable every time: exhausts its retries and is dead-lettered
    return await dispatcher.submit("demo.fail", {"mode": "retryable"}, retry=RETRY_ONCE)


async def run(minutes: float, rate: float, seed: int) -> None:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    pending: set[asyncio.Task[None]] = set()

    async def settle(handle: TaskHandle) -> None:
        result = await handle.result(120)
        code = result.error.code.value if result.error else ""
        counts[f"{result.status}{'/' + code if code else ''}"] += 1

    async with Dispatcher(dispatcher_config(Settings())) as dispatcher:
        started = time.monotonic()
        last_line = started
        while time.monotonic() - started < minutes * 60:
            minute = int((time.monotonic() - started) // 60)
            burst = minute % 4 == 3 and rng.random() < 0.05  # a backlog now and then
            for _ in range(200 if burst else 1):
                handle = await one(dispatcher, rng)
                counts["submitted"] += 1
                job = asyncio.create_task(settle(handle))
                pending.add(job)
                job.add_done_callback(pending.discard)
            if rng.random() < 0.01:
                victim = await dispatcher.submit("demo.sleep", {"seconds": 20})
                await asyncio.sleep(0.5)
                await dispatcher.cancel(victim.task_id, "mixed load: a cancel now and then")
                job = asyncio.create_task(settle(victim))
                pending.add(job)
                job.add_done_callback(pending.discard)
            await asyncio.sleep(rng.expovariate(rate))
            if time.monotonic() - last_line >= 10:
                last_line = time.monotonic()
                elapsed = last_line - started
                print(f"{elapsed:6.0f}s  in flight {len(pending):4d}  {dict(counts)}", flush=True)
        await asyncio.gather(*pending, return_exceptions=True)
    print(f"done: {dict(counts)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=40.0, help="tasks per second, about")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    asyncio.run(run(args.minutes, args.rate, args.seed))


if __name__ == "__main__":
    main()
