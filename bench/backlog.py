"""Backlog and memory: a worker's RSS while it drains a large backlog, and a dispatcher's
memory with many tasks outstanding (issue 16's two memory promises).

1. **Backlog drain.** N echo tasks (default 100,000, the capability queue's ``max_length`` in
   ``topology/wayang.toml``, used as it is) are published while no worker runs; then ONE
   worker process starts, as ``bench/run.py`` starts it, and its ``VmRSS`` is sampled every
   0.5 s until its queue is empty and every result is in (this process consumes and acks the
   results as they come, so the reply queue never fills). Reported per system: the drain rate,
   the RSS at 10/50/90/100 % of the drain, the peak (``VmHWM``), the slope of RSS over tasks
   (bytes per task, a least-squares fit from 10 % on) and a verdict: *flat* when RSS grew by
   at most ``--flat-mib`` from 10 % to 100 %. ``wayang`` is wayang-mq's worker; ``raw`` the
   aio-pika baseline (``bench/raw_worker.py``) on its own queue, in the same run.

   The wayang tasks are built by a ``Dispatcher`` (``Dispatcher.task``) and published signed,
   the way ``Dispatcher.submit`` publishes them (``task_message``, ``to_amqp``, a confirmed
   mandatory publish), with a window of confirms outstanding, but without a ``TaskHandle``
   each: 100,000 handles would put the dispatcher's memory (part 2) into this process, which
   is not what part 1 measures. Their results go to a reply queue named and bound as a
   dispatcher's, drained by a plain consumer that counts them and checks each says SUCCESS.

2. **Outstanding tasks.** In a fresh child process (so its RSS is its own), a ``Dispatcher``
   submits M tasks (default 20,000) with no worker running, keeping every ``TaskHandle``; RSS
   and ``tracemalloc``'s traced size are taken after ``gc.collect()`` at 0 and every
   ``--step`` tasks: the bytes per outstanding task. Then a worker drains them, every result
   is awaited through its handle, and memory is taken again, with the handles still held and
   after the caller drops them (what the dispatcher keeps on its own).

    .venv/bin/python bench/backlog.py [--count 100000] [--outstanding 20000] [--systems wayang,raw]
                                      [--quick] [--out bench/results/backlog.json]

Tasks get a queue timeout of an hour (the default is 60 s: a 100,000-task backlog is older
than that by the time the worker reaches its tail, and would be refused as expired). A private
RabbitMQ node is started in a temp dir unless ``WAYANG_AMQP_URL`` is set; every process is
stopped on the way out, also on Ctrl-C, SIGTERM or an error. See ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/backlog.py` runs with bench/ on the path

from bench import raw_worker  # noqa: E402
from bench.clients import (  # noqa: E402
    CAPABILITY_QUEUE_ARGUMENTS,
    RAW_REPLY_KEY,
    RAW_REPLY_QUEUE,
    declare_raw_topology,
)
from bench.processes import WorkerProcess, WorkerSet  # noqa: E402
from bench.report import code_version, header  # noqa: E402
from bench.run import (  # noqa: E402
    QUEUES,
    Broker,
    _worker_command,
    interrupted,
    open_broker,
    run_async,
    wait_consuming,
    worker_env,
)
from wayang_mq.amqp.connect import management_client  # noqa: E402
from wayang_mq.amqp.endpoint import BrokerEndpoint  # noqa: E402
from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp  # noqa: E402
from wayang_mq.client.dispatcher import Dispatcher, DispatcherConfig, TaskHandle  # noqa: E402
from wayang_mq.core import names, placement  # noqa: E402
from wayang_mq.core.model import Status  # noqa: E402
from wayang_mq.core.signing import KeyRing, Signer, write_keypair  # noqa: E402
from wayang_mq.core.wire import task_message  # noqa: E402
from wayang_mq.topology.apply import apply_topology  # noqa: E402
from wayang_mq.topology.spec import load_topology  # noqa: E402

SYSTEMS = ("wayang", "raw")
CAPABILITY = "demo.echo"
QUEUE_TIMEOUT_S = 3600.0
SAMPLE_S = 0.5  # RSS sampling period
PROGRESS_S = 2.0  # progress lines while publishing and draining
STALL_S = 120.0  # no result for this long: the drain failed
RESULT_TIMEOUT_S = 600.0  # part 2: the whole drain of the outstanding tasks
IDLE_S = 3.0  # part 2: how long the dispatcher's CPU is watched while it only waits
#: RSS growth from 10 % to 100 % of the drain still called flat. The worker's RSS moves by
#: about 1 MiB sample to sample (allocator arenas, the 16 deliveries and results in flight);
#: 4 MiB over the 90 % of a 100,000-task drain is a leak of 46 bytes per task, so a leak of a
#: small object per task (a dict entry, a bound method) fails the verdict, noise does not.
FLAT_MIB = 4.0
SERIES_POINTS = 200  # RSS samples kept in the JSON (evenly thinned)
MIB = 1024 * 1024


def _worker_options(concurrency: int, log_level: str) -> argparse.Namespace:
    """What bench/run.py's ``_worker_command`` reads: the same worker commands as its own
    (the raw worker on asyncio's loop, run.py's default)."""
    return argparse.Namespace(concurrency=concurrency, wayang_log_level=log_level, raw_uvloop=False)


def _say(text: str) -> None:
    print(f"== {text}", file=sys.stderr, flush=True)


def payload(index: int) -> dict[str, Any]:
    """The echo input, as bench/run.py's."""
    return {"n": index, "pad": "x" * 100}


def rss_kib(pid: int | None = None, key: str = "VmRSS") -> int:
    """``key`` (VmRSS, VmHWM) of a process from /proc, in KiB."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    for line in status.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid or 'self'}/status")


async def windowed(
    send: Callable[[int], Awaitable[None]], start: int, stop: int, window: int, label: str
) -> float:
    """``send(i)`` for i in [start, stop), at most ``window`` at once; returns the seconds."""
    cursor = start
    began = time.monotonic()

    async def lane() -> None:
        nonlocal cursor
        while cursor < stop:
            index = cursor
            cursor += 1
            await send(index)

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            done = cursor - start
            _say(f"{label}: {done:,}/{stop - start:,} ({done / (time.monotonic() - began):,.0f}/s)")

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(lane() for _ in range(min(window, stop - start))))
    finally:
        reporter.cancel()
    return time.monotonic() - began


# -- part 1: the backlog drain ----------------------------------------------------------------


@dataclass
class Collector:
    """Consumes a reply queue: counts results, and those that did not succeed."""

    system: str
    done: int = 0
    failed: int = 0
    first_at: float | None = None
    last_at: float | None = None

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Count it (a SUCCESS status, or the echoed output for raw), then ack."""
        body = msgpack.unpackb(message.body)
        ok = body.get("status") == Status.SUCCESS.value if self.system == "wayang" else True
        self.failed += not ok
        self.done += 1
        now = time.monotonic()
        self.first_at = self.first_at or now
        self.last_at = now
        await message.ack()


@dataclass
class Sample:
    """One RSS sample of the worker during the drain."""

    at_s: float  # since the worker process started
    done: int  # results in by then
    rss_kib: int


@dataclass
class Drained:
    """What one system's drain measured."""

    system: str
    count: int
    publish_s: float
    samples: list[Sample] = field(default_factory=list)
    peak_kib: int = 0
    first_result_s: float = 0.0  # worker start to first result (its start-up)
    last_result_s: float = 0.0  # worker start to last result
    failed: int = 0

    def rss_at(self, share: float) -> float:
        """RSS (MiB) at the first sample with ``share`` of the results in."""
        wanted = share * self.count
        found = next(s for s in self.samples if s.done >= wanted)
        return found.rss_kib / 1024

    def slope_bytes_per_task(self) -> float | None:
        """Least-squares slope of RSS against results done, from 10 % of the drain on."""
        tail = [s for s in self.samples if s.done >= 0.1 * self.count]
        if len({s.done for s in tail}) < 2:
            return None
        fit = statistics.linear_regression([s.done for s in tail], [s.rss_kib for s in tail])
        return fit.slope * 1024

    def as_json(self, flat_mib: float) -> dict[str, Any]:
        """Every number, the series thinned to at most SERIES_POINTS."""
        marks = {f"{p}%": round(self.rss_at(p / 100), 2) for p in (10, 50, 90, 100)}
        growth = marks["100%"] - marks["10%"]
        slope = self.slope_bytes_per_task()
        drain_s = self.last_result_s - self.first_result_s
        step = max(1, len(self.samples) // SERIES_POINTS)
        series = self.samples[::step]
        if series[-1] is not self.samples[-1]:
            series.append(self.samples[-1])
        return {
            "tasks": self.count,
            "failed": self.failed,
            "publish_s": round(self.publish_s, 2),
            "publish_per_s": round(self.count / self.publish_s, 1),
            "startup_s": round(self.first_result_s, 2),
            "drain_s": round(drain_s, 2),
            "drain_per_s": round((self.count - 1) / drain_s, 1) if drain_s > 0 else None,
            "rss_mib_at": marks,
            "rss_growth_10_to_100_mib": round(growth, 2),
            "rss_slope_bytes_per_task": round(slope, 2) if slope is not None else None,
            "peak_rss_mib": round(self.peak_kib / 1024, 2),
            "flat": growth <= flat_mib,
            "flat_mib": flat_mib,
            # the smallest steady leak the verdict catches at this count
            "flat_catches_leak_bytes_per_task": round(flat_mib * MIB / (0.9 * self.count), 1),
            "rss_series": {
                "columns": ["seconds_since_start", "results_done", "rss_kib"],
                "every_nth_sample": step,
                "rows": [[round(s.at_s, 2), s.done, s.rss_kib] for s in series],
            },
        }


class Backlog:
    """One system's side of part 1: its queues, its publisher and its result consumer."""

    def __init__(self, system: str, endpoint: BrokerEndpoint, keys: Path) -> None:
        self.system = system
        self.endpoint = endpoint
        self.keys = keys
        self.task_queue = QUEUES[system]
        self.dispatcher_id = f"bench-backlog-{uuid.uuid4().hex[:8]}"
        self.collector = Collector(system)
        self._connection: AbstractRobustConnection | None = None
        self._depth_channel: AbstractChannel | None = None

    @property
    def reply_queue(self) -> str:
        """Where its results come back."""
        if self.system == "wayang":
            return names.reply_queue(self.dispatcher_id)
        return RAW_REPLY_QUEUE

    async def open(self) -> None:
        """Connect; declare (wayang) and consume the reply queue; empty the task queue."""
        self._connection = await aio_pika.connect_robust(
            self.endpoint.amqp_url, client_properties={"connection_name": "bench backlog"}
        )
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=512)  # as the Dispatcher's reply consumer
        queue: AbstractQueue
        if self.system == "wayang":  # as Dispatcher.start declares its reply queue
            queue = await channel.declare_queue(
                self.reply_queue, durable=True, arguments={"x-expires": 600_000}
            )
            await queue.bind(names.RESULTS_EXCHANGE, names.reply_routing_key(self.dispatcher_id))
        else:
            queue = await channel.get_queue(self.reply_queue, ensure=False)
        await queue.consume(self.collector.on_message)
        await (await channel.get_queue(self.task_queue, ensure=False)).purge()

    async def close(self) -> None:
        """Disconnect (the wayang reply queue expires on its own)."""
        if self._connection is not None:
            await self._connection.close()

    async def depth(self) -> int:
        """Ready messages in the task queue (a passive declare; the management stats lag)."""
        assert self._connection is not None
        if self._depth_channel is None:
            self._depth_channel = await self._connection.channel()
        underlay = await self._depth_channel.get_underlay_channel()
        declared = await underlay.queue_declare(self.task_queue, passive=True)
        return int(declared.message_count or 0)

    async def publish(self, count: int, window: int) -> float:
        """Queue ``count`` tasks, each confirmed, ``window`` confirms outstanding at most."""
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        publisher = ConfirmedPublisher(channel)
        send = self._wayang_sender(publisher) if self.system == "wayang" else None
        if send is None:
            send = self._raw_sender(publisher)
        try:
            return await windowed(send, 0, count, window, f"{self.system}: publishing")
        finally:
            await channel.close()

    def _wayang_sender(self, publisher: ConfirmedPublisher) -> Callable[[int], Awaitable[None]]:
        signer = Signer.from_file(next(self.keys.glob("*.key")))
        config = DispatcherConfig(
            amqp_url=self.endpoint.amqp_url,
            signer=signer,
            results_keyring=KeyRing.of([signer.public_key]),
            dispatcher_id=self.dispatcher_id,
        )
        builder = Dispatcher(config, registry=None)  # never started: it only builds tasks

        async def send(index: int) -> None:
            task = builder.task(CAPABILITY, payload(index), queue_timeout_s=QUEUE_TIMEOUT_S)
            message = to_amqp(task_message(task, signer))
            key = placement.routing_key(task)
            await publisher.publish(names.TASKS_EXCHANGE, key, message, mandatory=True)

        return send

    @staticmethod
    def _raw_sender(publisher: ConfirmedPublisher) -> Callable[[int], Awaitable[None]]:
        async def send(index: int) -> None:  # as bench/clients.py's RawClient publishes
            task_id = str(uuid.uuid4())
            message = aio_pika.Message(
                msgpack.packb(payload(index), use_bin_type=True),
                content_type="application/msgpack",
                message_id=task_id,
                correlation_id=task_id,
                reply_to=RAW_REPLY_KEY,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await publisher.publish(
                raw_worker.TASK_EXCHANGE, raw_worker.TASK_ROUTING_KEY, message, mandatory=True
            )

        return send


async def drain(backlog: Backlog, worker: WorkerProcess, count: int, publish_s: float) -> Drained:
    """Sample the worker's RSS every SAMPLE_S until its queue is empty and all results are in."""
    found = Drained(backlog.system, count, publish_s)
    collector = backlog.collector
    started = time.monotonic()
    next_sample = started
    next_report = started + PROGRESS_S
    last_done, last_change = -1, started
    while True:
        now = time.monotonic()
        if not worker.alive():
            raise RuntimeError(f"the {worker.name} worker exited:\n{worker.log_tail()}")
        found.samples.append(Sample(now - started, collector.done, rss_kib(worker.pid)))
        depth = await backlog.depth()
        if collector.done >= count and depth == 0:
            break
        if collector.done != last_done:
            last_done, last_change = collector.done, now
        elif now - last_change > STALL_S:
            raise RuntimeError(f"no {backlog.system} result for {STALL_S:.0f}s ({depth} queued)")
        if now >= next_report:
            next_report += PROGRESS_S
            rss = found.samples[-1].rss_kib / 1024
            rate = collector.done / (now - (collector.first_at or now) + 1e-9)
            _say(
                f"{backlog.system}: drained {collector.done:,}/{count:,} ({rate:,.0f}/s),"
                f" {depth:,} queued, worker RSS {rss:.1f} MiB"
            )
        next_sample += SAMPLE_S
        await asyncio.sleep(max(0.0, next_sample - time.monotonic()))
    found.peak_kib = rss_kib(worker.pid, "VmHWM")
    found.first_result_s = (collector.first_at or started) - started
    found.last_result_s = (collector.last_at or started) - started
    found.failed = collector.failed
    return found


async def run_backlog(
    endpoint: BrokerEndpoint,
    keys_dir: Path,
    tmp: Path,
    count: int = 100_000,
    *,
    systems: tuple[str, ...] = SYSTEMS,
    concurrency: int = 16,
    window: int = 256,
    log_level: str = "INFO",
    flat_mib: float = FLAT_MIB,
) -> dict[str, Any]:
    """Part 1 for each system in turn: queue ``count`` tasks, start one worker, sample its RSS
    until the backlog is drained; the JSON of every system. The topology (and the raw
    baseline's queues, ``declare_raw_topology``) must be applied, with room for ``count``."""
    results: dict[str, Any] = {}
    options = _worker_options(concurrency, log_level)
    for system in systems:
        backlog = Backlog(system, endpoint, keys_dir)
        worker: WorkerProcess | None = None
        try:
            await backlog.open()
            publish_s = await backlog.publish(count, window)
            queued = await backlog.depth()
            _say(f"{system}: {queued:,} queued in {publish_s:.1f}s; starting one worker")
            worker = WorkerProcess.start(
                f"backlog-{system}",
                _worker_command(system, options, 0),
                env=worker_env(system, endpoint, keys_dir),
                cwd=ROOT,
                log_dir=tmp,
            )
            drained = await drain(backlog, worker, count, publish_s)
        finally:
            if worker is not None:
                await asyncio.to_thread(worker.stop)
            await backlog.close()
        results[system] = drained.as_json(flat_mib)
        summary = results[system]
        _say(
            f"{system}: drained {count:,} at {summary['drain_per_s']:,}/s; RSS at 10/50/90/100 %:"
            f" {', '.join(f'{v:.1f}' for v in summary['rss_mib_at'].values())} MiB,"
            f" peak {summary['peak_rss_mib']:.1f} MiB, flat: {summary['flat']}"
        )
    return results


# -- part 2: outstanding tasks in a dispatcher (the child process) -----------------------------


def _emit(event: dict[str, Any]) -> None:
    """One line of JSON to the parent."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def memory_mark(label: str, outstanding: int) -> dict[str, Any]:
    """This process's memory now, after a full collection."""
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    overhead = tracemalloc.get_tracemalloc_memory()
    rss = rss_kib() * 1024
    return {
        "at": label,
        "outstanding": outstanding,
        "rss_bytes": rss,
        # tracemalloc keeps a record per live block, inside this RSS: taken out here
        "rss_without_tracemalloc_bytes": rss - overhead,
        "traced_bytes": traced,
        "tracemalloc_overhead_bytes": overhead,
    }


def _top_allocations(limit: int = 8) -> list[dict[str, Any]]:
    """Where the traced bytes are, by file (what outstanding tasks are made of)."""
    stats = tracemalloc.take_snapshot().statistics("filename")[:limit]
    return [
        {"file": str(s.traceback[0].filename).removeprefix(str(ROOT) + "/"), "bytes": s.size}
        for s in stats
    ]


def _dispatcher_sizes(dispatcher: Dispatcher) -> dict[str, int]:
    """What the dispatcher holds (private attributes, read for this report only)."""
    replies = dispatcher._replies
    return {
        "waiting": len(replies._waiting),
        "seen_results": len(replies._seen),
        "traces": len(dispatcher._traces),
    }


async def outstanding_child(amqp_url: str, keys: Path, count: int, step: int, window: int) -> None:
    """Submit ``count`` tasks, keeping the handles; tell the parent; await every result."""
    tracemalloc.start()
    signer = Signer.from_file(next(keys.glob("*.key")))
    config = DispatcherConfig(
        amqp_url=amqp_url,
        signer=signer,
        results_keyring=KeyRing.of([signer.public_key]),
        dispatcher_id=f"bench-outstanding-{uuid.uuid4().hex[:8]}",
    )
    marks = []
    async with Dispatcher(config, registry=None) as dispatcher:
        task_message(dispatcher.task(CAPABILITY, payload(0)), signer)  # warm: build, sign
        marks.append(memory_mark("started", 0))
        idle = {"none_outstanding": await idle_cpu()}
        handles: list[TaskHandle | None] = [None] * count

        async def submit(index: int) -> None:
            handles[index] = await dispatcher.submit(
                CAPABILITY, payload(index), queue_timeout_s=QUEUE_TIMEOUT_S
            )

        for start in range(0, count, step):
            stop = min(count, start + step)
            await windowed(submit, start, stop, window, "dispatcher: submitting")
            marks.append(memory_mark("outstanding", stop))
        sizes = {"at_most_outstanding": _dispatcher_sizes(dispatcher)}
        idle["all_outstanding"] = await idle_cpu()
        top = _top_allocations()
        _emit({"event": "submitted", "count": count})
        results = await _await_all([h for h in handles if h is not None])
        failed = sum(r is not Status.SUCCESS for r in results)
        marks.append(memory_mark("answered, handles kept", 0))
        sizes["answered"] = _dispatcher_sizes(dispatcher)
        handles.clear()  # the caller lets go of its handles (and their results)
        marks.append(memory_mark("answered, handles dropped", 0))
    _emit(
        {
            "event": "done",
            "marks": marks,
            "sizes": sizes,
            "idle_cpu": idle,
            "failed": failed,
            "top_at_most": top,
        }
    )


async def idle_cpu(seconds: float = IDLE_S) -> float:
    """This process's CPU share while it only waits: what its supervisor's sweep of the
    outstanding tasks (every second, each task checked) costs."""
    before = time.process_time()
    await asyncio.sleep(seconds)
    return round((time.process_time() - before) / seconds, 4)


async def _await_all(handles: list[TaskHandle]) -> list[Status]:
    """Every handle's terminal status, with progress lines."""
    waiting = asyncio.ensure_future(asyncio.gather(*(h.result(RESULT_TIMEOUT_S) for h in handles)))
    began = time.monotonic()
    while not waiting.done():
        await asyncio.wait({waiting}, timeout=PROGRESS_S)
        answered = sum(h.done() for h in handles)
        _say(
            f"dispatcher: {answered:,}/{len(handles):,} answered ({time.monotonic() - began:.0f}s)"
        )
    return [r.status for r in waiting.result()]


# -- part 2: the parent ------------------------------------------------------------------------


async def run_outstanding(
    endpoint: BrokerEndpoint,
    keys_dir: Path,
    tmp: Path,
    count: int = 20_000,
    *,
    step: int = 5_000,
    window: int = 256,
    concurrency: int = 16,
    log_level: str = "INFO",
) -> dict[str, Any]:
    """Part 2: a child process submits ``count`` tasks with no worker running; then a worker
    drains them. The child's memory marks and what its dispatcher held, with per-task bytes."""
    command = [sys.executable, "-m", "bench.backlog", "--child-outstanding", str(count)]
    command += ["--keys", str(keys_dir), "--step", str(step), "--window", str(window)]
    child = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "BENCH_AMQP_URL": endpoint.amqp_url},
        cwd=ROOT,
        start_new_session=True,
        limit=1 << 20,
    )
    worker: WorkerProcess | None = None
    report: dict[str, Any] | None = None
    options = _worker_options(concurrency, log_level)
    try:
        assert child.stdout is not None
        async for line in child.stdout:
            event = json.loads(line)
            if event["event"] == "submitted":
                _say(f"dispatcher: {count:,} outstanding; starting one worker")
                worker = WorkerProcess.start(
                    "outstanding-wayang",
                    _worker_command("wayang", options, 0),
                    env=worker_env("wayang", endpoint, keys_dir),
                    cwd=ROOT,
                    log_dir=tmp,
                )
                await wait_consuming(
                    endpoint.amqp_url, QUEUES["wayang"], WorkerSet("wayang", [worker]), 1
                )
            elif event["event"] == "done":
                report = event
        if await child.wait() != 0 or report is None:
            raise RuntimeError(f"the dispatcher child exited with {child.returncode}")
    finally:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await child.wait()
        if worker is not None:
            await asyncio.to_thread(worker.stop)
    return _outstanding_summary(report, count)


def _outstanding_summary(report: dict[str, Any], count: int) -> dict[str, Any]:
    marks = report["marks"]
    start, full = marks[0], max(marks, key=lambda m: m["outstanding"])
    first = next(m for m in marks if m["outstanding"] > 0)
    kept, dropped = marks[-2], marks[-1]

    def per_task(key: str) -> dict[str, float | None]:
        tail = full["outstanding"] - first["outstanding"]
        return {
            "from_start": round((full[key] - start[key]) / count, 1),
            # from the first step on: start-up allocations (connections, caches) left out
            "from_first_step": round((full[key] - first[key]) / tail, 1) if tail else None,
        }

    def mib(mark: dict[str, Any]) -> dict[str, float]:
        keys = ("rss_bytes", "rss_without_tracemalloc_bytes", "traced_bytes")
        return {k.replace("_bytes", "_mib"): round(mark[k] / MIB, 2) for k in keys}

    return {
        "tasks": count,
        "failed": report["failed"],
        "marks": [{"at": m["at"], "outstanding": m["outstanding"], **mib(m)} for m in marks],
        "bytes_per_outstanding_task": {
            "rss": per_task("rss_without_tracemalloc_bytes"),
            "traced": per_task("traced_bytes"),
        },
        "after_drain_vs_start_mib": {
            "handles_kept": mib({k: kept[k] - start[k] for k in kept if k.endswith("bytes")}),
            "handles_dropped": mib(
                {k: dropped[k] - start[k] for k in dropped if k.endswith("bytes")}
            ),
        },
        "dispatcher_holds": report["sizes"],
        # CPU seconds per second while waiting (1.0: a core), with none and all outstanding
        "idle_cpu_share": report.get("idle_cpu"),
        "top_traced_files_at_most_outstanding": report["top_at_most"],
    }


# -- the run ------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace, broker: Broker, keys: Path, tmp: Path) -> dict[str, Any]:
    topology = load_topology(args.topology)
    limits = {
        "wayang": topology.defaults.max_length,
        "raw": CAPABILITY_QUEUE_ARGUMENTS["x-max-length"],
    }
    for system in args.systems:
        if args.count > limits[system]:
            raise SystemExit(
                f"--count {args.count} is more than the {system} queue holds ({limits[system]}):"
                " lower it, or raise max_length in a --topology of your own (wayang only)"
            )
    await apply_topology(topology, broker.endpoint.amqp_url, management_client(broker.endpoint))
    await declare_raw_topology(broker.endpoint.amqp_url)
    found: dict[str, Any] = {"queue_max_length": limits}
    if args.count:
        found["backlog"] = await run_backlog(
            broker.endpoint,
            keys,
            tmp,
            args.count,
            systems=tuple(args.systems),
            concurrency=args.concurrency,
            window=args.window,
            log_level=args.log_level,
            flat_mib=args.flat_mib,
        )
    if args.outstanding:
        found["outstanding"] = await run_outstanding(
            broker.endpoint,
            keys,
            tmp,
            args.outstanding,
            step=max(1, args.outstanding // 4),
            window=args.window,
            concurrency=args.concurrency,
            log_level=args.log_level,
        )
    return found


def main(argv: list[str] | None = None) -> int:
    """Start a broker, run both parts, print a summary and write the JSON."""
    args = _parser().parse_args(argv)
    if args.child_outstanding:
        run_async(  # on uvloop when installed, as bench/run.py's dispatcher side
            outstanding_child(
                os.environ["BENCH_AMQP_URL"],
                args.keys,
                args.child_outstanding,
                args.step,
                args.window,
            )
        )
        return 0
    if args.quick:
        args.count, args.outstanding = 5_000, 2_000
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: choose from {', '.join(SYSTEMS)}")
    signal.signal(signal.SIGTERM, interrupted)  # unwinds like Ctrl-C: workers and node stopped
    load = os.getloadavg()
    version = code_version(ROOT)
    with (
        tempfile.TemporaryDirectory(prefix="wayang-backlog-") as tmp,
        contextlib.redirect_stdout(sys.stderr),  # bench/run.py's helpers print progress
        open_broker(Path(tmp)) as broker,
    ):
        keys = Path(tmp) / "keys"
        write_keypair(keys)
        found = run_async(_run(args, broker, keys, Path(tmp)))
    report = {
        **header("bench/backlog.py", version, broker.version, load),
        "params": {
            "count": args.count,
            "outstanding": args.outstanding,
            "systems": args.systems,
            "concurrency": args.concurrency,
            "prefetch": args.concurrency,
            "publish_window": args.window,
            "queue_timeout_s": QUEUE_TIMEOUT_S,
            "sample_s": SAMPLE_S,
            "flat_mib": args.flat_mib,
            "worker_log_level": args.log_level,
            "topology": str(args.topology),
            "payload": '{"n": i, "pad": "x" * 100}',
            "private_broker": bool(broker.pids),
        },
        **found,
    }
    print(summary(found))
    if load[0] > 0.7:
        print(f"\nload average was {load[0]:.2f} at the start: other work shared the CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _say(f"wrote {args.out}")
    return 0


def summary(found: dict[str, Any]) -> str:
    """The tables people read (markdown)."""
    lines = []
    if "backlog" in found:
        lines += [
            "| system | tasks | drain/s | RSS MiB at 10 % | 50 % | 90 % | 100 % | growth"
            " 10→100 % | slope B/task | peak (VmHWM) | flat |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for system, d in found["backlog"].items():
            at = d["rss_mib_at"]
            lines.append(
                f"| {system} | {d['tasks']:,} | {d['drain_per_s']:,} | {at['10%']:.1f}"
                f" | {at['50%']:.1f} | {at['90%']:.1f} | {at['100%']:.1f}"
                f" | {d['rss_growth_10_to_100_mib']:+.2f} | {d['rss_slope_bytes_per_task']}"
                f" | {d['peak_rss_mib']:.1f} | {'yes' if d['flat'] else 'NO'} |"
            )
    if "outstanding" in found:
        o = found["outstanding"]
        lines += [
            "",
            "| dispatcher | outstanding | RSS MiB | traced MiB |",
            "| --- | --- | --- | --- |",
        ]
        for m in o["marks"]:
            lines.append(
                f"| {m['at']} | {m['outstanding']:,} | {m['rss_without_tracemalloc_mib']:.1f}"
                f" | {m['traced_mib']:.1f} |"
            )
        per = o["bytes_per_outstanding_task"]
        lines.append(
            "\nbytes per outstanding task (from the first step):"
            f" RSS {per['rss']['from_first_step']}, traced {per['traced']['from_first_step']};"
            f" held: {o['dispatcher_holds']}; CPU share while waiting: {o['idle_cpu_share']}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--count", type=int, default=100_000, help="backlog tasks per system (0: skip part 1)"
    )
    parser.add_argument(
        "--outstanding", type=int, default=20_000, help="dispatcher's tasks (0: skip part 2)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5,000 and 2,000")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="wayang,raw (the default)")
    parser.add_argument("--concurrency", type=int, default=16, help="worker concurrency/prefetch")
    parser.add_argument("--window", type=int, default=256, help="publishes unconfirmed at most")
    parser.add_argument("--flat-mib", type=float, default=FLAT_MIB, help="growth still flat")
    parser.add_argument("--log-level", default="INFO", help="the wayang worker's --log-level")
    parser.add_argument(
        "--topology",
        type=Path,
        default=ROOT / "topology" / "wayang.toml",
        help="the topology applied (its max_length bounds --count)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backlog.json")
    # the child process of part 2
    parser.add_argument("--child-outstanding", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--step", type=int, default=5_000, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: workers and broker stopped", file=sys.stderr)
        sys.exit(130)
