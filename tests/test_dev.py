"""`wayang-mq dev`, the README's main job, run as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.test_cli import wayang
from tests.test_dev_supervise import zombie_children
from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.dev.nodes import port_in_use
from wayang_mq.testing.harness import WAIT_S, Fabric, eventually

pytestmark = pytest.mark.timeout(180)

PG_LINE = r"PostgreSQL        postgresql://wayang@127\.0\.0\.1:(\d+)/wayang  "


def _rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return list(conn.execute(sql, params).fetchall())


def _drop_private_postgres(state_dir: Path) -> None:
    """As root the stack's cluster lives in the temp dir (state_dir/postgres links to it)."""
    link = state_dir / "postgres"
    if link.is_symlink():
        shutil.rmtree(link.resolve(), ignore_errors=True)


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
        _drop_private_postgres(tmp_path)
    # Then it printed where everything is, showed the demo results, and stopped cleanly
    console = re.search(r"RabbitMQ console  http://127\.0\.0\.1:(\d+)/", output)
    amqp = re.search(r"AMQP URL          amqp://wayang:\S+@127\.0\.0\.1:(\d+)/", output)
    assert console and amqp and "login             wayang / " in output
    assert "started worker demo-0" in output and "started the reaper" in output
    assert "starting a private PostgreSQL" in output and "started the control plane" in output
    database = re.search(PG_LINE, output)
    assert database, output
    assert "==> 6 results" in output
    assert "SUCCESS output={'succeeded_on_attempt': 2}" in output  # a retry, on attempt 2
    # and the control plane recorded every demo task with its result
    assert "==> recorded in PostgreSQL: 6 of 6 demo tasks finished\n" in output
    assert process.returncode == 0, rest
    assert "==> stopping PostgreSQL" in rest and "==> stopping RabbitMQ" in rest
    assert not port_in_use(int(amqp.group(1))) and not port_in_use(int(console.group(1)))
    assert not port_in_use(int(database.group(1)))
    assert (tmp_path / "endpoint.json").exists()


def test_dev_uses_the_broker_and_database_named_by_wayang_amqp_and_database_url(
    fabric: Fabric, record_db: str, tmp_path: Path
) -> None:
    # Given a broker and a database named in the environment
    env = {
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_MANAGEMENT_URL": fabric.endpoint.management_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
        "WAYANG_DATABASE_URL": record_db,
    }
    # When dev runs its demo
    run = wayang(
        "dev", "--state-dir", str(tmp_path), "--demo-tasks", "4", "--no-wait", env=env, timeout=150
    )
    # Then it starts neither a broker nor a database of its own
    assert run.returncode == 0, run.stdout + run.stderr
    assert "using the broker in WAYANG_AMQP_URL" in run.stdout
    assert "starting a private RabbitMQ node" not in run.stdout
    assert "using the database in WAYANG_DATABASE_URL" in run.stdout
    assert "starting a private PostgreSQL" not in run.stdout
    assert not (tmp_path / "postgres").exists()
    assert "==> 4 results" in run.stdout
    # And its control plane recorded the demo in that database
    assert "==> recorded in PostgreSQL: 4 of 4 demo tasks finished\n" in run.stdout
    finished = _rows(
        record_db,
        "SELECT count(*) FROM tasks WHERE capability LIKE 'demo.%%' AND state = 'finished'",
    )
    assert finished[0][0] >= 4


class DevStack:
    """A ``wayang-mq dev`` in the foreground, its output read as it comes."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")}
        command = [sys.executable, "-m", "wayang_mq.cli", "dev", "--state-dir", str(state_dir)]
        self.state_dir = state_dir
        self.process = subprocess.Popen(
            [*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
        )
        self.output = ""

    def until_printed(self, pattern: str, timeout_s: float = WAIT_S) -> re.Match[str]:
        """Until the output matches ``pattern`` (read as it arrives); the match."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while (found := re.search(pattern, self.output)) is None:
            left_s = deadline - time.monotonic()
            assert left_s > 0, f"no {pattern!r} within {timeout_s} s in:\n{self.output}"
            ready, _, _ = select.select([self.process.stdout], [], [], min(left_s, 0.5))
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                assert chunk, f"dev exited ({self.process.poll()}):\n{self.output}"
                self.output += chunk.decode(errors="replace")
        return found

    def stop(self) -> None:
        """SIGTERM, as Ctrl-C would; SIGKILL if it does not end."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def older_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir as an older version left it: open directories, a world-readable config."""
    state_dir = tmp_path_factory.mktemp("dev") / "state"
    (state_dir / "rabbitmq").mkdir(parents=True)
    for directory in (state_dir, state_dir / "rabbitmq"):
        directory.chmod(0o755)
    for name in ("endpoint.json", "rabbitmq/rabbitmq.conf"):
        (state_dir / name).write_text("# an older run's\n")
        (state_dir / name).chmod(0o644)
    return state_dir


@pytest.fixture(scope="module")
def dev_stack(older_state: Path) -> Iterator[DevStack]:
    """One ``wayang-mq dev`` with a single worker (so it alone serves), up and running."""
    stack = DevStack(older_state, "--workers", "1", "--demo-tasks", "3")
    try:
        stack.until_printed("==> running", timeout_s=150)
        yield stack
    finally:
        stack.stop()
        _drop_private_postgres(older_state)


def test_dev_keeps_its_secrets_0600_in_0700_directories(dev_stack: DevStack) -> None:
    # Given dev started on a state dir an older version left open (see older_state)
    state_dir = dev_stack.state_dir
    # When it runs, Then every file that holds the password or the signing key is the owner's
    # alone, and every directory it keeps them in is closed to others
    (key,) = (state_dir / "keys").glob("*.key")
    secrets = ["endpoint.json", "rabbitmq/rabbitmq.conf", "rabbitmq/wayang-node.json"]
    secrets += [f"keys/{key.name}", "logs/demo-0.log", "logs/reaper.log"]
    secrets += ["logs/control-plane.log"]
    for secret in secrets:
        assert _mode(state_dir / secret) == 0o600, secret
    for directory in (".", "rabbitmq", "rabbitmq/mnesia", "rabbitmq/log", "keys", "logs"):
        assert _mode(state_dir / directory) == 0o700, directory
    # (Erlang makes its cookie 0400 itself, and refuses one that others can read)
    assert _mode(state_dir / "rabbitmq" / ".erlang.cookie") & 0o077 == 0


async def test_dev_reports_and_restarts_a_killed_worker_which_then_serves_tasks(
    dev_stack: DevStack,
) -> None:
    # Given dev running one worker
    first = int(dev_stack.until_printed(r"started worker demo-0 \(pid (\d+),").group(1))

    # When the worker is killed with SIGKILL
    os.kill(first, signal.SIGKILL)

    # Then dev says which daemon died, how, and that it restarts it; then that it did
    exited = dev_stack.until_printed(r"==> event=daemon\.exited daemon=demo-0 .*\n").group(0)
    assert f"kind=worker pid={first} signal=SIGKILL" in exited and "next=restart" in exited
    restarted = dev_stack.until_printed(
        r"event=daemon\.restarted daemon=demo-0 kind=worker pid=(\d+)\n"
    )
    second = int(restarted.group(1))
    assert second != first
    # And the dead worker was reaped: dev has no zombie children
    await eventually(lambda: not zombie_children(dev_stack.process.pid), what="no zombies")
    # And tasks still get results, from the new process (the only worker there is)
    env = {"WAYANG_STATE_DIR": str(dev_stack.state_dir)}
    run = wayang("submit", "demo.echo", "--input", '{"after": "restart"}', "--wait", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["status"] == "SUCCESS" and result["executor_id"] == "demo-0"
    os.kill(second, 0)  # still the one running


async def test_dev_runs_each_daemon_under_its_own_role_account(dev_stack: DevStack) -> None:
    # Given dev running, When one looks at what it saved and at the broker's connections
    saved = json.loads((dev_stack.state_dir / "endpoint.json").read_text())
    users = {role: urlsplit(url).username for role, url in saved["accounts"].items()}
    # Then another terminal finds a dispatcher's, an executor's, the reaper's and the control
    # plane's account
    assert users == {
        "dispatcher": "dev-dispatcher",
        "executor": "dev-executor",
        "reaper": "dev-reaper",
        "control-plane": "dev-control-plane",
    }
    admin = management_client(BrokerEndpoint.from_url(saved["amqp_url"], saved["management_url"]))

    async def connected() -> dict[str, str]:
        rows = await asyncio.to_thread(admin._request, "GET", "/api/connections")
        # a connection is named "<kind> <id> ...": "worker demo-0 (demo.echo, ...)"
        named = {r["client_properties"].get("connection_name", ""): r["user"] for r in rows}
        return {[*name.split(), ""][1]: user for name, user in named.items()}

    # and the worker, the reaper and the control plane are connected as themselves, not as
    # the administrator
    wanted = {"demo-0": "demo-0", "dev-reaper": "dev-reaper"}
    wanted["dev-control-plane"] = "dev-control-plane"
    await eventually(
        lambda: _has(connected(), wanted),
        what="demo-0, dev-reaper and dev-control-plane connected under their own accounts",
        timeout_s=30,  # the management API lists a connection a few seconds after it opens
    )
    # And a worker started in another terminal runs as the executor account, with an id of it
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")}
    env["WAYANG_STATE_DIR"] = str(dev_stack.state_dir)
    worker = subprocess.Popen(
        [sys.executable, "-m", "wayang_mq.cli", "worker", "wayang_workers.demo:Echo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
    )
    try:
        # (its stderr is a pipe, not a terminal: it logs JSON lines)
        output = _read_until(worker, '"event": "worker.started"', 60)
        started = next(
            json.loads(line) for line in output.splitlines() if '"event": "worker.started"' in line
        )
        assert re.fullmatch(r"dev-executor--[0-9a-f]{8}", started["id"]), started
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)


async def _has(rows: Awaitable[dict[str, str]], wanted: dict[str, str]) -> bool:
    found = await rows
    return all(found.get(name) == user for name, user in wanted.items())


def test_dev_records_the_demo_in_its_database_which_another_terminal_finds(
    dev_stack: DevStack,
) -> None:
    # Given dev running, which printed where its database is
    printed = dev_stack.until_printed(PG_LINE)
    dev_stack.until_printed(r"==> recorded in PostgreSQL: 3 of 3 demo tasks finished\n")
    # When another terminal reads the database URL dev saved
    saved = json.loads((dev_stack.state_dir / "endpoint.json").read_text())
    url = saved["database_url"]
    assert urlsplit(url).port == int(printed.group(1))
    # Then the control plane's record holds the demo's tasks, finished, and the worker
    finished = _rows(url, "SELECT capability FROM tasks WHERE state = 'finished'")
    assert {"demo.sleep", "demo.fail"} <= {row[0] for row in finished}
    executors = _rows(url, "SELECT executor_id FROM executors")
    assert ("demo-0",) in executors
    # and the demo workers claimed them first (--claims, under their executor accounts)
    claimed = _rows(
        url, "SELECT t.capability, c.executor_id FROM claims c JOIN tasks t USING (task_id)"
    )
    assert {"demo.sleep", "demo.fail"} <= {capability for capability, _ in claimed}
    assert {executor for _, executor in claimed} <= {"demo-0", "demo-1"}
    # and nothing the fabric sent was refused
    assert _rows(url, "SELECT coalesce(sum(count), 0) FROM refusals") == [(0,)]
    # And `wayang-mq db migrate` there finds the same database, already up to date
    run = wayang("db", "migrate", env={"WAYANG_STATE_DIR": str(dev_stack.state_dir)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "applied" not in run.stdout and "schema at version" in run.stdout


async def test_dev_reports_and_restarts_a_killed_control_plane_which_then_records(
    dev_stack: DevStack,
) -> None:
    # Given dev running its control plane
    first = int(dev_stack.until_printed(r"started the control plane \(pid (\d+),").group(1))
    # When it is killed with SIGKILL
    os.kill(first, signal.SIGKILL)
    # Then dev says so and starts it again
    exited = dev_stack.until_printed(r"event=daemon\.exited daemon=dev-control-plane .*\n")
    assert f"kind=control-plane pid={first} signal=SIGKILL" in exited.group(0)
    dev_stack.until_printed(r"event=daemon\.restarted daemon=dev-control-plane ")
    # And a task run after that is recorded, finished
    env = {"WAYANG_STATE_DIR": str(dev_stack.state_dir)}
    run = wayang("submit", "demo.echo", "--input", '{"after": "cp restart"}', "--wait", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    task_id = json.loads(run.stdout)["task_id"]
    url = json.loads((dev_stack.state_dir / "endpoint.json").read_text())["database_url"]
    sql = "SELECT state FROM tasks WHERE task_id = %s"
    await eventually(
        lambda: _rows(url, sql, task_id) == [("finished",)], what="the task recorded finished"
    )
