"""``wayang-mq dev``'s supervisor on its own: exits are reaped, reported, restarted, given up."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from wayang_mq.dev.supervise import DaemonSpec, RestartPolicy, Supervisor
from wayang_mq.testing.harness import eventually

pytestmark = pytest.mark.timeout(60)

QUICK = RestartPolicy(first_delay_s=0.01, max_delay_s=0.05, stable_after_s=30, max_quick_exits=3)


def python(code: str, name: str, log_dir: Path) -> DaemonSpec:
    """A stand-in daemon: a Python process running ``code``."""
    command = (sys.executable, "-c", code)
    return DaemonSpec(name, "worker", command, dict(os.environ), log_dir / f"{name}.log")


def zombie_children(parent: int) -> list[int]:
    """Children of ``parent`` that exited and were never waited for."""
    zombies = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue  # gone meanwhile
        if fields["PPid"].strip() == str(parent) and fields["State"].strip().startswith("Z"):
            zombies.append(int(status.parent.name))
    return zombies


def zombie(pid: int) -> bool:
    """True while ``pid`` has exited but its parent has not waited for it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False  # reaped: gone
    return any(
        line.split()[1:2] == ["Z"] for line in status.splitlines() if line.startswith("State")
    )


def test_the_backoff_doubles_up_to_its_bound() -> None:
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=3)
    assert [policy.delay_s(n) for n in range(6)] == [0.5, 0.5, 1, 2, 3, 3]


async def test_a_killed_daemon_is_reaped_reported_and_restarted(tmp_path: Path) -> None:
    # Given a supervised daemon
    lines: list[str] = []
    supervisor = Supervisor(lines.append, QUICK)
    first = await supervisor.start(python("import time; time.sleep(600)", "sleeper", tmp_path))
    try:
        # When it is killed with SIGKILL
        os.kill(first, signal.SIGKILL)

        # Then a line says which daemon, which pid, how it ended and what comes next
        await eventually(lambda: any("daemon.restarted" in line for line in lines))
        exited = next(line for line in lines if "daemon.exited" in line)
        assert f"daemon=sleeper kind=worker pid={first} signal=SIGKILL" in exited
        assert "next=restart restart_in_s=0.01" in exited
        # And it runs again under a new pid, and the dead one is not left a zombie
        second = supervisor.pid("sleeper")
        assert second is not None and second != first
        assert f"pid={second}" in lines[-1]
        os.kill(second, 0)
        assert not zombie(first)
    finally:
        await supervisor.stop()
    assert supervisor.pid("sleeper") is None


async def test_a_daemon_that_keeps_dying_is_given_up_and_the_others_run_on(
    tmp_path: Path,
) -> None:
    # Given a daemon that exits with code 3 as soon as it starts, next to a healthy one
    lines: list[str] = []
    supervisor = Supervisor(lines.append, QUICK)
    await supervisor.start(python("raise SystemExit(3)", "crasher", tmp_path))
    healthy = await supervisor.start(python("import time; time.sleep(600)", "healthy", tmp_path))
    try:
        # When it has died max_quick_exits times in a row
        await eventually(lambda: any("next=give_up" in line for line in lines))

        # Then each exit was reported, restarts stopped at the bound, and the last line says so
        exits = [line for line in lines if "daemon=crasher" in line and "daemon.exited" in line]
        assert len(exits) == QUICK.max_quick_exits
        assert all("exit_code=3" in line for line in exits)
        assert "next=give_up" in exits[-1] and "3 exits in a row" in exits[-1]
        assert sum("daemon=crasher" in line and "restarted" in line for line in lines) == 2
        assert supervisor.pid("crasher") is None
        # And the healthy daemon was never touched
        assert supervisor.pid("healthy") == healthy
        assert not any("daemon=healthy" in line for line in lines)
        dead = [int(line.split(" pid=")[1].split()[0]) for line in exits]
        assert len(set(dead)) == len(dead) and not any(zombie(pid) for pid in dead)
    finally:
        await supervisor.stop()
