"""docs/wire-format.md is the contract: its test vector is what the code produces byte for
byte, its schemas are what the models generate, and every message the code emits matches it."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest
from aio_pika.abc import AbstractIncomingMessage
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jsonschema import Draft202012Validator
from wayang_workers.demo import Echo, Fail, LongSleep, Sleep

from wayang_mq import __version__
from wayang_mq.core.envelope import (
    ATTEMPT_HEADER,
    ATTEMPT_KEY_ID_HEADER,
    ATTEMPT_SIGNATURE_HEADER,
    open_task,
)
from wayang_mq.core.model import WIRE_TYPES, AttemptRecord, RetryHints, Task
from wayang_mq.core.names import (
    CONTROL_EXCHANGE,
    EVENTS_EXCHANGE,
    RESULTS_EXCHANGE,
    RETRY_EXCHANGE,
    TASKS_EXCHANGE,
)
from wayang_mq.core.schema import all_schemas
from wayang_mq.core.signing import KEY_ID_HEADER, SIGNATURE_HEADER, KeyRing, Signer
from wayang_mq.core.wire import APP_ID, PARTITION_KEY_HEADER, encode
from wayang_mq.testing.harness import Fabric, eventually

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"
# RFC 8032, section 7.1, TEST 1: the secret key (seed) and the public key the RFC derives from it
RFC8032_TEST1_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC8032_TEST1_PUBLIC_KEY = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


def _block(tag: str) -> str:
    match = re.search(rf"```{re.escape(tag)}\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/wire-format.md has no ```{tag} block"
    return match.group(1)


def _doc_keys() -> tuple[str, str]:
    """The seed and the public key the doc's test vector names, as hex."""
    match = re.search(
        r"seed \(RFC 8032, section 7\.1, TEST 1\):\s*`([0-9a-f]{64})`, whose public key is\s*"
        r"`([0-9a-f]{64})`",
        DOC.read_text(),
    )
    assert match, "docs/wire-format.md does not name the test vector's seed and public key"
    return match.group(1), match.group(2)


def _doc_headers() -> dict[str, str]:
    lines = _block("text test-vector-headers").strip().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def test_the_docs_key_is_rfc8032_test1_and_its_key_id_is_derived_as_documented() -> None:
    # Given the seed and public key the doc names
    seed, public_key = _doc_keys()
    # Then they are RFC 8032's TEST 1 pair, so a reader can check them against the RFC
    assert (seed, public_key) == (RFC8032_TEST1_SEED, RFC8032_TEST1_PUBLIC_KEY)

    # When the signer is built from the seed
    signer = Signer.from_seed(bytes.fromhex(seed))

    # Then it has the doc's public key, and the key id in the doc's headers is the first 16
    # hex digits of SHA-256 over it (section 5), as a foreign client would compute it
    raw = signer.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert raw.hex() == public_key
    assert _doc_headers()["wayang-key-id"] == hashlib.sha256(raw).hexdigest()[:16]
    assert signer.key_id == hashlib.sha256(raw).hexdigest()[:16]


def test_vector_body_matches_the_encoder_byte_for_byte() -> None:
    task = Task(**json.loads(_block("json test-vector-task")))
    expected = bytes.fromhex("".join(_block("text test-vector-body").split()))
    assert encode(task) == expected


def test_vector_signature_and_key_id_match_the_signer() -> None:
    seed, _ = _doc_keys()
    signer = Signer.from_seed(bytes.fromhex(seed))
    body = bytes.fromhex("".join(_block("text test-vector-body").split()))
    assert _doc_headers() == signer.headers(body)
    task = open_task(
        body, _doc_headers(), KeyRing.of([signer.public_key]), at_ms=1767225600000
    ).task
    assert task.capability == "demo.echo"


# -- every message the code emits matches the documented schema and properties --------------

SCHEMA_DIR = DOC.parent / "schema"


def test_the_committed_schemas_are_what_the_models_generate() -> None:
    # `wayang-mq schema --out docs/schema` writes them again after a model change
    committed = {p.stem: json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.json")}
    assert committed == all_schemas()
    # and every object map in them is closed: unknown keys are refused, as readers refuse them
    assert all(node.get("additionalProperties") is False for node in _objects(committed))


def _objects(node: Any) -> list[dict[str, Any]]:
    """Every schema object with ``properties``, at any depth."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if "properties" in node:
            found.append(node)
        for value in node.values():
            found.extend(_objects(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_objects(value))
    return found


@pytest.mark.parametrize("wire_type", list(WIRE_TYPES))
def test_every_field_of_every_message_type_is_documented(wire_type: str) -> None:
    # each top-level key appears as `key` in the doc's tables (a stranger needs its type,
    # whether it is required and its default: the table row says them)
    text = DOC.read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)`", text, re.M)}
    rows |= {k for m in re.finditer(r"^\| `([a-z_`, ]+)` \|", text, re.M) for k in _keys(m)}
    missing = set(WIRE_TYPES[wire_type].model_fields) - rows
    assert not missing, f"{wire_type}: {sorted(missing)} not in docs/wire-format.md's tables"


def _keys(match: re.Match[str]) -> list[str]:
    return [k.strip(" `") for k in match.group(1).split(",")]


def _validators() -> dict[str, Draft202012Validator]:
    return {
        p.stem: Draft202012Validator(json.loads(p.read_text()), format_checker=None)
        for p in SCHEMA_DIR.glob("*.json")
    }


async def test_every_message_type_the_code_emits_matches_the_doc(
    fabric: Fabric, record_db: str
) -> None:
    """A mixed run (success, failure, retry, long-running, progress, status, cancel, claims), tapped
    on every exchange a stranger reads: each body validates against docs/schema, and each
    message's AMQP properties are those of wire-format §2."""
    seen: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel()
        tap = await channel.declare_queue(exclusive=True)
        for exchange in (RESULTS_EXCHANGE, EVENTS_EXCHANGE, CONTROL_EXCHANGE):
            await tap.bind(exchange, "#")
        tasks_tap = await channel.declare_queue(exclusive=True)
        await tasks_tap.bind(TASKS_EXCHANGE, "demo.#")
        await tasks_tap.bind(RETRY_EXCHANGE, "#")

        async def keep(message: AbstractIncomingMessage) -> None:
            seen.append(message)

        await tap.consume(keep, no_ack=True)
        await tasks_tap.consume(keep, no_ack=True)
        retry = RetryHints(max_attempts=2, initial_backoff_ms=1000)
        async with (
            fabric.worker([Echo(), Sleep(), Fail()], executor_id="doc-tap"),
            fabric.worker([LongSleep()], executor_id="doc-tap-long"),
            fabric.dispatcher() as dispatcher,
        ):
            await dispatcher.run("demo.echo", {"x": 1}, wait_s=20)
            await dispatcher.run("demo.fail", {"mode": "permanent"}, wait_s=20)
            await dispatcher.run("demo.fail", {}, retry=retry, wait_s=30)
            running = await dispatcher.submit("demo.sleep", {"seconds": 30})
            await eventually(
                lambda: _has(seen, "wayang.progress.v1", running.task_id),
                what="progress of the sleeping task",
            )
            summary = await dispatcher.status(running.task_id, wait_s=2)
            assert summary.state == "running"
            await dispatcher.cancel(running.task_id, reason="doc")
            await running.result(20)
        async with fabric.worker([LongSleep()], executor_id="doc-tap-long2"):
            async with fabric.dispatcher() as dispatcher:
                await dispatcher.run("demo.sleep", {"seconds": 0.1}, wait_s=20)
            await eventually(
                lambda: _has(seen, "wayang.heartbeat.v1", "doc-tap-long2"), what="a heartbeat"
            )
        async with (
            fabric.control_plane(record_db),
            fabric.worker([Echo()], executor_id="doc-tap-claims", claims=True),
            fabric.dispatcher() as dispatcher,
        ):
            claimed = await dispatcher.submit("demo.echo", {"x": 2})
            await claimed.result(20)
            await eventually(
                lambda: _has(seen, "wayang.claim-reply.v1", claimed.task_id), what="a claim reply"
            )

    validators = _validators()
    by_type: dict[str, int] = {}
    for message in seen:
        assert message.type in WIRE_TYPES, message.type
        by_type[message.type] = by_type.get(message.type, 0) + 1
        body = msgpack.unpackb(message.body, raw=False)
        errors = [e.message for e in validators[message.type].iter_errors(body)]
        assert not errors, f"{message.type}: {errors}"
        _check_properties(message, body, fabric)
        record = (message.headers or {}).get(ATTEMPT_HEADER)
        if record is not None:
            # §3, §4.7: the attempt record travels in headers, signed as its own type
            _check_attempt_record(message, fabric, validators)
            by_type[AttemptRecord.wire_type] = by_type.get(AttemptRecord.wire_type, 0) + 1
    assert set(by_type) == set(WIRE_TYPES), f"not seen: {set(WIRE_TYPES) - set(by_type)}"
    statuses = {msgpack.unpackb(m.body)["status"] for m in seen if m.type == "wayang.result.v1"}
    assert statuses == {"SUCCESS", "FAILED", "PENDING"}


def _has(seen: list[AbstractIncomingMessage], wire_type: str, subject: str) -> bool:
    return any(m.type == wire_type and m.message_id == subject for m in seen)


def _check_attempt_record(
    message: AbstractIncomingMessage, fabric: Fabric, validators: dict[str, Draft202012Validator]
) -> None:
    """wire-format §3 and §4.7: a retry's record is base64 msgpack, signed by its decider."""
    headers = message.headers or {}
    packed = base64.b64decode(str(headers[ATTEMPT_HEADER]), validate=True)
    record = msgpack.unpackb(packed, raw=False)
    errors = [e.message for e in validators[AttemptRecord.wire_type].iter_errors(record)]
    assert not errors, f"attempt record: {errors}"
    signature_headers = {
        KEY_ID_HEADER: headers[ATTEMPT_KEY_ID_HEADER],
        SIGNATURE_HEADER: headers[ATTEMPT_SIGNATURE_HEADER],
    }
    signer = fabric.keyring.verify(packed, signature_headers, AttemptRecord.wire_type)
    assert signer.key_id == fabric.signer.key_id
    assert record["task_id"] == message.message_id


def _check_properties(
    message: AbstractIncomingMessage, body: dict[str, Any], fabric: Fabric
) -> None:
    """wire-format §2 and §3, for one message."""
    where = f"{message.type} {message.message_id}"
    assert message.content_type == "application/msgpack", where
    assert message.correlation_id == message.message_id, where
    assert isinstance(message.timestamp, datetime), where
    assert message.app_id == APP_ID == f"wayang-mq/{__version__}", where
    control = message.exchange == CONTROL_EXCHANGE
    assert message.delivery_mode == (1 if control else 2), where
    subject = {
        "wayang.registration.v1": body.get("executor_id"),
        "wayang.heartbeat.v1": body.get("executor_id"),
        "wayang.status-request.v1": body.get("request_id"),
        "wayang.status.v1": body.get("request_id"),
    }.get(message.type, body.get("task_id"))
    assert message.message_id == subject, where
    if message.type == "wayang.task.v1":
        assert not message.reply_to or message.reply_to == body.get("reply_to"), where
        assert message.headers.get(PARTITION_KEY_HEADER), where
        # retries wait in a tier: no expiration; new tasks expire at their deadline
        assert (message.expiration is None) == (message.exchange == RETRY_EXCHANGE), where
    if message.type == "wayang.result.v1" and message.exchange == RESULTS_EXCHANGE:
        assert message.reply_to == message.routing_key, where
    # every message is signed (§5), by a key the fabric trusts
    signer = fabric.keyring.verify(message.body, message.headers or {}, str(message.type))
    assert signer.key_id == fabric.signer.key_id, where
