"""Horizontal scaling: 1, 2 and 4 worker daemons on an I/O-bound capability, nothing else changed.

The claim measured: more daemons on a capability spread its load with no configuration. Each
worker is started the way a user starts one (``python -m wayang_mq.cli worker bench.nap:Nap
--concurrency C``, prefetch left at its default, equal to the concurrency); every run uses the
same command, the same topology, the same dispatcher and the same window, and only the number
of processes differs. The executor (``bench/nap.py``, serving ``demo.sleep``) sleeps 20 ms and
does nothing else, like a task waiting on a remote API: one worker's ceiling is
``C / 0.020 s`` tasks/s, k workers' ``k`` times that.

Per round and per worker count k (the counts' order rotated round by round, so a burst of load
from elsewhere on the machine does not always hit the same k): start k worker processes, wait
until the queue has k consumers, warm up, then N tasks in a closed loop of W outstanding
(W is larger than every slot of the largest fleet, so the queue never runs dry), first submit
to last result; stop the workers (SIGTERM: they drain). Reported: the median round's tasks/s
[min–max], the speed-up over one worker, efficiency against the sleep's ceiling, the share
of tasks each worker ran (from each result's ``executor_id``) and the CPU per task of the
workers, this process (the dispatcher) and the private broker.

    .venv/bin/python bench/scaling.py [--workers 1,2,4] [--concurrency 2] [--tasks 2000]
                                      [--rounds 3] [--sleep-ms 20] [--prefetch N[,M]]

``--prefetch 2,4`` measures every worker count at each prefetch, interleaved in the same
rounds (the one comparison where a flag changes: what prefetch does to the same fleet).

Progress goes to stderr, the table to stdout, every number to ``--out`` (JSON, default
``bench/results/scaling.json``). A private RabbitMQ node is started in a temp dir unless
``WAYANG_AMQP_URL`` is set. See ``docs/performance.md``, issue 15.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/scaling.py` runs with bench/ on the path

from bench.clients import consumer_count  # noqa: E402
from bench.measure import Throughput, throughput_async  # noqa: E402
from bench.nap import CAPABILITY  # noqa: E402
from bench.processes import WorkerProcess  # noqa: E402
from bench.report import code_version, header  # noqa: E402
from bench.run import Broker, interrupted, open_broker, run_async, worker_env  # noqa: E402
from wayang_mq.amqp.connect import management_client  # noqa: E402
from wayang_mq.client.dispatcher import Dispatcher, DispatcherConfig  # noqa: E402
from wayang_mq.core.model import Status  # noqa: E402
from wayang_mq.core.names import task_queue  # noqa: E402
from wayang_mq.core.signing import KeyRing, Signer, write_keypair  # noqa: E402
from wayang_mq.topology.apply import apply_topology  # noqa: E402
from wayang_mq.topology.spec import DEFAULT_TOPOLOGY_PATH, load_topology  # noqa: E402

READY_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 60.0


def _say(text: str) -> None:
    print(f"== {text}", file=sys.stderr, flush=True)


@dataclass
class Fleet:
    """The measurements of one worker count over every round."""

    workers: int
    concurrency: int
    prefetch: int | None  # None: the worker's default (its concurrency)
    sleep_s: float
    throughputs: list[Throughput] = field(default_factory=list)
    shares: list[list[int]] = field(default_factory=list)  # tasks per worker, per round
    loads: list[float] = field(default_factory=list)  # 1-minute load average as each began
    cpu_s: dict[str, float] = field(default_factory=dict)  # worker(s), dispatcher, broker

    @property
    def ceiling_per_s(self) -> float:
        """What the sleep allows: every slot of every worker always sleeping."""
        return self.workers * self.concurrency / self.sleep_s

    @property
    def per_s(self) -> float:
        """The median round's tasks per second."""
        return statistics.median(t.per_s for t in self.throughputs)

    def as_json(self, one_worker_per_s: float | None) -> dict[str, Any]:
        """The numbers, per round and summarised."""
        rates = [t.per_s for t in self.throughputs]
        tasks = sum(t.tasks for t in self.throughputs)
        return {
            "workers": self.workers,
            "prefetch": self.prefetch or self.concurrency,
            "throughput_per_s": {
                "median": round(self.per_s, 1),
                "min": round(min(rates), 1),
                "max": round(max(rates), 1),
                "rounds": [round(r, 1) for r in rates],
            },
            "ceiling_per_s": round(self.ceiling_per_s, 1),
            "efficiency_vs_ceiling": round(self.per_s / self.ceiling_per_s, 3),
            "speedup_vs_one_worker": round(self.per_s / one_worker_per_s, 3)
            if one_worker_per_s
            else None,
            "tasks_per_worker_by_round": self.shares,
            "load_average_by_round": [round(x, 2) for x in self.loads],
            "smallest_share": round(self.smallest_share, 3),
            "cpu_us_per_task": {k: round(v / tasks * 1e6, 1) for k, v in self.cpu_s.items()},
        }

    @property
    def prefetch_label(self) -> str:
        """`` at prefetch M`` when a prefetch was asked for, else nothing."""
        return "" if self.prefetch is None else f" at prefetch {self.prefetch}"

    @property
    def smallest_share(self) -> float:
        """The least any one worker ran in any round, against an even split (1.0: even)."""
        return min(min(counts) * len(counts) / sum(counts) for counts in self.shares)


class Bench:
    """The broker, the keys, one dispatcher; starts and stops the fleets."""

    def __init__(self, args: argparse.Namespace, broker: Broker, keys: Path, tmp: Path) -> None:
        self.args = args
        self.broker = broker
        self.keys = keys
        self.tmp = tmp
        signer = Signer.from_file(next(keys.glob("*.key")))
        self.dispatcher = Dispatcher(
            DispatcherConfig(
                amqp_url=broker.endpoint.amqp_url,
                signer=signer,
                results_keyring=KeyRing.of([signer.public_key]),
                dispatcher_id="bench-scaling",
            )
        )
        self.ran_on: Counter[str] = Counter()
        self.started = 0  # worker processes started so far: their ids stay unique

    async def roundtrip(self, payload: dict[str, Any]) -> None:
        """One task of ``--sleep-ms``; counts which worker answered it."""
        handle = await self.dispatcher.submit(CAPABILITY, {"seconds": self.args.sleep_ms / 1000})
        result = await handle.result(RESULT_TIMEOUT_S)
        if result.status is not Status.SUCCESS:
            raise RuntimeError(f"{CAPABILITY} failed: {result.error}")
        self.ran_on[result.executor_id] += 1

    def command(self, executor_id: str, prefetch: int | None) -> list[str]:
        """The worker command: the same for every run but for its id (and ``--prefetch``
        when one is asked for)."""
        command = [sys.executable, "-m", "wayang_mq.cli", "--log-level", self.args.log_level]
        command += ["worker", "bench.nap:Nap", "--id", executor_id]
        command += ["--concurrency", str(self.args.concurrency)]
        if prefetch is not None:
            command += ["--prefetch", str(prefetch)]
        return command

    @contextlib.asynccontextmanager
    async def fleet(self, count: int, prefetch: int | None) -> Any:
        """``count`` worker processes consuming the capability's queue, stopped on the way out."""
        env = worker_env("wayang", self.broker.endpoint, self.keys)
        workers: list[WorkerProcess] = []
        try:
            for _ in range(count):
                self.started += 1
                name = f"scale-{self.started}"
                workers.append(
                    WorkerProcess.start(
                        name, self.command(name, prefetch), env=env, cwd=ROOT, log_dir=self.tmp
                    )
                )
            await self._consumers(count, workers)
            yield workers
        finally:
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers))

    async def _consumers(self, count: int, workers: list[WorkerProcess]) -> None:
        queue = task_queue(CAPABILITY)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while await consumer_count(self.broker.endpoint.amqp_url, queue) < count:
            dead = [w for w in workers if not w.alive()]
            if dead:
                raise RuntimeError(f"worker {dead[0].name} exited:\n{dead[0].log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} workers did not all consume {queue} in time")
            await asyncio.sleep(0.2)

    def cpu(self, workers: list[WorkerProcess]) -> dict[str, float]:
        """CPU seconds so far: the workers together, this process, our private broker."""
        found = {
            "worker": sum(w.cpu_seconds() for w in workers),
            "dispatcher": time.process_time(),
        }
        broker = self.broker.cpu_seconds()
        if broker is not None:
            found["broker"] = broker
        return found

    async def measure(self, fleet: Fleet, round_no: int) -> None:
        """One round of one fleet: start it, warm up, N tasks, count who ran them, stop it."""
        args = self.args
        label = (
            f"{fleet.workers} worker(s){fleet.prefetch_label}, round {round_no + 1}/{args.rounds}"
        )
        async with self.fleet(fleet.workers, fleet.prefetch) as workers:
            await throughput_async(self.roundtrip, f"{label} warm-up", args.warmup, args.window)
            self.ran_on.clear()
            fleet.loads.append(os.getloadavg()[0])
            before = self.cpu(workers)
            fleet.throughputs.append(
                await throughput_async(self.roundtrip, label, args.tasks, args.window)
            )
            for name, seconds in self.cpu(workers).items():
                if name in before:
                    fleet.cpu_s[name] = fleet.cpu_s.get(name, 0.0) + seconds - before[name]
            fleet.shares.append([self.ran_on.get(w.name, 0) for w in workers])
        _say(f"{label}: {fleet.throughputs[-1].per_s:,.0f} tasks/s, per worker {fleet.shares[-1]}")


async def _run(args: argparse.Namespace, broker: Broker, keys: Path, tmp: Path) -> list[Fleet]:
    topology = load_topology(DEFAULT_TOPOLOGY_PATH)
    await apply_topology(topology, broker.endpoint.amqp_url, management_client(broker.endpoint))
    bench = Bench(args, broker, keys, tmp)
    fleets = [
        Fleet(k, args.concurrency, prefetch, args.sleep_ms / 1000)
        for prefetch in args.prefetch
        for k in args.workers
    ]
    await bench.dispatcher.start()
    try:
        for round_no in range(args.rounds):
            shift = round_no % len(fleets)
            for fleet in fleets[shift:] + fleets[:shift]:
                await bench.measure(fleet, round_no)
    finally:
        await bench.dispatcher.close()
    return fleets


def one_worker(fleets: list[Fleet], fleet: Fleet) -> float | None:
    """The rate of one worker at ``fleet``'s prefetch: what its speed-up is taken against."""
    return next((f.per_s for f in fleets if f.workers == 1 and f.prefetch == fleet.prefetch), None)


def table(fleets: list[Fleet]) -> str:
    """The summary people read (markdown)."""
    lines = [
        "| workers | prefetch | tasks/s, median [min–max] | ceiling | of ceiling | × one worker"
        " | least share of an even split | CPU µs/task: workers | dispatcher | broker"
        " | load avg (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in fleets:
        rates = [t.per_s for t in f.throughputs]
        tasks = sum(t.tasks for t in f.throughputs)
        one = one_worker(fleets, f)
        speedup = f"{f.per_s / one:.2f}×" if one else "-"
        lines.append(
            f"| {f.workers} | {f.prefetch or f.concurrency}"
            f" | {f.per_s:,.0f} [{min(rates):,.0f}–{max(rates):,.0f}]"
            f" | {f.ceiling_per_s:,.0f} | {f.per_s / f.ceiling_per_s:.0%} | {speedup}"
            f" | {f.smallest_share:.2f} | {_per_task(f, 'worker', tasks)}"
            f" | {_per_task(f, 'dispatcher', tasks)} | {_per_task(f, 'broker', tasks)}"
            f" | {statistics.median(f.loads):.1f} |"
        )
    return "\n".join(lines)


def _per_task(fleet: Fleet, name: str, tasks: int) -> str:
    seconds = fleet.cpu_s.get(name)
    return "-" if seconds is None else f"{seconds / tasks * 1e6:,.0f}"


def main(argv: list[str] | None = None) -> int:
    """Start a broker, measure each fleet size, print the table and write the JSON."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)  # unwinds like Ctrl-C: workers and node stopped
    load = os.getloadavg()
    version = code_version(ROOT)
    _say(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with (
        tempfile.TemporaryDirectory(prefix="wayang-scaling-") as tmp,
        contextlib.redirect_stdout(sys.stderr),  # the shared measuring code prints progress
        open_broker(Path(tmp)) as broker,
    ):
        keys = Path(tmp) / "keys"
        write_keypair(keys)
        fleets = run_async(_run(args, broker, keys, Path(tmp)))
    report = {
        **header("bench/scaling.py", version, broker.version, load),
        "params": {
            "workers": args.workers,
            "concurrency_per_worker": args.concurrency,
            "prefetch_per_worker": [p or args.concurrency for p in args.prefetch],
            "sleep_ms": args.sleep_ms,
            "tasks_per_round": args.tasks,
            "rounds": args.rounds,
            "window": args.window,
            "warmup": args.warmup,
            "worker_log_level": args.log_level,
            "private_broker": bool(broker.pids),
        },
        "fleets": [f.as_json(one_worker(fleets, f)) for f in fleets],
    }
    print(table(fleets))
    if load[0] > 0.7:
        print(f"\nload average was {load[0]:.2f} at the start: other work shared the CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _say(f"wrote {args.out}")
    return 0


def _counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("give whole numbers of at least 1, like 1,2,4")
    return counts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workers", type=_counts, default=[1, 2, 4], help="fleet sizes: 1,2,4")
    parser.add_argument("--concurrency", type=int, default=2, help="per worker (default 2)")
    parser.add_argument(
        "--prefetch",
        type=_counts,
        default=[None],
        help="per worker, or a list to compare (default: the worker's, its concurrency)",
    )
    parser.add_argument("--sleep-ms", type=float, default=20.0, help="each task's sleep")
    parser.add_argument("--tasks", type=int, default=2_000, help="tasks per round and fleet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=200, help="outstanding tasks at most")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up tasks per fleet start")
    parser.add_argument("--log-level", default="INFO", help="the workers' --log-level")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    return parser


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: workers and broker stopped", file=sys.stderr)
        sys.exit(130)
