"""Applying and exporting the topology, against a real RabbitMQ.

Each test gets a fresh vhost, so nothing here depends on (or disturbs) what other tests of
the session declare in ``/``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from wayang_mq.amqp.management import ManagementClient
from wayang_mq.core import names
from wayang_mq.core.errors import BrokerUnreachable, TopologyError
from wayang_mq.testing.harness import WAIT_S, eventually
from wayang_mq.testing.plugin import BrokerHandle
from wayang_mq.topology.apply import ApplyReport, ObjectRef, apply_topology, binding_ref
from wayang_mq.topology.export import export_definitions
from wayang_mq.topology.spec import (
    DEFAULT_TOPOLOGY_PATH,
    DEFAULTS_POLICY,
    PARTITION_KEY_HEADER,
    Topology,
    as_dict,
    load_topology,
)

# Queue stats (including the "policy" a queue shows) are emitted every ~5 s.
STATS_WAIT_S = 30.0

SMALL = """
[defaults]
max_length = 1000
delivery_limit = 3

[[retry_tiers]]
name = "fast"
ttl_ms = 200

[[retry_tiers]]
name = "slow"
ttl_ms = 60000

[capabilities."demo.echo"]

[capabilities."db.query"]
shards = 3
"""


@dataclass(frozen=True)
class Vhost:
    """A throwaway vhost: its AMQP URL and a management client bound to it."""

    name: str
    amqp_url: str
    management: ManagementClient


@pytest.fixture
def admin(rabbitmq: BrokerHandle) -> ManagementClient:
    return ManagementClient(
        rabbitmq.management_url, username=rabbitmq.username, password=rabbitmq.password
    )


@pytest.fixture
def make_vhost(rabbitmq: BrokerHandle, admin: ManagementClient) -> Iterator[Callable[[], Vhost]]:
    created: list[str] = []

    def make() -> Vhost:
        name = f"wayang-topology-{uuid.uuid4().hex[:8]}"
        admin.create_vhost(name)
        created.append(name)
        url = urlsplit(rabbitmq.amqp_url)._replace(path="/" + quote(name, safe="")).geturl()
        return Vhost(name, url, admin.for_vhost(name))

    yield make
    for name in created:
        admin.delete_vhost(name)


@pytest.fixture
def vhost(make_vhost: Callable[[], Vhost]) -> Vhost:
    return make_vhost()


@pytest.fixture
def small(tmp_path: Path) -> Topology:
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return load_topology(path)


@pytest.fixture
async def channel(vhost: Vhost) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(vhost.amqp_url)
    async with connection:
        yield await connection.channel()


async def apply(topology: Topology, vhost: Vhost) -> ApplyReport:
    return await apply_topology(topology, vhost.amqp_url, vhost.management)


def snapshot(management: ManagementClient) -> dict[str, list[Any]]:
    """What defines the vhost's topology, without stats and without the vhost's name."""

    def rows(items: list[dict[str, Any]], keys: tuple[str, ...]) -> list[str]:
        return sorted(json.dumps({k: item.get(k) for k in keys}, sort_keys=True) for item in items)

    return {
        "exchanges": rows(
            management.list_exchanges(),
            ("name", "type", "durable", "auto_delete", "internal", "arguments"),
        ),
        "queues": rows(
            management.list_queues(), ("name", "type", "durable", "auto_delete", "arguments")
        ),
        "bindings": rows(
            management.list_bindings(),
            ("source", "destination", "destination_type", "routing_key", "arguments"),
        ),
        "policies": rows(
            management.list_policies(), ("name", "pattern", "apply-to", "priority", "definition")
        ),
    }


def all_refs(topology: Topology) -> set[ObjectRef]:
    return (
        {ObjectRef("exchange", e.name) for e in topology.exchanges()}
        | {ObjectRef("queue", q.name) for q in topology.queues()}
        | {binding_ref(b) for b in topology.bindings()}
        | {ObjectRef("policy", p.name) for p in topology.policies()}
    )


async def wait_for_message(
    channel: AbstractChannel, queue: str, timeout_s: float = WAIT_S
) -> AbstractIncomingMessage:
    """The next message in ``queue`` (unacked: the caller settles it), waiting by condition."""
    return await first_message_in(channel, (queue,), timeout_s)


async def first_message_in(
    channel: AbstractChannel, queues: tuple[str, ...], timeout_s: float = WAIT_S
) -> AbstractIncomingMessage:
    """The first message delivered from any of ``queues`` (a consumer on each: shard queues
    are single-active-consumer, and those refuse ``basic.get``), waiting by condition."""
    declared = [await channel.get_queue(name, ensure=False) for name in queues]
    found: list[AbstractIncomingMessage] = []
    tags = [(queue, await queue.consume(_collect(found))) for queue in declared]
    try:
        await eventually(lambda: bool(found), timeout_s=timeout_s, what=f"a message in {queues}")
    finally:
        for queue, tag in tags:
            await queue.cancel(tag)
    for extra in found[1:]:  # delivered too (no prefetch limit): back to their queue
        await extra.nack(requeue=True)
    return found[0]


async def publish(
    channel: AbstractChannel, exchange: str, routing_key: str, **headers: Any
) -> None:
    target = await channel.get_exchange(exchange, ensure=False)
    message = aio_pika.Message(
        b"task", delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers or None
    )
    await target.publish(message, routing_key, mandatory=True)


# -- apply --------------------------------------------------------------------------------


async def test_apply_declares_every_object_of_the_default_file(vhost: Vhost) -> None:
    # Given the default file, When it is applied to an empty vhost
    topology = load_topology(DEFAULT_TOPOLOGY_PATH)
    report = await apply(topology, vhost)

    # Then everything was created, and the management API shows each object as the file says
    assert set(report.created) == all_refs(topology) and not report.unchanged
    exchanges = {e["name"]: e for e in vhost.management.list_exchanges()}
    for exchange in topology.exchanges():
        shown = exchanges[exchange.name]
        assert shown["type"] == exchange.type.value and shown["durable"]
        assert shown["arguments"] == as_dict(exchange.arguments)
    queues = {q["name"]: q for q in vhost.management.list_queues()}
    for queue in topology.queues():
        assert queues[queue.name]["type"] == dict(queue.arguments)["x-queue-type"]
        assert queues[queue.name]["arguments"] == as_dict(queue.arguments)
    bindings = {
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in vhost.management.list_bindings()
    }
    for binding in topology.bindings():
        key = (binding.source, binding.destination, binding.destination_type, binding.routing_key)
        assert key in bindings
    policies = {p["name"]: p for p in vhost.management.list_policies()}
    for policy in topology.policies():
        assert policies[policy.name]["definition"] == as_dict(policy.definition)
        assert policies[policy.name]["pattern"] == policy.pattern
    await assert_policies_are_effective(topology, vhost.management)


async def assert_policies_are_effective(topology: Topology, management: ManagementClient) -> None:
    """Every queue runs under exactly the policy ``Topology.policy_for`` names (RabbitMQ
    applies the highest-priority match only), with exactly its values; the rest under none."""
    expected: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
    for queue in topology.queues():
        policy = topology.policy_for(queue.name)
        expected[queue.name] = (
            (policy.name, as_dict(policy.definition)) if policy is not None else (None, None)
        )
    shown: dict[str, Any] = {}

    def under_their_policies() -> bool:
        shown.update(
            (q["name"], (q.get("policy") or None, q.get("effective_policy_definition") or None))
            for q in management.list_queues()
        )
        return all(shown.get(name) == want for name, want in expected.items())

    try:
        await eventually(
            under_their_policies, timeout_s=STATS_WAIT_S, interval_s=0.5, what="policies"
        )
    except AssertionError:
        wrong = {n: shown.get(n) for n, want in expected.items() if shown.get(n) != want}
        raise AssertionError(f"queues not under their policy: {wrong}") from None


async def test_a_second_apply_changes_nothing(
    vhost: Vhost, channel: AbstractChannel, small: Topology
) -> None:
    # Given an applied topology with a task waiting in a queue
    await apply(small, vhost)
    before = snapshot(vhost.management)
    await publish(channel, names.TASKS_EXCHANGE, "demo.echo")

    # When it is applied again
    report = await apply(small, vhost)

    # Then nothing was created or updated, the broker looks the same, and the task is still there
    assert report.created == () and report.updated == () and not report.changed
    assert set(report.unchanged) == all_refs(small) and report.not_in_file == ()
    assert snapshot(vhost.management) == before
    message = await wait_for_message(channel, names.task_queue("demo.echo"))
    assert message.body == b"task"


async def test_objects_not_in_the_file_are_reported_and_kept(vhost: Vhost, tmp_path: Path) -> None:
    # Given the default topology applied, When a file without most of it is applied (db.query
    # keeps its 4 shards: a changed count is refused, see the test below)
    await apply(load_topology(DEFAULT_TOPOLOGY_PATH), vhost)
    path = tmp_path / "small4.toml"
    path.write_text(SMALL.replace("shards = 3", "shards = 4"))
    report = await apply(load_topology(path), vhost)

    # Then the rest is listed as "not in file", and still on the broker
    strays = {str(ref) for ref in report.not_in_file}
    assert "queue wayang.task.http.call" in strays
    assert "policy wayang.task.payment.charge" in strays  # an override of a capability gone
    assert "exchange wayang.shard.db.query" not in strays  # in both files
    assert vhost.management.get_queue(names.task_queue("http.call")) is not None
    assert vhost.management.get_policy(names.policy_name("payment.charge")) is not None


async def test_a_changed_shard_count_is_refused_and_points_to_reshard(
    vhost: Vhost, small: Topology
) -> None:
    # Given the default topology applied (db.query on 4 shards)
    await apply(load_topology(DEFAULT_TOPOLOGY_PATH), vhost)

    # When a file saying 3 shards is applied, Then it is refused before anything changes
    with pytest.raises(TopologyError) as refused:
        await apply(small, vhost)
    assert "has 4 shard queues on the broker and the file says shards = 3" in str(refused.value)
    assert "wayang-mq topology reshard db.query --to 3" in refused.value.one_line()
    assert vhost.management.get_queue(names.task_queue("db.query", 3)) is not None


async def test_a_changed_limit_updates_the_policy_in_place(
    vhost: Vhost, small: Topology, tmp_path: Path
) -> None:
    await apply(small, vhost)
    path = tmp_path / "bigger.toml"
    path.write_text(SMALL.replace("max_length = 1000", "max_length = 2000"))

    report = await apply(load_topology(path), vhost)

    assert ObjectRef("policy", DEFAULTS_POLICY) in report.updated
    assert report.created == ()
    policy = vhost.management.get_policy(DEFAULTS_POLICY)
    assert policy is not None and policy["definition"]["max-length"] == 2000


async def test_an_older_deployments_policies_are_replaced_in_place(
    vhost: Vhost, small: Topology
) -> None:
    # Given a deployment applied by an older version: one policy per capability, with a
    # dead-letter routing key, and one per dead queue
    older = {
        names.policy_name("demo.echo"): ("^wayang\\.task\\.demo\\.echo$", {"max-length": 5}),
        names.dead_queue("demo.echo"): ("^wayang\\.dead\\.demo\\.echo$", {"max-length": 5}),
    }
    for name, (pattern, definition) in older.items():
        vhost.management.put_policy(
            name, pattern=pattern, definition=definition, priority=10, apply_to="queues"
        )

    # When the current file is applied, twice
    report = await apply(small, vhost)
    again = await apply(small, vhost)

    # Then the old policies are gone, every queue is under the new ones, and the second apply
    # changes nothing
    assert {str(ref) for ref in report.removed} == {f"policy {name}" for name in older}
    assert all(vhost.management.get_policy(name) is None for name in older)
    assert not again.changed and again.removed == ()
    await assert_policies_are_effective(small, vhost.management)


async def test_a_queue_with_other_arguments_is_an_error_not_a_replacement(
    vhost: Vhost, channel: AbstractChannel, small: Topology
) -> None:
    # Given wayang.task.demo.echo already exists as a classic queue
    queue = names.task_queue("demo.echo")
    await channel.declare_queue(queue, durable=True)

    # When the topology is applied, Then it refuses, naming the queue and what to do
    with pytest.raises(TopologyError) as caught:
        await apply(small, vhost)
    assert queue in caught.value.message and "x-queue-type" in caught.value.message
    assert caught.value.hint is not None and "delete" in caught.value.hint
    shown = vhost.management.get_queue(queue)
    assert shown is not None and shown["type"] == "classic"  # left as it was


async def test_wrong_credentials_are_broker_unreachable(
    vhost: Vhost, small: Topology, rabbitmq: BrokerHandle
) -> None:
    bad_http = ManagementClient(
        rabbitmq.management_url, username=rabbitmq.username, password="wrong", vhost=vhost.name
    )
    with pytest.raises(BrokerUnreachable, match="401"):
        await apply_topology(small, vhost.amqp_url, bad_http)

    parts = urlsplit(vhost.amqp_url)
    bad_amqp = parts._replace(netloc=f"{parts.username}:wrong@{parts.hostname}:{parts.port}")
    with pytest.raises(BrokerUnreachable, match="refused the login") as caught:
        await apply_topology(small, bad_amqp.geturl(), vhost.management)
    assert "wrong" not in caught.value.one_line()  # the password is redacted


def test_the_default_vhost_travels_url_encoded(admin: ManagementClient, vhost: Vhost) -> None:
    # Given another vhost exists, the "/" client lists the exchanges of "/" only.
    assert admin.vhost == "/"
    exchanges = admin.list_exchanges()
    assert "amq.direct" in {e["name"] for e in exchanges}
    assert {e["vhost"] for e in exchanges} == {"/"}


# -- the topology at work -----------------------------------------------------------------


async def test_a_retry_comes_back_after_its_tier_delay(
    vhost: Vhost, channel: AbstractChannel, small: Topology
) -> None:
    # Given a fast and a slow tier, and a retry already waiting in the slow one
    await apply(small, vhost)
    fast = min(small.retry_tiers, key=lambda tier: tier.ttl_ms)
    await publish(channel, names.RETRY_EXCHANGE, names.retry_routing_key("slow", "demo.echo"))

    # When a retry is published to the fast tier
    key = names.retry_routing_key(fast.name, "demo.echo")
    await publish(channel, names.RETRY_EXCHANGE, key)

    # Then it reaches the capability's queue once the fast tier's TTL expired it (x-death
    # says so), with its retry routing key, not blocked behind the slow one
    message = await wait_for_message(channel, names.task_queue("demo.echo"))
    assert message.routing_key == key
    death = first_death(message)
    assert death["reason"] == "expired" and death["queue"] == fast.queue
    await message.ack()
    # The earlier, slower retry is still waiting in its own tier.
    slow = await channel.declare_queue(names.retry_queue("slow"), passive=True)
    assert slow.declaration_result.message_count == 1


def _collect(into: list[AbstractIncomingMessage]) -> Callable[[AbstractIncomingMessage], Any]:
    async def take(message: AbstractIncomingMessage) -> None:
        into.append(message)

    return take


def first_death(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The latest x-death entry RabbitMQ added when it dead-lettered the message."""
    deaths = message.headers.get("x-death")
    assert isinstance(deaths, list) and isinstance(deaths[0], dict)
    return dict(deaths[0])


async def test_a_retry_of_a_sharded_capability_returns_to_a_shard(
    vhost: Vhost, channel: AbstractChannel, small: Topology
) -> None:
    await apply(small, vhost)
    key = names.retry_routing_key("fast", "db.query")
    await publish(channel, names.RETRY_EXCHANGE, key, **{PARTITION_KEY_HEADER: "customer-7"})

    arrived = await first_message_in(channel, small.capability("db.query").task_queues)
    assert arrived.routing_key == key


async def test_one_partition_key_always_lands_on_one_shard(
    vhost: Vhost, channel: AbstractChannel, small: Topology
) -> None:
    await apply(small, vhost)
    keys = [f"customer-{n}" for n in range(12)]
    for _ in range(3):
        for key in keys:
            await publish(channel, names.TASKS_EXCHANGE, "db.query", **{PARTITION_KEY_HEADER: key})

    shard_of: dict[str, set[str]] = {key: set() for key in keys}
    for queue in small.capability("db.query").task_queues:
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count or 0
        taken: list[AbstractIncomingMessage] = []
        tag = await declared.consume(_collect(taken), no_ack=True)  # shards refuse basic.get
        await eventually(
            lambda n=count, got=taken: len(got) == n, what=f"{count} messages of {queue}"
        )
        await declared.cancel(tag)
        for message in taken:
            shard_of[str(message.headers[PARTITION_KEY_HEADER])].add(queue)
    assert all(len(shards) == 1 for shards in shard_of.values())  # order per key is kept
    assert len(set().union(*shard_of.values())) > 1  # and the keys are spread


async def test_a_rejected_retry_is_dead_lettered_under_its_capability(
    vhost: Vhost, channel: AbstractChannel, small: Topology
) -> None:
    # Given a task that came back from a retry tier (routing key retry.fast.demo.echo)
    await apply(small, vhost)
    await publish(channel, names.RETRY_EXCHANGE, names.retry_routing_key("fast", "demo.echo"))
    task = await wait_for_message(channel, names.task_queue("demo.echo"))

    # When the worker rejects it
    await task.reject(requeue=False)

    # Then it keeps its key, which wayang.dead.demo.echo is bound to on wayang.dlx
    dead = await wait_for_message(channel, names.dead_queue("demo.echo"))
    assert dead.routing_key == names.retry_routing_key("fast", "demo.echo")
    assert names.capability_of_key(dead.routing_key) == "demo.echo"
    assert first_death(dead)["reason"] == "rejected"


async def test_a_task_that_keeps_failing_stops_at_the_delivery_limit(
    vhost: Vhost, channel: AbstractChannel, small: Topology
) -> None:
    await apply(small, vhost)
    await publish(channel, names.TASKS_EXCHANGE, "demo.echo")
    limit = small.limits_for(small.capability("demo.echo")).delivery_limit

    for _ in range(limit + 1):  # the first delivery, then `limit` redeliveries
        task = await wait_for_message(channel, names.task_queue("demo.echo"))
        await task.nack(requeue=True)

    dead = await wait_for_message(channel, names.dead_queue("demo.echo"))
    assert first_death(dead)["reason"] == "delivery_limit"


# -- export -------------------------------------------------------------------------------


async def test_exported_definitions_import_to_what_apply_builds(
    make_vhost: Callable[[], Vhost], admin: ManagementClient
) -> None:
    # Given the default topology applied to one vhost
    topology = load_topology(DEFAULT_TOPOLOGY_PATH)
    applied = make_vhost()
    await apply(topology, applied)

    # When its export is imported (as the console's import does) into another, new vhost
    imported = make_vhost()
    admin.delete_vhost(imported.name)  # the import itself must create it
    admin.import_definitions(export_definitions(topology, vhost=imported.name))

    # Then the imported vhost holds exactly what apply built, policies effective included
    assert snapshot(imported.management) == snapshot(applied.management)
    await assert_policies_are_effective(topology, imported.management)
