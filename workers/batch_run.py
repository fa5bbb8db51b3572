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

This module holds the executor, its settings and its input; the rest is in
``batch_command`` (a resolved command and the checks of a task's request against it),
``batch_process`` (the process, its group, stopping it) and ``batch_output`` (the streams,
their caps, the progress lines).

    wayang-mq worker wayang_workers.batch_run:BatchRun --config worker.toml --secrets env
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wayang_mq import ErrorCode, Executor, ExecutorError, Task, current
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.fields import printable
from wayang_mq.core.model import JsonLike
from wayang_mq.runtime.settings import SecretRef, parse_input

from .batch_command import (
    Command,
    check_args,
    invalid_task,
    run_timeout,
    stdin_data,
    workdir,
)
from .batch_process import CommandRun, signal_group

__all__ = ["BatchInput", "BatchRun", "BatchRunSettings", "CommandSettings", "check_command"]

#: a command's name, as a task gives it and a TOML table key holds it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


class BatchRun(Executor):
    """``batch.run``: runs a configured command with the task's arguments."""

    serves = ("batch.run",)
    settings_model = BatchRunSettings

    def __init__(self, settings: BatchRunSettings | None = None) -> None:
        self.settings = settings or BatchRunSettings()
        self._commands: dict[str, Command] = {}
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

    def _resolved(self, name: str, command: CommandSettings, env: dict[str, str]) -> Command:
        top = self.settings
        return Command(
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
            signal_group(pgid, signal.SIGKILL)
        self._groups.clear()

    # -- a task -------------------------------------------------------------------------------

    async def execute(self, task: Task) -> JsonLike:
        request = parse_input(BatchInput, task.input)
        command = self._command(request.command)
        check_args(command, request.args)
        cwd = workdir(command, request.cwd)
        stdin = stdin_data(command, request.stdin)
        timeout_s = run_timeout(command, request.timeout_s, task.timeout_ms)
        ctx = current()
        run = CommandRun(command, ctx, self.settings.tail_bytes, self.settings.progress_interval_s)
        process = await run.spawn([*command.argv, *request.args], cwd, stdin is not None)
        self._groups.add(process.pid)
        try:
            timed_out = await run.wait(stdin, timeout_s)
        finally:
            self._groups.discard(process.pid)
        return _conclude(run, timed_out, timeout_s)

    def _command(self, name: str) -> Command:
        command = self._commands.get(name)
        if command is None:
            raise invalid_task(
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


def _conclude(run: CommandRun, timed_out: bool, timeout_s: float) -> JsonLike:
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
