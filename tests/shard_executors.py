"""Executors for tests/test_shard_order.py, run in worker processes as a user runs them:
``wayang-mq worker tests.shard_executors:Ordered --shards 0``.

``Ordered`` answers with when it started and finished each task (wall clock, nanoseconds; every
worker process runs on the test's machine, so one clock) and which process ran it: the test
rebuilds each key's completion order, and whether tasks overlapped, from the results alone.
"""

from __future__ import annotations

import asyncio
import os
import time

from wayang_mq import Executor, Task
from wayang_mq.core.model import JsonLike

KEYORDER = "test.keyorder"


class Ordered(Executor):
    """``test.keyorder``: pauses ``pause_s`` (default 2 ms); answers its key, seq and times."""

    serves = (KEYORDER,)

    async def execute(self, task: Task) -> JsonLike:
        started = time.time_ns()
        await asyncio.sleep(float(str(task.input.get("pause_s", 0.002))))
        return {
            "key": task.partition_key,
            "seq": task.input["seq"],
            "started_ns": started,
            "finished_ns": time.time_ns(),
            "pid": os.getpid(),
        }
