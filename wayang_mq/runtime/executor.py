"""The executor contract (spec §5): ``execute``, ``status``, ``cancel``, ``capabilities``,
``heartbeat``.

An author subclasses :class:`Executor`, names what it serves and writes ``execute`` as plain
async code. The other four contract methods are answered by the runtime the executor is
attached to, because only the runtime knows what is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from wayang_mq.core.errors import ConfigError
from wayang_mq.core.loading import load_class
from wayang_mq.core.model import Heartbeat, JsonLike, Task, TaskState, TaskStatus
from wayang_mq.core.names import valid_capability

if TYPE_CHECKING:
    from collections.abc import Sequence

#: TaskState and TaskStatus live in core.model (the control messages use them too)
__all__ = [
    "Executor",
    "Pending",
    "Runtime",
    "TaskState",
    "TaskStatus",
    "check_capabilities",
    "load_class",  # from wayang_mq.core.loading, kept importable here
    "load_executor",
]


class Runtime(Protocol):
    """What an attached executor asks of the worker that runs it."""

    executor_id: str

    def status(self, task_id: str) -> TaskStatus: ...

    def cancel(self, task_id: str, reason: str = "") -> bool: ...

    def heartbeat(self) -> Heartbeat: ...


@dataclass(frozen=True)
class Pending:
    """What ``execute`` returns to accept a task that someone answers later (a person, an
    outside system): the worker publishes a PENDING result carrying ``details`` and acks the
    delivery. The terminal result is published later with
    :class:`wayang_mq.runtime.answers.Answers`, from :meth:`TaskRef.of` the task."""

    details: dict[str, JsonLike] = field(default_factory=dict)


class Executor:
    """Base class of executors. Override ``execute``; set ``serves`` to your capabilities."""

    #: the capabilities this executor serves, e.g. ``("http.call",)``
    serves: ClassVar[tuple[str, ...]] = ()
    #: True for tasks that may run longer than the broker's ``consumer_timeout`` (30 min by
    #: default; RabbitMQ closes the channel of a delivery held longer): the worker publishes a
    #: PENDING result and acks the delivery when the task starts, runs it to the end, then
    #: publishes its answer. Give such tasks a heartbeat timeout: if the worker dies meanwhile,
    #: the dispatcher's supervision re-dispatches them (the broker no longer holds them).
    long_running: ClassVar[bool] = False
    #: the secret names (fnmatch patterns) a task may reference for this executor: a task
    #: naming another fails ``secret_unavailable`` before it runs. Narrow it so that whoever
    #: may issue tasks cannot aim, say, ``http.call`` at a secret meant for ``db.query``.
    allowed_secrets: ClassVar[tuple[str, ...]] = ("*",)
    #: free-form metadata published at registration (region, version, labels)
    metadata: ClassVar[dict[str, str]] = {}

    _runtime: Runtime | None = None

    async def setup(self) -> None:
        """Open pools and clients once, before the first task."""

    async def teardown(self) -> None:
        """Close what ``setup`` opened, after the last task."""

    async def execute(self, task: Task) -> JsonLike:
        """Run one task and return its output; raise ``ExecutorError`` to fail it."""
        raise NotImplementedError(f"{type(self).__name__}.execute")

    # The rest of the contract is answered by the runtime.

    def capabilities(self) -> tuple[str, ...]:
        """What this executor serves."""
        return self.serves

    def attach(self, runtime: Runtime) -> None:
        """Called by the worker before it starts consuming."""
        self._runtime = runtime

    def _attached(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a running worker")
        return self._runtime

    def status(self, task_id: str) -> TaskStatus:
        """Running, finished or unknown here, with the last progress."""
        return self._attached().status(task_id)

    def cancel(self, task_id: str, reason: str = "") -> bool:
        """Cancel a running task; False when it is not running here."""
        return self._attached().cancel(task_id, reason)

    def heartbeat(self) -> Heartbeat:
        """Liveness and load as the next heartbeat will report them."""
        return self._attached().heartbeat()


def load_executor(spec: str) -> Executor:
    """Import and instantiate an executor ``module:Class`` and check what it serves."""
    executor = load_class(spec, Executor, "wayang_workers.demo:Echo")
    check_capabilities([executor])
    return executor


def check_capabilities(executors: Sequence[Executor]) -> dict[str, Executor]:
    """Map each capability to its executor; reject bad names and two executors for one."""
    by_capability: dict[str, Executor] = {}
    for executor in executors:
        if not executor.capabilities():
            raise ConfigError(f"{type(executor).__name__} serves no capability (set `serves`)")
        for capability in executor.capabilities():
            if not valid_capability(capability):
                raise ConfigError(f"{type(executor).__name__}: bad capability {capability!r}")
            if capability in by_capability:
                raise ConfigError(f"two executors serve {capability!r}")
            by_capability[capability] = executor
    return by_capability
