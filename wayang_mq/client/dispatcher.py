"""The dispatcher: what a workflow engine uses to publish tasks and collect their results.

Tasks are signed, published ``mandatory`` with publisher confirms (a capability with no queue
is a typed :class:`NoExecutor`, never a silent drop; a full queue is retried with backoff for
a bounded time, then a typed :class:`Backpressure`). Results come back on the dispatcher's own
durable reply queue and are deduplicated by task id: the first terminal result wins.

The tasks outstanding (submitted, not yet answered) are bounded by ``max_outstanding``: a
submit past it waits, for the same bounded time, for one to end, then raises
:class:`TooManyOutstanding` (a ``Backpressure``), so the dispatcher's memory stays bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypedDict, Unpack

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from prometheus_client import REGISTRY, CollectorRegistry

from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.control import ControlClient, StatusSummary, summarize
from wayang_mq.amqp.endpoint import split_urls
from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp
from wayang_mq.client.backpressure import publish_task
from wayang_mq.client.outstanding import Slots
from wayang_mq.client.progress import ProgressFeed
from wayang_mq.client.replies import (
    Replies,
    ResultListener,
    ResultSeen,
    TaskHandle,
    Verdict,
)
from wayang_mq.client.supervisor import SupervisionConfig, Supervisor
from wayang_mq.core import logs, names
from wayang_mq.core.authority import DECIDED_BY_DISPATCHER
from wayang_mq.core.bounded import LastSeen
from wayang_mq.core.durations import Seconds, to_ms, to_ms_or_none
from wayang_mq.core.envelope import compensation_of
from wayang_mq.core.errors import ErrorCode, TooManyOutstanding, WayangError
from wayang_mq.core.fields import printable
from wayang_mq.core.model import (
    DEFAULT_AUDIENCE,
    Compensation,
    ErrorInfo,
    JsonLike,
    PolicyConstraints,
    Result,
    RetryHints,
    Task,
    new_id,
    now_ms,
)
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import WireMessage, signed_message, task_message
from wayang_mq.observability import tracing
from wayang_mq.observability.metrics import DispatcherMetrics, dispatcher_metrics

log = logging.getLogger("wayang_mq.client.dispatcher")

__all__ = [
    "DECIDED_BY_DISPATCHER",
    "Dispatcher",
    "DispatcherConfig",
    "ResultListener",
    "ResultSeen",
    "TaskHandle",
    "TaskOptions",
    "Verdict",
]

#: an idle reply queue (no consumer: its dispatcher gone) is deleted by the broker after this
#: long. Long enough for a dispatcher cut off by a network fault to reconnect (aio-pika tries
#: every 5 s; after a broker restart the broker starts the count again) and find the results
#: published meanwhile; short enough that a finished process's queue does not linger for a day.
REPLY_QUEUE_EXPIRES_S = 600.0
#: the CLI's dispatchers live for one command: their queue goes a minute after they exit
CLI_REPLY_QUEUE_EXPIRES_S = 60.0
#: reply queue arguments the console shows: whose queue it is, and the reply address that
#: reaches it (results are published to wayang.results with the task's reply_to as key)
OWNER_ARGUMENT = "x-wayang-owner"
REPLY_TO_ARGUMENT = "x-wayang-reply-to"


#: how long a task may wait in its queue when the caller does not say
DEFAULT_QUEUE_TIMEOUT_S = 60.0
#: tasks a dispatcher may have outstanding (submitted, no terminal result yet) by default.
#: Each costs about 7 KB of dispatcher memory while it waits (bench/backlog.py measured
#: 6.9 KB: its Task, futures, handle and trace), so this bounds a dispatcher's outstanding
#: state at about 350 MB; far above what one caller awaits at a time (a bench keeps a few
#: hundred in flight), low enough that a caller which never awaits is stopped, not swapped.
DEFAULT_MAX_OUTSTANDING = 50_000


class TaskOptions(TypedDict, total=False):
    """What a caller may say of a task besides its capability and input (all optional).

    Durations are seconds (int or float) or a ``timedelta``, converted to the wire's
    milliseconds in one place (:mod:`wayang_mq.core.durations`). A typed dict, so a misspelt
    option is a type error, not a silently ignored keyword.
    """

    queue_timeout_s: Seconds | None  # the deadline: no executor starts the task later (60)
    timeout_s: Seconds | None  # execution timeout: the run is cancelled, FAILED timeout
    heartbeat_timeout_s: Seconds | None  # a silent executor's task is re-dispatched
    retry: RetryHints | None  # how failed attempts are retried (default: not at all)
    policy: PolicyConstraints | None  # where and how it may run
    compensation: Compensation | None  # dispatched if the task fails for good
    node_id: str | None  # the workflow node it executes (default: the task id)
    task_id: str | None  # idempotency: the same id is answered, not run again
    token: str | None  # the execution token (default: a fresh one)
    partition_key: str | None  # order per key on a sharded capability
    idempotency_key: str | None  # side effects once per key
    not_before_ms: int | None  # no executor may start it before this instant
    #: the W3C trace to continue (default: OpenTelemetry's current span, else the task this
    #: process is executing, else a new trace); an invalid value is ignored (logged)
    traceparent: str | None
    tracestate: str | None  # the W3C tracestate that goes with traceparent


@dataclass(frozen=True)
class DispatcherConfig:
    """How a dispatcher connects, signs and waits."""

    amqp_url: str = field(repr=False)
    signer: Signer
    results_keyring: KeyRing  # executors' (and the reaper's) keys: every result is verified
    dispatcher_id: str = field(default_factory=lambda: f"d-{new_id()[:8]}")
    issuer: str | None = None  # the id its key's scope names (default: dispatcher_id)
    audience: str = DEFAULT_AUDIENCE  # the deployment its tasks are for
    #: how long a full queue is retried before Backpressure, and how long a submit past
    #: max_outstanding waits for a task to end before TooManyOutstanding
    backpressure_wait_s: float = 10.0
    #: tasks outstanding at most (submitted, no terminal result yet; ~7 KB each): a submit
    #: past it waits, first come first served, then raises TooManyOutstanding (a Backpressure)
    max_outstanding: int = DEFAULT_MAX_OUTSTANDING
    prefetch: int = 512
    seen_results: int = 10_000  # terminal results kept: duplicates dropped, resubmits answered
    supervision: SupervisionConfig | None = field(default_factory=SupervisionConfig)
    #: the reply queue is deleted this long after its last consumer went (x-expires)
    reply_queue_expires_s: float = REPLY_QUEUE_EXPIRES_S


class Dispatcher:
    """Publishes signed tasks and routes their results back to waiting handles.

    Its metrics (docs/observability.md) go to ``registry``, the embedding process's
    (``prometheus_client.REGISTRY`` unless given; None: not counted); the process exports it.
    """

    def __init__(
        self, config: DispatcherConfig, *, registry: CollectorRegistry | None = REGISTRY
    ) -> None:
        if not names.valid_word(config.dispatcher_id):
            raise ValueError(f"dispatcher id {config.dispatcher_id!r} is not one lowercase word")
        self.config = config
        self.dispatcher_id = config.dispatcher_id
        self.reply_to = names.reply_routing_key(config.dispatcher_id)
        #: who its tasks say issued them: its key's scope must name the same id
        self.issuer = config.issuer or config.dispatcher_id
        self._progress = ProgressFeed(config.dispatcher_id, config.results_keyring)
        self._replies = Replies(
            config.results_keyring,
            config.seen_results,
            self._unwatch,
            self._progress.events,
            slots=Slots(config.max_outstanding),
        )
        self._control: ControlClient | None = None
        self._supervisor: Supervisor | None = None
        self._connection: AbstractRobustConnection | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._metrics: DispatcherMetrics | None = None
        if registry is not None:
            self._metrics = dispatcher_metrics(registry)
            self._replies.observe(self._count_result)
        #: the traces of recent tasks, for a resubmit of one already answered; a task still
        #: waiting keeps its own in the book of replies (never forgotten while it waits)
        self._traces: LastSeen[tracing.TraceContext] = LastSeen(config.seen_results)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, declare and bind the reply queue, start consuming results."""
        self._connection = await connect(self.config.amqp_url, f"dispatcher {self.dispatcher_id}")
        self._progress.attach(self._connection)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        # A caller must not hang on a broker alarm: it gets BrokerBlocked (a Backpressure)
        # after the same bounded wait as for a full queue.
        self._publisher = ConfirmedPublisher(
            channel,
            blocked_wait_s=self.config.backpressure_wait_s,
            slow_confirm_s=max(5.0, self.config.backpressure_wait_s),
            metrics=self._metrics.publish if self._metrics is not None else None,
        )
        replies, queue = await self._reply_queue(self._connection)
        await queue.bind(names.RESULTS_EXCHANGE, self.reply_to)
        await queue.consume(self._replies.on_message, consumer_tag=f"{self.dispatcher_id}/replies")
        self._control = ControlClient(
            self._publisher,
            self.config.signer,
            self.dispatcher_id,
            self.config.results_keyring,
            self.issuer,
        )
        await self._control.start(replies)
        if self.config.supervision is not None:
            self._supervisor = Supervisor(
                self, self.config.supervision, self.config.results_keyring
            )
            await self._supervisor.start(replies)

    async def _reply_queue(
        self, connection: AbstractRobustConnection
    ) -> tuple[AbstractChannel, AbstractQueue]:
        """Declare ``wayang.reply.<id>``: durable, so results published while the broker
        restarts are kept; ``x-expires``, so the broker deletes it once its dispatcher is gone;
        and arguments that say whose it is (RabbitMQ keeps unknown ``x-`` arguments and shows
        them in the console, and leaves them out of a redeclare's equivalence check).

        A queue of this id declared earlier with another expiry (a fixed dispatcher id, an
        older version) is used as it is, with a warning: a queue's arguments cannot change.
        """
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.config.prefetch)
        name = names.reply_queue(self.dispatcher_id)
        arguments = {
            "x-expires": max(1, int(self.config.reply_queue_expires_s * 1000)),
            OWNER_ARGUMENT: f"dispatcher {self.dispatcher_id} ({names.default_id()})",
            REPLY_TO_ARGUMENT: self.reply_to,
        }
        if len(split_urls(self.config.amqp_url)) > 1:
            # A cluster: a classic queue lives on one node, and with that node down it can be
            # neither consumed nor declared again, so the dispatcher could not come back on
            # another node. A quorum queue has a replica on every node (docs/cluster.md).
            arguments["x-queue-type"] = "quorum"
        try:
            return channel, await channel.declare_queue(name, durable=True, arguments=arguments)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            logs.event(
                log,
                "dispatcher.reply_queue_kept",
                logging.WARNING,
                queue=name,
                reason=str(exc),
                hint=f"delete {name} once idle to get the current expiry",
            )
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.config.prefetch)
        return channel, await channel.declare_queue(name, passive=True)

    async def close(self) -> None:
        """Close the connection; handles still waiting get ``ResultTimeout`` when awaited."""
        if self._supervisor is not None:
            await self._supervisor.stop()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    def task(
        self,
        capability: str,
        input: dict[str, JsonLike] | None = None,
        **options: Unpack[TaskOptions],
    ) -> Task:
        """Build a task addressed back to this dispatcher (not yet published)."""
        queue_timeout = options.get("queue_timeout_s")
        return Task.create(
            capability,
            input,
            queue_timeout_ms=to_ms(
                DEFAULT_QUEUE_TIMEOUT_S if queue_timeout is None else queue_timeout
            ),
            timeout_ms=to_ms_or_none(options.get("timeout_s")),
            heartbeat_timeout_ms=to_ms_or_none(options.get("heartbeat_timeout_s")),
            retry=options.get("retry"),
            policy=options.get("policy"),
            compensation=options.get("compensation"),
            task_id=options.get("task_id"),
            token=options.get("token"),
            node_id=options.get("node_id"),
            partition_key=options.get("partition_key"),
            idempotency_key=options.get("idempotency_key"),
            reply_to=self.reply_to,
            issuer=self.issuer,
            audience=self.config.audience,
            not_before_ms=options.get("not_before_ms"),
        )

    async def submit(
        self,
        capability: str,
        input: dict[str, JsonLike] | None = None,
        **options: Unpack[TaskOptions],
    ) -> TaskHandle:
        """Build, sign and publish a task; returns once the broker has confirmed it."""
        task = self.task(capability, input, **options)
        traceparent, tracestate = options.get("traceparent"), options.get("tracestate")
        return await self.submit_task(task, traceparent=traceparent, tracestate=tracestate)

    async def submit_task(
        self, task: Task, *, traceparent: str | None = None, tracestate: str | None = None
    ) -> TaskHandle:
        """Publish an already built task (its ``reply_to`` should be this dispatcher's), in
        the trace ``traceparent`` names (see :class:`TaskOptions`).

        With ``max_outstanding`` tasks waiting for their results, it waits up to
        ``backpressure_wait_s`` for one to end, then raises :class:`TooManyOutstanding`.
        """
        return await self._submit(task, _caller_trace(traceparent, tracestate))

    async def _submit(
        self, task: Task, parent: tracing.TraceContext | None, *, replacing: bool = False
    ) -> TaskHandle:
        """``replacing``: the task takes the place of one about to end (the compensation of
        a task expiring here), so it takes a slot without waiting for one."""
        if self._publisher is None:
            raise WayangError("dispatcher is not started", hint="use `async with Dispatcher(...)`")
        # idempotent: a task id answered or on its way is not run again (and takes no slot)
        known = self._known(task)
        if known is not None:
            return known
        if replacing:
            self._replies.slots.take_now()
        else:
            await self._take_slot(task)
            known = self._known(task)  # submitted meanwhile, while this one waited
            if known is not None:
                self._replies.slots.give_back()
                return known
        handle = self._replies.expect(task)
        started = time.monotonic()
        try:
            trace = await self._publish_traced(task, parent)
        except BaseException:
            self._replies.forget(task.task_id)  # gives its slot back
            raise
        if self._metrics is not None:
            submitted, round_trip = self._metrics.per_capability(task.capability)
            submitted.inc()
            handle.when_answered(lambda _: round_trip.observe(time.monotonic() - started))
        self._replies.traced(task.task_id, trace)
        self._traces.put(task.task_id, trace)
        handle.traceparent = trace.traceparent
        return handle

    def _known(self, task: Task) -> TaskHandle | None:
        """The handle of a task already answered or waiting here, with its trace."""
        known = self._replies.handle(task)
        if known is not None:
            known.traceparent = _traceparent(self._trace(task.task_id))
        return known

    async def _take_slot(self, task: Task) -> None:
        """An outstanding slot for ``task``, waiting (FIFO) up to ``backpressure_wait_s``."""
        slots = self._replies.slots
        started = time.monotonic()
        if await slots.take(self.config.backpressure_wait_s):
            return
        waited = time.monotonic() - started
        logs.event(
            log,
            "task.too_many_outstanding",
            logging.WARNING,
            task_id=task.task_id,
            capability=task.capability,
            max_outstanding=slots.limit,
            waited_s=round(waited, 3),
        )
        raise TooManyOutstanding(slots.limit, waited)

    def _trace(self, task_id: str) -> tracing.TraceContext | None:
        """The trace a task was published in: kept while it waits, then while it is recent."""
        trace = self._replies.trace(task_id)
        return trace if trace is not None else self._traces.get(task_id)

    async def _publish_traced(
        self, task: Task, parent: tracing.TraceContext | None
    ) -> tracing.TraceContext:
        """Publish the task as a ``publish`` span (a child of ``parent``, or of the ambient
        trace), its lines carrying the task's fields; the span's context goes in its headers."""
        span = tracing.start_span(
            "publish",
            kind="producer",
            parent=parent or tracing.ambient(),
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.destination.name": names.TASKS_EXCHANGE,
                "wayang.task_id": task.task_id,
                "wayang.capability": task.capability,
                "wayang.attempt": task.attempt,
            },
        )
        fields = {"task_id": task.task_id, "node_id": task.node_id, "attempt": task.attempt}
        with logs.bound(**fields, capability=task.capability, trace_id=span.context.trace_id):
            try:
                message = _with_trace(task_message(task, self.config.signer), span.context)
                await self._publish_with_backpressure(task, to_amqp(message))
            except BaseException as exc:
                span.end(error=f"{type(exc).__name__}: {exc}"[:500])
                raise
        span.end()
        return span.context

    async def _publish_with_backpressure(self, task: Task, message: aio_pika.Message) -> None:
        assert self._publisher is not None
        await publish_task(self._publisher, task, message, self.config.backpressure_wait_s)

    async def run(
        self,
        capability: str,
        input: dict[str, JsonLike] | None = None,
        *,
        wait_s: float | None = None,
        **options: Unpack[TaskOptions],
    ) -> Result:
        """Submit and wait ``wait_s`` (forever by default) for the terminal result."""
        handle = await self.submit(capability, input, **options)
        return await handle.result(wait_s)

    async def cancel(self, task_id: str, reason: str = "") -> bool:
        """Ask every executor to cancel the task; False when no executor is listening.

        A running task ends FAILED ``cancelled``; one still queued is answered ``cancelled``
        by the executor that receives it (executors started after the request do not know).
        """
        return await self._started_control().cancel(task_id, reason)

    async def status(self, task_id: str, wait_s: float = 1.0) -> StatusSummary:
        """Ask the executors, for ``wait_s``, what they know of the task."""
        task = self._replies.current(task_id)
        capability = task.capability if task is not None else None
        reports = await self._started_control().status(task_id, wait_s, capability)
        finished = self._replies.finished(task_id)
        return summarize(task_id, reports, finished.status if finished else None)

    # -- supervision: what the Supervisor asks of the dispatcher ---------------------------

    def pending_tasks(self) -> list[Task]:
        """The current attempt of every task still waiting for its terminal result."""
        return self._replies.waiting()

    def is_pending(self, task_id: str) -> bool:
        """True while the task waits for its terminal result here."""
        return self._replies.is_waiting(task_id)

    def pending_task(self, task_id: str) -> Task | None:
        """The current attempt of a task waiting here, if it is one."""
        return self._replies.current(task_id)

    def is_accepted(self, task_id: str) -> bool:
        """True once a PENDING result said the task was accepted (it is answered later)."""
        return self._replies.is_accepted(task_id)

    @property
    def outstanding(self) -> int:
        """Tasks submitted here still waiting for their terminal result (at most
        ``max_outstanding``, but for compensations of tasks that expired)."""
        return self._replies.outstanding

    async def expire(self, task: Task) -> None:
        """End a task nobody started before its deadline: FAILED ``timeout``, decided here."""
        trace = self._trace(task.task_id)
        with logs.bound(**_task_fields(task, trace)):
            await self._expire(task, trace)

    async def _expire(self, task: Task, trace: tracing.TraceContext | None) -> None:
        logs.event(
            log, "task.expired", logging.WARNING, task_id=task.task_id, deadline_ms=task.deadline_ms
        )
        result = Result.failure(
            task,
            f"{DECIDED_BY_DISPATCHER}{self.issuer}",
            ErrorInfo(
                code=ErrorCode.TIMEOUT,
                message="no executor started the task before "
                "its deadline (it may wait behind others in its queue)",
            ),
        )
        compensation = compensation_of(task, result.error) if result.error else None
        if compensation is not None:
            # derived from the task (same id and token wherever it is derived), given a fresh
            # window: the task's own deadline has just passed
            fresh = {"deadline_ms": now_ms() + task.queue_window_ms}
            compensation = compensation.model_copy(update=fresh)
            # it takes the expiring task's place: it must not wait for that task's own slot
            await self._submit(compensation, trace, replacing=True)
            result = result.model_copy(update={"compensation_task_id": compensation.task_id})
        self._replies.deliver(result, trace)
        # Also on the wire, so whatever records results (a control plane, an audit) sees
        # this terminal result too; its echo back here is a duplicate and dropped.
        assert self._publisher is not None
        signed = signed_message(
            result,
            self.config.signer,
            message_id=task.task_id,
            extra_headers=trace.headers() if trace is not None else None,
        )
        message = to_amqp(signed)
        with contextlib.suppress(WayangError):
            await self._publisher.publish(names.RESULTS_EXCHANGE, self.reply_to, message)

    async def reassign(self, task: Task, silent_executor: str) -> None:
        """Re-dispatch a task whose executor went silent: a new attempt with a new token,
        so the old attempt's late result is recognised and discarded."""
        fresh = task.next_attempt(token=new_id(), deadline_ms=now_ms() + task.queue_window_ms)
        self._replies.replace(fresh)
        trace = self._trace(task.task_id)
        with logs.bound(**_task_fields(task, trace)):
            logs.event(
                log,
                "task.reassigned",
                logging.WARNING,
                task_id=task.task_id,
                silent_executor=silent_executor,
                attempt=fresh.attempt,
            )
        trace = await self._publish_traced(fresh, trace)
        self._replies.traced(task.task_id, trace)
        self._traces.put(task.task_id, trace)

    def observe(self, listener: ResultListener) -> Callable[[], None]:
        """Tell ``listener`` about every result from now on, and what became of it.

        Every result the reply queue delivers (handed out, dropped as a duplicate, fenced,
        unclaimed, invalid, PENDING) and every one the dispatcher decides itself (an expiry).
        An auditor such as :class:`wayang_mq.testing.ledger.Ledger` uses it to see each
        hand-out and each drop, not just the one result a caller awaits. Returns a function
        that stops it.
        """
        return self._replies.observe(listener)

    async def result_of(self, task_id: str, timeout_s: float | None = None) -> Result:
        """The terminal result of any task answered to this dispatcher, by id (for example
        a compensation named in a result's ``compensation_task_id``)."""
        return await self._replies.result_of(task_id, timeout_s)

    def _count_result(self, seen: ResultSeen) -> None:
        """Metrics: a terminal result taken as its task's answer."""
        result = seen.result
        if result is not None and seen.verdict in (Verdict.HANDED_OUT, Verdict.UNCLAIMED):
            assert self._metrics is not None
            code = result.error.code if result.error is not None else None
            self._metrics.result(result.capability, result.status, code)

    def _unwatch(self, task_id: str) -> None:
        if self._supervisor is not None:
            self._supervisor.forget(task_id)

    def _started_control(self) -> ControlClient:
        if self._control is None:
            raise WayangError("dispatcher is not started", hint="use `async with Dispatcher(...)`")
        return self._control


def _caller_trace(traceparent: str | None, tracestate: str | None) -> tracing.TraceContext | None:
    """The trace a caller named, if valid; an invalid one is logged and ignored (the task
    starts a trace of its own: a tracing header never fails a task)."""
    if traceparent is None:
        return None
    trace = tracing.parse(traceparent, tracestate)
    if trace is None:
        logs.event(
            log,
            "trace.ignored",
            logging.WARNING,
            traceparent=printable(traceparent, limit=100),
            reason="not a W3C traceparent (version 00: 00-<32 hex>-<16 hex>-<2 hex>)",
        )
    return trace


def _traceparent(trace: tracing.TraceContext | None) -> str | None:
    return trace.traceparent if trace is not None else None


def _with_trace(message: WireMessage, trace: tracing.TraceContext) -> WireMessage:
    """The message with the trace's headers (not signed: advisory)."""
    return dataclasses.replace(message, headers={**message.headers, **trace.headers()})


def _task_fields(task: Task, trace: tracing.TraceContext | None) -> dict[str, object]:
    """The fields a dispatcher's lines about ``task`` carry."""
    return {
        "task_id": task.task_id,
        "node_id": task.node_id,
        "capability": task.capability,
        "attempt": task.attempt,
        "trace_id": trace.trace_id if trace is not None else None,
    }
