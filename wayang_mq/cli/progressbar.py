"""The progress bar ``wayang-mq submit --wait`` draws on a terminal, fed by the task's progress
events (``TaskHandle.progress()``). It goes to stderr, so the result JSON on stdout stays
exactly what a script would read; a task that reports no fraction shows a moving,
indeterminate bar with its elapsed time."""

from __future__ import annotations

import asyncio
import contextlib

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from wayang_mq.client.replies import TaskHandle
from wayang_mq.core.model import Result

#: characters of an executor's progress message shown beside the bar
MESSAGE_CHARS = 60


async def result_with_bar(handle: TaskHandle, timeout_s: float) -> Result:
    """Await the task's result while a bar on stderr follows its progress events."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        # executor-written text: shown as it is, never read as markup
        TextColumn("{task.fields[message]}", markup=False),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        row = bar.add_task(
            f"{handle.task.capability} {handle.task_id[:12]}", total=None, message="queued"
        )
        feeding = asyncio.create_task(_follow(handle, bar, row))
        try:
            result = await handle.result(timeout_s)
        finally:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
        ended = result.status if result.error is None else f"{result.status} {result.error.code}"
        if result.status == "SUCCESS":
            bar.update(row, total=1.0, completed=1.0, message=ended)
        else:
            bar.update(row, message=ended)
        bar.stop_task(row)
    return result


async def _follow(handle: TaskHandle, bar: Progress, row: TaskID) -> None:
    async for event in handle.progress():
        message = " ".join(event.message.split())[:MESSAGE_CHARS] or "running"
        if event.fraction is None:
            bar.update(row, message=message)
        else:
            bar.update(row, total=1.0, completed=event.fraction, message=message)
