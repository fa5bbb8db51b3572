"""Demo executors: they serve the README's quick start, the tests and the benchmarks.

Run them with ``wayang-mq worker wayang_workers.demo:Echo wayang_workers.demo:Sleep
wayang_workers.demo:Fail`` (this folder installs as the package ``wayang_workers``).
"""

from __future__ import annotations

import asyncio
import math
import os

from wayang_mq import ErrorCode, Executor, ExecutorError, Task, current
from wayang_mq.core.model import JsonLike


class Echo(Executor):
    """``demo.echo``: returns its input unchanged."""

    serves = ("demo.echo",)

    async def execute(self, task: Task) -> JsonLike:
        return task.input


class Sleep(Executor):
    """``demo.sleep``: sleeps ``seconds`` (default 1), reporting progress each second.

    Cancellation needs no code here: a cancel interrupts the ``await``.
    """

    serves = ("demo.sleep",)

    async def execute(self, task: Task) -> JsonLike:
        seconds = _number(task, "seconds", 1.0)
        ctx = current()
        whole = math.floor(seconds)
        for second in range(whole):
            await ctx.progress(second / seconds, f"slept {second} of {seconds:g}s")
            ctx.heartbeat(slept_s=second)
            await asyncio.sleep(1)
        await asyncio.sleep(seconds - whole)
        await ctx.progress(1.0, "done")
        return {"slept_s": seconds}


class LongSleep(Sleep):
    """``demo.sleep`` as a long-running executor: accepted at start (PENDING published, the
    delivery acked), so it may sleep past the broker's ``consumer_timeout``; its answer is
    published when it wakes. Give its tasks a heartbeat timeout so a worker death is noticed.
    """

    long_running = True


class Fail(Executor):
    """``demo.fail``: fails as asked, for testing failure handling.

    Input: ``mode`` = ``retryable`` (default) | ``permanent`` | ``crash`` (the process dies
    with ``os._exit``, a poison task); ``succeed_on_attempt`` = N makes attempts before N fail
    and attempt N succeed; ``message`` is the error text.
    """

    serves = ("demo.fail",)

    async def execute(self, task: Task) -> JsonLike:
        succeed_on = task.input.get("succeed_on_attempt")
        if isinstance(succeed_on, int) and task.attempt >= succeed_on:
            return {"succeeded_on_attempt": task.attempt}
        mode = task.input.get("mode", "retryable")
        message = str(task.input.get("message", f"demo.fail asked to fail ({mode})"))
        if mode == "crash":
            os._exit(70)
        if mode not in ("retryable", "permanent"):
            raise ExecutorError(
                f"unknown mode {mode!r}: use retryable, permanent or crash",
                retryable=False,
                code=ErrorCode.INVALID_TASK,
            )
        raise ExecutorError(message, retryable=mode == "retryable")


def _number(task: Task, key: str, default: float) -> float:
    value = task.input.get(key, default)
    if not isinstance(value, int | float) or value < 0:
        raise ExecutorError(
            f"input {key!r} must be a non-negative number",
            retryable=False,
            code=ErrorCode.INVALID_TASK,
        )
    return float(value)
