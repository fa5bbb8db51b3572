"""The codec and signatures, without a broker: pure logic."""

from __future__ import annotations

import base64

import msgpack
import pytest

from wayang_mq.core.envelope import TaskChecks, open_task
from wayang_mq.core.errors import (
    ErrorCode,
    InvalidMessage,
    OversizedMessage,
    SignatureError,
    TokenExpired,
)
from wayang_mq.core.model import ErrorInfo, Heartbeat, Progress, Registration, Result, Status, Task
from wayang_mq.core.signing import KEY_ID_HEADER, SIGNATURE_HEADER, KeyRing, Signer, write_keypair
from wayang_mq.core.wire import decode, encode, task_message


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture(scope="module")
def ring(signer: Signer) -> KeyRing:
    return KeyRing.of([signer.public_key])


def test_every_message_type_round_trips_through_msgpack() -> None:
    task = Task.create("demo.echo", {"n": 1, "blob": b"\x00\xff", "nested": [1, {"a": None}]})
    values = [
        task,
        Result(
            task_id=task.task_id,
            token=task.token,
            node_id=task.node_id,
            capability=task.capability,
            status=Status.SUCCESS,
            executor_id="ex-1",
            output={"ok": True},
            metrics={"duration_ms": 1.5},
            logs=("a", "b"),
        ),
        Result.failure(task, "ex-1", ErrorInfo(code=ErrorCode.EXECUTOR_ERROR, retryable=True)),
        Registration(executor_id="ex-1", capabilities=("demo.echo",), concurrency=4),
        Heartbeat(executor_id="ex-1", capabilities=("demo.echo",), in_flight=("t1",)),
        Progress(task_id=task.task_id, executor_id="ex-1", fraction=0.5, message="half"),
    ]
    for value in values:
        assert decode(encode(value), type(value)) == value


def test_fields_at_their_default_are_left_out_of_the_body() -> None:
    task = Task.create("demo.echo")
    keys = set(msgpack.unpackb(encode(task)))
    assert keys == {
        "task_id",
        "token",
        "node_id",
        "capability",
        "issued_at_ms",
        "deadline_ms",
        "audience",
    }


def test_timestamps_are_written_even_in_the_millisecond_they_were_taken() -> None:
    # Given results and heartbeats encoded as soon as they are built (mostly within the same
    # millisecond as their timestamp, where the timestamp equals a fresh default)
    for _ in range(200):
        result = Result(
            task_id="t",
            token="k",
            node_id="n",
            capability="demo.echo",
            status=Status.SUCCESS,
            executor_id="ex-1",
        )
        beat = Heartbeat(executor_id="ex-1", capabilities=("demo.echo",))
        # When they are encoded, Then each body carries its own time (a reader must not fill
        # in its own clock instead), in field order
        body = msgpack.unpackb(encode(result))
        assert body["finished_at_ms"] == result.finished_at_ms
        assert list(body) == [name for name in Result.model_fields if name in body]
        assert msgpack.unpackb(encode(beat))["sent_at_ms"] == beat.sent_at_ms


def test_unknown_field_is_rejected_with_its_name() -> None:
    raw = msgpack.unpackb(encode(Task.create("demo.echo")))
    raw["surprise"] = 1
    with pytest.raises(InvalidMessage, match="surprise"):
        decode(msgpack.packb(raw), Task)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "expected a map"),
        (msgpack.packb({"task_id": "x"}), "token: Field required"),
        (msgpack.packb({"capability": "Not A Capability"}), "capability"),
    ],
)
def test_malformed_bodies_raise_invalid_message_carrying_the_body(
    body: bytes, expected: str
) -> None:
    with pytest.raises(InvalidMessage, match=expected) as caught:
        decode(body, Task)
    assert caught.value.body == body
    assert caught.value.code is ErrorCode.INVALID_TASK


def test_result_status_and_error_must_agree() -> None:
    with pytest.raises(ValueError, match="FAILED result needs an error"):
        Result(
            task_id="t",
            token="k",
            node_id="n",
            capability="demo.echo",
            status=Status.FAILED,
            executor_id="e",
        )


def test_signed_task_opens_with_the_publishers_key(signer: Signer, ring: KeyRing) -> None:
    task = Task.create("demo.echo", {"x": 1}, reply_to="reply.d1")
    message = task_message(task, signer)
    assert message.reply_to == "reply.d1"
    assert message.type == "wayang.task.v1"
    assert 0 < (message.expiration_ms or 0) <= 60_000
    assert open_task(message.body, message.headers, ring).task == task


def test_one_flipped_body_byte_fails_verification(signer: Signer, ring: KeyRing) -> None:
    message = task_message(Task.create("demo.echo"), signer)
    tampered = bytearray(message.body)
    tampered[-1] ^= 0x01
    with pytest.raises(SignatureError, match="does not match") as caught:
        open_task(bytes(tampered), message.headers, ring)
    assert caught.value.code is ErrorCode.BAD_SIGNATURE


def test_another_key_id_fails_verification(signer: Signer, ring: KeyRing) -> None:
    message = task_message(Task.create("demo.echo"), signer)
    headers = {**message.headers, KEY_ID_HEADER: "0000000000000000"}
    with pytest.raises(SignatureError, match="unknown signing key id"):
        open_task(message.body, headers, ring)


def test_a_signature_by_an_untrusted_key_under_a_trusted_id_fails(
    signer: Signer, ring: KeyRing
) -> None:
    message = task_message(Task.create("demo.echo"), signer)
    forged = base64.b64encode(Signer.generate().sign(message.body)).decode()
    headers = {**message.headers, SIGNATURE_HEADER: forged}
    with pytest.raises(SignatureError, match="does not match"):
        open_task(message.body, headers, ring)


def test_unsigned_message_is_refused_before_it_is_parsed(ring: KeyRing) -> None:
    with pytest.raises(SignatureError, match="not signed"):
        open_task(b"\xc1 not even msgpack", {}, ring)


def test_oversized_body_is_refused_before_the_signature_is_checked(ring: KeyRing) -> None:
    with pytest.raises(OversizedMessage, match="limit is 10") as caught:
        open_task(b"x" * 11, {}, ring, TaskChecks(max_body_bytes=10))
    assert caught.value.code is ErrorCode.OVERSIZED


def test_task_past_its_deadline_is_refused_as_token_expired(signer: Signer, ring: KeyRing) -> None:
    task = Task.create("demo.echo", queue_timeout_ms=1_000)
    message = task_message(task, signer)
    with pytest.raises(TokenExpired) as caught:
        open_task(message.body, message.headers, ring, at_ms=task.deadline_ms + 1)
    assert caught.value.code is ErrorCode.TOKEN_EXPIRED


def test_key_ring_loads_keys_written_by_keys_new(tmp_path, signer: Signer) -> None:  # type: ignore[no-untyped-def]
    private_path, public_path = write_keypair(tmp_path)
    assert private_path.stat().st_mode & 0o777 == 0o600
    loaded = Signer.from_file(private_path)
    assert public_path.name == f"{loaded.key_id}.pub"
    ring = KeyRing.load_dir(tmp_path)
    message = task_message(Task.create("demo.echo"), loaded)
    assert ring.verify(message.body, message.headers).key_id == loaded.key_id


def test_next_attempt_builds_a_new_task_and_leaves_the_original() -> None:
    task = Task.create("demo.echo")
    retry = task.next_attempt()
    assert (task.attempt, retry.attempt) == (1, 2)
    assert retry.task_id == task.task_id
    with pytest.raises(ValueError, match="frozen"):
        task.attempt = 5  # type: ignore[misc]
