"""`wayang-mq dev`, the README's main job, run as a user runs it."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import wayang
from wayang_mq.dev.nodes import port_in_use
from wayang_mq.testing.harness import Fabric

pytestmark = pytest.mark.timeout(180)


def _read_until(process: subprocess.Popen[bytes], marker: str, timeout_s: float) -> str:
    """Read the raw pipe (no buffered readline: select() cannot see what a buffer holds)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    seen = ""
    deadline = time.monotonic() + timeout_s
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in:\n{seen}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"dev exited ({process.poll()}) before {marker!r}:\n{seen}"
            seen += chunk.decode(errors="replace")
    return seen


def test_dev_runs_the_fabric_in_the_foreground_and_sigterm_stops_it_cleanly(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wayang_mq.cli",
            "dev",
            "--state-dir",
            str(tmp_path),
            "--demo-tasks",
            "6",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
    )
    try:
        # Given the stack started, When it reports that it runs
        output = _read_until(process, "==> running", 150)
    finally:
        # And SIGTERM arrives
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=90)[0].decode(errors="replace")
    # Then it printed where everything is, showed the demo results, and stopped cleanly
    console = re.search(r"RabbitMQ console  http://127\.0\.0\.1:(\d+)/", output)
    amqp = re.search(r"AMQP URL          amqp://wayang:\S+@127\.0\.0\.1:(\d+)/", output)
    assert console and amqp and "login             wayang / " in output
    assert "started worker demo-0" in output and "started the reaper" in output
    assert "==> 6 results" in output
    assert "SUCCESS output={'succeeded_on_attempt': 2}" in output  # a retry, on attempt 2
    assert process.returncode == 0, rest
    assert "==> stopping RabbitMQ" in rest
    assert not port_in_use(int(amqp.group(1))) and not port_in_use(int(console.group(1)))
    assert (tmp_path / "endpoint.json").exists()


def test_dev_uses_the_broker_named_by_wayang_amqp_url(fabric: Fabric, tmp_path: Path) -> None:
    env = {
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_MANAGEMENT_URL": fabric.endpoint.management_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
    }
    run = wayang(
        "dev", "--state-dir", str(tmp_path), "--demo-tasks", "4", "--no-wait", env=env, timeout=150
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "using the broker in WAYANG_AMQP_URL" in run.stdout
    assert "starting a private RabbitMQ node" not in run.stdout
    assert "==> 4 results" in run.stdout
