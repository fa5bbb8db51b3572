"""The daemon base the worker and the reaper share: a health endpoint a probe can use, and a
clear error for a queue the topology lacks (real broker)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from wayang_workers.demo import Sleep

from wayang_mq import Executor
from wayang_mq.core.errors import ConfigError
from wayang_mq.testing.harness import Fabric, eventually


async def _probe(address: tuple[str, int] | None, path: str = "/") -> tuple[int, dict[str, Any]]:
    """GET the health endpoint (any path but /metrics, /healthz and /readyz answers the
    health JSON): the HTTP status and the JSON body."""
    assert address is not None, "the daemon has no health endpoint"
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: probe\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_a_worker_answers_health_probes_ready_then_draining(fabric: Fabric) -> None:
    # Given a worker with a health port, running a task
    await fabric.purge("demo.sleep")
    async with fabric.worker([Sleep()], health_port=0, grace_s=10) as worker:
        status, health = await _probe(worker.health_address)

        # Then while it consumes it answers 200 with what it serves
        assert status == 200
        assert health["ok"] is True
        assert health["daemon"] == "worker"
        assert health["state"] == "ready"
        assert health["connected"] is True
        assert health["consumers"] == 2  # demo.sleep's queue, and its own (placed tasks)
        assert health["details"]["capabilities"] == "demo.sleep"
        # and /readyz says it is ready, each check holding; /healthz that it is alive
        status, ready = await _probe(worker.health_address, "/readyz")
        assert (status, ready["ok"], ready["checks"]) == (
            200,
            True,
            {"connected": True, "consuming": True},
        )
        assert (await _probe(worker.health_address, "/healthz"))[0] == 200

        async with fabric.dispatcher() as dispatcher:
            handle = await dispatcher.submit("demo.sleep", {"seconds": 2})
            await eventually(lambda: worker.health().details["running"] == 1, what="running")

            # When it is asked to stop while the task runs
            worker.stop()

            # Then the probe says 503 draining until it has finished, and the task completes
            await eventually(lambda: worker.health().state == "draining", what="draining")
            status, health = await _probe(worker.health_address)
            assert status == 503
            assert health["state"] == "draining"
            assert health["ok"] is False
            # and /readyz says 503 (not consuming), while /healthz says it is alive
            status, ready = await _probe(worker.health_address, "/readyz")
            assert (status, ready["checks"]["consuming"]) == (503, False)
            assert (await _probe(worker.health_address, "/healthz"))[0] == 200
            assert (await handle.result(timeout_s=15)).status == "SUCCESS"


async def test_a_reaper_answers_health_probes(fabric: Fabric) -> None:
    async with fabric.reaper(health_port=0) as reaper:
        status, health = await _probe(reaper.health_address)
    assert status == 200
    assert health["daemon"] == "reaper"
    assert health["details"] == {"queue": "wayang.reaper"}


class Unknown(Executor):
    serves = ("nobody.serves.this",)


async def test_a_capability_without_a_queue_is_a_clear_error_at_start(fabric: Fabric) -> None:
    with pytest.raises(ConfigError) as raised:
        async with fabric.worker([Unknown()]):
            pass
    assert "wayang.task.nobody.serves.this does not exist" in str(raised.value)
    assert "wayang-mq topology apply" in raised.value.one_line()
