"""A sharded capability keeps order per partition key, end to end through a real broker.

``shards = N`` in the topology puts a consistent-hash exchange ``wayang.shard.<cap>`` in front of
N queues ``wayang.task.<cap>.<n>``; the dispatcher puts the task's partition key in the
``x-partition-key`` header the exchange hashes, so one key always lands on one shard queue.

What keeps *execution* in order is then the consumer side: each shard queue has a single
active consumer across all workers (``x-single-active-consumer``), and inside a worker the
deliveries of one key run one after the other in delivery order. This test is the simplest
case, one in-process worker with ``prefetch=1``; tests/test_shard_order.py covers several
worker processes, a larger prefetch, a standby taking over, ``--shards`` and resharding.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import aio_pika
import pytest

from wayang_mq import Executor, Status, Task
from wayang_mq.amqp.connect import management_client
from wayang_mq.core.model import JsonLike
from wayang_mq.core.names import task_queue
from wayang_mq.testing.harness import Fabric
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import Topology, parse_topology

CAPABILITY = "test.sharded"
SHARDS = 4
KEYS = [f"customer-{n}" for n in range(8)]
TASKS_PER_KEY = 10


class PerKeyRecorder(Executor):
    """Records, per partition key, the order tasks finished in and how many ran at once."""

    serves = (CAPABILITY,)

    def __init__(self) -> None:
        self.finished: dict[str, list[int]] = collections.defaultdict(list)
        self.running: collections.Counter[str] = collections.Counter()
        self.most_at_once_per_key = 0
        self.most_at_once = 0

    async def execute(self, task: Task) -> JsonLike:
        key = str(task.partition_key)
        self.running[key] += 1
        self.most_at_once_per_key = max(self.most_at_once_per_key, self.running[key])
        self.most_at_once = max(self.most_at_once, self.running.total())
        try:
            # Unequal run times: a later task of a key would overtake an earlier one if the
            # two were ever handed out at the same time.
            await asyncio.sleep(float(task.input["pause_s"]))  # type: ignore[arg-type]
            self.finished[key].append(int(task.input["seq"]))  # type: ignore[call-overload]
        finally:
            self.running[key] -= 1
        return {"key": key, "seq": task.input["seq"]}


@pytest.fixture(scope="module")
async def sharded(fabric: Fabric) -> AsyncIterator[Topology]:
    """The test capability, sharded over SHARDS queues, declared on the session's broker."""
    topology = parse_topology(
        {"capabilities": {CAPABILITY: {"shards": SHARDS}}}, source="test_sharding"
    )
    await apply_topology(topology, fabric.endpoint.amqp_url, management_client(fabric.endpoint))
    await _purge(fabric, topology.capability(CAPABILITY).task_queues)
    yield topology


async def _purge(fabric: Fabric, queues: tuple[str, ...]) -> None:
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel()
        for name in queues:
            await (await channel.get_queue(name, ensure=False)).purge()


async def _ready_counts(fabric: Fabric, queues: tuple[str, ...]) -> dict[str, int]:
    """Each queue's ready messages, read exactly with a passive declare."""
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel()
        counts = {}
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)
            counts[name] = declared.declaration_result.message_count or 0
        return counts


async def test_tasks_of_one_partition_key_run_in_submit_order_while_keys_spread_over_shards(
    fabric: Fabric, sharded: Topology
) -> None:
    # Given a capability sharded over 4 queues, and 80 tasks over 8 partition keys submitted
    # one after the other (each confirmed before the next), keys interleaved, while no worker
    # consumes yet
    shard_queues = sharded.capability(CAPABILITY).task_queues
    assert shard_queues == tuple(task_queue(CAPABILITY, n) for n in range(SHARDS))
    recorder = PerKeyRecorder()
    async with fabric.dispatcher() as dispatcher:
        handles = []
        for seq in range(TASKS_PER_KEY):
            for index, key in enumerate(KEYS):
                pause_s = 0.005 * (1 + (3 * seq + index) % 4)
                handles.append(
                    await dispatcher.submit(
                        CAPABILITY, {"seq": seq, "pause_s": pause_s}, partition_key=key
                    )
                )
        # Then the broker spread them over more than one shard queue
        queued = await _ready_counts(fabric, shard_queues)
        assert sum(queued.values()) == len(KEYS) * TASKS_PER_KEY
        assert sum(1 for count in queued.values() if count > 0) > 1, queued

        # When one worker serves the shards with prefetch 1 per shard consumer, and as many
        # slots as shards so that different keys run in parallel
        async with fabric.worker([recorder], concurrency=SHARDS, prefetch=1):
            results = await asyncio.wait_for(
                asyncio.gather(*(handle.result() for handle in handles)), timeout=60
            )

    # Then every task succeeded
    assert [r.status for r in results] == [Status.SUCCESS] * len(handles)
    # and each key's tasks ran one at a time, in the order they were submitted
    assert recorder.finished == {key: list(range(TASKS_PER_KEY)) for key in KEYS}
    assert recorder.most_at_once_per_key == 1
    # while tasks of different keys did run at the same time (the order is not a side
    # effect of running everything one by one)
    assert recorder.most_at_once > 1
