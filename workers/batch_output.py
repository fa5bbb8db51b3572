"""A ``batch.run`` command's output: its streams read line by line as they come.

``::progress 0.4 compiling`` lines become progress events (at most one per interval, the
latest wins); the other lines the result's logs (``stdout: ...``), up to a cap per stream,
then one line that says how much was dropped; the last few KiB of each stream are kept for
the output. Nothing here knows processes: it reads the pipes it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import deque

from wayang_mq.core.fields import printable
from wayang_mq.runtime.context import TaskContext

__all__ = ["MAX_LINE_BYTES", "Output", "Stream", "ThrottledProgress", "parse_progress"]

#: a longer line is cut into pieces of this size (a process that never writes a newline
#: must not make the worker buffer its whole output)
MAX_LINE_BYTES = 8192
_READ_BYTES = 65536
#: the fraction word of a progress line: a decimal number from 0 to 1
_FRACTION = re.compile(r"(?:0|1)(?:\.[0-9]*)?|\.[0-9]+")


def parse_progress(text: str, prefix: str) -> tuple[float | None, str] | None:
    """A progress line as ``(fraction, message)``, or None when ``text`` is not one.

    Grammar: ``PREFIX [FRACTION] [MESSAGE]``: the first word after the prefix is the
    fraction when it is a decimal number from 0 to 1 (``0``, ``0.4``, ``.5``, ``1.0``);
    otherwise there is no fraction and the whole rest is the message.
    ``::progress 0.4 compiling`` → (0.4, "compiling"); ``::progress linking`` → (None,
    "linking"); ``::progress 40 files`` → (None, "40 files")."""
    if not text.startswith(prefix):
        return None
    rest = text[len(prefix) :].strip()
    word, _, message = rest.partition(" ")
    if _FRACTION.fullmatch(word):
        fraction = float(word)
        if fraction <= 1.0:
            return fraction, message.strip()
    return None, rest


class Stream:
    """One output stream: lines to the result's logs up to the cap, the tail, the counts."""

    def __init__(self, name: str, cap: int, tail_bytes: int) -> None:
        self.name = name
        self.cap = cap
        self.total = 0  # bytes read
        self.logged = 0  # bytes of lines logged
        self.dropped = 0  # bytes of lines past the cap
        self._tail: deque[str] = deque()
        self._tail_size = 0
        self._tail_bytes = tail_bytes

    def line(self, ctx: TaskContext, raw: bytes, text: str) -> None:
        """A line that is not progress: logged (if under the cap), kept in the tail."""
        size = len(raw)
        if not self.dropped and self.logged + size <= self.cap:
            self.logged += size
            ctx.log(f"{self.name}: {printable(text.expandtabs(4), MAX_LINE_BYTES)}")
        else:  # the logs are the stream's beginning: once a line is dropped, so is the rest
            self.dropped += size
        self._keep(text)

    def _keep(self, text: str) -> None:
        if self._tail_bytes == 0:
            return
        self._tail.append(text)
        self._tail_size += len(text) + 1
        while self._tail_size > self._tail_bytes and len(self._tail) > 1:
            self._tail_size -= len(self._tail.popleft()) + 1

    def finish(self, ctx: TaskContext) -> None:
        """Say what the cap dropped, once."""
        if self.dropped:
            ctx.log(f"{self.name}: … output truncated ({self.dropped} bytes dropped)")

    def tail(self) -> str:
        """The last lines, at most ``tail_bytes`` characters."""
        text = "\n".join(self._tail)
        return text[-self._tail_bytes :] if self._tail_bytes else ""


class ThrottledProgress:
    """Progress lines as events, at most one per interval: the latest line wins, and the
    last one is sent when the interval is over (or the command ends)."""

    def __init__(self, ctx: TaskContext, interval_s: float) -> None:
        self._ctx = ctx
        self._interval_s = interval_s
        self._sent_at = -math.inf
        self._pending: tuple[float | None, str] | None = None
        self._timer: asyncio.Task[None] | None = None

    async def offer(self, fraction: float | None, message: str) -> None:
        """Send a progress line now, or keep it for when the interval is over."""
        wait_s = self._sent_at + self._interval_s - time.monotonic()
        if wait_s <= 0:
            await self._send(fraction, message)
            return
        self._pending = (fraction, message)
        if self._timer is None:
            self._timer = asyncio.create_task(self._later(wait_s))

    async def _later(self, wait_s: float) -> None:
        await asyncio.sleep(wait_s)
        self._timer = None
        await self.flush()

    async def _send(self, fraction: float | None, message: str) -> None:
        self._sent_at = time.monotonic()
        await self._ctx.progress(fraction, printable(message))

    async def flush(self) -> None:
        """Send the progress kept back, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await self._send(*pending)

    async def close(self) -> None:
        """Stop the timer, then send what it would have."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        await self.flush()


class Output:
    """A run's output: stdout and stderr, each capped, and the progress lines in them."""

    def __init__(
        self, ctx: TaskContext, cap: int, tail_bytes: int, prefix: str, progress_s: float
    ) -> None:
        self.ctx = ctx
        self.prefix = prefix
        self.stdout = Stream("stdout", cap, tail_bytes)
        self.stderr = Stream("stderr", cap, tail_bytes)
        self.progress = ThrottledProgress(ctx, progress_s)

    async def pump(self, reader: asyncio.StreamReader, stream: Stream) -> None:
        """Read a stream to its end, line by line (lines longer than MAX_LINE_BYTES cut)."""
        pending = b""
        while chunk := await reader.read(_READ_BYTES):
            stream.total += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                await self._line(raw, stream)
            while len(pending) > MAX_LINE_BYTES:
                await self._line(pending[:MAX_LINE_BYTES], stream)
                pending = pending[MAX_LINE_BYTES:]
        if pending:
            await self._line(pending, stream)

    async def _line(self, raw: bytes, stream: Stream) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        progress = parse_progress(text, self.prefix)
        if progress is None:
            stream.line(self.ctx, raw + b"\n", text)
        else:
            await self.progress.offer(*progress)

    async def close(self) -> None:
        """Send the progress kept back (the command has ended or is stopped)."""
        await self.progress.close()

    def finish(self) -> None:
        """Say, per stream, what the cap dropped."""
        self.stdout.finish(self.ctx)
        self.stderr.finish(self.ctx)

    @property
    def truncated(self) -> bool:
        """Whether either stream's logs were cut at the cap."""
        return bool(self.stdout.dropped or self.stderr.dropped)
