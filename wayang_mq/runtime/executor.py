"""The executor contract (spec §5): ``execute``, ``status``, ``cancel``, ``capabilities``,
``heartbeat``.

An author subclasses :class:`Executor`, names what it serves and writes ``execute`` as plain
async code. The other four contract methods are answered by the runtime the executor is
attached to, because only the runtime knows what is in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel

from wayang_mq.core.errors import ConfigError
from wayang_mq.core.loading import load_class, load_type
from wayang_mq.core.model import Heartbeat, JsonLike, Task, TaskState, TaskStatus
from wayang_mq.core.names import valid_capability
from wayang_mq.runtime.settings import SecretRef, WorkerFile, parse_settings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from wayang_mq.runtime.answers import Answers
    from wayang_mq.security.secrets import Secret

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

    async def resolve_secret(self, name: str, capability: str) -> Secret: ...

    def answers(self) -> Answers: ...


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
    #: the pydantic model of this executor's settings (see :mod:`wayang_mq.runtime.settings`):
    #: the worker validates its ``--config`` table against it and passes the instance to the
    #: constructor; None: the executor takes no settings
    settings_model: ClassVar[type[BaseModel] | None] = None

    _runtime: Runtime | None = None

    @classmethod
    def from_settings(cls, table: Mapping[str, Any]) -> Executor:
        """An instance configured from its ``--config`` table (validated against
        :attr:`settings_model`; an executor without settings takes no table)."""
        where = cls.serves[0] if cls.serves else cls.__name__
        if cls.settings_model is None:
            if table:
                raise ConfigError(f"{cls.__name__} takes no settings, but [{where}] has some")
            return cls()
        settings = parse_settings(cls.settings_model, table, where)
        return cls(settings)  # type: ignore[call-arg]

    async def reveal(self, value: str | SecretRef) -> str:
        """A setting's value: a :class:`SecretRef` resolved through the worker's secret
        providers (and redacted from every log line from then on), a plain string as it is.
        Call it in ``setup``: a secret that cannot be had stops the worker from starting."""
        if isinstance(value, str):
            return value
        capability = self.serves[0] if self.serves else ""
        secret = await self._attached().resolve_secret(value.name, capability)
        return secret.reveal()

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

    def answers(self) -> Answers:
        """Publishes the terminal results of tasks this executor accepted with
        :class:`Pending`, on the worker's own connection and signed with its key (open; valid
        once the worker started consuming, i.e. not in ``setup``)."""
        return self._attached().answers()

    async def withdraw(self, task_id: str, reason: str, requester: str | None) -> bool:
        """A cancel arrived for a task that is not running here: an executor that accepted
        it with :class:`Pending` withdraws it and answers it FAILED ``cancelled`` (through
        :meth:`answers`), then returns True. ``requester`` is the cancel's signer (None: an
        admin): withdraw only a task that identity issued. The default knows no such task."""
        return False


def load_executor(spec: str, settings: WorkerFile | None = None) -> Executor:
    """Import an executor ``module:Class``, configure it from its table in ``settings`` (the
    worker's ``--config`` file) and check what it serves."""
    cls = load_type(spec, Executor, "wayang_workers.demo:Echo")
    table = settings.table(cls.serves[0]) if settings is not None and cls.serves else {}
    executor = cls.from_settings(table)
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
