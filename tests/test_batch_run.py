"""``batch.run``: allowlisted commands on the worker's machine, run without a shell in a process
group of their own; output as logs and progress; timeouts, cancels and exits as results; no
orphans. Commands are /bin/sh scripts the tests write into a temporary directory."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from wayang_workers.batch_output import parse_progress
from wayang_workers.batch_process import group_running
from wayang_workers.batch_run import BatchRun, BatchRunSettings, check_command

from wayang_mq import ErrorCode, Status
from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.model import Result
from wayang_mq.runtime.executor import load_executor
from wayang_mq.runtime.settings import WorkerFile
from wayang_mq.security.providers import MappingProvider
from wayang_mq.testing.harness import Fabric, eventually

EXAMPLE = Path(__file__).resolve().parent.parent / "workers" / "examples" / "batch_run.toml"
SECRET_NAME = "batch-token"

# a command and a child it starts in the background; both pids written to the file $1
WITH_CHILD = """#!/bin/sh
sleep 1000 &
echo "$$ $!" > "$1.tmp" && mv "$1.tmp" "$1"
echo started
wait
"""
# the same, deaf to SIGTERM (an ignored signal stays ignored in the child): needs SIGKILL
DEAF_WITH_CHILD = "#!/bin/sh\ntrap '' TERM\n" + WITH_CHILD.removeprefix("#!/bin/sh\n")

SCRIPTS = {
    "hello": '#!/bin/sh\necho "hello $1"\necho "warning: be brief" >&2\n',
    "exit3": "#!/bin/sh\necho failing >&2\nexit 3\n",
    "child": WITH_CHILD,
    "leaver": WITH_CHILD.replace("wait\n", "exit 0\n"),
    "deaf": DEAF_WITH_CHILD,
    "progress": """#!/bin/sh
i=0
while [ ! -e "$1" ] && [ $i -lt 300 ]; do
  echo "::progress 0.4 compiling"
  sleep 0.1
  i=$((i+1))
done
echo "::progress 1.0 done"
echo "plain line"
""",
    "chatty": """#!/bin/sh
i=0
while [ $i -lt 200 ]; do echo "line $i of the output"; i=$((i+1)); done
""",
    "echo": '#!/bin/sh\necho "$@"\n',
    "pwd": "#!/bin/sh\npwd -P\n",
    "cat": "#!/bin/sh\ncat\n",
    "vanish": "#!/bin/sh\necho never\n",
}


@dataclass
class Batch:
    """An in-process worker serving batch.run with the test commands, and a dispatcher."""

    dispatcher: Dispatcher
    dir: Path
    secret: str

    async def run(self, command: str, *args: str, **input: Any) -> Result:
        body = {"command": command, "args": list(args), **input}
        return await self.dispatcher.run("batch.run", body, wait_s=60)


def _write_scripts(where: Path) -> dict[str, Path]:
    paths = {}
    for name, text in SCRIPTS.items():
        path = where / f"{name}.sh"
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        paths[name] = path
    return paths


def _settings(where: Path) -> BatchRunSettings:
    paths = _write_scripts(where)
    root = where / "root"
    (root / "sub").mkdir(parents=True)
    (root / "out").symlink_to(where)  # a way out of the root
    cwd = str(where)

    def command(name: str, **extra: Any) -> dict[str, Any]:
        return {"argv": [str(paths[name])], "cwd": cwd, **extra}

    return BatchRunSettings.model_validate(
        {
            "kill_grace_s": 2,
            "progress_interval_s": 0.05,
            "commands": {
                "hello": command("hello"),
                "exit3": command("exit3"),
                "exit3-retry": command("exit3", retry_exit_codes=[3]),
                "exit3-ok": command("exit3", fail_on_nonzero=False),
                "child": command("child"),
                "leaver": command("leaver"),
                "deaf": command("deaf", kill_grace_s=0.5),
                "progress": command("progress"),
                "chatty": command("chatty", max_output_bytes=1000),
                "echo": command("echo"),
                "lower": command("echo", args_pattern="[a-z]+", max_args=3),
                "pwd": {"argv": [str(paths["pwd"])], "workdir_root": str(root)},
                "cat": command("cat", max_stdin_bytes=100),
                "env": {
                    "argv": ["/usr/bin/env"],
                    "cwd": cwd,
                    "env": {"BATCH_TOKEN": {"$secret": SECRET_NAME}, "REGION": "eu"},
                },
                "vanish": command("vanish"),
            },
        }
    )


@pytest.fixture
async def batch(fabric: Fabric, tmp_path: Path) -> AsyncIterator[Batch]:
    await fabric.purge("batch.run")
    value = "tok-" + secrets.token_hex(12)
    executor = BatchRun(_settings(tmp_path))
    provider = MappingProvider({SECRET_NAME: value})
    async with fabric.worker([executor], secrets=provider), fabric.dispatcher() as dispatcher:
        yield Batch(dispatcher, tmp_path, value)


def _gone(pid: int) -> bool:
    """No such process, or a zombie (an orphan waiting for init, which in a container may
    never reap it, runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


async def _pids(path: Path) -> tuple[int, int]:
    await eventually(path.exists, what="the command writing its pids")
    leader, child = path.read_text().split()
    return int(leader), int(child)


def _reason(result: Result) -> object:
    assert result.error is not None, result
    return result.error.details.get("reason")


# -- the outcomes of a run ------------------------------------------------------------------------


async def test_exit_code_0_succeeds_with_its_output_and_logs(batch: Batch) -> None:
    result = await batch.run("hello", "world")
    assert result.status is Status.SUCCESS, result.error
    output = result.output
    assert isinstance(output, dict)
    assert output["exit_code"] == 0 and output["signal"] is None
    assert output["stdout_tail"] == "hello world"
    assert output["stderr_tail"] == "warning: be brief"
    assert output["stdout_bytes"] == len("hello world\n") and output["truncated"] is False
    assert "stdout: hello world" in result.logs and "stderr: warning: be brief" in result.logs


async def test_exit_code_3_fails_exit_status_retryable_only_when_listed(batch: Batch) -> None:
    result = await batch.run("exit3")
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code is ErrorCode.EXECUTOR_ERROR and not result.error.retryable
    assert _reason(result) == "exit_status" and result.error.details["exit_code"] == 3
    assert result.error.details["stderr_tail"] == "failing"
    listed = await batch.run("exit3-retry")
    assert listed.error is not None and listed.error.retryable
    # fail_on_nonzero = false: the exit code is the caller's to read
    tolerated = await batch.run("exit3-ok")
    assert tolerated.status is Status.SUCCESS and isinstance(tolerated.output, dict)
    assert tolerated.output["exit_code"] == 3


@pytest.mark.parametrize("whose", ["input", "task"])
async def test_a_timeout_kills_the_whole_process_group(batch: Batch, whose: str) -> None:
    # Given a command deaf to SIGTERM, whose background child is deaf too (kill grace 0.5 s)
    pids = batch.dir / "deaf.pids"
    input = {"command": "deaf", "args": [str(pids)]}
    # When it runs past the timeout its input asks, or the task's own (less grace and margin)
    if whose == "input":
        result = await batch.dispatcher.run("batch.run", input | {"timeout_s": 1}, wait_s=60)
    else:
        result = await batch.dispatcher.run("batch.run", input, timeout_s=2, wait_s=60)
    # Then it failed timeout, and SIGKILL after the grace took the command and its child
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code is ErrorCode.TIMEOUT and _reason(result) == "timeout"
    assert result.error.details["signal"] == "SIGKILL"
    leader, child = await _pids(pids)
    assert _gone(child) and _gone(leader)
    assert not group_running(leader)


async def test_a_cancel_kills_the_command_and_its_children(batch: Batch) -> None:
    # Given a command running with a child it started in the background
    pids = batch.dir / "child.pids"
    handle = await batch.dispatcher.submit("batch.run", {"command": "child", "args": [str(pids)]})
    leader, child = await _pids(pids)
    # When the task is cancelled
    assert await batch.dispatcher.cancel(handle.task_id, "enough")
    result = await handle.result(30)
    # Then it ended cancelled, and neither the command nor its child is left
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code is ErrorCode.CANCELLED
    await eventually(lambda: _gone(child) and _gone(leader), what="the command's group dying")
    assert "stdout: started" in result.logs


async def test_a_child_left_running_when_the_command_exits_is_stopped(batch: Batch) -> None:
    # Given a command that exits 0 leaving a child in the background (holding its stdout)
    pids = batch.dir / "leaver.pids"
    result = await batch.run("leaver", str(pids))
    # Then the task succeeded, and the child did not outlive it
    assert result.status is Status.SUCCESS, result.error
    leader, child = await _pids(pids)
    assert _gone(child) and not group_running(leader)


async def test_the_worker_shutting_down_kills_the_commands_it_runs(
    fabric: Fabric, tmp_path: Path
) -> None:
    # Given a worker (a short grace) running a command with a child
    await fabric.purge("batch.run")
    pids = tmp_path / "child.pids"
    executor = BatchRun(_settings(tmp_path))
    async with fabric.dispatcher() as dispatcher:
        provider = MappingProvider({SECRET_NAME: "tok-" + secrets.token_hex(12)})
        async with fabric.worker([executor], grace_s=0.3, secrets=provider):
            await dispatcher.submit("batch.run", {"command": "child", "args": [str(pids)]})
            leader, child = await _pids(pids)
        # When it stopped: the task is given back, and the command and its child are gone
        assert _gone(child) and _gone(leader)
    await fabric.purge("batch.run")


@pytest.mark.parametrize("command", ["/bin/sh", "rm", "hello; rm -rf /", "../hello.sh", ""])
async def test_a_command_off_the_allowlist_is_refused(batch: Batch, command: str) -> None:
    # the scripts write nothing anywhere: a stray run would show in the directory
    before = sorted(batch.dir.iterdir())
    result = await batch.run(command, "-c", "touch pwned")
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code is ErrorCode.INVALID_TASK and not result.error.retryable
    assert _reason(result) == "command_not_allowed"
    assert sorted(batch.dir.iterdir()) == before and not result.logs


async def test_arguments_are_passed_as_a_list_never_to_a_shell(batch: Batch) -> None:
    tricks = ["$(touch pwned)", "; touch pwned", "`touch pwned`", "| touch pwned"]
    result = await batch.run("echo", *tricks)
    assert result.status is Status.SUCCESS and isinstance(result.output, dict)
    assert result.output["stdout_tail"] == " ".join(tricks)
    assert not (batch.dir / "pwned").exists()


async def test_progress_lines_become_progress_events_not_logs(batch: Batch) -> None:
    # Given a command reporting progress until told to stop (a watcher binds after it starts)
    stop = batch.dir / "stop-progress"
    handle = await batch.dispatcher.submit(
        "batch.run", {"command": "progress", "args": [str(stop)]}
    )
    seen = []
    async for event in handle.progress():
        seen.append((event.fraction, event.message))
        stop.touch()
    result = await handle.result(30)
    # Then its progress lines came as events, its other lines as logs
    assert (0.4, "compiling") in seen
    assert result.status is Status.SUCCESS
    assert result.logs == ("stdout: plain line",)


async def test_output_past_the_cap_is_dropped_with_one_line_saying_so(batch: Batch) -> None:
    lines = [f"line {i} of the output" for i in range(200)]
    result = await batch.run("chatty")
    assert result.status is Status.SUCCESS and isinstance(result.output, dict)
    total = sum(len(line) + 1 for line in lines)
    logged = [line for line in result.logs if not line.startswith("stdout: …")]
    kept = sum(len(line) - len("stdout: ") + 1 for line in logged)
    assert 900 < kept <= 1000 and logged[0] == "stdout: line 0 of the output"
    assert result.logs[-1] == f"stdout: … output truncated ({total - kept} bytes dropped)"
    assert result.output["truncated"] is True and result.output["stdout_bytes"] == total
    tail = result.output["stdout_tail"]
    assert isinstance(tail, str) and tail.endswith(lines[-1]) and len(tail) <= 4096


async def test_the_environment_is_minimal_and_a_secret_in_it_redacted(
    batch: Batch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker process whose own environment holds wayang settings
    monkeypatch.setenv("WAYANG_SECRET_SOMETHING", "not-for-commands")
    # When a command prints its environment, secret included
    result = await batch.run("env")
    # Then it saw PATH, LANG, HOME and its own variables only, the secret shown by name
    assert result.status is Status.SUCCESS, result.error
    names = {line.removeprefix("stdout: ").split("=", 1)[0] for line in result.logs}
    assert names == {"PATH", "LANG", "HOME", "BATCH_TOKEN", "REGION"}
    assert f"stdout: BATCH_TOKEN=[secret:{SECRET_NAME}]" in result.logs
    assert batch.secret not in result.model_dump_json()


# -- what a task may not ask ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "where"),
    [(["ok", "Not-Lower"], "input.args[1]"), (["a", "b", "c", "d"], "4 arguments")],
)
async def test_arguments_outside_the_pattern_are_invalid_task(
    batch: Batch, args: list[str], where: str
) -> None:
    result = await batch.run("lower", *args)
    assert result.error is not None and result.error.code is ErrorCode.INVALID_TASK
    assert _reason(result) == "bad_args" and where in result.error.message


async def test_a_control_character_in_an_argument_is_refused(batch: Batch) -> None:
    result = await batch.run("echo", "red\x1b[31m")
    assert result.error is not None and result.error.code is ErrorCode.INVALID_TASK
    assert _reason(result) == "bad_args" and not result.logs


@pytest.mark.parametrize("cwd", ["../..", "sub/../../root/../..", "out", "/etc"])
async def test_a_cwd_leaving_the_root_is_refused(batch: Batch, cwd: str) -> None:
    result = await batch.run("pwd", cwd=cwd)
    assert result.error is not None and result.error.code is ErrorCode.INVALID_TASK
    assert _reason(result) == "bad_cwd"


async def test_a_cwd_under_the_root_is_where_the_command_runs(batch: Batch) -> None:
    result = await batch.run("pwd", cwd="sub")
    assert isinstance(result.output, dict), result.error
    assert result.output["stdout_tail"] == str((batch.dir / "root" / "sub").resolve())
    fixed = await batch.run("hello", cwd="sub")  # a command with a fixed cwd takes none
    assert _reason(fixed) == "bad_cwd"


async def test_stdin_is_written_to_the_command_within_its_cap(batch: Batch) -> None:
    result = await batch.run("cat", stdin="to the command\n")
    assert isinstance(result.output, dict) and result.output["stdout_tail"] == "to the command"
    too_big = await batch.run("cat", stdin="x" * 101)
    assert _reason(too_big) == "stdin_too_large"


async def test_a_command_that_cannot_start_fails_spawn_failed(batch: Batch) -> None:
    (batch.dir / "vanish.sh").unlink()  # gone since the worker checked it
    result = await batch.run("vanish")
    assert result.error is not None and result.error.code is ErrorCode.EXECUTOR_ERROR
    assert _reason(result) == "spawn_failed" and not result.error.retryable


# -- settings -------------------------------------------------------------------------------------


def test_progress_line_grammar() -> None:
    prefix = "::progress "
    assert parse_progress("::progress 0.4 compiling", prefix) == (0.4, "compiling")
    assert parse_progress("::progress 1", prefix) == (1.0, "")
    assert parse_progress("::progress .5  half way ", prefix) == (0.5, "half way")
    assert parse_progress("::progress linking", prefix) == (None, "linking")
    assert parse_progress("::progress 40 files", prefix) == (None, "40 files")
    assert parse_progress("::progress 1.5 over", prefix) == (None, "1.5 over")
    assert parse_progress("progress 0.4", prefix) is None


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ({"argv": ["sh"], "cwd": "/tmp"}, "absolute path"),
        ({"argv": ["/bin/sh"]}, "exactly one of cwd and workdir_root"),
        ({"argv": ["/bin/sh"], "cwd": "/", "args_pattern": "("}, "not a valid regex"),
        ({"argv": ["/bin/sh"], "cwd": "/", "env": {"A-B": "x"}}, "environment variable"),
        ({"argv": ["/bin/sh"], "cwd": "/", "shell": True}, "shell"),
    ],
)
def test_bad_command_settings_are_refused(
    tmp_path: Path, command: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "worker.toml"
    lines = [f"{key} = {_toml(value)}" for key, value in command.items()]
    path.write_text("[batch.run.commands.c]\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_executor("wayang_workers.batch_run:BatchRun", WorkerFile.read(path))
    assert expected in caught.value.message and "[batch.run].commands.c" in caught.value.message


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f"'{value}'"


def test_a_program_that_is_not_executable_stops_the_setup(tmp_path: Path) -> None:
    script = tmp_path / "plain.sh"
    script.write_text("#!/bin/sh\n")
    settings = BatchRunSettings.model_validate(
        {"commands": {"c": {"argv": [str(script)], "cwd": str(tmp_path)}}}
    )
    with pytest.raises(ConfigError, match=r"\[batch.run.commands.c\].argv: .* not an executable"):
        check_command("c", settings.commands["c"])


def test_the_example_settings_file_loads_and_its_programs_exist() -> None:
    executor = load_executor("wayang_workers.batch_run:BatchRun", WorkerFile.read(EXAMPLE))
    assert isinstance(executor, BatchRun) and executor.settings.commands
    for name, command in executor.settings.commands.items():
        check_command(name, command)


async def test_a_worker_daemon_runs_commands_from_its_config_file(
    fabric: Fabric, tmp_path: Path
) -> None:
    # Given a worker daemon started from the command line with a settings file
    token = "tok-" + secrets.token_hex(12)
    path = tmp_path / "worker.toml"
    path.write_text(
        "[batch.run.commands.env]\n"
        'argv = ["/usr/bin/env"]\n'
        f'cwd = "{tmp_path}"\n'
        'env = { DEPLOY_TOKEN = { "$secret" = "deploy-token" } }\n'
    )
    await fabric.purge("batch.run")
    worker = fabric.spawn_worker(
        ["wayang_workers.batch_run:BatchRun"],
        executor_id=f"batch-{secrets.token_hex(3)}",
        args=["--config", str(path), "--secrets", "env"],
        env={"WAYANG_SECRET_DEPLOY_TOKEN": token},
    )
    try:
        await asyncio.to_thread(worker.wait_started)
        async with fabric.dispatcher() as dispatcher:
            result = await dispatcher.run("batch.run", {"command": "env"}, wait_s=30)
            refused = await dispatcher.run("batch.run", {"command": "/bin/sh"}, wait_s=30)
    finally:
        worker.stop()
    # Then the configured command ran with its secret, shown by name only
    assert result.status is Status.SUCCESS, result.error
    assert "stdout: DEPLOY_TOKEN=[secret:deploy-token]" in result.logs
    assert token not in result.model_dump_json() and token not in worker.log()
    assert _reason(refused) == "command_not_allowed"
    assert "event=batch.finished" in worker.log()
