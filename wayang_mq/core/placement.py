"""What a task's placement policy asks of an executor, in one place for both who checks it.

A task's :class:`~wayang_mq.core.model.PolicyConstraints` may name one executor
(``executor_id``) and labels (``labels``): every label must equal the executor's own, which it
announces as its registration's ``metadata``. Two label keys are well known: ``region`` and
``trust_domain`` (labels, not fields, so a deployment can add its own keys, such as ``gpu``,
without a wire change). The control plane chooses among executors with :func:`unmet`, and an
executor refuses, with the same function, a task it does not satisfy, so the two cannot
disagree about what a policy means.

A task with such a policy is published with routing key ``place.<capability>`` (see
:func:`routing_key`): the control plane picks a live executor that meets it and forwards the
issuer's bytes to that executor's own queue (``executor.<id>``); docs/wire-format.md,
"Placement".
"""

from __future__ import annotations

from collections.abc import Mapping

from wayang_mq.core import names
from wayang_mq.core.model import PolicyConstraints, Task

#: well-known label keys (any other key works the same way)
REGION = "region"
TRUST_DOMAIN = "trust_domain"
#: set by the control plane on a placed copy: which capability's handler takes it (not
#: trusted: the worker still checks the signed task names that capability)
CAPABILITY_HEADER = "wayang-capability"


def constrained(policy: PolicyConstraints) -> bool:
    """True when the policy needs particular executors (a named one, or labels)."""
    return policy.executor_id is not None or bool(policy.labels)


def routing_key(task: Task) -> str:
    """Where a new task goes on ``wayang.tasks``: ``place.<cap>`` when its policy needs
    particular executors, else its capability."""
    if constrained(task.policy):
        return names.place_routing_key(task.capability)
    return task.capability


def unmet(policy: PolicyConstraints, executor_id: str, labels: Mapping[str, str]) -> list[str]:
    """What the policy asks that this executor does not have (``key=value`` each); empty when
    it satisfies the policy."""
    missing: list[str] = []
    if policy.executor_id is not None and policy.executor_id != executor_id:
        missing.append(f"executor_id={policy.executor_id}")
    missing.extend(f"{k}={v}" for k, v in sorted(policy.labels.items()) if labels.get(k) != v)
    return missing


def needs(policy: PolicyConstraints) -> str:
    """The policy as ``executor_id=w1, region=eu`` (for messages)."""
    return ", ".join(unmet(policy, "", {})) or "nothing"


def has(labels: Mapping[str, str], keys: list[str]) -> str:
    """An executor's labels among ``keys`` as ``region=us, no trust_domain`` (for messages)."""
    return ", ".join(f"{k}={labels[k]}" if k in labels else f"no {k}" for k in keys)
