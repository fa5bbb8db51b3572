"""The fabric on a 3-node RabbitMQ cluster: replicated task queues, clients that take every
node's address and fail over, and no confirmed task lost when the queue's leader is killed.

Real nodes: a private cluster of three (``wayang_mq.testing.plugin.local_rabbitmq_cluster``),
started once for this module. docs/cluster.md holds the figures the failover test prints.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.endpoint import BrokerEndpoint, split_urls
from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.core import names
from wayang_mq.core.errors import ConfigError, WayangError
from wayang_mq.core.model import Result, Status
from wayang_mq.dev.nodes import free_port
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.plugin import RabbitCluster, local_rabbitmq_cluster

CAPABILITY = "demo.echo"
QUEUE = names.task_queue(CAPABILITY)
TASKS = 5_000
KILL_AFTER = 1_500  # results in before the leader is killed
IN_FLIGHT = 64  # submits awaiting their confirm at once


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    """Three private nodes forming one cluster, for this module only."""
    started = time.monotonic()
    with local_rabbitmq_cluster(3) as cluster:
        print(f"\n3-node cluster booted in {time.monotonic() - started:.1f} s")
        yield cluster


def _ordered(cluster: RabbitCluster, order: list[int]) -> str:
    """The cluster's AMQP URLs in this order of members, comma-separated."""
    return ",".join(cluster.amqp_urls[i] for i in order)


def _endpoint(cluster: RabbitCluster, order: list[int]) -> BrokerEndpoint:
    managers = ",".join(cluster.management_urls[i] for i in order)
    return BrokerEndpoint.from_url(_ordered(cluster, order), managers)


def test_a_url_list_names_every_node_with_one_account() -> None:
    # Given two nodes' URLs separated by a comma (spaces around it tolerated)
    urls = "amqp://u:p@10.0.0.1:5672/, amqp://u:p@10.0.0.2:5673/"
    # When it is read as an endpoint
    endpoint = BrokerEndpoint.from_url(urls)
    # Then both addresses are kept in order, with one account and vhost
    assert split_urls(urls) == ["amqp://u:p@10.0.0.1:5672/", "amqp://u:p@10.0.0.2:5673/"]
    assert endpoint.amqp_urls == split_urls(urls)
    assert (endpoint.username, endpoint.password, endpoint.vhost) == ("u", "p", "/")
    # and each host's management API is assumed on the conventional port
    assert endpoint.management_urls == ["http://10.0.0.1:15672", "http://10.0.0.2:15672"]
    # and the password never shows
    assert "p@" not in repr(endpoint)
    # But URLs naming different accounts or vhosts are refused: they cannot be one cluster
    with pytest.raises(ConfigError, match="differ"):
        BrokerEndpoint.from_url("amqp://u:p@a:5672/,amqp://other:p@b:5672/")
    with pytest.raises(ConfigError, match="differ"):
        BrokerEndpoint.from_url("amqp://u:p@a:5672/,amqp://u:p@b:5672/other")


async def test_connect_skips_an_address_that_does_not_answer(cluster: RabbitCluster) -> None:
    # Given a URL list whose first address has no broker (a free port) and whose second is
    # the cluster's second node
    dead = f"amqp://{cluster.nodes[0].username}:x@127.0.0.1:{free_port()}/"
    second = cluster.amqp_urls[1]
    # When a client connects with it
    connection = await connect(f"{dead},{second}", "failover-probe")
    try:
        # Then it is connected to the second node, as the node itself sees it
        assert str(connection.url.port) == second.rsplit(":", 1)[1].strip("/")
        api = cluster.management(1)

        def probe_on_second_node() -> bool:
            seen = [
                c for c in api.list_connections() if c.get("user_provided_name") == "failover-probe"
            ]
            return bool(seen) and seen[0]["node"] == cluster.node_names[1]

        await eventually(probe_on_second_node, what="the probe connection on node 2")
    finally:
        await connection.close()
    # And with no address answering, the error names the first one
    with pytest.raises(WayangError, match=f"127.0.0.1:{dead.rsplit(':', 1)[1].strip('/')}"):
        await connect(f"{dead},{dead.replace('x@', 'y@')}", "nowhere")


@pytest.mark.slow
@pytest.mark.timeout(330)
async def test_killing_the_queue_leader_loses_no_confirmed_task(
    cluster: RabbitCluster, tmp_path: Path
) -> None:
    # Given the topology applied on the cluster: the capability's quorum queue on all 3 nodes
    fabric = await Fabric.create(_endpoint(cluster, [0, 1, 2]), tmp_path)
    assert cluster.members_of(QUEUE) == sorted(cluster.node_names)
    await fabric.purge(CAPABILITY)
    leader = cluster.index_of(cluster.leader_of(QUEUE))
    a, b = (leader + 1) % 3, (leader + 2) % 3
    # and a worker daemon and a dispatcher given all three addresses, both starting at the
    # leader's node (the one to be killed), each with the other two in another order
    worker = fabric.spawn_worker(
        ["wayang_workers.demo:Echo"],
        executor_id="cluster-worker",
        args=["--concurrency", "16", "--prefetch", "32"],
        env={"WAYANG_AMQP_URL": _ordered(cluster, [leader, a, b])},
    )
    try:
        await asyncio.to_thread(worker.wait_started, 60)
        async with fabric.dispatcher(amqp_url=_ordered(cluster, [leader, b, a])) as dispatcher:
            answered, confirmed, refused, killed_at = await _flow(cluster, dispatcher, leader)
            # Then every task whose submit was confirmed gets its one SUCCESS result
            await eventually(
                lambda: len(answered) >= len(confirmed),
                timeout_s=120,
                what=f"results for {len(confirmed)} confirmed tasks",
            )
            connections = {
                c.get("user_provided_name"): c["node"]
                for c in cluster.management(a).list_connections()
            }
    finally:
        fabric.stop_processes()
    assert set(answered) == confirmed, "a confirmed task got no result"
    assert all(r.status is Status.SUCCESS for r in answered.values())
    assert len(confirmed) + len(refused) == TASKS
    print(f"\n{len(confirmed)} tasks confirmed and answered, {len(refused)} submits raised")
    # and the clients moved to the surviving nodes
    killed_name = cluster.node_names[leader]
    assert "event=broker.reconnected" in worker.log()
    assert connections.get(f"dispatcher {dispatcher.dispatcher_id}") not in (None, killed_name)
    # and throughput came back: measured from the kill
    _report_recovery([t for t, _ in answered.values_with_time()], killed_at)
    # When the killed node is started again
    started = time.monotonic()
    cluster.start(leader)
    # Then it rejoins: 3 running nodes, and its replica of the queue back online
    assert cluster.running() == sorted(cluster.node_names)

    def replica_back() -> bool:
        info = cluster.queue_info(QUEUE)
        return sorted(info.get("online", [])) == sorted(cluster.node_names)

    await eventually(replica_back, timeout_s=60, what="the restarted node's replica online")
    assert cluster.members_of(QUEUE) == sorted(cluster.node_names)
    print(f"killed node back, its replica online, in {time.monotonic() - started:.1f} s")


class _Answers(dict[str, Result]):
    """Results by task id, with the moment each arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, float] = {}

    def record(self, result: Result) -> None:
        assert result.task_id not in self, f"two terminal results for {result.task_id}"
        self[result.task_id] = result
        self.times[result.task_id] = time.monotonic()

    def values_with_time(self) -> list[tuple[float, Result]]:
        return sorted((self.times[k], v) for k, v in self.items())


async def _flow(
    cluster: RabbitCluster, dispatcher: Dispatcher, leader: int
) -> tuple[_Answers, set[str], list[BaseException], float]:
    """Submit TASKS echo tasks, IN_FLIGHT confirms awaited at once; kill -9 the queue's leader
    once KILL_AFTER results are in. A submit that raises is counted, never retried here."""
    answered = _Answers()
    confirmed: set[str] = set()
    refused: list[BaseException] = []
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def submit(n: int) -> None:
        async with gate:
            try:
                handle = await dispatcher.submit(CAPABILITY, {"n": n}, queue_timeout_s=180)
            except WayangError as error:
                refused.append(error)
                return
        confirmed.add(handle.task_id)
        handle.when_answered(answered.record)

    submitting = asyncio.gather(*(submit(n) for n in range(TASKS)))
    await eventually(lambda: len(answered) >= KILL_AFTER, timeout_s=90, what="results flowing")
    # When the node leading the capability's queue is killed with SIGKILL
    killed_at = time.monotonic()
    await asyncio.to_thread(cluster.kill, leader)
    await asyncio.wait_for(submitting, 200)
    return answered, confirmed, refused, killed_at


def _report_recovery(arrivals: list[float], killed_at: float) -> None:
    """Print the rate before the kill, the gap, and when the rate was back near it."""
    before = [t for t in arrivals if killed_at - 3 <= t < killed_at]
    rate_before = len(before) / 3
    after = [t for t in arrivals if t >= killed_at]
    assert after, "no result after the kill"
    first = after[0] - killed_at
    # results already in the dispatcher's buffers land at once; the outage is the longest
    # silence in the 30 s after the kill
    window = [killed_at, *(t for t in after if t < killed_at + 30)]
    gap = max(later - earlier for earlier, later in itertools.pairwise(window))
    back = None
    for start in (killed_at + 0.25 * i for i in range(400)):
        window = [t for t in after if start <= t < start + 1]
        if len(window) >= 0.7 * rate_before:
            back = start - killed_at
            break
    print(
        f"before the kill {rate_before:.0f} results/s; first result after it {first:.2f} s; "
        f"longest silence after it {gap:.2f} s; "
        f"rate back to >=70% within {back if back is None else round(back, 2)} s"
    )
    assert back is not None, "throughput never came back near the pre-kill rate"
