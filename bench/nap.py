"""An I/O-bound executor for the scaling bench and test: it waits, and does nothing else.

``demo.sleep`` (``wayang_workers.demo:Sleep``) publishes a progress event per task, which is
broker and CPU work a pure wait should not carry; ``Nap`` serves the same capability (it is in
the default topology) and only awaits ``asyncio.sleep``, as a task waiting on a remote API does.
"""

from __future__ import annotations

import asyncio

from wayang_mq import Executor, Task
from wayang_mq.core.model import JsonLike

CAPABILITY = "demo.sleep"


class Nap(Executor):
    """``demo.sleep`` without progress events: sleeps ``seconds`` (default 0.02)."""

    serves = (CAPABILITY,)

    async def execute(self, task: Task) -> JsonLike:
        value = task.input.get("seconds", 0.02)
        seconds = float(value) if isinstance(value, int | float) else 0.02
        await asyncio.sleep(seconds)
        return {"slept_s": seconds}
