"""A foreign client speaks the wire format with plain ``pika``, following docs/wire-format.md.

The pika side imports nothing from ``wayang_mq``: it packs msgpack and signs with
``cryptography`` itself, exactly as a publisher in another language would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import uuid
from typing import Any

import msgpack
import pika
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from wayang_workers.demo import Echo

from wayang_mq import Status, Task
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.core.envelope import open_task
from wayang_mq.core.scopes import FULL_TRUST, KeyScope, Role
from wayang_mq.core.signing import KeyRing
from wayang_mq.core.wire import task_message
from wayang_mq.testing.harness import Fabric, eventually

ISSUER = "foreign-client"


def signed_bytes(wire_type: str, key_id: str, body: bytes) -> bytes:
    """Section 5: what Ed25519 signs, the protected header line and then the exact body."""
    return f"wayang-mq/1 ed25519 {wire_type} {key_id}\n".encode("ascii") + body


class ForeignPublisher:
    """What docs/wire-format.md tells a non-Python publisher to do, in pika."""

    def __init__(self, amqp_url: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]  # section 5
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def scope(self, *capabilities: str) -> KeyScope:
        """What an operator writes beside our public key (docs/security.md §4)."""
        return KeyScope(Role.DISPATCHER, ISSUER, capabilities)

    def reply_queue(self, reply_key: str) -> str:
        """Section 1: a queue of our own bound to wayang.results with our reply key."""
        declared = self.channel.queue_declare("", exclusive=True)
        queue = str(declared.method.queue)
        self.channel.queue_bind(queue, "wayang.results", routing_key=reply_key)
        return queue

    def publish_task(self, capability: str, task_input: dict[str, Any], reply_to: str) -> str:
        task_id = str(uuid.uuid4())
        now = int(time.time() * 1000)
        body = msgpack.packb(
            {
                "task_id": task_id,
                "token": "foreign-token",
                "node_id": "foreign-node",
                "capability": capability,
                "input": task_input,
                "issued_at_ms": now,
                "deadline_ms": now + 30_000,
                "audience": "wayang",
                "reply_to": reply_to,
                "issuer": ISSUER,  # the id our key's scope names
            }
        )
        signature = base64.b64encode(
            self.key.sign(signed_bytes("wayang.task.v1", self.key_id, body))
        ).decode()
        self.channel.basic_publish(
            "wayang.tasks",
            capability,
            body,
            pika.BasicProperties(
                content_type="application/msgpack",
                type="wayang.task.v1",
                message_id=task_id,
                correlation_id=task_id,
                reply_to=reply_to,
                expiration="30000",
                delivery_mode=2,
                timestamp=now // 1000,
                headers={"wayang-key-id": self.key_id, "wayang-signature": signature},
            ),
            mandatory=True,
        )
        return task_id

    async def receive(self, queue: str) -> tuple[Any, bytes]:
        """The next message on ``queue`` (``basic.get``, auto-ack), waiting by condition."""
        found: list[tuple[Any, bytes]] = []

        def poll() -> bool:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is not None:
                found.append((properties, body))
            return method is not None

        await eventually(lambda: asyncio.to_thread(poll), what=f"a message on {queue}")
        return found[0]


async def test_a_pika_publisher_gets_its_result_on_its_own_reply_queue(fabric: Fabric) -> None:
    foreign = await asyncio.to_thread(ForeignPublisher, fabric.endpoint.amqp_url)
    trusted = KeyRing.scoped(
        [
            (fabric.signer.public_key, FULL_TRUST),
            (foreign.key.public_key(), foreign.scope("demo.*")),
        ]
    )
    try:
        async with fabric.worker([Echo()], keyring=trusted):
            queue = await asyncio.to_thread(foreign.reply_queue, "reply.foreign-client")
            task_id = await asyncio.to_thread(
                foreign.publish_task, "demo.echo", {"from": "pika"}, "reply.foreign-client"
            )
            properties, body = await foreign.receive(queue)
    finally:
        await asyncio.to_thread(foreign.connection.close)
    # The result verifies by the document alone: the worker's key, over the result's header
    key_id = properties.headers["wayang-key-id"]
    signature = base64.b64decode(properties.headers["wayang-signature"])
    fabric.signer.public_key.verify(signature, signed_bytes("wayang.result.v1", key_id, body))
    result = msgpack.unpackb(body)
    assert properties.type == "wayang.result.v1"
    assert properties.correlation_id == task_id
    assert result["task_id"] == task_id
    assert (result["token"], result["node_id"]) == ("foreign-token", "foreign-node")
    assert result["status"] == Status.SUCCESS
    assert result["output"] == {"from": "pika"}


async def test_a_pika_task_is_read_back_and_decoded_by_wayang_mq(fabric: Fabric) -> None:
    foreign = await asyncio.to_thread(ForeignPublisher, fabric.endpoint.amqp_url)
    channel = foreign.channel
    queue = await asyncio.to_thread(
        lambda: str(channel.queue_declare("", exclusive=True).method.queue)
    )
    await asyncio.to_thread(channel.queue_bind, queue, "wayang.tasks", routing_key="interop.read")
    try:
        # The capability is bound only to our private queue: the real workers never see it.
        task_id = await asyncio.to_thread(foreign.publish_task, "interop.read", {"n": 7}, "reply.x")
        properties, body = await foreign.receive(queue)
    finally:
        await asyncio.to_thread(foreign.connection.close)
    ring = KeyRing.scoped([(foreign.key.public_key(), foreign.scope("interop.*"))])
    opened = open_task(body, properties.headers, ring)
    task = opened.task
    assert (task.task_id, task.capability, task.input) == (task_id, "interop.read", {"n": 7})
    assert (task.issuer, task.audience, opened.issuer.key_id) == (ISSUER, "wayang", foreign.key_id)


async def test_a_wayang_mq_task_is_read_and_verified_by_plain_pika(fabric: Fabric) -> None:
    # Given a task published by wayang_mq to a queue only this test reads
    foreign = await asyncio.to_thread(ForeignPublisher, fabric.endpoint.amqp_url)
    channel = foreign.channel
    queue = await asyncio.to_thread(
        lambda: str(channel.queue_declare("", exclusive=True).method.queue)
    )
    await asyncio.to_thread(channel.queue_bind, queue, "wayang.tasks", routing_key="interop.write")
    task = Task.create("interop.write", {"n": 8}, reply_to="reply.x")
    async with fabric.dispatcher() as dispatcher:
        assert dispatcher._publisher is not None
        await dispatcher._publisher.publish(
            "wayang.tasks", "interop.write", to_amqp(task_message(task, fabric.signer))
        )
    try:
        properties, body = await foreign.receive(queue)
    finally:
        await asyncio.to_thread(foreign.connection.close)
    # When pika verifies it by the document alone: key id, then Ed25519 over the header line
    # for the type it expects and the exact bytes
    public = fabric.signer.public_key
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = hashlib.sha256(raw).hexdigest()[:16]
    assert properties.headers["wayang-key-id"] == key_id
    signature = base64.b64decode(properties.headers["wayang-signature"])
    public.verify(signature, signed_bytes("wayang.task.v1", key_id, body))
    # Then the properties and the body are what the document says
    assert properties.content_type == "application/msgpack"
    assert properties.type == "wayang.task.v1"
    assert properties.message_id == task.task_id == properties.correlation_id
    assert properties.delivery_mode == 2
    assert 0 < int(properties.expiration) <= 60_000
    decoded = msgpack.unpackb(body)
    assert decoded["task_id"] == task.task_id and decoded["input"] == {"n": 8}
    # and a flipped byte no longer verifies, nor does the signature pass for another type
    tampered = bytes([body[0] ^ 1]) + body[1:]
    with pytest.raises(InvalidSignature):
        public.verify(signature, signed_bytes("wayang.task.v1", key_id, tampered))
    with pytest.raises(InvalidSignature):
        public.verify(signature, signed_bytes("wayang.result.v1", key_id, body))
