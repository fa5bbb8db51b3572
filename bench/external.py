"""The executors for external systems through the fabric, beside the same work done directly.

One run, on a private RabbitMQ and a private PostgreSQL; each executor runs as its own worker
daemon, started the way a user starts it (``wayang-mq worker ... --config FILE``), and this
process is the dispatcher. Each phase does the same work twice, the two sides interleaved
(order rotated per round): through the fabric, and directly from this process, which is the
baseline every ratio is taken against.

1. ``http.call``: N GETs of a small JSON body from ``bench/http_target.py`` (its own process),
   worker ``--concurrency 16`` with ``allow_networks = ["127.0.0.1/32"]``; directly: one
   ``aiohttp.ClientSession``, 16 at a time. The server counts every request (none repeated).
2. ``db.query``: N ``SELECT id, name FROM items WHERE id = %s`` on a read-only connection
   (worker concurrency 8, a pool of 8); directly: a ``psycopg_pool.AsyncConnectionPool`` of 8.
3. ``payment.charge``, provider ``ledger``: N charges (worker concurrency 8); directly:
   ``Ledger.charge()`` in this process, 8 at a time. Each ledger must then hold exactly one
   transfer per charge made, and its balances must sum to zero.
4. The rate limiter: tasks queued first, then a worker with ``--rate http.call=50/s``: the
   rate between the first and the last arrival at the server, and the most in any 1 s.

For reference, ``demo.echo`` (a task that does nothing) goes through the fabric first, set up
as ``http.call`` is: what the fabric alone costs per task on this machine, in this run.

Throughput: R rounds of N tasks per side, a closed loop (the fabric side keeps 4 tasks per
worker slot outstanding, so the worker never waits for the next one; the direct side keeps
the worker's concurrency), first start to last result; median [min–max]. Latency: S
sequential round trips per side over the rounds, p50. CPU per task during the throughput
rounds: the worker, this process (the dispatcher, or the direct client) and the broker.

    .venv/bin/python bench/external.py [--quick] [--tasks N] [--rounds R] [--out FILE]

Progress goes to stderr; the markdown table to stdout; every number to ``--out`` (JSON).
``WAYANG_AMQP_URL`` / ``WAYANG_DATABASE_URL`` use existing services instead (carrying no other
traffic, please). See ``docs/performance.md``, issue 13.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import psycopg
from psycopg_pool import AsyncConnectionPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/external.py` runs with bench/ on the path

# mypy reads workers/ as the package `workers`: to it wayang_workers is an editable install's
# import hook (which it cannot follow) or an untyped path. The code runs on wayang_workers.
if TYPE_CHECKING:
    from workers.payment.ledger import Ledger, apply_schema
    from workers.payment.providers import ChargeRequest
else:
    from wayang_workers.payment.ledger import Ledger, apply_schema
    from wayang_workers.payment.providers import ChargeRequest

from bench.clients import WayangClient  # noqa: E402
from bench.measure import Latency, Throughput, drain_async, latency_async, throughput_async  # noqa: E402
from bench.processes import WorkerProcess, WorkerSet  # noqa: E402
from bench.report import code_version, machine  # noqa: E402
from bench.run import Broker, interrupted, open_broker, run_async, wait_consuming, worker_env  # noqa: E402
from wayang_mq.amqp.connect import management_client  # noqa: E402
from wayang_mq.core.names import task_queue  # noqa: E402
from wayang_mq.core.signing import Signer, write_keypair  # noqa: E402
from wayang_mq.testing.plugin import fresh_database, open_postgres, service_dir  # noqa: E402
from wayang_mq.topology.apply import apply_topology  # noqa: E402
from wayang_mq.topology.spec import DEFAULT_TOPOLOGY_PATH, load_topology  # noqa: E402

HTTP_CONCURRENCY = 16
DB_CONCURRENCY = 8  # and the pool's size, on both sides
PAYMENT_CONCURRENCY = 8  # and the ledger's pool size, on both sides
FABRIC_WINDOW_PER_SLOT = 4
ITEMS = 10_000
SELECT = "SELECT id, name FROM items WHERE id = %s"
CUSTOMERS = 8  # charges come from cust-0 .. cust-7, round robin, to one merchant account
MERCHANT = "merchant-eur"
READY_TIMEOUT_S = 30.0

Roundtrip = Callable[[dict[str, Any]], Awaitable[None]]
Meter = Callable[[], float | None]


def _say(text: str) -> None:
    print(f"== {text}", file=sys.stderr, flush=True)


# -- one side of a phase ---------------------------------------------------------------------


@dataclass
class Side:
    """One way of doing a phase's work: through the fabric, or directly from this process.

    ``roundtrip`` does task number ``payload["n"]`` (the payloads of ``bench.measure``);
    ``meters`` read CPU seconds so far (the worker, this process, the broker, the server);
    ``verify`` is called with how many round trips were just made (the server counts them).
    """

    label: str
    roundtrip: Roundtrip
    window: int
    meters: Mapping[str, Meter]
    verify: Callable[[int], Awaitable[None]] | None = None
    throughputs: list[Throughput] = field(default_factory=list)
    latencies: list[list[float]] = field(default_factory=list)  # one list per round
    cpu_s: dict[str, float] = field(default_factory=dict)
    done: int = 0  # every round trip made, warm-up included

    async def warm_up(self, count: int) -> None:
        """Round trips that count for nothing but the checks (connections, caches, JIT)."""
        await throughput_async(self.roundtrip, f"{self.label} warm-up", count, self.window)
        await self._made(count)

    async def throughput(self, count: int, label: str) -> None:
        """One round of ``count`` tasks, ``window`` outstanding, with the CPU it took."""
        before = {name: read() for name, read in self.meters.items()}
        self.throughputs.append(await throughput_async(self.roundtrip, label, count, self.window))
        for name, read in self.meters.items():
            now, then = read(), before[name]
            if now is not None and then is not None:
                self.cpu_s[name] = self.cpu_s.get(name, 0.0) + now - then
        await self._made(count)

    async def latency(self, samples: int, label: str) -> None:
        """``samples`` round trips one after the other."""
        self.latencies.append(await latency_async(self.roundtrip, label, samples))
        await self._made(samples)

    async def _made(self, count: int) -> None:
        self.done += count
        if self.verify is not None:
            await self.verify(count)

    @property
    def per_s(self) -> float:
        """The median round's tasks per second."""
        return statistics.median(t.per_s for t in self.throughputs)

    @property
    def latency_all(self) -> Latency:
        """Every round's sequential samples together."""
        return Latency.of([s for samples in self.latencies for s in samples])

    def as_json(self) -> dict[str, Any]:
        """The numbers, per round and summarised."""
        rates = [t.per_s for t in self.throughputs]
        tasks = sum(t.tasks for t in self.throughputs)
        return {
            "label": self.label,
            "window": self.window,
            "throughput_per_s": {
                "median": round(self.per_s, 1),
                "min": round(min(rates), 1),
                "max": round(max(rates), 1),
                "rounds": [round(r, 1) for r in rates],
            },
            "latency_ms": {k: round(v, 3) for k, v in asdict(self.latency_all).items()},
            "p50_ms_by_round": [round(Latency.of(s).p50_ms, 3) for s in self.latencies],
            "cpu_us_per_task": {k: round(v / tasks * 1e6, 1) for k, v in self.cpu_s.items()},
            "round_trips": self.done,
        }


@dataclass
class Phase:
    """One executor: the fabric side, the direct side, what was checked."""

    name: str
    fabric: Side
    direct: Side
    checks: dict[str, Any] = field(default_factory=dict)

    async def measure(self, args: argparse.Namespace, tasks: int) -> None:
        """Warm both up, then interleaved throughput rounds, then interleaved latency."""
        sides = [self.fabric, self.direct]
        for side in sides:
            await side.warm_up(args.warmup)
        for round_no in range(args.rounds):
            for side in _rotated(sides, round_no):
                label = f"{side.label} throughput (round {round_no + 1}/{args.rounds})"
                await side.throughput(tasks, label)
        for round_no, share in enumerate(_shares(args.latency_samples, args.rounds)):
            for side in _rotated(sides, round_no):
                await side.latency(share, f"{side.label} latency (round {round_no + 1})")

    def ratios(self) -> dict[str, float]:
        """fabric/direct: tasks/s (below 1: the fabric is slower), p50 (above 1: slower)."""
        return {
            "throughput": round(self.fabric.per_s / self.direct.per_s, 3),
            "p50": round(self.fabric.latency_all.p50_ms / self.direct.latency_all.p50_ms, 3),
        }

    def as_json(self) -> dict[str, Any]:
        """Both sides, the ratios, the checks."""
        return {
            "fabric": self.fabric.as_json(),
            "direct": self.direct.as_json(),
            "ratio_fabric_over_direct": self.ratios(),
            "checks": self.checks,
        }


def _rotated(sides: list[Side], round_no: int) -> list[Side]:
    shift = round_no % len(sides)
    return sides[shift:] + sides[:shift]


def _shares(total: int, rounds: int) -> list[int]:
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


# -- the services: broker, database, HTTP server, worker daemons -----------------------------


@dataclass
class Services:
    """What every phase uses: the broker, the keys, the database server, a scratch dir."""

    broker: Broker
    keys: Path
    database_server: str
    tmp: Path
    databases: contextlib.ExitStack

    def database(self) -> str:
        """A fresh database, dropped at the end of the run."""
        return self.databases.enter_context(fresh_database(self.database_server))

    def client(self, capability: str) -> WayangClient:
        """A dispatcher submitting to ``capability``, signing with the bench key."""
        signer = Signer.from_file(next(self.keys.glob("*.key")))
        return WayangClient(self.broker.endpoint.amqp_url, signer, capability)

    def meters(self, worker: WorkerProcess) -> dict[str, Meter]:
        """CPU of the worker, this process and the broker."""
        return {
            "worker": worker.cpu_seconds,
            "bench": time.process_time,
            "broker": self.broker.cpu_seconds,
        }

    def spawn(
        self, name: str, executor: str, settings: str, args: list[str], env: dict[str, str]
    ) -> WorkerProcess:
        """Start a worker daemon with ``settings`` as its ``--config`` file."""
        config = self.tmp / f"{name}.toml"
        config.write_text(settings)
        command = [
            *(sys.executable, "-m", "wayang_mq.cli", "--log-level", "INFO", "worker", executor),
            *("--id", f"bench-{name}", "--config", str(config), *args),
        ]
        environment = worker_env("wayang", self.broker.endpoint, self.keys) | env
        return WorkerProcess.start(name, command, env=environment, cwd=ROOT, log_dir=self.tmp)

    @contextlib.asynccontextmanager
    async def worker(
        self,
        name: str,
        executor: str,
        settings: str,
        queue: str,
        args: list[str],
        env: dict[str, str] | None = None,
    ) -> AsyncIterator[WorkerProcess]:
        """A worker daemon (:meth:`spawn`) once it consumes ``queue``; stopped afterwards."""
        process = self.spawn(name, executor, settings, args, env or {})
        try:
            url = self.broker.endpoint.amqp_url
            await wait_consuming(url, queue, WorkerSet(name, [process]), 1)
            yield process
        except BaseException:
            _show_log(process)
            raise
        finally:
            process.stop()


def _show_log(process: WorkerProcess) -> None:
    print(f"--- {process.log_path} (tail)\n{process.log_tail()}", file=sys.stderr)


class Target:
    """The HTTP server the http.call tasks and the direct client call (bench/http_target.py)."""

    def __init__(self, process: WorkerProcess, port: int, session: aiohttp.ClientSession) -> None:
        self.process = process
        self.base = f"http://127.0.0.1:{port}"
        self._session = session
        self.connections: dict[str, int] = {}  # the most a round's requests came over, per side

    def url(self, n: int) -> str:
        """Item ``n``'s URL."""
        return f"{self.base}/item/{n}"

    async def take(self) -> tuple[list[float], int]:
        """The arrival times of the item requests since the last call, and over how many
        connections they came (then both forgotten)."""
        async with self._session.get(f"{self.base}/arrivals") as response:
            response.raise_for_status()
            found = await response.json()
            return list(found["times"]), int(found["connections"])

    def expecting(self, side: str) -> Callable[[int], Awaitable[None]]:
        """A check for one side: exactly ``count`` requests arrived since the last look (none
        lost, none repeated); it notes the most connections they used."""

        async def expect(count: int) -> None:
            times, connections = await self.take()
            if len(times) != count:
                raise RuntimeError(f"the HTTP server saw {len(times)} requests, expected {count}")
            self.connections[side] = max(self.connections.get(side, 0), connections)

        return expect


@contextlib.asynccontextmanager
async def _target(tmp: Path) -> AsyncIterator[Target]:
    port_file = tmp / "http_target.port"
    command = [sys.executable, "-m", "bench.http_target", str(port_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = WorkerProcess.start("http_target", command, env=env, cwd=ROOT, log_dir=tmp)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not port_file.exists():
            if not process.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start:\n{process.log_tail()}")
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session:
            yield Target(process, int(port_file.read_text()), session)
    finally:
        process.stop()


# -- the phases ------------------------------------------------------------------------------


async def _echo_reference(services: Services, args: argparse.Namespace, tasks: int) -> Side:
    """``demo.echo`` through the fabric, set up as http.call is: what the fabric alone costs."""
    concurrency = ["--concurrency", str(HTTP_CONCURRENCY), "--prefetch", str(HTTP_CONCURRENCY)]
    client = services.client("demo.echo")
    async with services.worker(
        "echo", "wayang_workers.demo:Echo", "", task_queue("demo.echo"), concurrency
    ) as worker:
        await client.start()
        window = HTTP_CONCURRENCY * FABRIC_WINDOW_PER_SLOT
        side = Side("demo.echo fabric", client.roundtrip, window, services.meters(worker))
        try:
            await side.warm_up(args.warmup)
            for round_no in range(args.rounds):
                await side.throughput(tasks, f"{side.label} (round {round_no + 1}/{args.rounds})")
            for round_no, share in enumerate(_shares(args.latency_samples, args.rounds)):
                await side.latency(share, f"{side.label} latency (round {round_no + 1})")
        finally:
            await client.close()
    return side


async def _http_phase(
    services: Services, target: Target, args: argparse.Namespace, tasks: int
) -> Phase:
    settings = '[http.call]\nallow_networks = ["127.0.0.1/32"]\n'
    concurrency = ["--concurrency", str(HTTP_CONCURRENCY), "--prefetch", str(HTTP_CONCURRENCY)]
    client = services.client("http.call")
    async with (
        services.worker(
            "http_call",
            "wayang_workers.http_call:HttpCall",
            settings,
            task_queue("http.call"),
            concurrency,
        ) as worker,
        aiohttp.ClientSession() as session,
    ):
        await client.start()

        async def fabric(payload: dict[str, Any]) -> None:
            await client.roundtrip(_http_input(target, payload["n"]))

        async def direct(payload: dict[str, Any]) -> None:
            async with session.get(target.url(payload["n"])) as response:
                response.raise_for_status()
                await response.json()

        meters = services.meters(worker) | {"server": target.process.cpu_seconds}
        direct_meters = {"bench": time.process_time, "server": target.process.cpu_seconds}
        phase = Phase(
            "http.call",
            Side("http.call fabric", fabric, HTTP_CONCURRENCY * FABRIC_WINDOW_PER_SLOT, meters),
            Side("http.call direct", direct, HTTP_CONCURRENCY, direct_meters),
        )
        phase.fabric.verify = target.expecting("fabric")
        phase.direct.verify = target.expecting("direct")
        await target.take()  # whatever came before
        try:
            await phase.measure(args, tasks)
        finally:
            await client.close()
    phase.checks["server_saw_each_request_once"] = True  # Target.expecting raised otherwise
    phase.checks["most_connections_in_a_round"] = dict(target.connections)
    return phase


def _http_input(target: Target, n: int) -> dict[str, Any]:
    return {"url": target.url(n), "fail_on_status": True}


async def _db_phase(services: Services, args: argparse.Namespace, tasks: int) -> Phase:
    url = services.database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL)")
        conn.execute(
            "INSERT INTO items SELECT i, 'item-' || i FROM generate_series(1, %s) AS i", [ITEMS]
        )
        conn.execute("ANALYZE items")
    size = str(DB_CONCURRENCY)
    settings = (
        "[db.query.connections.bench]\n"
        'dsn = {"$secret" = "bench-dsn"}\n'
        f"min_size = {size}\nmax_size = {size}\n"
    )
    client = services.client("db.query")
    pool: AsyncConnectionPool = AsyncConnectionPool(
        url, min_size=DB_CONCURRENCY, max_size=DB_CONCURRENCY, open=False
    )
    async with services.worker(
        "db_query",
        "wayang_workers.db_query:DbQuery",
        settings,
        task_queue("db.query", 0),
        ["--concurrency", size, "--prefetch", size, "--secrets", "env"],
        env={"WAYANG_SECRET_BENCH_DSN": url},
    ) as worker:
        await client.start()
        await pool.open(wait=True)

        async def fabric(payload: dict[str, Any]) -> None:
            query = {"connection": "bench", "sql": SELECT, "params": [_item_id(payload["n"])]}
            await client.roundtrip(query)

        async def direct(payload: dict[str, Any]) -> None:
            async with pool.connection() as conn:
                cursor = await conn.execute(SELECT, [_item_id(payload["n"])])
                if len(await cursor.fetchall()) != 1:
                    raise RuntimeError("the item is missing")

        phase = Phase(
            "db.query",
            Side(
                "db.query fabric",
                fabric,
                DB_CONCURRENCY * FABRIC_WINDOW_PER_SLOT,
                services.meters(worker),
            ),
            Side("db.query direct", direct, DB_CONCURRENCY, {"bench": time.process_time}),
        )
        try:
            await phase.measure(args, tasks)
        finally:
            await client.close()
            await pool.close()
    return phase


def _item_id(n: int) -> int:
    return n % ITEMS + 1


async def _payment_phase(services: Services, args: argparse.Namespace, tasks: int) -> Phase:
    fabric_ledger, direct_ledger = services.database(), services.database()
    for url in (fabric_ledger, direct_ledger):
        await _open_ledger(url)
    size = str(PAYMENT_CONCURRENCY)
    settings = (
        '[payment.charge]\nprovider = "ledger"\ndsn = {"$secret" = "ledger-dsn"}\n'
        f'merchant_account = "{MERCHANT}"\npool_size = {size}\ncreate_schema = false\n'
    )
    client = services.client("payment.charge")
    ledger = Ledger(direct_ledger, MERCHANT, pool_size=PAYMENT_CONCURRENCY, create_schema=False)
    async with services.worker(
        "payment",
        "wayang_workers.payment:Charge",
        settings,
        task_queue("payment.charge"),
        ["--concurrency", size, "--prefetch", size, "--secrets", "env"],
        env={"WAYANG_SECRET_LEDGER_DSN": fabric_ledger},
    ) as worker:
        await client.start()
        await ledger.open()

        async def fabric(payload: dict[str, Any]) -> None:
            charge = {"amount": 100, "currency": "EUR", "source": _customer(payload["n"])}
            await client.roundtrip(charge)

        async def direct(payload: dict[str, Any]) -> None:
            request = ChargeRequest(
                idempotency_key=uuid.uuid4().hex,
                amount=100,
                currency="EUR",
                source=_customer(payload["n"]),
                destination=None,
            )
            await ledger.charge(request)

        phase = Phase(
            "payment.charge",
            Side(
                "payment.charge fabric",
                fabric,
                PAYMENT_CONCURRENCY * FABRIC_WINDOW_PER_SLOT,
                services.meters(worker),
            ),
            Side(
                "payment.charge direct", direct, PAYMENT_CONCURRENCY, {"bench": time.process_time}
            ),
        )
        try:
            await phase.measure(args, tasks)
        finally:
            await client.close()
            await ledger.close()
    for side, url in ((phase.fabric, fabric_ledger), (phase.direct, direct_ledger)):
        phase.checks[side.label] = _check_ledger(url, side.done)
    return phase


def _customer(n: int) -> str:
    return f"cust-{n % CUSTOMERS}"


async def _open_ledger(url: str) -> None:
    """The ledger's schema, the merchant's account and the customers' (money from outside)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await apply_schema(conn)
        accounts = [(MERCHANT, False)] + [(_customer(n), True) for n in range(CUSTOMERS)]
        for account, allow_negative in accounts:
            await conn.execute(
                "INSERT INTO wayang_ledger.accounts (id, currency, allow_negative)"
                " VALUES (%s, 'EUR', %s)",
                [account, allow_negative],
            )


def _check_ledger(url: str, charges: int) -> dict[str, Any]:
    """Exactly one transfer and two postings per charge made; the balances sum to zero."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM wayang_ledger.transfers),"
            " (SELECT count(*) FROM wayang_ledger.postings),"
            " (SELECT sum(balance) FROM wayang_ledger.accounts),"
            " (SELECT balance FROM wayang_ledger.accounts WHERE id = %s)",
            [MERCHANT],
        ).fetchone()
    assert row is not None
    transfers, postings, total, merchant = row
    found = {
        "charges_made": charges,
        "transfers": transfers,
        "postings": postings,
        "balances_sum": int(total),
        "merchant_balance": int(merchant),
    }
    if (transfers, postings, total, merchant) != (charges, 2 * charges, 0, 100 * charges):
        raise RuntimeError(f"the ledger does not match the charges made: {found}")
    return found | {"ok": True}


async def _rate_phase(
    services: Services, target: Target, count: int, rate_per_s: int
) -> dict[str, Any]:
    """``count`` http.call tasks queued, then a worker with ``--rate``: the server's view."""
    client = services.client("http.call")
    await client.start()
    await target.take()
    settings = '[http.call]\nallow_networks = ["127.0.0.1/32"]\n'
    args = [
        *("--concurrency", str(HTTP_CONCURRENCY), "--prefetch", str(HTTP_CONCURRENCY)),
        *("--rate", f"http.call={rate_per_s}/s"),
    ]
    started: list[WorkerProcess] = []

    def start_worker() -> None:  # drain_async starts it once every task is queued
        executor = "wayang_workers.http_call:HttpCall"
        started.append(services.spawn("http_rate", executor, settings, args, {}))

    async def submit(payload: dict[str, Any]) -> asyncio.Future[None]:
        return await client.submit(_http_input(target, payload["n"]))

    try:
        label = f"http.call --rate http.call={rate_per_s}/s"
        drained = await drain_async(submit, start_worker, label, count, count)
    except BaseException:
        for process in started:
            _show_log(process)
        raise
    finally:
        await client.close()
        for process in started:
            process.stop()
    arrived, _ = await target.take()
    times = sorted(arrived)
    if len(times) != count:
        raise RuntimeError(f"the HTTP server saw {len(times)} requests, expected {count}")
    span = times[-1] - times[0]
    return {
        "tasks": count,
        "rate_asked_per_s": rate_per_s,
        "rate_measured_per_s": round((count - 1) / span, 2),
        "max_in_any_1s": _most_in_a_second(times),
        "first_to_last_s": round(span, 3),
        "results_per_s_at_dispatcher": round(drained.per_s, 2),
    }


def _most_in_a_second(times: list[float]) -> int:
    """The most arrivals in any window [t, t + 1 s) starting at an arrival (sorted input)."""
    most, end = 0, 0
    for start, t in enumerate(times):
        while end < len(times) and times[end] < t + 1.0:
            end += 1
        most = max(most, end - start)
    return most


# -- the run ---------------------------------------------------------------------------------


async def _bench(services: Services, args: argparse.Namespace) -> dict[str, Any]:
    topology = load_topology(DEFAULT_TOPOLOGY_PATH)
    endpoint = services.broker.endpoint
    await apply_topology(topology, endpoint.amqp_url, management_client(endpoint))
    async with _target(services.tmp) as target:
        _say(f"reference: demo.echo, {args.tasks} tasks x {args.rounds} rounds (the fabric alone)")
        echo = await _echo_reference(services, args, args.tasks)
        _say(f"phase 1/4: http.call, {args.tasks} GETs x {args.rounds} rounds per side")
        http = await _http_phase(services, target, args, args.tasks)
        _say(f"phase 2/4: db.query, {args.tasks} SELECTs x {args.rounds} rounds per side")
        db = await _db_phase(services, args, args.tasks)
        _say(f"phase 3/4: payment.charge, {args.charges} charges x {args.rounds} rounds per side")
        payment = await _payment_phase(services, args, args.charges)
        _say(f"phase 4/4: the rate limiter, {args.rate_tasks} tasks at {args.rate}/s")
        rate = await _rate_phase(services, target, args.rate_tasks, args.rate)
    return {
        "phases": {p.name: p.as_json() for p in (http, db, payment)},
        "reference_demo_echo": echo.as_json(),
        "rate_limit": rate,
    }


@contextlib.contextmanager
def _services(tmp: Path) -> Iterator[Services]:
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(open_broker(tmp))
        keys = tmp / "keys"
        write_keypair(keys)
        _say("starting PostgreSQL")
        server = stack.enter_context(
            open_postgres(stack.enter_context(service_dir("wayang-bench-pg-")))
        )
        databases = stack.enter_context(contextlib.ExitStack())
        yield Services(broker, keys, server, tmp, databases)


def main(argv: list[str] | None = None) -> int:
    """Start the services, measure every phase, print the table and write the JSON."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.tasks, args.charges, args.latency_samples, args.warmup = 300, 150, 60, 30
        args.rate_tasks = 100
    signal.signal(signal.SIGTERM, interrupted)
    load = os.getloadavg()
    version = code_version(ROOT)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="wayang-bench-ext-") as tmp,
        contextlib.redirect_stdout(sys.stderr),  # bench.measure's progress lines: stderr here
        _services(Path(tmp)) as services,
    ):
        found = run_async(_bench(services, args))
        rabbitmq = services.broker.version
    report = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/external.py", *(argv or sys.argv[1:])]),
        "code": version,
        "machine": {
            **machine(rabbitmq),
            "load_average_at_start": [round(x, 2) for x in load],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "params": _params(args),
        "seconds": round(time.monotonic() - started, 1),
        **found,
    }
    print(table(report))
    if load[0] > 0.7:
        print(f"\nwarning: load average was {load[0]:.1f} at the start: other work shared the CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2_000, help="http.call and db.query per round")
    parser.add_argument("--charges", type=int, default=1_000, help="payment.charge per round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per side")
    parser.add_argument("--latency-samples", type=int, default=300, help="sequential, per side")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up round trips per side")
    parser.add_argument("--rate", type=int, default=50, help="the limiter's rate, tasks/s")
    parser.add_argument("--rate-tasks", type=int, default=200, help="tasks through the limiter")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 300 tasks, 150 charges, 60 latency samples, 100 rate tasks",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "external.json")
    return parser


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "quick": args.quick,
        "tasks_per_round": args.tasks,
        "charges_per_round": args.charges,
        "rounds": args.rounds,
        "latency_samples": args.latency_samples,
        "warmup": args.warmup,
        "concurrency": {
            "http.call": HTTP_CONCURRENCY,
            "db.query": DB_CONCURRENCY,
            "payment.charge": PAYMENT_CONCURRENCY,
        },
        "fabric_window_per_worker_slot": FABRIC_WINDOW_PER_SLOT,
        "rate_limit": f"http.call={args.rate}/s",
        "rate_tasks": args.rate_tasks,
        "private_broker": "WAYANG_AMQP_URL" not in os.environ,
        "private_database": "WAYANG_DATABASE_URL" not in os.environ,
    }


def table(report: dict[str, Any]) -> str:
    """The markdown summary: per phase both sides, median [min–max] tasks/s, p50, ratios."""
    lines = [
        "| phase | fabric tasks/s | direct tasks/s | fabric/direct tasks/s | fabric p50 ms"
        " | direct p50 ms | fabric/direct p50 | CPU µs/task fabric: worker + bench + broker"
        " | direct: bench |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, phase in report["phases"].items():
        fabric, direct, ratio = phase["fabric"], phase["direct"], phase["ratio_fabric_over_direct"]
        cpu = fabric["cpu_us_per_task"]
        lines.append(
            f"| `{name}` | {_rate(fabric)} | {_rate(direct)} | {ratio['throughput']:.2f}×"
            f" | {fabric['latency_ms']['p50_ms']:.2f} | {direct['latency_ms']['p50_ms']:.2f}"
            f" | {ratio['p50']:.2f}×"
            f" | {cpu.get('worker', 0):,.0f} + {cpu.get('bench', 0):,.0f}"
            f" + {cpu.get('broker', 0):,.0f} | {direct['cpu_us_per_task'].get('bench', 0):,.0f} |"
        )
    echo = report["reference_demo_echo"]
    cpu = echo["cpu_us_per_task"]
    lines.append(
        f"| `demo.echo` (the fabric alone) | {_rate(echo)} | | | {echo['latency_ms']['p50_ms']:.2f}"
        f" | | | {cpu.get('worker', 0):,.0f} + {cpu.get('bench', 0):,.0f}"
        f" + {cpu.get('broker', 0):,.0f} | |"
    )
    rate = report["rate_limit"]
    lines += [
        "",
        f"rate limiter: asked {rate['rate_asked_per_s']}/s, measured"
        f" {rate['rate_measured_per_s']:.2f}/s at the server over {rate['tasks']} tasks"
        f" ({rate['rate_measured_per_s'] / rate['rate_asked_per_s']:.3f}× the rate);"
        f" most in any 1 s: {rate['max_in_any_1s']}",
    ]
    connections = report["phases"]["http.call"]["checks"]["most_connections_in_a_round"]
    lines.append(
        "http.call: the server saw each request once; most connections in a round: "
        + ", ".join(f"{side} {n}" for side, n in connections.items())
    )
    for label, check in report["phases"]["payment.charge"]["checks"].items():
        lines.append(
            f"ledger ({label}): {check['transfers']} transfers for {check['charges_made']}"
            f" charges, balances sum to {check['balances_sum']}: ok"
        )
    return "\n".join(lines)


def _rate(side: dict[str, Any]) -> str:
    t = side["throughput_per_s"]
    return f"{t['median']:,.0f} [{t['min']:,.0f}–{t['max']:,.0f}]"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: workers, servers and databases stopped", file=sys.stderr)
        sys.exit(130)
