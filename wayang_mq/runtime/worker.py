"""The worker daemon: consumes its capabilities' queues and runs executors on them.

Per delivery the worker reads as a sentence: open the task (size, signature, schema, deadline,
capability) → answer it from what it knows, or run it → decide its :class:`Outcome` (done,
retry, dead letter, requeue) → :func:`settle` publishes what the outcome carries, waits for
the broker's confirms, and only then acks. Every exit becomes an outcome in
:meth:`Worker._handle`, a shutdown or a bug of ours included; middleware sees each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import msgpack
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.control import ControlServer
from wayang_mq.amqp.outcome import Kind, LogLine, Outcome, Send, Settle, done, requeue, settle
from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp
from wayang_mq.core import logs, names, retry
from wayang_mq.core.errors import (
    ConfigError,
    ErrorCode,
    ExecutorError,
    WayangError,
    WireError,
    WrongCapability,
)
from wayang_mq.core.model import (
    ErrorInfo,
    Heartbeat,
    Progress,
    Registration,
    Result,
    Status,
    Task,
    WireModel,
    new_id,
    now_ms,
)
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import (
    DEAD_LETTERED_BY_HEADER,
    DEFAULT_MAX_BODY_BYTES,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    open_task,
    signed_message,
    task_message,
)
from wayang_mq.runtime.compensation import dispatch_compensation
from wayang_mq.runtime.context import TaskContext, bind, unbind
from wayang_mq.runtime.executor import Executor, TaskState, TaskStatus, check_capabilities
from wayang_mq.runtime.middleware import Chain, Executed, Middleware, Opened, Settled
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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    recent_results: int = 10_000  # results kept to answer a redelivered finished task
    recent_results_bytes: int = 16 * 1024 * 1024  # and their outputs' size, at most
    retry_tiers: tuple[RetryTier, ...] = ()  # from the topology; none: failures are final
    middleware: tuple[Middleware, ...] = ()  # layers around every delivery, in this order

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if self.prefetch is not None and self.prefetch < 1:
            raise ConfigError("prefetch must be at least 1")
        if not names.valid_word(self.executor_id):
            raise ConfigError(
                f"executor id {self.executor_id!r} must be lowercase letters, digits, '-' or '_'"
            )


@dataclass
class _Running:
    """A task this worker is executing."""

    task: Task
    context: TaskContext
    job: asyncio.Task[Any]
    cancel_reason: str | None = None


class Worker:
    """Runs executors on their capabilities' queues until ``stop()``."""

    def __init__(self, executors: Sequence[Executor], config: WorkerConfig) -> None:
        self.config = config
        self.executor_id = config.executor_id
        self._by_capability = check_capabilities(executors)
        self._executors = list(executors)
        self._slots = asyncio.Semaphore(config.concurrency)
        self._chain = Chain(config.middleware)
        self._running: dict[str, _Running] = {}
        self._recent: OrderedDict[str, tuple[Result, int]] = OrderedDict()  # result, bytes
        self._recent_bytes = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._shutting_down = False
        self._heartbeat_seq = 0
        self._connection: AbstractRobustConnection | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._control: ControlServer | None = None
        for executor in executors:
            executor.attach(self)

    # -- the executor contract, answered for attached executors -------------------------

    def status(self, task_id: str) -> TaskStatus:
        """Running here (with its last progress), finished here recently, or unknown."""
        running = self._running.get(task_id)
        if running is not None:
            return TaskStatus(
                task_id,
                TaskState.RUNNING,
                self.executor_id,
                running.task.attempt,
                running.context.last_progress,
            )
        if task_id in self._recent:
            recent, _ = self._recent[task_id]
            return TaskStatus(
                task_id,
                TaskState.FINISHED,
                self.executor_id,
                recent.attempt,
                outcome=recent.status,
            )
        return TaskStatus(task_id, TaskState.UNKNOWN, self.executor_id)

    def cancel(self, task_id: str, reason: str = "") -> bool:
        """Cancel a running task; it ends FAILED ``cancelled``."""
        running = self._running.get(task_id)
        if running is None:
            return False
        running.cancel_reason = reason or "cancel requested"
        running.context.cancelled.set()
        running.job.cancel()
        return True

    def heartbeat(self) -> Heartbeat:
        """This worker's liveness and load right now."""
        return Heartbeat(
            executor_id=self.executor_id,
            capabilities=tuple(self._by_capability),
            in_flight=tuple(self._running),
            details={
                task_id: dict(running.context.heartbeat_details)
                for task_id, running in self._running.items()
                if running.context.heartbeat_details
            },
            concurrency=self.config.concurrency,
            sequence=self._heartbeat_seq,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, register, consume and heartbeat until ``stop()``; then drain and close."""
        for executor in self._executors:
            await executor.setup()
        connection = await connect(self.config.amqp_url, self.executor_id)
        self._connection = connection
        try:
            await self._start(connection)
            logs.event(
                log,
                "worker.started",
                executor=self.executor_id,
                capabilities=",".join(self._by_capability),
                concurrency=self.config.concurrency,
            )
            self._ready.set()
            beat = asyncio.create_task(self._heartbeat_loop())
            await self._stopping.wait()
            beat.cancel()
            await self._drain()
        finally:
            await connection.close()
            for executor in self._executors:
                await executor.teardown()
            logs.event(log, "worker.stopped", executor=self.executor_id)

    async def wait_ready(self) -> None:
        """Until the worker is consuming (tests and the dev stack use this)."""
        await self._ready.wait()

    def stop(self) -> None:
        """Stop consuming; in-flight tasks get ``grace_s`` to finish."""
        self._stopping.set()

    async def _start(self, connection: AbstractRobustConnection) -> None:
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._publisher = ConfirmedPublisher(publish_channel)
        await self._emit(
            Registration(
                executor_id=self.executor_id,
                capabilities=tuple(self._by_capability),
                concurrency=self.config.concurrency,
                metadata={k: v for e in self._executors for k, v in e.metadata.items()},
            ),
            names.event_key("registered", self.executor_id),
        )
        consume_channel = await connection.channel()
        self._control = ControlServer(
            self, self.config.keyring, self.config.signer, self._publisher
        )
        await self._control.start(consume_channel)
        prefetch = self.config.prefetch or self.config.concurrency
        await consume_channel.set_qos(prefetch_count=prefetch)
        for capability in self._by_capability:
            for queue_name in await _discover_queues(connection, capability):
                # declare_queue (passive), not get_queue: only declared queues are recorded by
                # the robust channel, and only recorded ones get their consumers back after a
                # reconnect.
                queue = await consume_channel.declare_queue(queue_name, passive=True)
                tag = await queue.consume(self._spawner(capability))
                self._consumers.append((queue, tag))

    def _spawner(self, capability: str) -> Any:
        """The consume callback: start a handler task and return at once (prefetch bounds)."""

        async def on_message(message: AbstractIncomingMessage) -> None:
            handler = asyncio.create_task(self._handle(capability, message))
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)

        return on_message

    async def _drain(self) -> None:
        """Cancel consumers, let in-flight work finish within the grace, return the rest."""
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        if self._handlers:
            logs.event(
                log,
                "worker.draining",
                executor=self.executor_id,
                in_flight=len(self._handlers),
                grace_s=self.config.grace_s,
            )
            _, pending = await asyncio.wait(set(self._handlers), timeout=self.config.grace_s)
            self._shutting_down = True
            for handler in pending:
                handler.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- one delivery ---------------------------------------------------------------------

    async def _handle(self, capability: str, message: AbstractIncomingMessage) -> None:
        """Every delivery becomes one Outcome, carried out by ``settle``: the only exit."""
        try:
            async with self._slots:
                outcome = await self._decide_safely(capability, message)
                applied = await settle(message, outcome, self._publisher)
                await self._chain.settled(Settled(self.executor_id, capability, applied))
                if applied.kind is Kind.RETRY and applied.result is not None:
                    # best effort, after the next attempt is safely in its tier
                    await self._emit(
                        applied.result, names.event_key("attempt", applied.result.task_id)
                    )
        except asyncio.CancelledError:
            # Shutdown past the grace period: the broker gets the delivery back, unharmed.
            await settle(message, requeue(message.message_id, "stopped past the grace"))
            raise
        except Exception:
            # A bug in carrying the outcome out must not strand the delivery either (a
            # settle of a delivery already settled is skipped and logged).
            log.exception("event=worker.bug task_id=%s next=requeued", message.message_id)
            await settle(message, requeue(message.message_id, "a bug in settling (logged above)"))

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
        if self._stopping.is_set():
            # Held (prefetch > concurrency) but never started, and the worker is stopping:
            # give it back instead of starting it within the grace. basic.cancel leaves what
            # a consumer holds with it; a nack with requeue returns it, for another worker.
            return requeue(message.message_id, "stopping", event="task.returned")
        try:
            task = self._open(capability, message)
        except WireError as exc:
            return self._bad_input(capability, message, exc)
        await self._chain.opened(Opened(self.executor_id, capability, task))
        result = (
            self._already_answered(task)
            or self._cancelled_before_start(task)
            or await self._join_running(task)
            or await self._execute(task)
        )
        result = await self._chain.executed(Executed(self.executor_id, task, result))
        return await self._conclude(capability, message, task, result)

    def _open(self, capability: str, message: AbstractIncomingMessage) -> Task:
        task = open_task(
            message.body,
            message.headers or {},
            self.config.keyring,
            max_body_bytes=self.config.max_body_bytes,
        )
        if task.capability != capability:
            raise WrongCapability(
                f"task {task.task_id} names capability {task.capability!r} but arrived on "
                f"{capability!r}",
                body=message.body,
            )
        return task

    async def _execute(self, task: Task) -> Result:
        """Run the executor; every way it can end becomes a Result (SUCCESS or FAILED)."""
        started = time.monotonic()
        context = TaskContext(task, self.executor_id, self._progress_sink)
        job = asyncio.create_task(self._call(task, context))
        running = _Running(task, context, job)
        self._running[task.task_id] = running
        if task.heartbeat_timeout_ms is not None:
            # A supervisor watches only tasks it has seen in flight: show this one at once,
            # so a hang within the first heartbeat interval is caught too.
            await self._send_heartbeat()
        logs.event(  # DEBUG: task.finished is the one INFO line per task (a measured 5% of CPU)
            log,
            "task.started",
            logging.DEBUG,
            task_id=task.task_id,
            capability=task.capability,
            attempt=task.attempt,
            executor=self.executor_id,
        )
        try:
            output = await job
            status, error = Status.SUCCESS, None
        except asyncio.CancelledError:
            if running.cancel_reason is None or self._shutting_down:
                job.cancel()
                raise
            output = None
            status, error = (
                Status.FAILED,
                ErrorInfo(code=ErrorCode.CANCELLED, message=running.cancel_reason),
            )
        except Exception as exc:  # executor code may raise anything; it becomes a result
            output, status, error = None, Status.FAILED, _error_info(exc)
        finally:
            if self._running.get(task.task_id) is running:
                del self._running[task.task_id]
        result, output_bytes = _result(
            task, self.executor_id, status, output, error, context, started
        )
        self._remember(result, output_bytes)
        logs.event(
            log,
            "task.finished",
            task_id=task.task_id,
            status=result.status,
            code=result.error.code if result.error else None,
            duration_ms=result.metrics["duration_ms"],
        )
        return result

    async def _call(self, task: Task, context: TaskContext) -> Any:
        token = bind(context)
        try:
            executor = self._by_capability[task.capability]
            if task.timeout_ms is None:
                return await executor.execute(task)
            try:
                async with asyncio.timeout(task.timeout_ms / 1000):
                    return await executor.execute(task)
            except TimeoutError:
                raise ExecutorError(
                    f"execution passed its timeout of {task.timeout_ms} ms",
                    code=ErrorCode.TIMEOUT,
                    retryable=True,
                ) from None
        finally:
            unbind(token)

    def _already_answered(self, task: Task) -> Result | None:
        """This attempt's result, if this worker finished it before (a redelivery)."""
        entry = self._recent.get(task.task_id)
        return entry[0] if entry is not None and entry[0].attempt == task.attempt else None

    async def _join_running(self, task: Task) -> Result | None:
        """The same attempt delivered again while it runs here (a publisher that retried after
        a lost confirm, two clients with one task id): wait for that run and answer with its
        result, instead of running the task twice at once."""
        running = self._running.get(task.task_id)
        if running is None or running.task.attempt != task.attempt:
            return None
        logs.event(log, "task.joined", task_id=task.task_id, attempt=task.attempt)
        # The first delivery's handler was waiting on the job before us, so it resumes first
        # and remembers the result (no await in between) before this one looks it up.
        await asyncio.wait({running.job})
        return self._already_answered(task)

    def _cancelled_before_start(self, task: Task) -> Result | None:
        """A task whose cancel arrived before it did is answered, not run."""
        reason = self._control.cancelled(task.task_id) if self._control else None
        if reason is None:
            return None
        logs.event(log, "task.discarded", task_id=task.task_id, reason=reason)
        error = ErrorInfo(code=ErrorCode.CANCELLED, message=reason)
        return Result.failure(task, self.executor_id, error)

    def _remember(self, result: Result, output_bytes: int) -> None:
        """Keep recent results so a redelivered, already-finished task is answered, not rerun.

        Bounded by count and by bytes: a result too large for an eighth of the budget is not
        kept (a redelivery then runs the task again, which at-least-once allows).
        """
        size = output_bytes + 512  # ids, metrics and the model itself, roughly
        budget = self.config.recent_results_bytes
        if size > budget // 8:
            return
        previous = self._recent.pop(result.task_id, None)
        if previous is not None:
            self._recent_bytes -= previous[1]
        self._recent[result.task_id] = (result, size)
        self._recent_bytes += size
        while len(self._recent) > self.config.recent_results or self._recent_bytes > budget:
            _, (_, dropped) = self._recent.popitem(last=False)
            self._recent_bytes -= dropped

    # -- publishing -------------------------------------------------------------------------

    def _signed(self, model: WireModel, message_id: str, **kwargs: Any) -> aio_pika.Message:
        return to_amqp(signed_message(model, self.config.signer, message_id=message_id, **kwargs))

    async def _conclude(
        self, capability: str, message: AbstractIncomingMessage, task: Task, result: Result
    ) -> Outcome:
        """The next attempt through a retry tier, or the task's final answer."""
        error = result.error
        decision = retry.decide(task, error, self.config.retry_tiers) if error else None
        if decision is not None:
            return self._retry(capability, message, task, result, decision)
        return await self._final(capability, message, task, result)

    async def _final(
        self, capability: str, message: AbstractIncomingMessage, task: Task, result: Result
    ) -> Outcome:
        """The terminal result; with retries exhausted, a copy kept in the dead queue first."""
        sends: list[Send] = []
        error = result.error
        if error is not None and retry.exhausted(task, error):
            result = _exhausted(result)
            reason = result.error.message if result.error else ""
            sends.append(
                self._dead_copy(
                    capability, message, task.task_id, ErrorCode.RETRIES_EXHAUSTED, reason
                )
            )
        result = await self._compensate(task, result)
        sends.append(self._result_send(task, result))
        return done(task.task_id, *sends, result=result)

    async def _compensate(self, task: Task, result: Result) -> Result:
        """Dispatch the task's compensation if it failed for good; link it in the result."""
        assert self._publisher is not None
        return await dispatch_compensation(task, result, self._publisher, self.config.signer)

    def _retry(
        self,
        capability: str,
        message: AbstractIncomingMessage,
        task: Task,
        failed: Result,
        decision: retry.RetryDecision,
    ) -> Outcome:
        """The next attempt (a new, re-signed task) to its tier; if no tier queue takes it,
        the task's final answer instead.

        The next attempt keeps its schedule-to-start window, counted from when it leaves the
        tier, so a long backoff does not eat the time it may wait for a worker.
        """
        next_task = task.next_attempt(
            deadline_ms=now_ms() + decision.tier.ttl_ms + task.queue_window_ms,
        )
        key = names.retry_routing_key(decision.tier.name, task.capability)
        message_out = to_amqp(task_message(next_task, self.config.signer, expire=False))
        return Outcome(
            Kind.RETRY,
            Settle.ACK,
            task.task_id,
            (
                Send(
                    names.RETRY_EXCHANGE,
                    key,
                    message_out,
                    mandatory=True,
                    unconfirmed_event="retry.unconfirmed",
                ),
            ),
            result=failed,
            log=LogLine(
                "task.retrying",
                fields={
                    "attempt": decision.attempt,
                    "backoff_ms": decision.backoff_ms,
                    "tier": decision.tier.name,
                    "code": failed.error.code if failed.error else None,
                },
            ),
            if_unroutable=lambda: self._final(capability, message, task, failed),
        )

    def _result_send(self, task: Task, result: Result, reply_to: str = "") -> Send:
        """The result, to be confirmed before the delivery may be acked."""
        routing_key = task.reply_to or reply_to or names.noreply_routing_key(task.capability)
        message = self._signed(result, task.task_id, reply_to=routing_key)
        return Send(names.RESULTS_EXCHANGE, routing_key, message)

    async def _emit(self, event: WireModel, routing_key: str) -> None:
        """Events are best-effort: a lost heartbeat is replaced by the next one."""
        if self._publisher is None:
            return
        message = self._signed(event, routing_key)
        message.delivery_mode = aio_pika.DeliveryMode.NOT_PERSISTENT
        try:
            await self._publisher.publish_once(names.EVENTS_EXCHANGE, routing_key, message)
        except WayangError as exc:
            logs.event(log, "event.dropped", logging.DEBUG, key=routing_key, error=str(exc))

    async def _progress_sink(self, progress: Progress) -> None:
        await self._emit(progress, names.event_key("progress", progress.task_id))

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._send_heartbeat()
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def _send_heartbeat(self) -> None:
        self._heartbeat_seq += 1
        await self._emit(self.heartbeat(), names.event_key("heartbeat", self.executor_id))

    def _bad_input(
        self, capability: str, message: AbstractIncomingMessage, error: WireError
    ) -> Outcome:
        """Bad input: a copy with the reason to ``wayang.dlx``, a FAILED answer, then ack."""
        code = error.code or ErrorCode.INVALID_TASK
        task_id = message.message_id or message.correlation_id or f"unknown-{new_id()}"
        sends = [self._dead_copy(capability, message, task_id, code, error.message)]
        if message.reply_to:
            failed = Result.uncorrelated_failure(
                task_id, capability, self.executor_id, ErrorInfo(code=code, message=error.message)
            )
            signed = self._signed(failed, task_id, reply_to=message.reply_to)
            # a courtesy: the copy is what keeps the task; the answer may be lost with a broker
            sends.append(
                Send(names.RESULTS_EXCHANGE, message.reply_to, signed, if_unconfirmed=None)
            )
        fields = {"capability": capability, "code": code, "reason": error.message}
        return Outcome(
            Kind.DEAD_LETTER,
            Settle.ACK,
            task_id,
            tuple(sends),
            log=LogLine("task.dead_lettered", logging.WARNING, fields),
        )

    def _dead_copy(
        self,
        capability: str,
        message: AbstractIncomingMessage,
        task_id: str,
        code: ErrorCode,
        reason: str,
    ) -> Send:
        """A copy of the delivery, with the reason, for ``wayang.dlx``.

        If the broker does not confirm it, the delivery is rejected instead, so the queue's
        own dead-lettering (reason ``rejected``) keeps it: never lost.
        """
        headers = {
            **(message.headers or {}),
            ERROR_CODE_HEADER: str(code),
            ERROR_MESSAGE_HEADER: reason[:1000],
            DEAD_LETTERED_BY_HEADER: self.executor_id,
        }
        # No expiration on the copy: a dead letter must wait for inspection, not expire.
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            message_id=task_id,
            correlation_id=task_id,
            content_type=message.content_type,
            type=message.type,
            reply_to=message.reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=now_ms() // 1000,  # when it died, as the broker's own x-death says
        )
        return Send(
            names.DEAD_LETTER_EXCHANGE,
            capability,
            copy,
            if_unconfirmed=Settle.REJECT,
            unconfirmed_event="dead_letter.rejected",
        )


async def _discover_queues(connection: AbstractRobustConnection, capability: str) -> list[str]:
    """The capability's queue, or its shard queues; a clear error when neither exists."""
    if await _queue_exists(connection, names.task_queue(capability)):
        return [names.task_queue(capability)]
    shards: list[str] = []
    while await _queue_exists(connection, names.task_queue(capability, len(shards))):
        shards.append(names.task_queue(capability, len(shards)))
    if not shards:
        raise ConfigError(
            f"queue {names.task_queue(capability)} does not exist",
            hint=f"add {capability!r} to topology/wayang.toml and run `wayang-mq topology apply`",
        )
    return shards


async def _queue_exists(connection: AbstractRobustConnection, name: str) -> bool:
    # A passive declare of a missing queue closes its channel (404): one channel per check.
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


def _error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, ExecutorError):
        return ErrorInfo(
            code=exc.code or ErrorCode.EXECUTOR_ERROR,
            message=exc.message,
            retryable=exc.retryable,
            retry_after_ms=None if exc.retry_after_s is None else int(exc.retry_after_s * 1000),
            details=exc.details,
        )
    # An unexpected exception is a bug or a transient fault: retryable, like Temporal's default.
    return ErrorInfo(
        code=ErrorCode.EXECUTOR_ERROR, message=f"{type(exc).__name__}: {exc}", retryable=True
    )


def _result(
    task: Task,
    executor_id: str,
    status: Status,
    output: Any,
    error: ErrorInfo | None,
    context: TaskContext,
    started: float,
) -> tuple[Result, int]:
    """Build the result (and its output's size), turning an output msgpack cannot carry into
    ``invalid_result``."""
    metrics = {
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "queue_ms": float(max(0, now_ms() - task.issued_at_ms)),
    }
    try:
        output_bytes = len(msgpack.packb(output, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        output_bytes = 0
        status, output = Status.FAILED, None
        error = ErrorInfo(code=ErrorCode.INVALID_RESULT, message=f"output cannot be sent: {exc}")
    result = Result(
        task_id=task.task_id,
        token=task.token,
        node_id=task.node_id,
        capability=task.capability,
        status=status,
        executor_id=executor_id,
        attempt=task.attempt,
        output=output,
        error=error,
        metrics=metrics,
        logs=tuple(context.logs),
    )
    return result, output_bytes


def _exhausted(result: Result) -> Result:
    """The last attempt's failure, restated as the task's terminal ``retries_exhausted``."""
    last = result.error
    assert last is not None
    error = ErrorInfo(
        code=ErrorCode.RETRIES_EXHAUSTED,
        message=f"all {result.attempt} attempts failed; last: {last.code}: {last.message}",
        details={"last_error": last.model_dump(mode="json")},
    )
    return result.model_copy(update={"error": error})
