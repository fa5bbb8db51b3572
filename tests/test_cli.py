"""The ``wayang-mq`` command as a user runs it: one-line errors, distinct exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wayang_mq.dev.nodes import free_port
from wayang_mq.testing.harness import Fabric


def wayang(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a separate process with ``env`` on top of a clean WAYANG_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")}
    return subprocess.run(
        [sys.executable, "-m", "wayang_mq.cli", *args],
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(run: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert run.returncode == code, run.stderr
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("wayang-mq: error:")]
    assert len(lines) == 1, run.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_keys_new_writes_a_keypair_named_by_its_id(tmp_path: Path) -> None:
    run = wayang("keys", "new", "--dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    (private,) = tmp_path.glob("*.key")
    assert (tmp_path / f"{private.stem}.pub").exists()
    assert private.stem in run.stdout


def test_topology_apply_twice_reports_nothing_changed(fabric_env: dict[str, str]) -> None:
    wayang("topology", "apply", env=fabric_env)
    run = wayang("topology", "apply", env=fabric_env)
    assert run.returncode == 0, run.stderr
    assert "0 created, 0 updated" in run.stdout.splitlines()[-1]


def test_topology_export_writes_importable_definitions(tmp_path: Path) -> None:
    out = tmp_path / "definitions.json"
    run = wayang("topology", "export", "--out", str(out))
    assert run.returncode == 0, run.stderr
    document = json.loads(out.read_text())
    assert {q["name"] for q in document["queues"]} >= {"wayang.task.demo.echo"}


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[capabilities.\n", "line 1"),
        ('[capabilities."demo.echo"]\nshard = 2\n', "shard"),
    ],
    ids=["malformed", "unknown key"],
)
def test_a_bad_topology_file_is_one_line_and_exit_2(
    tmp_path: Path, content: str, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    run = wayang(
        "topology", "apply", "--file", str(path), env={"WAYANG_AMQP_URL": "amqp://x:y@127.0.0.1:1/"}
    )
    assert_one_line_error(run, 2, needle, str(path))


def test_an_unreachable_broker_is_one_line_and_exit_3() -> None:
    port = free_port()
    env = {
        "WAYANG_AMQP_URL": f"amqp://u:secret@127.0.0.1:{port}/",
        "WAYANG_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}",
    }
    run = wayang("topology", "apply", env=env)
    assert_one_line_error(run, 3)
    assert "secret" not in run.stderr


def test_wrong_credentials_are_one_line_and_exit_3(fabric: Fabric, tmp_path: Path) -> None:
    url = fabric.endpoint.amqp_url.replace(fabric.endpoint.password, "wrong-password")
    env = {"WAYANG_AMQP_URL": url, "WAYANG_KEY_DIR": str(fabric.key_dir)}
    run = wayang("submit", "demo.echo", env=env)
    assert_one_line_error(run, 3, "credentials")
    assert "wrong-password" not in run.stderr


def test_dev_on_an_occupied_port_is_one_line_naming_it(tmp_path: Path, occupied_port: int) -> None:
    run = wayang(
        "dev", "--state-dir", str(tmp_path), "--amqp-port", str(occupied_port), "--no-wait"
    )
    assert_one_line_error(run, 2, str(occupied_port))


def test_dev_without_rabbitmq_server_says_how_to_install_it(tmp_path: Path) -> None:
    env = {"WAYANG_RABBITMQ_SERVER": str(tmp_path / "no-such-server")}
    run = wayang("dev", "--state-dir", str(tmp_path), "--no-wait", env=env)
    assert_one_line_error(run, 2, "apt-get install rabbitmq-server")


def test_submit_wait_prints_the_result_and_exits_by_status(
    fabric: Fabric, fabric_env: dict[str, str]
) -> None:
    daemon = fabric.spawn_worker(executor_id="cli-worker")
    try:
        daemon.wait_started()
        ok = wayang("submit", "demo.echo", "--input", '{"via": "cli"}', "--wait", env=fabric_env)
        failed = wayang(
            "submit", "demo.fail", "--input", '{"mode": "permanent"}', "--wait", env=fabric_env
        )
    finally:
        daemon.stop()
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["output"] == {"via": "cli"}
    assert failed.returncode == 1, failed.stderr
    assert json.loads(failed.stdout)["error"]["code"] == "executor_error"


def test_submit_to_a_capability_without_queue_exits_4(fabric_env: dict[str, str]) -> None:
    run = wayang("submit", "no.such", env=fabric_env)
    assert_one_line_error(run, 4, "no.such", "topology apply")


def test_submit_with_input_that_is_not_json_exits_2(fabric_env: dict[str, str]) -> None:
    run = wayang("submit", "demo.echo", "--input", "{nope", env=fabric_env)
    assert_one_line_error(run, 2, "--input")


def test_submit_wait_past_its_timeout_exits_6(fabric_env: dict[str, str]) -> None:
    # demo.sleep has no worker in this test, so nothing answers within the wait
    run = wayang(
        "submit", "demo.sleep", "--queue-timeout", "2", "--wait", "--timeout", "0.5", env=fabric_env
    )
    assert_one_line_error(run, 6, "no result")


def test_worker_for_a_capability_without_queue_exits_2(
    fabric_env: dict[str, str], tmp_path: Path
) -> None:
    module = tmp_path / "stray_executor.py"
    module.write_text(
        "from wayang_mq import Executor\n\nclass Stray(Executor):\n    serves = ('stray.cap',)\n"
    )
    env = fabric_env | {"PYTHONPATH": str(tmp_path)}
    run = wayang("worker", "stray_executor:Stray", env=env)
    assert_one_line_error(run, 2, "wayang.task.stray.cap", "topology apply")


def test_worker_with_a_module_that_does_not_import_exits_2(fabric_env: dict[str, str]) -> None:
    run = wayang("worker", "no_such_module:Thing", env=fabric_env)
    assert_one_line_error(run, 2, "no_such_module")
