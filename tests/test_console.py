"""What the RabbitMQ console shows of the fabric, against a real broker: dead letters that say
why (and ``wayang-mq dead show`` decoding them), connections and consumers named after their
executor and capability, reply queues that say whose they are and go with their owner, and
``wayang-mq submit`` options reaching the task a worker runs.

(Every queue's effective policy is checked in tests/test_topology.py, against the management
API's ``effective_policy_definition``.)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime
from typing import Any

from wayang_workers.demo import Echo, Fail, Sleep

from wayang_mq import __version__
from wayang_mq.amqp.connect import management_client
from wayang_mq.core import deadnotes, names
from wayang_mq.core.errors import ErrorCode
from wayang_mq.core.model import JsonLike, RetryHints, Task
from wayang_mq.core.wire import APP_ID, ERROR_CODE_HEADER, ERROR_MESSAGE_HEADER
from wayang_mq.ops.deadletters import list_dead_letters, show_dead_letters
from wayang_mq.runtime.context import current
from wayang_mq.runtime.executor import Executor
from wayang_mq.security.providers import MappingProvider
from wayang_mq.testing.harness import WAIT_S, Fabric, eventually

# Connection and consumer listings come from stats emitted every ~5 s.
STATS_WAIT_S = 30.0

SECRET_VALUE = "hunter2-do-not-show"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def wayang(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, pointed at the session's fabric."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")}
    return subprocess.run(
        [sys.executable, "-m", "wayang_mq.cli", *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=90,
    )


async def test_a_dead_letter_after_a_retry_hop_says_its_real_reason_and_previews_its_input(
    fabric: Fabric, fabric_env: dict[str, str]
) -> None:
    # Given a task that fails every attempt, with a secret-looking field, a secret reference
    # and an input far larger than a header should hold
    await fabric.purge("demo.fail")
    task_input: dict[str, JsonLike] = {
        "mode": "retryable",
        "password": SECRET_VALUE,
        "api_key": {"$secret": "stripe"},
        "blob": "x" * 5000,
    }
    stripe = MappingProvider({"stripe": "sk-live-console-0123456789"})
    async with (
        fabric.worker([Fail()], executor_id="console-fail", secrets=stripe),
        fabric.dispatcher() as d,
    ):
        # When it is retried once (through a retry tier) and fails again
        retry = RetryHints(max_attempts=2, initial_backoff_ms=200)
        result = await d.run("demo.fail", task_input, retry=retry, wait_s=WAIT_S)
    assert result.error is not None and result.error.code == ErrorCode.RETRIES_EXHAUSTED
    url = fabric.endpoint.amqp_url

    # Then its dead letter leads with the real reason, not the retry hop's x-death
    (view,) = await show_dead_letters(url, result.task_id, ["demo.fail"], keyring=fabric.keyring)
    headers = view.headers
    # (the broker sorts a header table by name: no x-death is left to be read as the reason)
    assert headers[ERROR_CODE_HEADER] == ErrorCode.RETRIES_EXHAUSTED
    assert "all 2 attempts failed" in headers[ERROR_MESSAGE_HEADER]
    assert not [h for h in headers if h.startswith(("x-death", "x-first-death", "x-last-death"))]
    assert "expired from wayang.retry." in headers[deadnotes.RETRY_HISTORY_HEADER]
    # with the capability, the attempt, an ISO 8601 time and what published it
    assert headers[deadnotes.CAPABILITY_HEADER] == "demo.fail"
    assert headers[deadnotes.TASK_ATTEMPT_HEADER] == 2
    assert datetime.fromisoformat(headers[deadnotes.DEAD_AT_HEADER]).tzinfo is not None
    assert view.app_id == APP_ID == f"wayang-mq/{__version__}"
    # and an input preview that is capped and redacted, references kept as references
    preview = headers[deadnotes.INPUT_PREVIEW_HEADER]
    assert len(preview.encode()) <= deadnotes.PREVIEW_BYTES and preview.endswith("…")
    assert '"password": "***"' in preview and SECRET_VALUE not in preview
    assert '"api_key": {"$secret": "stripe"}' in preview

    # And `wayang-mq dead show` decodes the body (input redacted, whole) and the deaths
    run = wayang("dead", "show", result.task_id, "--json", env=fabric_env)
    assert run.returncode == 0, run.stderr
    (shown,) = json.loads(run.stdout)
    assert shown["code"] == ErrorCode.RETRIES_EXHAUSTED and shown["verified"] is True
    assert shown["attempt"] == 2
    assert shown["task"]["input"]["password"] == "***"
    assert shown["task"]["input"]["blob"] == "x" * 5000
    assert shown["task"]["capability"] == "demo.fail"
    assert any("expired from wayang.retry." in death for death in shown["deaths"])
    assert SECRET_VALUE not in run.stdout and "sk-live" not in run.stdout
    text = wayang("dead", "show", result.task_id, "--capability", "demo.fail", env=fabric_env)
    assert text.returncode == 0, text.stderr
    assert "retries_exhausted" in text.stdout and '"password": "***"' in text.stdout
    # without taking it out of the dead queue, and `dead list` says which attempt died
    listed = {d.task_id: d for d in await list_dead_letters(url, "demo.fail")}
    assert listed[result.task_id].attempt == 2


async def test_connections_and_consumers_are_named_after_executor_and_capability(
    fabric: Fabric,
) -> None:
    # Given a worker serving two capabilities and a dispatcher
    management = management_client(fabric.endpoint)
    async with (
        fabric.worker([Echo(), Sleep()], executor_id="console-named"),
        fabric.dispatcher(dispatcher_id="d-console-named"),
    ):
        seen: dict[str, Any] = {}

        def listed() -> bool:
            seen["connections"] = {
                c.get("client_properties", {}).get("connection_name")
                for c in management.list_connections()
            }
            seen["consumers"] = {
                (c["queue"]["name"], c["consumer_tag"]) for c in management.list_consumers()
            }
            return {
                "worker console-named (demo.echo, demo.sleep)",
                "dispatcher d-console-named",
            } <= seen["connections"] and {
                (names.task_queue("demo.echo"), "console-named/demo.echo"),
                (names.task_queue("demo.sleep"), "console-named/demo.sleep"),
                ("wayang.control.console-named", "console-named/control"),
                (names.reply_queue("d-console-named"), "d-console-named/replies"),
            } <= seen["consumers"]

        # Then the management API (what the console shows) names each after whose it is
        try:
            await eventually(listed, timeout_s=STATS_WAIT_S, interval_s=0.5, what="names")
        except AssertionError:
            raise AssertionError(f"not named as expected: {seen}") from None


async def test_a_reply_queue_says_whose_it_is_and_goes_soon_after_its_dispatcher(
    fabric: Fabric,
) -> None:
    management = management_client(fabric.endpoint)
    queue = names.reply_queue("d-console-expiry")
    # Given a dispatcher whose reply queue expires 2 s after it is left unused
    async with fabric.dispatcher(dispatcher_id="d-console-expiry", reply_queue_expires_s=2):
        # Then the queue's arguments say whose it is and which reply address reaches it
        shown = management.get_queue(queue)
        assert shown is not None
        arguments = shown["arguments"]
        assert arguments["x-wayang-owner"].startswith("dispatcher d-console-expiry (")
        assert arguments["x-wayang-reply-to"] == "reply.d-console-expiry"
        assert arguments["x-expires"] == 2000

    # When the dispatcher closes, Then the broker deletes its queue
    await eventually(
        lambda: management.get_queue(queue) is None, timeout_s=WAIT_S, what="reply queue gone"
    )


class Recorder(Executor):
    """``demo.echo`` that keeps every task it runs, as it received it."""

    serves = ("demo.echo",)

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[Task] = []
        self.traces: list[str | None] = []

    async def execute(self, task: Task) -> JsonLike:
        self.tasks.append(task)
        self.traces.append(current().traceparent)
        return {}


async def test_submit_options_reach_the_task_a_worker_runs(
    fabric: Fabric, fabric_env: dict[str, str]
) -> None:
    # Given a worker that records the tasks it runs
    await fabric.purge("demo.echo")
    recorder = Recorder()
    async with fabric.worker([recorder], executor_id="console-submit"):
        # When a task is submitted from the command line with every task option
        # (in a thread: the in-process worker needs this event loop meanwhile)
        run = await asyncio.to_thread(
            wayang,
            "submit",
            "demo.echo",
            "--input",
            '{"n": 1}',
            "--task-id",
            "console-submit-1",
            "--retries",
            "2",
            "--backoff",
            "0.5",
            "--backoff-multiplier",
            "3",
            "--max-backoff",
            "10",
            "--non-retryable",
            "invalid_task",
            "--idempotency-key",
            "charge-42",
            "--partition-key",
            "customer-7",
            "--policy",
            '{"max_cost": 3.5}',
            "--compensation",
            "demo.sleep",
            "--compensation-input",
            '{"seconds": 0}',
            "--heartbeat-timeout",
            "7",
            "--not-before",
            "1s",
            "--traceparent",
            TRACEPARENT,
            "--wait",
            "--timeout",
            "30",
            env=fabric_env,
        )
        assert run.returncode == 0, run.stderr

    # Then the worker ran the task with each option as given
    (task,) = recorder.tasks
    assert task.task_id == "console-submit-1" and task.input == {"n": 1}
    assert task.retry == RetryHints(
        max_attempts=3,
        initial_backoff_ms=500,
        backoff_multiplier=3.0,
        max_backoff_ms=10_000,
        non_retryable=(ErrorCode.INVALID_TASK,),
    )
    assert task.idempotency_key == "charge-42" and task.partition_key == "customer-7"
    assert task.policy.max_cost == 3.5
    assert task.compensation is not None
    assert (task.compensation.capability, task.compensation.input) == ("demo.sleep", {"seconds": 0})
    assert task.heartbeat_timeout_ms == 7000
    assert task.not_before_ms is not None and task.not_before_ms > task.issued_at_ms
    # and in the trace the command line continued (a child span of the given parent)
    (trace,) = recorder.traces
    assert trace is not None and trace.split("-")[1] == TRACEPARENT.split("-")[1]
    assert trace.split("-")[2] != TRACEPARENT.split("-")[2]
