"""Worker processes under test, and what /proc says about them (peak RSS, CPU time)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class WorkerProcess:
    """One worker daemon started by the bench, in its own session so it can be stopped whole."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls,
        name: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_dir: Path,
    ) -> WorkerProcess:
        """Start ``command`` with stdout and stderr going to ``<log_dir>/<name>.log``."""
        log_path = log_dir / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                list(command),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, process, log_path)

    @property
    def pid(self) -> int:
        """The worker's process id (the Python interpreter itself, no shell in between)."""
        return self.process.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """The worker and any children it forked (a prefork pool): its process group."""
        return processes_in_group(self.pid)

    def peak_rss_mib(self) -> float:
        """Peak resident set size so far (``VmHWM``), in MiB, summed over the group."""
        return sum(self.peak_rss_each_mib())

    def peak_rss_each_mib(self) -> list[float]:
        """Each process's peak resident set size so far (``VmHWM``), in MiB."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(OSError, KeyError):
                found.append(_status_kib(pid, "VmHWM") / 1024)
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU time the group has used so far."""
        return group_cpu_seconds(self.pids())

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (a graceful stop for all three workers), then SIGKILL after ``timeout_s``."""
        if self.alive():
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait()
        # The session may hold helpers (none expected); they must not outlive the bench.
        _signal_group(self.process, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the worker's log, for an error message."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class WorkerSet:
    """The worker processes of one system (``--workers N``), each started in its own session;
    CPU and memory are counted over every process of every session (forked children too)."""

    name: str
    members: list[WorkerProcess]

    @property
    def pid(self) -> int:
        """The first worker's process id."""
        return self.members[0].pid

    def alive(self) -> bool:
        """True while every worker runs."""
        return all(member.alive() for member in self.members)

    def pids(self) -> list[int]:
        """Every process of every worker."""
        return [pid for member in self.members for pid in member.pids()]

    def cpu_seconds(self) -> float:
        """User + system CPU time all of them have used so far."""
        return group_cpu_seconds(self.pids())

    def peak_rss_mib(self) -> tuple[float, float, int]:
        """The largest single process's peak RSS, the sum of every process's peak RSS (MiB;
        an upper bound: pages a forked child shares with its parent count in both), and
        how many processes there were."""
        each = [mib for member in self.members for mib in member.peak_rss_each_mib()]
        return (max(each, default=0.0), sum(each), len(each))

    def stop(self) -> None:
        """Stop them all (SIGTERM to all at once, then SIGKILL), each even if another failed."""
        for member in self.members:
            if member.alive():
                _signal_group(member.process, signal.SIGTERM)
        for member in self.members:
            with contextlib.suppress(Exception):
                member.stop()

    def log_tail(self, lines: int = 20) -> str:
        """The end of each worker's log."""
        return "\n".join(f"--- {m.log_path} (tail)\n{m.log_tail(lines)}" for m in self.members)


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the name; index 0 is the state, 2 the group, 11/12 CPU."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()  # the name in (...) may contain spaces


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def processes_in_group(pgid: int) -> list[int]:
    """Live processes of one process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat_fields(int(entry.name))[2]) == pgid:
                    found.append(int(entry.name))
    return found


def processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (a private RabbitMQ node's VM)."""
    found = []
    target = str(directory.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "cwd") == target:
                found.append(int(entry.name))
    return found


def group_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time of several processes; those that exited meanwhile count as zero."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += process_cpu_seconds(pid)
    return total
