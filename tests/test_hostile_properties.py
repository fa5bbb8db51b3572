"""A message whose AMQP properties the client cannot decode never costs a consumer its connection.

pamqp, under aiormq, cannot decode a ``timestamp`` past the year 9999 (as a property or a
``T`` header value), a short string that is not UTF-8 (``message_id``, ``type``, a header
key), or headers nested deeper than Python's recursion limit; RabbitMQ accepts all of these.
Without :mod:`wayang_mq.amqp.frames`, aiormq closes the connection of whoever receives such a
message, and the message comes back after every reconnect.

Each test publishes the hostile messages raw (pika writes the property bytes given to it as
they are) to one consumer: the worker's task queue, the reaper's queue, a dispatcher's reply
queue, ``wayang.control``, the dead queue read by ``wayang-mq dead list`` and ``dead replay``.
Then the consumer keeps its connection (no ``broker.disconnected`` is logged), still serves a
normal message, and the hostile ones are dead-lettered with the reason (tasks) or discarded
with a logged reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Callable, Iterator
from typing import Any

import aio_pika
import pamqp.encode
import pamqp.frame
import pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from pamqp import commands
from wayang_workers.demo import Echo, Sleep

from tests.test_cli import wayang
from wayang_mq import ErrorCode, Status, Task
from wayang_mq.amqp import frames
from wayang_mq.client.replies import ResultSeen, Verdict
from wayang_mq.core.model import CancelRequest, Result, StatusReport, TaskState, new_id
from wayang_mq.core.names import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    RESULTS_EXCHANGE,
    TASKS_EXCHANGE,
    cancel_key,
    dead_queue,
    status_reply_key,
)
from wayang_mq.core.wire import (
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    UNDECODABLE_HEADER,
    decode,
    encode,
    signed_message,
)
from wayang_mq.testing.harness import Fabric, eventually

pytestmark = pytest.mark.timeout(180)

PROPERTIES = commands.Basic.Properties
MAX_U64 = 2**64 - 1
GARBAGE = b"\xc1\xc1 not msgpack"
DISCONNECTED = "event=broker.disconnected"

# -- hostile property bytes ------------------------------------------------------------------


def _shortstr(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def _table(headers: dict[str, Any], extra: bytes) -> bytes:
    """``headers`` as pamqp encodes a field table, with ``extra`` raw entries after them."""
    entries = pamqp.encode.field_table(headers)[4:] + extra
    return struct.pack(">I", len(entries)) + entries


def _nested(depth: int) -> bytes:
    """A field-table value (``F``) holding itself ``depth`` times."""
    table = struct.pack(">I", 0)
    for _ in range(depth):
        table = _table({}, b"\x01n" + b"F" + table)
    return b"F" + table


def _properties(**fields: Any) -> bytes:
    """A content header's property flags and list: values as pamqp encodes them, except
    ``bytes``, which are written as they are (the hostile part)."""
    flags, parts = 0, []
    for name in PROPERTIES.__slots__:
        if name in fields:
            value = fields[name]
            flags |= PROPERTIES.flags[name]
            if not isinstance(value, bytes):
                value = pamqp.encode.by_type(value, PROPERTIES.amqp_type(name))
            parts.append(value)
    return struct.pack(">H", flags) + b"".join(parts)


Change = Callable[[dict[str, Any]], dict[str, Any]]


def _replace(**hostile: bytes) -> Change:
    return lambda fields: fields | hostile


def _add_header(extra: bytes) -> Change:
    return lambda fields: fields | {"headers": _table(fields["headers"], extra)}


#: one property pamqp 4.0.1 cannot decode per case, and how the reason names it
HOSTILE: dict[str, tuple[Change, str]] = {
    "timestamp 2**64-1": (
        _replace(timestamp=struct.pack(">Q", MAX_U64)),
        "timestamp: year",  # Python 3.11: "year 584556019 is out of range"
    ),
    "a timestamp header past the year 9999": (
        _add_header(b"\x02ts" + b"T" + struct.pack(">Q", MAX_U64)),
        "headers: year",
    ),
    "a header key that is not UTF-8": (
        _add_header(b"\x02\xff\xfe" + b"t\x01"),
        "headers: 'utf-8' codec can't decode",
    ),
    "headers nested past the recursion limit": (
        _add_header(b"\x01n" + _nested(2000)),
        "headers: maximum recursion depth exceeded",
    ),
    "a type that is not UTF-8": (
        _replace(message_type=_shortstr(b"wayang.task.v1\xff")),
        "message_type: 'utf-8' codec can't decode",
    ),
    "a message id that is not UTF-8": (
        _replace(message_id=_shortstr(b"\xfe\xff-no-id")),
        "message_id: 'utf-8' codec can't decode",
    ),
}
#: the cases whose message id survives, so that an answer can name it
CORRELATED = [case for case in HOSTILE if "message id" not in case]


def _hostile(case: str, fields: dict[str, Any]) -> bytes:
    change, _ = HOSTILE[case]
    return _properties(**change(fields))


class RawProperties(pika.BasicProperties):
    """Properties as exact bytes: pika writes what ``encode()`` returns into the content
    header, after the class id and body size."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self._raw = raw

    def encode(self) -> list[bytes]:
        return [self._raw]


def _publish_hostile(
    amqp_url: str, exchange: str, routing_key: str | bytes, messages: list[tuple[bytes, bytes]]
) -> None:
    """Publish each (properties, body), confirmed, as a hostile client (blocking: run it in a
    thread). ``routing_key`` may be bytes that are not UTF-8."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for raw, body in messages:
            channel.basic_publish(exchange, routing_key, body, RawProperties(raw))
    finally:
        connection.close()


def _fields(message_id: str, headers: dict[str, Any], **more: Any) -> dict[str, Any]:
    """The properties wayang-mq itself sends (wire-format.md §2)."""
    return {
        "content_type": "application/msgpack",
        "headers": headers,
        "delivery_mode": 2,
        "message_id": message_id,
        "message_type": "wayang.task.v1",
        **more,
    }


def _signed_task(fabric: Fabric, reply_to: str) -> tuple[Task, bytes, dict[str, Any]]:
    task = Task.create("demo.echo", {"hostile": True}, task_id=new_id(), reply_to=reply_to)
    body = encode(task)
    return task, body, dict(fabric.signer.headers(body))


async def _drain(queue: aio_pika.abc.AbstractQueue, count: int) -> list[AbstractIncomingMessage]:
    """``count`` messages of ``queue`` (basic.get, acked), as soon as they are there."""
    got: list[AbstractIncomingMessage] = []

    async def enough() -> bool:
        while len(got) < count and (message := await queue.get(no_ack=True, fail=False)):
            got.append(message)
        return len(got) >= count

    await eventually(enough, what=f"{count} messages on {queue.name}")
    return got


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="wayang_mq")
    yield caplog


# -- the shim, alone ---------------------------------------------------------------------------


@pytest.fixture
def shim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shim installed for one test only: the broker tests must prove that ``connect()``
    installs it, whatever ran before them."""
    for frame in (PROPERTIES, commands.Basic.Deliver, commands.Basic.GetOk):
        monkeypatch.setattr(frame, "unmarshal", frame.unmarshal)
    monkeypatch.setattr(PROPERTIES, frames.INSTALLED_ATTR, False, raising=False)
    frames.install()


@pytest.mark.usefixtures("shim")
@pytest.mark.parametrize("case", list(HOSTILE))
def test_undecodable_properties_are_left_unset_and_named_the_rest_decoded(case: str) -> None:
    # Given a content header with one property pamqp cannot decode, among valid ones
    raw = _hostile(case, _fields("task-1", {"wayang-key-id": "k1"}, reply_to="reply.x"))
    # When pamqp decodes it
    properties = PROPERTIES()
    properties.unmarshal(struct.unpack_from(">H", raw)[0], raw[2:])
    # Then the reason names it, and the properties around it are decoded
    assert properties.headers is not None
    assert HOSTILE[case][1] in properties.headers[UNDECODABLE_HEADER]
    assert (properties.reply_to, properties.delivery_mode) == ("reply.x", 2)
    assert properties.content_type == "application/msgpack"


@pytest.mark.usefixtures("shim")
def test_a_delivery_whose_routing_key_is_not_utf8_is_decoded_with_replacement_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a basic.deliver frame whose routing key is not UTF-8
    deliver = commands.Basic.Deliver("ctag", 7, True, "wayang.dlx", "demo.xx")
    raw = pamqp.frame.marshal(deliver, 1).replace(b"demo.xx", b"demo.\xff\xfe")
    # When pamqp decodes it
    _, channel, decoded = pamqp.frame.unmarshal(raw)
    # Then the bad bytes read as U+FFFD, every other field as sent, and it is logged
    assert isinstance(decoded, commands.Basic.Deliver) and channel == 1
    assert decoded.routing_key == "demo.\ufffd\ufffd"
    assert (decoded.consumer_tag, decoded.delivery_tag, decoded.redelivered) == ("ctag", 7, True)
    assert decoded.exchange == "wayang.dlx"
    assert "event=amqp.undecodable frame=Basic.Deliver delivery_tag=7" in caplog.text


@pytest.mark.usefixtures("shim")
def test_what_pamqp_decodes_is_left_as_it_decodes_it() -> None:
    sent = PROPERTIES(message_id="m", headers={"k": "v", "n": {"deep": [1, 2]}}, reply_to="r")
    decoded = PROPERTIES()
    decoded.unmarshal(struct.unpack_from(">H", sent.marshal())[0], sent.marshal()[2:])
    assert decoded == sent and UNDECODABLE_HEADER not in (decoded.headers or {})


# -- the consumers -----------------------------------------------------------------------------


async def test_a_task_with_undecodable_properties_is_dead_lettered_and_the_worker_keeps_serving(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    url, reply_to = fabric.endpoint.amqp_url, f"reply.hostile-{new_id()[:8]}"
    await fabric.purge("demo.echo")
    tasks = {case: _signed_task(fabric, reply_to) for case in HOSTILE}
    try:
        async with (
            await aio_pika.connect(url) as connection,
            fabric.worker([Echo()], executor_id="hostile-worker", concurrency=1),
            fabric.dispatcher() as dispatcher,
        ):
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            await replies.bind(RESULTS_EXCHANGE, reply_to)
            # When a client publishes signed tasks, each with one property pamqp cannot decode
            hostile = [
                (_hostile(case, _fields(task.task_id, headers, reply_to=reply_to)), body)
                for case, (task, body, headers) in tasks.items()
            ]
            await asyncio.to_thread(_publish_hostile, url, TASKS_EXCHANGE, "demo.echo", hostile)
            # Then the same worker runs the next task (one at a time: it comes after them)
            good = await dispatcher.run("demo.echo", {"after": "hostile"}, wait_s=30)
            assert good.status is Status.SUCCESS and good.output == {"after": "hostile"}
            # and each hostile task waits in the dead queue with its reason, none of them run
            dead_letters = await _drain(
                await channel.get_queue(dead_queue("demo.echo"), ensure=False), len(HOSTILE)
            )
            by_body = {letter.body: letter for letter in dead_letters}
            for case, (_, body, _) in tasks.items():
                letter = by_body[body]
                assert letter.headers[ERROR_CODE_HEADER] == ErrorCode.INVALID_TASK
                assert f"could not be decoded: {HOSTILE[case][1]}" in str(
                    letter.headers[ERROR_MESSAGE_HEADER]
                )
            # and none is answered: properties that could not be read cannot be trusted, and
            # the reply address was the sender's to choose (docs/security.md §6). The good
            # task came after them all, so any answer would be there by now.
            assert await replies.get(fail=False) is None
    finally:
        await fabric.purge("demo.echo")
        await fabric.purge_reaper()  # the worker's copies: it answered them itself
    # and the worker never lost its connection
    assert caplog.text.count("event=task.dead_lettered") == len(HOSTILE)
    assert DISCONNECTED not in caplog.text


async def test_a_dead_letter_with_undecodable_properties_is_set_aside_and_the_reaper_keeps_serving(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    url, reply_to = fabric.endpoint.amqp_url, f"reply.hostile-{new_id()[:8]}"
    await fabric.purge("demo.echo")
    await fabric.purge_reaper()
    tasks = {case: _signed_task(fabric, reply_to) for case in HOSTILE}
    wrong_key_id = new_id()
    try:
        async with (
            await aio_pika.connect(url) as connection,
            fabric.reaper(prefetch=1) as reaper,
        ):
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            await replies.bind(RESULTS_EXCHANGE, reply_to)
            # When dead letters reach wayang.reaper, each with one property pamqp cannot
            # decode, and one whose routing key is not UTF-8
            hostile = [
                (_hostile(case, _fields(task.task_id, headers, reply_to=reply_to)), body)
                for case, (task, body, headers) in tasks.items()
            ]
            await asyncio.to_thread(
                _publish_hostile, url, DEAD_LETTER_EXCHANGE, "demo.echo", hostile
            )
            key = _properties(**_fields(wrong_key_id, {}, reply_to=reply_to))
            await asyncio.to_thread(
                _publish_hostile, url, DEAD_LETTER_EXCHANGE, b"demo.\xff", [(key, GARBAGE)]
            )
            # and then a dead letter of a well-formed, signed task
            marker, marker_body, marker_headers = _signed_task(fabric, reply_to)
            plain = _properties(**_fields(marker.task_id, marker_headers, reply_to=reply_to))
            await asyncio.to_thread(
                _publish_hostile, url, DEAD_LETTER_EXCHANGE, "demo.echo", [(plain, marker_body)]
            )
            # Then the reaper answers the signed one (one at a time: it is the last), and sets
            # every hostile one aside unanswered, saying why it could not trust it
            (answer,) = [decode(m.body, Result) for m in await _drain(replies, 1)]
            assert answer.task_id == marker.task_id
            assert await replies.get(fail=False) is None
            for case in CORRELATED:
                assert reaper.handled(tasks[case][0].task_id) is not None
    finally:
        await fabric.purge("demo.echo")
        await fabric.purge_reaper()
    assert caplog.text.count('why="its AMQP properties could not be decoded') == len(HOSTILE)
    assert caplog.text.count("event=dead_letter.unanswerable") == len(HOSTILE)
    assert caplog.text.count("event=security.refused") == 1  # the unsigned one
    assert "event=amqp.undecodable frame=Basic.Deliver" in caplog.text
    # and the reaper never lost its connection
    assert DISCONNECTED not in caplog.text


async def test_a_result_with_undecodable_properties_is_discarded_and_the_dispatcher_keeps_serving(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    url = fabric.endpoint.amqp_url
    await fabric.purge("demo.echo")
    seen: list[ResultSeen] = []
    try:
        async with fabric.dispatcher() as dispatcher:
            dispatcher.observe(seen.append)
            # Given a task waiting for its result (no worker runs yet)
            handle = await dispatcher.submit("demo.echo", {"real": True})
            # When forged results for it arrive on the dispatcher's reply queue, signed by a
            # trusted key but each with one property pamqp cannot decode
            forged = []
            for case in HOSTILE:
                result = Result.answering(
                    handle.task, "forger", Status.SUCCESS, output={"forged": case}
                )
                signed = signed_message(result, fabric.signer, message_id=handle.task_id)
                fields = _fields(handle.task_id, dict(signed.headers), message_type=signed.type)
                forged.append((_hostile(case, fields), signed.body))
            await asyncio.to_thread(
                _publish_hostile, url, RESULTS_EXCHANGE, dispatcher.reply_to, forged
            )
            # Then each is refused, with the reason logged
            await eventually(
                lambda: [s.verdict for s in seen] == [Verdict.INVALID] * len(HOSTILE),
                what="every forged result refused",
            )
            # and the task's real result still reaches the dispatcher
            async with fabric.worker([Echo()], executor_id="hostile-results"):
                result = await handle.result(30)
            assert result.status is Status.SUCCESS and result.output == {"real": True}
    finally:
        await fabric.purge("demo.echo")
    refused = [line for line in caplog.text.splitlines() if "event=result.invalid" in line]
    assert len(refused) == len(HOSTILE)
    assert all("could not be decoded" in line for line in refused)
    # and the dispatcher never lost its connection
    assert DISCONNECTED not in caplog.text


async def test_a_control_message_with_undecodable_properties_is_refused_and_control_still_works(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    url = fabric.endpoint.amqp_url
    await fabric.purge("demo.sleep")
    try:
        async with (
            fabric.worker([Sleep()], executor_id="hostile-control") as worker,
            fabric.dispatcher() as dispatcher,
        ):
            # Given a running task
            handle = await dispatcher.submit("demo.sleep", {"seconds": 60})
            await eventually(
                lambda: worker.status(handle.task_id).state is TaskState.RUNNING,
                what="the task running",
            )
            # When cancels of it are broadcast, signed by a trusted key but each with one
            # property pamqp cannot decode, and one whose routing key is not UTF-8
            request = CancelRequest(task_id=handle.task_id, reason="hostile", requester="x")
            signed = signed_message(request, fabric.signer, message_id=handle.task_id)
            fields = _fields(handle.task_id, dict(signed.headers), message_type=signed.type)
            cancels = [(_hostile(case, fields), signed.body) for case in HOSTILE]
            key = _properties(message_type="wayang.cancel.v1", message_id="no-key")
            await asyncio.to_thread(
                _publish_hostile, url, CONTROL_EXCHANGE, cancel_key(handle.task_id), cancels
            )
            await asyncio.to_thread(
                _publish_hostile, url, CONTROL_EXCHANGE, b"cancel.\xff", [(key, GARBAGE)]
            )
            # and status reports with such properties reach the dispatcher's status queue
            report = StatusReport(
                request_id=new_id(), task_id=handle.task_id, executor_id="x", state="running"
            )
            fields = _fields(report.request_id, {}, message_type=report.wire_type)
            reports = [(_hostile(case, fields), encode(report)) for case in HOSTILE]
            await asyncio.to_thread(
                _publish_hostile,
                url,
                CONTROL_EXCHANGE,
                status_reply_key(dispatcher.dispatcher_id),
                reports,
            )
            # Then every one is refused with its reason, and the task keeps running
            await eventually(
                lambda: (
                    caplog.text.count("event=control.refused") == 2 * len(HOSTILE)
                    and "event=security.refused" in caplog.text
                ),  # the unsigned one
                what="every hostile control message refused",
            )
            assert worker.status(handle.task_id).state is TaskState.RUNNING
            # and status and cancel still work, on both ends
            status = await dispatcher.status(handle.task_id)
            assert (status.state, status.executor_id) == ("running", "hostile-control")
            assert await dispatcher.cancel(handle.task_id, "a real cancel")
            result = await handle.result(30)
            assert result.error is not None and result.error.code is ErrorCode.CANCELLED
            assert result.error.message == "a real cancel"
    finally:
        await fabric.purge("demo.sleep")
    refused = [line for line in caplog.text.splitlines() if "event=control.refused" in line]
    assert sum("could not be decoded" in line for line in refused) == 2 * len(HOSTILE)
    assert "event=amqp.undecodable frame=Basic.Deliver" in caplog.text
    # and neither the worker nor the dispatcher lost its connection
    assert DISCONNECTED not in caplog.text


async def test_dead_list_and_replay_show_undecodable_dead_letters_and_leave_them(
    fabric: Fabric,
) -> None:
    url = fabric.endpoint.amqp_url
    env = {"WAYANG_AMQP_URL": url, "WAYANG_KEY_DIR": str(fabric.key_dir)}
    await fabric.purge("demo.echo")
    reply_to = f"reply.hostile-{new_id()[:8]}"
    tasks = {case: _signed_task(fabric, reply_to) for case in HOSTILE}
    good, good_body, good_headers = _signed_task(fabric, reply_to)
    try:
        # Given dead letters of demo.echo, each with one property pamqp cannot decode, and a
        # task that died of nothing wrong with it
        hostile = [
            (_hostile(case, _fields(task.task_id, headers)), body)
            for case, (task, body, headers) in tasks.items()
        ]
        hostile.append((_properties(**_fields(good.task_id, good_headers)), good_body))
        await asyncio.to_thread(_publish_hostile, url, DEAD_LETTER_EXCHANGE, "demo.echo", hostile)
        # When they are listed
        listed = await asyncio.to_thread(wayang, "dead", "list", "demo.echo", "--json", env=env)
        # Then each shows, with what could not be decoded
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        letters = {d["task_id"]: d for d in json.loads(listed.stdout)}
        assert len(letters) == len(HOSTILE) + 1
        for case in CORRELATED:
            why = letters[tasks[case][0].task_id]["message"]
            assert f"could not be decoded: {HOSTILE[case][1]}" in why
        table = await asyncio.to_thread(wayang, "dead", "list", "demo.echo", env=env)
        assert table.returncode == 0 and table.stdout.count("could not be decoded") == len(HOSTILE)
        # When everything is replayed (no worker runs: the replayed task waits in its queue)
        replayed = await asyncio.to_thread(
            wayang, "dead", "replay", "demo.echo", "--all", "--queue-timeout", "60", env=env
        )
        # Then the sound task is replayed, and each hostile one is left with its reason
        assert replayed.returncode == 1 and "Traceback" not in replayed.stderr, replayed.stderr
        assert f"replayed  {good.task_id}  to demo.echo" in replayed.stdout
        for case in CORRELATED:
            assert (
                f"left      {tasks[case][0].task_id}  cannot be replayed: its AMQP properties"
                f" could not be decoded: {HOSTILE[case][1]}"
            ) in replayed.stdout
        assert f"1 replayed, {len(HOSTILE)} left in {dead_queue('demo.echo')}" in replayed.stdout
        # and no listing or replay lost its connection (their stderr logs JSON, not key=value)
        assert "broker.disconnected" not in listed.stderr + table.stderr + replayed.stderr
    finally:
        await fabric.purge("demo.echo")
        await fabric.purge_reaper()  # wayang.dlx copied them there too
