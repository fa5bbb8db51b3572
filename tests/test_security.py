"""Nothing on the broker forges a result, mints a task, or stops a deadline (issue 10).

Each test is one probe a hostile client with broker access could try, against a real broker:
it publishes raw AMQP (forged results, tasks, attempt records, heartbeats, status reports,
cancels), then checks what the fabric did: refused with its own code, dead-lettered, logged
as ``security.refused``, never executed, never answered to an address the sender chose, and
the real task still gets its real result. docs/security.md §4–§7 is what is probed.

The keys are scoped as in a deployment: two dispatchers (``sec-a``, ``sec-b``) and a narrow
one for ``payment.*``, the worker's executor key (``sec-worker``, ``demo.*``), another
capability's executor key (``sec-payer``, ``payment.charge``), and a stranger nobody trusts.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from wayang_workers.demo import Fail, Sleep

from wayang_mq import ErrorCode, Executor, Status, Task
from wayang_mq.client.dispatcher import Dispatcher, ResultSeen, Verdict
from wayang_mq.client.supervisor import SupervisionConfig
from wayang_mq.core.envelope import attempt_headers
from wayang_mq.core.model import (
    AttemptRecord,
    ErrorInfo,
    Heartbeat,
    JsonLike,
    Result,
    RetryHints,
    StatusReport,
    StatusRequest,
    TaskState,
    new_id,
    now_ms,
)
from wayang_mq.core.names import (
    CONTROL_EXCHANGE,
    EVENTS_EXCHANGE,
    RESULTS_EXCHANGE,
    TASKS_EXCHANGE,
    dead_queue,
    event_key,
    status_key,
)
from wayang_mq.core.scopes import KeyScope, Role
from wayang_mq.core.signing import SIGNATURE_HEADER, KeyRing, Signer, write_keypair
from wayang_mq.core.wire import ERROR_CODE_HEADER, decode, encode
from wayang_mq.runtime.worker import Worker
from wayang_mq.testing.harness import Fabric, eventually

WORKER_ID = "sec-worker"
ISSUER = "sec-a"
REPLY = "reply.sec-probe"  # the reply address of tasks published raw
GARBAGE = b"\xc1\xc1 not msgpack"
WAIT_S = 20.0
FAST = SupervisionConfig(deadline_grace_ms=300, check_interval_s=0.2, status_wait_s=0.3)
UNSERVED = "agent.reason"  # a capability with a queue and, in these tests, no worker


@dataclass(frozen=True)
class Keys:
    """Every party's signing key, and the ring of what each may sign."""

    dispatcher: Signer  # dispatcher sec-a, demo.*
    other_dispatcher: Signer  # dispatcher sec-b, demo.*
    narrow: Signer  # dispatcher sec-narrow, payment.* only
    executor: Signer  # executor sec-worker, demo.*: the worker's own key
    payer: Signer  # executor sec-payer, payment.charge only
    stranger: Signer  # in nobody's ring
    ring: KeyRing


@pytest.fixture(scope="module")
def keys() -> Keys:
    signers = {name: Signer.generate() for name in Keys.__dataclass_fields__ if name != "ring"}
    scopes = {
        "dispatcher": KeyScope(Role.DISPATCHER, ISSUER, ("demo.*",)),
        "other_dispatcher": KeyScope(Role.DISPATCHER, "sec-b", ("demo.*",)),
        "narrow": KeyScope(Role.DISPATCHER, "sec-narrow", ("payment.*",)),
        "executor": KeyScope(Role.EXECUTOR, WORKER_ID, ("demo.*",)),
        "payer": KeyScope(Role.EXECUTOR, "sec-payer", ("payment.charge",)),
    }
    ring = KeyRing.scoped((signers[name].public_key, scope) for name, scope in scopes.items())
    return Keys(**signers, ring=ring)


class Recorder(Executor):
    """``demo.echo`` that records every attempt it runs: a refused task must never show up."""

    serves = ("demo.echo",)

    def __init__(self) -> None:
        self.ran: list[tuple[str, int]] = []

    async def execute(self, task: Task) -> JsonLike:
        self.ran.append((task.task_id, task.attempt))
        return task.input


@contextlib.asynccontextmanager
async def _worker(
    fabric: Fabric, keys: Keys, *executors: Executor, **config: Any
) -> AsyncIterator[Worker]:
    """An in-process worker holding the executor key and trusting the scoped ring."""
    async with fabric.worker(
        executors, keyring=keys.ring, signer=keys.executor, executor_id=WORKER_ID, **config
    ) as worker:
        yield worker


def _dispatcher(
    fabric: Fabric, keys: Keys, name: str, *, signer: Signer | None = None, **config: Any
) -> contextlib.AbstractAsyncContextManager[Dispatcher]:
    """A dispatcher signing as ``sec-a`` (by default) and verifying results with the ring."""
    values: dict[str, Any] = {
        "signer": signer or keys.dispatcher,
        "issuer": ISSUER,
        "results_keyring": keys.ring,
        "dispatcher_id": f"{name}-{new_id()[:6]}",
    }
    return fabric.dispatcher(**(values | config))


@pytest.fixture
async def amqp(fabric: Fabric) -> AsyncIterator[AbstractChannel]:
    """A channel of the hostile client's own, with publisher confirms."""
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


@pytest.fixture(autouse=True)
async def _left_clean(fabric: Fabric) -> AsyncIterator[None]:
    """Probes leave dead letters and unserved tasks behind: none reaches the next test (or
    a reaper of another test file)."""
    yield
    fabric.stop_processes()
    await fabric.purge("demo.echo", "demo.sleep", "demo.fail", UNSERVED)
    await fabric.purge_reaper()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="wayang_mq")
    return caplog


# -- publishing as a hostile client, reading what came of it ------------------------------------


def _task(capability: str = "demo.echo", **changes: Any) -> Task:
    """A task issued by sec-a to REPLY, with ``changes`` applied unchecked."""
    task = Task.create(capability, {"probe": new_id()[:8]}, reply_to=REPLY, issuer=ISSUER)
    return task.model_copy(update=changes)


def _signed(signer: Signer, model: Any) -> tuple[bytes, dict[str, Any]]:
    body = encode(model)
    return body, signer.headers(body, model.wire_type)


async def _publish_task(
    channel: AbstractChannel,
    body: bytes,
    headers: dict[str, Any],
    *,
    message_id: str,
    capability: str = "demo.echo",
    reply_to: str | None = REPLY,
) -> None:
    """To ``wayang.tasks`` as any account allowed to publish there could."""
    exchange = await channel.get_exchange(TASKS_EXCHANGE)
    message = aio_pika.Message(
        body,
        headers=headers,
        message_id=message_id,
        reply_to=reply_to,
        content_type="application/msgpack",
        type=Task.wire_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await exchange.publish(message, routing_key=capability)


async def _publish(
    channel: AbstractChannel,
    exchange_name: str,
    routing_key: str,
    body: bytes,
    headers: dict[str, Any],
    *,
    message_id: str,
    wire_type: str,
) -> None:
    exchange = await channel.get_exchange(exchange_name)
    message = aio_pika.Message(
        body,
        headers=headers,
        message_id=message_id,
        content_type="application/msgpack",
        type=wire_type,
    )
    await exchange.publish(message, routing_key=routing_key)


async def _publish_result(
    channel: AbstractChannel,
    dispatcher: Dispatcher,
    body: bytes,
    headers: dict[str, Any],
    task_id: str,
) -> None:
    """A result body to ``dispatcher``'s reply address, as any account could publish it."""
    await _publish(
        channel,
        RESULTS_EXCHANGE,
        dispatcher.reply_to,
        body,
        headers,
        message_id=task_id,
        wire_type=Result.wire_type,
    )


async def _tap(channel: AbstractChannel, exchange: str, routing_key: str) -> AbstractQueue:
    """A private queue receiving what ``exchange`` routes with ``routing_key``."""
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key)
    return queue


async def _drain(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    messages = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        messages.append(message)
    return messages


async def _collect(
    queue: AbstractQueue, count: int, what: str, timeout_s: float = WAIT_S
) -> list[AbstractIncomingMessage]:
    """Take messages off ``queue`` until it gave ``count`` of them."""
    got: list[AbstractIncomingMessage] = []

    async def enough() -> bool:
        got.extend(await _drain(queue))
        return len(got) >= count

    await eventually(enough, timeout_s=timeout_s, what=what)
    return got


async def _dead_codes(channel: AbstractChannel, capability: str, count: int) -> dict[str, str]:
    """The next ``count`` dead letters of ``capability``: task id (message id) → error code."""
    queue = await channel.get_queue(dead_queue(capability), ensure=False)
    dead = await _collect(queue, count, f"{count} dead letters in {dead_queue(capability)}")
    codes = {m.message_id or "": str(m.headers.get(ERROR_CODE_HEADER)) for m in dead}
    assert len(codes) == len(dead), "one dead letter per task id"
    return codes


def _flip(data: bytes, at: int) -> bytes:
    flipped = bytearray(data)
    flipped[at] ^= 0x01
    return bytes(flipped)


def _verdicts(seen: list[ResultSeen]) -> collections.Counter[Verdict]:
    return collections.Counter(s.verdict for s in seen)


# -- results: nobody forges one -------------------------------------------------------------------


def _without_token(result: Result) -> bytes:
    """``result`` as a foreign client packs it, with an empty execution token."""
    fields = msgpack.unpackb(encode(result))
    fields["token"] = ""
    return bytes(msgpack.packb(fields))


async def test_a_forged_result_is_rejected_and_the_caller_gets_the_executors_success(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge("demo.echo")
    async with _dispatcher(fabric, keys, "sec-forged") as dispatcher:
        seen: list[ResultSeen] = []
        dispatcher.observe(seen.append)
        # Given a task waiting in its queue (no worker yet)
        handle = await dispatcher.submit("demo.echo", {"real": True})
        forged = Result.answering(handle.task, WORKER_ID, Status.SUCCESS, output={"forged": True})
        empty_token = _without_token(forged)
        # When results for it are published to the dispatcher's reply address: signed by a
        # stranger's key, unsigned with an empty token, and signed by the executor's own key
        # but with an empty token
        for body, headers in [
            _signed(keys.stranger, forged),
            (empty_token, {}),
            (empty_token, keys.executor.headers(empty_token, Result.wire_type)),
        ]:
            await _publish_result(amqp, dispatcher, body, headers, handle.task_id)
        await eventually(lambda: len(seen) == 3, what="the three forged results received")
        # Then each is rejected as invalid, with its reason logged, and the task still waits
        assert _verdicts(seen) == {Verdict.INVALID: 3}
        assert not handle.done()
        for code in (ErrorCode.UNKNOWN_KEY, ErrorCode.BAD_SIGNATURE, ErrorCode.INVALID_TASK):
            assert f"code={code}" in logs.text
        # and once a worker runs it, the caller gets the executor's own SUCCESS
        async with _worker(fabric, keys, Recorder()):
            result = await handle.result(WAIT_S)
    assert (result.status, result.executor_id, result.output) == (
        Status.SUCCESS,
        WORKER_ID,
        {"real": True},
    )
    assert _verdicts(seen) == {Verdict.INVALID: 3, Verdict.HANDED_OUT: 1}


async def test_a_result_from_a_key_not_allowed_to_answer_is_rejected_and_a_wrong_token_fenced(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge("demo.echo")
    async with _dispatcher(fabric, keys, "sec-authority") as dispatcher:
        seen: list[ResultSeen] = []
        dispatcher.observe(seen.append)
        # Given a task waiting in its queue (no worker yet)
        handle = await dispatcher.submit("demo.echo", {"real": True})
        task = handle.task

        def forged(executor_id: str, **changes: Any) -> Result:
            return Result.answering(
                task.model_copy(update=changes), executor_id, Status.SUCCESS, output={"forged": 1}
            )

        # When results are published to its reply address, each with a valid signature:
        # by the executor key of another capability, as itself; by the demo executor's key
        # naming another executor; by another dispatcher's key; and by the right key, as
        # itself, with a token that is not the task's
        probes = [
            _signed(keys.payer, forged("sec-payer")),
            _signed(keys.executor, forged("sec-other")),
            _signed(keys.other_dispatcher, forged("dispatcher:sec-b")),
            _signed(keys.executor, forged(WORKER_ID, token="not-the-token")),
        ]
        for body, headers in probes:
            await _publish_result(amqp, dispatcher, body, headers, task.task_id)
        await eventually(lambda: len(seen) == 4, what="the four forged results received")
        # Then the first three are rejected (the key may not say it), the last is fenced
        assert _verdicts(seen) == {Verdict.INVALID: 3, Verdict.FENCED: 1}
        assert f"code={ErrorCode.CAPABILITY_NOT_ALLOWED}" in logs.text
        assert f"code={ErrorCode.KEY_NOT_ALLOWED}" in logs.text
        assert f"event=result.fenced task_id={task.task_id}" in logs.text
        assert not handle.done()
        # and the caller gets the executor's own SUCCESS once a worker runs the task
        async with _worker(fabric, keys, Recorder()):
            result = await handle.result(WAIT_S)
    assert (result.status, result.executor_id, result.output) == (
        Status.SUCCESS,
        WORKER_ID,
        {"real": True},
    )


async def test_an_expired_copys_answer_cannot_end_a_task_that_started(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge("demo.echo")
    async with _dispatcher(fabric, keys, "sec-started") as dispatcher:
        seen: list[ResultSeen] = []
        dispatcher.observe(seen.append)
        # Given a task its executor accepted (PENDING: it started, its answer comes later)
        handle = await dispatcher.submit("demo.echo", {"long": True})
        task = handle.task

        async def answer(status: Status, **fields: Any) -> None:
            result = Result.answering(task, WORKER_ID, status, **fields)
            body, headers = _signed(keys.executor, result)
            await _publish_result(amqp, dispatcher, body, headers, task.task_id)

        await answer(Status.PENDING, output={"running_on": WORKER_ID})
        await handle.accepted(WAIT_S)
        # When a copy of it, replayed past its deadline somewhere, is answered token_expired
        # with the task's own token, by a key allowed to answer it
        expired = ErrorInfo(code=ErrorCode.TOKEN_EXPIRED, message="passed its deadline")
        await answer(Status.FAILED, error=expired)
        await eventually(lambda: len(seen) == 2, what="both answers received")
        # Then that answer is fenced: a task that started cannot have missed its deadline
        assert _verdicts(seen) == {Verdict.NOT_TERMINAL: 1, Verdict.FENCED: 1}
        assert "expired copy" in logs.text
        assert not handle.done()
        # and the executor's real answer still ends it
        await answer(Status.SUCCESS, output={"long": True})
        result = await handle.result(WAIT_S)
    assert (result.status, result.output) == (Status.SUCCESS, {"long": True})
    await fabric.purge("demo.echo")


async def test_a_dispatcher_key_cannot_end_another_dispatchers_task(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel
) -> None:
    await fabric.purge("demo.echo")
    async with _dispatcher(fabric, keys, "sec-victim") as dispatcher:
        seen: list[ResultSeen] = []
        dispatcher.observe(seen.append)
        # Given sec-a's task waiting in its queue (no worker yet)
        handle = await dispatcher.submit("demo.echo", {"real": True})
        # When dispatcher sec-b signs a FAILED timeout for it, as itself, with the right token
        # (as a dispatcher ends its own tasks at their deadline)
        timeout = Result.failure(
            handle.task,
            "dispatcher:sec-b",
            error=ErrorInfo(code=ErrorCode.TIMEOUT, message="sec-b says it timed out"),
        )
        body, headers = _signed(keys.other_dispatcher, timeout)
        await _publish_result(amqp, dispatcher, body, headers, handle.task_id)
        await eventually(lambda: len(seen) == 1, what="the forged timeout received")
        # Then it is rejected: only a task's own issuer decides its deadline
        assert _verdicts(seen) == {Verdict.INVALID: 1}
        assert not handle.done()
        async with _worker(fabric, keys, Recorder()):
            result = await handle.result(WAIT_S)
    assert (result.status, result.executor_id) == (Status.SUCCESS, WORKER_ID)


# -- tasks nobody could verify choose no reply address --------------------------------------------


async def test_unsigned_garbage_naming_a_victims_task_is_dead_lettered_and_answers_nobody(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge("demo.sleep")
    async with (
        _worker(fabric, keys, Sleep(), concurrency=2) as worker,
        _dispatcher(fabric, keys, "sec-victim") as dispatcher,
    ):
        seen: list[ResultSeen] = []
        dispatcher.observe(seen.append)
        wire = await _tap(amqp, RESULTS_EXCHANGE, dispatcher.reply_to)
        # Given the victim's task running on the worker
        victim = await dispatcher.submit("demo.sleep", {"seconds": 2})
        await eventually(
            lambda: worker.running_task(victim.task_id) is not None, what="the victim running"
        )
        # When unsigned messages claiming its id and reply address are published to
        # wayang.tasks: garbage bytes, and a well-formed copy of the task with another token
        copy = encode(victim.task.model_copy(update={"token": "attacker"}))
        for body in (GARBAGE, copy):
            await _publish_task(
                amqp,
                body,
                {},
                message_id=victim.task_id,
                capability="demo.sleep",
                reply_to=dispatcher.reply_to,
            )
        # Then both are dead-lettered as bad_signature under the victim's id (the worker
        # logs the refusal once their dead copies are confirmed)
        dead = await _collect(
            await amqp.get_queue(dead_queue("demo.sleep"), ensure=False), 2, "two dead letters"
        )
        assert sorted(m.body for m in dead) == sorted([GARBAGE, copy])
        assert {(m.message_id, m.headers[ERROR_CODE_HEADER]) for m in dead} == {
            (victim.task_id, str(ErrorCode.BAD_SIGNATURE))
        }
        refusal = f"event=security.refused task_id={victim.task_id}"
        await eventually(lambda: logs.text.count(refusal) == 2, what="two refusals logged")
        assert "answered=no" in logs.text
        # and the victim still gets its real result
        result = await victim.result(WAIT_S)
        assert (result.status, result.executor_id) == (Status.SUCCESS, WORKER_ID)
        # which is the only message ever published to the victim's reply address
        on_wire = await _drain(wire)
    assert [decode(m.body, Result).status for m in on_wire] == [Status.SUCCESS]
    # and the dispatcher saw nothing else: no invalid result, no duplicate
    assert [(s.verdict, s.result.task_id if s.result else None) for s in seen] == [
        (Verdict.HANDED_OUT, victim.task_id)
    ]


# -- each refusal: its own code, dead-lettered, never run -----------------------------------------

# what the worker does with each probe: its code; answered FAILED to its reply address or not
ANSWERED = {ErrorCode.TOKEN_EXPIRED, ErrorCode.NOT_YET_VALID}
Probe = Callable[[Keys], tuple[str, bytes, dict[str, Any]]]


def _probe(signer: Callable[[Keys], Signer], changes: Callable[[], dict[str, Any]] = dict) -> Probe:
    """A task with ``changes()`` (made when the probe is built), signed by the key ``signer``
    picks."""

    def build(keys: Keys) -> tuple[str, bytes, dict[str, Any]]:
        task = _task(**changes())
        body, headers = _signed(signer(keys), task)
        return task.task_id, body, headers

    return build


def _tampered(tamper: Callable[[bytes, dict[str, Any]], tuple[bytes, dict[str, Any]]]) -> Probe:
    """A task sec-a signed, then tampered with on the way."""

    def build(keys: Keys) -> tuple[str, bytes, dict[str, Any]]:
        task = _task()
        body, headers = tamper(*_signed(keys.dispatcher, task))
        return task.task_id, body, headers

    return build


def _flipped_signature(body: bytes, headers: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    signature = base64.b64decode(headers[SIGNATURE_HEADER])
    flipped = base64.b64encode(_flip(signature, 10)).decode()
    return body, {**headers, SIGNATURE_HEADER: flipped}


def _hour_ahead() -> dict[str, int]:
    now = now_ms()
    return {"not_before_ms": now + 3_600_000, "deadline_ms": now + 7_200_000}


REFUSALS: dict[str, tuple[Probe, ErrorCode]] = {
    "flipped body bit": (
        _tampered(lambda body, headers: (_flip(body, len(body) // 2), headers)),
        ErrorCode.BAD_SIGNATURE,
    ),
    "flipped signature bit": (_tampered(_flipped_signature), ErrorCode.BAD_SIGNATURE),
    "truncated body": (
        _tampered(lambda body, headers: (body[:-7], headers)),
        ErrorCode.BAD_SIGNATURE,
    ),
    "stranger's key": (_probe(lambda k: k.stranger), ErrorCode.UNKNOWN_KEY),
    "executor key signing a task, as itself": (
        _probe(lambda k: k.executor, lambda: {"issuer": WORKER_ID}),
        ErrorCode.KEY_NOT_ALLOWED,
    ),
    "dispatcher key without the capability": (
        _probe(lambda k: k.narrow, lambda: {"issuer": "sec-narrow"}),
        ErrorCode.CAPABILITY_NOT_ALLOWED,
    ),
    "issuer is not the key's id": (
        _probe(lambda k: k.dispatcher, lambda: {"issuer": "sec-b"}),
        ErrorCode.KEY_NOT_ALLOWED,
    ),
    "wrong audience": (
        _probe(lambda k: k.dispatcher, lambda: {"audience": "another-deployment"}),
        ErrorCode.WRONG_AUDIENCE,
    ),
    "not before an hour from now": (
        _probe(lambda k: k.dispatcher, _hour_ahead),
        ErrorCode.NOT_YET_VALID,
    ),
    "deadline passed": (
        _probe(
            lambda k: k.dispatcher,
            lambda: {"issued_at_ms": now_ms() - 5000, "deadline_ms": now_ms() - 1000},
        ),
        ErrorCode.TOKEN_EXPIRED,
    ),
}


async def test_each_refused_task_has_its_own_code_is_dead_lettered_and_never_runs(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge("demo.echo")
    recorder = Recorder()
    # one delivery at a time, in queue order: the last task's result is a barrier for all;
    # and no recent results kept (a copy of a task still held would get its answer again)
    async with _worker(fabric, keys, recorder, concurrency=1, recent_results=0):
        wire = await _tap(amqp, RESULTS_EXCHANGE, REPLY)
        # Given a valid task published once, then a second copy of the same bytes (no
        # broker redelivery: somebody published it again) once the worker no longer holds it
        replayed = _task()
        replay_body, replay_headers = _signed(keys.dispatcher, replayed)
        await _publish_task(amqp, replay_body, replay_headers, message_id=replayed.task_id)
        await _publish_task(amqp, replay_body, replay_headers, message_id=replayed.task_id)
        # When each refused probe is published to wayang.tasks, as any publisher could
        expected = {replayed.task_id: str(ErrorCode.REPLAYED)}
        answered: dict[str, str] = {}
        for case, (build, code) in REFUSALS.items():
            task_id, body, headers = build(keys)
            await _publish_task(amqp, body, headers, message_id=task_id)
            expected[task_id] = str(code)
            if code in ANSWERED:
                answered[task_id] = str(code)
            logging.getLogger(__name__).info("probe %s is task %s", case, task_id)
        # and a valid task last
        barrier = _task()
        await _publish_task(amqp, *_signed(keys.dispatcher, barrier), message_id=barrier.task_id)
        # Then every probe is in the dead queue, with its own code
        assert await _dead_codes(amqp, "demo.echo", len(expected)) == expected
        # and the executor ran only the first copy of the replayed task, and the barrier
        results = await _collect(wire, len(answered) + 2, "the answers and both successes")
        assert recorder.ran == [(replayed.task_id, 1), (barrier.task_id, 1)]
        # and only the expired and not-yet-valid tasks were answered, FAILED with their code
        # (the barrier's SUCCESS came after every refusal was settled)
        outcomes = {}
        for message in results:
            result = decode(message.body, Result)
            code = result.error.code if result.error else None
            outcomes[result.task_id] = (result.status, code and str(code))
        assert outcomes == {
            replayed.task_id: (Status.SUCCESS, None),
            barrier.task_id: (Status.SUCCESS, None),
            **{task_id: (Status.FAILED, code) for task_id, code in answered.items()},
        }
        assert await _drain(wire) == []
    # and each refusal was logged once with its code, the security ones as security.refused,
    # saying truly whether they were answered
    for task_id, code in expected.items():
        [line] = [
            line for line in logs.text.splitlines() if f"code={code}" in line and task_id in line
        ]
        if code != ErrorCode.TOKEN_EXPIRED:
            assert f"event=security.refused task_id={task_id} capability=demo.echo" in line
            assert f"answered={'yes' if task_id in answered else 'no'}" in line, line


async def test_a_signed_task_with_a_reply_to_no_executor_may_publish_to_is_answered_at_noreply(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel
) -> None:
    await fabric.purge("demo.echo")
    recorder = Recorder()
    async with _worker(fabric, keys, recorder, concurrency=1):
        noreply = await _tap(amqp, RESULTS_EXCHANGE, "noreply.demo.echo")
        elsewhere = await _tap(amqp, RESULTS_EXCHANGE, "#")
        # Given a dispatcher's signed task whose reply_to is no reply address: an executor
        # account publishing a result there would be refused by the broker (its channel closed)
        task = _task(reply_to="wayang-audit.everything")
        body, headers = _signed(keys.dispatcher, task)
        await _publish_task(amqp, body, headers, message_id=task.task_id, reply_to=None)
        # When it reaches the worker, followed by a valid task (one slot: a barrier)
        barrier = _task()
        await _publish_task(amqp, *_signed(keys.dispatcher, barrier), message_id=barrier.task_id)
        # Then it is refused invalid_task, never run, and answered at noreply.demo.echo
        [answer] = await _collect(noreply, 1, "the refusal at noreply.demo.echo")
        result = decode(answer.body, Result)
        assert (result.task_id, result.status) == (task.task_id, Status.FAILED)
        assert result.error is not None and result.error.code is ErrorCode.INVALID_TASK
        await _collect(elsewhere, 2, "the refusal and the barrier's success")
        assert recorder.ran == [(barrier.task_id, 1)]
    assert await _dead_codes(amqp, "demo.echo", 1) == {task.task_id: str(ErrorCode.INVALID_TASK)}


# -- control: cancels and status reports are checked against roles --------------------------------


async def test_another_dispatcher_cannot_cancel_a_running_task_its_issuer_can(
    fabric: Fabric, keys: Keys, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge("demo.sleep")
    async with (
        _worker(fabric, keys, Sleep(), concurrency=2) as worker,
        _dispatcher(fabric, keys, "sec-owner") as owner,
        _dispatcher(fabric, keys, "sec-meddler", signer=keys.other_dispatcher, issuer="sec-b") as b,
    ):
        # Given sec-a's task running
        handle = await owner.submit("demo.sleep", {"seconds": 2})
        await eventually(lambda: worker.running_task(handle.task_id) is not None, what="running")
        # When dispatcher sec-b cancels it
        assert await b.cancel(handle.task_id, "not yours")
        # Then the worker refuses the cancel, and the task runs to its SUCCESS
        await eventually(
            lambda: f"code={ErrorCode.KEY_NOT_ALLOWED}" in logs.text, what="the refusal"
        )
        assert "event=security.refused type=wayang.cancel.v1" in logs.text
        result = await handle.result(WAIT_S)
        assert (result.status, result.output) == (Status.SUCCESS, {"slept_s": 2.0})
        # while sec-a's own cancel of its next task ends it FAILED cancelled
        own = await owner.submit("demo.sleep", {"seconds": 30})
        await eventually(lambda: worker.running_task(own.task_id) is not None, what="running")
        assert await owner.cancel(own.task_id, "mine to cancel")
        cancelled = await own.result(WAIT_S)
    assert cancelled.status is Status.FAILED
    assert cancelled.error is not None and cancelled.error.code is ErrorCode.CANCELLED
    assert cancelled.error.message == "mine to cancel"


async def test_a_cancel_sent_before_the_task_arrives_holds_only_for_its_issuer(
    fabric: Fabric, keys: Keys, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge("demo.sleep")
    async with (
        _worker(fabric, keys, Sleep()),
        _dispatcher(fabric, keys, "sec-owner") as owner,
        _dispatcher(fabric, keys, "sec-meddler", signer=keys.other_dispatcher, issuer="sec-b") as b,
    ):
        # Given cancels for two tasks the worker has not received yet: one by sec-b, one by
        # sec-a, who will issue both
        theirs, mine = new_id(), new_id()
        assert await b.cancel(theirs, "pre-empted by sec-b")
        assert await owner.cancel(mine, "pre-empted by sec-a")
        for task_id in (theirs, mine):
            remembered = f"task.cancel_requested task_id={task_id} running=False"
            await eventually(lambda line=remembered: line in logs.text, what=remembered)
        # When sec-a then submits them
        ran = await owner.run("demo.sleep", {"seconds": 0}, task_id=theirs, wait_s=WAIT_S)
        discarded = await owner.run("demo.sleep", {"seconds": 0}, task_id=mine, wait_s=WAIT_S)
    # Then sec-b's cancel is refused when its task arrives, and the task runs
    assert ran.status is Status.SUCCESS
    assert f"event=security.refused task_id={theirs} code={ErrorCode.KEY_NOT_ALLOWED}" in logs.text
    # and sec-a's own cancel discards its task
    assert discarded.error is not None and discarded.error.code is ErrorCode.CANCELLED


# -- heartbeats and status reports cannot switch off a deadline -----------------------------------


async def test_a_forged_heartbeat_does_not_stop_the_dispatcher_expiring_a_task(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge(UNSERVED)
    async with _dispatcher(fabric, keys, "sec-deadline", supervision=FAST) as dispatcher:
        # Given a task for a capability nobody serves, with a short queue timeout
        handle = await dispatcher.submit(UNSERVED, {}, queue_timeout_s=1)
        tid = handle.task_id
        # When heartbeats listing it in flight keep coming: unsigned; by a stranger's key;
        # by the demo executor's key, as itself, for its own capability (it does not serve
        # the task's); and by that key claiming the task's capability
        beats = [
            (
                encode(Heartbeat(executor_id="ghost", capabilities=(UNSERVED,), in_flight=(tid,))),
                {},
            ),
            _signed(
                keys.stranger,
                Heartbeat(executor_id="ghost", capabilities=(UNSERVED,), in_flight=(tid,)),
            ),
            _signed(
                keys.executor,
                Heartbeat(executor_id=WORKER_ID, capabilities=("demo.echo",), in_flight=(tid,)),
            ),
            _signed(
                keys.executor,
                Heartbeat(executor_id=WORKER_ID, capabilities=(UNSERVED,), in_flight=(tid,)),
            ),
        ]

        stop = asyncio.Event()

        async def forge() -> None:
            while not stop.is_set():
                for body, headers in beats:
                    executor_id = msgpack.unpackb(body)["executor_id"]
                    await _publish(
                        amqp,
                        EVENTS_EXCHANGE,
                        event_key("heartbeat", executor_id),
                        body,
                        headers,
                        message_id=executor_id,
                        wire_type=Heartbeat.wire_type,
                    )
                await asyncio.sleep(0.1)

        forger = asyncio.create_task(forge())
        try:
            result = await handle.result(WAIT_S)
        finally:
            stop.set()
            await asyncio.wait_for(forger, WAIT_S)
    # Then the dispatcher still ends it at its deadline: FAILED timeout, decided by itself
    assert result.status is Status.FAILED
    assert result.error is not None and result.error.code is ErrorCode.TIMEOUT
    assert result.executor_id == f"dispatcher:{ISSUER}"
    # and it refused each kind of forged heartbeat
    refused = [line for line in logs.text.splitlines() if "event=heartbeat.refused" in line]
    assert any("message is not signed" in line for line in refused)
    assert any("unknown signing key id" in line for line in refused)
    assert any(f"claims '{UNSERVED}'" in line for line in refused)
    assert any(f"task_id={tid}" in line and "does not serve" in line for line in refused)


@contextlib.asynccontextmanager
async def _answering(
    channel: AbstractChannel,
    task_id: str,
    reports: Callable[[StatusRequest], list[tuple[bytes, dict[str, Any]]]],
) -> AsyncIterator[list[str]]:
    """While the block runs, read every status request about ``task_id`` off wayang.control
    (any account may bind there) and answer it with ``reports``; yields the request ids
    answered."""
    requests = await _tap(channel, CONTROL_EXCHANGE, status_key(task_id))
    answered: list[str] = []
    stop = asyncio.Event()

    async def answer() -> None:
        while not stop.is_set():
            for message in await _drain(requests):
                request = decode(message.body, StatusRequest)
                for body, headers in reports(request):
                    await _publish(
                        channel,
                        CONTROL_EXCHANGE,
                        request.reply_to,
                        body,
                        headers,
                        message_id=request.request_id,
                        wire_type=StatusReport.wire_type,
                    )
                answered.append(request.request_id)
            await asyncio.sleep(0.02)

    responder = asyncio.create_task(answer())
    try:
        yield answered
    finally:
        stop.set()
        await asyncio.wait_for(responder, WAIT_S)


async def test_a_forged_status_report_is_ignored(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge(UNSERVED)
    async with _dispatcher(fabric, keys, "sec-status", supervision=None) as dispatcher:
        # Given a task nobody runs
        handle = await dispatcher.submit(UNSERVED, {}, queue_timeout_s=60)

        def finished(request: StatusRequest, executor_id: str) -> StatusReport:
            return StatusReport(
                request_id=request.request_id,
                task_id=request.task_id,
                executor_id=executor_id,
                state=TaskState.FINISHED,
                attempt=1,
                outcome=Status.FAILED,
            )

        # When every status request is answered "finished FAILED" by forgers: unsigned, by a
        # stranger's key, by an executor's key naming another executor, by a dispatcher's key
        def forged(request: StatusRequest) -> list[tuple[bytes, dict[str, Any]]]:
            return [
                (encode(finished(request, "attacker")), {}),
                _signed(keys.stranger, finished(request, "attacker")),
                _signed(keys.payer, finished(request, "attacker")),
                _signed(keys.other_dispatcher, finished(request, "sec-b")),
            ]

        async with _answering(amqp, handle.task_id, forged) as answered:
            summary = await dispatcher.status(handle.task_id, wait_s=1.0)
    # Then the dispatcher reports what it knows: nobody runs it or finished it
    assert answered, "the forgers saw the status request"
    assert summary.state == "not running"
    assert summary.executor_id is None
    assert logs.text.count("event=security.refused type=wayang.status.v1") == 4


async def test_a_status_report_by_an_executor_of_another_capability_does_not_stop_expiry(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge(UNSERVED)
    async with _dispatcher(fabric, keys, "sec-status-exp", supervision=FAST) as dispatcher:
        # Given a task for a capability nobody serves, with a short queue timeout
        handle = await dispatcher.submit(UNSERVED, {}, queue_timeout_s=1)

        # When the demo executor's key (demo.* only) answers every status request, as itself,
        # that it is running the task
        def running(request: StatusRequest) -> list[tuple[bytes, dict[str, Any]]]:
            report = StatusReport(
                request_id=request.request_id,
                task_id=request.task_id,
                executor_id=WORKER_ID,
                state=TaskState.RUNNING,
                attempt=1,
            )
            return [_signed(keys.executor, report)]

        async with _answering(amqp, handle.task_id, running) as answered:
            result = await handle.result(WAIT_S)
    # Then the dispatcher still expires it at its deadline: a key speaks only for tasks of
    # the capabilities it serves (docs/security.md §4)
    assert answered, "the status requests were answered"
    assert result.status is Status.FAILED
    assert result.error is not None and result.error.code is ErrorCode.TIMEOUT
    assert result.executor_id == f"dispatcher:{ISSUER}"
    assert f"code={ErrorCode.CAPABILITY_NOT_ALLOWED}" in logs.text


# -- retries and compensations: attempt records ---------------------------------------------------


async def test_a_retry_through_a_signed_attempt_record_succeeds_on_attempt_2(
    fabric: Fabric, keys: Keys
) -> None:
    await fabric.purge("demo.fail")
    async with _worker(fabric, keys, Fail()), _dispatcher(fabric, keys, "sec-retry") as dispatcher:
        # Given a task that fails (retryable) on its first attempt, allowed 3
        result = await dispatcher.run(
            "demo.fail",
            {"mode": "retryable", "succeed_on_attempt": 2},
            retry=RetryHints(max_attempts=3, initial_backoff_ms=200),
            wait_s=WAIT_S,
        )
    # Then the worker's retry (sec-a's task, with the worker's signed record) ran as attempt 2
    assert (result.status, result.attempt, result.executor_id) == (Status.SUCCESS, 2, WORKER_ID)
    assert result.output == {"succeeded_on_attempt": 2}
    assert result.token and result.task_id


def _with_record(
    keys: Keys, signer: Callable[[Keys], Signer], **record: Any
) -> tuple[str, bytes, dict[str, Any], Task]:
    """sec-a's task (3 attempts allowed), unchanged, with an attempt record signed by the key
    ``signer`` picks: attempt 2 by the demo executor, with ``record`` applied."""
    task = _task(retry=RetryHints(max_attempts=3))
    body, headers = _signed(keys.dispatcher, task)
    fields: dict[str, Any] = {
        "task_id": task.task_id,
        "attempt": 2,
        "deadline_ms": now_ms() + 30_000,
        "executor_id": WORKER_ID,
    }
    attempt = AttemptRecord(**(fields | record))
    return task.task_id, body, headers | attempt_headers(attempt, signer(keys)), task


async def test_a_forged_attempt_record_is_refused_bad_attempt_and_never_runs(
    fabric: Fabric, keys: Keys, amqp: AbstractChannel, logs: pytest.LogCaptureFixture
) -> None:
    await fabric.purge("demo.echo")
    recorder = Recorder()
    async with _worker(fabric, keys, recorder, concurrency=1):
        wire = await _tap(amqp, RESULTS_EXCHANGE, REPLY)
        # When sec-a's signed tasks are published again with forged attempt records: beyond
        # the issuer's 3 attempts; signed by the executor key of another capability, as
        # itself; for another task id; signed by a dispatcher's key; with a deadline later
        # than the issuer's backoff and queue window allow
        forged = [
            _with_record(keys, lambda k: k.executor, attempt=4),
            _with_record(keys, lambda k: k.payer, executor_id="sec-payer"),
            _with_record(keys, lambda k: k.executor, task_id=new_id()),
            _with_record(keys, lambda k: k.other_dispatcher, executor_id="sec-b"),
            _with_record(keys, lambda k: k.executor, deadline_ms=now_ms() + 2 * 86_400_000),
        ]
        # and, last, one with a record the demo executor may sign
        genuine = _with_record(keys, lambda k: k.executor)
        for task_id, body, headers, _ in [*forged, genuine]:
            await _publish_task(amqp, body, headers, message_id=task_id)
        # Then the genuine record runs attempt 2 of its task, and is answered
        [answer] = await _collect(wire, 1, "the genuine retry's result")
        result = decode(answer.body, Result)
        assert (result.task_id, result.attempt, result.status) == (
            genuine[0],
            2,
            Status.SUCCESS,
        )
        # and every forged one is dead-lettered bad_attempt, never run, never answered
        codes = await _dead_codes(amqp, "demo.echo", len(forged))
        assert codes == {task_id: str(ErrorCode.BAD_ATTEMPT) for task_id, *_ in forged}
        assert recorder.ran == [(genuine[0], 2)]
        assert await _drain(wire) == []
    for task_id, *_ in forged:
        assert (
            f"event=security.refused task_id={task_id} capability=demo.echo code=bad_attempt"
            in (logs.text)
        )


# -- key rotation under load ----------------------------------------------------------------------

ROTATION_TASKS = 5_000
IN_FLIGHT = 300


async def test_key_rotation_while_5000_tasks_flow_rejects_none(
    fabric: Fabric, amqp: AbstractChannel, tmp_path: Path
) -> None:
    await fabric.purge("demo.echo")
    # Given a worker daemon trusting dispatcher key A (sec-rot, demo.*) from its key dir,
    # and signing its results with its own executor key
    key_dir, own_dir = tmp_path / "keys", tmp_path / "worker"
    scope = KeyScope(Role.DISPATCHER, "sec-rot", ("demo.*",))
    key_a, key_b, own = Signer.generate(), Signer.generate(), Signer.generate()
    write_keypair(key_dir, key_a, scope)
    own_scope = KeyScope(Role.EXECUTOR, "sec-rot-w", ("demo.*",))
    own_key, _ = write_keypair(own_dir, own, own_scope)
    daemon = fabric.spawn_worker(
        ["wayang_workers.demo:Echo"],
        executor_id="sec-rot-w",
        args=["--concurrency", "32"],
        env={"WAYANG_KEY_DIR": str(key_dir), "WAYANG_SIGNING_KEY": str(own_key)},
    )
    results: list[Result] = []
    ring = KeyRing.scoped([(own.public_key, own_scope)])

    def dispatcher(signer: Signer, name: str) -> contextlib.AbstractAsyncContextManager[Dispatcher]:
        return fabric.dispatcher(
            signer=signer, issuer="sec-rot", results_keyring=ring, dispatcher_id=name
        )

    await asyncio.to_thread(daemon.wait_started)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(dispatcher(key_a, f"sec-rot-a-{new_id()[:6]}"))
        slots = asyncio.Semaphore(IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        async def one(by: Dispatcher, n: int) -> None:
            try:
                handle = await by.submit("demo.echo", {"n": n}, queue_timeout_s=300)
                results.append(await handle.result(120))
            finally:
                slots.release()

        # When it signs the first half with A; then key B (same scope) is written into
        # the worker's key dir, and a second dispatcher signing with B (same issuer) sends
        # the rest while the first one's tasks are still in flight
        by = first
        started = time.monotonic()
        for n in range(ROTATION_TASKS):
            if n == ROTATION_TASKS // 2:
                write_keypair(key_dir, key_b, scope)
                by = await stack.enter_async_context(dispatcher(key_b, f"sec-rot-b-{new_id()[:6]}"))
            await slots.acquire()
            job = asyncio.create_task(one(by, n))
            running.add(job)
            job.add_done_callback(running.discard)
        await asyncio.gather(*running)
        took = time.monotonic() - started
        # Then every task got SUCCESS from the worker: none was refused
        assert len(results) == ROTATION_TASKS
        assert collections.Counter((r.status, r.executor_id) for r in results) == {
            (Status.SUCCESS, "sec-rot-w"): ROTATION_TASKS
        }
        numbers = sorted(r.output["n"] for r in results if isinstance(r.output, dict))
        assert numbers == list(range(ROTATION_TASKS))
        assert "event=security.refused" not in daemon.log()
        # When A is revoked (its scope and public key moved out of the directory)
        revoked = key_dir / "revoked"
        revoked.mkdir()
        for suffix in (".pub", ".toml", ".key"):
            name = f"{key_a.key_id}{suffix}"
            os.replace(key_dir / name, revoked / name)
        await asyncio.sleep(1.5)
        # Then a task signed with A is refused unknown_key: dead-lettered, not answered
        late = await first.submit("demo.echo", {"after": "revocation"})
        assert await _dead_codes(amqp, "demo.echo", 1) == {late.task_id: str(ErrorCode.UNKNOWN_KEY)}
        await daemon.until_logged(f"event=security.refused task_id={late.task_id}")
        assert f"key_id={key_a.key_id}" in daemon.log()
        assert not late.done()
        print(f"{ROTATION_TASKS} tasks in {took:.1f}s")


# -- wayang-mq keys --------------------------------------------------------------------------------


def _keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")}
    run = subprocess.run(
        [sys.executable, "-m", "wayang_mq.cli", "keys", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_keys_new_list_rotate_revoke_through_the_cli(tmp_path: Path, umask_022: None) -> None:
    keys = tmp_path / "keys"
    # When a dispatcher key is made for two capability patterns
    _keys_cli(
        "new",
        "--dir",
        str(keys),
        "--role",
        "dispatcher",
        "--id",
        "billing",
        "--capability",
        "payment.*",
        "--capability",
        "demo.*",
    )
    # Then its private key is 0600, its public key and scope 0644, the directory 0700
    (private,) = keys.glob("*.key")
    key_id = private.stem
    public, scope = keys / f"{key_id}.pub", keys / f"{key_id}.toml"
    assert (_mode(private), _mode(public), _mode(scope), _mode(keys)) == (
        0o600,
        0o644,
        0o644,
        0o700,
    )
    assert Signer.from_file(private).key_id == key_id
    assert scope.read_text() == (
        'role = "dispatcher"\nid = "billing"\ncapabilities = ["payment.*", "demo.*"]\n'
    )
    # and list shows it with its scope
    listed = _keys_cli("list", "--dir", str(keys)).stdout
    assert f"{key_id}  dispatcher billing [payment.*,demo.*]  (private key here)" in listed
    # When it is rotated
    rotated = _keys_cli("rotate", key_id, "--dir", str(keys)).stdout
    (new_id_,) = {p.stem for p in keys.glob("*.key")} - {key_id}
    assert new_id_ in rotated
    # Then the new key has the same scope, and both are listed
    assert (keys / f"{new_id_}.toml").read_text() == scope.read_text()
    listed = _keys_cli("list", "--dir", str(keys)).stdout
    assert listed.count("dispatcher billing [payment.*,demo.*]  (private key here)") == 2
    # When the old one is revoked
    _keys_cli("revoke", key_id, "--dir", str(keys))
    # Then its files are in revoked/, and only the new key is listed and trusted
    revoked = keys / "revoked"
    assert sorted(p.name for p in revoked.iterdir()) == sorted(
        [f"{key_id}.key", f"{key_id}.pub", f"{key_id}.toml"]
    )
    assert not any(keys.glob(f"{key_id}.*"))
    listed = _keys_cli("list", "--dir", str(keys)).stdout
    assert key_id not in listed and new_id_ in listed
    assert set(KeyRing.load_dir(keys).keys) == {new_id_}
    # and a key with no scope file beside its .pub is listed as trusted for nothing
    (keys / f"{new_id_}.toml").unlink()
    listed = _keys_cli("list", "--dir", str(keys)).stdout
    assert f"{new_id_}  NO SCOPE: trusted for nothing" in listed
