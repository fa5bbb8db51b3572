"""A publisher and an executor in JavaScript, written from docs/wire-format.md alone, against
real wayang-mq daemons.

``tests/interop/`` holds them (Node.js, amqplib, @msgpack/msgpack, Ed25519 from node:crypto,
ajv for docs/schema); this file drives them: a round trip each way, retries through a tier,
refused input dead-lettered by the Node executor, keys added while the daemons run, and every
result and event each side sees checked against the documented schemas and properties.
"""

from __future__ import annotations

import asyncio
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
from wayang_mq.core.model import RetryHints, new_id, now_ms
from wayang_mq.core.names import EVENTS_EXCHANGE, RESULTS_EXCHANGE, TASKS_EXCHANGE
from wayang_mq.core.signing import KeyRing, Signer, write_keypair
from wayang_mq.core.wire import encode
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


def _trust(directory: Path, public_key: Ed25519PublicKey, name: str) -> None:
    """Put a public key into a key directory as wire-format §5 says: aside, then renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{name}.partial"
    partial.write_bytes(public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    os.replace(partial, directory / f"{name}.pub")


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


def _assert_python_side_accepts(tap: Tap, signer: Signer) -> set[str]:
    """Everything ``signer`` published verifies, matches docs/schema and wire-format §2;
    returns the message types seen."""
    validators, ring = _validators(), KeyRing.of([signer.public_key])
    seen = set()
    for message in tap.signed_by(signer.key_id):
        where = f"{message.type} {message.routing_key}"
        assert ring.verify(message.body, message.headers) == signer.key_id, where
        body = msgpack.unpackb(message.body, raw=False)
        errors = [e.message for e in validators[str(message.type)].iter_errors(body)]
        assert not errors, f"{where}: {errors}"
        assert message.content_type == "application/msgpack", where
        assert message.delivery_mode == 2, where
        assert message.correlation_id == message.message_id, where
        assert message.timestamp is not None, where
        by_executor = message.type in ("wayang.registration.v1", "wayang.heartbeat.v1")
        assert message.message_id == body["executor_id" if by_executor else "task_id"], where
        if message.exchange == RESULTS_EXCHANGE:
            assert message.reply_to == message.routing_key, where
        seen.add(str(message.type))
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
    signer: Signer  # the Node executor's key
    trust_dir: Path  # the public keys the Node executor trusts
    watch: NodeDaemon
    executor: NodeDaemon
    tap: Tap

    @property
    def results_keyring(self) -> KeyRing:
        return KeyRing.of([self.signer.public_key])


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


@pytest.fixture(scope="module")
async def node_side(
    fabric: Fabric, node: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NodeSide]:
    """``interop.upper`` in the topology, served by the Node executor; both taps listening
    before it starts, so they see its registration."""
    topology = parse_topology(tomllib.loads(f'[capabilities."{CAPABILITY}"]\n'), source="interop")
    await apply_topology(topology, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
    await fabric.purge(CAPABILITY)
    workdir = tmp_path_factory.mktemp("interop-node")
    signer = Signer.generate()
    private_key, _ = write_keypair(workdir / "executor-key", signer)
    # The Node executor trusts the fabric's dispatchers, and itself (it signs its retries, §4.7)
    trust_dir = workdir / "trusted-by-executor"
    _trust(trust_dir, fabric.signer.public_key, "fabric")
    _trust(trust_dir, signer.public_key, "node-executor")
    url = ["--url", fabric.endpoint.amqp_url]
    tiers = ",".join(f"{t.name}={t.ttl_ms}" for t in fabric.topology.retry_tiers)
    async with contextlib.AsyncExitStack() as stack:
        tap = await stack.enter_async_context(_python_tap(fabric))
        watch = await stack.enter_async_context(
            _running(node, "watch.js", [*url, "--trust", str(trust_dir)], workdir / "watch.log")
        )
        executor_args = [*url, "--key", str(private_key), "--key-dir", str(trust_dir)]
        executor_args += ["--capability", CAPABILITY, "--id", NODE_EXECUTOR_ID]
        executor_args += ["--heartbeat-s", "1", "--tiers", tiers]
        executor = await stack.enter_async_context(
            _running(node, "executor.js", executor_args, workdir / "executor.log")
        )
        yield NodeSide(signer, trust_dir, watch, executor, tap)
    await fabric.purge(CAPABILITY)
    await fabric.purge_reaper()  # the dead letters refused here were answered already


# -- Node publisher -> Python worker -----------------------------------------------------------


async def test_the_docs_test_vector_is_what_node_builds(node: str) -> None:
    # The body bytes, key id and signature of wire-format §8, from the JavaScript side
    checked = await asyncio.create_subprocess_exec(
        node, str(INTEROP / "vector.js"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(checked.communicate(), 30)
    assert checked.returncode == 0, out.decode()


async def test_a_node_publisher_gets_a_verified_result_from_a_python_worker(
    fabric: Fabric, node: str, node_side: NodeSide
) -> None:
    # signed with the fabric's key, as `wayang-mq keys new` writes it; results checked against it
    signed = ["--key", str(next(fabric.key_dir.glob("*.key"))), "--trust", str(fabric.key_dir)]
    task_input = {"text": "hi", "nested": {"n": [1, 2.5, None, True], "s": "ü"}}
    watch = node_side.watch
    # Given a Python worker started while the Node watcher listens
    async with fabric.worker([Echo(), Sleep()], executor_id="interop-py"):
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
    # all of it following the doc
    _assert_node_side_accepts(watch, {"interop-py", NODE_EXECUTOR_ID})


async def test_the_node_publisher_refuses_what_it_cannot_trust_or_route(
    fabric: Fabric, node: str, tmp_path: Path
) -> None:
    key = ["--key", str(next(fabric.key_dir.glob("*.key")))]
    async with fabric.worker([Echo()], executor_id="interop-untrusted"):
        # When the result is signed by a key the publisher does not trust
        untrusted = await _publish(
            node, fabric, *key, "--trust", str(tmp_path), "--capability", "demo.echo"
        )
    # Then it fails with the reason, printing no result
    assert (untrusted.code, untrusted.result) == (1, None)
    assert "is not signed by a trusted key: unknown key id" in untrusted.log
    # And a capability no queue serves comes back as basic.return (wire-format §1)
    unrouted = await _publish(
        node, fabric, *key, "--trust", str(fabric.key_dir), "--capability", "interop.nobody"
    )
    assert (unrouted.code, unrouted.result) == (1, None)
    assert "no queue serves interop.nobody" in unrouted.log


async def test_a_python_worker_trusts_a_key_the_node_publisher_adds_while_it_runs(
    fabric: Fabric, node: str, tmp_path: Path
) -> None:
    key_dir = tmp_path / "worker-keys"
    write_keypair(key_dir, fabric.signer)  # the worker signs with the fabric's key
    worker = fabric.spawn_worker(
        ["wayang_workers.demo:Echo"],
        executor_id="interop-rotate",
        env={"WAYANG_KEY_DIR": str(key_dir)},
    )
    try:
        await asyncio.to_thread(worker.wait_started)
        # When the Node publisher makes a new key, puts its public half into the running
        # worker's key directory, and signs a task with it
        published = await _publish(
            node,
            fabric,
            "--new-key-dir",
            str(key_dir),
            "--trust",
            str(fabric.key_dir),
            "--capability",
            "demo.echo",
            "--input",
            '{"signed": "by a new key"}',
        )
        # Then the worker trusts it without a restart
        assert published.code == 0, published.log
        assert published.result is not None
        assert published.result["output"] == {"signed": "by a new key"}
        await worker.until_logged("event=keyring.reloaded")
        assert worker.process.poll() is None
    finally:
        worker.stop()


# -- Python dispatcher -> Node executor --------------------------------------------------------


async def test_a_python_dispatcher_gets_a_verified_result_from_the_node_executor(
    fabric: Fabric, node_side: NodeSide
) -> None:
    async with fabric.dispatcher(results_keyring=node_side.results_keyring) as dispatcher:
        result = await dispatcher.run(
            CAPABILITY, {"text": "hello wayang", "sleep_ms": 600}, heartbeat_timeout_s=3, wait_s=20
        )
    assert result.status is Status.SUCCESS, result.error
    assert result.output == {"text": "HELLO WAYANG"}
    assert result.executor_id == NODE_EXECUTOR_ID
    # And all it published verifies and matches the schemas and properties, in Python...
    tap, key_id = node_side.tap, node_side.signer.key_id
    await eventually(
        lambda: tap.has(key_id, "wayang.heartbeat.v1", f"heartbeat.{NODE_EXECUTOR_ID}"),
        what="a heartbeat from the Node executor",
    )
    assert tap.has(key_id, "wayang.registration.v1", f"registered.{NODE_EXECUTOR_ID}")
    assert tap.has(key_id, "wayang.progress.v1", f"progress.{result.task_id}")
    seen = _assert_python_side_accepts(tap, node_side.signer)
    assert {"wayang.registration.v1", "wayang.heartbeat.v1", "wayang.progress.v1"} <= seen
    assert "wayang.result.v1" in seen
    # ... and in Node
    _assert_node_side_accepts(node_side.watch, {NODE_EXECUTOR_ID})


async def test_the_node_executor_retries_through_a_tier_then_gives_up_as_documented(
    fabric: Fabric, node_side: NodeSide
) -> None:
    retry = RetryHints(max_attempts=2, initial_backoff_ms=1000)
    async with fabric.dispatcher(results_keyring=node_side.results_keyring) as dispatcher:
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
    tap, key_id = node_side.tap, node_side.signer.key_id
    assert tap.has(key_id, "wayang.result.v1", f"attempt.{recovered.task_id}")
    # And the other ends retries_exhausted with its last error, its delivery dead-lettered
    assert exhausted.error is not None
    assert exhausted.error.code is ErrorCode.RETRIES_EXHAUSTED
    assert exhausted.error.details["last_error"]["code"] == "executor_error"
    dead = await list_dead_letters(fabric.endpoint.amqp_url, CAPABILITY)
    assert [(d.code, d.dead_lettered_by) for d in dead if d.task_id == exhausted.task_id] == [
        (ErrorCode.RETRIES_EXHAUSTED, NODE_EXECUTOR_ID)
    ]
    _assert_python_side_accepts(tap, node_side.signer)
    _assert_node_side_accepts(node_side.watch, {NODE_EXECUTOR_ID})


Signed = tuple[bytes, dict[str, str]]


def _signed(fabric: Fabric, task: Task) -> Signed:
    return encode(task), fabric.signer.headers(encode(task))


def _unknown_key(fabric: Fabric, task: Task) -> Signed:
    return encode(task), Signer.generate().headers(encode(task))


def _forged(fabric: Fabric, task: Task) -> Signed:
    return encode(task), fabric.signer.headers(encode(task.model_copy(update={"token": "other"})))


def _float_attempt(fabric: Fabric, task: Task) -> Signed:
    # wire-format §4: `1.0` (a msgpack float) is not an integer, though JavaScript reads it as 1
    fields = msgpack.unpackb(encode(task)) | {"attempt": 1.0}
    body = msgpack.packb(fields, use_single_float=False)
    return body, fabric.signer.headers(body)


REFUSALS: dict[str, tuple[Callable[[Fabric, Task], Signed], dict[str, Any], ErrorCode]] = {
    "signature by an unknown key": (_unknown_key, {}, ErrorCode.BAD_SIGNATURE),
    "forged signature": (_forged, {}, ErrorCode.BAD_SIGNATURE),
    "a float where an integer belongs": (_float_attempt, {}, ErrorCode.INVALID_TASK),
    "expired deadline": (
        _signed,
        {"issued_at_ms": now_ms() - 5000, "deadline_ms": now_ms() - 1000},
        ErrorCode.TOKEN_EXPIRED,
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_the_node_executor_dead_letters_refused_input_and_answers_it(
    fabric: Fabric, node_side: NodeSide, case: str
) -> None:
    build, changes, code = REFUSALS[case]
    task = Task.create(CAPABILITY, {"text": "x"}, task_id=new_id(), reply_to=REPLY)
    body, headers = build(fabric, task.model_copy(update=changes))
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        await replies.bind(RESULTS_EXCHANGE, REPLY)
        # When a task the Node executor must refuse is published, as any client could
        tasks = await channel.get_exchange(TASKS_EXCHANGE)
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
        answers: list[AbstractIncomingMessage] = []

        async def answered() -> bool:
            got = await replies.get(fail=False, no_ack=True)
            if got is not None:
                answers.append(got)
            return bool(answers)

        await eventually(answered, what=f"the answer to the {case}")
    # Then it is answered FAILED with the code, signed by the Node executor
    answer = answers[0]
    assert node_side.results_keyring.verify(answer.body, answer.headers or {})
    result = msgpack.unpackb(answer.body, raw=False)
    errors = [e.message for e in _validators()["wayang.result.v1"].iter_errors(result)]
    assert not errors, errors
    assert (result["task_id"], result["status"]) == (task.task_id, "FAILED")
    assert result["error"]["code"] == code.value
    # (a body that could not be read is answered through its AMQP properties alone, §4.4)
    readable = code is ErrorCode.TOKEN_EXPIRED
    assert result["token"] == (task.token if readable else "")
    assert result["error"]["message"], "the reason, for people"
    # And its delivery waits in the dead queue, marked by the Node executor
    dead = await list_dead_letters(fabric.endpoint.amqp_url, CAPABILITY)
    assert [(d.code, d.dead_lettered_by) for d in dead if d.task_id == task.task_id] == [
        (code, NODE_EXECUTOR_ID)
    ]


async def test_the_node_executor_trusts_a_dispatcher_key_added_while_it_runs(
    fabric: Fabric, node_side: NodeSide
) -> None:
    # When a new dispatcher key is put into the running Node executor's key directory
    newcomer = Signer.generate()
    _trust(node_side.trust_dir, newcomer.public_key, newcomer.key_id)
    async with fabric.dispatcher(
        signer=newcomer, results_keyring=node_side.results_keyring
    ) as dispatcher:
        result = await dispatcher.run(CAPABILITY, {"text": "rotated"}, wait_s=20)
    # Then the tasks it signs run, with no restart
    assert result.status is Status.SUCCESS, result.error
    assert result.output == {"text": "ROTATED"}
    assert node_side.executor.process.returncode is None
    assert f"trusting new key {newcomer.key_id}" in node_side.executor.log()
