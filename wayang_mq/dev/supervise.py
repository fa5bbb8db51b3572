"""Keeping ``wayang-mq dev``'s daemons up: each exit is reaped, reported and restarted.

A worker or the reaper that dies (``kill -9``, a crash, an exit of its own) is waited for at
once, so it never lingers as a zombie; one structured line says which daemon, which pid, how
it ended and what happens next; it is started again after a backoff. One that keeps dying
soon after starting is given up on, with a line saying so, and the others keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wayang_mq.core import logs
from wayang_mq.core.private_files import open_private_log


@dataclass(frozen=True)
class DaemonSpec:
    """One daemon to keep running: a unique name, its kind, how to start it, where it logs."""

    name: str
    kind: str  # worker | reaper: for the person reading the lines
    command: tuple[str, ...]
    env: Mapping[str, str]
    log_path: Path


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart an exited daemon, and when to stop trying.

    A run shorter than ``stable_after_s`` is a *quick* exit. The delay before a restart
    doubles with each quick exit in a row, from ``first_delay_s`` up to ``max_delay_s``;
    after ``max_quick_exits`` in a row the daemon is given up on. A run that lasted resets
    the count: a worker killed once an hour is restarted every time.
    """

    first_delay_s: float = 0.5
    max_delay_s: float = 8.0
    stable_after_s: float = 30.0
    max_quick_exits: int = 5

    def delay_s(self, quick_exits: int) -> float:
        """The wait before the next start, after ``quick_exits`` quick exits in a row."""
        return float(min(self.max_delay_s, self.first_delay_s * 2 ** max(0, quick_exits - 1)))


def describe_exit(returncode: int) -> dict[str, Any]:
    """``signal=SIGKILL`` for a daemon killed by a signal, else ``exit_code=N``."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return {"signal": signal.Signals(-returncode).name}
        return {"signal": -returncode}
    return {"exit_code": returncode}


class Supervisor:
    """Starts daemons and keeps them running until :meth:`stop`; ``report`` gets each line."""

    def __init__(
        self,
        report: Callable[[str], None],
        policy: RestartPolicy | None = None,
        *,
        stop_timeout_s: float = 40.0,
    ) -> None:
        self._report = report
        self._policy = policy or RestartPolicy()
        self._stop_timeout_s = stop_timeout_s
        self._running: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False

    def pid(self, name: str) -> int | None:
        """The pid of the daemon's current process; None while it is down or given up."""
        process = self._running.get(name)
        return process.pid if process is not None and process.returncode is None else None

    async def start(self, spec: DaemonSpec) -> int:
        """Start the daemon and watch it from now on; its first pid."""
        process = await self._spawn(spec)
        watcher = asyncio.create_task(self._watch(spec, process), name=f"watch-{spec.name}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return process.pid

    async def stop(self) -> None:
        """SIGTERM every daemon (they drain), SIGKILL any still up after the timeout."""
        self._stopping = True  # no restarts from here on
        watchers = list(self._watchers)
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.gather(*(self._terminate(p) for p in self._running.values()))

    async def _spawn(self, spec: DaemonSpec) -> asyncio.subprocess.Process:
        log = open_private_log(spec.log_path)
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.command, env=dict(spec.env), stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        finally:
            os.close(log)  # the child holds its own copy
        self._running[spec.name] = process
        return process

    async def _watch(self, spec: DaemonSpec, process: asyncio.subprocess.Process) -> None:
        """Wait for each exit (asyncio reaps it), report it, restart or give up."""
        quick_exits = 0
        while True:
            started = time.monotonic()
            returncode = await process.wait()
            ran_s = time.monotonic() - started
            if self._stopping:
                return
            quick_exits = quick_exits + 1 if ran_s < self._policy.stable_after_s else 0
            if quick_exits >= self._policy.max_quick_exits:
                self._exited(spec, process, returncode, ran_s, give_up=quick_exits)
                return
            delay_s = self._policy.delay_s(quick_exits)
            self._exited(spec, process, returncode, ran_s, restart_in_s=delay_s)
            await asyncio.sleep(delay_s)
            try:
                process = await self._spawn(spec)
            except OSError as error:
                self._say("daemon.gave_up", daemon=spec.name, kind=spec.kind, reason=str(error))
                return
            self._say("daemon.restarted", daemon=spec.name, kind=spec.kind, pid=process.pid)

    def _exited(
        self,
        spec: DaemonSpec,
        process: asyncio.subprocess.Process,
        returncode: int,
        ran_s: float,
        *,
        restart_in_s: float | None = None,
        give_up: int | None = None,
    ) -> None:
        if give_up is not None:
            window = f"{self._policy.stable_after_s:g} s"
            next_step = "give_up"
            reason = f"{give_up} exits in a row, each within {window} of starting; others run on"
        else:
            next_step, reason = "restart", None
        self._say(
            "daemon.exited",
            daemon=spec.name,
            kind=spec.kind,
            pid=process.pid,
            **describe_exit(returncode),
            ran_s=f"{ran_s:.1f}",
            next=next_step,
            restart_in_s=None if restart_in_s is None else f"{restart_in_s:g}",
            reason=reason,
            log=spec.log_path,
        )

    def _say(self, event: str, **fields: Any) -> None:
        self._report(f"==> {logs.line(event, **fields)}")

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self._stop_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
