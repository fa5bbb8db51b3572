"""A publisher and an executor in JavaScript, written from docs/wire-format.md alone, against
real wayang-mq daemons.

``tests/interop/`` holds them (Node.js, amqplib, @msgpack/msgpack, Ed25519 from node:crypto,
ajv for docs/schema); this file drives them: a round trip each way, retries through a tier,
refused input dead-lettered by the Node executor, keys added while the daemons run, and every
result and event each side sees checked against the documented schemas and properties.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest
from aio_pika.abc import AbstractIncomingMessage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jsonschema import Draft202012Validator
from wayang_workers.demo import Echo, Sleep

from wayang_mq import ErrorCode, Status, Task
from wayang_mq.amqp.connect import management_client
from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.core.authority import check_executor_event, check_result
from wayang_mq.core.envelope import attempt_headers, open_task
from wayang_mq.core.model import AttemptRecord, Compensation, Result, RetryHints, new_id, now_ms
from wayang_mq.core.names import (
    EVENTS_EXCHANGE,
    RESULTS_EXCHANGE,
    RETRY_EXCHANGE,
    TASKS_EXCHANGE,
)
from wayang_mq.core.scopes import FULL_TRUST, KeyScope, Role
from wayang_mq.core.signing import KeyRing, Signer, write_keypair
from wayang_mq.core.wire import decode, encode
from wayang_mq.ops.deadletters import list_dead_letters
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import parse_topology

INTEROP = Path(__file__).parent / "interop"
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "docs" / "schema"
CAPABILITY = "interop.upper"
NODE_EXECUTOR_ID = "node-upper"
REPLY = "reply.interop-node-test"


# -- Node processes ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node() -> str:
    """The ``node`` binary, once ``npm ci`` has installed tests/interop's pinned packages."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = "node and npm are needed for tests/interop (scripts/setup installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=INTEROP,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, f"npm ci failed:\n{installed.stdout}\n{installed.stderr}"
    return node


@dataclass
class NodeDaemon:
    """A long-running Node script: its stdout lines, its stderr in a log file."""

    process: asyncio.subprocess.Process
    log_path: Path
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, node: str, script: str, args: list[str], log_path: Path) -> NodeDaemon:
        """Start ``script`` and wait for its "ready" line."""
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                node, str(INTEROP / script), *args, stdout=subprocess.PIPE, stderr=log
            )
        daemon = cls(process, log_path)
        daemon.reader = asyncio.create_task(daemon._read())
        try:
            await eventually(
                lambda: "ready" in daemon.lines or process.returncode is not None,
                what=f"{script} ready",
            )
            assert process.returncode is None, f"{script} exited:\n{daemon.log()}"
        except BaseException:
            await daemon.stop()
            raise
        return daemon

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode().rstrip("\n"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> int:
        """SIGTERM, and its exit code (it exits gracefully)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 20)
        if self.reader is not None:
            await self.reader
        return code


@contextlib.asynccontextmanager
async def _running(node: str, script: str, args: list[str], log: Path) -> AsyncIterator[NodeDaemon]:
    """A Node daemon for the block; it must exit 0 on SIGTERM at the end."""
    daemon = await NodeDaemon.start(node, script, args, log)
    try:
        yield daemon
    finally:
        assert await daemon.stop() == 0, daemon.log()


@dataclass
class Published:
    """What ``publisher.js`` did: its exit code, the result it printed, what it logged."""

    code: int
    result: dict[str, Any] | None
    log: str


async def _publish(node: str, fabric: Fabric, *args: str) -> Published:
    """Run ``publisher.js`` against the fabric's broker until it exits."""
    process = await asyncio.create_subprocess_exec(
        node,
        str(INTEROP / "publisher.js"),
        "--url",
        fabric.endpoint.amqp_url,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    result = json.loads(out) if out.strip() else None
    return Published(process.returncode, result, err.decode(errors="replace"))


def _trust(
    directory: Path, public_key: Ed25519PublicKey, name: str, scope: KeyScope | None
) -> None:
    """Put a public key and its scope into a key directory as wire-format §5 and
    docs/security.md §4 say: each aside, then renamed, the scope first (None: no scope, a key
    trusted for nothing)."""
    directory.mkdir(parents=True, exist_ok=True)
    if scope is not None:
        partial_scope = directory / f".{name}.toml.partial"
        partial_scope.write_text(scope.to_toml())
        os.replace(partial_scope, directory / f"{name}.toml")
    partial = directory / f".{name}.partial"
    partial.write_bytes(public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    os.replace(partial, directory / f"{name}.pub")


@dataclass(frozen=True)
class Key:
    """A signer and what its scope lets it sign."""

    signer: Signer
    scope: KeyScope | None

    @classmethod
    def new(cls, role: Role, identity: str, *capabilities: str) -> Key:
        return cls(Signer.generate(), KeyScope(role, identity, capabilities))

    @property
    def key_id(self) -> str:
        return self.signer.key_id

    def ring(self) -> KeyRing:
        assert self.scope is not None
        return KeyRing.scoped([(self.signer.public_key, self.scope)])


# -- what each side saw, checked against the doc -----------------------------------------------


def _validators() -> dict[str, Draft202012Validator]:
    return {
        p.stem: Draft202012Validator(json.loads(p.read_text())) for p in SCHEMA_DIR.glob("*.json")
    }


@dataclass
class Tap:
    """Every message on wayang.events and wayang.results, as a Python client receives it."""

    messages: list[AbstractIncomingMessage] = field(default_factory=list)

    def signed_by(self, key_id: str) -> list[AbstractIncomingMessage]:
        return [m for m in self.messages if (m.headers or {}).get("wayang-key-id") == key_id]

    def has(self, key_id: str, wire_type: str, routing_key: str) -> bool:
        return any(
            m.type == wire_type and m.routing_key == routing_key for m in self.signed_by(key_id)
        )


def _assert_python_side_accepts(tap: Tap, key: Key) -> set[str]:
    """Everything ``key`` published verifies (for the type it was published as, and within
    the key's scope), matches docs/schema and wire-format §2; returns the message types seen."""
    validators, ring = _validators(), key.ring()
    seen = set()
    for message in tap.signed_by(key.key_id):
        where = f"{message.type} {message.routing_key}"
        wire_type = str(message.type)
        signer = ring.verify(message.body, message.headers, wire_type)
        assert signer.key_id == key.key_id, where
        body = msgpack.unpackb(message.body, raw=False)
        errors = [e.message for e in validators[wire_type].iter_errors(body)]
        assert not errors, f"{where}: {errors}"
        if wire_type == "wayang.result.v1":
            check_result(signer, decode(message.body, Result))
        elif wire_type in ("wayang.registration.v1", "wayang.heartbeat.v1"):
            check_executor_event(signer, body["executor_id"], body["capabilities"])
        elif wire_type == "wayang.progress.v1":
            check_executor_event(signer, body["executor_id"], ())
        assert message.content_type == "application/msgpack", where
        assert message.delivery_mode == 2, where
        assert message.correlation_id == message.message_id, where
        assert message.timestamp is not None, where
        by_executor = message.type in ("wayang.registration.v1", "wayang.heartbeat.v1")
        assert message.message_id == body["executor_id" if by_executor else "task_id"], where
        if message.exchange == RESULTS_EXCHANGE:
            assert message.reply_to == message.routing_key, where
        seen.add(wire_type)
    return seen


def _watched(watch: NodeDaemon) -> list[dict[str, Any]]:
    """What ``watch.js`` reported, one dict per message it saw."""
    return [json.loads(line) for line in watch.lines if line.startswith("{")]


def _assert_node_side_accepts(watch: NodeDaemon, trusted_ids: set[str]) -> None:
    """Every message the Node watcher saw matches docs/schema and wire-format §2; those from
    this module's daemons (all of them, unless another test's daemon is still about) verify."""
    for seen in _watched(watch):
        body = seen["body"] or {}
        ours = body.get("executor_id") in trusted_ids
        problems = [e for e in seen["errors"] if ours or not e.startswith("signature:")]
        assert not problems, f"{seen['type']} {seen['routing_key']}: {problems}"


def _seen_by_node(watch: NodeDaemon, wire_type: str, **body: Any) -> bool:
    return any(
        s["type"] == wire_type and all(s["body"].get(k) == v for k, v in body.items())
        for s in _watched(watch)
    )


# -- the module's fabric: a capability, keys, a tap each side, and the Node executor -----------


@dataclass
class NodeSide:
    keys: dict[str, Key]  # by role in these tests, see node_side()
    trust_dir: Path  # the public keys (and scopes) the Node executor trusts
    watch: NodeDaemon
    executor: NodeDaemon
    tap: Tap

    @property
    def node_executor(self) -> Key:
        return self.keys["node-executor"]

    @property
    def results_keyring(self) -> KeyRing:
        """What a Python dispatcher trusts for results: the Node executor's key, as an
        executor of the capability, speaking for its own id only."""
        return self.node_executor.ring()

    @contextlib.asynccontextmanager
    async def dispatcher(
        self, fabric: Fabric, key: str = "dispatcher"
    ) -> AsyncIterator[Dispatcher]:
        """A Python dispatcher signing with a dispatcher-scoped key, as its issuer."""
        signer = self.keys[key]
        assert signer.scope is not None
        async with fabric.dispatcher(
            signer=signer.signer, issuer=signer.scope.identity, results_keyring=self.results_keyring
        ) as dispatcher:
            yield dispatcher


@contextlib.asynccontextmanager
async def _python_tap(fabric: Fabric) -> AsyncIterator[Tap]:
    tap = Tap()
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        for exchange in (EVENTS_EXCHANGE, RESULTS_EXCHANGE):
            await queue.bind(exchange, "#")

        async def keep(message: AbstractIncomingMessage) -> None:
            tap.messages.append(message)

        await queue.consume(keep, no_ack=True)
        yield tap


def _module_keys() -> dict[str, Key]:
    executor, dispatcher = Role.EXECUTOR, Role.DISPATCHER
    return {
        # the Node executor: answers, events and its own retries' attempt records
        "node-executor": Key.new(executor, NODE_EXECUTOR_ID, CAPABILITY),
        # Python dispatchers of the capability, and one of other capabilities only
        "dispatcher": Key.new(dispatcher, "interop-dispatcher", CAPABILITY),
        "narrow": Key.new(dispatcher, "interop-narrow", "demo.*"),
        # another executor of the capability (attempt records made in Python), and one of
        # other capabilities
        "py-executor": Key.new(executor, "interop-py-executor", CAPABILITY),
        "other-executor": Key.new(executor, "interop-other", "demo.*"),
        # a key in the directory without a scope: trusted for nothing
        "unscoped": Key(Signer.generate(), None),
        # the Python worker the Node publisher talks to, and the Node publisher
        "py-worker": Key.new(executor, "interop-py", "demo.*"),
        "node-publisher": Key.new(dispatcher, "node-publisher", "demo.*"),
    }


@pytest.fixture(scope="module")
async def node_side(
    fabric: Fabric, node: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NodeSide]:
    """``interop.upper`` in the topology, served by the Node executor with an executor key;
    both taps listening before it starts, so they see its registration."""
    topology = parse_topology(tomllib.loads(f'[capabilities."{CAPABILITY}"]\n'), source="interop")
    await apply_topology(topology, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
    await fabric.purge(CAPABILITY)
    workdir = tmp_path_factory.mktemp("interop-node")
    keys = _module_keys()
    executor_key = keys["node-executor"]
    assert executor_key.scope is not None
    private_key, _ = write_keypair(
        workdir / "executor-key", executor_key.signer, executor_key.scope
    )
    # The Node executor trusts the fabric's admin key, the dispatchers' keys (tasks), the
    # executors' (attempt records: its own, for its retries, §4.7) and an unscoped key
    trust_dir = workdir / "trusted-by-executor"
    _trust(trust_dir, fabric.signer.public_key, "fabric", FULL_TRUST)
    for name in ("node-executor", "dispatcher", "narrow", "py-executor", "other-executor"):
        _trust(trust_dir, keys[name].signer.public_key, name, keys[name].scope)
    _trust(trust_dir, keys["unscoped"].signer.public_key, "unscoped", None)
    # The watcher trusts whoever answers: the fabric's key, the Node executor, the Python worker
    watch_dir = workdir / "trusted-by-watch"
    _trust(watch_dir, fabric.signer.public_key, "fabric", FULL_TRUST)
    for name in ("node-executor", "py-worker"):
        _trust(watch_dir, keys[name].signer.public_key, name, keys[name].scope)
    url = ["--url", fabric.endpoint.amqp_url]
    tiers = ",".join(f"{t.name}={t.ttl_ms}" for t in fabric.topology.retry_tiers)
    async with contextlib.AsyncExitStack() as stack:
        tap = await stack.enter_async_context(_python_tap(fabric))
        watch = await stack.enter_async_context(
            _running(node, "watch.js", [*url, "--trust", str(watch_dir)], workdir / "watch.log")
        )
        executor_args = [*url, "--key", str(private_key), "--key-dir", str(trust_dir)]
        executor_args += ["--capability", CAPABILITY, "--id", NODE_EXECUTOR_ID]
        executor_args += ["--heartbeat-s", "1", "--tiers", tiers, "--audience", "wayang"]
        executor = await stack.enter_async_context(
            _running(node, "executor.js", executor_args, workdir / "executor.log")
        )
        yield NodeSide(keys, trust_dir, watch, executor, tap)
    await fabric.purge(CAPABILITY)
    await fabric.purge_reaper()  # the dead letters refused here were answered already


# -- Node publisher -> Python worker -----------------------------------------------------------


async def test_the_docs_test_vector_is_what_node_builds(node: str) -> None:
    # The body bytes, signed header, key id and signature of wire-format §8, from JavaScript
    checked = await asyncio.create_subprocess_exec(
        node, str(INTEROP / "vector.js"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(checked.communicate(), 30)
    assert checked.returncode == 0, out.decode()


def _publisher_key(node_side: NodeSide, directory: Path) -> list[str]:
    """``--key`` for the Node publisher: its dispatcher key written as `wayang-mq keys new`
    does, its scope beside it (the publisher takes its issuer id from it)."""
    key = node_side.keys["node-publisher"]
    assert key.scope is not None
    private_key, _ = write_keypair(directory, key.signer, key.scope)
    return ["--key", str(private_key)]


def _python_worker(fabric: Fabric, node_side: NodeSide, executors: list[Any]) -> Any:
    """A Python worker with its own executor key, trusting the Node publisher's key."""
    worker, publisher = node_side.keys["py-worker"], node_side.keys["node-publisher"]
    assert worker.scope is not None and publisher.scope is not None
    keyring = KeyRing.scoped(
        [(publisher.signer.public_key, publisher.scope), (worker.signer.public_key, worker.scope)]
    )
    return fabric.worker(executors, executor_id="interop-py", signer=worker.signer, keyring=keyring)


async def test_a_node_publisher_gets_a_verified_result_from_a_python_worker(
    fabric: Fabric, node: str, node_side: NodeSide, tmp_path: Path
) -> None:
    # signed with a dispatcher key as `wayang-mq keys new` writes it; results checked against
    # the Python worker's executor key and its scope
    trust = tmp_path / "trust"
    worker_key = node_side.keys["py-worker"]
    _trust(trust, worker_key.signer.public_key, "py-worker", worker_key.scope)
    signed = [*_publisher_key(node_side, tmp_path / "key"), "--trust", str(trust)]
    task_input = {"text": "hi", "nested": {"n": [1, 2.5, None, True], "s": "ü"}}
    watch = node_side.watch
    # Given a Python worker started while the Node watcher listens
    async with _python_worker(fabric, node_side, [Echo(), Sleep()]):
        # When the Node publisher sends it tasks
        echoed, slept = await asyncio.gather(
            _publish(node, fabric, *signed, "--capability", "demo.echo",
                     "--input", json.dumps(task_input)),
            _publish(node, fabric, *signed, "--capability", "demo.sleep",
                     "--input", '{"seconds": 1}'),
        )  # fmt: skip
        # Then each gets its result, verified and valid against the schema in Node
        assert echoed.code == 0, echoed.log
        assert echoed.result is not None and echoed.result["status"] == "SUCCESS"
        assert echoed.result["output"] == task_input
        assert echoed.result["executor_id"] == "interop-py"
        assert "published task" in echoed.log and "as node-publisher for wayang" in echoed.log
        assert slept.code == 0, slept.log
        # And the Node watcher saw the worker's registration and heartbeats
        await eventually(
            lambda: _seen_by_node(watch, "wayang.heartbeat.v1", executor_id="interop-py"),
            what="a heartbeat from interop-py seen in Node",
        )
    assert _seen_by_node(watch, "wayang.registration.v1", executor_id="interop-py")
    assert slept.result is not None
    assert _seen_by_node(watch, "wayang.progress.v1", task_id=slept.result["task_id"])
    assert _seen_by_node(watch, "wayang.result.v1", task_id=echoed.result["task_id"])
    # all of it following the doc, signed by keys whose scope allows it
    _assert_node_side_accepts(watch, {"interop-py", NODE_EXECUTOR_ID})


async def test_the_node_publisher_refuses_what_it_cannot_trust_or_route(
    fabric: Fabric, node: str, node_side: NodeSide, tmp_path: Path
) -> None:
    key = _publisher_key(node_side, tmp_path / "key")
    worker_key = node_side.keys["py-worker"].signer.public_key
    # the worker's key trusted, but with a scope that does not let it answer these tasks
    as_another = tmp_path / "as-another"
    _trust(as_another, worker_key, "w", KeyScope(Role.EXECUTOR, "someone-else", ("demo.*",)))
    for_others = tmp_path / "for-others"
    _trust(for_others, worker_key, "w", KeyScope(Role.EXECUTOR, "interop-py", ("other.*",)))
    async with _python_worker(fabric, node_side, [Echo()]):
        # When the result is signed by a key the publisher does not hold, or by one it holds
        # for another executor id, or for other capabilities
        untrusted, another, others = await asyncio.gather(
            *(
                _publish(node, fabric, *key, "--trust", str(trust), "--capability", "demo.echo")
                for trust in (tmp_path, as_another, for_others)
            )
        )
    # Then it fails with the reason, printing no result
    assert (untrusted.code, untrusted.result) == (1, None)
    assert "is not signed by a trusted key: unknown_key: unknown key id" in untrusted.log
    assert (another.code, another.result) == (1, None)
    assert "may not be signed by key" in another.log and "key_not_allowed" in another.log
    assert (others.code, others.result) == (1, None)
    assert "capability_not_allowed" in others.log
    # And a capability no queue serves comes back as basic.return (wire-format §1)
    unrouted = await _publish(
        node, fabric, *key, "--trust", str(tmp_path), "--capability", "interop.nobody"
    )
    assert (unrouted.code, unrouted.result) == (1, None)
    assert "no queue serves interop.nobody" in unrouted.log


async def test_a_python_worker_trusts_a_key_the_node_publisher_adds_while_it_runs(
    fabric: Fabric, node: str, tmp_path: Path
) -> None:
    key_dir = tmp_path / "worker-keys"
    scope = KeyScope(Role.EXECUTOR, "interop-rotate", ("demo.*",))
    write_keypair(key_dir, Signer.generate(), scope)  # the worker signs with its executor key
    worker = fabric.spawn_worker(
        ["wayang_workers.demo:Echo"],
        executor_id="interop-rotate",
        env={"WAYANG_KEY_DIR": str(key_dir)},
    )
    try:
        await asyncio.to_thread(worker.wait_started)
        # When the Node publisher makes a new key, puts its public half and a dispatcher scope
        # into the running worker's key directory, and signs a task with it
        published = await _publish(
            node,
            fabric,
            "--new-key-dir",
            str(key_dir),
            "--trust",
            str(key_dir),
            "--capability",
            "demo.echo",
            "--input",
            '{"signed": "by a new key"}',
        )
        # Then the worker trusts it without a restart, and the publisher trusts the answer
        # of the worker's executor key
        assert published.code == 0, published.log
        assert published.result is not None
        assert published.result["output"] == {"signed": "by a new key"}
        assert published.result["executor_id"] == "interop-rotate"
        await worker.until_logged("event=keyring.reloaded")
        assert worker.process.poll() is None
    finally:
        worker.stop()


# -- Python dispatcher -> Node executor --------------------------------------------------------


async def test_a_python_dispatcher_gets_a_verified_result_from_the_node_executor(
    fabric: Fabric, node_side: NodeSide
) -> None:
    async with node_side.dispatcher(fabric) as dispatcher:
        result = await dispatcher.run(
            CAPABILITY, {"text": "hello wayang", "sleep_ms": 600}, heartbeat_timeout_s=3, wait_s=20
        )
    assert result.status is Status.SUCCESS, result.error
    assert result.output == {"text": "HELLO WAYANG"}
    assert result.executor_id == NODE_EXECUTOR_ID
    # And all it published verifies, within its key's scope, and matches the schemas and
    # properties, in Python...
    tap, key = node_side.tap, node_side.node_executor
    await eventually(
        lambda: tap.has(key.key_id, "wayang.heartbeat.v1", f"heartbeat.{NODE_EXECUTOR_ID}"),
        what="a heartbeat from the Node executor",
    )
    assert tap.has(key.key_id, "wayang.registration.v1", f"registered.{NODE_EXECUTOR_ID}")
    assert tap.has(key.key_id, "wayang.progress.v1", f"progress.{result.task_id}")
    seen = _assert_python_side_accepts(tap, key)
    assert {"wayang.registration.v1", "wayang.heartbeat.v1", "wayang.progress.v1"} <= seen
    assert "wayang.result.v1" in seen
    # ... and in Node
    _assert_node_side_accepts(node_side.watch, {NODE_EXECUTOR_ID})


@contextlib.asynccontextmanager
async def _retries_seen(fabric: Fabric) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """A copy of every retry of the capability published to wayang.retry meanwhile."""
    seen: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(RETRY_EXCHANGE, f"retry.*.{CAPABILITY}")

        async def keep(message: AbstractIncomingMessage) -> None:
            seen.append(message)

        await queue.consume(keep, no_ack=True)
        yield seen


async def test_the_node_executor_retries_through_a_tier_then_gives_up_as_documented(
    fabric: Fabric, node_side: NodeSide
) -> None:
    retry = RetryHints(max_attempts=2, initial_backoff_ms=1000)
    async with _retries_seen(fabric) as retries, node_side.dispatcher(fabric) as dispatcher:
        # When the first attempt fails retryably, and when every attempt does
        recovered, exhausted = await asyncio.gather(
            dispatcher.run(
                CAPABILITY, {"text": "again", "fail_until_attempt": 2}, retry=retry, wait_s=30
            ),
            dispatcher.run(
                CAPABILITY, {"text": "never", "fail_until_attempt": 9}, retry=retry, wait_s=30
            ),
        )
    # Then the first succeeds on its second attempt, after the 1s tier
    assert recovered.status is Status.SUCCESS, recovered.error
    assert (recovered.attempt, recovered.output) == (2, {"text": "AGAIN"})
    tap, key = node_side.tap, node_side.node_executor
    assert tap.has(key.key_id, "wayang.result.v1", f"attempt.{recovered.task_id}")
    # And the retry was the issuer's task, unchanged, with the Node executor's attempt record:
    # Python's own receiver derives attempt 2 from it, checking both keys' scopes
    retried = [m for m in retries if m.message_id == recovered.task_id]
    assert len(retried) == 1
    headers = retried[0].headers or {}
    assert headers["wayang-key-id"] == node_side.keys["dispatcher"].key_id
    assert headers["wayang-attempt-key-id"] == key.key_id
    assert retried[0].expiration is None
    opened = open_task(retried[0].body, headers, KeyRing.load_dir(node_side.trust_dir))
    assert opened.decider is not None and opened.decider.key_id == key.key_id
    assert (opened.task.task_id, opened.task.attempt) == (recovered.task_id, 2)
    assert opened.task.issuer == "interop-dispatcher"
    # And the other ends retries_exhausted with its last error, its delivery dead-lettered
    assert exhausted.error is not None
    assert exhausted.error.code is ErrorCode.RETRIES_EXHAUSTED
    assert exhausted.error.details["last_error"]["code"] == "executor_error"
    dead = await list_dead_letters(fabric.endpoint.amqp_url, CAPABILITY)
    assert [(d.code, d.dead_lettered_by) for d in dead if d.task_id == exhausted.task_id] == [
        (ErrorCode.RETRIES_EXHAUSTED, NODE_EXECUTOR_ID)
    ]
    _assert_python_side_accepts(tap, key)
    _assert_node_side_accepts(node_side.watch, {NODE_EXECUTOR_ID})


async def test_the_node_executor_dispatches_a_compensation_that_it_then_runs(
    fabric: Fabric, node_side: NodeSide
) -> None:
    compensation = Compensation(capability=CAPABILITY, input={"text": "undo"})
    async with node_side.dispatcher(fabric) as dispatcher:
        # When a task that names a compensation fails for good on the Node executor
        failed = await dispatcher.run(
            CAPABILITY, {"text": "x", "fail": "permanent"}, compensation=compensation, wait_s=20
        )
    # Then its FAILED answer links the compensation, derived as wire-format §4.1 says
    assert failed.error is not None and failed.error.code is ErrorCode.EXECUTOR_ERROR
    assert failed.compensation_task_id == f"{failed.task_id}.compensation"
    # And the compensation comes back through a tier as the issuer's bytes plus the Node
    # executor's record, and runs: its result goes to the same reply address
    tap, key = node_side.tap, node_side.node_executor

    def compensated() -> dict[str, Any] | None:
        for message in tap.signed_by(key.key_id):
            body = msgpack.unpackb(message.body, raw=False)
            if (
                message.exchange == RESULTS_EXCHANGE
                and body["task_id"] == failed.compensation_task_id
            ):
                return body
        return None

    await eventually(lambda: compensated() is not None, what="the compensation's result")
    result = compensated()
    assert result is not None and result["status"] == "SUCCESS", result
    assert result["output"] == {"text": "UNDO"}
    assert result["node_id"] == f"{failed.node_id}:compensate"
    _assert_python_side_accepts(tap, key)


Signed = tuple[bytes, dict[str, str]]
Build = Callable[[NodeSide, Task], Signed]


def _by(name: str, wire_type: str = "wayang.task.v1") -> Build:
    def build(side: NodeSide, task: Task) -> Signed:
        return encode(task), side.keys[name].signer.headers(encode(task), wire_type)

    return build


def _unknown_key(side: NodeSide, task: Task) -> Signed:
    return encode(task), Signer.generate().headers(encode(task))


def _unsigned(side: NodeSide, task: Task) -> Signed:
    return encode(task), {}


def _forged(side: NodeSide, task: Task) -> Signed:
    other = encode(task.model_copy(update={"token": "other"}))
    return encode(task), side.keys["dispatcher"].signer.headers(other)


def _float_attempt(side: NodeSide, task: Task) -> Signed:
    # wire-format §4: `1.0` (a msgpack float) is not an integer, though JavaScript reads it as 1
    fields = msgpack.unpackb(encode(task)) | {"attempt": 1.0}
    body = msgpack.packb(fields, use_single_float=False)
    return body, side.keys["dispatcher"].signer.headers(body)


def _with_record(
    decider: str, *, attempt: int = 2, tamper: bool = False, deadline_in_ms: int = 60_000
) -> Build:
    """The dispatcher's task with an attempt record by ``decider`` (wire-format §4.7)."""

    def build(side: NodeSide, task: Task) -> Signed:
        body, headers = _by("dispatcher")(side, task)
        key = side.keys[decider]
        assert key.scope is not None
        record = AttemptRecord(
            task_id=task.task_id,
            attempt=attempt,
            deadline_ms=now_ms() + deadline_in_ms,
            executor_id=key.scope.identity,
        )
        extra = attempt_headers(record, key.signer)
        if tamper:
            other = record.model_copy(update={"deadline_ms": record.deadline_ms + 1})
            extra["wayang-attempt"] = base64.b64encode(encode(other)).decode()
        return body, headers | extra

    return build


@dataclass(frozen=True)
class Refusal:
    build: Build
    code: ErrorCode
    changes: dict[str, Any] = field(default_factory=dict)
    answered: bool = False  # wire-format §4.4 "What is answered"


RETRYABLE = RetryHints(max_attempts=3)
REFUSALS: dict[str, Refusal] = {
    "signature by an unknown key": Refusal(_unknown_key, ErrorCode.UNKNOWN_KEY),
    "no signature": Refusal(_unsigned, ErrorCode.BAD_SIGNATURE),
    "forged signature": Refusal(_forged, ErrorCode.BAD_SIGNATURE),
    "a result's signature on a task": Refusal(
        _by("dispatcher", "wayang.result.v1"), ErrorCode.BAD_SIGNATURE
    ),
    "a float where an integer belongs": Refusal(_float_attempt, ErrorCode.INVALID_TASK),
    "signed by an executor's key": Refusal(
        _by("node-executor"), ErrorCode.KEY_NOT_ALLOWED, {"issuer": NODE_EXECUTOR_ID}
    ),
    "an issuer that is not the key's": Refusal(
        _by("dispatcher"), ErrorCode.KEY_NOT_ALLOWED, {"issuer": "someone-else"}
    ),
    "a key without a scope": Refusal(_by("unscoped"), ErrorCode.KEY_NOT_ALLOWED),
    "a capability the key does not cover": Refusal(
        _by("narrow"), ErrorCode.CAPABILITY_NOT_ALLOWED, {"issuer": "interop-narrow"}
    ),
    "another deployment": Refusal(
        _by("dispatcher"), ErrorCode.WRONG_AUDIENCE, {"audience": "elsewhere"}
    ),
    "a tampered attempt record": Refusal(
        _with_record("py-executor", tamper=True), ErrorCode.BAD_ATTEMPT, {"retry": RETRYABLE}
    ),
    "an attempt record by an executor of another capability": Refusal(
        _with_record("other-executor"), ErrorCode.BAD_ATTEMPT, {"retry": RETRYABLE}
    ),
    "an attempt record by a dispatcher": Refusal(
        _with_record("dispatcher"), ErrorCode.BAD_ATTEMPT, {"retry": RETRYABLE}
    ),
    "an attempt beyond the issuer's limit": Refusal(
        _with_record("py-executor", attempt=4), ErrorCode.BAD_ATTEMPT, {"retry": RETRYABLE}
    ),
    "an attempt deadline beyond the issuer's window": Refusal(
        _with_record("py-executor", deadline_in_ms=10 * 60_000),
        ErrorCode.BAD_ATTEMPT,
        {"retry": RetryHints(max_attempts=3, max_backoff_ms=1000)},
    ),
    "expired deadline": Refusal(
        _by("dispatcher"),
        ErrorCode.TOKEN_EXPIRED,
        {"issued_at_ms": now_ms() - 5000, "deadline_ms": now_ms() - 1000},
        answered=True,
    ),
    "not valid yet": Refusal(
        _by("dispatcher"),
        ErrorCode.NOT_YET_VALID,
        {"not_before_ms": now_ms() + 3_600_000, "deadline_ms": now_ms() + 7_200_000},
        answered=True,
    ),
}


class Replies:
    """A reply queue of our own, and a way to publish tasks as any client could."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, queue: Any) -> None:
        self.channel, self.queue = channel, queue
        self.answers: list[AbstractIncomingMessage] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, fabric: Fabric) -> AsyncIterator[Replies]:
        connection = await aio_pika.connect(fabric.endpoint.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(RESULTS_EXCHANGE, REPLY)
            yield cls(channel, queue)

    async def publish(self, task: Task, body: bytes, headers: dict[str, str]) -> None:
        tasks = await self.channel.get_exchange(TASKS_EXCHANGE)
        message = aio_pika.Message(
            body,
            headers=headers,
            message_id=task.task_id,
            correlation_id=task.task_id,
            reply_to=REPLY,
            type="wayang.task.v1",
            content_type="application/msgpack",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await tasks.publish(message, routing_key=CAPABILITY, mandatory=True)

    async def answer_to(self, task_id: str) -> dict[str, Any]:
        """The (first) answer to ``task_id``, waiting for it."""

        def found() -> dict[str, Any] | None:
            for answer in self.answers:
                result = msgpack.unpackb(answer.body, raw=False)
                if result["task_id"] == task_id:
                    return dict(result)
            return None

        async def arrived() -> bool:
            got = await self.queue.get(fail=False, no_ack=True)
            if got is not None:
                self.answers.append(got)
            return found() is not None

        await eventually(arrived, what=f"the answer to {task_id}")
        result = found()
        assert result is not None
        return result

    async def drained_after(self, side: NodeSide) -> None:
        """A round trip of a valid task after everything published before: whatever the
        Node executor answered before it has arrived."""
        sentinel = _task(side)
        await self.publish(sentinel, *_by("dispatcher")(side, sentinel))
        assert (await self.answer_to(sentinel.task_id))["status"] == "SUCCESS"

    def task_ids(self) -> list[str]:
        return [msgpack.unpackb(a.body, raw=False)["task_id"] for a in self.answers]


def _task(side: NodeSide, **changes: Any) -> Task:
    task = Task.create(
        CAPABILITY, {"text": "x"}, task_id=new_id(), reply_to=REPLY, issuer="interop-dispatcher"
    )
    return task.model_copy(update=changes)


async def _dead_letter(fabric: Fabric, task_id: str) -> list[tuple[ErrorCode, str | None]]:
    async def listed() -> list[tuple[ErrorCode, str | None]]:
        dead = await list_dead_letters(fabric.endpoint.amqp_url, CAPABILITY)
        return [(d.code, d.dead_lettered_by) for d in dead if d.task_id == task_id]

    found: list[list[tuple[ErrorCode, str | None]]] = []

    async def there() -> bool:
        found.append(await listed())
        return bool(found[-1])

    await eventually(there, what=f"the dead letter of {task_id}")
    return found[-1]


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_the_node_executor_dead_letters_refused_input_answering_only_what_it_may(
    fabric: Fabric, node_side: NodeSide, case: str
) -> None:
    refusal = REFUSALS[case]
    task = _task(node_side, **refusal.changes)
    body, headers = refusal.build(node_side, task)
    async with Replies.open(fabric) as replies:
        # When a task the Node executor must refuse is published, as any client could
        await replies.publish(task, body, headers)
        # Then its delivery waits in the dead queue with the code, marked by the Node executor
        assert await _dead_letter(fabric, task.task_id) == [(refusal.code, NODE_EXECUTOR_ID)]
        if not refusal.answered:
            # And input nobody could verify, or that its sender may not send, is answered to
            # nobody (wire-format §4.4): nothing came before a valid task's answer
            await replies.drained_after(node_side)
            assert task.task_id not in replies.task_ids()
            assert f"security.refused {task.task_id}: {refusal.code.value}" in (
                node_side.executor.log()
            )
            return
        # And a task that verified, from a key allowed to send it, is answered FAILED with its
        # own ids and token, signed by the Node executor
        result = await replies.answer_to(task.task_id)
    answer = next(a for a in replies.answers if a.message_id == task.task_id)
    signer = node_side.results_keyring.verify(answer.body, answer.headers or {}, "wayang.result.v1")
    check_result(signer, decode(answer.body, Result))
    errors = [e.message for e in _validators()["wayang.result.v1"].iter_errors(result)]
    assert not errors, errors
    assert (result["task_id"], result["token"], result["status"]) == (
        task.task_id,
        task.token,
        "FAILED",
    )
    assert result["error"]["code"] == refusal.code.value
    assert result["error"]["message"], "the reason, for people"


async def test_the_node_executor_runs_an_attempt_a_python_executor_decided(
    fabric: Fabric, node_side: NodeSide
) -> None:
    # Given the dispatcher's task with an attempt record signed by another executor of the
    # capability, as a Python worker's retry carries it (wire-format §4.7)
    task = _task(node_side, retry=RETRYABLE, input={"text": "second", "fail_until_attempt": 2})
    body, headers = _with_record("py-executor")(node_side, task)
    async with Replies.open(fabric) as replies:
        await replies.publish(task, body, headers)
        result = await replies.answer_to(task.task_id)
    # Then the Node executor runs the attempt the record derives: attempt 2, which succeeds
    assert (result["status"], result["attempt"], result["token"]) == ("SUCCESS", 2, task.token)
    assert result["output"] == {"text": "SECOND"}


async def test_the_node_executor_refuses_a_copy_of_an_attempt_it_took(
    fabric: Fabric, node_side: NodeSide
) -> None:
    task = _task(node_side, input={"text": "once"})
    body, headers = _by("dispatcher")(node_side, task)
    async with Replies.open(fabric) as replies:
        # Given a task the Node executor ran and answered
        await replies.publish(task, body, headers)
        assert (await replies.answer_to(task.task_id))["output"] == {"text": "ONCE"}
        # When a copy of it is published again (no broker redelivery)
        await replies.publish(task, body, headers)
        # Then the copy is refused as a replay: dead-lettered, and not answered
        assert await _dead_letter(fabric, task.task_id) == [(ErrorCode.REPLAYED, NODE_EXECUTOR_ID)]
        await replies.drained_after(node_side)
    assert replies.task_ids().count(task.task_id) == 1


async def test_the_node_executor_trusts_a_dispatcher_key_added_while_it_runs(
    fabric: Fabric, node_side: NodeSide
) -> None:
    # When a new dispatcher key and its scope are put into the running Node executor's key
    # directory
    newcomer = Key.new(Role.DISPATCHER, "interop-newcomer", CAPABILITY)
    _trust(node_side.trust_dir, newcomer.signer.public_key, newcomer.key_id, newcomer.scope)
    async with fabric.dispatcher(
        signer=newcomer.signer,
        issuer="interop-newcomer",
        results_keyring=node_side.results_keyring,
    ) as dispatcher:
        result = await dispatcher.run(CAPABILITY, {"text": "rotated"}, wait_s=20)
    # Then the tasks it signs run, with no restart
    assert result.status is Status.SUCCESS, result.error
    assert result.output == {"text": "ROTATED"}
    assert node_side.executor.process.returncode is None
    assert f"trusting new key {newcomer.key_id}" in node_side.executor.log()
