"""Traces (issue 12): W3C trace context from the dispatcher to the worker, its logs, its result,
its retries and compensations; OpenTelemetry spans when a TracerProvider is configured."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from wayang_workers.demo import Echo, Fail, Sleep

from wayang_mq import Executor, Status, Task, current
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.client.replies import ResultSeen, Verdict
from wayang_mq.core.model import Compensation, JsonLike, RetryHints
from wayang_mq.core.names import (
    EVENTS_EXCHANGE,
    RESULTS_EXCHANGE,
    RETRY_EXCHANGE,
    TASKS_EXCHANGE,
    retry_routing_key,
)
from wayang_mq.core.wire import task_message
from wayang_mq.observability import tracing
from wayang_mq.observability.tracing import TraceContext, parse, parse_traceparent, parse_tracestate
from wayang_mq.testing.harness import Fabric, eventually

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# -- the W3C parser (pure) ------------------------------------------------------------------------


def test_a_valid_traceparent_is_read_and_written_back_the_same() -> None:
    context = parse_traceparent(VALID)
    assert context == TraceContext(TRACE_ID, "00f067aa0ba902b7", 0x01)
    assert context.traceparent == VALID
    assert parse_traceparent(VALID.encode()) == context  # AMQP may hand it over as bytes


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        ["00", TRACE_ID],
        "",
        VALID[:-1],  # 54 characters
        VALID + "0",  # 56: version 00 is exactly 55
        VALID + "-",  # version 00 has nothing after its flags
        VALID.upper(),  # uppercase hex
        VALID.replace("4bf9", "4BF9"),
        "ff" + VALID[2:],  # version ff is invalid
        "0g" + VALID[2:],
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00_{TRACE_ID}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-1",
        f"00-{TRACE_ID[:-1]}x-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-01\r\nevent=forged",
        f"00-{TRACE_ID}-00f067aa0ba902b\u0663-01",  # a non-ASCII digit
        " " + VALID,
        "01" + VALID[2:] + "x",  # a later version: what follows must start with "-"
        "01" + VALID[2:] + "-" + "a" * 1000,  # unbounded
        b"\xff" * 55,
    ],
)
def test_an_invalid_traceparent_is_refused(value: object) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_for_the_fields_it_shares_with_00() -> None:
    later = parse_traceparent("cc" + VALID[2:-2] + "03-what-comes-next")
    assert later is not None
    assert (later.trace_id, later.flags) == (TRACE_ID, 0x01)  # only the sampled bit is known
    assert later.traceparent.startswith("00-")  # and it is carried on as version 00


def test_a_child_keeps_the_trace_its_flags_and_state_with_a_new_span() -> None:
    parent = TraceContext(TRACE_ID, "00f067aa0ba902b7", 0x00, "vendor=abc")
    child = parent.child()
    assert (child.trace_id, child.flags, child.state) == (TRACE_ID, 0x00, "vendor=abc")
    assert child.span_id != parent.span_id and len(child.span_id) == 16
    assert child.headers() == {"traceparent": child.traceparent, "tracestate": "vendor=abc"}
    root = tracing.new_trace()
    assert parse_traceparent(root.traceparent) == root and root.sampled


def test_tracestate_is_kept_when_well_formed_and_dropped_whole_when_not() -> None:
    assert parse_tracestate("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7") == (
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    )
    assert parse_tracestate("tenant@vendor=x,,  a/b*c-d_e=1 ") == "tenant@vendor=x,a/b*c-d_e=1"
    members = [f"k{n}=v" for n in range(33)]
    assert parse_tracestate(",".join(members[:32])) != ""
    for hostile in (
        ",".join(members),  # 33 members
        "a=" + "x" * 255 + ",b=" + "y" * 255,  # over 512 characters
        "a=1,a=2",  # a repeated key
        "A=1",  # uppercase key
        "a=b=c",
        "a=1\r\nevent=forged",
        "a=",
        "a= ",
        "@vendor=1",
        b"\xff=1",
        7,
    ):
        assert parse_tracestate(hostile) == "", hostile


def test_a_tracestate_means_nothing_without_a_valid_traceparent() -> None:
    assert parse("garbage", "vendor=1") is None
    assert tracing.from_headers({"tracestate": "vendor=1"}) is None
    assert parse(VALID, "vendor=1") == TraceContext(TRACE_ID, "00f067aa0ba902b7", 1, "vendor=1")
    assert parse(VALID, "not valid,,=") == parse(VALID)  # a bad tracestate alone is dropped


# -- through the fabric (real broker) -------------------------------------------------------------


def _lines(
    caplog: pytest.LogCaptureFixture, task_id: str, executor_id: str
) -> list[dict[str, Any]]:
    """What the worker logged about ``task_id``: each line's bound fields, then its own."""
    lines = []
    for record in caplog.records:
        bound = getattr(record, "wayang_context", {})
        if bound.get("task_id") == task_id and bound.get("executor_id") == executor_id:
            own = getattr(record, "wayang_fields", {})
            lines.append({**bound, **own, "event": getattr(record, "wayang_event", None)})
    return lines


def _trace_id(headers: Any) -> str | None:
    context = tracing.from_headers(headers)
    return context.trace_id if context is not None else None


async def _drain(queue: aio_pika.abc.AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    messages = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        messages.append(message)
    return messages


async def test_a_trace_set_by_the_dispatcher_reaches_the_worker_logs_events_and_result(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with (
        connection,
        fabric.worker([Sleep()], executor_id="trace-worker"),
        fabric.dispatcher() as dispatcher,
    ):
        channel = await connection.channel()
        results = await channel.declare_queue(exclusive=True)
        await results.bind(RESULTS_EXCHANGE, dispatcher.reply_to)
        seen: list[ResultSeen] = []
        dispatcher.observe(seen.append)
        # Given a caller's trace, and a task that reports progress
        task = dispatcher.task("demo.sleep", {"seconds": 0.1})
        progress = await channel.declare_queue(exclusive=True)
        await progress.bind(EVENTS_EXCHANGE, f"progress.{task.task_id}")
        # When the dispatcher submits it in that trace
        handle = await dispatcher.submit_task(task, traceparent=VALID)
        result = await handle.result(30)
        answers: list[aio_pika.abc.AbstractIncomingMessage] = []
        events: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def arrived() -> bool:
            answers.extend(await _drain(results))
            events.extend(await _drain(progress))
            return bool(answers and events)

        await eventually(arrived, what="the result and a progress event")
    # Then the task was published as a child span of the caller's trace
    assert result.status is Status.SUCCESS
    published = parse_traceparent(handle.traceparent)
    assert published is not None and published.trace_id == TRACE_ID
    assert published.span_id != "00f067aa0ba902b7"
    # and the result message, the result the dispatcher got and the progress carry the trace
    assert [_trace_id(m.headers) for m in answers] == [TRACE_ID]
    handed = [s for s in seen if s.verdict is Verdict.HANDED_OUT]
    assert [parse_traceparent(s.traceparent).trace_id for s in handed] == [TRACE_ID]  # type: ignore[union-attr]
    assert {_trace_id(m.headers) for m in events} == {TRACE_ID}
    # and every line the worker logged about the task carries the task's fields and trace id
    lines = _lines(caplog, task.task_id, "trace-worker")
    finished = [line for line in lines if line["event"] == "task.finished"]
    assert len(finished) == 1
    assert {k: finished[0][k] for k in ("node_id", "capability", "attempt", "trace_id")} == {
        "node_id": task.node_id,
        "capability": "demo.sleep",
        "attempt": 1,
        "trace_id": TRACE_ID,
    }
    assert all(line["trace_id"] == TRACE_ID for line in lines)


async def test_a_retry_carries_the_trace_in_its_republished_copy(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with (
        connection,
        fabric.worker([Fail()], executor_id="trace-retry"),
        fabric.dispatcher() as dispatcher,
    ):
        channel = await connection.channel()
        retried = await channel.declare_queue(exclusive=True)
        await retried.bind(RETRY_EXCHANGE, retry_routing_key("*", "demo.fail"))
        # Given a task that fails once (retryable), then succeeds
        handle = await dispatcher.submit(
            "demo.fail",
            {"mode": "retryable", "succeed_on_attempt": 2},
            retry=RetryHints(max_attempts=2, initial_backoff_ms=100),
        )
        # When it is retried
        result = await handle.result(30)
        copies = await _drain(retried)
    trace_id = parse_traceparent(handle.traceparent).trace_id  # type: ignore[union-attr]
    # Then the copy republished through the retry tier carries the task's trace
    assert (result.status, result.attempt) == (Status.SUCCESS, 2)
    assert [_trace_id(m.headers) for m in copies] == [trace_id]
    # and the second attempt's lines are in the same trace as the first's
    lines = _lines(caplog, handle.task_id, "trace-retry")
    finished = {
        line["attempt"]: line["trace_id"] for line in lines if line["event"] == "task.finished"
    }
    assert finished == {1: trace_id, 2: trace_id}


async def test_a_compensation_continues_the_trace_of_the_task_it_compensates(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    undo = Compensation(capability="demo.echo", input={"undo": 1})
    async with (
        fabric.worker([Fail(), Echo()], executor_id="trace-comp"),
        fabric.dispatcher() as dispatcher,
    ):
        seen: list[ResultSeen] = []
        dispatcher.observe(seen.append)
        # Given a task that fails for good and names a compensation
        handle = await dispatcher.submit("demo.fail", {"mode": "permanent"}, compensation=undo)
        failed = await handle.result(30)
        # When its compensation runs
        assert failed.compensation_task_id is not None
        compensated = await dispatcher.result_of(failed.compensation_task_id, timeout_s=30)
    trace_id = parse_traceparent(handle.traceparent).trace_id  # type: ignore[union-attr]
    # Then the compensation ran in the task's trace, and its result came back in it
    assert compensated.status is Status.SUCCESS
    lines = _lines(caplog, compensated.task_id, "trace-comp")
    assert lines and {line["trace_id"] for line in lines} == {trace_id}
    answer = [s for s in seen if s.result is not None and s.result.task_id == compensated.task_id]
    assert [parse_traceparent(s.traceparent).trace_id for s in answer] == [trace_id]  # type: ignore[union-attr]


class TraceOf(Executor):
    """``demo.echo`` answering with the trace its context holds (what it would pass on)."""

    serves = ("demo.echo",)

    async def execute(self, task: Task) -> JsonLike:
        ctx = current()
        return {"traceparent": ctx.traceparent, "tracestate": ctx.tracestate}


async def test_an_invalid_trace_header_starts_a_new_trace_and_never_fails_the_task(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection, fabric.worker([TraceOf()]), fabric.dispatcher() as dispatcher:
        channel = await connection.channel()
        # Given a signed task published with a hostile traceparent and tracestate
        task = dispatcher.task("demo.echo", {})
        message = to_amqp(task_message(task, fabric.signer))
        message.headers["traceparent"] = "00-" + "A" * 32 + "-\r\nevent=forged-01"
        message.headers["tracestate"] = "x=" + "y" * 600
        exchange = await channel.get_exchange(TASKS_EXCHANGE, ensure=False)
        await exchange.publish(message, task.capability)
        result = await dispatcher.result_of(task.task_id, timeout_s=30)
        # and one submitted with a traceparent that is not one
        caplog.set_level(logging.WARNING)
        other = await dispatcher.run("demo.echo", {}, traceparent="not-a-trace", wait_s=30)
    # Then both ran, each in a new, valid trace (no tracestate survived)
    for answered in (result, other):
        assert answered.status is Status.SUCCESS
        started = parse_traceparent(answered.output["traceparent"])
        assert started is not None and started.trace_id != "a" * 32
        assert answered.output["tracestate"] is None
    assert "event=trace.ignored" in caplog.text


async def test_an_executor_in_a_trace_dispatches_its_child_tasks_in_it(fabric: Fabric) -> None:
    class Parent(Executor):
        """Dispatches a child task (as an agent's tool call would) and returns its answer."""

        serves = ("demo.sleep",)

        async def execute(self, task: Task) -> JsonLike:
            child = await dispatcher.run("demo.echo", {}, wait_s=30)
            return {"mine": current().traceparent, "child": child.output}

    async with fabric.worker([Parent(), TraceOf()]), fabric.dispatcher() as dispatcher:
        # When a task in a trace runs an executor that dispatches a child task
        result = await dispatcher.run("demo.sleep", {}, traceparent=VALID, wait_s=30)
    # Then the child task ran in the same trace, as a descendant of the parent's span
    assert result.status is Status.SUCCESS, result.error
    mine = parse_traceparent(result.output["mine"])
    child = parse_traceparent(result.output["child"]["traceparent"])
    assert mine is not None and child is not None
    assert mine.trace_id == child.trace_id == TRACE_ID
    assert child.span_id != mine.span_id


async def test_a_worker_daemon_logs_json_lines_with_the_task_fields(fabric: Fabric) -> None:
    # Given a worker daemon logging JSON (as it does with stderr to a file)
    daemon = fabric.spawn_worker(
        ["wayang_workers.demo:Echo"], executor_id="trace-json", log_format="json"
    )
    try:
        await asyncio.to_thread(daemon.wait_started)
        async with fabric.dispatcher() as dispatcher:
            # When a task in a trace runs there
            handle = await dispatcher.submit("demo.echo", {"x": 1}, traceparent=VALID)
            await handle.result(30)

        def finished() -> list[dict[str, Any]]:
            return [
                line
                for line in daemon.json_lines()
                if line.get("event") == "task.finished" and line.get("task_id") == handle.task_id
            ]

        await eventually(lambda: bool(finished()), what="the task.finished line")
    finally:
        daemon.stop()
    # Then its line is one JSON object with the event, its fields and the task's
    line = finished()[0]
    assert line["level"] == "INFO" and line["logger"] == "wayang_mq.runtime.running"
    assert line["ts"].endswith("Z") and len(line["ts"]) == len("2026-01-02T03:04:05.678Z")
    assert line["status"] == "SUCCESS" and isinstance(line["duration_ms"], float)
    expected = {"node_id": handle.task.node_id, "capability": "demo.echo"}
    expected |= {"executor_id": "trace-json", "attempt": 1, "trace_id": TRACE_ID}
    assert {key: line[key] for key in expected} == expected
    assert all(text.startswith("{") for text in daemon.log().splitlines() if text.strip())


# -- OpenTelemetry spans --------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[Any]:
    """A TracerProvider exporting to memory, set as the process's for the test only."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util._once import Once

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved = trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # set once per process: reset for this test
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = saved


def test_no_span_is_made_without_a_configured_tracer_provider() -> None:
    # Given OpenTelemetry installed but no TracerProvider configured
    assert not tracing.otel_active()
    # When a span is started, Then it is only ids
    span = tracing.start_span("publish", parent=None)
    assert span.otel is None and parse_traceparent(span.context.traceparent) == span.context


async def test_spans_are_exported_with_the_right_parents(fabric: Fabric, spans: Any) -> None:
    assert tracing.otel_active()
    async with fabric.worker([Echo()]), fabric.dispatcher() as dispatcher:
        # When a task runs in a caller's trace
        handle = await dispatcher.submit("demo.echo", {"x": 1}, traceparent=VALID)
        await handle.result(30)

        def named() -> dict[str, Any]:
            mine = [s for s in spans.get_finished_spans() if _task_of(s) == handle.task_id]
            return {s.name: s for s in mine}

        await eventually(lambda: "publish result" in named(), what="the publish result span")
    by_name = named()
    assert set(by_name) == {"publish", "queue wait", "execute", "publish result"}
    publish, execute = by_name["publish"], by_name["execute"]
    # Then every span is in the caller's trace
    assert {f"{s.context.trace_id:032x}" for s in by_name.values()} == {TRACE_ID}
    # and the dispatcher's publish is the caller's child, a producer
    assert f"{publish.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert publish.kind.name == "PRODUCER"
    # and the worker's execute and queue wait are the publish span's children
    assert execute.parent.span_id == publish.context.span_id and execute.kind.name == "CONSUMER"
    assert by_name["queue wait"].parent.span_id == publish.context.span_id
    assert by_name["queue wait"].start_time <= by_name["queue wait"].end_time
    # and the result's publish is execute's child, and what the worker sent names execute
    assert by_name["publish result"].parent.span_id == execute.context.span_id
    assert handle.traceparent == (
        f"00-{TRACE_ID}-{publish.context.span_id:016x}-{int(publish.context.trace_flags):02x}"
    )


def _task_of(span: Any) -> str | None:
    return (span.attributes or {}).get("wayang.task_id")
