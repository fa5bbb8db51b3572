"""Middleware: a layer added to a worker sees every delivery of a mixed run, and may change
a result, without a line of the worker edited (real broker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aio_pika
from wayang_workers.demo import Echo, Fail

from wayang_mq import ErrorCode, Executor, Middleware, RetryHints, Status, Task
from wayang_mq.amqp.outcome import Kind
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.core.errors import InvalidMessage, SignatureError
from wayang_mq.core.model import JsonLike, Result
from wayang_mq.core.names import TASKS_EXCHANGE
from wayang_mq.core.wire import task_message
from wayang_mq.ops.deadletters import list_dead_letters
from wayang_mq.runtime.middleware import Executed, Opened, Received, Settled
from wayang_mq.testing.harness import Fabric, eventually


class Recorder(Middleware):
    """Records every hook call, and stamps each result it sees."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.settled: list[Settled] = []

    async def on_opened(self, opened: Opened) -> None:
        self.opened.append(opened.task.task_id)

    async def on_executed(self, executed: Executed) -> Result:
        metrics = {**executed.result.metrics, "seen_by_middleware": 1.0}
        return executed.result.model_copy(update={"metrics": metrics})

    async def on_settled(self, settled: Settled) -> None:
        self.settled.append(settled)

    def kinds(self, task_id: str) -> list[Kind]:
        return [s.outcome.kind for s in self.settled if s.outcome.task_id == task_id]


class Think(Executor):
    """``agent.reason``, long-running: accepted at start, answered when it ends."""

    serves = ("agent.reason",)
    long_running = True

    async def execute(self, task: Task) -> JsonLike:
        return {"thought": True}


class Broken(Middleware):
    """A layer whose every hook raises: it must not fail a task."""

    async def on_opened(self, opened: Opened) -> None:
        raise RuntimeError("a bug in a middleware")

    async def on_settled(self, settled: Settled) -> None:
        raise RuntimeError("a bug in a middleware")


async def test_a_middleware_sees_every_outcome_of_a_mixed_run_and_may_change_results(
    fabric: Fabric,
) -> None:
    # Given a worker with a recording middleware (and a broken one before it)
    await fabric.purge("demo.echo", "demo.fail", "agent.reason")
    recorder = Recorder()
    retry = RetryHints(max_attempts=2, initial_backoff_ms=100)
    async with (
        fabric.worker([Echo(), Fail(), Think()], middleware=(Broken(), recorder)),
        fabric.dispatcher() as dispatcher,
    ):
        # When it gets a success, a permanent failure, a failure retried once, a long-running
        # task, and garbage
        ok = await dispatcher.run("demo.echo", {"x": 1}, wait_s=30)
        failed = await dispatcher.run("demo.fail", {"mode": "permanent"}, wait_s=30)
        retried = await dispatcher.run("demo.fail", {"mode": "retryable"}, retry=retry, wait_s=30)
        thought = await dispatcher.run("agent.reason", {}, wait_s=30)
        async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(TASKS_EXCHANGE, ensure=False)
            await exchange.publish(aio_pika.Message(b"\xc1", message_id="garbage-1"), "demo.echo")
        await eventually(
            lambda: recorder.kinds("garbage-1") == [Kind.DEAD_LETTER],
            what="the garbage's outcome reaching the middleware",
        )

    # Then it saw each outcome once, in order: done, done, a retry then done, pending then
    # done, a dead letter
    assert recorder.kinds(ok.task_id) == [Kind.DONE]
    assert recorder.kinds(failed.task_id) == [Kind.DONE]
    assert recorder.kinds(retried.task_id) == [Kind.RETRY, Kind.DONE]
    assert recorder.kinds(thought.task_id) == [Kind.PENDING, Kind.DONE]
    assert thought.status is Status.SUCCESS and thought.output == {"thought": True}
    # and every task that passed its checks was opened (the garbage never was)
    opened = [ok.task_id, failed.task_id, retried.task_id, retried.task_id, thought.task_id]
    assert recorder.opened == opened
    # and the results it changed are what the caller got
    assert ok.status is Status.SUCCESS and ok.metrics["seen_by_middleware"] == 1.0
    assert failed.error is not None and failed.error.code is ErrorCode.EXECUTOR_ERROR
    assert retried.error is not None and retried.error.code is ErrorCode.RETRIES_EXHAUSTED
    assert retried.metrics["seen_by_middleware"] == 1.0
    # and the broken layer failed no task
    assert ok.status is Status.SUCCESS


class TenantCheck(Middleware):
    """An envelope check: refuses a delivery without an ``x-tenant`` header before it is
    decoded, and a task of another tenant once it is verified."""

    def __init__(self) -> None:
        self.received: list[str | None] = []

    async def on_received(self, received: Received) -> None:
        self.received.append(received.message_id)
        if "x-tenant" not in received.headers:
            raise InvalidMessage("no x-tenant header", body=received.body)

    async def on_opened(self, opened: Opened) -> Result | None:
        if opened.task.input.get("tenant") != "acme":
            raise SignatureError(f"task {opened.task.task_id} is not for tenant acme")
        return None


async def test_a_middleware_refuses_bad_envelopes_as_bad_input(fabric: Fabric) -> None:
    # Given a worker with a tenant check in front of it
    await fabric.purge("demo.echo")
    check = TenantCheck()
    async with (
        fabric.worker([Echo()], middleware=(check,), concurrency=1),
        fabric.dispatcher() as dispatcher,
        await aio_pika.connect(fabric.endpoint.amqp_url) as connection,
    ):
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(TASKS_EXCHANGE, ensure=False)

        async def publish(task_input: dict[str, str], headers: dict[str, str]) -> Result:
            """A signed task with extra AMQP headers, answered to the dispatcher."""
            task = dispatcher.task("demo.echo", task_input)
            message = to_amqp(task_message(task, fabric.signer))
            message.headers = {**(message.headers or {}), **headers}
            await exchange.publish(message, "demo.echo")
            return await dispatcher.result_of(task.task_id, timeout_s=30)

        # When tasks arrive without the header (refused before the task is verified), for
        # another tenant (refused once it is), and for the right one
        no_header = dispatcher.task("demo.echo", {"tenant": "acme"})
        message = to_amqp(task_message(no_header, fabric.signer))
        await exchange.publish(message, "demo.echo")
        other = await publish({"tenant": "globex"}, {"x-tenant": "globex"})
        ok = await publish({"tenant": "acme"}, {"x-tenant": "acme"})

    # Then the first two are refused as bad input with the layer's reason: the one refused
    # before it verified is answered to nobody (dead-lettered), the verified one at its
    # signed address; the third runs
    dead = await list_dead_letters(fabric.endpoint.amqp_url, "demo.echo")
    refused = {d.task_id: (d.code, d.message) for d in dead}
    assert refused[no_header.task_id][0] is ErrorCode.INVALID_TASK
    assert "no x-tenant header" in refused[no_header.task_id][1]
    assert other.error is not None and other.error.code is ErrorCode.BAD_SIGNATURE
    assert "not for tenant acme" in other.error.message
    assert ok.status is Status.SUCCESS
    assert check.received == [no_header.task_id, other.task_id, ok.task_id]
    await fabric.purge("demo.echo")


RECORDING_LAYER = """
import os
from wayang_mq import Middleware


class Outcomes(Middleware):
    async def on_settled(self, settled):
        with open(os.environ["OUTCOMES_FILE"], "a") as out:
            out.write(f"{settled.outcome.task_id} {settled.outcome.kind}\\n")
"""


async def test_the_worker_command_loads_middleware_by_name(fabric: Fabric, tmp_path: Path) -> None:
    # Given a middleware in a module of the user's, and a worker daemon started with it
    (tmp_path / "my_layers.py").write_text(RECORDING_LAYER)
    outcomes = tmp_path / "outcomes.txt"
    daemon = fabric.spawn_worker(
        ["wayang_workers.demo:Echo"],
        executor_id="layered-w",
        args=["--middleware", "my_layers:Outcomes"],
        env={"PYTHONPATH": str(tmp_path), "OUTCOMES_FILE": str(outcomes)},
    )
    try:
        daemon.wait_started()
        # When a task runs on it
        async with fabric.dispatcher() as dispatcher:
            result = await dispatcher.run("demo.echo", {"x": 2}, wait_s=30)
        # Then the layer saw the delivery's outcome
        await eventually(
            lambda: outcomes.exists() and f"{result.task_id} done" in outcomes.read_text(),
            what="the middleware recording the outcome",
        )
    finally:
        daemon.stop()
    assert result.status is Status.SUCCESS


def test_a_middleware_that_is_not_one_is_a_one_line_error(fabric_env: dict[str, str]) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "wayang_mq.cli",
            "worker",
            "wayang_workers.demo:Echo",
            "--middleware",
            "wayang_workers.demo:Echo",
        ],
        env={**os.environ, **fabric_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert (
        "wayang_workers.demo:Echo is not a wayang_mq.runtime.middleware.Middleware subclass"
        in run.stderr
    )
    assert "Traceback" not in run.stderr
