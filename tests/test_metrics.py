"""Prometheus metrics and health endpoints (real broker, real PostgreSQL): after a mixed run
each daemon's /metrics, scraped over HTTP, counts exactly what happened; /readyz says whether
a daemon can take work, the control plane's whether its database answers."""

from __future__ import annotations

import asyncio
import socket

import aio_pika
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from wayang_workers.demo import Echo, Fail, Sleep

from wayang_mq import ErrorCode, Status
from wayang_mq.amqp.publisher import to_amqp
from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.controlplane.migrate import migrate
from wayang_mq.core.model import RetryHints, Task, new_id
from wayang_mq.core.names import DEAD_COPY_EXCHANGE, RETRY_EXCHANGE, TASKS_EXCHANGE
from wayang_mq.core.signing import Signer
from wayang_mq.core.wire import task_message
from wayang_mq.dev.nodes import PostgresNode
from wayang_mq.observability.http import MAX_HEAD_BYTES
from wayang_mq.observability.metrics import AUDIT_KINDS
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.plugin import fresh_database, service_dir

GARBAGE = b"\xc1\xc1 not msgpack"
UNSERVED = "http.call"  # a capability no worker of these tests serves: its tasks expire

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _get(address: tuple[str, int] | None, path: str) -> tuple[int, str, bytes]:
    """GET ``path``: the status, the content type and the body."""
    assert address is not None, "the daemon has no HTTP endpoint"
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers["Content-Type"], body


def _parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _scrape(address: tuple[str, int] | None) -> Samples:
    status, content_type, body = await _get(address, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    return _parse(body.decode())


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _family(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every non-zero sample of one name, by labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name and v}


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


async def _publish(fabric: Fabric, routing_key: str, message: aio_pika.Message) -> None:
    """A raw, confirmed publish to wayang.tasks, as a foreign client could."""
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(TASKS_EXCHANGE, ensure=False)
        await exchange.publish(message, routing_key)


def _garbage(fabric: Fabric) -> aio_pika.Message:
    """Not msgpack, though signed by a trusted key."""
    headers = fabric.signer.headers(GARBAGE)
    return aio_pika.Message(GARBAGE, headers=dict(headers), message_id=new_id())


async def test_after_a_mixed_run_each_daemons_counters_equal_what_happened(
    fabric: Fabric,
) -> None:
    await fabric.purge("demo.echo", "demo.fail", "demo.sleep", UNSERVED)
    await fabric.purge_reaper()
    registry = CollectorRegistry()  # the embedding process's, here the test's
    worker_id = f"metrics-{new_id()[:8]}"
    async with (
        fabric.worker([Echo(), Fail(), Sleep()], executor_id=worker_id, metrics_port=0) as worker,
        fabric.reaper(metrics_port=0) as reaper,
        Dispatcher(fabric.dispatcher_config(supervision=None), registry=registry) as dispatcher,
    ):
        # Given a worker, a reaper and a dispatcher with metrics on, When they run:
        # 3 successes, then one of them published again (a duplicate, answered from memory)
        echoes = [await dispatcher.run("demo.echo", {"n": n}, wait_s=30) for n in range(3)]
        first = await dispatcher.submit("demo.echo", {"n": "dup"})
        await first.result(30)
        # (the same signed task again, as from a publisher retrying after a lost confirm)
        await _publish(fabric, "demo.echo", to_amqp(task_message(first.task, fabric.signer)))
        # a FAILED (permanent), a retry that then succeeds, retries exhausted (a dead letter)
        failed = await dispatcher.run("demo.fail", {"mode": "permanent"}, wait_s=30)
        twice = RetryHints(max_attempts=2, initial_backoff_ms=100)
        retried = await dispatcher.run(
            "demo.fail", {"mode": "retryable", "succeed_on_attempt": 2}, retry=twice, wait_s=30
        )
        exhausted = await dispatcher.run("demo.fail", {"mode": "retryable"}, retry=twice, wait_s=30)
        # a cancel of a running task
        sleeping = await dispatcher.submit("demo.sleep", {"seconds": 30})
        await eventually(lambda: worker.running_task(sleeping.task_id) is not None, what="run")
        assert await dispatcher.cancel(sleeping.task_id, "metrics test")
        cancelled = await sleeping.result(30)
        # garbage and a task signed by a key nobody trusts (refused, dead-lettered)
        await _publish(fabric, "demo.echo", _garbage(fabric))
        forged = task_message(Task.create("demo.echo", {}), Signer.generate())
        await _publish(fabric, "demo.echo", to_amqp(forged))
        # and a task nobody serves, expiring in its queue: the reaper answers it
        expired = await dispatcher.run(UNSERVED, {}, queue_timeout_s=0.5, wait_s=30)

        outcomes = [
            (r.status, r.error.code if r.error else None)
            for r in (failed, retried, exhausted, cancelled, expired)
        ]
        assert all(r.status is Status.SUCCESS for r in echoes)
        assert outcomes == [
            (Status.FAILED, ErrorCode.EXECUTOR_ERROR),
            (Status.SUCCESS, None),
            (Status.FAILED, ErrorCode.RETRIES_EXHAUSTED),
            (Status.FAILED, ErrorCode.CANCELLED),
            (Status.FAILED, ErrorCode.TIMEOUT),
        ]

        async def settled() -> bool:
            w = await _scrape(worker.metrics_address)
            refused = _family(w, "wayang_deliveries_refused_total")
            duplicates = _value(w, "wayang_duplicates_total", capability="demo.echo")
            return sum(refused.values()) == 2 and duplicates == 1

        await eventually(settled, what="the duplicate and both refusals counted")
        w = await _scrape(worker.metrics_address)
        r = await _scrape(reaper.metrics_address)
    d = _parse(generate_latest(registry).decode())

    # Then the worker counted every delivery: received, and how each ended
    assert _family(w, "wayang_tasks_received_total") == {
        _labels(capability="demo.echo"): 7,  # 3 + the first of the duplicate, its copy, 2 bad
        _labels(capability="demo.fail"): 5,  # 1 permanent + 2 retried + 2 exhausted
        _labels(capability="demo.sleep"): 1,
    }
    assert _family(w, "wayang_tasks_finished_total") == {
        _labels(capability="demo.echo", status="SUCCESS", error_code=""): 5,  # dup included
        _labels(capability="demo.fail", status="FAILED", error_code="executor_error"): 1,
        _labels(capability="demo.fail", status="SUCCESS", error_code=""): 1,
        _labels(capability="demo.fail", status="FAILED", error_code="retries_exhausted"): 1,
        _labels(capability="demo.sleep", status="FAILED", error_code="cancelled"): 1,
    }
    assert _family(w, "wayang_task_retries_total") == {_labels(capability="demo.fail"): 2}
    assert _family(w, "wayang_dead_letters_total") == {
        _labels(capability="demo.fail", reason="retries_exhausted"): 1,
        _labels(capability="demo.echo", reason="invalid_task"): 1,
        _labels(capability="demo.echo", reason="unknown_key"): 1,
    }
    assert _family(w, "wayang_deliveries_refused_total") == {
        _labels(capability="demo.echo", reason="invalid_task"): 1,
        _labels(capability="demo.echo", reason="unknown_key"): 1,
    }
    assert _family(w, "wayang_cancels_total") == {_labels(capability="demo.sleep"): 1}
    assert _family(w, "wayang_duplicates_total") == {_labels(capability="demo.echo"): 1}
    assert _family(w, "wayang_redeliveries_total") == {}
    # executions (the duplicate was not run), queue waits (every task opened)
    assert _value(w, "wayang_task_execution_seconds_count", capability="demo.echo") == 4
    assert _value(w, "wayang_task_execution_seconds_count", capability="demo.fail") == 5
    assert _value(w, "wayang_task_queue_wait_seconds_count", capability="demo.echo") == 5
    assert _family(w, "wayang_tasks_in_flight") == {}
    # its publishes: 2 retries, 3 copies kept in the dead queue
    assert _value(w, "wayang_publish_confirm_seconds_count", exchange=RETRY_EXCHANGE) == 2
    assert _value(w, "wayang_publish_confirm_seconds_count", exchange=DEAD_COPY_EXCHANGE) == 3
    assert _value(w, "wayang_daemon_ready") == 1
    assert _value(w, "wayang_daemon_info", daemon="worker", id=worker_id, version="0.1.0") == 1
    assert 0 <= _value(w, "wayang_heartbeat_age_seconds") < 30
    assert _value(w, "wayang_backpressure_total", reason="queue_full") == 0

    # and the reaper the one dead letter the broker made, which it answered
    assert _family(r, "wayang_dead_letters_received_total") == {
        _labels(capability=UNSERVED, reason="timeout"): 1
    }
    assert _family(r, "wayang_dead_letters_handled_total") == {
        _labels(capability=UNSERVED, outcome="answered"): 1
    }

    # and the dispatcher what it submitted and each terminal answer (not the duplicate's)
    assert _family(d, "wayang_tasks_submitted_total") == {
        _labels(capability="demo.echo"): 4,
        _labels(capability="demo.fail"): 3,
        _labels(capability="demo.sleep"): 1,
        _labels(capability=UNSERVED): 1,
    }
    assert _family(d, "wayang_results_received_total") == {
        _labels(capability="demo.echo", status="SUCCESS", error_code=""): 4,
        _labels(capability="demo.fail", status="FAILED", error_code="executor_error"): 1,
        _labels(capability="demo.fail", status="SUCCESS", error_code=""): 1,
        _labels(capability="demo.fail", status="FAILED", error_code="retries_exhausted"): 1,
        _labels(capability="demo.sleep", status="FAILED", error_code="cancelled"): 1,
        _labels(capability=UNSERVED, status="FAILED", error_code="timeout"): 1,
    }
    assert _value(d, "wayang_task_round_trip_seconds_count", capability="demo.fail") == 3
    assert _value(d, "wayang_publish_confirm_seconds_count", exchange=TASKS_EXCHANGE) == 9
    await fabric.purge("demo.echo", "demo.fail", UNSERVED)


async def test_two_dispatchers_share_the_process_registry(fabric: Fabric) -> None:
    # Given two dispatchers in one process, on one registry, When each submits a task
    registry = CollectorRegistry()
    async with (
        fabric.worker([Echo()]),
        Dispatcher(fabric.dispatcher_config(), registry=registry) as one,
        Dispatcher(fabric.dispatcher_config(), registry=registry) as two,
    ):
        await one.run("demo.echo", {}, wait_s=30)
        await two.run("demo.echo", {}, wait_s=30)
    # Then the registry holds one family, counting both
    d = _parse(generate_latest(registry).decode())
    assert _value(d, "wayang_tasks_submitted_total", capability="demo.echo") == 2


async def test_a_worker_without_metrics_counts_nothing_and_says_so(fabric: Fabric) -> None:
    async with fabric.worker([Echo()], health_port=0) as worker:
        assert worker.registry is None and worker.metrics_address is None
        status, _, body = await _get(worker.health_address, "/metrics")
    assert status == 404 and b"--metrics-port" in body


async def test_a_hostile_request_gets_the_health_json_and_the_daemon_keeps_answering(
    fabric: Fabric,
) -> None:
    async with fabric.worker([Echo()], metrics_port=0) as worker:
        address = worker.metrics_address
        assert address is not None
        # When a client sends a head larger than the endpoint reads, with no end
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"GET /metrics" + b"A" * (MAX_HEAD_BYTES * 2))
        await writer.drain()
        raw = await reader.read()
        writer.close()
        # Then it is answered the health JSON, and the next request is served as usual
        assert raw.startswith(b"HTTP/1.0 200 OK\r\nContent-Type: application/json")
        status, _, _ = await _get(address, "/metrics?x=1")
        assert status == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_worker_command_serves_metrics_on_metrics_port(fabric: Fabric) -> None:
    # Given `wayang-mq worker --metrics-port N`
    port = _free_port()
    process = fabric.spawn_worker(
        ["wayang_workers.demo:Echo"],
        executor_id=f"cli-metrics-{new_id()[:6]}",
        args=["--metrics-port", str(port)],
    )
    try:
        await asyncio.to_thread(process.wait_started)
        # When a task runs through it
        async with fabric.dispatcher() as dispatcher:
            await dispatcher.run("demo.echo", {}, wait_s=30)
        # Then its /metrics counts it, and /readyz says it takes work
        samples = await _scrape(("127.0.0.1", port))
        status, _, _ = await _get(("127.0.0.1", port), "/readyz")
    finally:
        await asyncio.to_thread(process.stop)
    assert _value(samples, "wayang_tasks_received_total", capability="demo.echo") >= 1
    assert status == 200


@pytest.mark.timeout(180)
async def test_control_plane_metrics_and_readiness_follow_its_database(fabric: Fabric) -> None:
    await fabric.purge_record()
    await fabric.purge("demo.echo")
    with service_dir("wayang-pg-metrics-") as state_dir:
        node = PostgresNode(state_dir)
        await asyncio.to_thread(node.start)
        try:
            with fresh_database(node.url) as url:
                migrate(url)
                await _control_plane_run(fabric, node, url)
        finally:
            await asyncio.to_thread(node.stop)


async def _control_plane_run(fabric: Fabric, node: PostgresNode, url: str) -> None:
    worker_id = f"cp-metrics-{new_id()[:6]}"
    async with (
        fabric.control_plane(url, metrics_port=0, audit_interval_s=0.2, retry_max_s=1.0) as cp,
        fabric.worker([Echo()], executor_id=worker_id),
        fabric.dispatcher() as dispatcher,
    ):
        # Given a control plane recording two tasks and their results, and refusing garbage
        for n in range(2):
            await dispatcher.run("demo.echo", {"n": n}, wait_s=30)
        await _publish(fabric, "demo.echo", _garbage(fabric))

        async def recorded() -> bool:
            c = await _scrape(cp.metrics_address)
            return (
                _value(c, "wayang_record_facts_total", kind="result") == 2
                and sum(_family(c, "wayang_record_refusals_total").values()) == 2
                and _value(c, "wayang_executors", state="live") == 1
            )

        await eventually(recorded, what="the facts, the refusal and the live executor")
        c = await _scrape(cp.metrics_address)
        # Then its counters say what it wrote and refused, and the audit found nothing wrong
        assert _value(c, "wayang_record_facts_total", kind="task") == 2
        # (the garbage, and the worker's dead-letter copy of it)
        assert _family(c, "wayang_record_refusals_total") == {_labels(reason="invalid_task"): 2}
        assert _value(c, "wayang_record_batch_seconds_count") >= 1
        assert {k: c[("wayang_audit_findings", _labels(kind=k))] for k in AUDIT_KINDS} == {
            "lost": 0,
            "ran_twice": 0,
            "stray_result": 0,
        }
        assert _value(c, "wayang_claims_total", verdict="run") == 0
        assert _value(c, "wayang_executors_lost_total") == 0
        status, _, body = await _get(cp.metrics_address, "/readyz")
        assert status == 200 and b'"database": true' in body
        # When its database stops
        await asyncio.to_thread(node.stop)
        # Then it is alive but not ready, and says why
        status, _, body = await _get(cp.metrics_address, "/readyz")
        assert status == 503 and b'"database": false' in body
        status, _, _ = await _get(cp.metrics_address, "/healthz")
        assert status == 200
        # and ready again once the database is back
        await asyncio.to_thread(node.start)

        async def ready() -> bool:
            status, _, _ = await _get(cp.metrics_address, "/readyz")
            return status == 200

        await eventually(ready, what="ready again")
    await fabric.purge("demo.echo")
