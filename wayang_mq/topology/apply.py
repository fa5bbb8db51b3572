"""Apply a topology to a broker: create what is missing, leave everything else alone.

Exchanges, queues and bindings are declared over AMQP (declaring an existing object with the
same arguments is a no-op, so applying twice changes nothing); policies go through the
management API, the only way to set them. Nothing is deleted but the policies an earlier
version of the file made for capabilities it still lists and that the current one replaces
(``Topology.retired_policies``: per-capability policies now covered by ``wayang.defaults``,
per-dead-queue ones now ``wayang.dead-queues``), and only once their replacements are in
place. Other objects that look like ours but are not in the file are reported, for an
operator to decide.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aio_pika.exceptions import (
    AMQPConnectionError,
    AuthenticationError,
    ChannelClosed,
    ChannelPreconditionFailed,
    ProbableAuthenticationError,
)
from pamqp.common import FieldTable
from yarl import URL

from wayang_mq.amqp.endpoint import redact_url, split_urls, url_vhost
from wayang_mq.amqp.management import ManagementClient
from wayang_mq.amqp.tls import check_files, explain
from wayang_mq.core import names
from wayang_mq.core.errors import BrokerUnreachable, ConfigError, TopologyError
from wayang_mq.topology.spec import BindingSpec, Pairs, PolicySpec, Topology, as_dict

Kind = Literal["exchange", "queue", "binding", "policy"]

_CONNECT_TIMEOUT_S: Final = 10.0
_START_HINT: Final = "is the broker running? start one with `wayang-mq dev`"
_OURS: Final = "wayang."  # every name from names.py starts so
# Reply queues are declared at run time by each dispatcher: not in the file, not strays.
_RUNTIME_QUEUES: Final = names.reply_queue("")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One broker object, as the report names it."""

    kind: Kind
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class ApplyReport:
    """What ``apply_topology`` did, object by object."""

    created: tuple[ObjectRef, ...] = ()
    updated: tuple[ObjectRef, ...] = ()  # policies whose settings differed from the file
    removed: tuple[ObjectRef, ...] = ()  # policies the file replaced (retired_policies)
    unchanged: tuple[ObjectRef, ...] = ()
    not_in_file: tuple[ObjectRef, ...] = ()  # ours by name, absent from the file: kept

    @property
    def changed(self) -> bool:
        """True when the broker differs from before the apply."""
        return bool(self.created or self.updated or self.removed)

    def lines(self) -> list[str]:
        """One line per created, updated or stray object, then a count; for the CLI."""
        out = [f"created      {ref}" for ref in self.created]
        out += [f"updated      {ref}" for ref in self.updated]
        out += [f"removed      {ref} (replaced)" for ref in self.removed]
        out += [f"not in file  {ref} (left alone)" for ref in self.not_in_file]
        out.append(
            f"{len(self.created)} created, {len(self.updated)} updated,"
            f" {len(self.removed)} removed, {len(self.unchanged)} unchanged,"
            f" {len(self.not_in_file)} not in file"
        )
        return out


@dataclass(frozen=True, slots=True)
class _Existing:
    """What the management API listed before the apply."""

    exchange_types: frozenset[str]
    exchanges: frozenset[str]
    queues: frozenset[str]
    queue_arguments: Mapping[str, Mapping[str, Any]]
    bindings: frozenset[BindingSpec]
    policies: Mapping[str, Mapping[str, Any]]


async def apply_topology(
    topology: Topology, amqp_url: str, management: ManagementClient
) -> ApplyReport:
    """Make the broker hold every object of ``topology``; report what was created.

    ``amqp_url`` and ``management`` must address the same broker and vhost.
    """
    _check_same_vhost(amqp_url, management)
    existing = await asyncio.to_thread(_read_broker, management)
    _check_exchange_types(topology, existing)
    check_shards(topology, existing.queue_arguments)
    # Policies first: a queue created afterwards is governed (limits, dead-lettering) from
    # its very first message, with no window in which it is unbounded.
    policies = await asyncio.to_thread(_put_policies, topology, existing, management)
    removed = await asyncio.to_thread(_remove_retired, topology, existing, management)
    await _declare(topology, amqp_url)
    return _report(topology, existing, policies, removed)


def binding_ref(binding: BindingSpec) -> ObjectRef:
    """How the report names a binding."""
    arrow = f"{binding.source} -> {binding.destination} [{binding.routing_key}]"
    return ObjectRef("binding", arrow)


# -- before: what the broker has ---------------------------------------------------------


def _check_same_vhost(amqp_url: str, management: ManagementClient) -> None:
    vhost = url_vhost(amqp_url)
    if vhost != management.vhost:
        raise ConfigError(
            f"the AMQP URL names vhost {vhost!r} but the management client uses"
            f" {management.vhost!r}",
            hint="point both at the same vhost",
        )


def _read_broker(management: ManagementClient) -> _Existing:
    overview = management.overview()
    if not management.vhost_exists():
        raise TopologyError(
            f"vhost {management.vhost!r} does not exist on the broker",
            hint="create it with rabbitmqctl add_vhost, or fix the URL",
        )
    queue_arguments = {q["name"]: q.get("arguments") or {} for q in management.list_queues()}
    bindings = frozenset(
        BindingSpec(b["source"], b["destination"], b["routing_key"], b["destination_type"])
        for b in management.list_bindings()
        # Source "" is the default exchange's implicit binding of every queue.
        if b["source"] and not b.get("arguments")
    )
    return _Existing(
        exchange_types=frozenset(t["name"] for t in overview.get("exchange_types", [])),
        exchanges=frozenset(e["name"] for e in management.list_exchanges()),
        queues=frozenset(queue_arguments),
        queue_arguments=queue_arguments,
        bindings=bindings,
        policies={p["name"]: p for p in management.list_policies()},
    )


def _check_exchange_types(topology: Topology, existing: _Existing) -> None:
    for exchange in topology.exchanges():
        if exchange.type.value not in existing.exchange_types:
            raise TopologyError(
                f"exchange {exchange.name} needs type {exchange.type.value}, which the broker"
                " does not offer",
                hint="rabbitmq-plugins enable rabbitmq_consistent_hash_exchange",
            )


def check_shards(topology: Topology, queues: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse to apply a changed shard count, or onto shard queues without single active
    consumer: apply would add (or leave bound) shard queues under tasks already queued, and
    move keys between shards mid-flight. ``wayang-mq topology reshard`` moves them safely."""
    for capability in topology.capabilities:
        if not capability.sharded:
            continue
        found = existing_shards(capability.name, queues)
        if found and found != len(capability.task_queues):
            raise TopologyError(
                f"capability {capability.name} has {found} shard queues on the broker and the"
                f" file says shards = {capability.shards}",
                hint=f"run `wayang-mq topology reshard {capability.name} --to "
                f"{capability.shards}` (it moves the queued tasks), or change the file back",
            )
        for name in capability.task_queues[:found]:
            if not queues[name].get("x-single-active-consumer"):
                raise TopologyError(
                    f"shard queue {name} was declared without x-single-active-consumer "
                    "(before order per key held across workers), and a queue's arguments "
                    "cannot change in place",
                    hint=f"run `wayang-mq topology reshard {capability.name} --to "
                    f"{capability.shards}`: it rebuilds the shard queues, moving their tasks",
                )


def existing_shards(capability: str, queues: Iterable[str]) -> int:
    """How many shard queues ``capability`` has on the broker (0, 1, ... consecutively, as
    workers find them; a gap ends the count)."""
    present = set(queues)
    count = 0
    while names.task_queue(capability, count) in present:
        count += 1
    return count


# -- policies (management API) ------------------------------------------------------------


def _put_policies(
    topology: Topology, existing: _Existing, management: ManagementClient
) -> dict[str, Literal["created", "updated", "unchanged"]]:
    """PUT every policy that is missing or differs; say which was which."""
    outcome: dict[str, Literal["created", "updated", "unchanged"]] = {}
    for policy in topology.policies():
        current = existing.policies.get(policy.name)
        if current is not None and _same_policy(policy, current):
            outcome[policy.name] = "unchanged"
            continue
        management.put_policy(
            policy.name,
            pattern=policy.pattern,
            definition=as_dict(policy.definition),
            priority=policy.priority,
            apply_to=policy.apply_to,
        )
        outcome[policy.name] = "created" if current is None else "updated"
    return outcome


def _remove_retired(
    topology: Topology, existing: _Existing, management: ManagementClient
) -> tuple[str, ...]:
    """Delete the policies the file replaced (after their replacements were put)."""
    retired = tuple(sorted(topology.retired_policies() & set(existing.policies)))
    for name in retired:
        management.delete_policy(name)
    return retired


def _same_policy(policy: PolicySpec, current: Mapping[str, Any]) -> bool:
    return (
        current.get("pattern") == policy.pattern
        and current.get("definition") == as_dict(policy.definition)
        and current.get("priority") == policy.priority
        and current.get("apply-to") == policy.apply_to
    )


# -- exchanges, queues, bindings (AMQP) --------------------------------------------------


async def _declare(topology: Topology, amqp_url: str) -> None:
    connection = await connect_once(amqp_url)
    try:
        channel = await connection.channel()
        exchanges = await _declare_exchanges(channel, topology)
        queues = await _declare_queues(channel, topology)
        await _bind(topology.bindings(), exchanges, queues)
    finally:
        await connection.close()


async def connect_once(amqp_url: str) -> AbstractConnection:
    """A plain (not robust) connection for a one-off job to the first address that answers (a
    cluster: any node will do), or a one-line BrokerUnreachable."""
    check_files(amqp_url)
    failure: BrokerUnreachable | None = None
    for url in split_urls(amqp_url):
        # aio_pika.connect, closing a connection that failed (see amqp.connect.connect for why).
        connection = aio_pika.Connection(URL(url))
        try:
            await connection.connect(timeout=_CONNECT_TIMEOUT_S)
        except (AMQPConnectionError, OSError) as exc:  # TimeoutError is an OSError
            await connection.close()
            failure = failure or _unreachable(exc, url)
            continue
        return connection
    raise failure or _unreachable(OSError("no address"), amqp_url)


def _unreachable(exc: BaseException, amqp_url: str) -> BrokerUnreachable:
    explained = explain(exc, amqp_url)  # TLS and certificate-login failures
    if explained is not None:
        return explained
    where = redact_url(amqp_url)
    if isinstance(exc, AuthenticationError | ProbableAuthenticationError):
        return BrokerUnreachable(
            f"the broker at {where} refused the login",
            hint="check the username, password and vhost in the AMQP URL",
        )
    reason = str(exc) or type(exc).__name__
    return BrokerUnreachable(f"cannot reach the broker at {where}: {reason}", hint=_START_HINT)


async def _declare_exchanges(
    channel: AbstractChannel, topology: Topology
) -> dict[str, AbstractExchange]:
    declared: dict[str, AbstractExchange] = {}
    for spec in topology.exchanges():
        with _declaring("exchange", spec.name):
            declared[spec.name] = await channel.declare_exchange(
                spec.name, spec.type.value, durable=True, arguments=_field_table(spec.arguments)
            )
    return declared


async def _declare_queues(channel: AbstractChannel, topology: Topology) -> dict[str, AbstractQueue]:
    declared: dict[str, AbstractQueue] = {}
    for spec in topology.queues():
        with _declaring("queue", spec.name):
            declared[spec.name] = await channel.declare_queue(
                spec.name, durable=True, arguments=_field_table(spec.arguments)
            )
    return declared


async def _bind(
    bindings: Iterable[BindingSpec],
    exchanges: Mapping[str, AbstractExchange],
    queues: Mapping[str, AbstractQueue],
) -> None:
    for binding in bindings:
        source = exchanges[binding.source]
        with _declaring("binding", binding_ref(binding).name):
            if binding.destination_type == "exchange":
                await exchanges[binding.destination].bind(source, binding.routing_key)
            else:
                await queues[binding.destination].bind(source, binding.routing_key)


def _field_table(pairs: Pairs) -> FieldTable:
    return {key: value for key, value in pairs}


@contextlib.contextmanager
def _declaring(kind: Kind, name: str) -> Iterator[None]:
    """Turn the broker's refusal of one declaration into a TopologyError naming the object."""
    try:
        yield
    except ChannelPreconditionFailed as exc:
        # PRECONDITION_FAILED: the object exists with other arguments (e.g. a classic queue,
        # or a topic exchange where the file says x-consistent-hash). A queue's type and
        # arguments cannot change in place.
        raise TopologyError(
            f"{kind} {name} exists with different settings: {_broker_text(exc)}",
            hint=f"delete the {kind} (a queue's messages go with it) or change the file back",
        ) from None
    except ChannelClosed as exc:
        raise TopologyError(f"the broker refused {kind} {name}: {_broker_text(exc)}") from None


def _broker_text(exc: ChannelClosed) -> str:
    # aiormq keeps the broker's reply text ("inequivalent arg 'x-queue-type' ...") in args.
    texts = [a for a in exc.args if isinstance(a, str)]
    return texts[-1] if texts else str(exc)


# -- after: the report -------------------------------------------------------------------


def _report(
    topology: Topology,
    existing: _Existing,
    policies: Mapping[str, Literal["created", "updated", "unchanged"]],
    removed: tuple[str, ...] = (),
) -> ApplyReport:
    seen: dict[str, list[ObjectRef]] = {"created": [], "updated": [], "unchanged": []}

    def note(ref: ObjectRef, present: bool) -> None:
        seen["unchanged" if present else "created"].append(ref)

    for exchange in topology.exchanges():
        note(ObjectRef("exchange", exchange.name), exchange.name in existing.exchanges)
    for queue in topology.queues():
        note(ObjectRef("queue", queue.name), queue.name in existing.queues)
    for binding in topology.bindings():
        note(binding_ref(binding), binding in existing.bindings)
    for name, outcome in policies.items():
        seen[outcome].append(ObjectRef("policy", name))
    return ApplyReport(
        created=tuple(seen["created"]),
        updated=tuple(seen["updated"]),
        unchanged=tuple(seen["unchanged"]),
        removed=tuple(ObjectRef("policy", name) for name in removed),
        not_in_file=_strays(topology, existing, frozenset(removed)),
    )


def _strays(
    topology: Topology, existing: _Existing, removed: frozenset[str] = frozenset()
) -> tuple[ObjectRef, ...]:
    """Objects named like ours that the file does not list (bindings: between our objects)."""
    exchanges = {e.name for e in topology.exchanges()}
    queues = {q.name for q in topology.queues()}
    policies = {p.name for p in topology.policies()}
    bindings = set(topology.bindings())
    ours = exchanges | queues
    out = [ObjectRef("exchange", n) for n in sorted(existing.exchanges - exchanges) if _is_ours(n)]
    out += [
        ObjectRef("queue", n)
        for n in sorted(existing.queues - queues)
        if _is_ours(n) and not n.startswith(_RUNTIME_QUEUES)
    ]
    out += [
        binding_ref(b)
        for b in sorted(existing.bindings - bindings, key=lambda b: binding_ref(b).name)
        if b.source in ours and b.destination in ours
    ]
    out += [
        ObjectRef("policy", n)
        for n in sorted(set(existing.policies) - policies - removed)
        if _is_ours(n)
    ]
    return tuple(out)


def _is_ours(name: str) -> bool:
    return name.startswith(_OURS)
