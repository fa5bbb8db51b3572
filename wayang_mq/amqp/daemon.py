"""The consumer daemon base: what the worker, the reaper and the coming control plane share.

A daemon connects (robustly), opens a confirmed publishing channel and a consuming channel
with its prefetch, checks that the queues it consumes exist (the topology owns them; a
missing one is a clear :class:`ConfigError`, never a silent declare), hands each delivery to
its own task, sends heartbeats if it has any, and on ``stop()`` (the CLI maps SIGTERM and
SIGINT to it) cancels its consumers and gives in-flight deliveries ``grace_s`` to finish.
Subclasses say only what is theirs: which queues, what a delivery means, what a heartbeat
says.

With ``health_port`` or ``metrics_port`` set, the daemon answers HTTP there
(:mod:`wayang_mq.observability.http`): ``/metrics`` (with ``metrics_port``: its own
Prometheus registry, :attr:`Daemon.registry`), ``/healthz`` (liveness), ``/readyz``
(readiness: connected, consuming, and each subclass's :meth:`Daemon.ready_checks`), and on
any other path its :class:`Health` as JSON: 200 while it is consuming on a live connection,
503 otherwise (starting, reconnecting, draining).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from wayang_mq.amqp import acks
from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.publisher import ConfirmedPublisher
from wayang_mq.core import logs
from wayang_mq.core.errors import ConfigError
from wayang_mq.observability import http
from wayang_mq.observability.health import Health, State
from wayang_mq.observability.metrics import DaemonMetrics, new_registry

Handler = Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]]


class Daemon:
    """Base of the fabric's consumer daemons; ``run()`` until ``stop()``."""

    kind: ClassVar[str] = "daemon"  # names the log events: worker.started, reaper.stopped

    def __init__(
        self,
        amqp_url: str,
        daemon_id: str,
        *,
        prefetch: int,
        grace_s: float,
        heartbeat_interval_s: float | None = None,
        health_port: int | None = None,
        health_host: str = "127.0.0.1",
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> None:
        self.daemon_id = daemon_id
        self._amqp_url = amqp_url
        self._prefetch = prefetch
        self._grace_s = grace_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._health_port = health_port
        self._health_host = health_host
        self._metrics_port = metrics_port
        self._metrics_host = metrics_host
        self._health_server: asyncio.Server | None = None
        self._metrics_server: asyncio.Server | None = None
        #: this daemon's own Prometheus registry (None: metrics off, nothing is counted)
        self.registry = new_registry() if metrics_port is not None else None
        #: its families; a subclass sets its own kind before ``run()`` (see WorkerMetrics)
        self.metrics: DaemonMetrics | None = None
        self._last_beat: float | None = None
        self._state = State.STARTING
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._ordered: set[str] = set()  # consumer tags kept until the connection closes
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._log = logging.getLogger(f"wayang_mq.{self.kind}")

    # -- what subclasses say ----------------------------------------------------------------

    async def setup(self) -> None:
        """Before connecting (e.g. executors' own setup)."""

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Declare consumers with :meth:`consume`; runs once connected."""

    async def beat(self) -> None:
        """Send one heartbeat (only called when ``heartbeat_interval_s`` is set)."""

    async def teardown(self) -> None:
        """After the connection closed."""

    def describe(self) -> dict[str, Any]:
        """Fields for the started line and the health answer."""
        return {}

    async def ready_checks(self) -> Mapping[str, bool]:
        """The subclass's own readiness checks (e.g. its database answers), for ``/readyz``."""
        return {}

    def connection_name(self) -> str:
        """What the RabbitMQ console calls its connection (``reaper reaper-a``)."""
        return f"{self.kind.replace('_', '-')} {self.daemon_id}"

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, start consuming, heartbeat until ``stop()``; then drain and close."""
        await self.setup()
        connection = await connect(self._amqp_url, self.connection_name())
        self._connection = connection
        try:
            # on_return_raises: a mandatory publish no queue takes surfaces as Unroutable
            publish_channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            if self.registry is not None and self.metrics is None:
                self.metrics = DaemonMetrics(self.registry, self.kind, self.daemon_id, self.ready)
            if self.metrics is not None and self._heartbeat_interval_s is not None:
                self.metrics.heartbeat_age(self._heartbeat_age)
            publish_metrics = self.metrics.publish if self.metrics is not None else None
            self._publisher = ConfirmedPublisher(publish_channel, metrics=publish_metrics)
            self._channel = await connection.channel()
            await self._channel.set_qos(prefetch_count=self._prefetch)
            await self.start(connection)
            await self._serve_http()
            self._state = State.READY
            logs.event(self._log, f"{self.kind}.started", id=self.daemon_id, **self.describe())
            self._ready.set()
            await self._until_stopped()
        finally:
            self._state = State.STOPPED
            for server in (self._health_server, self._metrics_server):
                if server is not None:
                    server.close()
            await connection.close()
            await self.teardown()
            logs.event(self._log, f"{self.kind}.stopped", id=self.daemon_id)

    async def wait_ready(self) -> None:
        """Until the daemon is consuming (tests and the dev stack use this)."""
        await self._ready.wait()

    def stop(self) -> None:
        """Stop consuming; deliveries in flight get ``grace_s`` to finish."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stopping.is_set()

    @property
    def publisher(self) -> ConfirmedPublisher:
        """The confirmed publisher (valid once started)."""
        if self._publisher is None:
            raise RuntimeError(f"{self.kind} {self.daemon_id} is not started")
        return self._publisher

    def health(self) -> Health:
        """What a health probe is told."""
        connection = self._connection
        return Health(
            daemon=self.kind,
            id=self.daemon_id,
            state=self._state,
            connected=connection is not None and connection.connected.is_set(),
            consumers=len(self._consumers),
            in_flight=len(self._handlers),
            details=self.describe(),
        )

    def alive(self) -> bool:
        """Liveness: not stopped (its event loop answering is the rest of it)."""
        return self._state is not State.STOPPED

    def ready(self) -> bool:
        """Readiness as far as known without asking anyone: consuming on a live connection
        (``/readyz`` also runs :meth:`ready_checks`)."""
        return self.health().ok

    async def readiness(self) -> dict[str, bool]:
        """Each readiness check by name; ready when all hold."""
        health = self.health()
        checks = {
            "connected": health.connected,
            "consuming": health.state is State.READY and health.consumers > 0,
        }
        return checks | dict(await self.ready_checks())

    @property
    def health_address(self) -> tuple[str, int] | None:
        """Where the health endpoint listens (the port chosen when 0 was asked)."""
        return _address(self._health_server)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics endpoint listens (the port chosen when 0 was asked)."""
        return _address(self._metrics_server)

    # -- consuming ----------------------------------------------------------------------------

    async def consume(
        self,
        queue_name: str,
        handle: Handler,
        *,
        hint: str,
        label: str | None = None,
        channel: AbstractChannel | None = None,
        ordered: bool = False,
    ) -> None:
        """Consume an existing queue; each delivery runs ``handle`` in its own task. The
        consumer tag says whose it is: ``<daemon id>/<label>`` (default label: the queue's
        name without ``wayang.``), e.g. ``demo-0/demo.echo``. It consumes on the daemon's
        channel, or on ``channel`` (one from :meth:`prefetch_channel`).

        An ``ordered`` consumer (a single-active-consumer shard queue) is not cancelled when
        the daemon stops: a cancel would make a standby consumer active while this daemon
        still holds earlier deliveries. It ends with the connection, whose close returns
        what it still holds to the head of the queue, in order (RabbitMQ 3.10 quorum queues;
        a nack with requeue would put them at the back)."""
        channel = channel or self._channel
        assert channel is not None
        try:
            # declare_queue (passive), not get_queue: only declared queues are recorded by the
            # robust channel, and only recorded ones get their consumers back after a reconnect.
            queue = await channel.declare_queue(queue_name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ConfigError(f"queue {queue_name} does not exist", hint=hint) from None

        async def on_message(message: AbstractIncomingMessage) -> None:
            acks.track(message)  # every delivery of the daemon's channels: acks may batch
            self.spawn(handle(message))

        tag = self.consumer_tag(label or queue_name.removeprefix("wayang."))
        self._consumers.append((queue, await queue.consume(on_message, consumer_tag=tag)))
        if ordered:
            self._ordered.add(tag)

    async def prefetch_channel(self, prefetch: int) -> AbstractChannel:
        """A consuming channel of its own, each of whose consumers holds at most ``prefetch``
        unacked deliveries. RabbitMQ counts a prefetch per consumer (its ``global`` QoS,
        per channel, is refused by quorum queues), and applies the channel's QoS to the
        consumers that start after it: a different prefetch needs a channel of its own.
        aio-pika's robust channel records the QoS and sets it again, before it restores its
        consumers, when it reopens after a reconnect."""
        assert self._connection is not None
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return channel

    def consumer_tag(self, label: str) -> str:
        """``<daemon id>/<label>``, made unique among this daemon's consumers (tags must be
        unique per channel) and short enough for AMQP's 255-byte limit."""
        base = f"{self.daemon_id}/{label}"[:200]
        taken = {tag for _, tag in self._consumers}
        tag, n = base, 1
        while tag in taken:
            n += 1
            tag = f"{base}~{n}"
        return tag

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as part of what the daemon finishes (within the grace) before it stops."""
        handler = asyncio.create_task(work)
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)

    async def queue_exists(self, name: str) -> bool:
        """True if the queue exists (a passive declare, on a channel of its own)."""
        assert self._connection is not None
        # A passive declare of a missing queue closes its channel (404): one channel per check.
        channel = await self._connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _until_stopped(self) -> None:
        beat = None
        if self._heartbeat_interval_s is not None:
            beat = asyncio.create_task(self._beat_loop(self._heartbeat_interval_s))
        await self._stopping.wait()
        if beat is not None:
            beat.cancel()
        self._state = State.DRAINING
        await self._drain()

    async def _beat_loop(self, interval_s: float) -> None:
        while True:
            await self.beat()
            self._last_beat = time.monotonic()
            await asyncio.sleep(interval_s)

    def _heartbeat_age(self) -> float:
        return math.nan if self._last_beat is None else time.monotonic() - self._last_beat

    async def _drain(self) -> None:
        """Cancel consumers, let in-flight deliveries finish within the grace, cancel the rest
        (a cancelled handler gives its delivery back)."""
        for queue, tag in self._consumers:
            if tag in self._ordered:
                continue  # its deliveries go back when the connection closes (see consume)
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        if not self._handlers:
            return
        logs.event(
            self._log,
            f"{self.kind}.draining",
            id=self.daemon_id,
            in_flight=len(self._handlers),
            grace_s=self._grace_s,
        )
        _, pending = await asyncio.wait(set(self._handlers), timeout=self._grace_s)
        for handler in pending:
            handler.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- health and metrics over HTTP ------------------------------------------------------

    async def _serve_http(self) -> None:
        """One endpoint (observability.http) on the health port and on the metrics port."""
        if self._health_port is not None:
            self._health_server = await http.serve(self, self._health_host, self._health_port)
            host, port = self.health_address or ("?", 0)
            logs.event(self._log, "health.listening", id=self.daemon_id, address=f"{host}:{port}")
        if self._metrics_port is not None:
            same = (self._metrics_host, self._metrics_port) == (
                self._health_host,
                self._health_port,
            )
            if same and self._metrics_port != 0:
                self._metrics_server = self._health_server
            else:
                self._metrics_server = await http.serve(
                    self, self._metrics_host, self._metrics_port
                )
            host, port = self.metrics_address or ("?", 0)
            logs.event(self._log, "metrics.listening", id=self.daemon_id, address=f"{host}:{port}")


def _address(server: asyncio.Server | None) -> tuple[str, int] | None:
    if server is None:
        return None
    host, port = server.sockets[0].getsockname()[:2]
    return str(host), int(port)
