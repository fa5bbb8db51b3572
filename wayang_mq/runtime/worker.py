"""The worker daemon: consumes its capabilities' queues and runs executors on them.

Per delivery the worker reads as a sentence: its capability's limits admit it, before it
takes a concurrency slot (:mod:`~wayang_mq.runtime.limits`) → middleware sees the raw
delivery → open the task (size, signature, schema, deadline, capability) → middleware may
answer it (the recent-results layer answers a redelivered finished attempt) → answer a cancel
that came first, or join the same attempt running here, or run it
(:mod:`~wayang_mq.runtime.running`) → middleware sees the result →
:mod:`~wayang_mq.runtime.decide` says its :class:`Outcome` (done, pending, retry, dead letter)
→ :func:`settle` publishes what the outcome carries, waits for the broker's confirms, and only
then acks. Every exit becomes an outcome in :meth:`Worker._handle`, a shutdown or a
bug of ours included; middleware sees each one.

A long-running executor's task is accepted at start (PENDING published, delivery acked) so it
may outlive the broker's ``consumer_timeout``; its answer is published when it ends, with
:func:`deliver`, and middleware sees that outcome too. It keeps its concurrency slot until then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from wayang_mq.amqp.control import ControlServer
from wayang_mq.amqp.daemon import Daemon
from wayang_mq.amqp.outcome import Kind, Outcome, deliver, leave, requeue, settle
from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp
from wayang_mq.core import logs, names
from wayang_mq.core.envelope import (
    DEFAULT_MAX_CLOCK_SKEW_MS,
    DEFAULT_MAX_QUEUE_WINDOW_MS,
    TaskChecks,
    open_task,
)
from wayang_mq.core.errors import (
    ConfigError,
    InvalidMessage,
    Replayed,
    WayangError,
    WireError,
    WrongCapability,
)
from wayang_mq.core.fields import printable
from wayang_mq.core.model import (
    DEFAULT_AUDIENCE,
    Heartbeat,
    Progress,
    Registration,
    Result,
    Task,
    WireModel,
)
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import DEFAULT_MAX_BODY_BYTES, PARTITION_KEY_HEADER, signed_message
from wayang_mq.observability import tracing
from wayang_mq.observability.metrics import WorkerMetrics
from wayang_mq.runtime import shards
from wayang_mq.runtime.admission import Admission
from wayang_mq.runtime.answers import Answers
from wayang_mq.runtime.claims import DEFAULT_CLAIM_TIMEOUT_S, Claims
from wayang_mq.runtime.decide import Decider
from wayang_mq.runtime.executor import Executor, TaskState, TaskStatus, check_capabilities
from wayang_mq.runtime.keyorder import KeyOrder, Place
from wayang_mq.runtime.limits import CapabilityLimit, LimitsClosed
from wayang_mq.runtime.middleware import Chain, Executed, Middleware, Opened, Received, Settled
from wayang_mq.runtime.placement import PolicyGuard, consume_own_queue
from wayang_mq.runtime.recent import RecentResults
from wayang_mq.runtime.replays import Replays
from wayang_mq.runtime.running import Runner, Running
from wayang_mq.runtime.taskmetrics import TaskMetrics
from wayang_mq.runtime.traced import TaskTracing
from wayang_mq.security.secrets import Resolver, Secret, SecretProvider, SecretUnavailable
from wayang_mq.topology.spec import RetryTier

log = logging.getLogger("wayang_mq.runtime.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """How one worker process runs; built once by the CLI or a test."""

    amqp_url: str = field(repr=False)
    keyring: KeyRing
    signer: Signer
    executor_id: str = field(default_factory=names.default_id)
    concurrency: int = 8
    prefetch: int | None = None  # default: concurrency (held but not running counts too)
    heartbeat_interval_s: float = 5.0
    grace_s: float = 30.0  # SIGTERM: how long in-flight tasks may finish
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # the topology's max_body_bytes
    max_clock_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS  # tasks issued further ahead: refused
    max_queue_window_ms: int = DEFAULT_MAX_QUEUE_WINDOW_MS  # deadlines further away: refused
    audience: str = DEFAULT_AUDIENCE  # the deployment: tasks for another are refused
    recent_results: int = 10_000  # results kept to answer a redelivered finished task
    recent_results_bytes: int = 16 * 1024 * 1024  # and their outputs' size, at most
    retry_tiers: tuple[RetryTier, ...] = ()  # from the topology; none: failures are final
    middleware: tuple[Middleware, ...] = ()  # layers around every delivery, in this order
    health_port: int | None = None  # answer health probes over HTTP on this port (0: any)
    metrics_port: int | None = None  # count, and serve /metrics on this port (0: any)
    metrics_host: str = "127.0.0.1"
    secrets: SecretProvider | None = None  # resolves tasks' {"$secret": name} references
    claims: bool = False  # ask the control plane before running a task (runtime/claims.py)
    claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S  # no verdict by then: run anyway
    labels: dict[str, str] = field(default_factory=dict)  # placement: region, trust_domain, ...
    #: per capability: a rate and a cap on running tasks below ``concurrency`` (runtime/limits.py)
    limits: Mapping[str, CapabilityLimit] = field(default_factory=dict)
    #: share each capability's rate with the fleet through this PostgreSQL (runtime/sharedrate)
    limits_db_url: str | None = field(default=None, repr=False)
    #: per sharded capability ("" for all of them): the shard numbers to consume (runtime/shards)
    shards: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if self.prefetch is not None and self.prefetch < 1:
            raise ConfigError("prefetch must be at least 1")
        if self.claim_timeout_s <= 0:
            raise ConfigError("the claim timeout must be more than 0 seconds")
        if not names.valid_word(self.executor_id):
            raise ConfigError(
                f"executor id {self.executor_id!r} must be lowercase letters, digits, '-' or '_'"
            )
        for capability, limit in self.limits.items():
            if limit.max_running is not None and limit.max_running > self.concurrency:
                raise ConfigError(
                    f"--max-running {capability}={limit.max_running} is more than the "
                    f"worker's --concurrency {self.concurrency}",
                    hint="a capability's limit is below the worker's: lower it, or raise "
                    "--concurrency",
                )
        if self.limits_db_url and not any(limit.rate for limit in self.limits.values()):
            raise ConfigError(
                "--limits-db shares rates, and no --rate is given",
                hint="e.g. --rate http.call=10/s --limits-db postgresql://...",
            )

    @property
    def checks(self) -> TaskChecks:
        """What a task must pass here besides its signature."""
        return TaskChecks(
            audience=self.audience,
            max_body_bytes=self.max_body_bytes,
            max_clock_skew_ms=self.max_clock_skew_ms,
            max_queue_window_ms=self.max_queue_window_ms,
        )


class Worker(Daemon):
    """Runs executors on their capabilities' queues until ``stop()``."""

    kind = "worker"

    def __init__(self, executors: Sequence[Executor], config: WorkerConfig) -> None:
        super().__init__(
            config.amqp_url,
            config.executor_id,
            prefetch=config.prefetch or config.concurrency,
            grace_s=config.grace_s,
            heartbeat_interval_s=config.heartbeat_interval_s,
            health_port=config.health_port,
            metrics_port=config.metrics_port,
            metrics_host=config.metrics_host,
        )
        self.config = config
        self.executor_id = config.executor_id
        self._by_capability = check_capabilities(executors)
        shards.check_capabilities(config.shards, self._by_capability)
        self._key_order = KeyOrder()
        self._executors = list(executors)
        self._admission = Admission(
            config.concurrency, config.limits, self._by_capability, config.limits_db_url
        )
        self._recent = RecentResults(config.recent_results, config.recent_results_bytes)
        self._replays = Replays()
        self._checks = config.checks
        # the trace and log fields first (every line about the task carries them; it never
        # answers nor refuses), then the policy (never bypassed); the built-in layer innermost:
        # every configured layer sees every task first
        guard = PolicyGuard(config.executor_id, config.labels)
        traced = TaskTracing(config.executor_id)
        self._chain = Chain((traced, guard, *config.middleware, *self._metering(), self._recent))
        self._runner = Runner(
            self._by_capability, self.executor_id, self._progress, self._started, config.secrets
        )
        self._decider = Decider(
            self.executor_id,
            config.signer,
            config.retry_tiers,
            lambda: self.publisher,
            self.queue_exists,
        )
        self._heartbeat_seq = 0
        self._control: ControlServer | None = None
        self._claims = _claims(config, lambda: self.publisher)
        for executor in executors:
            executor.attach(self)

    def _metering(self) -> tuple[Middleware, ...]:
        """The metrics layer, when metrics are on (it sits just outside the recent results,
        so it sees their answers as duplicates)."""
        if self.registry is None:
            return ()

        def in_flight(capability: str) -> int:
            running = (self._runner.get(task_id) for task_id in self._runner.in_flight())
            return sum(1 for r in running if r is not None and r.task.capability == capability)

        metrics = WorkerMetrics(
            self.registry, self.executor_id, self.ready, tuple(self._by_capability), in_flight
        )
        self.metrics = metrics
        self._admission.count(metrics)
        return (TaskMetrics(metrics, self._recent),)

    # -- the executor contract, answered for attached executors -------------------------

    def running_task(self, task_id: str) -> Task | None:
        """The attempt of ``task_id`` running here, if any (a cancel checks its issuer)."""
        running = self._runner.get(task_id)
        return running.task if running is not None else None

    def status(self, task_id: str) -> TaskStatus:
        """Running here (with its last progress), finished here recently, or unknown."""
        return _status_of(task_id, self.executor_id, self._runner, self._recent)

    def cancel(self, task_id: str, reason: str = "") -> bool:
        """Cancel a running task; it ends FAILED ``cancelled``."""
        return self._runner.cancel(task_id, reason)

    async def withdraw(self, task_id: str, reason: str, requester: str | None) -> bool:
        """A cancel of a task not running here: an executor that accepted it with ``Pending``
        and still waits on it withdraws it (and answers it ``cancelled``)."""
        for executor in self._executors:
            try:
                if await executor.withdraw(task_id, reason, requester):
                    return True
            except Exception:
                log.exception("event=worker.bug task_id=%s in=withdraw", task_id)
        return False

    def answers(self) -> Answers:
        """Answers for tasks accepted with ``Pending``, on this worker's connection."""
        return Answers.sharing(self.publisher, self.config.signer, self.executor_id)

    def heartbeat(self) -> Heartbeat:
        """This worker's liveness and load right now."""
        return _heartbeat(
            self.config, tuple(self._by_capability), self._runner, self._heartbeat_seq
        )

    async def resolve_secret(self, name: str, capability: str) -> Secret:
        """A secret an executor's settings name (a DSN, an API key), through this worker's
        providers; registered with the redactor like a task's. Raises ``ConfigError``."""
        if self.config.secrets is None:
            raise ConfigError(
                f"[{capability}] names secret {name!r} but this worker has no secret providers",
                hint="start it with --secrets (see `wayang-mq worker --help`)",
            )
        try:
            found = await Resolver(self.config.secrets).resolve([name], capability=capability)
        except SecretUnavailable as exc:
            raise ConfigError(f"[{capability}]: {exc.message}", hint=exc.hint) from None
        return found[name]

    # -- the daemon's hooks -----------------------------------------------------------------

    async def setup(self) -> None:
        """The executors' own setup (and the shared rates' database), before connecting."""
        await self._admission.open()
        for executor in self._executors:
            await executor.setup()

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Register, listen for control requests, consume every capability's queues."""
        registration = _registration(self.config, tuple(self._by_capability), self._executors)
        await self._emit(registration, names.event_key("registered", self.executor_id))
        self._control = ControlServer(self, self.config.keyring, self.config.signer, self.publisher)
        if self._claims is not None:
            self._claims.listen(self._control)
        await self._control.start(await connection.channel())
        await consume_own_queue(self, connection, tuple(self._by_capability), self._handle)
        for capability in self._by_capability:
            shard_queues = await _shard_queues(capability, self.queue_exists)
            if shard_queues:
                await self._consume_shards(capability, shard_queues)
                continue
            shards.unsharded_selection(capability, self.config.shards)
            # A limited capability: a channel of its own whose prefetch is what it may run
            # soon, so the tasks over its limit wait in the queue, not in this worker.
            prefetch = self._admission.prefetch(capability)
            channel = None if prefetch is None else await self.prefetch_channel(prefetch)
            await self.consume(
                names.task_queue(capability),
                partial(self._handle, capability),
                hint=_HINT.format(capability),
                label=capability,
                channel=channel,
            )

    async def _consume_shards(self, capability: str, queues: list[str]) -> None:
        """Consume the chosen shard queues, each on a channel of its own, in key order.

        Each shard queue has a single active consumer across the fleet: this worker may be
        it or stand by. A channel per shard: closing it (at stop) gives back exactly that
        shard's held deliveries, to the head of the queue. Not cancelled at stop (``ordered``):
        a cancel would make the standby active while this worker still holds earlier tasks.
        """
        chosen = shards.choose(capability, len(queues), self.config.shards)
        prefetch = self._admission.prefetch(capability) or self.config.prefetch
        for number in chosen:
            channel = await self.prefetch_channel(prefetch or self.config.concurrency)
            queue_name = queues[number]
            await self.consume(
                queue_name,
                partial(self._take_place, capability, queue_name),
                hint=_HINT.format(capability),
                label=queue_name.removeprefix("wayang.task."),  # db.query.2
                channel=channel,
                ordered=True,
            )
        logs.event(
            log,
            "worker.shards",
            id=self.executor_id,
            capability=capability,
            consuming=",".join(map(str, chosen)),
            of=len(queues),
            hint="one active consumer per shard; the others stand by (docs/sharding.md)",
        )

    def _take_place(
        self, capability: str, queue_name: str, message: AbstractIncomingMessage
    ) -> Coroutine[Any, Any, None]:
        """A shard delivery takes its place in its key's line on arrival, before any await."""
        headers = message.headers or {}
        key = headers.get(PARTITION_KEY_HEADER)
        key = key if isinstance(key, str) else (message.message_id or "")
        place = self._key_order.take(f"{queue_name} {key}")
        return self._handle_in_order(capability, place, message)

    async def _handle_in_order(
        self, capability: str, place: Place, message: AbstractIncomingMessage
    ) -> None:
        """Wait for the earlier deliveries of the key, then handle this one like any other.
        Stopping meanwhile: left unsettled, so the channel's close returns it in order."""
        try:
            await place.wait()
            if self.stopping:
                await settle(message, leave(message.message_id, "stopping", "task.returned"))
                return
            await self._handle(capability, message, ordered=True)
        finally:
            self._key_order.leave(place)

    def stop(self) -> None:
        """Stop consuming; deliveries waiting for their capability's limit go back at once."""
        super().stop()
        self._admission.close()

    async def beat(self) -> None:
        """One heartbeat on ``wayang.events``."""
        self._heartbeat_seq += 1
        await self._emit(self.heartbeat(), names.event_key("heartbeat", self.executor_id))

    async def teardown(self) -> None:
        """The executors' own teardown, after the connection closed."""
        for executor in self._executors:
            await executor.teardown()
        await self._admission.aclose()

    def connection_name(self) -> str:
        """``worker demo-0 (demo.echo, demo.sleep)``: the console names it by what it serves."""
        return f"worker {self.executor_id} ({', '.join(self._by_capability)})"[:255]

    def describe(self) -> dict[str, Any]:
        """What this worker serves."""
        return {
            "capabilities": ",".join(self._by_capability),
            "concurrency": self.config.concurrency,
            "running": len(self._runner.in_flight()),
        }

    # -- one delivery ---------------------------------------------------------------------

    async def _handle(
        self, capability: str, message: AbstractIncomingMessage, *, ordered: bool = False
    ) -> None:
        """Every delivery becomes one Outcome, carried out by ``settle``: the only exit. Its
        capability's limit is taken before a slot: a task waiting for its rate holds no slot.
        A shard's delivery (``ordered``) given back unstarted is left, not requeued: a
        requeue goes to the back of a quorum queue, behind later tasks of its key."""
        give_back = leave if ordered else requeue
        try:
            async with self._admission.admit(capability, message.message_id):
                outcome = await self._decide_safely(capability, message)
                if ordered and outcome.kind is Kind.REQUEUE and self.stopping:
                    outcome = leave(outcome.task_id, "stopping", "task.returned")
                try:
                    await self._after(capability, await settle(message, outcome, self.publisher))
                finally:
                    self._runner.announced(outcome.task_id)
        except LimitsClosed:
            # The worker stops while the delivery waits for its limit: the queue gets it back.
            await settle(message, give_back(message.message_id, "stopping", "task.returned"))
        except asyncio.CancelledError:
            # Shutdown past the grace period: the broker gets the delivery back, unharmed.
            await settle(message, give_back(message.message_id, "stopped past the grace"))
            raise
        except Exception:
            # A bug in carrying the outcome out must not strand the delivery either (a
            # settle of a delivery already settled is skipped and logged).
            log.exception("event=worker.bug task_id=%s next=requeued", message.message_id)
            await settle(message, requeue(message.message_id, "a bug in settling (logged above)"))

    async def _after(self, capability: str, applied: Outcome) -> None:
        """Tell the middleware; announce a retry once the next attempt is safely in its tier."""
        await self._chain.settled(Settled(self.executor_id, capability, applied))
        if applied.kind is Kind.RETRY and applied.result is not None:
            await self._emit(applied.result, names.event_key("attempt", applied.result.task_id))

    async def _decide_safely(self, capability: str, message: AbstractIncomingMessage) -> Outcome:
        """The delivery's outcome; a bug of ours gives it back instead of stranding it."""
        try:
            return await self._decide(capability, message)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not strand the delivery or kill the daemon; if it repeats, the
            # queue's delivery-limit dead-letters the task after a few tries.
            log.exception("event=worker.bug task_id=%s next=requeued", message.message_id)
            return requeue(message.message_id, "a bug in the worker (logged above)")

    async def _decide(self, capability: str, message: AbstractIncomingMessage) -> Outcome:
        """Open the task, answer or run it, and say what becomes of the delivery."""
        if self.stopping:
            # Held (prefetch > concurrency) but never started, and the worker is stopping:
            # give it back instead of starting it within the grace. basic.cancel leaves what
            # a consumer holds with it; a nack with requeue returns it, for another worker.
            return requeue(message.message_id, "stopping", event="task.returned")
        opened: Task | None = None
        try:
            if self._chain.wants_received:
                headers = message.headers or {}
                received = Received(
                    self.executor_id, capability, message.message_id, message.body, headers
                )
                await self._chain.received(received)
            task = opened = _open(capability, message, self.config.keyring, self._checks)
            answer = await self._chain.opened(Opened(self.executor_id, capability, task))
        except WireError as exc:
            # a layer refusing a task that verified: answerable, at its signed address
            exc.task = exc.task or opened
            return self._decider.bad_input(capability, message, exc)
        if answer is None and self._control is not None:
            answer = self._control.answer_if_cancelled(task, self.executor_id)
        if answer is None and self._claims is not None:  # the control plane's verdict
            claimed = await self._claims.claim(task, redelivered=bool(message.redelivered))
            if isinstance(claimed, Outcome):
                return claimed  # a duplicate: acked unanswered (the record answers it)
            answer = claimed
        answer = answer or await self._runner.join(task)
        first = self._replays.take(task, redelivered=bool(message.redelivered))
        if answer is not None:  # a copy of what runs or ran here: its one run's answer
            return await self._conclude(capability, message, task, answer)
        if not first:  # taken before, no longer known here: it must not run again
            return self._decider.bad_input(capability, message, _replayed(task, message.body))
        running = await self._runner.start(task, bytes_in=len(message.body))
        if self._runner.long_running(task):
            self._runner.accepting(running)
            self.spawn(self._follow(capability, message, running))
            return self._accepted(running)
        # Awaited directly: if this handler is cancelled (shutdown), so is the run.
        result, output_bytes = await running.job
        return await self._conclude(capability, message, task, result, output_bytes)

    async def _conclude(
        self,
        capability: str,
        message: AbstractIncomingMessage,
        task: Task,
        result: Result,
        output_bytes: int = 0,
    ) -> Outcome:
        result = await self._chain.executed(Executed(self.executor_id, task, result, output_bytes))
        return await self._decider.conclude(capability, message, task, result)

    # -- long-running tasks -------------------------------------------------------------------

    def _accepted(self, running: Running) -> Outcome:
        """A long-running task, accepted: PENDING published, then the delivery acked."""
        task = running.task
        pending = Result.accepted(task, self.executor_id, {"running_on": self.executor_id})
        running.accepted = pending
        return self._decider.accepted(task, pending)

    async def _follow(
        self, capability: str, message: AbstractIncomingMessage, running: Running
    ) -> None:
        """Wait for an accepted long-running task to end and publish its answer. Its delivery
        is acked: there is nothing to settle, and if this worker dies meanwhile the
        dispatcher's heartbeat supervision re-dispatches the task. It holds no slot: deliveries
        must not wait held behind it toward the broker's consumer_timeout."""
        try:
            result, output_bytes = await running.job
            # A task that ends at once must not answer before its PENDING is on the wire.
            await running.announced.wait()
        except asyncio.CancelledError:
            running.job.cancel()  # the worker stops past its grace: supervision takes over
            raise
        try:
            outcome = await self._conclude(capability, message, running.task, result, output_bytes)
            await self._after(capability, await deliver(outcome, self.publisher))
        except Exception:
            log.exception("event=worker.bug task_id=%s next=supervision", running.task.task_id)

    # -- events ---------------------------------------------------------------------------------

    async def _emit(self, event: WireModel, routing_key: str) -> None:
        """Events are best-effort: a lost heartbeat is replaced by the next one. Their
        ``message_id`` is the task id (progress, attempts) or the executor id (registration,
        heartbeat), as wire-format §2 says; persistent, like everything the fabric publishes."""
        if self._publisher is None:
            return
        task_id = getattr(event, "task_id", None)
        about = task_id or self.executor_id
        trace = tracing.headers() if task_id else None  # a task's event continues its trace
        signed = signed_message(event, self.config.signer, message_id=about, extra_headers=trace)
        message = to_amqp(signed)
        try:
            await self._publisher.publish_once(names.EVENTS_EXCHANGE, routing_key, message)
        except WayangError as exc:
            logs.event(log, "event.dropped", logging.DEBUG, key=routing_key, error=str(exc))

    async def _progress(self, progress: Progress) -> None:
        await self._emit(progress, names.event_key("progress", progress.task_id))

    async def _started(self, task: Task) -> None:
        if task.heartbeat_timeout_ms is not None:
            # A supervisor watches only tasks it has seen in flight: show this one at once,
            # so a hang within the first heartbeat interval is caught too.
            await self.beat()


def _status_of(task_id: str, executor_id: str, runner: Runner, recent: RecentResults) -> TaskStatus:
    running = runner.get(task_id)
    if running is not None:
        attempt, progress = running.task.attempt, running.context.last_progress
        return TaskStatus(task_id, TaskState.RUNNING, executor_id, attempt, progress)
    finished = recent.get(task_id)
    if finished is not None:
        attempt, outcome = finished.attempt, finished.status
        return TaskStatus(task_id, TaskState.FINISHED, executor_id, attempt, outcome=outcome)
    return TaskStatus(task_id, TaskState.UNKNOWN, executor_id)


def _heartbeat(
    config: WorkerConfig, capabilities: tuple[str, ...], runner: Runner, sequence: int
) -> Heartbeat:
    return Heartbeat(
        executor_id=config.executor_id,
        capabilities=capabilities,
        in_flight=runner.in_flight(),
        details=runner.details(),
        concurrency=config.concurrency,
        sequence=sequence,
    )


def _registration(
    config: WorkerConfig, capabilities: Sequence[str], executors: Sequence[Executor]
) -> Registration:
    """What the worker announces: its executors' metadata, and its placement labels over it
    (the control plane places tasks by them: wayang_mq.core.placement)."""
    metadata = {k: v for e in executors for k, v in e.metadata.items()} | config.labels
    return Registration(
        executor_id=config.executor_id,
        capabilities=tuple(capabilities),
        concurrency=config.concurrency,
        metadata=metadata,
    )


def _claims(config: WorkerConfig, publisher: Callable[[], ConfirmedPublisher]) -> Claims | None:
    """The claims client when the worker asks the control plane before running tasks."""
    if not config.claims:
        return None
    return Claims(
        config.executor_id, config.signer, config.keyring, publisher, config.claim_timeout_s
    )


def _replayed(task: Task, body: bytes) -> Replayed:
    return Replayed(
        f"task {task.task_id} attempt {task.attempt} was taken here before, and this copy is "
        "no broker redelivery: a replay",
        body=body,
        hint="a task is published once; see docs/security.md §7",
    )


def _open(
    capability: str, message: AbstractIncomingMessage, keyring: KeyRing, checks: TaskChecks
) -> Task:
    """The delivery's task, checked (size, signature and its key's scope, schema, audience,
    clocks, deadline, attempt record, capability, reply address)."""
    task = open_task(message.body, message.headers or {}, keyring, checks).task
    if task.capability != capability:
        raise WrongCapability(
            f"task {task.task_id} names capability {task.capability!r} but arrived on "
            f"{capability!r}",
            body=message.body,
            task=task,
        )
    if task.reply_to and not names.valid_reply_address(task.reply_to):
        # Signed, but no executor account may publish there: answered at noreply.<cap>.
        raise InvalidMessage(
            f"task {task.task_id}: reply_to {task.reply_to!r} is not a reply address "
            "(reply.<dispatcher id>)",
            body=message.body,
            task=task,
            hint="reply_to is reply.<dispatcher id> or empty (docs/wire-format.md §4.1)",
        )
    if message.reply_to is not None and message.reply_to != task.reply_to:
        # Only the body is signed: an AMQP reply_to that differs was changed on the way.
        raise InvalidMessage(
            f"task {task.task_id}: AMQP reply_to {printable(message.reply_to)!r} differs from "
            f"the signed body's reply_to {task.reply_to!r}",
            body=message.body,
            task=task,
            hint="set the AMQP reply_to property to the body's reply_to, or leave it out",
        )
    return task


_HINT = "add {!r} to topology/wayang.toml and run `wayang-mq topology apply`"


async def _shard_queues(capability: str, exists: Callable[[str], Awaitable[bool]]) -> list[str]:
    """The capability's shard queues (0, 1, ... while they exist); none: it has one queue
    (or none, and consume() says what to do)."""
    if await exists(names.task_queue(capability)):
        return []
    found: list[str] = []
    while await exists(names.task_queue(capability, len(found))):
        found.append(names.task_queue(capability, len(found)))
    return found
