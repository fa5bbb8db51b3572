"""``wayang-mq dev``: the whole fabric on one machine, in the foreground.

A private RabbitMQ node (unless ``WAYANG_AMQP_URL`` names a broker), the topology, a signing
key, demo worker daemons as real processes, and a burst of demo tasks whose results are shown;
then it stays up until Ctrl-C, printing where the console is. The state directory and every
file in it that holds a secret are private.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.client.dispatcher import Dispatcher, DispatcherConfig
from wayang_mq.config import ENDPOINT_FILE, Settings, broker_endpoint, save_endpoint
from wayang_mq.core.model import Result, RetryHints
from wayang_mq.core.private_files import open_private_log, private_dir
from wayang_mq.core.signing import Signer, write_keypair
from wayang_mq.dev.nodes import RabbitNode
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import load_topology

RETRY_ONCE = RetryHints(max_attempts=3, initial_backoff_ms=1000)  # through the 1 s retry tier
DEMO_EXECUTORS = (
    "wayang_workers.demo:Echo",
    "wayang_workers.demo:Sleep",
    "wayang_workers.demo:Fail",
)
# What an earlier run of `dev` leaves in its state directory: such a directory is the stack's.
_STATE_MARKERS = (ENDPOINT_FILE, "rabbitmq", "logs", "keys")


@dataclass(frozen=True)
class DevOptions:
    """What ``wayang-mq dev`` was asked for."""

    state_dir: Path
    amqp_port: int | None = None
    management_port: int | None = None
    workers: int = 2
    demo_tasks: int = 20
    wait: bool = True


def say(line: str) -> None:
    """Progress for the person at the terminal."""
    print(line, flush=True)


def run_dev(options: DevOptions, settings: Settings) -> int:
    """Start everything, show tasks flowing, then stay up until interrupted."""
    state_dir = _private_state_dir(options.state_dir.resolve())
    node: RabbitNode | None = None
    workers: list[subprocess.Popen[bytes]] = []
    try:
        if settings.amqp_url is None:
            node = RabbitNode(
                state_dir / "rabbitmq",
                amqp_port=options.amqp_port,
                management_port=options.management_port,
                server_binary=settings.rabbitmq_server,
            )
            say(f"==> starting a private RabbitMQ node (state in {node.state_dir})")
            endpoint = node.start()
            save_endpoint(state_dir, endpoint)
        else:
            endpoint = broker_endpoint(settings)
            say("==> using the broker in WAYANG_AMQP_URL")
        keys = _ensure_keys(settings.key_dir or private_dir(state_dir / "keys"))
        say(f"==> applying topology {settings.topology}")
        report = asyncio.run(
            apply_topology(
                load_topology(settings.topology), endpoint.amqp_url, management_client(endpoint)
            )
        )
        say("    " + report.lines()[-1])
        log_dir = private_dir(state_dir / "logs")
        workers = _start_workers(options.workers, endpoint, keys, log_dir)
        workers.append(_start_reaper(endpoint, keys, log_dir))
        _print_endpoint(endpoint, keys, state_dir)
        asyncio.run(_demo(endpoint, keys, options.demo_tasks))
        if options.wait:
            say("==> running; Ctrl-C stops the workers and the broker")
            _wait_for_signal()
    finally:
        _stop_workers(workers)
        if node is not None:
            say("==> stopping RabbitMQ")
            node.stop()
    return 0


def _ensure_keys(keys_path: Path) -> Path:
    if not any(keys_path.glob("*.key")):
        private_path, _ = write_keypair(keys_path)
        say(f"==> created signing key {private_path}")
    return keys_path


def _private_state_dir(state_dir: Path) -> Path:
    """The stack's directory, 0700: it holds the broker's password and the signing key.

    One that exists is narrowed only when it is empty or the stack's from an earlier run:
    ``--state-dir`` aimed at a directory shared with others must not lock them out (the
    files with secrets in it are 0600 regardless).
    """
    ours = not state_dir.exists() or not any(state_dir.iterdir())
    ours = ours or any((state_dir / marker).exists() for marker in _STATE_MARKERS)
    private_dir(state_dir, narrow_existing=ours)
    if not ours and state_dir.stat().st_mode & 0o077:
        say(f"    note: {state_dir} holds other files, so its mode stays as it is")
    return state_dir


def _start_workers(
    count: int, endpoint: BrokerEndpoint, keys: Path, log_dir: Path
) -> list[subprocess.Popen[bytes]]:
    """Demo worker daemons as real processes, exactly as a user would start them."""
    env = {**os.environ, "WAYANG_AMQP_URL": endpoint.amqp_url, "WAYANG_KEY_DIR": str(keys)}
    env.setdefault("WAYANG_MANAGEMENT_URL", endpoint.management_url)
    processes = []
    for index in range(count):
        executor_id = f"demo-{index}"
        log_path = log_dir / f"{executor_id}.log"
        command = [sys.executable, "-m", "wayang_mq.cli", "worker", *DEMO_EXECUTORS]
        command += ["--id", executor_id, "--concurrency", "16"]
        log_file = open_private_log(log_path)
        try:
            processes.append(
                subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
            )
        finally:
            os.close(log_file)
        say(f"==> started worker {executor_id} (pid {processes[-1].pid}, log {log_path})")
    return processes


def _start_reaper(endpoint: BrokerEndpoint, keys: Path, log_dir: Path) -> subprocess.Popen[bytes]:
    """The reaper daemon: the broker's dead letters (expired, poison) become FAILED results."""
    env = {**os.environ, "WAYANG_AMQP_URL": endpoint.amqp_url, "WAYANG_KEY_DIR": str(keys)}
    env.setdefault("WAYANG_MANAGEMENT_URL", endpoint.management_url)
    log_path = log_dir / "reaper.log"
    command = [sys.executable, "-m", "wayang_mq.cli", "reaper", "--id", "dev-reaper"]
    log_file = open_private_log(log_path)
    try:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    finally:
        os.close(log_file)
    say(f"==> started the reaper (pid {process.pid}, log {log_path})")
    return process


def _stop_workers(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()


def _print_endpoint(endpoint: BrokerEndpoint, keys: Path, state_dir: Path) -> None:
    say("")
    say(f"    RabbitMQ console  {endpoint.console_url}")
    say(f"    login             {endpoint.username} / {endpoint.password}")
    say(f"    AMQP URL          {endpoint.amqp_url}")
    say(f"    signing keys      {keys}")
    say(
        "    try (another terminal, same directory):  wayang-mq submit demo.echo "
        '--input \'{"hello": "world"}\' --wait'
    )
    say(f"    (state in {state_dir}: other commands find it there, or set WAYANG_STATE_DIR)")
    say("")


async def _demo(endpoint: BrokerEndpoint, keys: Path, count: int) -> None:
    """Send a burst of demo tasks and show each result as it arrives."""
    if count <= 0:
        return
    signing_key = sorted(keys.glob("*.key"))[0]
    config = DispatcherConfig(amqp_url=endpoint.amqp_url, signer=Signer.from_file(signing_key))
    say(f"==> sending {count} demo tasks (echo, a sleep with progress, a failure, a retry)")
    started = time.monotonic()
    async with Dispatcher(config) as dispatcher:
        handles = [await dispatcher.submit("demo.sleep", {"seconds": 2})]
        handles.append(await dispatcher.submit("demo.fail", {"mode": "permanent"}))
        retried = {"mode": "retryable", "succeed_on_attempt": 2}
        handles.append(await dispatcher.submit("demo.fail", retried, retry=RETRY_ONCE))
        handles += [
            await dispatcher.submit("demo.echo", {"n": n}) for n in range(max(0, count - 3))
        ]
        for next_done in asyncio.as_completed([h.result(60) for h in handles]):
            say("    " + _describe(await next_done))
    say(f"==> {len(handles)} results in {time.monotonic() - started:.2f}s")


def _describe(result: Result) -> str:
    outcome = str(result.status)
    if result.error is not None:
        outcome += f" {result.error.code}: {result.error.message}"
    else:
        outcome += f" output={result.output}"
    duration = result.metrics.get("duration_ms", 0.0)
    return (
        f"task {result.task_id[:8]} {result.capability:<10} {outcome} "
        f"(by {result.executor_id}, attempt {result.attempt}, ran {duration:.1f} ms)"
    )


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    received = []
    handler = lambda signum, frame: received.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not received:
            with contextlib.suppress(InterruptedError):
                signal.pause()
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
