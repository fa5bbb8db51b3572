"""Whether the key that signed a message may say what the message says (besides tasks, which
:mod:`wayang_mq.core.envelope` checks). Each check raises the refusal a receiver logs and
counts; docs/security.md §6 has the table.
"""

from __future__ import annotations

from collections.abc import Iterable

from wayang_mq.core.errors import CapabilityNotAllowed, KeyNotAllowed
from wayang_mq.core.model import CancelRequest, Result, Status, Task
from wayang_mq.core.scopes import Role
from wayang_mq.core.signing import Verified

#: executor id of a result a dispatcher decided itself (its own deadline), then its id
DECIDED_BY_DISPATCHER = "dispatcher:"
#: executor id of a result the control plane answered from its record, then its id
DECIDED_BY_CONTROL_PLANE = "control-plane:"


def check_result(signer: Verified, result: Result, task: Task | None = None) -> None:
    """An executor answers as itself for its capabilities; the reaper answers FAILED for
    any; a dispatcher only its own deadline's FAILED, as ``dispatcher:<id>``, for a task it
    issued (``task``: the attempt the receiver waits for, when it knows it); the control
    plane answers from its record (a duplicate publish, no executor for a policy), as
    ``control-plane:<id>``."""
    scope = signer.scope
    if scope.role is Role.ADMIN:
        return
    if scope.role is Role.CONTROL_PLANE:
        if result.executor_id != f"{DECIDED_BY_CONTROL_PLANE}{scope.identity}":
            raise KeyNotAllowed(
                f"result for task {result.task_id} names executor {result.executor_id!r} but "
                f"is signed by {scope.describe()}: the control plane answers as "
                f"{DECIDED_BY_CONTROL_PLANE}{scope.identity}"
            )
        return
    if scope.role is Role.EXECUTOR:
        if not scope.speaks_for(result.executor_id):
            raise KeyNotAllowed(
                f"result for task {result.task_id} names executor {result.executor_id!r} but "
                f"is signed by {scope.describe()}"
            )
        if not scope.covers(result.capability):
            raise CapabilityNotAllowed(
                f"result for task {result.task_id} is for {result.capability!r}, which "
                f"{scope.describe()} does not serve"
            )
        return
    own = {
        Role.REAPER: scope.identity,
        Role.DISPATCHER: f"{DECIDED_BY_DISPATCHER}{scope.identity}",
    }.get(scope.role)
    if own is None or result.executor_id != own or result.status is not Status.FAILED:
        raise KeyNotAllowed(
            f"result for task {result.task_id} ({result.status.value}, executor "
            f"{result.executor_id!r}) may not be signed by {scope.describe()}"
        )
    if scope.role is Role.DISPATCHER and task is not None and task.issuer != scope.identity:
        raise KeyNotAllowed(
            f"result for task {result.task_id} is signed by {scope.describe()}, but the task "
            f"was issued by {task.issuer!r}: a dispatcher decides only its own tasks' deadlines"
        )


def check_executor_event(signer: Verified, executor_id: str, capabilities: Iterable[str]) -> None:
    """Heartbeats, registrations, progress and status reports: an executor speaks as itself,
    for the capabilities it serves."""
    scope = signer.scope
    if not scope.is_(Role.EXECUTOR) or not scope.speaks_for(executor_id):
        raise KeyNotAllowed(
            f"an event of executor {executor_id!r} may not be signed by {scope.describe()}"
        )
    for capability in capabilities:
        if not scope.covers(capability):
            raise CapabilityNotAllowed(
                f"executor {executor_id!r} claims {capability!r}, which {scope.describe()} "
                "does not serve"
            )


def check_task_claim(signer: Verified, task: Task) -> None:
    """An executor that reports a task (in flight, running, finished) must serve its
    capability: a claim about another capability's task is refused."""
    if not signer.scope.covers(task.capability):
        raise CapabilityNotAllowed(
            f"{signer.scope.describe()} reports task {task.task_id} of {task.capability!r}, "
            "which it does not serve"
        )


def check_cancel(signer: Verified, request: CancelRequest, task: Task | None) -> None:
    """A dispatcher cancels as itself, and only tasks it issued; an admin cancels any. With
    the task not known yet, the issuer is checked when it arrives (``task`` then given)."""
    scope = signer.scope
    if scope.role is Role.ADMIN:
        return
    if scope.role is not Role.DISPATCHER or not scope.speaks_for(request.requester):
        raise KeyNotAllowed(
            f"cancel of task {request.task_id} names requester {request.requester!r} but is "
            f"signed by {scope.describe()}"
        )
    if task is not None and task.issuer != scope.identity:
        raise KeyNotAllowed(
            f"cancel of task {request.task_id} by {scope.describe()}: the task was issued by "
            f"{task.issuer!r}"
        )


def check_status_request(signer: Verified) -> None:
    """Dispatchers, the control plane and admins may ask what executors know."""
    if not signer.scope.is_(Role.DISPATCHER, Role.CONTROL_PLANE):
        raise KeyNotAllowed(f"status requests may not be signed by {signer.scope.describe()}")
