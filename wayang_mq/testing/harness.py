"""A harness for testing executors against a real broker, in-process or as real daemons.

``Fabric`` is a broker with the topology applied and a signing key: it hands out workers,
dispatchers and worker processes configured to trust each other. Users test their own
executors with it the way wayang-mq tests its own (``wayang_mq.testing.plugin`` provides the
broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aio_pika

from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.client.dispatcher import Dispatcher, DispatcherConfig
from wayang_mq.controlplane.config import ControlPlaneConfig
from wayang_mq.controlplane.daemon import ControlPlane
from wayang_mq.core import names
from wayang_mq.core.signing import KeyRing, Signer, write_keypair
from wayang_mq.ops.reaper import Reaper, ReaperConfig
from wayang_mq.runtime.executor import Executor
from wayang_mq.runtime.worker import Worker, WorkerConfig
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import DEFAULT_TOPOLOGY_PATH, Topology, load_topology


class Daemon(Protocol):
    """What the in-process daemons (worker, reaper) have in common."""

    async def run(self) -> None: ...

    async def wait_ready(self) -> None: ...

    def stop(self) -> None: ...


D = TypeVar("D", bound=Daemon)

#: how long a test waits for something that should happen, by default: generous, because a
#: loaded 2-core machine is slow, and a wait by condition costs nothing when it comes early
WAIT_S = 30.0


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float = WAIT_S,
    interval_s: float = 0.05,
    what: str = "the condition",
) -> None:
    """Until ``condition()`` is true; AssertionError naming ``what`` after ``timeout_s``.

    Tests wait by condition, never by sleeping a fixed time: a fixed sleep is either too long
    (slow suite) or too short on a loaded machine (flaky, or a late event missed).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = condition()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def _serving(daemon: D) -> AsyncIterator[D]:
    """Run ``daemon`` in this event loop until the block ends; a start-up error is raised."""
    running = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.wait_ready())
    done, _ = await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
    if running in done:
        ready.cancel()
        running.result()  # raises the start-up error
    try:
        yield daemon
    finally:
        daemon.stop()
        await running


@dataclass
class WorkerProcess:
    """A ``wayang-mq worker`` daemon started as its own OS process."""

    executor_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started_event: str = "worker.started"  # the line that says the daemon consumes

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def json_lines(self) -> list[dict[str, Any]]:
        """The lines it logged as JSON (``--log-format json``), parsed; other lines skipped."""
        parsed = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    parsed.append(json.loads(line))
        return parsed

    def wait_started(self, timeout_s: float = 30.0) -> None:
        """Until the daemon logs that it consumes; raises with its log if it died first."""
        deadline = time.monotonic() + timeout_s
        marks = (f"event={self.started_event}", f'"event": "{self.started_event}"')  # text, JSON
        while time.monotonic() < deadline:
            log = self.log()
            if any(mark in log for mark in marks):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"worker {self.executor_id} did not start:\n{self.log()[-3000:]}")

    async def until_logged(self, text: str, timeout_s: float = WAIT_S) -> None:
        """Until the daemon's log contains ``text``."""
        await eventually(
            lambda: text in self.log(),
            timeout_s=timeout_s,
            what=f"{self.executor_id} logging {text!r}",
        )

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal (SIGTERM to stop gently, SIGKILL to crash, SIGSTOP to hang)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout_s: float = 60.0) -> int:
        """The exit code, once the process has ended."""
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; safe to call twice."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Fabric:
    """A broker with the topology applied, a key pair both sides trust, and a scratch dir."""

    endpoint: BrokerEndpoint
    workdir: Path
    topology: Topology
    signer: Signer = field(default_factory=Signer.generate)
    processes: list[WorkerProcess] = field(default_factory=list)

    @classmethod
    async def create(
        cls, endpoint: BrokerEndpoint, workdir: Path, topology: Topology | Path | None = None
    ) -> Fabric:
        """Apply the topology (idempotent) and write the key pair into ``workdir/keys``."""
        if not isinstance(topology, Topology):
            topology = load_topology(topology or DEFAULT_TOPOLOGY_PATH)
        await apply_topology(topology, endpoint.amqp_url, management_client(endpoint))
        fabric = cls(endpoint, workdir, topology)
        write_keypair(fabric.key_dir, fabric.signer)
        return fabric

    @property
    def key_dir(self) -> Path:
        """Holds the signing key and its public half; worker daemons trust it."""
        return self.workdir / "keys"

    @property
    def keyring(self) -> KeyRing:
        """The public key of the fabric's signer."""
        return KeyRing.of([self.signer.public_key])

    def worker_config(self, **overrides: Any) -> WorkerConfig:
        """A worker config trusting this fabric's key."""
        values: dict[str, Any] = {
            "amqp_url": self.endpoint.amqp_url,
            "keyring": self.keyring,
            # Workers sign retries; other workers must trust them, so they share the key here.
            "signer": self.signer,
            "retry_tiers": self.topology.retry_tiers,
            "heartbeat_interval_s": 1.0,
            "grace_s": 5.0,
        }
        return WorkerConfig(**(values | overrides))

    def dispatcher_config(self, **overrides: Any) -> DispatcherConfig:
        """A dispatcher config signing with this fabric's key."""
        values: dict[str, Any] = {
            "amqp_url": self.endpoint.amqp_url,
            "signer": self.signer,
            "results_keyring": self.keyring,
        }
        return DispatcherConfig(**(values | overrides))

    @contextlib.asynccontextmanager
    async def worker(self, executors: Sequence[Executor], **config: Any) -> AsyncIterator[Worker]:
        """An in-process worker, consuming until the block ends."""
        async with _serving(Worker(executors, self.worker_config(**config))) as worker:
            yield worker

    def reaper_config(self, **overrides: Any) -> ReaperConfig:
        """A reaper config trusting this fabric's key (so it can open the tasks it answers)."""
        values: dict[str, Any] = {
            "amqp_url": self.endpoint.amqp_url,
            "keyring": self.keyring,
            "signer": self.signer,
            "grace_s": 5.0,
            "retry_tiers": self.topology.retry_tiers,
        }
        return ReaperConfig(**(values | overrides))

    @contextlib.asynccontextmanager
    async def reaper(self, **config: Any) -> AsyncIterator[Reaper]:
        """An in-process reaper answering dead letters until the block ends.

        It consumes the shared ``wayang.reaper`` queue: dead letters other tests left there
        are answered too (purge it first with :meth:`purge_reaper` to start clean).
        """
        async with _serving(Reaper(self.reaper_config(**config))) as reaper:
            yield reaper

    async def purge_reaper(self) -> None:
        """Empty ``wayang.reaper``: dead letters that no reaper answered yet are dropped."""
        connection = await aio_pika.connect(self.endpoint.amqp_urls[0])
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(names.REAPER_QUEUE, ensure=False)
            await queue.purge()

    def control_plane_config(self, database_url: str, **overrides: Any) -> ControlPlaneConfig:
        """A control plane trusting this fabric's key, writing to ``database_url``."""
        values: dict[str, Any] = {
            "amqp_url": self.endpoint.amqp_url,
            "database_url": database_url,
            "keyring": self.keyring,
            "signer": self.signer,
            "grace_s": 5.0,
        }
        return ControlPlaneConfig(**(values | overrides))

    @contextlib.asynccontextmanager
    async def control_plane(self, database_url: str, **config: Any) -> AsyncIterator[ControlPlane]:
        """An in-process control plane recording into ``database_url`` until the block ends.

        ``wayang.record`` is shared by every test on the broker: purge it first with
        :meth:`purge_record` to record only what the test itself does.
        """
        async with _serving(ControlPlane(self.control_plane_config(database_url, **config))) as cp:
            yield cp

    async def purge_record(self) -> None:
        """Empty ``wayang.record`` and ``wayang.record.refused`` (what earlier tests left)."""
        connection = await aio_pika.connect(self.endpoint.amqp_urls[0])
        async with connection:
            channel = await connection.channel()
            for name in (names.RECORD_QUEUE, names.RECORD_REFUSED_QUEUE):
                queue = await channel.get_queue(name, ensure=False)
                await queue.purge()

    @contextlib.asynccontextmanager
    async def dispatcher(self, **config: Any) -> AsyncIterator[Dispatcher]:
        """A started dispatcher, closed when the block ends."""
        async with Dispatcher(self.dispatcher_config(**config)) as dispatcher:
            yield dispatcher

    def spawn_worker(
        self,
        executors: Sequence[str] = (
            "wayang_workers.demo:Echo",
            "wayang_workers.demo:Sleep",
            "wayang_workers.demo:Fail",
        ),
        *,
        executor_id: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_format: str = "text",
        log_level: str = "DEBUG",
    ) -> WorkerProcess:
        """Start ``wayang-mq worker`` as a daemon, exactly as a user would. It logs readable
        text (``event=NAME k=v``: what tests match and people read when one fails) unless
        ``log_format`` says ``json`` (a daemon's default off a terminal). At ``DEBUG`` (the
        default, so tests see task.started lines); a test of thousands of tasks may ask INFO."""
        log_path = self.workdir / f"{executor_id}.log"
        environment = {
            **os.environ,
            "WAYANG_AMQP_URL": self.endpoint.amqp_url,
            "WAYANG_MANAGEMENT_URL": self.endpoint.management_url,
            "WAYANG_KEY_DIR": str(self.key_dir),
            **(env or {}),
        }
        # DEBUG so tests can see task.started lines (INFO logs one line per task: finished).
        command = [sys.executable, "-m", "wayang_mq.cli", "--log-level", log_level]
        command += ["--log-format", log_format, "worker"]
        command += list(executors)
        command += ["--id", executor_id, "--heartbeat", "1", *args]
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command, env=environment, stdout=log_file, stderr=subprocess.STDOUT
            )
        spawned = WorkerProcess(executor_id, process, log_path)
        self.processes.append(spawned)
        return spawned

    def stop_processes(self) -> None:
        """Stop every daemon this fabric started."""
        for process in self.processes:
            process.stop()
        self.processes.clear()

    async def depth(self, capability: str) -> int:
        """Ready messages in the capability's queue, exact (a passive declare; the management
        API's counts lag)."""
        connection = await aio_pika.connect(self.endpoint.amqp_urls[0])
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(names.task_queue(capability), passive=True)
            return int(queue.declaration_result.message_count or 0)

    async def purge(self, *capabilities: str) -> None:
        """Empty the capabilities' task and dead-letter queues (between tests)."""
        connection = await aio_pika.connect(self.endpoint.amqp_urls[0])
        async with connection:
            channel = await connection.channel()
            for capability in capabilities:
                try:
                    queues = self.topology.capability(capability).task_queues  # shards too
                except KeyError:  # declared by the test itself
                    queues = (names.task_queue(capability),)
                for name in (*queues, names.dead_queue(capability)):
                    queue = await channel.get_queue(name, ensure=False)
                    await queue.purge()
