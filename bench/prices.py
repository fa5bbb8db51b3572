"""The price of each guarantee, and of sharding: wayang-mq with one guarantee off at a time.

Variants of the same worker and dispatcher, measured in one run on one broker, as
bench/run.py measures its systems (its broker, worker processes, Contender and measurements
are reused): warm-up, then windowed throughput rounds with the variants interleaved and
rotated (median [min–max]), then sequential latency spread over the rounds (p50, p99), the
worker's peak RSS and the CPU per task of worker, dispatcher and broker.

    .venv/bin/python bench/prices.py [--tasks N] [--rounds N] [--latency-samples N]
                                     [--variants all-on,no-signatures,...] [--out PATH]

``all-on`` is bench/run.py's ``wayang`` system, the shipped defaults (metrics off: the CLI
worker counts nothing without ``--metrics-port``). Each ``no-*`` variant takes one guarantee
out with a bench-only patch (bench/variants.py, ``python -m bench.variant_worker``), on a
capability of its own (bench/priced.py) so that every variant's worker runs all the time; the
dispatcher side of a patch is applied in this process around that variant's turn only (the
variants' turns never overlap). ``no-records`` removes the record's bindings (what
``record = false`` declares) for its turns; ``metrics-on`` is the worker with
``--metrics-port`` and the dispatcher counting into a registry. ``sharded`` is the echo on a
capability with 4 shards, one worker consuming all four, tasks keyed over ``--keys`` partition
keys, against ``all-on`` (the unsharded ``demo.echo``).

Progress goes to stderr, the table to stdout, every number to ``--out`` (JSON, default
``bench/results/prices.json``); ``bench/chart.py`` draws it. A private RabbitMQ node is started
in a temp dir unless ``WAYANG_AMQP_URL`` is set. See ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/prices.py` runs with bench/ on the path

from bench import metered, priced, variants  # noqa: E402
from bench.clients import WayangClient  # noqa: E402
from bench.processes import WorkerProcess, WorkerSet  # noqa: E402
from bench.report import LABELS, Outcome, code_version, header  # noqa: E402
from bench.run import (  # noqa: E402
    Broker,
    Contender,
    _shares,
    _worker_command,
    interrupted,
    open_broker,
    run_async,
    wait_consuming,
    worker_env,
)
from wayang_mq.amqp.connect import management_client  # noqa: E402
from wayang_mq.core.names import RECORD_QUEUE, task_queue  # noqa: E402
from wayang_mq.core.signing import Signer, write_keypair  # noqa: E402
from wayang_mq.topology.apply import apply_topology  # noqa: E402
from wayang_mq.topology.spec import BindingSpec, Topology, parse_topology  # noqa: E402

TOPOLOGY = ROOT / "topology" / "wayang.toml"
BASE = "all-on"


@dataclass(frozen=True)
class Variant:
    """One way of running the worker and dispatcher, and what it leaves out."""

    name: str
    label: str
    removes: str
    capability: str
    executor: str = ""  # MODULE:CLASS of a bench/priced.py worker ("" : bench/run.py's)
    worker_off: tuple[str, ...] = ()  # bench/variants.py switches, in the worker process
    dispatcher_off: tuple[str, ...] = ()  # and in this process, during the variant's turn
    records: bool = True  # False: the record's bindings are removed during its turns
    metrics: bool = False
    shards: int = 0

    def queues(self) -> list[str]:
        """The queues its worker consumes."""
        if self.shards:
            return [task_queue(self.capability, n) for n in range(self.shards)]
        return [task_queue(self.capability)]


def _removes(switch: str) -> str:
    return variants.SWITCHES[switch].removes


VARIANTS = (
    Variant(BASE, "all on", "nothing: the shipped defaults (metrics off)", "demo.echo"),
    Variant(
        "no-signatures",
        "no signatures",
        _removes("signatures"),
        priced.CAPABILITIES["no-signatures"],
        "bench.priced:NoSignatures",
        worker_off=("signatures",),
        dispatcher_off=("signatures",),
    ),
    Variant(
        "no-schema",
        "no schema",
        _removes("schema"),
        priced.CAPABILITIES["no-schema"],
        "bench.priced:NoSchema",
        worker_off=("schema",),
        dispatcher_off=("schema",),
    ),
    Variant(
        "no-result-confirms",
        "no result confirms",
        _removes("result-confirms"),
        priced.CAPABILITIES["no-result-confirms"],
        "bench.priced:NoResultConfirms",
        worker_off=("result-confirms",),
    ),
    Variant(
        "no-heartbeats",
        "no heartbeats",
        _removes("heartbeats"),
        priced.CAPABILITIES["no-heartbeats"],
        "bench.priced:NoHeartbeats",
        worker_off=("heartbeats",),
    ),
    Variant(
        "no-records",
        "no records",
        "the control plane's record: wayang.record's bindings (record = false)",
        priced.CAPABILITIES["no-records"],
        "bench.priced:NoRecords",
        records=False,
    ),
    Variant(
        "metrics-on",
        "metrics on",
        "nothing; adds metrics (worker --metrics-port, dispatcher registry)",
        metered.CAPABILITY,
        metrics=True,
    ),
    Variant(
        "sharded",
        f"sharded ({priced.SHARDS})",
        "nothing; the capability has 4 shard queues, tasks carry partition keys",
        priced.CAPABILITIES["sharded"],
        "bench.priced:Sharded",
        shards=priced.SHARDS,
    ),
)
BY_NAME = {v.name: v for v in VARIANTS}
# bench/run.py's Contender and Outcome name systems by LABELS: ours join them here.
for _variant in VARIANTS:
    LABELS.setdefault(_variant.name, _variant.label)


class _UnsignedBeats(logging.Filter):
    """The no-signatures worker's heartbeats are unsigned: the other variants' dispatchers
    (outside its turn, their signatures checked) refuse them. Expected, so not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("heartbeat.refused" in text and "price-no-signatures" in text)


logging.getLogger("wayang_mq.client.supervisor").addFilter(_UnsignedBeats())


def _say(text: str) -> None:
    print(f"== {text}", file=sys.stderr, flush=True)


class KeyedClient(WayangClient):
    """The wayang-mq client with a partition key per task: ``customer-<n mod keys>``."""

    def __init__(self, amqp_url: str, signer: Signer, capability: str, keys: int) -> None:
        super().__init__(amqp_url, signer, capability)
        self._keys = keys

    async def submit(self, payload: dict[str, Any]) -> asyncio.Future[None]:
        handle = await self._dispatcher.submit(
            self._capability, payload, partition_key=self._key(payload)
        )
        return asyncio.ensure_future(self._succeeded(handle))

    async def roundtrip(self, payload: dict[str, Any]) -> None:
        handle = await self._dispatcher.submit(
            self._capability, payload, partition_key=self._key(payload)
        )
        await self._succeeded(handle)

    def _key(self, payload: dict[str, Any]) -> str:
        return f"customer-{int(payload['n']) % self._keys}"


class Bench:
    """The broker, the keys, a contender per variant, and the record's bindings."""

    def __init__(
        self, args: argparse.Namespace, broker: Broker, keys: Path, tmp: Path, topology: Topology
    ) -> None:
        self.args = args
        self.broker = broker
        self.keys = keys
        self.tmp = tmp
        self.record_bindings = _record_bindings(topology)
        self.contenders: dict[str, Contender] = {}
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._unbinding_checked = False

    def contender(self, variant: Variant) -> Contender:
        """bench/run.py's Contender for one variant: its client and its worker command."""
        url = self.broker.endpoint.amqp_url
        signer = Signer.from_file(next(self.keys.glob("*.key")))
        client: WayangClient
        if variant.shards:
            client = KeyedClient(url, signer, variant.capability, self.args.keys)
        else:
            registry = CollectorRegistry() if variant.metrics else None
            client = WayangClient(url, signer, variant.capability, registry=registry)
        command = self.command(variant)
        env = worker_env("wayang", self.broker.endpoint, self.keys)

        def start() -> WorkerSet:  # one worker process per variant
            worker = WorkerProcess.start(variant.name, command, env=env, cwd=ROOT, log_dir=self.tmp)
            return WorkerSet(variant.name, [worker])

        return Contender(variant.name, client, start)

    def command(self, variant: Variant) -> list[str]:
        """bench/run.py's wayang-mq worker command, or the same through bench.variant_worker
        with the variant's switches and executor."""
        if variant.name == BASE:
            return _worker_command("wayang", self.args, 0)
        if variant.metrics:
            return _worker_command("wayang-metrics", self.args, 0)
        concurrency = str(self.args.concurrency)
        wayang = [
            *("--log-level", self.args.wayang_log_level, "worker", variant.executor),
            *("--id", f"price-{variant.name}", "--concurrency", concurrency),
            *("--prefetch", concurrency),
        ]
        if not variant.worker_off:
            return [sys.executable, "-m", "wayang_mq.cli", *wayang]
        off = [part for switch in variant.worker_off for part in ("--off", switch)]
        return [sys.executable, "-m", "bench.variant_worker", *off, "--", *wayang]

    async def open(self) -> None:
        """A connection for the record's bindings and purges."""
        self._connection = await aio_pika.connect_robust(self.broker.endpoint.amqp_url)
        self._channel = await self._connection.channel()

    async def close(self) -> None:
        """Close the contenders (workers stopped) and the connection."""
        for contender in self.contenders.values():
            with contextlib.suppress(Exception):
                await contender.close()
        if self._connection is not None:
            await self._connection.close()

    @contextlib.asynccontextmanager
    async def turn(self, variant: Variant) -> AsyncIterator[None]:
        """One variant's measurement: the record emptied (every turn starts alike, as if a
        control plane kept up), its bindings removed for ``no-records``, the dispatcher's
        switches on; all put back after."""
        assert self._channel is not None
        record = None
        if self.record_bindings:
            record = await self._channel.get_queue(RECORD_QUEUE, ensure=False)
            await record.purge()
        if record is not None and not variant.records:
            for binding in self.record_bindings:
                await record.unbind(binding.source, binding.routing_key)
            if not self._unbinding_checked:  # an unbind that matches nothing is no error
                await self._check_unbound()
        try:
            with variants.off(variant.dispatcher_off):
                yield
        finally:
            if record is not None and not variant.records:
                for binding in self.record_bindings:
                    await record.bind(binding.source, binding.routing_key)

    async def _check_unbound(self) -> None:
        """Once: wayang.record has no binding left, or no-records would measure nothing."""
        management = management_client(self.broker.endpoint)
        left = [
            b
            for b in await asyncio.to_thread(management.list_bindings)
            if b.get("destination") == RECORD_QUEUE and b.get("source")
        ]
        if left:
            raise RuntimeError(f"{RECORD_QUEUE} is still bound after the unbinds: {left[:3]}")
        self._unbinding_checked = True

    async def run(self, chosen: list[Variant]) -> list[tuple[Variant, Outcome]]:
        """Start and warm up each variant, interleave the rounds, then the latency samples."""
        args, url = self.args, self.broker.endpoint.amqp_url
        await self.open()
        try:
            for variant in chosen:
                contender = self.contenders[variant.name] = self.contender(variant)
                await contender.connect()
                contender.start_worker()
                for queue in variant.queues():
                    await wait_consuming(url, queue, contender.worker, 1)
                async with self.turn(variant):
                    await contender.throughput(f"{variant.name} warm-up", args.warmup, args.window)
            for round_no in range(args.rounds):
                for variant in _rotated(chosen, round_no):
                    contender = self.contenders[variant.name]
                    label = f"{variant.name} throughput (round {round_no + 1}/{args.rounds})"
                    async with self.turn(variant):
                        await contender.measured_throughput(
                            label, args.tasks, args.window, self.broker
                        )
            for contender in self.contenders.values():
                contender.peak_rss_mib = contender.worker.peak_rss_mib()
            for round_no, share in enumerate(_shares(args.latency_samples, args.rounds)):
                for variant in _rotated(chosen, round_no):
                    label = f"{variant.name} latency (round {round_no + 1}/{args.rounds})"
                    async with self.turn(variant):
                        await self.contenders[variant.name].latency(label, share)
            return [(v, self.contenders[v.name].outcome(self.broker)) for v in chosen]
        except Exception:
            for contender in self.contenders.values():
                with contextlib.suppress(RuntimeError):  # log_tail names each worker's log
                    print(contender.worker.log_tail(), file=sys.stderr)
            raise
        finally:
            await self.close()


def _rotated(chosen: list[Variant], round_no: int) -> list[Variant]:
    """A different variant goes first each round (bench/run.py's rotation, for variants)."""
    shift = round_no % len(chosen)
    return chosen[shift:] + chosen[:shift]


def bench_topology(path: Path = TOPOLOGY) -> Topology:
    """The shipped topology plus every variant's capability (the sharded one with shards)."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    capabilities = raw.setdefault("capabilities", {})
    for variant in VARIANTS:
        capabilities.setdefault(
            variant.capability, {"shards": variant.shards} if variant.shards else {}
        )
    return parse_topology(raw, source=f"{path} + bench/prices.py's capabilities")


def _record_bindings(topology: Topology) -> list[BindingSpec]:
    """The bindings ``record = false`` leaves out: what ``no-records`` removes for its turns."""
    off = topology.model_copy(
        update={"defaults": topology.defaults.model_copy(update={"record": False})}
    )
    without = set(off.bindings())
    found = [b for b in topology.bindings() if b not in without]
    if any(b.destination != RECORD_QUEUE or b.destination_type != "queue" for b in found):
        raise RuntimeError(f"record = false leaves out more than {RECORD_QUEUE}'s bindings")
    return found


# -- what is reported ------------------------------------------------------------------------


def relative(outcome: Outcome, base: Outcome) -> dict[str, Any]:
    """A variant against all-on in the same run: > 1 is faster (throughput) or slower (p50,
    CPU). Per round too: the variants ran interleaved, round i of one beside round i of the
    other."""
    rates = [t.per_s for t in outcome.throughputs]
    base_rates = [t.per_s for t in base.throughputs]
    total, base_total = outcome.total_cpu_us, base.total_cpu_us
    return {
        "throughput": _r(outcome.per_s / base.per_s),
        "throughput_min": _r(min(rates) / base.per_s),
        "throughput_max": _r(max(rates) / base.per_s),
        "throughput_by_round": [_r(a / b) for a, b in zip(rates, base_rates, strict=True)],
        "p50": _r(outcome.latency.p50_ms / base.latency.p50_ms),
        "p99": _r(outcome.latency.p99_ms / base.latency.p99_ms),
        "worker_cpu": _r(outcome.worker_cpu_s / base.worker_cpu_s),
        "dispatcher_cpu": _r(outcome.dispatcher_cpu_s / base.dispatcher_cpu_s),
        "total_cpu": _r(total / base_total) if total and base_total else None,
    }


def _r(value: float) -> float:
    return round(value, 3)


def table(found: list[tuple[Variant, Outcome]]) -> str:
    """The summary people read (markdown)."""
    base = next(o for v, o in found if v.name == BASE)
    lines = [
        "| variant | tasks/s, median [min–max] | × all on | p50 ms | × all on | p99 ms"
        " | CPU µs/task: worker | dispatcher | broker | total | × all on | what it leaves out |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, o in found:
        rates = [t.per_s for t in o.throughputs]
        ratio = relative(o, base)
        cpu = [o.per_task_us(s) for s in (o.worker_cpu_s, o.dispatcher_cpu_s, o.broker_cpu_s)]
        total_ratio = ratio["total_cpu"]
        lines.append(
            f"| {variant.name} | {o.per_s:,.0f} [{min(rates):,.0f}–{max(rates):,.0f}]"
            f" | {ratio['throughput']:.3f}× | {o.latency.p50_ms:.2f} | {ratio['p50']:.3f}×"
            f" | {o.latency.p99_ms:.2f} | {_us(cpu[0])} | {_us(cpu[1])} | {_us(cpu[2])}"
            f" | {_us(o.total_cpu_us)}"
            f" | {'-' if total_ratio is None else f'{total_ratio:.3f}×'} | {variant.removes} |"
        )
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def report(
    args: argparse.Namespace,
    found: list[tuple[Variant, Outcome]],
    broker: Broker,
    version: dict[str, Any],
    load: tuple[float, float, float],
) -> dict[str, Any]:
    """Everything, for the JSON."""
    base = next(o for v, o in found if v.name == BASE)
    out: dict[str, Any] = {
        **header("bench/prices.py", version, broker.version, load),
        "params": {
            "tasks_per_round": args.tasks,
            "rounds": args.rounds,
            "latency_samples": args.latency_samples,
            "concurrency": args.concurrency,
            "prefetch": args.concurrency,
            "window": args.window,
            "warmup": args.warmup,
            "wayang_log_level": args.wayang_log_level,
            "partition_keys": args.keys,
            "payload": '{"n": i, "pad": "x" * 100}',
            "private_broker": bool(broker.pids),
        },
        "baseline": BASE,
        "variants": {},
    }
    for variant, outcome in found:
        out["variants"][variant.name] = {
            **outcome.as_json(),
            "removes": variant.removes,
            "capability": variant.capability,
            "worker_switches_off": list(variant.worker_off),
            "dispatcher_switches_off": list(variant.dispatcher_off),
            "record": variant.records,
            "metrics": variant.metrics,
            "shards": variant.shards or None,
            "vs_all_on": relative(outcome, base),
        }
    return out


# -- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Start a broker, measure every variant, print the table and write the JSON."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)  # unwinds like Ctrl-C: workers and node stopped
    chosen = _chosen(args.variants)
    load = os.getloadavg()
    version = code_version(ROOT)
    _say(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    topology = bench_topology()
    with (
        tempfile.TemporaryDirectory(prefix="wayang-prices-") as tmp,
        contextlib.redirect_stdout(sys.stderr),  # the shared measuring code prints progress
        open_broker(Path(tmp)) as broker,
    ):
        keys = Path(tmp) / "keys"
        write_keypair(keys)
        _say(f"applying the topology and the variants' capabilities on RabbitMQ {broker.version}")
        run_async(
            apply_topology(topology, broker.endpoint.amqp_url, management_client(broker.endpoint))
        )
        bench = Bench(args, broker, keys, Path(tmp), topology)
        found = run_async(bench.run(chosen))
    print(table(found))
    if load[0] > 0.7:
        print(f"\nload average was {load[0]:.2f} at the start: other work shared the CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report(args, found, broker, version, load), indent=2) + "\n")
    _say(f"wrote {args.out}")
    return 0


def _chosen(text: str) -> list[Variant]:
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in BY_NAME]
    if unknown:
        raise SystemExit(f"--variants: no {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    if BASE not in wanted:
        wanted.insert(0, BASE)  # every ratio is against it
    return [v for v in VARIANTS if v.name in wanted]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3_000, help="tasks per round and variant")
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds per variant")
    parser.add_argument("--latency-samples", type=int, default=1_500, help="sequential trips")
    parser.add_argument("--concurrency", type=int, default=16, help="worker concurrency")
    parser.add_argument("--window", type=int, default=500, help="outstanding tasks at most")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up tasks per variant")
    parser.add_argument("--keys", type=int, default=100, help="partition keys (sharded)")
    parser.add_argument(
        "--variants",
        default=",".join(BY_NAME),
        help=f"comma-separated, of {', '.join(BY_NAME)} (all-on is always measured)",
    )
    parser.add_argument(
        "--wayang-log-level", default="INFO", help="the wayang-mq workers' --log-level"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prices.json")
    return parser


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: workers and broker stopped", file=sys.stderr)
        sys.exit(130)
