"""End-to-end benchmark: wayang-mq beside raw aio-pika, Celery and Dramatiq, in one run, on one
broker.

Each system's workers run as their own OS processes (``--workers N``, each with
``--concurrency`` slots); this process is the dispatcher side of all of them. Per system:
(1) drain — tasks queued before the workers start, timed while they empty the queue (the
workers alone); (2) throughput — N echo tasks with at most W outstanding, first
submit to last result, for R rounds with the systems interleaved (the median round counts, so
a burst of load from elsewhere on the machine hits every system alike); (3) latency — M
sequential round trips, p50/p99; (4) the workers' peak RSS (per process and summed) and
everyone's CPU per task. Every message is persistent and every publish (task and result) waits
for the broker's confirm, except for ``dramatiq``: Dramatiq's defaults, unconfirmed sends (the
client's task and the worker's reply); ``dramatiq-confirmed`` confirms both.

    .venv/bin/python bench/run.py [--tasks N] [--latency-samples N] [--concurrency N]
                                  [--workers N] [--systems raw,wayang,celery,dramatiq,...]
                                  [--out bench/results/latest.json]

``wayang`` runs with metrics off (the worker without ``--metrics-port``, the dispatcher
without a registry); ``wayang-metrics`` is the same with metrics on (the worker with
``--metrics-port``, on a capability of its own, ``bench/metered.py``; the dispatcher counting
into a registry), so ``--systems wayang,wayang-metrics`` prices metrics in one run.

A private RabbitMQ node is started in a temp dir unless ``WAYANG_AMQP_URL`` is set (then
``WAYANG_MANAGEMENT_URL`` too, for the topology's policies). See ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/run.py` runs with bench/ on the path, not the root

from bench import dramatiq_app, metered, raw_worker  # noqa: E402
from bench.clients import (  # noqa: E402
    AsyncClient,
    CeleryClient,
    DramatiqClient,
    RawClient,
    WayangClient,
    consumer_count,
    declare_raw_topology,
)
from bench.measure import (  # noqa: E402
    Drain,
    Latency,
    Throughput,
    drain_async,
    drain_threaded,
    latency_async,
    latency_threaded,
    throughput_async,
    throughput_threaded,
)
from bench.processes import (  # noqa: E402
    WorkerProcess,
    WorkerSet,
    group_cpu_seconds,
    processes_in,
)
from bench.report import (  # noqa: E402
    LABELS,
    Outcome,
    code_version,
    header,
    ratios,
    table,
    targets,
)
from wayang_mq.amqp.connect import management_client  # noqa: E402
from wayang_mq.amqp.endpoint import BrokerEndpoint  # noqa: E402
from wayang_mq.core.names import task_queue  # noqa: E402
from wayang_mq.core.signing import Signer, write_keypair  # noqa: E402
from wayang_mq.dev.nodes import RabbitNode  # noqa: E402
from wayang_mq.topology.apply import apply_topology  # noqa: E402
from wayang_mq.topology.spec import parse_topology  # noqa: E402

SYSTEMS = ("raw", "wayang", "celery", "dramatiq", "dramatiq-confirmed")  # the default run
ALL_SYSTEMS = (*SYSTEMS, "wayang-metrics")
QUEUES = {
    "raw": raw_worker.TASK_QUEUE,
    "wayang": "wayang.task.demo.echo",
    "celery": "bench.celery",
    "dramatiq": dramatiq_app.queues(confirm=False)[0],
    "dramatiq-confirmed": dramatiq_app.queues(confirm=True)[0],
    "wayang-metrics": task_queue(metered.CAPABILITY),
}
CELERY_POOLS = ("threads", "prefork", "solo")
READY_TIMEOUT_S = 60.0
T = TypeVar("T")


class Broker:
    """The broker under test and, for a private node, the processes whose CPU we count."""

    def __init__(self, endpoint: BrokerEndpoint, pids: tuple[int, ...] = ()) -> None:
        self.endpoint = endpoint
        self.pids = pids  # empty for a broker given by WAYANG_AMQP_URL
        overview = management_client(endpoint).overview()
        self.version = str(overview.get("rabbitmq_version", "?"))

    def cpu_seconds(self) -> float | None:
        """CPU time of our private node so far; None for someone else's broker."""
        return group_cpu_seconds(self.pids) if self.pids else None


class Contender:
    """One system: its worker processes, its client, and what its runs measured."""

    def __init__(
        self, system: str, client: AsyncClient | CeleryClient, start: Callable[[], WorkerSet]
    ) -> None:
        self.system = system
        self.label = LABELS[system]
        self.client = client
        self._start_worker = start
        self._worker: WorkerSet | None = None
        self.drain: Drain | None = None
        self.throughputs: list[Throughput] = []
        self.latencies: list[float] = []
        self.cpu = {"worker": 0.0, "dispatcher": 0.0, "broker": 0.0}
        self.peak_rss_mib = (0.0, 0.0, 0)  # per process (max), summed, processes

    @property
    def worker(self) -> WorkerSet:
        """The worker processes (started by ``measure_drain``)."""
        if self._worker is None:
            raise RuntimeError(f"the {self.label} worker is not started")
        return self._worker

    def start_worker(self) -> None:
        """Start the worker processes (called from the client's thread for Celery)."""
        print(f"==> {self.label}: starting the workers", flush=True)
        self._worker = self._start_worker()

    async def connect(self) -> None:
        """Connect the client."""
        if isinstance(self.client, CeleryClient):
            await asyncio.to_thread(self.client.start)
        else:
            await self.client.start()

    async def measure_drain(self, count: int, window: int) -> None:
        """Queue ``count`` tasks, start the worker, time it emptying the queue."""
        label = f"{self.label} worker drain"
        if isinstance(self.client, CeleryClient):
            self.drain = await drain_threaded(self.client.drain, self.start_worker, label, count)
        else:
            submit = self.client.submit
            self.drain = await drain_async(submit, self.start_worker, label, count, window)

    async def throughput(self, label: str, count: int, window: int) -> Throughput:
        """One windowed run of ``count`` tasks."""
        if isinstance(self.client, CeleryClient):
            return await throughput_threaded(self.client.window, label, count, window)
        return await throughput_async(self.client.roundtrip, label, count, window)

    async def measured_throughput(
        self, label: str, count: int, window: int, broker: Broker
    ) -> None:
        """A throughput run, with the CPU each process spent on it."""
        before = self.worker.cpu_seconds(), time.process_time(), broker.cpu_seconds()
        self.throughputs.append(await self.throughput(label, count, window))
        after = self.worker.cpu_seconds(), time.process_time(), broker.cpu_seconds()
        self.cpu["worker"] += after[0] - before[0]
        self.cpu["dispatcher"] += after[1] - before[1]
        if after[2] is not None and before[2] is not None:
            self.cpu["broker"] += after[2] - before[2]

    async def latency(self, label: str, samples: int) -> None:
        """Sequential round trips, added to this system's samples."""
        if isinstance(self.client, CeleryClient):
            self.latencies += await latency_threaded(self.client.roundtrip, label, samples)
        else:
            self.latencies += await latency_async(self.client.roundtrip, label, samples)

    async def close(self) -> None:
        """Disconnect the client, then stop the worker."""
        try:
            if isinstance(self.client, CeleryClient):
                self.client.close()
            else:
                await self.client.close()
        finally:
            if self._worker is not None:
                self._worker.stop()

    def outcome(self, broker: Broker) -> Outcome:
        """What was measured."""
        return Outcome(
            self.system,
            self.drain,
            tuple(self.throughputs),
            Latency.of(self.latencies),
            self.peak_rss_mib[0],
            worker_cpu_s=self.cpu["worker"],
            dispatcher_cpu_s=self.cpu["dispatcher"],
            broker_cpu_s=self.cpu["broker"] if broker.pids else None,
            worker_peak_rss_sum_mib=self.peak_rss_mib[1],
            worker_processes=self.peak_rss_mib[2],
        )


# -- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Start a broker, bench every system, print the table and write the JSON."""
    args = _parser().parse_args(argv)
    if args.suite:
        return suite(args)
    # SIGTERM unwinds like Ctrl-C, so the workers and the broker are stopped on the way out.
    signal.signal(signal.SIGTERM, interrupted)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or set(systems) - set(ALL_SYSTEMS):
        raise SystemExit(f"--systems: choose from {', '.join(ALL_SYSTEMS)}")
    if args.workers < 1 or args.concurrency < 1:
        raise SystemExit("--workers and --concurrency: 1 or more")
    load = os.getloadavg()
    version = code_version(ROOT)  # before anything runs: the code the workers will import
    with (
        tempfile.TemporaryDirectory(prefix="wayang-bench-") as tmp,
        open_broker(Path(tmp)) as broker,
    ):
        keys = Path(tmp) / "keys"
        write_keypair(keys)
        print(f"==> applying topology and bench queues on RabbitMQ {broker.version}", flush=True)
        run_async(_prepare(broker.endpoint, args.topology))
        outcomes = run_async(_bench_all(args, systems, broker, keys, Path(tmp)))
    found = ratios(outcomes)
    report = {
        **header("bench/run.py", version, broker.version, load),
        "params": _params(args, broker),
        "systems": {o.system: o.as_json() for o in outcomes},
        "ratios": found,
        "targets": targets(found),
    }
    print()
    print(table(outcomes, found))
    if load[0] > 0.7:  # measured before we started anything: someone else's work
        print(f"\nwarning: load average was {load[0]:.1f} at the start: other work shared the CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (and WAYANG_EVENT_LOOP is not ``asyncio``), else None."""
    if os.environ.get("WAYANG_EVENT_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


TWO_WORKER_SYSTEMS = "raw,wayang,dramatiq-confirmed"  # --suite's run with --workers 2


def suite(args: argparse.Namespace) -> int:
    """Every part of issue 16's measurement, one after the other, each on a broker of its own
    (one machine's CPUs shared by one part at a time): this run's systems, the same with two
    worker processes, the price of each guarantee and 4 shards, the 100,000-task backlog and
    20,000 outstanding tasks, then the charts. Each part writes its JSON in ``--out``'s folder
    and a failing part stops the suite."""
    folder = args.out.parent
    python = sys.executable
    common = [
        *("--tasks", str(args.tasks), "--rounds", str(args.rounds)),
        *("--latency-samples", str(args.latency_samples), "--warmup", str(args.warmup)),
    ]
    parts = [
        ("systems, one worker process each", [*common, "--drain", str(args.drain)], "latest"),
        (
            "two worker processes each",
            [
                *common,
                "--drain",
                "0",
                "--workers",
                "2",
                "--systems",
                "raw,wayang,dramatiq-confirmed",
            ],
            "workers2",
        ),
    ]
    for title, extra, name in parts:
        print(f"\n##### {title}", flush=True)
        out = folder / f"{name}.json"
        subprocess.run([python, str(Path(__file__)), *extra, "--out", str(out)], check=True)
    print("\n##### the price of each guarantee, and 4 shards", flush=True)
    prices = [
        python,
        str(ROOT / "bench" / "prices.py"),
        *common,
        "--out",
        str(folder / "prices.json"),
    ]
    subprocess.run(prices, check=True)
    print(f"\n##### a {args.backlog:,}-task backlog, {args.outstanding:,} outstanding", flush=True)
    backlog = [python, str(ROOT / "bench" / "backlog.py"), "--count", str(args.backlog)]
    backlog += ["--outstanding", str(args.outstanding), "--out", str(folder / "backlog.json")]
    subprocess.run(backlog, check=True)
    chart = [python, str(ROOT / "bench" / "chart.py"), "--latest", str(folder / "latest.json")]
    subprocess.run([*chart, "--prices", str(folder / "prices.json")], check=True)
    return 0


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_async(work: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, where SIGTERM cancels the work as Ctrl-C does (finally blocks run);
    on uvloop when it is installed, as wayang-mq's daemons run: this process is every
    system's dispatcher side, so each client gets the same loop."""

    async def cancellable() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await work

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(cancellable())
    except asyncio.CancelledError:
        raise KeyboardInterrupt("SIGTERM") from None
    finally:
        signal.signal(signal.SIGTERM, interrupted)  # closing the loop reset it


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5_000, help="tasks per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per system")
    parser.add_argument("--latency-samples", type=int, default=1_500, help="sequential trips")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="slots (and prefetch) per worker process"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes per system (dramatiq: --processes)"
    )
    parser.add_argument("--window", type=int, default=500, help="outstanding tasks at most")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up tasks per system")
    parser.add_argument(
        "--drain", type=int, default=3_000, help="tasks queued before each worker starts (0: off)"
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, of {', '.join(ALL_SYSTEMS)} (default {','.join(SYSTEMS)})",
    )
    parser.add_argument(
        "--raw-uvloop",
        action="store_true",
        help="run the raw aio-pika worker on uvloop (wayang-mq's worker and this process "
        "use uvloop when installed; WAYANG_EVENT_LOOP=asyncio runs both on asyncio's loop)",
    )
    parser.add_argument(
        "--celery-pool", choices=CELERY_POOLS, default="threads", help="Celery's worker pool"
    )
    parser.add_argument(
        "--wayang-log-level", default="INFO", help="the wayang-mq worker's --log-level"
    )
    parser.add_argument(
        "--py-spy", type=Path, metavar="DIR", help="sample each worker's first round into DIR"
    )
    parser.add_argument(
        "--topology",
        type=Path,
        default=ROOT / "topology" / "wayang.toml",
        help="the topology applied (e.g. one with record = false, to price the record)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--suite",
        action="store_true",
        help="all of issue 16's parts in turn: these systems, --workers 2, bench/prices.py, "
        "bench/backlog.py, bench/chart.py (JSON beside --out)",
    )
    parser.add_argument("--backlog", type=int, default=100_000, help="--suite: backlog tasks")
    parser.add_argument(
        "--outstanding", type=int, default=20_000, help="--suite: tasks outstanding at once"
    )
    return parser


def _params(args: argparse.Namespace, broker: Broker) -> dict[str, Any]:
    return {
        "tasks_per_round": args.tasks,
        "rounds": args.rounds,
        "latency_samples": args.latency_samples,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "prefetch": args.concurrency,
        "dramatiq": {
            "worker": f"--processes {args.workers} --threads {args.concurrency}",
            "prefetch": f"{2 * args.concurrency} per process (Dramatiq's default, 2 x threads)",
            "middleware": "Dramatiq's defaults",
            "dramatiq": "sends unconfirmed (Dramatiq's default)",
            "dramatiq-confirmed": "RabbitmqBroker(confirm_delivery=True): every send confirmed",
        },
        "window": args.window,
        "warmup": args.warmup,
        "drain": args.drain,
        "wayang_log_level": args.wayang_log_level,
        "celery_pool": args.celery_pool,
        "raw_worker_loop": "uvloop" if args.raw_uvloop else "asyncio",
        "wayang_and_dispatcher_loop": "uvloop" if _loop_factory() else "asyncio",
        "payload": '{"n": i, "pad": "x" * 100}',
        "private_broker": bool(broker.pids),
    }


@contextlib.contextmanager
def open_broker(tmp: Path) -> Iterator[Broker]:
    """The broker in WAYANG_AMQP_URL, else a private node that is stopped on the way out."""
    url = os.environ.get("WAYANG_AMQP_URL")
    if url:
        print("==> using the broker in WAYANG_AMQP_URL", flush=True)
        yield Broker(BrokerEndpoint.from_url(url, os.environ.get("WAYANG_MANAGEMENT_URL")))
        return
    node = RabbitNode(tmp / "rabbitmq")
    print(f"==> starting a private RabbitMQ node in {node.state_dir}", flush=True)
    try:
        endpoint = node.start()
        yield Broker(endpoint, tuple(processes_in(node.state_dir)))
    finally:
        # The data goes with the temp dir: no need to wait for 3.10's ~5 s clean stop.
        node.kill()


async def _prepare(endpoint: BrokerEndpoint, topology_path: Path) -> None:
    raw = tomllib.loads(topology_path.read_text(encoding="utf-8"))
    raw.setdefault("capabilities", {})[metered.CAPABILITY] = {}  # the metrics-on worker's
    topology = parse_topology(raw, source=str(topology_path))
    await apply_topology(topology, endpoint.amqp_url, management_client(endpoint))
    await declare_raw_topology(endpoint.amqp_url)
    await asyncio.to_thread(dramatiq_app.declare_queues, endpoint.amqp_url)


async def _bench_all(
    args: argparse.Namespace, systems: list[str], broker: Broker, keys: Path, tmp: Path
) -> list[Outcome]:
    """Drain each worker, warm up, interleave the throughput rounds, measure latency."""
    contenders = [_contender(system, args, broker, keys, tmp) for system in systems]
    try:
        for contender in contenders:
            await contender.connect()
            if args.drain:
                await contender.measure_drain(args.drain, args.window)
            else:
                contender.start_worker()
            queue = QUEUES[contender.system]
            await wait_consuming(broker.endpoint.amqp_url, queue, contender.worker, args.workers)
            await contender.throughput(f"{contender.label} warm-up", args.warmup, args.window)
        for round_no in range(args.rounds):
            for contender in _rotated(contenders, round_no):
                label = f"{contender.label} throughput (round {round_no + 1}/{args.rounds})"
                spy = args.py_spy if round_no == 0 else None
                with _py_spy(spy, contender.system, contender.worker):
                    await contender.measured_throughput(label, args.tasks, args.window, broker)
        for contender in contenders:
            contender.peak_rss_mib = contender.worker.peak_rss_mib()
        for round_no, share in enumerate(_shares(args.latency_samples, args.rounds)):
            for contender in _rotated(contenders, round_no):
                label = f"{contender.label} latency (round {round_no + 1}/{args.rounds})"
                await contender.latency(label, share)
        return [contender.outcome(broker) for contender in contenders]
    except Exception:
        for contender in contenders:
            with contextlib.suppress(RuntimeError):
                print(contender.worker.log_tail(), file=sys.stderr)
        raise
    finally:
        for contender in contenders:
            with contextlib.suppress(Exception):
                await contender.close()


def _contender(
    system: str, args: argparse.Namespace, broker: Broker, keys: Path, tmp: Path
) -> Contender:
    url = broker.endpoint.amqp_url
    client: AsyncClient | CeleryClient
    if system == "wayang":
        client = WayangClient(url, Signer.from_file(next(keys.glob("*.key"))))
    elif system == "wayang-metrics":
        signer = Signer.from_file(next(keys.glob("*.key")))
        client = WayangClient(url, signer, metered.CAPABILITY, registry=CollectorRegistry())
    elif system == "raw":
        client = RawClient(url)
    elif system.startswith("dramatiq"):
        client = DramatiqClient(url, confirm=system == "dramatiq-confirmed")
    else:
        client = CeleryClient(url)
    commands = _worker_commands(system, args)
    env = worker_env(system, broker.endpoint, keys)

    def start() -> WorkerSet:
        members: list[WorkerProcess] = []
        try:
            for index, command in enumerate(commands):
                name = system if len(commands) == 1 else f"{system}-{index + 1}"
                members.append(WorkerProcess.start(name, command, env=env, cwd=ROOT, log_dir=tmp))
        except BaseException:
            WorkerSet(system, members).stop()
            raise
        return WorkerSet(system, members)

    return Contender(system, client, start)


def _worker_commands(system: str, args: argparse.Namespace) -> list[list[str]]:
    """The command of each worker process (one command for Dramatiq, which forks its own)."""
    if system.startswith("dramatiq"):
        # One supervisor forking --processes workers of --threads threads each; --queues keeps
        # them off the reply queue, which only the bench client reads.
        return [
            [
                *(sys.executable, "-m", "dramatiq", "bench.dramatiq_app"),
                *("--processes", str(args.workers), "--threads", str(args.concurrency)),
                *("--queues", QUEUES[system]),
            ]
        ]
    return [_worker_command(system, args, index) for index in range(args.workers)]


def _worker_command(system: str, args: argparse.Namespace, index: int) -> list[str]:
    concurrency = str(args.concurrency)
    suffix = "" if index == 0 else f"-{index + 1}"  # distinct ids and hostnames
    if system == "wayang":
        return [
            *(sys.executable, "-m", "wayang_mq.cli", "--log-level", args.wayang_log_level),
            *("worker", "wayang_workers.demo:Echo", "--id", f"bench-wayang{suffix}"),
            *("--concurrency", concurrency, "--prefetch", concurrency),
        ]
    if system == "wayang-metrics":  # counting, and serving /metrics on a free port
        return [
            *(sys.executable, "-m", "wayang_mq.cli", "--log-level", args.wayang_log_level),
            *("worker", "bench.metered:MeteredEcho", "--id", f"bench-wayang-metrics{suffix}"),
            *("--concurrency", concurrency, "--prefetch", concurrency, "--metrics-port", "0"),
        ]
    if system == "raw":
        loop = ["--uvloop"] if args.raw_uvloop else []
        return [sys.executable, "-m", "bench.raw_worker", "--prefetch", concurrency, *loop]
    # threads (default): one process running N tasks at once, like the asyncio workers;
    # prefork would add a process per slot and a pipe hop per task. mingle and gossip only
    # talk to other workers, and there are none.
    pool = ["--pool", args.celery_pool]
    if args.celery_pool != "solo":
        pool += ["--concurrency", concurrency]
    return [
        *(sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", *pool),
        *("--loglevel", "WARNING", "--without-mingle", "--without-gossip"),
        *("--hostname", f"bench{suffix}@%h"),
    ]


def worker_env(system: str, endpoint: BrokerEndpoint, keys: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if system.startswith("wayang"):
        env.update(
            WAYANG_AMQP_URL=endpoint.amqp_url,
            WAYANG_MANAGEMENT_URL=endpoint.management_url,
            WAYANG_KEY_DIR=str(keys),
        )
    elif system == "raw":
        env["BENCH_AMQP_URL"] = endpoint.amqp_url
    elif system.startswith("dramatiq"):
        env["BENCH_AMQP_URL"] = endpoint.amqp_url
        env["BENCH_DRAMATIQ_CONFIRM"] = "1" if system == "dramatiq-confirmed" else "0"
    else:
        env["CELERY_BROKER_URL"] = endpoint.amqp_url
    return env


async def wait_consuming(amqp_url: str, queue: str, worker: WorkerSet, expected: int) -> None:
    """Until ``expected`` consumers (one per worker process) read the queue; fail fast if a
    worker exited."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if not worker.alive():
            raise RuntimeError(f"a {worker.name} worker exited\n{worker.log_tail()}")
        with contextlib.suppress(Exception):  # the queue may not be declared yet (celery)
            if await consumer_count(amqp_url, queue) >= expected:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {worker.name} workers did not all consume {queue} in time")
        await asyncio.sleep(0.2)


def _rotated(contenders: list[Contender], round_no: int) -> list[Contender]:
    """A different system goes first each round (none always runs on a cold or warm box)."""
    shift = round_no % len(contenders)
    return contenders[shift:] + contenders[:shift]


def _shares(total: int, rounds: int) -> list[int]:
    """``total`` split into ``rounds`` near-equal parts."""
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


@contextlib.contextmanager
def _py_spy(directory: Path | None, system: str, workers: WorkerSet) -> Iterator[None]:
    """Optionally sample each worker (and its children) with py-spy for the block."""
    if directory is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    directory.mkdir(parents=True, exist_ok=True)
    recorders = []
    for index, member in enumerate(workers.members):
        # Collapsed stacks: read them as text, or load them in speedscope or flamegraph.pl.
        suffix = "" if index == 0 else f"-{index + 1}"
        out = directory / f"{system}{suffix}.folded"
        command = [exe, "record", "--pid", str(member.pid), "--rate", "200", "--format", "raw"]
        recorders.append(
            subprocess.Popen(
                [*command, "--subprocesses", "--output", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        time.sleep(0.5)  # let them attach
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for recorder in recorders:
            try:
                recorder.wait(30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: workers and broker stopped", file=sys.stderr)
        sys.exit(130)
