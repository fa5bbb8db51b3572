"""A ``batch.run`` command as the worker resolved it, and what a task may ask of it.

A task never gives a program, a shell line or an environment: it names a command and gives
arguments, maybe stdin, a working directory under the command's root and a shorter timeout.
Each is checked here against the command's limits before anything runs; a refusal is
``invalid_task`` with the reason in ``details``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from wayang_mq import ErrorCode, ExecutorError

__all__ = ["Command", "check_args", "invalid_task", "run_timeout", "stdin_data", "workdir"]

#: how long before a task's own execution timeout a command must be stopped, besides its
#: kill grace (to publish a result that says why)
_TASK_MARGIN_S = 0.5


@dataclass(frozen=True)
class Command:
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


def invalid_task(message: str, reason: str) -> ExecutorError:
    """The error of a task that asks what its command does not allow (never retried)."""
    return ExecutorError(
        message, code=ErrorCode.INVALID_TASK, retryable=False, details={"reason": reason}
    )


def check_args(command: Command, args: list[str]) -> None:
    """The task's arguments fit the command: how many, their pattern, their size."""
    if len(args) > command.max_args:
        raise invalid_task(
            f"{len(args)} arguments, more than command {command.name!r} takes ({command.max_args})",
            "bad_args",
        )
    for index, arg in enumerate(args):
        if command.pattern is None:
            if not arg.isprintable():
                raise invalid_task(
                    f"input.args[{index}] holds a control or format character", "bad_args"
                )
        elif "\x00" in arg or not command.pattern.fullmatch(arg):
            raise invalid_task(
                f"input.args[{index}] does not match the args_pattern of command {command.name!r}",
                "bad_args",
            )
        if len(arg.encode()) > command.max_arg_bytes:
            raise invalid_task(
                f"input.args[{index}] is longer than {command.max_arg_bytes} bytes", "bad_args"
            )


def workdir(command: Command, requested: str | None) -> Path:
    """Where the command runs: its ``cwd``, or the task's subdirectory of its
    ``workdir_root`` (resolved, symlinks followed, and still under the root)."""
    if command.workdir_root is None:
        if requested is not None:
            raise invalid_task(
                f"command {command.name!r} runs in a fixed directory: leave input.cwd out",
                "bad_cwd",
            )
        assert command.cwd is not None
        return command.cwd
    if requested is None:
        return command.workdir_root
    root = command.workdir_root.resolve()
    if "\x00" in requested or os.path.isabs(requested):
        raise invalid_task("input.cwd must be a path relative to the command's root", "bad_cwd")
    target = (root / requested).resolve()
    if not target.is_relative_to(root):
        raise invalid_task("input.cwd leaves the command's root directory", "bad_cwd")
    if not target.is_dir():
        raise invalid_task("input.cwd is not a directory under the command's root", "bad_cwd")
    return target


def run_timeout(command: Command, asked_s: float | None, task_ms: int | None) -> float:
    """The command's timeout, or less if the input asks. A task's own execution timeout
    bounds it too: the group is stopped (SIGTERM, the grace, SIGKILL) in time for the result
    to say why, before the runtime gives up on the run."""
    timeout_s = min(command.timeout_s, asked_s or math.inf)
    if task_ms is not None:
        budget_s = task_ms / 1000 - command.kill_grace_s - _TASK_MARGIN_S
        if budget_s > 0:
            timeout_s = min(timeout_s, budget_s)
    return timeout_s


def stdin_data(command: Command, stdin: str | None) -> bytes | None:
    """The task's stdin as bytes, within the command's ``max_stdin_bytes``."""
    if stdin is None:
        return None
    data = stdin.encode()
    if len(data) > command.max_stdin_bytes:
        raise invalid_task(
            f"input.stdin is {len(data)} bytes, more than command {command.name!r} "
            f"takes ({command.max_stdin_bytes})",
            "stdin_too_large",
        )
    return data
