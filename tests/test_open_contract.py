"""The open contract holds against a stranger's client and a hostile one (issue 9).

- strict wire types: nothing is coerced, bounds are in UTF-8 bytes, clocks are bounded;
- a refused task that verified is answered with its own token; ids that cannot be carried are
  refused, never half-answered;
- key rings follow their directory while daemons run;
- control characters from the wire are escaped in daemon logs;
- a slow publisher confirm is waited for, logged and counted, never re-sent.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import msgpack
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from wayang_workers.demo import Echo

from wayang_mq import ErrorCode, Status, Task
from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp
from wayang_mq.core.envelope import TaskChecks, compensation_of, open_task
from wayang_mq.core.errors import InvalidMessage, NotYetValid, SignatureError
from wayang_mq.core.fields import derived_id
from wayang_mq.core.model import Compensation, Result, new_id, now_ms
from wayang_mq.core.names import RESULTS_EXCHANGE, TASKS_EXCHANGE, dead_queue
from wayang_mq.core.signing import KeyRing, Signer, write_keypair
from wayang_mq.core.wire import decode, encode, signed_message, task_message
from wayang_mq.ops.deadletters import list_dead_letters
from wayang_mq.testing.harness import Fabric, eventually

REPLY = "reply.open-contract"


def _body(**changes: Any) -> dict[str, Any]:
    """A valid task map as a foreign client writes it, with ``changes`` applied."""
    now = now_ms()
    body: dict[str, Any] = {
        "task_id": new_id(),
        "token": "tok",
        "node_id": "node",
        "capability": "demo.echo",
        "input": {"x": 1},
        "issued_at_ms": now,
        "deadline_ms": now + 60_000,
        "audience": "wayang",
        "reply_to": REPLY,
    }
    body.update(changes)
    return body


# -- strict types and bounds, at the decoder ------------------------------------------------

HOSTILE_FIELDS: dict[str, dict[str, Any]] = {
    "a string for an int": {"issued_at_ms": "1767225600000"},
    "true for attempt": {"attempt": True},
    "bytes for task_id": {"task_id": b"abc"},
    "a float for an int": {"timeout_ms": 1.5},
    "NaN for a float": {"policy": {"max_cost": float("nan")}},
    "infinity for a float": {"retry": {"backoff_multiplier": float("inf")}},
    "an int beyond 2^53": {"deadline_ms": 2**60},
    "128 emoji as task_id (512 bytes)": {"task_id": "\U0001f600" * 128},
    "NUL in task_id": {"task_id": "a\x00b"},
    "CR LF in node_id": {"node_id": "n\r\nevent=forged"},
    "ESC in executor pin": {"policy": {"executor_id": "\x1b[31mred"}},
    "reply_to over 200 bytes": {"reply_to": "r" * 201},
    "bytes for an error code": {"retry": {"non_retryable": [b"timeout"]}},
    "an unknown error code": {"retry": {"non_retryable": ["nope"]}},
    "a capability of 129 characters": {"capability": "a" * 129},
    "an unknown key": {"priority": 5},
}


@pytest.mark.parametrize("case", list(HOSTILE_FIELDS))
def test_hostile_field_values_are_refused_not_coerced(case: str) -> None:
    body = msgpack.packb(_body(**HOSTILE_FIELDS[case]), use_bin_type=True)
    with pytest.raises(InvalidMessage):
        decode(body, Task)


def test_an_integer_is_accepted_where_the_doc_says_float_and_lists_become_arrays() -> None:
    # JSON and JavaScript write 2.0 as 2
    body = _body(retry={"backoff_multiplier": 2, "non_retryable": ["timeout"], "max_attempts": 3})
    task = decode(msgpack.packb(body), Task)
    assert task.retry.backoff_multiplier == 2.0
    assert task.retry.non_retryable == (ErrorCode.TIMEOUT,)


def test_ids_are_bounded_in_bytes_not_characters() -> None:
    # 32 emoji are 128 bytes: the most a task id may hold
    assert decode(msgpack.packb(_body(task_id="\U0001f600" * 32)), Task).task_id
    with pytest.raises(InvalidMessage, match="bytes in UTF-8"):
        decode(msgpack.packb(_body(task_id="\U0001f600" * 32 + "x")), Task)


def test_clocks_out_of_bounds_are_refused_with_the_task_so_its_token_can_be_answered() -> None:
    signer = Signer.generate()
    ring = KeyRing.of([signer.public_key])
    now = now_ms()
    future = Task.create("demo.echo", {}).model_copy(
        update={"issued_at_ms": now + 3_600_000, "deadline_ms": now + 3_660_000}
    )
    body = encode(future)
    with pytest.raises(NotYetValid, match="not valid for another") as raised:
        open_task(body, signer.headers(body), ring, TaskChecks(max_clock_skew_ms=300_000))
    assert raised.value.task == future
    far = Task.create("demo.echo", {}, queue_timeout_ms=40 * 24 * 3_600_000)
    body = encode(far)
    with pytest.raises(InvalidMessage, match="deadline"):
        open_task(
            body, signer.headers(body), ring, TaskChecks(max_queue_window_ms=7 * 24 * 3_600_000)
        )
    # within the bounds, both open
    open_task(body, signer.headers(body), ring, TaskChecks(max_queue_window_ms=41 * 24 * 3_600_000))


def test_a_compensation_id_that_would_overflow_its_bound_is_derived_from_a_hash() -> None:
    long_id = "t" * 128
    task = Task.create(
        "demo.echo", {}, task_id=long_id, compensation=Compensation(capability="demo.echo")
    )
    failed = Result.failure(task, "w", error=_error())
    compensation = compensation_of(task, failed.error)
    assert compensation is not None
    assert compensation.task_id == derived_id(long_id, ".compensation", 128)
    assert len(compensation.task_id.encode()) <= 128
    assert compensation.task_id.endswith(".compensation") and long_id not in compensation.task_id
    short = Task.create("demo.echo", {}, task_id="abc", compensation=Compensation(capability="x"))
    assert derived_id(short.task_id, ".compensation", 128) == "abc.compensation"


def _error() -> Any:
    from wayang_mq.core.model import ErrorInfo

    return ErrorInfo(code=ErrorCode.EXECUTOR_ERROR, message="boom")


# -- key rings follow their directory ------------------------------------------------------


def test_a_key_ring_reloads_on_an_unknown_key_id_at_most_once_per_interval(tmp_path: Path) -> None:
    write_keypair(tmp_path)
    ring = KeyRing.load_dir(tmp_path, reload_interval_s=0.0)
    newcomer = Signer.generate()
    body = b"signed by a key added later"
    write_keypair(tmp_path, newcomer)
    assert ring.verify(body, newcomer.headers(body)).key_id == newcomer.key_id
    # an unknown key id re-reads the directory when it changed since the last read; with
    # the directory unchanged, at most once per interval (a flood of made-up ids)
    slow = KeyRing.load_dir(tmp_path, reload_interval_s=3600.0)
    late = Signer.generate()
    write_keypair(tmp_path, late)
    assert slow.verify(body, late.headers(body)).key_id == late.key_id
    unknown = Signer.generate()
    with pytest.raises(SignatureError, match="unknown signing key id"):
        slow.verify(body, unknown.headers(body))
    # a key written into an existing file (the directory unchanged) is seen on reload()
    late_file = tmp_path / f"{late.key_id}.pub"
    late_file.write_bytes(_public_pem(unknown))
    with pytest.raises(SignatureError, match="unknown signing key id"):
        slow.verify(body, unknown.headers(body))
    assert slow.reload() is True
    assert slow.verify(body, unknown.headers(body)).key_id == unknown.key_id
    assert slow.verify(body, unknown.headers(body)).key_id == unknown.key_id
    # a removed key stops being trusted at the next reload
    late_file.unlink()
    assert slow.reload() is True
    with pytest.raises(SignatureError):
        slow.verify(body, unknown.headers(body))


def _public_pem(signer: Signer) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return signer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_fixed_key_ring_and_a_broken_directory_keep_the_keys_they_have(tmp_path: Path) -> None:
    signer = Signer.generate()
    write_keypair(tmp_path, signer)
    ring = KeyRing.load_dir(tmp_path, reload_interval_s=0.0)
    (tmp_path / "broken.pub").write_text("not a key")
    assert ring.reload() is False  # logged, and the loaded keys stay
    body = b"x"
    assert ring.verify(body, signer.headers(body)).key_id == signer.key_id
    assert KeyRing.of([signer.public_key]).reload() is False


def test_signer_from_file_takes_a_str_path(tmp_path: Path) -> None:
    private, _ = write_keypair(tmp_path)
    assert Signer.from_file(str(private)).key_id == private.stem


async def test_a_key_added_while_a_worker_runs_signs_tasks_and_cancels_it_trusts(
    fabric: Fabric, tmp_path: Path
) -> None:
    key_dir = tmp_path / "keys"
    write_keypair(key_dir, fabric.signer)  # the worker signs with the fabric's key
    worker = fabric.spawn_worker(executor_id="keys-added", env={"WAYANG_KEY_DIR": str(key_dir)})
    try:
        worker.wait_started()
        # When a new publisher's public key is put in the directory of a running worker
        newcomer = Signer.generate()
        write_keypair(tmp_path / "elsewhere", newcomer)
        # (its scope first, then the key: a receiver never sees the key without its scope)
        os.replace(tmp_path / "elsewhere" / f"{newcomer.key_id}.toml", key_dir / "new.toml")
        os.replace(tmp_path / "elsewhere" / f"{newcomer.key_id}.pub", key_dir / "new.pub")
        async with fabric.dispatcher(signer=newcomer) as dispatcher:
            # Then its tasks run
            done = await dispatcher.run("demo.echo", {"hello": "new key"}, wait_s=20)
            assert done.status is Status.SUCCESS, done.error
            # and its cancels reach the control consumer
            handle = await dispatcher.submit("demo.sleep", {"seconds": 30})
            await worker.until_logged(f"task_id={handle.task_id}")
            await dispatcher.cancel(handle.task_id, reason="rotated")
            cancelled = await handle.result(20)
        assert cancelled.error is not None and cancelled.error.code is ErrorCode.CANCELLED
        await worker.until_logged("event=keyring.reloaded")
    finally:
        worker.stop()


async def test_sighup_makes_a_running_worker_forget_a_removed_key(
    fabric: Fabric, tmp_path: Path
) -> None:
    key_dir = tmp_path / "keys"
    write_keypair(key_dir, fabric.signer)
    leaving = Signer.generate()
    write_keypair(key_dir, leaving)
    (key_dir / f"{leaving.key_id}.key").unlink()
    worker = fabric.spawn_worker(executor_id="keys-removed", env={"WAYANG_KEY_DIR": str(key_dir)})
    try:
        worker.wait_started()
        async with fabric.dispatcher(signer=leaving) as dispatcher:
            trusted = await dispatcher.run("demo.echo", {"before": True}, wait_s=20)
            assert trusted.status is Status.SUCCESS
            # When the key's file is removed and the worker gets SIGHUP
            (key_dir / f"{leaving.key_id}.pub").unlink()
            worker.signal(signal.SIGHUP)
            await worker.until_logged(f"removed={leaving.key_id}")
            # Then tasks signed with it are refused: dead-lettered unknown_key, answered to
            # nobody (docs/security.md §6)
            refused = await dispatcher.submit("demo.echo", {"after": True})

            async def dead() -> bool:
                letters = await list_dead_letters(fabric.endpoint.amqp_url, "demo.echo")
                return (refused.task_id, ErrorCode.UNKNOWN_KEY) in {
                    (d.task_id, d.code) for d in letters
                }

            await eventually(dead, what="the refused task in the dead queue")
            assert not refused.done()
        await fabric.purge("demo.echo")
    finally:
        worker.stop()


async def test_a_dispatcher_trusts_an_executor_key_added_while_it_runs(
    fabric: Fabric, tmp_path: Path
) -> None:
    results_dir = tmp_path / "executors"
    write_keypair(results_dir)  # some other executor's key
    ring = KeyRing.load_dir(results_dir)
    executor_key = Signer.generate()
    async with fabric.dispatcher(results_keyring=ring) as dispatcher:
        # When the worker's public key is added after the dispatcher started
        write_keypair(results_dir, executor_key)
        async with fabric.worker([Echo()], signer=executor_key):
            result = await dispatcher.run("demo.echo", {"verified": True}, wait_s=20)
    assert result.status is Status.SUCCESS and result.output == {"verified": True}


async def test_a_reaper_verifies_dead_letters_signed_by_a_key_added_while_it_runs(
    fabric: Fabric, tmp_path: Path
) -> None:
    key_dir = tmp_path / "keys"
    write_keypair(key_dir)  # some key, so the reaper starts with a ring
    await fabric.purge("demo.echo")
    await fabric.purge_reaper()
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection, fabric.reaper(keyring=KeyRing.load_dir(key_dir)):
        channel = await connection.channel(publisher_confirms=True)
        replies = await _replies(channel)
        # When a publisher's key is added to the running reaper's directory
        newcomer = Signer.generate()
        write_keypair(key_dir, newcomer)
        # and a task it signed is dead-lettered
        task = _dated()
        body = encode(task)
        dlx = await channel.get_exchange("wayang.dlx")
        await dlx.publish(
            aio_pika.Message(
                body, headers=newcomer.headers(body), message_id=task.task_id, reply_to=REPLY
            ),
            routing_key="demo.echo",
        )
        # Then the reaper verified it: its answer carries the task's own token
        result = decode((await _next(replies)).body, Result)
    await fabric.purge("demo.echo")
    assert (result.task_id, result.token) == (task.task_id, task.token)
    assert result.status is Status.FAILED


# -- refusals answered with the task's own token, or not at all ----------------------------


@pytest.fixture
async def channel(fabric: Fabric) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def _replies(channel: AbstractChannel) -> AbstractQueue:
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(RESULTS_EXCHANGE, REPLY)
    return queue


async def _next(queue: AbstractQueue) -> AbstractIncomingMessage:
    got: list[AbstractIncomingMessage] = []

    async def arrived() -> bool:
        message = await queue.get(fail=False, no_ack=True)
        if message is not None:
            got.append(message)
        return bool(got)

    await eventually(arrived, what=f"a message on {queue.name}")
    return got[0]


async def _publish(
    channel: AbstractChannel, body: bytes, headers: dict[str, Any], **props: Any
) -> None:
    tasks = await channel.get_exchange(TASKS_EXCHANGE)
    message = aio_pika.Message(body, headers=headers, content_type="application/msgpack", **props)
    await tasks.publish(message, routing_key="demo.echo")


def _dated(**changes: Any) -> Task:
    return Task.create("demo.echo", {"x": 1}, reply_to=REPLY).model_copy(update=changes)


REFUSED_WITH_THE_TASK: dict[str, tuple[Any, ErrorCode, str]] = {
    "deadline passed": (
        lambda now: _dated(issued_at_ms=now - 120_000, deadline_ms=now - 60_000),
        ErrorCode.TOKEN_EXPIRED,
        "passed its deadline",
    ),
    "issued an hour ahead": (
        lambda now: _dated(issued_at_ms=now + 3_600_000, deadline_ms=now + 3_660_000),
        ErrorCode.NOT_YET_VALID,
        "not valid for another",
    ),
    "deadline in the year 3000": (
        lambda now: _dated(deadline_ms=32_503_680_000_000),
        ErrorCode.INVALID_TASK,
        "longest queue window",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_WITH_THE_TASK))
async def test_a_verified_task_refused_at_the_door_is_answered_with_its_own_token(
    fabric: Fabric, channel: AbstractChannel, case: str
) -> None:
    build, code, reason = REFUSED_WITH_THE_TASK[case]
    task: Task = build(now_ms())
    await fabric.purge("demo.echo")
    replies = await _replies(channel)
    async with fabric.worker([Echo()]):
        body = encode(task)
        await _publish(channel, body, fabric.signer.headers(body), message_id=task.task_id)
        result = decode((await _next(replies)).body, Result)
    assert (result.task_id, result.token) == (task.task_id, task.token)
    assert result.node_id == task.node_id
    assert result.error is not None and result.error.code is code
    assert reason in result.error.message


async def test_an_amqp_reply_to_that_differs_from_the_signed_body_is_refused(
    fabric: Fabric, channel: AbstractChannel
) -> None:
    await fabric.purge("demo.echo")
    replies = await _replies(channel)
    redirected = await channel.declare_queue(exclusive=True)
    await redirected.bind(RESULTS_EXCHANGE, "reply.attacker")
    task = _dated()
    body = encode(task)
    async with fabric.worker([Echo()]), fabric.dispatcher() as dispatcher:
        await _publish(
            channel,
            body,
            fabric.signer.headers(body),
            message_id=task.task_id,
            reply_to="reply.attacker",
        )
        result = decode((await _next(replies)).body, Result)
        # a barrier: the worker has settled the task before this one's answer
        assert (await dispatcher.run("demo.echo", {}, wait_s=10)).status is Status.SUCCESS
    assert result.token == task.token
    assert result.error is not None and result.error.code is ErrorCode.INVALID_TASK
    assert "differs" in result.error.message
    assert await redirected.get(fail=False) is None  # nothing went to the AMQP reply_to


async def test_a_task_id_too_long_for_amqp_is_refused_and_kept_under_its_message_id(
    fabric: Fabric, channel: AbstractChannel
) -> None:
    await fabric.purge("demo.echo")
    replies = await _replies(channel)
    body = msgpack.packb(_body(task_id="\U0001f600" * 128))  # 512 bytes in UTF-8
    message_id = new_id()
    async with fabric.worker([Echo()], concurrency=1), fabric.dispatcher() as dispatcher:
        await _publish(
            channel, body, fabric.signer.headers(body), message_id=message_id, reply_to=REPLY
        )
        # the next task is delivered after the refused one was settled: a barrier
        assert (await dispatcher.run("demo.echo", {}, wait_s=10)).status is Status.SUCCESS
    # a body that fails the schema is no task anyone may answer: nothing at its reply address
    assert await replies.get(fail=False) is None
    dead = await list_dead_letters(fabric.endpoint.amqp_url, "demo.echo")
    assert [(d.task_id, d.code) for d in dead] == [(message_id, ErrorCode.INVALID_TASK)]
    assert "bytes in UTF-8" in dead[0].message


async def test_a_message_id_no_answer_can_carry_is_dead_lettered_unanswered(
    fabric: Fabric, channel: AbstractChannel
) -> None:
    await fabric.purge("demo.echo")
    replies = await _replies(channel)
    body = b"\xc1 not msgpack"
    hostile_id = "\U0001f600" * 50  # 200 bytes: fits AMQP, not a task id
    async with fabric.worker([Echo()], concurrency=1), fabric.dispatcher() as dispatcher:
        await _publish(channel, body, {}, message_id=hostile_id, reply_to=REPLY)
        # the next task is delivered after the garbage was settled: a barrier
        assert (await dispatcher.run("demo.echo", {}, wait_s=10)).status is Status.SUCCESS
    assert await replies.get(fail=False) is None
    dead = await list_dead_letters(fabric.endpoint.amqp_url, "demo.echo")
    assert len(dead) == 1 and dead[0].task_id.startswith("unknown-")


async def test_control_characters_from_the_wire_are_escaped_in_daemon_logs(
    fabric: Fabric, channel: AbstractChannel
) -> None:
    await fabric.purge("demo.echo")
    worker = fabric.spawn_worker(executor_id="log-escape")
    try:
        worker.wait_started()
        # When a hostile client puts CR LF and an escape sequence in a header the worker
        # reports back in its reason
        hostile = "k\r\nevent=forged\x1b[2J"
        headers = {"wayang-key-id": hostile, "wayang-signature": "AAAA"}
        await _publish(channel, b"\xc1", headers, message_id=new_id(), reply_to=REPLY)
        await worker.until_logged("code=unknown_key")
        log = worker.log()
        # Then the log line holds it escaped, and no forged line begins
        assert "event=forged" in log
        assert "\x1b" not in log and "\r" not in log
        assert "\nevent=forged" not in log
    finally:
        worker.stop()


def test_the_daemon_log_formatter_escapes_control_characters_in_messages() -> None:
    import io
    import logging

    from wayang_mq.core.logs import PrintableFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrintableFormatter("%(message)s"))
    logger = logging.getLogger("test.printable")
    logger.addHandler(handler)
    try:
        logger.warning("event=task.x task_id=%s", "a\x00b\r\nevent=forged\x1b[31m\x9b")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "event=task.x task_id=a\\x00b\\x0d\\x0aevent=forged\\x1b[31m\\x9b\n"


# -- confirms --------------------------------------------------------------------------------


async def test_a_slow_confirm_is_waited_for_logged_and_counted_never_resent(
    fabric: Fabric, channel: AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(RESULTS_EXCHANGE, "reply.slow-confirm")
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        confirm_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # every confirm is "slow" past 0.1 ms: the watch fires before the broker answers
        publisher = ConfirmedPublisher(confirm_channel, slow_confirm_s=0.0001)
        task = Task.create("demo.echo", {"pad": "x" * 2_000_000})
        message = to_amqp(task_message(task, fabric.signer))
        with caplog.at_level("WARNING", logger="wayang_mq.amqp.publisher"):
            await publisher.publish(RESULTS_EXCHANGE, "reply.slow-confirm", message)
    assert publisher.stats.slow_confirms == 1 and publisher.stats.resent == 0
    assert any("publish.confirm_slow" in r.getMessage() for r in caplog.records)
    # confirmed means queued: exactly one copy, nothing re-sent
    declared = await channel.declare_queue(queue.name, passive=True)
    assert declared.declaration_result.message_count == 1


def test_events_carry_their_subject_as_message_id_and_are_persistent(fabric: Fabric) -> None:
    from wayang_mq.core.model import Heartbeat

    beat = Heartbeat(executor_id="w1", capabilities=("demo.echo",))
    message = signed_message(beat, fabric.signer, message_id="w1")
    assert message.delivery_mode == 2 and message.message_id == "w1"
    assert dead_queue("demo.echo") == "wayang.dead.demo.echo"


# -- size limits end to end -------------------------------------------------------------------


async def test_the_broker_refuses_a_body_over_the_fabric_limit_before_anyone_holds_it(
    fabric: Fabric,
) -> None:
    # the test broker is configured as `wayang-mq dev` configures its own: max_message_size
    # is the topology's max_body_bytes, so the broker itself refuses a larger publish
    limit = fabric.topology.defaults.max_body_bytes
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        tasks = await channel.get_exchange(TASKS_EXCHANGE)
        with pytest.raises(aiormq.exceptions.AMQPError, match="max size"):
            await tasks.publish(aio_pika.Message(b"x" * (limit + 1)), routing_key="demo.echo")
        # a body at the limit is taken (unroutable without mandatory: confirmed, then dropped)
        channel = await connection.channel(publisher_confirms=True)
        tasks = await channel.get_exchange(TASKS_EXCHANGE)
        await tasks.publish(aio_pika.Message(b"x" * limit), routing_key="retry-none.nowhere")


async def test_dead_queues_are_bounded_by_the_topologys_policy_on_the_broker(
    fabric: Fabric,
) -> None:
    management = management_client(fabric.endpoint)

    async def applied() -> bool:
        queue = await asyncio.to_thread(management.get_queue, dead_queue("demo.echo"))
        definition = (queue or {}).get("effective_policy_definition") or {}
        return definition.get("max-length-bytes") == fabric.topology.defaults.dead_max_bytes

    await eventually(applied, what="the dead queue's byte bound in effect")
    queue = await asyncio.to_thread(management.get_queue, dead_queue("demo.echo"))
    assert queue is not None
    assert queue["effective_policy_definition"]["overflow"] == "reject-publish"


def test_only_a_failed_result_may_carry_an_error() -> None:
    task = Task.create("demo.echo", {})
    for status in ("SUCCESS", "PENDING"):
        raw = msgpack.unpackb(encode(Result.answering(task, "w", Status.SUCCESS)))
        raw.update(status=status, error={"code": "timeout"})
        with pytest.raises(InvalidMessage, match="cannot carry an error"):
            decode(msgpack.packb(raw), Result)
