"""Executor settings from a worker's ``--config`` file: validated at start, secrets by
reference resolved through the worker's providers, a bad file refused in one line."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.settings_executors import Configured, ConfiguredSettings
from wayang_mq import ErrorCode, ExecutorError, Status
from wayang_mq.core.errors import ConfigError
from wayang_mq.runtime.executor import load_executor
from wayang_mq.runtime.settings import WorkerFile, parse_input
from wayang_mq.testing.harness import Fabric

_CLI = (sys.executable, "-m", "wayang_mq.cli")


def test_a_table_is_found_by_its_capability_and_validated(tmp_path: Path) -> None:
    # Given a file whose [demo.echo] table configures the executor
    path = tmp_path / "worker.toml"
    path.write_text('[demo.echo]\ngreeting = "hi"\ntoken = {"$secret" = "tok"}\nretries = 5\n')
    # When the worker loads the executor with it
    executor = load_executor("tests.settings_executors:Configured", WorkerFile.read(path))
    # Then it gets its settings, typed, the secret as a reference by name
    assert isinstance(executor, Configured)
    assert executor.settings.greeting == "hi" and executor.settings.retries == 5
    assert not isinstance(executor.settings.token, str) and executor.settings.token.name == "tok"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[demo.echo]\ngreeting = "hi"\n', "[demo.echo].token: Field required"),
        ('[demo.echo]\ngreeting = "hi"\ntoken = "t"\nextra = 1\n', "[demo.echo].extra"),
        ("[demo.echo\n", "is not valid TOML"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_executor("tests.settings_executors:Configured", WorkerFile.read(path))
    assert expected in caught.value.message


def test_an_executor_without_settings_refuses_a_table(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text("[demo.echo]\ngreeting = 1\n")
    with pytest.raises(ConfigError, match="takes no settings"):
        load_executor("wayang_workers.demo:Echo", WorkerFile.read(path))


def test_bad_input_is_invalid_task_naming_each_field_never_its_value() -> None:
    with pytest.raises(ExecutorError) as caught:
        parse_input(ConfiguredSettings, {"greeting": 7, "token": "s3cr3t-value", "nope": 1})
    error = caught.value
    assert error.code is ErrorCode.INVALID_TASK and not error.retryable
    assert "input.greeting" in error.message and "input.nope" in error.message
    assert "s3cr3t-value" not in error.message


def test_the_worker_cli_refuses_bad_settings_in_one_line(
    tmp_path: Path, fabric_env: dict[str, str]
) -> None:
    path = tmp_path / "worker.toml"
    path.write_text('[demo.echo]\ngreeting = "hi"\n')
    done = subprocess.run(
        [*_CLI, "worker", "tests.settings_executors:Configured", "--config", str(path)],
        env=fabric_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "[demo.echo].token: Field required" in done.stderr


async def test_a_daemon_runs_with_its_settings_and_a_secret_setting_resolved(
    fabric: Fabric, tmp_path: Path
) -> None:
    # Given a worker daemon whose settings name a secret its environment provides
    token = "tok-" + secrets.token_hex(12)
    path = tmp_path / "worker.toml"
    path.write_text('[demo.echo]\ngreeting = "bonjour"\ntoken = {"$secret" = "echo-token"}\n')
    await fabric.purge("demo.echo")
    worker = fabric.spawn_worker(
        ["tests.settings_executors:Configured"],
        executor_id=f"configured-{secrets.token_hex(3)}",
        args=["--config", str(path), "--secrets", "env"],
        env={"WAYANG_SECRET_ECHO_TOKEN": token},
    )
    try:
        await asyncio.to_thread(worker.wait_started)
        async with fabric.dispatcher() as dispatcher:
            result = await dispatcher.run("demo.echo", {}, wait_s=30)
    finally:
        worker.stop()
    # Then the executor answered with its settings and the resolved secret
    assert result.status is Status.SUCCESS
    assert result.output == {
        "greeting": "bonjour",
        "retries": 3,
        "token_length": len(token),
        "token_is_secret": True,
    }
    assert token not in worker.log()


async def test_a_secret_setting_no_provider_knows_stops_the_worker(
    fabric: Fabric, tmp_path: Path
) -> None:
    path = tmp_path / "worker.toml"
    path.write_text('[demo.echo]\ngreeting = "x"\ntoken = {"$secret" = "missing-one"}\n')
    worker = fabric.spawn_worker(
        ["tests.settings_executors:Configured"],
        executor_id=f"configured-{secrets.token_hex(3)}",
        args=["--config", str(path), "--secrets", "env"],
    )
    code = await asyncio.to_thread(worker.wait, 60)
    assert code == 2, worker.log()
    assert "missing-one" in worker.log() and "not known" in worker.log()
