"""Every RabbitMQ name the fabric uses, built in one place (the names are a public contract)."""

from __future__ import annotations

import os
import re
import socket

TASKS_EXCHANGE = "wayang.tasks"
RESULTS_EXCHANGE = "wayang.results"
EVENTS_EXCHANGE = "wayang.events"
CONTROL_EXCHANGE = "wayang.control"
RETRY_EXCHANGE = "wayang.retry"
DEAD_LETTER_EXCHANGE = "wayang.dlx"
# Where a worker puts its own dead copies of input it refused. Not wayang.dlx: only the
# broker's dead-lettering (which checks no user permission) reaches wayang.dlx and so the
# reaper; no account may publish there. This one routes to wayang.dead.<capability> only.
DEAD_COPY_EXCHANGE = "wayang.dead"

# Capabilities are dotted lowercase words (``http.call``); ``retry`` is reserved as a first
# word because retry routing keys are ``retry.<tier>.<capability>``.
_CAPABILITY = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")
_WORD = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


CAPABILITY_CHARS = 128  # retry.<tier>.<capability> and queue names stay well under 255 bytes


def valid_capability(capability: str) -> bool:
    """True when ``capability`` can be used as a routing key and a queue-name suffix."""
    return (
        len(capability) <= CAPABILITY_CHARS
        and bool(_CAPABILITY.match(capability))
        and not capability.startswith("retry.")
    )


def valid_word(word: str) -> bool:
    """True for one routing-key word (tier names, executor and dispatcher ids)."""
    return bool(_WORD.match(word))


def default_id(prefix: str = "") -> str:
    """``[prefix-]host-pid`` made a valid id: a host named ``ip-10-0-0-1.ec2.internal`` or
    ``MyHost`` is lowercased and every character an id may not hold becomes ``-``, so a
    daemon started without ``--id`` never refuses to start over its machine's name."""
    host = re.sub(r"[^a-z0-9_-]+", "-", socket.gethostname().lower()).strip("-_") or "host"
    return "-".join(part for part in (prefix, host, str(os.getpid())) if part)


def task_queue(capability: str, shard: int | None = None) -> str:
    """The quorum queue executors consume for a capability (or one shard of it)."""
    base = f"wayang.task.{capability}"
    return base if shard is None else f"{base}.{shard}"


def shard_exchange(capability: str) -> str:
    """The consistent-hash exchange that spreads a sharded capability over its queues."""
    return f"wayang.shard.{capability}"


def reshard_queue(capability: str) -> str:
    """Where ``wayang-mq topology reshard`` holds a sharded capability's tasks while it
    rebuilds the shard queues (it exists only during a reshard, or after one that stopped)."""
    return f"wayang.reshard.{capability}"


def retry_queue(tier: str) -> str:
    """The fixed-TTL queue of one retry tier."""
    return f"wayang.retry.{tier}"


def retry_routing_key(tier: str, capability: str) -> str:
    """Routing key of a delayed retry: selects the tier, then routes back to the capability."""
    return f"retry.{tier}.{capability}"


def retry_binding_for_capability(capability: str) -> str:
    """Binding on ``wayang.tasks`` that brings any tier's expired retry back to the capability."""
    return f"retry.*.{capability}"


def capability_of_key(routing_key: str) -> str:
    """The capability a task's routing key names: ``<capability>``, or
    ``retry.<tier>.<capability>`` for a retry that came due. A dead letter keeps the key its
    task had (the task queues' policies set no ``dead-letter-routing-key``)."""
    if routing_key.startswith("retry."):
        parts = routing_key.split(".", 2)
        if len(parts) == 3:
            return parts[2]
    return routing_key


def dead_queue(capability: str) -> str:
    """Where a capability's dead letters wait for inspection and replay."""
    return f"wayang.dead.{capability}"


# The reaper's own queue: bound to wayang.dlx with "#", so it gets a copy of every dead letter
# the broker makes (wayang.dead.<capability> keeps the other copy, for inspection and replay).
# Workers' own dead copies go to wayang.dead instead, which does not reach it.
REAPER_QUEUE = "wayang.reaper"
#: the control plane's record of every flow (single active consumer), and what it refused
RECORD_QUEUE = "wayang.record"
RECORD_REFUSED_QUEUE = "wayang.record.refused"
#: a stream (append-only, read from any offset) the control plane appends what it recorded to:
#: the history that `wayang-mq events` reads and `wayang-mq db rebuild` replays
HISTORY_QUEUE = "wayang.history"
#: the control plane's claims: executors ask there whether a task may run (see claim_key)
CLAIMS_QUEUE = "wayang.claims"
ALL_DEAD_LETTERS = "#"


#: the control plane's placement queue: tasks whose policy needs particular executors
PLACE_QUEUE = "wayang.place"
#: what it is bound to on wayang.tasks: new placed tasks, and their retries come due
PLACE_BINDINGS = ("place.#", "retry.*.place.#")
#: first words a served capability may not start with: its keys would reach wayang.place or
#: an executor's own queue (the wire allows them; the topology refuses to serve them)
PLACEMENT_WORDS = ("place", "executor")


def place_routing_key(capability: str) -> str:
    """Routing key on ``wayang.tasks`` of a task whose policy needs particular executors."""
    return f"place.{capability}"


def executor_queue(executor_id: str) -> str:
    """One executor's own queue: the tasks the control plane placed on it."""
    return f"wayang.executor.{executor_id}"


def executor_routing_key(executor_id: str) -> str:
    """Routing key on ``wayang.tasks`` of a task placed on one executor."""
    return f"executor.{executor_id}"


def noreply_routing_key(capability: str) -> str:
    """Where a result goes on ``wayang.results`` when its task named no reply address."""
    return f"noreply.{capability}"


def reply_queue(dispatcher_id: str) -> str:
    """One dispatcher's result queue."""
    return f"wayang.reply.{dispatcher_id}"


def progress_queue(dispatcher_id: str) -> str:
    """A dispatcher's exclusive queue of the progress events of the tasks its callers watch
    (bound to ``progress.<task id>`` on ``wayang.events``, one key per watched task)."""
    return f"wayang.progress.{dispatcher_id}"


def valid_reply_address(reply_to: str) -> bool:
    """True for an address results may be published to: ``reply.<dispatcher id>`` (what
    executor accounts may publish results under; anything else would be refused by the
    broker, closing the executor's channel)."""
    prefix, _, word = reply_to.partition(".")
    return prefix == "reply" and valid_word(word)


def reply_routing_key(dispatcher_id: str) -> str:
    """The reply address a dispatcher puts in ``reply_to``."""
    return f"reply.{dispatcher_id}"


def policy_name(capability: str) -> str:
    """The RabbitMQ policy that carries a capability's tunables."""
    return f"wayang.task.{capability}"


def policy_pattern(capability: str) -> str:
    """Regex matching the capability's queue and its shard queues, and nothing else."""
    return "^" + re.escape(task_queue(capability)) + r"(\.[0-9]+)?$"


def event_key(kind: str, subject: str) -> str:
    """Routing key on ``wayang.events``: ``heartbeat.<executor>``, ``progress.<task>``, ..."""
    return f"{kind}.{subject}"


def cancel_key(task_id: str) -> str:
    """Routing key of a cancel request on ``wayang.control``."""
    return f"cancel.{task_id}"


def status_key(task_id: str) -> str:
    """Routing key of a status request on ``wayang.control``."""
    return f"status.{task_id}"


def status_reply_key(requester_id: str) -> str:
    """Where executors answer one requester's status requests, on ``wayang.control``."""
    return f"status-reply.{requester_id}"


def claim_key(capability: str) -> str:
    """Routing key of an executor's claim on ``wayang.control`` (to ``wayang.claims``)."""
    return f"claim.{capability}"


def claim_reply_key(executor_id: str) -> str:
    """Where the control plane answers one executor's claims, on ``wayang.control``."""
    return f"claim-reply.{executor_id}"
