"""Order per partition key across worker processes, ``--shards``, and resharding, on a real broker.

A sharded capability's queues are single-active-consumer: one worker at a time consumes a
shard, the others stand by and take over in order. Inside a worker, the deliveries of one key
run one after the other in delivery order, whatever the prefetch; different keys run at once.
The workers here are ``wayang-mq worker`` processes started the way a user starts them, and
the order is read back from the results alone (each says when it started and finished, and
which process ran it).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.shard_executors import KEYORDER
from wayang_mq import Executor, Status, Task
from wayang_mq.amqp.connect import management_client
from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.client.replies import TaskHandle
from wayang_mq.core import names
from wayang_mq.core.errors import TopologyError
from wayang_mq.core.model import JsonLike, Result
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import Topology, load_topology, parse_topology

SHARDS = 4
#: tasks wait queued while the test fills the shards, and a loaded machine runs them slowly:
#: the default 60 s deadline would expire the last ones (a timeout, not an order failure)
_QUEUED_FOR_S = 600
EXECUTOR = "tests.shard_executors:Ordered"


@pytest.fixture(scope="module")
async def keyorder(fabric: Fabric) -> AsyncIterator[Topology]:
    """``test.keyorder`` sharded over 4 single-active-consumer queues, empty."""
    topology = parse_topology(
        {"capabilities": {KEYORDER: {"shards": SHARDS}}}, source="test_shard_order"
    )
    await apply_topology(topology, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
    yield topology


@pytest.fixture
async def shard_queues(fabric: Fabric, keyorder: Topology) -> AsyncIterator[tuple[str, ...]]:
    queues = keyorder.capability(KEYORDER).task_queues
    await _purge(fabric, queues)
    yield queues
    fabric.stop_processes()
    await _purge(fabric, queues)


async def _purge(fabric: Fabric, queues: Sequence[str]) -> None:
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel()
        for name in queues:
            await (await channel.get_queue(name, ensure=False)).purge()


async def _depths(fabric: Fabric, queues: Sequence[str]) -> dict[str, int]:
    """Each queue's messages, read exactly with a passive declare."""
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel()
        out = {}
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)
            out[name] = declared.declaration_result.message_count or 0
        return out


async def _submit_in_lanes(
    dispatcher: Dispatcher,
    capability: str,
    keys: Sequence[str],
    per_key: int,
    pause_s: float | None = None,
) -> dict[str, list[TaskHandle]]:
    """Each key's tasks submitted one after the other (each confirmed before the next: the
    publish order per key is seq order); the keys' lanes run concurrently."""

    async def lane(key: str) -> list[TaskHandle]:
        handles = []
        for seq in range(per_key):
            task_input: dict[str, JsonLike] = {"seq": seq}
            if pause_s is not None:
                task_input["pause_s"] = pause_s
            handles.append(
                await dispatcher.submit(
                    capability, task_input, partition_key=key, queue_timeout_s=_QUEUED_FOR_S
                )
            )
        return handles

    lanes = await asyncio.gather(*(lane(key) for key in keys))
    return dict(zip(keys, lanes, strict=True))


async def _results(handles: dict[str, list[TaskHandle]], timeout_s: float) -> list[Result]:
    every = [h for lane in handles.values() for h in lane]
    return await asyncio.wait_for(asyncio.gather(*(h.result() for h in every)), timeout_s)


def _outputs(results: Sequence[Result]) -> list[dict[str, Any]]:
    assert [r.status for r in results] == [Status.SUCCESS] * len(results)
    return [dict(r.output) for r in results]  # type: ignore[arg-type]


def _keys_in_order(outputs: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Per key, the seqs in the order their tasks finished."""
    by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for out in outputs:
        by_key[out["key"]].append(out)
    return {
        key: [o["seq"] for o in sorted(runs, key=lambda o: o["finished_ns"])]
        for key, runs in by_key.items()
    }


def _one_at_a_time_per_key(outputs: Sequence[dict[str, Any]]) -> bool:
    """No task of a key started before the previous one of its key finished."""
    by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for out in outputs:
        by_key[out["key"]].append(out)
    for runs in by_key.values():
        runs.sort(key=lambda o: o["seq"])
        if any(b["started_ns"] < a["finished_ns"] for a, b in itertools.pairwise(runs)):
            return False
    return True


def _keys_overlapped_in_one_worker(outputs: Sequence[dict[str, Any]]) -> bool:
    """Some worker ran tasks of two different keys at the same time."""
    by_pid: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for out in outputs:
        by_pid[out["pid"]].append(out)
    for runs in by_pid.values():
        runs.sort(key=lambda o: o["started_ns"])
        for a, b in itertools.pairwise(runs):
            if b["started_ns"] < a["finished_ns"] and a["key"] != b["key"]:
                return True
    return False


@pytest.mark.timeout(300)  # ~80 s on 2 cores shared with other brokers (20 s submit, 40 s run)
async def test_10000_tasks_of_100_keys_over_4_shards_and_4_workers_finish_in_order_per_key(
    fabric: Fabric, shard_queues: tuple[str, ...]
) -> None:
    # Given 10,000 tasks over 100 partition keys published to 4 shards before any worker
    # runs (each key's tasks one after the other, the keys concurrently)
    keys = [f"customer-{n}" for n in range(100)]
    began = time.monotonic()
    async with fabric.dispatcher() as dispatcher:
        handles = await _submit_in_lanes(dispatcher, KEYORDER, keys, per_key=100)
        print(f"submitted 10,000 tasks in {time.monotonic() - began:.1f} s")

        # Then the shards hold them evenly: each within 20% of the mean (100 keys hash onto 4
        # shards like 100 dice throws: this is a property of these names, see docs/sharding.md)
        depths = await _depths(fabric, shard_queues)
        print(f"shard depths with 100 keys customer-0..99: {depths}")
        assert sum(depths.values()) == 10_000
        mean = 10_000 / SHARDS
        assert all(abs(d - mean) <= 0.2 * mean for d in depths.values()), depths

        # When 4 worker processes consume one shard each, 8 tasks at once, holding 32
        workers = [
            fabric.spawn_worker(
                [EXECUTOR],
                executor_id=f"keyorder-{n}",
                args=["--shards", str(n), "--concurrency", "8", "--prefetch", "32"],
                log_level="INFO",  # DEBUG would log several lines per task
            )
            for n in range(SHARDS)
        ]
        for worker in workers:
            await asyncio.to_thread(worker.wait_started)
        began = time.monotonic()
        outputs = _outputs(await _results(handles, timeout_s=150))
        print(f"4 workers ran 10,000 tasks in {time.monotonic() - began:.1f} s")

    # Then every key's tasks finished in publish order, one at a time
    assert _keys_in_order(outputs) == {key: list(range(100)) for key in keys}
    assert _one_at_a_time_per_key(outputs)
    # while different keys ran at the same time in one worker, on all 4 workers
    assert _keys_overlapped_in_one_worker(outputs)
    assert len({o["pid"] for o in outputs}) == SHARDS


async def test_the_standby_takes_over_a_killed_workers_shards_in_order(
    fabric: Fabric, shard_queues: tuple[str, ...]
) -> None:
    # Given two workers on all shards: the first to start is every shard's active consumer,
    # the second stands by
    flags = ["--concurrency", "4", "--prefetch", "8"]
    first = fabric.spawn_worker([EXECUTOR], executor_id="active-a", args=flags)
    await asyncio.to_thread(first.wait_started)
    second = fabric.spawn_worker([EXECUTOR], executor_id="standby-b", args=flags)
    await asyncio.to_thread(second.wait_started)
    management = management_client(fabric.endpoint)
    await eventually(
        lambda: (
            _activity(management, shard_queues)
            == {"active-a": {"single_active"}, "standby-b": {"waiting"}}
        ),
        what="active-a active on every shard and standby-b waiting",
    )

    # When 600 tasks of 20 keys flow and the active worker is killed (-9) mid-run
    keys = [f"key-{n}" for n in range(20)]
    async with fabric.dispatcher() as dispatcher:
        handles = await _submit_in_lanes(dispatcher, KEYORDER, keys, per_key=30, pause_s=0.01)
        done = [h for lane in handles.values() for h in lane]

        def finished() -> int:
            return sum(1 for h in done if h.done())

        await eventually(lambda: finished() >= 100, what="100 tasks finished")
        first.signal(signal.SIGKILL)
        outputs = _outputs(await _results(handles, timeout_s=90))

    # Then nothing was lost, the standby finished the run, and each key's tasks (their
    # first answers) finished in publish order: what the killed worker held came back first
    assert first.wait() == -signal.SIGKILL
    pids = collections.Counter(o["pid"] for o in outputs)
    assert set(pids) == {first.process.pid, second.process.pid}, pids
    assert _keys_in_order(outputs) == {key: list(range(30)) for key in keys}


def _activity(management: Any, queues: Sequence[str]) -> dict[str, set[str]]:
    """Per worker id, the activity status of its consumers on ``queues``."""
    out: dict[str, set[str]] = collections.defaultdict(set)
    for consumer in management.list_consumers():
        if consumer["queue"]["name"] in queues:
            worker_id = str(consumer["consumer_tag"]).split("/", 1)[0]
            out[worker_id].add(str(consumer.get("activity_status")))
    return dict(out)


async def test_a_worker_given_shards_consumes_only_those_and_a_bad_spec_is_refused(
    fabric: Fabric, shard_queues: tuple[str, ...], fabric_env: dict[str, str]
) -> None:
    # Given a worker started with --shards 1,3
    worker = fabric.spawn_worker([EXECUTOR], executor_id="subset", args=["--shards", "1,3"])
    await asyncio.to_thread(worker.wait_started)

    # Then it consumes shards 1 and 3 and no other, and says so
    management = management_client(fabric.endpoint)

    def consumed() -> set[str]:
        return {
            c["queue"]["name"]
            for c in management.list_consumers()
            if str(c["consumer_tag"]).startswith("subset/")
            and c["queue"]["name"].startswith(names.task_queue(KEYORDER))
        }

    # (the management API lists consumers from its stats, refreshed every few seconds)
    await eventually(lambda: consumed() == {shard_queues[1], shard_queues[3]}, what="consumers")
    assert "event=worker.shards" in worker.log() and "consuming=1,3" in worker.log()

    # When workers are started with a shard the broker does not have, or a malformed list
    command = [sys.executable, "-m", "wayang_mq.cli", "worker", EXECUTOR, "--shards"]
    environment = {**os.environ, **fabric_env}
    missing = subprocess.run(
        [*command, "2-4"], env=environment, capture_output=True, text=True, timeout=60
    )
    malformed = subprocess.run(
        [*command, "one"], env=environment, capture_output=True, text=True, timeout=60
    )

    # Then each is refused with a line that says what is wrong
    assert missing.returncode != 0
    assert "has 4 shard queues on the broker (0-3); there is no shard 4" in missing.stderr
    assert malformed.returncode != 0
    assert "'one' is not N or N-M" in malformed.stderr


RESHARDED = "test.resharded"


class Counting(Executor):
    """``test.resharded``: counts how often each task ran, and the order per key."""

    serves = (RESHARDED,)

    def __init__(self) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.order: dict[str, list[int]] = collections.defaultdict(list)

    async def execute(self, task: Task) -> JsonLike:
        self.runs[task.task_id] += 1
        self.order[str(task.partition_key)].append(int(str(task.input["seq"])))
        await asyncio.sleep(0.001)
        return {"seq": task.input["seq"]}


def _topology_file(tmp_path: Path, shards: int) -> Path:
    path = tmp_path / f"resharded-{shards}.toml"
    path.write_text(f'[capabilities."{RESHARDED}"]\nshards = {shards}\n')
    return path


def _reshard(fabric_env: dict[str, str], path: Path, to: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "wayang_mq.cli", "topology", "reshard", RESHARDED]
    return subprocess.run(
        [*command, "--to", str(to), "--file", str(path)],
        env={**os.environ, **fabric_env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _layout(fabric: Fabric) -> tuple[list[str], list[tuple[str, str]], bool]:
    """The capability's queues on the broker, its shard exchange's bindings, and whether
    every shard queue is single-active-consumer."""
    management = management_client(fabric.endpoint)
    ours = (names.task_queue(RESHARDED) + ".", names.reshard_queue(RESHARDED))
    queues = [q for q in management.list_queues() if q["name"].startswith(ours)]
    bindings = sorted(
        (b["destination"], b["routing_key"])
        for b in management.list_bindings()
        if b["source"] == names.shard_exchange(RESHARDED)
    )
    sac = all((q.get("arguments") or {}).get("x-single-active-consumer") for q in queues)
    return sorted(q["name"] for q in queues), bindings, sac


async def test_resharding_4_to_2_and_back_to_4_moves_every_queued_task(
    fabric: Fabric, fabric_env: dict[str, str], tmp_path: Path
) -> None:
    # Given test.resharded on 4 shards with 300 tasks of 30 keys queued, and no worker
    four = load_topology(_topology_file(tmp_path, 4))
    await apply_topology(four, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
    keys = [f"account-{n}" for n in range(30)]
    async with fabric.dispatcher() as dispatcher:
        handles = await _submit_in_lanes(dispatcher, RESHARDED, keys, per_key=10)

        # When the file says 2 shards: apply refuses and points to reshard
        two_file = _topology_file(tmp_path, 2)
        with pytest.raises(TopologyError) as refused:
            await apply_topology(
                load_topology(two_file),
                fabric.endpoint.amqp_url,
                management_client(fabric.endpoint),
            )
        assert "run `wayang-mq topology reshard test.resharded --to 2`" in refused.value.one_line()
        # and reshard --to 2 moves them
        down = _reshard(fabric_env, two_file, 2)
        assert down.returncode == 0, down.stderr
        assert "4 -> 2 shards, 600 queued tasks moved" in down.stdout

        # Then the broker has exactly the 2 new shard queues, bound once each, all 300 tasks
        queues, bindings, sac = _layout(fabric)
        assert queues == [names.task_queue(RESHARDED, n) for n in range(2)]
        assert bindings == [(q, "1") for q in queues] and sac
        assert sum((await _depths(fabric, queues)).values()) == 300

        # When it goes back to 4 shards
        up = _reshard(fabric_env, _topology_file(tmp_path, 4), 4)
        assert up.returncode == 0, up.stderr
        assert "2 -> 4 shards, 600 queued tasks moved" in up.stdout
        queues, bindings, sac = _layout(fabric)
        assert queues == [names.task_queue(RESHARDED, n) for n in range(4)]
        assert bindings == [(q, "1") for q in queues] and sac
        assert sum((await _depths(fabric, queues)).values()) == 300
        # and running it again changes nothing
        again = _reshard(fabric_env, _topology_file(tmp_path, 4), 4)
        assert again.returncode == 0 and "0 queued tasks moved" in again.stdout

        # Then a worker runs every task once, each key's in publish order
        counting = Counting()
        async with fabric.worker([counting], concurrency=4, prefetch=8):
            results = await _results(handles, timeout_s=60)
    assert [r.status for r in results] == [Status.SUCCESS] * 300
    assert len(counting.runs) == 300 and set(counting.runs.values()) == {1}
    assert counting.order == {key: list(range(10)) for key in keys}
