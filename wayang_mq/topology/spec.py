"""The declarative topology: one TOML file in, the RabbitMQ objects it stands for out.

``apply`` (``declare.py``) and ``export`` (``definitions.py``) both read the desired objects
from :class:`Topology`'s methods, so the broker and the definitions file cannot drift apart.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from wayang_mq.core import names
from wayang_mq.core.errors import TopologyError
from wayang_mq.core.retry import RetryTier
from wayang_mq.core.wire import PARTITION_KEY_HEADER

__all__ = [
    "DEFAULT_TOPOLOGY_PATH",
    "PARTITION_KEY_HEADER",
    "POLICY_PRIORITY",
    "QUORUM",
    "SHARD_WEIGHT",
    "STREAM",
    "ArgValue",
    "BindingSpec",
    "Capability",
    "ExchangeSpec",
    "ExchangeType",
    "Pairs",
    "PolicySpec",
    "QueueLimits",
    "QueueSpec",
    "RetryTier",
    "Topology",
    "as_dict",
    "exact_pattern",
    "load_topology",
    "parse_topology",
]

#: the default topology ships inside the package (the repository's topology/wayang.toml links
#: to it), so an installed wheel needs no WAYANG_TOPOLOGY
DEFAULT_TOPOLOGY_PATH: Final = Path(__file__).resolve().parent / "wayang.toml"

# PARTITION_KEY_HEADER (from the wire format, which the dispatcher fills in) is what a sharded
# capability's consistent-hash exchange hashes on, so tasks with one key land on one shard and
# keep their order. A message without it is not dropped: all such messages share one shard.

# Only one policy applies to a queue: the matching one with the highest priority (RabbitMQ
# never merges two). So the defaults policy (wayang.defaults, every task queue) sits lowest,
# and a capability whose limits differ gets an override (wayang.task.<cap>) one step above,
# carrying the whole set of keys, not just the ones that differ. Both sit above the default
# 0, so that a catch-all policy an operator adds does not silently replace them; an operator
# policy (``rabbitmqctl set_operator_policy``) still caps them.
DEFAULTS_PRIORITY: Final = 10
POLICY_PRIORITY: Final = 20
#: the policy every task queue gets unless its capability has an override
DEFAULTS_POLICY: Final = "wayang.defaults"
#: the one policy of every dead queue wayang.dead.<capability>
DEAD_QUEUES_POLICY: Final = "wayang.dead-queues"

# Consistent-hash binding keys are weights (the share of the hash ring), not patterns.
SHARD_WEIGHT: Final = "1"

# RabbitMQ's limit on exchange and queue names.
_MAX_NAME_BYTES: Final = 255

ArgValue = str | int | bool
Pairs = tuple[tuple[str, ArgValue], ...]


class ExchangeType(StrEnum):
    """The exchange types the fabric declares."""

    TOPIC = "topic"
    CONSISTENT_HASH = "x-consistent-hash"  # plugin rabbitmq_consistent_hash_exchange


# Queue type is the one thing a policy cannot set or change, so it is the only argument we
# declare; every tunable lives in a policy that operators can edit in the console.
QUORUM: Final[Pairs] = (("x-queue-type", "quorum"),)
# A stream keeps what it receives (consumers read from any offset, nothing is removed by
# reading); only its retention policy (age, bytes) lets old segments go.
STREAM: Final[Pairs] = (("x-queue-type", "stream"),)
# A shard queue has one active consumer at a time across every worker (the others stand by and
# take over, in order, when it goes): the tasks of one partition key run one after the other
# however many workers consume the shard. Like the queue type, it cannot change in place (a
# redeclare with another value is PRECONDITION_FAILED): `wayang-mq topology reshard` rebuilds.
SHARD_QUEUE: Final[Pairs] = (*QUORUM, ("x-single-active-consumer", True))

# A stream drops its oldest data a whole segment at a time, so the segment size is the
# granularity of max-length-bytes (3.10's default is 500 MB).
HISTORY_SEGMENT_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """A durable exchange the topology needs."""

    name: str
    type: ExchangeType
    arguments: Pairs = ()


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A durable queue the topology needs (quorum: replicated, delivery limits, safe DLX)."""

    name: str
    arguments: Pairs = QUORUM


@dataclass(frozen=True, slots=True)
class BindingSpec:
    """A binding from an exchange to a queue or (for shards) to another exchange."""

    source: str
    destination: str
    routing_key: str
    destination_type: Literal["queue", "exchange"] = "queue"


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A policy carrying the tunables of the queues its pattern matches."""

    name: str
    pattern: str
    definition: Pairs
    priority: int = POLICY_PRIORITY
    apply_to: Literal["queues"] = "queues"


def as_dict(pairs: Pairs) -> dict[str, ArgValue]:
    """Arguments or a policy definition as the dict AMQP and the HTTP API take."""
    return dict(pairs)


def exact_pattern(name: str) -> str:
    """A policy pattern matching exactly one queue name (patterns are unanchored regexes)."""
    return "^" + re.escape(name) + "$"


# TOML integers only: "4" or true for a count is a mistake to report, not to coerce.
Count = Annotated[int, Field(strict=True, ge=1)]
Limit = Annotated[int, Field(strict=True, ge=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class QueueLimits(_Frozen):
    """What bounds a capability queue; applied as a policy, so changeable without redeclaring."""

    max_length: Count = 100_000
    delivery_limit: Limit = 5
    overflow: Literal["reject-publish", "drop-head"] = "reject-publish"
    dead_letter_strategy: Literal["at-least-once", "at-most-once"] = "at-least-once"
    # The fabric's largest task body. Workers and the reaper refuse larger bodies (oversized),
    # and brokers started by `wayang-mq dev` and the tests set max_message_size to it, so a
    # larger body is refused by the broker before anyone holds it in memory.
    max_body_bytes: Count = 4 * 1024 * 1024
    # Bytes a dead-letter queue holds before it refuses more (overflow reject-publish). A
    # refused dead letter is not lost: at-least-once dead-lettering keeps it in its task queue
    # until the dead queue has room (inspect, replay or purge it).
    dead_max_bytes: Count = 1024 * 1024 * 1024
    # How long and how much the history stream (wayang.history) keeps, whichever is hit first.
    # An age is RabbitMQ's: a number and one of Y M D h m s ("7D", "12h").
    history_max_age: Annotated[str, Field(pattern=r"^[1-9][0-9]*[YMDhms]$")] = "7D"
    history_max_bytes: Count = 10 * 1024 * 1024 * 1024
    # The control plane's record (wayang.record bound to every flow, wayang.history): on by
    # default. Off, nothing is recorded, and no queue grows where no control plane runs.
    record: bool = True

    @model_validator(mode="after")
    def _at_least_once_needs_reject_publish(self) -> Self:
        # With drop-head RabbitMQ silently falls back to at-most-once dead-lettering.
        if self.dead_letter_strategy == "at-least-once" and self.overflow != "reject-publish":
            raise ValueError('dead_letter_strategy "at-least-once" needs overflow "reject-publish"')
        return self


class Capability(_Frozen):
    """A capability executors serve: one queue, or ``shards`` queues behind a hash exchange."""

    name: str
    shards: Count | None = None
    max_length: Count | None = None
    delivery_limit: Limit | None = None
    overflow: Literal["reject-publish", "drop-head"] | None = None
    dead_letter_strategy: Literal["at-least-once", "at-most-once"] | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not names.valid_capability(name):
            raise ValueError(
                f"invalid capability name {name!r}: use dotted lowercase words like http.call"
                " (the first word may not be retry)"
            )
        if name.split(".", 1)[0] in names.PLACEMENT_WORDS:
            raise ValueError(
                f"invalid capability name {name!r}: the first word may not be "
                f"{' or '.join(names.PLACEMENT_WORDS)} (placement routing keys begin with them)"
            )
        return name

    @property
    def sharded(self) -> bool:
        """True when tasks go through a consistent-hash exchange to several queues."""
        return self.shards is not None

    @property
    def task_queues(self) -> tuple[str, ...]:
        """The queues executors of this capability consume."""
        if self.shards is None:
            return (names.task_queue(self.name),)
        return tuple(names.task_queue(self.name, n) for n in range(self.shards))

    @property
    def task_routing_keys(self) -> tuple[str, str]:
        """Keys on ``wayang.tasks`` that reach the capability: new tasks and expired retries."""
        return (self.name, names.retry_binding_for_capability(self.name))


#: the [defaults] a capability may set for itself (its own policy then carries the whole set)
_OVERRIDABLE: Final = {"max_length", "delivery_limit", "overflow", "dead_letter_strategy"}


class Topology(_Frozen):
    """The whole declarative topology, validated; its methods list the RabbitMQ objects."""

    defaults: QueueLimits = QueueLimits()
    retry_tiers: tuple[RetryTier, ...] = ()
    capabilities: tuple[Capability, ...] = ()

    @field_validator("capabilities", mode="before")
    @classmethod
    def _named_tables(cls, value: Any) -> Any:
        # In TOML capabilities are tables keyed by name; the key becomes Capability.name.
        if not isinstance(value, Mapping):
            return value
        tables = []
        for name, table in value.items():
            if isinstance(table, Mapping) and "name" in table:
                raise ValueError(f'[capabilities."{name}"] has an unknown key: name')
            tables.append({"name": name, **table} if isinstance(table, Mapping) else table)
        return tables

    @field_validator("retry_tiers")
    @classmethod
    def _unique_tiers(cls, tiers: tuple[RetryTier, ...]) -> tuple[RetryTier, ...]:
        twice = [name for name, n in Counter(t.name for t in tiers).items() if n > 1]
        if twice:
            raise ValueError(f"duplicate retry tier {twice[0]!r}")
        return tiers

    @model_validator(mode="after")
    def _names_do_not_collide(self) -> Self:
        _check_names(self)
        return self

    def capability(self, name: str) -> Capability:
        """The capability called ``name`` (KeyError when the file does not list it)."""
        for capability in self.capabilities:
            if capability.name == name:
                return capability
        raise KeyError(name)

    def limits_for(self, capability: Capability) -> QueueLimits:
        """The defaults with the capability's own overrides."""
        overrides = capability.model_dump(include=_OVERRIDABLE)
        return self.defaults.model_copy(
            update={k: v for k, v in overrides.items() if v is not None}
        )

    @model_validator(mode="after")
    def _overrides_hold_together(self) -> Self:
        for capability in self.capabilities:
            # the same rule as for [defaults], on what the capability ends up with
            limits = self.limits_for(capability)
            if (
                limits.dead_letter_strategy == "at-least-once"
                and limits.overflow != "reject-publish"
            ):
                raise ValueError(
                    f'capability {capability.name!r}: dead_letter_strategy "at-least-once" needs'
                    ' overflow "reject-publish" (set dead_letter_strategy = "at-most-once" too)'
                )
        return self

    def exchanges(self) -> tuple[ExchangeSpec, ...]:
        """Every exchange: the seven fabric exchanges, then one hash exchange per sharded cap."""
        core = (
            names.TASKS_EXCHANGE,
            names.RESULTS_EXCHANGE,
            names.EVENTS_EXCHANGE,
            names.CONTROL_EXCHANGE,
            names.RETRY_EXCHANGE,
            names.DEAD_LETTER_EXCHANGE,
            names.DEAD_COPY_EXCHANGE,
        )
        shards = tuple(
            ExchangeSpec(
                names.shard_exchange(c.name),
                ExchangeType.CONSISTENT_HASH,
                (("hash-header", PARTITION_KEY_HEADER),),
            )
            for c in self.capabilities
            if c.sharded
        )
        return tuple(ExchangeSpec(name, ExchangeType.TOPIC) for name in core) + shards

    def queues(self) -> tuple[QueueSpec, ...]:
        """Every queue: task queues (or shards), dead-letter queues, retry tiers, the reaper's
        queue, the record (all quorum) and the history (a stream)."""
        out: list[QueueSpec] = []
        for capability in self.capabilities:
            arguments = SHARD_QUEUE if capability.sharded else QUORUM
            out.extend(QueueSpec(name, arguments) for name in capability.task_queues)
            out.append(QueueSpec(names.dead_queue(capability.name)))
        out.extend(QueueSpec(tier.queue) for tier in self.retry_tiers)
        # The reaper's queue takes a copy of every dead letter. Declared here, not by the
        # reaper, so dead letters produced before a reaper first runs are kept for it.
        out.append(QueueSpec(names.REAPER_QUEUE))
        # The control plane's record: bound to every flow, consumed by one control plane at a
        # time (single active consumer: the others stand by). Declared here, so what flows
        # before a control plane first runs is recorded when it does.
        if self.defaults.record:
            out.append(QueueSpec(names.RECORD_QUEUE, (*QUORUM, ("x-single-active-consumer", True))))
            out.append(QueueSpec(names.RECORD_REFUSED_QUEUE))
            # The history: what the control plane recorded, kept as a stream for replay.
            out.append(QueueSpec(names.HISTORY_QUEUE, STREAM))
        # Executors' claims (wayang-mq worker --claims), for whichever control plane is up.
        out.append(QueueSpec(names.CLAIMS_QUEUE))
        # Tasks whose policy needs particular executors, for the control plane to place.
        out.append(QueueSpec(names.PLACE_QUEUE))
        return tuple(out)

    def bindings(self) -> tuple[BindingSpec, ...]:
        """Every binding: tasks and retries to capabilities, dead letters (the broker's and the
        workers' own copies), retry tiers, and every broker dead letter to the reaper."""
        out: list[BindingSpec] = []
        for capability in self.capabilities:
            out.extend(_task_bindings(capability))
            dead = names.dead_queue(capability.name)
            # The broker's dead letters keep their task's key: new (<cap>) or retried.
            out.extend(
                BindingSpec(names.DEAD_LETTER_EXCHANGE, dead, key)
                for key in capability.task_routing_keys
            )
            # wayang.dead is not bound to the reaper: a worker answered its copy itself.
            out.append(BindingSpec(names.DEAD_COPY_EXCHANGE, dead, capability.name))
        # retry.<tier>.# : the tier word picks the queue, whatever the capability after it.
        out.extend(
            BindingSpec(names.RETRY_EXCHANGE, tier.queue, names.retry_routing_key(tier.name, "#"))
            for tier in self.retry_tiers
        )
        out.append(
            BindingSpec(names.DEAD_LETTER_EXCHANGE, names.REAPER_QUEUE, names.ALL_DEAD_LETTERS)
        )
        if self.defaults.record:
            out.extend(self._record_bindings())
        # wayang.history has no binding: the control plane appends what it recorded (a stream
        # bound to the flows would take hostile headers that crash RabbitMQ 3.10's conversion).
        out.append(BindingSpec(names.CONTROL_EXCHANGE, names.CLAIMS_QUEUE, "claim.#"))
        out.extend(BindingSpec(names.TASKS_EXCHANGE, names.PLACE_QUEUE, k) for k in PLACED)
        return tuple(out)

    def _record_bindings(self, queue: str = names.RECORD_QUEUE) -> list[BindingSpec]:
        """The control plane's record sees every flow, but tasks, retries and dead copies only
        with the keys the fabric's own queues take: a task for a capability nobody serves
        must stay unroutable (the dispatcher's mandatory publish reports it as no_executor)."""
        out = [BindingSpec(exchange, queue, key) for exchange, key in RECORDED_FLOWS]
        out.extend(BindingSpec(names.TASKS_EXCHANGE, queue, k) for k in PLACED)
        for capability in self.capabilities:
            for key in capability.task_routing_keys:
                out.append(BindingSpec(names.TASKS_EXCHANGE, queue, key))
            out.append(BindingSpec(names.DEAD_COPY_EXCHANGE, queue, capability.name))
        out.extend(
            BindingSpec(names.RETRY_EXCHANGE, queue, names.retry_routing_key(t.name, "#"))
            for t in self.retry_tiers
        )
        return out

    def policies(self) -> tuple[PolicySpec, ...]:
        """The defaults of every task queue, an override per capability whose limits differ,
        one policy for every dead queue, one for the reaper's queue, one per retry tier, one
        bounding the record's refusals and one bounding the history."""
        return (
            (self._defaults_policy(),)
            + tuple(self._capability_policy(c) for c in self.capabilities if self._overrides(c))
            + (self._dead_policy(), self._reaper_policy())
            + tuple(self._tier_policy(t) for t in self.retry_tiers)
            + ((self._refused_policy(), self._history_policy()) if self.defaults.record else ())
        )

    def policy_for(self, queue: str) -> PolicySpec | None:
        """The policy of ours that governs ``queue`` (the highest priority match), if any."""
        matching = [p for p in self.policies() if re.search(p.pattern, queue)]
        return max(matching, key=lambda p: p.priority, default=None)

    def retired_policies(self) -> frozenset[str]:
        """Policy names earlier versions of this file made for the capabilities it lists
        (one per capability, one per dead queue) that the current file no longer has:
        ``topology apply`` deletes them once the policies replacing them are in place."""
        made = {names.policy_name(c.name) for c in self.capabilities}
        made |= {names.dead_queue(c.name) for c in self.capabilities}
        return frozenset(made - {p.name for p in self.policies()})

    def _overrides(self, capability: Capability) -> bool:
        return self.limits_for(capability) != self.defaults

    def _history_policy(self) -> PolicySpec:
        # Only keys streams honour in 3.10 (rabbit_stream_queue:capabilities/0 lists
        # max-length, overflow, dead-lettering... as unsupported). Whichever bound is hit
        # first drops the oldest segments: a rebuild can only replay what is still kept.
        queue = names.HISTORY_QUEUE
        definition: Pairs = (
            ("max-age", self.defaults.history_max_age),
            ("max-length-bytes", self.defaults.history_max_bytes),
            ("stream-max-segment-size-bytes", HISTORY_SEGMENT_BYTES),
        )
        return PolicySpec(queue, exact_pattern(queue), definition)

    def _refused_policy(self) -> PolicySpec:
        # What the control plane refused is kept for people to look at, within a bound: the
        # oldest goes first (garbage anyone can publish must not fill the broker).
        queue = names.RECORD_REFUSED_QUEUE
        definition: Pairs = (
            ("overflow", "drop-head"),
            ("max-length-bytes", self.defaults.dead_max_bytes),
        )
        return PolicySpec(queue, exact_pattern(queue), definition)

    def _dead_policy(self) -> PolicySpec:
        # Bounded in bytes; reject-publish refuses (and nacks) what does not fit, which the
        # sources' at-least-once dead-lettering retries until there is room: never dropped.
        definition: Pairs = (
            ("max-length-bytes", self.defaults.dead_max_bytes),
            ("overflow", "reject-publish"),
        )
        pattern = "^" + re.escape(names.dead_queue(""))
        return PolicySpec(DEAD_QUEUES_POLICY, pattern, definition)

    def _reaper_policy(self) -> PolicySpec:
        # The reaper's copy of every broker dead letter, bounded in bytes for a fabric where no
        # reaper runs. drop-head, not reject-publish: a full reaper queue must not stall the
        # task queues' at-least-once dead-lettering; what it drops is the oldest unanswered
        # copy, whose twin stays in wayang.dead.<capability>.
        queue = names.REAPER_QUEUE
        definition: Pairs = (
            ("max-length-bytes", self.defaults.dead_max_bytes),
            ("overflow", "drop-head"),
        )
        return PolicySpec(queue, exact_pattern(queue), definition)

    def _task_definition(self, limits: QueueLimits) -> Pairs:
        # Every key here is one quorum queues honour in 3.10: a policy holding any key the
        # queue type does not support (e.g. queue-mode) is not applied to the queue at all.
        # No dead-letter-routing-key: a dead letter keeps its task's key (<cap>, or
        # retry.<tier>.<cap> for a retry that came due), both bound to wayang.dead.<cap>, so
        # one policy serves every capability.
        return (
            ("max-length", limits.max_length),
            ("overflow", limits.overflow),
            ("delivery-limit", limits.delivery_limit),
            ("dead-letter-exchange", names.DEAD_LETTER_EXCHANGE),
            ("dead-letter-strategy", limits.dead_letter_strategy),
        )

    def _defaults_policy(self) -> PolicySpec:
        pattern = "^" + re.escape(names.task_queue(""))
        return PolicySpec(
            DEFAULTS_POLICY, pattern, self._task_definition(self.defaults), DEFAULTS_PRIORITY
        )

    def _capability_policy(self, capability: Capability) -> PolicySpec:
        definition = self._task_definition(self.limits_for(capability))
        return PolicySpec(
            names.policy_name(capability.name), names.policy_pattern(capability.name), definition
        )

    def _tier_policy(self, tier: RetryTier) -> PolicySpec:
        # No dead-letter-routing-key: an expired retry keeps retry.<tier>.<cap>, which
        # wayang.tasks routes to the capability's retry.*.<cap> binding. at-least-once needs
        # overflow reject-publish, which only means something with a max-length: a tier
        # without its own is bounded like a task queue.
        definition: Pairs = (
            ("message-ttl", tier.ttl_ms),
            ("dead-letter-exchange", names.TASKS_EXCHANGE),
            ("dead-letter-strategy", self.defaults.dead_letter_strategy),
            ("overflow", self.defaults.overflow),
            ("max-length", tier.max_length or self.defaults.max_length),
        )
        return PolicySpec(tier.queue, exact_pattern(tier.queue), definition)


#: what the control plane records whatever its key (tasks, retries and dead copies are bound
#: per capability and tier, see Topology._record_bindings)
RECORDED_FLOWS: Final[tuple[tuple[str, str], ...]] = (
    (names.RESULTS_EXCHANGE, "#"),
    (names.EVENTS_EXCHANGE, "#"),
    (names.CONTROL_EXCHANGE, "cancel.#"),
    (names.DEAD_LETTER_EXCHANGE, "#"),
)


#: keys on wayang.tasks of tasks for the control plane to place (placed tasks and their retries
#: come due); a placed copy (executor.<id>) is not recorded again
PLACED: Final = names.PLACE_BINDINGS


def _task_bindings(capability: Capability) -> list[BindingSpec]:
    keys = capability.task_routing_keys
    if not capability.sharded:
        (queue,) = capability.task_queues
        return [BindingSpec(names.TASKS_EXCHANGE, queue, key) for key in keys]
    # Sharded: wayang.tasks -> wayang.shard.<cap> (exchange-to-exchange), which hashes each
    # message onto one of its equally weighted queues.
    shard = names.shard_exchange(capability.name)
    out = [BindingSpec(names.TASKS_EXCHANGE, shard, key, "exchange") for key in keys]
    out.extend(BindingSpec(shard, queue, SHARD_WEIGHT) for queue in capability.task_queues)
    return out


def _check_names(topology: Topology) -> None:
    """Reject capabilities that would share a queue or a policy (a.b.0 vs the shards of a.b)."""
    queues = [q.name for q in topology.queues()]
    twice = [name for name, n in Counter(queues).items() if n > 1]
    if twice:
        raise ValueError(f"two capabilities would share the queue {twice[0]}; rename one")
    for name in queues + [e.name for e in topology.exchanges()]:
        if len(name.encode()) > _MAX_NAME_BYTES:
            raise ValueError(f"name {name[:40]}... is longer than RabbitMQ's 255 bytes")
    for capability in topology.capabilities:
        pattern = re.compile(names.policy_pattern(capability.name))
        stray = [q for q in queues if pattern.search(q) and q not in capability.task_queues]
        if stray:
            raise ValueError(
                f"the policy of {capability.name!r} would also govern {stray[0]}; rename one"
            )


def load_topology(path: Path) -> Topology:
    """Read and validate a topology file; every mistake is one TopologyError line."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TopologyError(
            f"{path}: topology file not found",
            hint="pass --topology or set WAYANG_TOPOLOGY",
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"{path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        # The message carries the position: "... (at line 3, column 7)".
        raise TopologyError(f"{path}: not valid TOML: {exc}", hint=_FIX) from exc
    return parse_topology(raw, source=str(path))


def parse_topology(raw: Mapping[str, Any], *, source: str = "<topology>") -> Topology:
    """Validate already-parsed TOML (``source`` names it in errors)."""
    try:
        return Topology.model_validate(raw)
    except ValidationError as exc:
        raise _topology_error(exc, raw, source) from None


_FIX = "fix the file and run again"
_QUOTE_HINT = 'quote dotted capability names: [capabilities."demo.echo"]'


def _topology_error(exc: ValidationError, raw: Mapping[str, Any], source: str) -> TopologyError:
    """One line out of pydantic's report: the file, the key, what is wrong."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    key = _key_path(first["loc"], raw)
    where = f"{source}: {key}: " if key else f"{source}: "
    # A capability written unquoted ([capabilities.demo.echo]) nests "echo" inside "demo".
    nested = first["type"] == "extra_forbidden" and isinstance(first["input"], Mapping)
    return TopologyError(where + _problem(first) + more, hint=_QUOTE_HINT if nested else _FIX)


def _problem(error: ErrorDetails) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing"
    if kind in {"model_type", "dict_type", "model_attributes_type"}:
        return "must be a table"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind in {"tuple_type", "list_type"}:
        example = (
            '[capabilities."http.call"]' if error["loc"][0] == "capabilities" else "[[retry_tiers]]"
        )
        return f"must be tables like {example}"
    if kind == "int_type":
        return f"must be an integer (got {error['input']!r})"
    if kind == "greater_than_equal":
        return f"must be at least {error.get('ctx', {}).get('ge')} (got {error['input']!r})"
    return f"{msg.replace('Input should be', 'must be')} (got {error['input']!r})"


def _key_path(loc: tuple[int | str, ...], raw: Mapping[str, Any]) -> str:
    """Render a pydantic location as the TOML key the operator wrote."""
    parts: list[str] = []
    items = list(loc)
    if items[:1] == ["capabilities"] and len(items) > 1 and isinstance(items[1], int):
        tables = raw.get("capabilities")
        cap_names = list(tables) if isinstance(tables, Mapping) else []
        index = items[1]
        name = cap_names[index] if index < len(cap_names) else str(index)
        parts.append(f'capabilities."{name}"')
        items = [k for k in items[2:] if k != "name"]  # the key *is* the name
    elif items[:1] == ["retry_tiers"] and len(items) > 1 and isinstance(items[1], int):
        parts.append(f"retry_tiers[{items[1]}]")
        items = items[2:]
    parts.extend(str(k) for k in items)
    return ".".join(parts)
