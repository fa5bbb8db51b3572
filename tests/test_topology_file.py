"""The topology file and what it turns into, without a broker: pure logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wayang_mq.amqp.management import ManagementClient
from wayang_mq.core import names
from wayang_mq.core.errors import BrokerUnreachable, TopologyError
from wayang_mq.topology.export import export_definitions, write_definitions
from wayang_mq.topology.spec import (
    DEAD_QUEUES_POLICY,
    DEFAULT_TOPOLOGY_PATH,
    DEFAULTS_POLICY,
    PARTITION_KEY_HEADER,
    ExchangeType,
    Topology,
    as_dict,
    load_topology,
)

SPEC_CAPABILITIES = {
    "demo.echo",
    "demo.sleep",
    "demo.fail",
    "http.call",
    "db.query",
    "payment.charge",
    "payment.refund",
    "batch.run",
    "agent.reason",
    "approval.request",
}


@pytest.fixture(scope="module")
def default() -> Topology:
    return load_topology(DEFAULT_TOPOLOGY_PATH)


def _load(tmp_path: Path, text: str) -> Topology:
    path = tmp_path / "wayang.toml"
    path.write_text(text)
    return load_topology(path)


# -- the default file --------------------------------------------------------------------


def test_default_file_lists_the_spec_capabilities_and_a_sharded_one(default: Topology) -> None:
    assert {c.name for c in default.capabilities} == SPEC_CAPABILITIES
    assert default.capability("db.query").shards == 4
    assert [t.name for t in default.retry_tiers] == ["1s", "5s", "30s", "5m"]
    assert default.defaults.overflow == "reject-publish"
    assert default.defaults.dead_letter_strategy == "at-least-once"


def test_capability_overrides_replace_only_their_own_limits(default: Topology) -> None:
    limits = default.limits_for(default.capability("payment.charge"))
    assert (limits.max_length, limits.delivery_limit) == (10000, 3)
    assert default.limits_for(default.capability("http.call")) == default.defaults


def test_every_capability_gets_its_queues_dead_queue_and_policy(default: Topology) -> None:
    queues = {q.name for q in default.queues()}
    for capability in default.capabilities:
        assert set(capability.task_queues) <= queues
        assert names.dead_queue(capability.name) in queues
        for queue in capability.task_queues:
            policy = default.policy_for(queue)
            assert policy is not None
            definition = as_dict(policy.definition)
            assert definition["dead-letter-exchange"] == names.DEAD_LETTER_EXCHANGE
            # no dead-letter-routing-key: a dead letter keeps its task's key, bound below
            assert "dead-letter-routing-key" not in definition
            assert definition["dead-letter-strategy"] == "at-least-once"
            assert definition["overflow"] == "reject-publish"
            limits = default.limits_for(capability)
            assert definition["max-length"] == limits.max_length
            assert definition["delivery-limit"] == limits.delivery_limit
    types = {q.name: dict(q.arguments)["x-queue-type"] for q in default.queues()}
    # every queue is quorum but the history, a stream
    assert {name for name, kind in types.items() if kind != "quorum"} == {names.HISTORY_QUEUE}
    assert types[names.HISTORY_QUEUE] == "stream"
    # only the control plane's record and the shard queues have one active consumer at a time
    single_active = [q.name for q in default.queues() if len(q.arguments) > 1]
    shards = default.capability("db.query").task_queues
    assert single_active == [*shards, names.RECORD_QUEUE]
    assert all(
        dict(q.arguments)["x-single-active-consumer"] is True
        for q in default.queues()
        if q.name in single_active
    )


def test_one_defaults_policy_and_overrides_only_where_limits_differ(default: Topology) -> None:
    # Given the default file: three capabilities set their own limits
    policies = {p.name: p for p in default.policies()}
    defaults = policies[DEFAULTS_POLICY]
    # Then the defaults policy is the lowest of ours and covers every task queue
    assert defaults.priority < min(p.priority for p in policies.values() if p is not defaults)
    assert defaults.priority > 0  # above an operator's catch-all
    overrides = {
        name for name in policies if name.startswith("wayang.task.") and name != DEFAULTS_POLICY
    }
    assert overrides == {
        names.policy_name(c) for c in ("demo.fail", "payment.charge", "approval.request")
    }
    # and each override carries the whole set (RabbitMQ applies one policy, never merges)
    for name in overrides:
        assert set(as_dict(policies[name].definition)) == set(as_dict(defaults.definition))
    # a capability with no limits of its own is under the defaults
    assert default.policy_for(names.task_queue("http.call")) == defaults
    assert default.policy_for(names.task_queue("db.query", 2)) == defaults


def test_policies_that_set_overflow_also_set_a_length_bound(default: Topology) -> None:
    for policy in default.policies():
        definition = as_dict(policy.definition)
        if "overflow" in definition:
            assert {"max-length", "max-length-bytes"} & set(definition), policy.name


def test_every_queue_but_the_runtime_ones_has_a_policy(default: Topology) -> None:
    unpoliced = {q.name for q in default.queues() if default.policy_for(q.name) is None}
    # the record (bounded by its consumer), the claims and placement queues (consumed by the
    # control plane, never dead-lettered)
    assert unpoliced == {names.RECORD_QUEUE, names.CLAIMS_QUEUE, names.PLACE_QUEUE}


def test_retired_policies_are_the_old_per_capability_and_per_dead_queue_ones(
    default: Topology,
) -> None:
    retired = default.retired_policies()
    assert names.policy_name("http.call") in retired  # now under the defaults
    assert names.policy_name("payment.charge") not in retired  # still an override
    assert names.dead_queue("http.call") in retired  # now wayang.dead-queues
    assert not retired & {p.name for p in default.policies()}


def test_the_history_takes_nothing_from_the_flows_only_the_control_planes_appends(
    default: Topology,
) -> None:
    # a stream bound to the flows would take headers anyone may publish, some of which crash
    # RabbitMQ 3.10's stream conversion (and with it the publishing channel)
    assert not [b for b in default.bindings() if b.destination == names.HISTORY_QUEUE]
    assert [b for b in default.bindings() if b.destination == names.RECORD_QUEUE]
    policy = next(p for p in default.policies() if p.name == names.HISTORY_QUEUE)
    # bounded by age and size, with keys a 3.10 stream honours
    assert set(as_dict(policy.definition)) == {
        "max-age",
        "max-length-bytes",
        "stream-max-segment-size-bytes",
    }


def test_the_reaper_gets_a_copy_of_every_dead_letter(default: Topology) -> None:
    assert names.REAPER_QUEUE in {q.name for q in default.queues()}
    from_dlx = {
        (b.destination, b.routing_key)
        for b in default.bindings()
        if b.source == names.DEAD_LETTER_EXCHANGE
    }
    assert (names.REAPER_QUEUE, "#") in from_dlx
    # and every dead queue keeps its own bindings: dead letters stay there for inspection,
    # under the key their task had (new, or a retry that came due)
    for c in default.capabilities:
        dead = names.dead_queue(c.name)
        assert {(dead, c.name), (dead, names.retry_binding_for_capability(c.name))} <= from_dlx


def test_each_policy_pattern_matches_exactly_its_own_queues(default: Topology) -> None:
    queues = [q.name for q in default.queues()]
    overridden = {"demo.fail", "payment.charge", "approval.request"}
    governed = (
        {tier.queue: tier.queue for tier in default.retry_tiers}
        | {
            q: names.policy_name(c.name) if c.name in overridden else DEFAULTS_POLICY
            for c in default.capabilities
            for q in c.task_queues
        }
        | {names.dead_queue(c.name): DEAD_QUEUES_POLICY for c in default.capabilities}
        | {names.REAPER_QUEUE: names.REAPER_QUEUE}
        | {names.RECORD_REFUSED_QUEUE: names.RECORD_REFUSED_QUEUE}
        | {names.HISTORY_QUEUE: names.HISTORY_QUEUE}
    )
    for queue in queues:
        policy = default.policy_for(queue)
        assert (policy.name if policy else None) == governed.get(queue), queue


def test_dead_queues_are_bounded_in_bytes_and_refuse_rather_than_drop(default: Topology) -> None:
    # reject-publish: a full dead queue nacks, and the source queue's at-least-once
    # dead-lettering keeps the message until there is room (drop-head would lose the oldest)
    for capability in default.capabilities:
        policy = default.policy_for(names.dead_queue(capability.name))
        assert policy is not None and as_dict(policy.definition) == {
            "max-length-bytes": default.defaults.dead_max_bytes,
            "overflow": "reject-publish",
        }


def test_the_reaper_queue_is_bounded_without_stalling_dead_lettering(default: Topology) -> None:
    # drop-head: a full reaper queue drops its oldest copy (its twin stays in the dead queue)
    # instead of refusing, which would stall every task queue's at-least-once dead-lettering
    policy = default.policy_for(names.REAPER_QUEUE)
    assert policy is not None and as_dict(policy.definition) == {
        "max-length-bytes": default.defaults.dead_max_bytes,
        "overflow": "drop-head",
    }


def test_a_sharded_capability_hashes_on_the_partition_header(default: Topology) -> None:
    shard = names.shard_exchange("db.query")
    exchange = next(e for e in default.exchanges() if e.name == shard)
    assert exchange.type is ExchangeType.CONSISTENT_HASH
    assert as_dict(exchange.arguments) == {"hash-header": PARTITION_KEY_HEADER}
    bindings = default.bindings()
    into_shard = {(b.source, b.routing_key) for b in bindings if b.destination == shard}
    assert into_shard == {
        (names.TASKS_EXCHANGE, "db.query"),
        (names.TASKS_EXCHANGE, names.retry_binding_for_capability("db.query")),
    }
    out_of_shard = sorted((b.destination, b.routing_key) for b in bindings if b.source == shard)
    assert out_of_shard == [(names.task_queue("db.query", n), "1") for n in range(4)]


def test_retry_tiers_expire_back_to_the_tasks_exchange_keeping_the_key(default: Topology) -> None:
    policies = {p.name: as_dict(p.definition) for p in default.policies()}
    for tier in default.retry_tiers:
        definition = policies[tier.queue]
        assert definition["message-ttl"] == tier.ttl_ms
        assert definition["dead-letter-exchange"] == names.TASKS_EXCHANGE
        assert "dead-letter-routing-key" not in definition  # keeps retry.<tier>.<cap>
        assert definition["max-length"] == (tier.max_length or default.defaults.max_length)
        binding_keys = [b.routing_key for b in default.bindings() if b.destination == tier.queue]
        assert binding_keys == [names.retry_routing_key(tier.name, "#")]


def test_exported_definitions_hold_exactly_the_topology(default: Topology, tmp_path: Path) -> None:
    path = tmp_path / "definitions.json"
    write_definitions(default, path)
    document = json.loads(path.read_text())
    assert document == export_definitions(default)
    assert document["vhosts"] == [{"name": "/"}]
    assert [e["name"] for e in document["exchanges"]] == [e.name for e in default.exchanges()]
    assert [q["name"] for q in document["queues"]] == [q.name for q in default.queues()]
    assert len(document["bindings"]) == len(default.bindings())
    assert {p["name"] for p in document["policies"]} == {p.name for p in default.policies()}
    assert {
        item["vhost"] for key in ("exchanges", "queues", "bindings") for item in document[key]
    } == {"/"}


def test_a_minimal_file_gets_the_built_in_defaults(tmp_path: Path) -> None:
    topology = _load(tmp_path, '[capabilities."demo.echo"]\n')
    assert topology.defaults.max_length > 0 and topology.retry_tiers == ()
    assert [q.name for q in topology.queues()] == [
        "wayang.task.demo.echo",
        "wayang.dead.demo.echo",
        "wayang.reaper",
        "wayang.record",
        "wayang.record.refused",
        "wayang.history",
        "wayang.claims",
        "wayang.place",
    ]
    # executors' claims reach the control plane's queue, and nothing else does
    claims = [b for b in topology.bindings() if b.destination == "wayang.claims"]
    assert [(b.source, b.routing_key) for b in claims] == [("wayang.control", "claim.#")]


# -- malformed files: one line naming the file, the key and the problem -------------------

MALFORMED = [
    pytest.param("[defaults]\nmax_length = \n", "not valid TOML", "line 2, column", id="toml"),
    pytest.param("colour = 1\n", "colour", "unknown key", id="unknown-top-key"),
    pytest.param("[defaults]\nmax_lenght = 3\n", "defaults.max_lenght", "unknown key", id="typo"),
    pytest.param(
        '[capabilities."demo.echo"]\nshard = 3\n',
        'capabilities."demo.echo".shard',
        "unknown key",
        id="unknown-capability-key",
    ),
    pytest.param(
        '[capabilities."Demo Echo"]\n', '"Demo Echo"', "invalid capability name", id="bad-name"
    ),
    pytest.param('[capabilities."retry.x"]\n', '"retry.x"', "invalid capability", id="reserved"),
    pytest.param('[capabilities."place.x"]\n', '"place.x"', "may not be place", id="placed"),
    pytest.param("[capabilities.executor]\n", "executor", "may not be place", id="executor"),
    pytest.param(
        "[capabilities.demo.echo]\n", 'capabilities."demo".echo', "unknown key", id="unquoted"
    ),
    pytest.param(
        '[[retry_tiers]]\nname = "1s"\nttl_ms = 1000\n[[retry_tiers]]\nname = "1s"\nttl_ms = 9\n',
        "retry_tiers",
        "duplicate retry tier '1s'",
        id="duplicate-tier",
    ),
    pytest.param(
        '[[retry_tiers]]\nname = "1s"\n', "retry_tiers[0].ttl_ms", "missing", id="tier-no-ttl"
    ),
    pytest.param(
        '[capabilities."db.query"]\nshards = 0\n', ".shards", "must be at least 1", id="shards-0"
    ),
    pytest.param(
        '[capabilities."db.query"]\nshards = "4"\n', ".shards", "must be an integer", id="str"
    ),
    pytest.param(
        '[defaults]\noverflow = "drop-head"\n', "defaults", "needs overflow", id="drop-head"
    ),
    pytest.param(
        '[capabilities."db.query"]\nshards = 2\n[capabilities."db.query.1"]\n',
        "wayang.task.db.query.1",
        "share the queue",
        id="queue-collision",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), MALFORMED)
def test_malformed_file_is_one_clear_line(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    with pytest.raises(TopologyError) as caught:
        _load(tmp_path, text)
    message = caught.value.message
    assert message.startswith(str(tmp_path / "wayang.toml") + ": ")
    assert key in message and problem in message
    assert "\n" not in caught.value.one_line()
    assert "pydantic" not in message and "validation error" not in message.lower()


def test_an_unquoted_dotted_name_gets_a_hint_to_quote_it(tmp_path: Path) -> None:
    with pytest.raises(TopologyError) as caught:
        _load(tmp_path, "[capabilities.demo.echo]\n")
    assert caught.value.hint is not None and '[capabilities."demo.echo"]' in caught.value.hint


def test_a_missing_file_names_itself(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="topology file not found"):
        load_topology(tmp_path / "absent.toml")


# -- the management client, without a broker ----------------------------------------------


def test_management_client_hides_its_password() -> None:
    client = ManagementClient("http://127.0.0.1:1", username="ops", password="s3cret-pw")
    assert "s3cret-pw" not in repr(client) and "s3cret-pw" not in repr(client.for_vhost("x"))


def test_a_closed_port_is_broker_unreachable_with_a_hint() -> None:
    client = ManagementClient("http://127.0.0.1:9", username="guest", password="guest")
    with pytest.raises(BrokerUnreachable) as caught:
        client.overview()
    assert "127.0.0.1:9" in caught.value.message
    assert caught.value.hint is not None and "wayang-mq dev" in caught.value.hint


def test_a_topology_without_the_record_declares_no_queue_that_would_grow_unread(
    tmp_path: Path,
) -> None:
    topology = _load(tmp_path, '[defaults]\nrecord = false\n[capabilities."demo.echo"]\n')
    queues = {q.name for q in topology.queues()}
    assert not queues & {names.RECORD_QUEUE, names.RECORD_REFUSED_QUEUE, names.HISTORY_QUEUE}
    assert not [b for b in topology.bindings() if b.destination == names.RECORD_QUEUE]
    assert not [p for p in topology.policies() if p.name == names.HISTORY_QUEUE]
    # and the default file records
    assert names.RECORD_QUEUE in {q.name for q in load_topology(DEFAULT_TOPOLOGY_PATH).queues()}
