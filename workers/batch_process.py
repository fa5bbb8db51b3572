"""A ``batch.run`` command's process: started in a process group of its own, waited for, and
its whole group stopped.

``start_new_session`` puts the command and every child it starts in one group, so a timeout,
a cancel or the worker's shutdown stops them all: SIGTERM to the group, SIGKILL after the
kill grace. Whatever the command leaves running in its group when it exits is stopped the
same way (a child that leaves the group with ``setsid`` is not: only a cgroup or a container
can hold those). Zombies do not count as running: in a container nobody may reap them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from wayang_mq import ErrorCode, ExecutorError
from wayang_mq.core import logs
from wayang_mq.core.model import JsonLike
from wayang_mq.runtime.context import TaskContext

from .batch_command import Command
from .batch_output import Output

# the executor's logger: batch.started and batch.finished are its lines, wherever the code is
log = logging.getLogger("wayang_workers.batch_run")

__all__ = ["CommandRun", "group_running", "signal_group", "stop_group"]

#: how long the output is read after the command's group is gone (a child that escaped the
#: group with setsid may still hold the pipe: it is not waited for)
_DRAIN_S = 2.0
#: how long a group sent SIGKILL is waited for (a process in uninterruptible sleep dies late)
_KILLED_WAIT_S = 5.0
_POLL_S = 0.02
#: how often a command's exit is checked while its output pipes are still open
_EXIT_POLL_S = 0.05


class CommandRun:
    """A command's process: started, read, waited for, its group stopped."""

    def __init__(
        self, command: Command, ctx: TaskContext, tail_bytes: int, progress_s: float
    ) -> None:
        self.command = command
        self.ctx = ctx
        self.output = Output(
            ctx, command.max_output_bytes, tail_bytes, command.progress_prefix, progress_s
        )
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.ended = 0.0

    async def spawn(
        self, argv: list[str], cwd: Path, with_stdin: bool
    ) -> asyncio.subprocess.Process:
        """Start the process in a new session (its own process group); ``spawn_failed``."""
        self.started = time.monotonic()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if with_stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=self.command.env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ExecutorError(
                f"command {self.command.name!r} could not start: {exc.strerror or exc}; "
                "check its argv and cwd settings on the worker",
                code=ErrorCode.EXECUTOR_ERROR,
                retryable=False,
                details={"reason": "spawn_failed"},
            ) from None
        logs.event(  # DEBUG: batch.finished is this executor's INFO line
            log,
            "batch.started",
            logging.DEBUG,
            command=self.command.name,
            pid=self.process.pid,
            cwd=str(cwd),
        )
        return self.process

    async def wait(self, stdin: bytes | None, timeout_s: float) -> bool:
        """Until the command ends (True: it ran out of time) and its group is gone. A cancel
        stops the group the same way, waits for it, and goes on."""
        process = self.process
        assert process is not None and process.stdout is not None and process.stderr is not None
        output = self.output
        helpers = [
            asyncio.create_task(output.pump(process.stdout, output.stdout)),
            asyncio.create_task(output.pump(process.stderr, output.stderr)),
        ]
        if stdin is not None:
            helpers.append(asyncio.create_task(_feed(process, stdin)))
        timed_out = False
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    await _exited(process)
            except TimeoutError:
                timed_out = True
            # the command ended or ran out of time: what is left in its group goes too
            await self._stop()
            await _drain(helpers, _DRAIN_S)
        except BaseException:  # a cancel or the worker's shutdown: no orphans, then go on
            await self._stop()
            raise
        finally:
            await _cancel(helpers)
            await output.close()
        output.finish()
        return timed_out

    async def _stop(self) -> None:
        process = self.process
        assert process is not None
        await stop_group(process.pid, self.command.kill_grace_s)
        with contextlib.suppress(ProcessLookupError):
            process.kill()  # the leader, should it have left its own group
        await _exited(process)
        if not self.ended:
            self.ended = time.monotonic()
            logs.event(
                log,
                "batch.finished",
                command=self.command.name,
                pid=process.pid,
                returncode=process.returncode,
                duration_ms=round((self.ended - self.started) * 1000),
            )

    def summary(self) -> dict[str, JsonLike]:
        """What the output says of the run (and an error's details)."""
        process = self.process
        assert process is not None and process.returncode is not None
        code = process.returncode
        output = self.output
        return {
            "command": self.command.name,
            "exit_code": code if code >= 0 else None,
            "signal": _signal_name(-code) if code < 0 else None,
            "duration_ms": round((self.ended - self.started) * 1000, 3),
            "stdout_bytes": output.stdout.total,
            "stderr_bytes": output.stderr.total,
            "truncated": output.truncated,
            "stdout_tail": output.stdout.tail(),
            "stderr_tail": output.stderr.tail(),
        }


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def _exited(process: asyncio.subprocess.Process) -> None:
    """Until the process has exited. Not ``process.wait()`` alone: it also waits for the
    pipes to close, which a child holds open as long as it runs (or, escaped from the group
    with setsid, forever)."""
    waiting = asyncio.ensure_future(process.wait())
    try:
        while process.returncode is None:
            await asyncio.wait({waiting}, timeout=_EXIT_POLL_S)
    finally:
        waiting.cancel()


async def _feed(process: asyncio.subprocess.Process, data: bytes) -> None:
    """Write the task's stdin and close it (a command that does not read it is no error)."""
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(data)
        await process.stdin.drain()
    process.stdin.close()


async def _drain(helpers: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Let the readers reach the end of the output (the pipes close with the group)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*helpers)


async def _cancel(helpers: list[asyncio.Task[None]]) -> None:
    for helper in helpers:
        helper.cancel()
    await asyncio.gather(*helpers, return_exceptions=True)


# -- process groups -------------------------------------------------------------------------------


async def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM every process of group ``pgid``, SIGKILL those left after ``grace_s``, and wait
    until none runs. A cancel while it waits sends SIGKILL at once."""
    if not group_running(pgid):
        return
    signal_group(pgid, signal.SIGTERM)
    try:
        deadline = time.monotonic() + grace_s
        while group_running(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
    finally:
        if group_running(pgid):
            signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + _KILLED_WAIT_S
    while group_running(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_S)


def signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to group ``pgid``; a group already gone (or not ours) is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def group_running(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs. Zombies do not count: an orphan is
    reaped by init, which in a container may never do it."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return True  # no /proc: the group exists, zombies or not
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # after the command name (in parentheses, which may hold anything): state ppid pgrp
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False
