"""``wayang-mq top`` and the ``submit --wait`` progress bar, in a real terminal (tmux) against
the real broker and database: the depths a backlog shows, a worker draining it and appearing
in the registry, a broker that cannot be reached, and a bar that moves with the task."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from wayang_workers.demo import Sleep

from tests.test_cli import wayang
from wayang_mq.cli.exits import Exit
from wayang_mq.core.model import Progress, Status
from wayang_mq.testing.harness import Fabric, eventually

BACKLOG = 6


@pytest.fixture(autouse=True)
async def _left_clean(fabric: Fabric) -> AsyncIterator[None]:
    await fabric.purge("demo.sleep", "demo.echo")
    yield
    await fabric.purge("demo.sleep", "demo.echo")


class Terminal:
    """A private tmux server (its own socket in the test's directory: no one else's sessions
    are touched) running one command in a 160x50 pane; the pane stays after the command
    exits, saying its exit code."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "tmux.sock")

    def run(self, args: list[str], env: dict[str, str]) -> None:
        """Start ``wayang-mq ARGS`` with ``env`` on top of a clean WAYANG_* environment."""
        base = {
            k: v
            for k, v in os.environ.items()
            # the pane's own: a terminal 160 columns wide, of tmux's type
            if not k.startswith("WAYANG_") and k not in ("COLUMNS", "LINES", "TERM")
        }
        script = self.workdir / "command.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (base | env).items())
        command = shlex.join([sys.executable, "-m", "wayang_mq.cli", *args])
        # the shell survives a Ctrl-C meant for the command (its trap is reset in the child)
        # and takes its size from the pane (160 columns), whatever COLUMNS says
        trap = "trap 'true' INT\nunset COLUMNS LINES\n"
        script.write_text(f'{trap}{exports}{command}\necho "[exited $?]"\nexec sleep 600\n')
        self._tmux("new-session", "-d", "-x", "160", "-y", "50", "-s", "t", "sh", str(script))

    def screen(self) -> str:
        """What the pane shows now."""
        return self._tmux("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def _config(self) -> Path:
        """No user configuration; a pane whose command died stays, for the last capture."""
        config = self.workdir / "tmux.conf"
        if not config.exists():
            config.write_text("set -g remain-on-exit on\n")
        return config

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)

    def _tmux(self, *args: str) -> str:
        run = subprocess.run(
            ["tmux", "-S", self.socket, "-f", str(self._config()), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return run.stdout

    async def until_shown(self, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
        """Until the pane shows ``pattern`` (a regex); its match."""
        found: list[re.Match[str]] = []

        def shown() -> bool:
            match = re.search(pattern, self.screen(), re.MULTILINE)
            found[:] = [match] if match else []
            return match is not None

        try:
            await eventually(shown, timeout_s=timeout_s, interval_s=0.2, what=repr(pattern))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pane shows:\n{self.screen()}") from None
        return found[0]


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: run ./scripts/setup (it installs tmux)")
    term = Terminal(tmp_path)
    yield term
    term.close()


def _row(capability: str, queues: int, depth: int, ready: int, unacked: int) -> str:
    """The regex of a capability's line in the CAPABILITIES table."""
    cells = r"\s+".join(str(n) for n in (queues, depth, ready, unacked))
    return rf"^\s*{re.escape(capability)}\s+{cells}\s"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_top_shows_a_backlog_drain_as_a_worker_takes_it(
    fabric: Fabric,
    fabric_env: dict[str, str],
    record_db: str,
    terminal: Terminal,
    tmp_path: Path,
) -> None:
    await fabric.purge_record()
    async with (
        fabric.control_plane(record_db),
        fabric.dispatcher(supervision=None) as dispatcher,
    ):
        # Given a backlog on demo.sleep, which no worker serves: quick tasks and a slow one
        for _ in range(BACKLOG - 1):
            await dispatcher.submit("demo.sleep", {"seconds": 0}, queue_timeout_s=120)
        slow = await dispatcher.submit("demo.sleep", {"seconds": 8}, queue_timeout_s=120)
        # When top runs in a terminal, with the record's database
        env = fabric_env | {"WAYANG_DATABASE_URL": record_db, "WAYANG_STATE_DIR": str(tmp_path)}
        args = [
            "top",
            "--interval",
            "0.5",
            "--capability",
            "demo.sleep",
            "--capability",
            "demo.echo",
        ]
        terminal.run(args, env)
        # Then it shows the capability's depth: all ready, none delivered, no consumer
        await terminal.until_shown(_row("demo.sleep", 1, BACKLOG, BACKLOG, 0) + r".*\s0\s+0$")
        screen = terminal.screen()
        assert re.search(r"^wayang-mq top · broker http://", screen, re.MULTILINE), screen
        assert "alarms: none" in screen and "q quit" in screen
        assert re.search(r"^\s*1s 0 · 5s 0", screen.replace("retry tiers (waiting): ", ""), re.M)
        assert "no live executor in the registry" in screen
        # When a worker starts serving demo.sleep
        worker = fabric.spawn_worker(["wayang_workers.demo:Sleep"], executor_id="top-worker")
        await worker.until_logged("event=worker.started")
        # Then the slow task shows running on it, with its progress, the executor live
        running = rf"{slow.task_id[:12]}\S*\s+demo\.sleep\s+top-worker\s+1\s+\d+s\s+\d+% slept"
        await terminal.until_shown(running)
        await terminal.until_shown(r"^\s*top-worker\s+\d+%\s+[01]/8\s+\d+s ago\s+demo\.sleep")
        # and once it is done the queue is empty, the worker its consumer
        assert (await slow.result(30)).status is Status.SUCCESS
        await terminal.until_shown(_row("demo.sleep", 1, 0, 0, 0) + r".*\s1\s+0$")
        # When q is pressed, it exits 0
        terminal.keys("q")
        await terminal.until_shown(r"^\[exited 0\]")
        worker.stop()


async def test_top_once_prints_one_plain_frame_without_a_database(
    fabric: Fabric, fabric_env: dict[str, str], tmp_path: Path
) -> None:
    # Given two tasks waiting on demo.echo, db.query (4 shards) idle, and no database configured
    async with fabric.dispatcher(supervision=None) as dispatcher:
        for n in range(2):
            await dispatcher.submit("demo.echo", {"n": n}, queue_timeout_s=60)
    env = fabric_env | {"WAYANG_STATE_DIR": str(tmp_path)}

    async def frame_shows_two() -> bool:
        run = wayang(
            "top", "--once", "--capability", "demo.echo", "--capability", "db.query", env=env
        )
        frames.append(run)
        return re.search(_row("demo.echo", 1, 2, 2, 0), run.stdout, re.MULTILINE) is not None

    frames: list[subprocess.CompletedProcess[str]] = []
    # When top --once runs with stdout a pipe (the management API's numbers lag up to 5 s)
    await eventually(frame_shows_two, timeout_s=30, interval_s=1, what="a frame with depth 2")
    run = frames[-1]
    # Then it printed one plain frame (no escape codes, no keys footer) and exited 0
    assert run.returncode == Exit.OK, run.stderr
    assert "\x1b" not in run.stdout and "q quit" not in run.stdout
    assert run.stdout.count("wayang-mq top ·") == 1 and "demo.sleep" not in run.stdout
    assert "no database (set WAYANG_DATABASE_URL" in run.stdout
    assert "EXECUTORS (the broker's consumers)" in run.stdout
    # and a sharded capability is its four shard queues, summed
    assert re.search(_row("db.query", 4, 0, 0, 0), run.stdout, re.MULTILINE), run.stdout


async def test_an_unreachable_broker_is_an_error_line_and_top_keeps_refreshing(
    fabric_env: dict[str, str], terminal: Terminal, tmp_path: Path
) -> None:
    # Given a management URL where nothing listens
    dead = f"http://127.0.0.1:{_closed_port()}"
    env = fabric_env | {"WAYANG_MANAGEMENT_URL": dead, "WAYANG_STATE_DIR": str(tmp_path)}
    # When top runs in a terminal
    terminal.run(["top", "--interval", "0.5"], env)
    # Then it says so, and keeps refreshing (the clock moves on) instead of exiting
    first = await terminal.until_shown(rf"broker unreachable at {re.escape(dead)}, retrying: ")
    clock = r"(\d\d:\d\d:\d\d) UTC"
    shown_at = (await terminal.until_shown(clock)).group(1)
    later = await terminal.until_shown(rf"(?!{shown_at})\d\d:\d\d:\d\d UTC", timeout_s=10)
    assert first and later and "[exited" not in terminal.screen()
    # and --once says it too, exiting 3 (unreachable)
    once = wayang("top", "--once", env=env)
    assert once.returncode == Exit.UNREACHABLE
    assert (
        f"broker unreachable at {dead}, retrying" in once.stdout and "Traceback" not in once.stderr
    )
    terminal.keys("C-c")
    await terminal.until_shown(r"^\[exited 130\]")


async def test_a_handle_yields_its_tasks_progress_until_the_result(fabric: Fabric) -> None:
    # Given a worker serving demo.sleep and a dispatcher
    async with fabric.worker([Sleep()]), fabric.dispatcher() as dispatcher:
        # When a 2.5 s sleep is submitted and its progress watched
        handle = await dispatcher.submit("demo.sleep", {"seconds": 2.5})
        seen: list[Progress] = [event async for event in handle.progress()]
        # Then the iteration ended with the result, having seen the fractions grow
        assert handle.done() and (await handle.result(0)).status is Status.SUCCESS
    fractions = [p.fraction for p in seen]
    assert len(fractions) >= 2 and fractions == sorted(fractions), fractions
    assert fractions[-1] == 1.0 and all(p.task_id == handle.task_id for p in seen)


async def test_submit_wait_draws_a_moving_bar_and_prints_the_result(
    fabric: Fabric, fabric_env: dict[str, str], terminal: Terminal, tmp_path: Path
) -> None:
    # Given a demo worker
    worker = fabric.spawn_worker(["wayang_workers.demo:Sleep"], executor_id="bar-worker")
    await worker.until_logged("event=worker.started")
    env = fabric_env | {"WAYANG_STATE_DIR": str(tmp_path)}
    # When a 3 s sleep is submitted with --wait in a terminal
    terminal.run(["submit", "demo.sleep", "--input", '{"seconds": 3}', "--wait"], env)
    percents: list[int] = []
    deadline = time.monotonic() + 30
    while "[exited" not in (screen := terminal.screen()) and time.monotonic() < deadline:
        bar = re.search(r"demo\.sleep \S+ .*?(\d+)%", screen)
        if bar and (not percents or percents[-1] != int(bar.group(1))):
            percents.append(int(bar.group(1)))
        await _pause(0.1)
    # Then the bar moved up through the task's progress, and the result JSON followed
    assert len(percents) >= 3 and percents == sorted(percents), percents
    assert any(0 < p < 100 for p in percents) and percents[-1] == 100, percents
    assert "[exited 0]" in screen, screen
    assert '"status": "SUCCESS"' in screen and '"slept_s": 3.0' in screen
    # and without a terminal, stdout is the result JSON alone (no bar anywhere)
    piped = wayang(
        "submit", "demo.sleep", "--input", '{"seconds": 1}', "--wait", env=env, timeout=60
    )
    assert piped.returncode == Exit.OK, piped.stderr
    assert json.loads(piped.stdout)["output"] == {"slept_s": 1.0}
    assert "%" not in piped.stderr
    worker.stop()


async def _pause(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
