"""``batch.run``: a command the worker's operator allowed, run on the worker's machine.

A task names a command configured in the worker's settings (``[batch.run.commands.NAME]``)
and gives its arguments; it never gives a program, a shell line or an environment. The
command runs with ``asyncio.create_subprocess_exec`` (no shell, the arguments as a list) in a
process group of its own (``start_new_session``), so a timeout, a cancel or the worker's
shutdown stops it and every child it started: SIGTERM to the group, SIGKILL after
``kill_grace_s``. Whatever the command leaves running in its group when it exits is stopped
the same way: nothing outlives its task (a child that leaves the group with ``setsid`` does;
only a cgroup or a container can hold those).

Its output streams are read line by line as they come: ``::progress 0.4 compiling`` lines
become progress events, the other lines the result's logs (``stdout: ...``), capped per
stream; the last few KiB of each are in the output. The contract is in docs/executors.md.

    wayang-mq worker wayang_workers.batch_run:BatchRun --config worker.toml --secrets env
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wayang_mq import ErrorCode, Executor, ExecutorError, Task, current
from wayang_mq.core import logs
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.fields import printable
from wayang_mq.core.model import JsonLike
from wayang_mq.runtime.context import TaskContext
from wayang_mq.runtime.settings import SecretRef, parse_input

log = logging.getLogger("wayang_workers.batch_run")

__all__ = ["BatchInput", "BatchRun", "BatchRunSettings", "CommandSettings", "parse_progress"]

#: a command's name, as a task gives it and a TOML table key holds it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: a longer line is cut into pieces of this size (a process that never writes a newline
#: must not make the worker buffer its whole output)
MAX_LINE_BYTES = 8192
_READ_BYTES = 65536
#: how long the output is read after the command's group is gone (a child that escaped the
#: group with setsid may still hold the pipe: it is not waited for)
_DRAIN_S = 2.0
#: how long a group sent SIGKILL is waited for (a process in uninterruptible sleep dies late)
_KILLED_WAIT_S = 5.0
_POLL_S = 0.02
#: how long before a task's own execution timeout a command must be stopped, besides its
#: kill grace (to publish a result that says why)
_TASK_MARGIN_S = 0.5
#: how often a command's exit is checked while its output pipes are still open
_EXIT_POLL_S = 0.05
#: the fraction word of a progress line: a decimal number from 0 to 1
_FRACTION = re.compile(r"(?:0|1)(?:\.[0-9]*)?|\.[0-9]+")


class CommandSettings(BaseModel):
    """``[batch.run.commands.NAME]``: one command a task may run. Unset limits take the
    table's ``[batch.run]`` defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the program (an absolute path) and its fixed leading arguments
    argv: list[str] = Field(min_length=1)
    #: the working directory (absolute); or ``workdir_root``: tasks pick a subdirectory
    cwd: str | None = None
    workdir_root: str | None = None
    #: extra environment variables (values may be secret references)
    env: dict[str, str | SecretRef] = Field(default_factory=dict)
    #: a regex every task argument must match in full (default: printable, no NUL)
    args_pattern: str | None = None
    max_args: int | None = Field(default=None, ge=0)
    max_arg_bytes: int | None = Field(default=None, ge=1)
    max_stdin_bytes: int | None = Field(default=None, ge=0)
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    kill_grace_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_output_bytes: int | None = Field(default=None, ge=0)
    progress_prefix: str | None = Field(default=None, min_length=1)
    #: a non-zero exit fails the task (``exit_status``); false: SUCCESS with its exit_code
    fail_on_nonzero: bool = True
    #: exit codes after which the failure is retryable (the task's retry policy applies)
    retry_exit_codes: list[int] = Field(default_factory=list)

    @field_validator("argv")
    @classmethod
    def _absolute_program(cls, argv: list[str]) -> list[str]:
        if not os.path.isabs(argv[0]):
            raise ValueError("argv[0] must be an absolute path (no PATH lookup)")
        if any("\x00" in arg for arg in argv):
            raise ValueError("argv must not contain NUL")
        return argv

    @field_validator("cwd", "workdir_root")
    @classmethod
    def _absolute_dir(cls, path: str | None) -> str | None:
        if path is not None and not os.path.isabs(path):
            raise ValueError("must be an absolute path")
        return path

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str | SecretRef]) -> dict[str, str | SecretRef]:
        for name in env:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return env

    @field_validator("args_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regex: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _one_directory(self) -> CommandSettings:
        if (self.cwd is None) == (self.workdir_root is None):
            raise ValueError("set exactly one of cwd and workdir_root")
        return self


class BatchRunSettings(BaseModel):
    """``[batch.run]``: the commands tasks may run, and the defaults of their limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    commands: dict[str, CommandSettings] = Field(default_factory=dict)
    default_timeout_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    kill_grace_s: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    max_output_bytes: int = Field(default=64 * 1024, ge=0)
    tail_bytes: int = Field(default=4096, ge=0)
    max_args: int = Field(default=64, ge=0)
    max_arg_bytes: int = Field(default=4096, ge=1)
    max_stdin_bytes: int = Field(default=1024 * 1024, ge=0)
    progress_prefix: str = Field(default="::progress ", min_length=1)
    #: at most one progress event per this interval (the latest line wins); 0: every line
    progress_interval_s: float = Field(default=0.1, ge=0, allow_inf_nan=False)
    #: the children's PATH, LANG and HOME (HOME unset: the worker's own)
    path: str = "/usr/local/bin:/usr/bin:/bin"
    lang: str = "C.UTF-8"
    home: str | None = None

    @field_validator("commands")
    @classmethod
    def _names(cls, commands: dict[str, CommandSettings]) -> dict[str, CommandSettings]:
        for name in commands:
            if not _NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a command name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
        return commands


class BatchInput(BaseModel):
    """A task's input: which configured command, and its arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str = Field(max_length=64)
    args: list[str] = Field(default_factory=list, max_length=4096)
    stdin: str | None = None
    cwd: str | None = Field(default=None, max_length=4096)
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)


@dataclass(frozen=True)
class _Command:
    """A configured command, checked and with its environment resolved (at setup)."""

    name: str
    argv: tuple[str, ...]
    cwd: Path | None
    workdir_root: Path | None
    env: dict[str, str] = field(repr=False)
    pattern: re.Pattern[str] | None
    max_args: int
    max_arg_bytes: int
    max_stdin_bytes: int
    timeout_s: float
    kill_grace_s: float
    max_output_bytes: int
    progress_prefix: str
    fail_on_nonzero: bool
    retry_exit_codes: frozenset[int]


def _invalid(message: str, reason: str) -> ExecutorError:
    return ExecutorError(
        message, code=ErrorCode.INVALID_TASK, retryable=False, details={"reason": reason}
    )


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


class BatchRun(Executor):
    """``batch.run``: runs a configured command with the task's arguments."""

    serves = ("batch.run",)
    settings_model = BatchRunSettings

    def __init__(self, settings: BatchRunSettings | None = None) -> None:
        self.settings = settings or BatchRunSettings()
        self._commands: dict[str, _Command] = {}
        self._groups: set[int] = set()  # the process groups of the commands running now

    # -- setup: every command checked before the first task ---------------------------------

    async def setup(self) -> None:
        """Check each command (its program executable, its directory there) and resolve
        its environment's secrets; a bad one stops the worker (a ConfigError)."""
        commands = {}
        for name, command in self.settings.commands.items():
            check_command(name, command)
            env = {key: await self.reveal(value) for key, value in command.env.items()}
            commands[name] = self._resolved(name, command, env)
        self._commands = commands

    def _resolved(self, name: str, command: CommandSettings, env: dict[str, str]) -> _Command:
        top = self.settings
        return _Command(
            name=name,
            argv=tuple(command.argv),
            cwd=None if command.cwd is None else Path(command.cwd),
            workdir_root=None if command.workdir_root is None else Path(command.workdir_root),
            env={
                "PATH": top.path,
                "LANG": top.lang,
                "HOME": top.home or os.environ.get("HOME", "/"),
                **env,
            },
            pattern=None if command.args_pattern is None else re.compile(command.args_pattern),
            max_args=_pick(command.max_args, top.max_args),
            max_arg_bytes=_pick(command.max_arg_bytes, top.max_arg_bytes),
            max_stdin_bytes=_pick(command.max_stdin_bytes, top.max_stdin_bytes),
            timeout_s=_pick(command.timeout_s, top.default_timeout_s),
            kill_grace_s=_pick(command.kill_grace_s, top.kill_grace_s),
            max_output_bytes=_pick(command.max_output_bytes, top.max_output_bytes),
            progress_prefix=_pick(command.progress_prefix, top.progress_prefix),
            fail_on_nonzero=command.fail_on_nonzero,
            retry_exit_codes=frozenset(command.retry_exit_codes),
        )

    async def teardown(self) -> None:
        """Kill what is still running (a run cancelled by the shutdown stops its own group
        first; this catches what a crash in between left)."""
        for pgid in list(self._groups):
            _signal_group(pgid, signal.SIGKILL)
        self._groups.clear()

    # -- a task -------------------------------------------------------------------------------

    async def execute(self, task: Task) -> JsonLike:
        request = parse_input(BatchInput, task.input)
        command = self._command(request.command)
        _check_args(command, request.args)
        cwd = _workdir(command, request.cwd)
        stdin = _stdin(command, request.stdin)
        timeout_s = _timeout(command, request.timeout_s, task.timeout_ms)
        ctx = current()
        run = _Run(command, ctx, self.settings.tail_bytes, self.settings.progress_interval_s)
        process = await run.spawn([*command.argv, *request.args], cwd, stdin is not None)
        self._groups.add(process.pid)
        try:
            timed_out = await run.wait(stdin, timeout_s)
        finally:
            self._groups.discard(process.pid)
        return _conclude(run, timed_out, timeout_s)

    def _command(self, name: str) -> _Command:
        command = self._commands.get(name)
        if command is None:
            raise _invalid(
                f"command {printable(name, 64)!r} is not one this worker may run: a task names "
                "a command from the worker's [batch.run.commands] settings",
                "command_not_allowed",
            )
        return command


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def check_command(name: str, command: CommandSettings) -> None:
    """The command's program is an executable file and its directory exists; else a
    :class:`ConfigError` naming the setting."""
    where = f"[batch.run.commands.{name}]"
    program = Path(command.argv[0])
    if not program.is_file() or not os.access(program, os.X_OK):
        raise ConfigError(f"{where}.argv: {program} is not an executable file")
    for key in ("cwd", "workdir_root"):
        directory = getattr(command, key)
        if directory is not None and not Path(directory).is_dir():
            raise ConfigError(f"{where}.{key}: {directory} is not a directory")


def _check_args(command: _Command, args: list[str]) -> None:
    if len(args) > command.max_args:
        raise _invalid(
            f"{len(args)} arguments, more than command {command.name!r} takes ({command.max_args})",
            "bad_args",
        )
    for index, arg in enumerate(args):
        if command.pattern is None:
            if not arg.isprintable():
                raise _invalid(
                    f"input.args[{index}] holds a control or format character", "bad_args"
                )
        elif "\x00" in arg or not command.pattern.fullmatch(arg):
            raise _invalid(
                f"input.args[{index}] does not match the args_pattern of command {command.name!r}",
                "bad_args",
            )
        if len(arg.encode()) > command.max_arg_bytes:
            raise _invalid(
                f"input.args[{index}] is longer than {command.max_arg_bytes} bytes", "bad_args"
            )


def _workdir(command: _Command, requested: str | None) -> Path:
    """Where the command runs: its ``cwd``, or the task's subdirectory of its
    ``workdir_root`` (resolved, symlinks followed, and still under the root)."""
    if command.workdir_root is None:
        if requested is not None:
            raise _invalid(
                f"command {command.name!r} runs in a fixed directory: leave input.cwd out",
                "bad_cwd",
            )
        assert command.cwd is not None
        return command.cwd
    if requested is None:
        return command.workdir_root
    root = command.workdir_root.resolve()
    if "\x00" in requested or os.path.isabs(requested):
        raise _invalid("input.cwd must be a path relative to the command's root", "bad_cwd")
    target = (root / requested).resolve()
    if not target.is_relative_to(root):
        raise _invalid("input.cwd leaves the command's root directory", "bad_cwd")
    if not target.is_dir():
        raise _invalid("input.cwd is not a directory under the command's root", "bad_cwd")
    return target


def _timeout(command: _Command, asked_s: float | None, task_ms: int | None) -> float:
    """The command's timeout, or less if the input asks. A task's own execution timeout
    bounds it too: the group is stopped (SIGTERM, the grace, SIGKILL) in time for the result
    to say why, before the runtime gives up on the run."""
    timeout_s = min(command.timeout_s, asked_s or math.inf)
    if task_ms is not None:
        budget_s = task_ms / 1000 - command.kill_grace_s - _TASK_MARGIN_S
        if budget_s > 0:
            timeout_s = min(timeout_s, budget_s)
    return timeout_s


def _stdin(command: _Command, stdin: str | None) -> bytes | None:
    if stdin is None:
        return None
    data = stdin.encode()
    if len(data) > command.max_stdin_bytes:
        raise _invalid(
            f"input.stdin is {len(data)} bytes, more than command {command.name!r} "
            f"takes ({command.max_stdin_bytes})",
            "stdin_too_large",
        )
    return data


def _conclude(run: _Run, timed_out: bool, timeout_s: float) -> JsonLike:
    """The run's output, or the error it ends with."""
    summary = run.summary()
    command = run.command
    if timed_out:
        raise ExecutorError(
            f"command {command.name!r} ran past its timeout of {timeout_s:g} s: its process "
            "group was killed",
            code=ErrorCode.TIMEOUT,
            retryable=True,
            details={"reason": "timeout", "timeout_s": timeout_s, **summary},
        )
    exit_code = summary["exit_code"]
    if exit_code != 0 and command.fail_on_nonzero:
        how = f"exited with status {exit_code}" if exit_code is not None else "was killed"
        raise ExecutorError(
            f"command {command.name!r} {how}"
            + (f" ({summary['signal']})" if summary["signal"] else "")
            + ": see the result's logs and error.details.stderr_tail",
            code=ErrorCode.EXECUTOR_ERROR,
            retryable=exit_code in command.retry_exit_codes,
            details={"reason": "exit_status", **summary},
        )
    return summary


# -- one run: the process, its output, its end ----------------------------------------------------


class _Stream:
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


class _Progress:
    """Progress lines as events, at most one per interval: the latest line wins, and the
    last one is sent when the interval is over (or the command ends)."""

    def __init__(self, ctx: TaskContext, interval_s: float) -> None:
        self._ctx = ctx
        self._interval_s = interval_s
        self._sent_at = -math.inf
        self._pending: tuple[float | None, str] | None = None
        self._timer: asyncio.Task[None] | None = None

    async def offer(self, fraction: float | None, message: str) -> None:
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


class _Run:
    """A command's process: started, read, waited for, its group stopped."""

    def __init__(
        self, command: _Command, ctx: TaskContext, tail_bytes: int, progress_s: float
    ) -> None:
        self.command = command
        self.ctx = ctx
        self.stdout = _Stream("stdout", command.max_output_bytes, tail_bytes)
        self.stderr = _Stream("stderr", command.max_output_bytes, tail_bytes)
        self.progress = _Progress(ctx, progress_s)
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
        helpers = [
            asyncio.create_task(self._pump(process.stdout, self.stdout)),
            asyncio.create_task(self._pump(process.stderr, self.stderr)),
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
            await self.progress.close()
        self.stdout.finish(self.ctx)
        self.stderr.finish(self.ctx)
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

    async def _pump(self, reader: asyncio.StreamReader, stream: _Stream) -> None:
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

    async def _line(self, raw: bytes, stream: _Stream) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        progress = parse_progress(text, self.command.progress_prefix)
        if progress is None:
            stream.line(self.ctx, raw + b"\n", text)
        else:
            await self.progress.offer(*progress)

    def summary(self) -> dict[str, JsonLike]:
        """What the output says of the run (and an error's details)."""
        process = self.process
        assert process is not None and process.returncode is not None
        code = process.returncode
        return {
            "command": self.command.name,
            "exit_code": code if code >= 0 else None,
            "signal": _signal_name(-code) if code < 0 else None,
            "duration_ms": round((self.ended - self.started) * 1000, 3),
            "stdout_bytes": self.stdout.total,
            "stderr_bytes": self.stderr.total,
            "truncated": bool(self.stdout.dropped or self.stderr.dropped),
            "stdout_tail": self.stdout.tail(),
            "stderr_tail": self.stderr.tail(),
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
    _signal_group(pgid, signal.SIGTERM)
    try:
        deadline = time.monotonic() + grace_s
        while group_running(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
    finally:
        if group_running(pgid):
            _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + _KILLED_WAIT_S
    while group_running(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_S)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
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
