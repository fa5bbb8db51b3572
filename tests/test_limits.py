"""Limits per capability (runtime/limits.py): a rate and a running cap set on the worker, for
every executor; tasks over them wait in the broker's queue, not in the worker."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest
from wayang_workers.demo import Echo

from tests.limit_executors import ShardTally, Stamp, Tally
from wayang_mq import Status
from wayang_mq.amqp.connect import management_client
from wayang_mq.core import names
from wayang_mq.core.errors import ConfigError
from wayang_mq.runtime.limits import (
    CapabilityLimit,
    Limits,
    LimitsClosed,
    Rate,
    TokenBucket,
    limits_from_flags,
)
from wayang_mq.runtime.sharedrate import SharedRates
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.plugin import fresh_database

_CLI = (sys.executable, "-m", "wayang_mq.cli")


# -- the grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second", "burst"),
    [
        ("10/s", 10.0, 1),
        ("600/m", 10.0, 1),
        ("3600/h", 1.0, 1),
        ("0.5/s", 0.5, 1),
        ("10/s,burst=5", 10.0, 5),
        (" 20/s ", 20.0, 1),
    ],
)
def test_a_rate_is_parsed_per_second_with_its_burst(
    text: str, per_second: float, burst: int
) -> None:
    rate = Rate.parse(text)
    assert rate.per_second == pytest.approx(per_second) and rate.burst == burst


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("fast", "is not N/s, N/m or N/h"),
        ("10", "is not N/s, N/m or N/h"),
        ("10/d", "is not N/s, N/m or N/h"),
        ("-1/s", "is not N/s, N/m or N/h"),
        ("0/s", "must be more than 0"),
        ("10/s,burst=0", "burst must be at least 1"),
        ("10/s,bust=2", "is not N/s, N/m or N/h"),
    ],
)
def test_a_bad_rate_is_refused_saying_what_a_rate_looks_like(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Rate.parse(text)
    assert says in caught.value.message and text.strip() in caught.value.message


def test_flags_make_one_limit_per_capability_and_name_a_bad_flag() -> None:
    limits = limits_from_flags(["http.call=10/s"], ["http.call=4", "demo.sleep=2"])
    assert limits["http.call"] == CapabilityLimit(Rate.parse("10/s"), 4)
    assert limits["demo.sleep"] == CapabilityLimit(None, 2)
    for rates, running, says in [
        (["http.call"], [], "--rate 'http.call' is not CAPABILITY=VALUE"),
        ([], ["http.call=0"], "--max-running http.call=0: '0' is not a whole number"),
        (["a.b=1/s", "a.b=2/s"], [], "--rate names a.b twice"),
    ]:
        with pytest.raises(ConfigError) as caught:
            limits_from_flags(rates, running)
        assert says in caught.value.message


def test_what_a_limited_capability_holds_is_what_it_may_run_soon() -> None:
    assert CapabilityLimit(max_running=2).prefetch(concurrency=8) == 2
    assert CapabilityLimit(Rate.parse("20/s")).prefetch(concurrency=16) == 16
    assert CapabilityLimit(Rate.parse("5/s")).prefetch(concurrency=16) == 5
    assert CapabilityLimit(Rate.parse("1/m")).prefetch(concurrency=16) == 1
    assert CapabilityLimit(Rate.parse("1/s,burst=4")).prefetch(concurrency=16) == 4


# -- the token bucket --------------------------------------------------------------------------


async def test_burst_1_spaces_every_token_by_the_rate() -> None:
    bucket = TokenBucket(Rate.parse("20/s"))
    times = []
    for _ in range(11):
        await bucket.acquire()
        times.append(time.monotonic())  # no await between the grant and this reading
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.05 - 0.002, gaps
    assert times[-1] - times[0] < 2.0  # and it does not crawl


async def test_burst_n_lets_n_start_at_once_then_the_rate() -> None:
    bucket = TokenBucket(Rate.parse("10/s,burst=5"))
    start = time.monotonic()
    for _ in range(5):
        await bucket.acquire()
    burst_s = time.monotonic() - start
    await bucket.acquire()
    sixth_s = time.monotonic() - start
    assert burst_s < 0.05, "the first five are there at once"
    assert sixth_s >= 0.1 - 0.002, "the sixth waits for a token"


async def test_waiters_are_served_in_order_and_a_cancelled_one_loses_no_token() -> None:
    bucket = TokenBucket(Rate.parse("20/s"))
    await bucket.acquire()  # the one token there: everyone now waits
    start = time.monotonic()
    served: list[int] = []

    async def waiter(n: int) -> None:
        await bucket.acquire()
        served.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(5)]
    await asyncio.sleep(0.01)
    tasks[0].cancel()  # the first, asleep until the next token: it takes none with it
    await asyncio.gather(*tasks[1:])
    elapsed = time.monotonic() - start
    assert served == [1, 2, 3, 4]
    # four tokens, at 0.05 s apart from the one taken at the start: none lost, none extra
    assert 0.2 - 0.01 <= elapsed < 1.0, elapsed


async def test_a_running_cap_admits_so_many_and_close_turns_waiters_back() -> None:
    limits = Limits({"demo.sleep": CapabilityLimit(max_running=1)})
    slots = asyncio.Semaphore(8)
    entered = asyncio.Event()

    async def hold() -> None:
        async with limits.admit("demo.sleep", slots):
            entered.set()
            await asyncio.sleep(30)

    async def wait() -> float:
        async with limits.admit("demo.sleep", slots) as waited:
            return waited

    holder = asyncio.create_task(hold())
    await entered.wait()
    waiter = asyncio.create_task(wait())
    await eventually(lambda: limits.waiting("demo.sleep") == 1, what="one waiting")
    limits.close()
    with pytest.raises(LimitsClosed):
        await waiter
    assert limits.waiting("demo.sleep") == 0
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    async with limits.admit("demo.echo", slots) as waited:  # not limited: never waits
        assert waited == 0.0


async def test_tasks_that_waited_for_a_busy_worker_still_start_no_faster_than_the_rate() -> None:
    # Given a 20/s capability on a worker whose one slot is busy with another capability
    limits = Limits({"http.call": CapabilityLimit(rate=Rate.parse("20/s"))})
    slots = asyncio.Semaphore(1)
    await slots.acquire()
    starts: list[float] = []

    async def call() -> None:
        async with limits.admit("http.call", slots):
            starts.append(time.monotonic())

    # When five deliveries take their tokens (50 ms apart) while the slot stays busy 0.4 s
    calls = [asyncio.create_task(call()) for _ in range(5)]
    await asyncio.sleep(0.4)
    slots.release()
    await asyncio.gather(*calls)
    # Then they do not all start at once when the slot frees: each takes a fresh token
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert len(starts) == 5
    assert min(gaps) >= 0.045, gaps


# -- on a worker, against the real broker ------------------------------------------------------


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[float]]]:
    """A local HTTP server that records when each request arrived. It runs in a thread of its
    own, so the arrival times are not delayed by the test's event loop (the dispatcher's
    results arrive on it at the same time)."""
    arrivals: list[float] = []

    class Hit(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            arrivals.append(time.monotonic())
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hit)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hit", arrivals
    finally:
        server.shutdown()
        server.server_close()


async def test_100_http_calls_at_20_per_second_take_5_s_and_no_second_sees_more(
    fabric: Fabric, recorder: tuple[str, list[float]], tmp_path: Path
) -> None:
    # Given 100 http.call tasks queued for the test's server
    url, arrivals = recorder
    settings = tmp_path / "worker.toml"
    settings.write_text('[http.call]\nallow_networks = ["127.0.0.1/32"]\n')
    await fabric.purge("http.call")
    async with fabric.dispatcher() as dispatcher:
        handles = [await dispatcher.submit("http.call", {"url": url}) for _ in range(100)]
        # When the http.call executor's worker daemon starts with --rate http.call=20/s
        # (burst 1: evenly spaced), allowed to reach the server on loopback
        worker = fabric.spawn_worker(
            ["wayang_workers.http_call:HttpCall"],
            executor_id=f"limited-{secrets.token_hex(3)}",
            args=["--config", str(settings), "--rate", "http.call=20/s", "--concurrency", "16"],
        )
        try:
            results = await asyncio.gather(*(h.result(60) for h in handles))
        finally:
            worker.stop()
    # Then they all ran, in about 100/20 = 5 s (99 gaps of 50 ms: 4.95 s at the least)
    assert all(r.status is Status.SUCCESS and r.output["status"] == 200 for r in results)
    assert len(arrivals) == 100
    arrivals.sort()
    elapsed = arrivals[-1] - arrivals[0]
    assert 4.9 <= elapsed <= 7.0, elapsed
    # And no one-second window at the server holds more than 20 requests. The worker starts
    # them exactly 50 ms apart (at most 20 in any second), so its 21st start is exactly 1 s
    # after the 1st; the server sees each a little later (the request's trip), so a window
    # from a request whose trip was slower than the 21st's can take the 21st in: +1 for that
    # boundary, never more unless a trip were slower by a whole 50 ms spacing.
    busiest = max(sum(1 for t in arrivals if a <= t < a + 1.0) for a in arrivals)
    assert busiest <= 21, busiest
    assert "event=limit.waited" in worker.log()


async def test_max_running_holds_across_a_sharded_capabilitys_queues(fabric: Fabric) -> None:
    # Given a worker whose db.query (4 shard queues, a consumer and a prefetch on each) may
    # run 2 at once
    await fabric.purge("db.query")
    tally = ShardTally()
    limits = {"db.query": CapabilityLimit(max_running=2)}
    async with (
        fabric.worker([tally], concurrency=8, limits=limits),
        fabric.dispatcher() as dispatcher,
    ):
        # When 12 tasks spread over the shards by their partition keys
        handles = [
            await dispatcher.submit("db.query", {"seconds": 0.3}, partition_key=f"key-{n}")
            for n in range(12)
        ]
        results = await asyncio.gather(*(h.result(30) for h in handles))
    # Then never more than 2 ran at once, though the shards' prefetches hold more
    assert all(r.status is Status.SUCCESS for r in results)
    assert tally.peak == 2


async def test_max_running_caps_a_capability_while_the_others_run_promptly(
    fabric: Fabric,
) -> None:
    # Given a worker of concurrency 8 whose demo.sleep may run 2 at once
    await fabric.purge("demo.sleep", "demo.echo")
    tally = Tally()
    limits = {"demo.sleep": CapabilityLimit(max_running=2)}
    async with (
        fabric.worker([tally, Echo()], concurrency=8, limits=limits, metrics_port=0) as worker,
        fabric.dispatcher() as dispatcher,
    ):
        # When 6 sleeps of 0.5 s are queued, then 4 echoes
        sleeps = [await dispatcher.submit("demo.sleep", {"seconds": 0.5}) for _ in range(6)]
        echoes = [await dispatcher.submit("demo.echo", {"n": n}) for n in range(4)]
        echoed = await asyncio.gather(*(h.result(30) for h in echoes))
        echoes_done = time.monotonic()
        slept = await asyncio.gather(*(h.result(30) for h in sleeps))
        assert worker.registry is not None
        sample = worker.registry.get_sample_value
        waits = sample("wayang_limit_wait_seconds_count", {"capability": "demo.sleep"})
        waiting = sample("wayang_limit_waiting", {"capability": "demo.sleep"})
        unlimited = sample("wayang_limit_wait_seconds_count", {"capability": "demo.echo"})
    # Then never more than 2 sleeps ran at once, in three waves
    assert all(r.status is Status.SUCCESS for r in [*echoed, *slept])
    assert tally.peak == 2
    assert max(end for _, end in tally.spans) - min(s for s, _ in tally.spans) >= 1.5 - 0.05
    # And the echoes did not wait behind them: done before the last wave of sleeps ended
    assert echoes_done < max(end for _, end in tally.spans)
    # And the metrics saw each limited delivery admitted, none waiting now
    assert (waits, waiting, unlimited) == (6, 0, None)


async def test_tasks_over_the_rate_wait_in_the_queue_not_in_the_worker(fabric: Fabric) -> None:
    # Given 20 demo.echo tasks queued before a worker limited to 1/s starts
    await fabric.purge("demo.echo")
    async with fabric.dispatcher() as dispatcher:
        handles = [await dispatcher.submit("demo.echo", {"n": n}) for n in range(20)]
        limits = {"demo.echo": CapabilityLimit(Rate.parse("1/s"))}
        connection = await aio_pika.connect(fabric.endpoint.amqp_url)
        async with connection, fabric.worker([Echo()], concurrency=8, limits=limits) as worker:
            channel = await connection.channel()

            async def ready() -> int:
                queue = await channel.declare_queue(names.task_queue("demo.echo"), passive=True)
                return int(queue.declaration_result.message_count or 0)

            # When it has run a couple of them
            await eventually(lambda: sum(h.done() for h in handles) >= 2, what="two answered")
            # Then most are still ready in the broker's queue
            assert await ready() >= 14
            # And the worker holds at most its limited prefetch (1), the broker the rest
            for _ in range(10):
                held = worker.health().in_flight  # deliveries with a handler: held unacked
                assert held <= 1, held
                assert await ready() >= 20 - sum(h.done() for h in handles) - 2
                await asyncio.sleep(0.1)
    await fabric.purge("demo.echo")


async def test_a_limited_capability_keeps_its_prefetch_after_a_reconnect(fabric: Fabric) -> None:
    # Given a worker whose demo.echo may run 3 at once (its own channel, prefetch 3)
    await fabric.purge("demo.echo")
    management = management_client(fabric.endpoint)
    limits = {"demo.echo": CapabilityLimit(Rate.parse("50/s"), max_running=3)}
    executor_id = f"limited-{secrets.token_hex(3)}"
    tag = f"{executor_id}/demo.echo"

    def consumer() -> dict[str, Any] | None:
        # The management API lists a consumer before its channel's details are in its stats
        # (channel_details is [] then): only a listing with them counts.
        found = [
            c
            for c in management.list_consumers()
            if c["consumer_tag"] == tag and isinstance(c.get("channel_details"), dict)
        ]
        return found[0] if found else None

    def connection_name(c: dict[str, Any]) -> str:
        return str(c["channel_details"]["connection_name"])

    async with (
        fabric.worker([Echo()], executor_id=executor_id, limits=limits) as worker,
        fabric.dispatcher() as dispatcher,
    ):
        await eventually(lambda: consumer() is not None, what="the consumer listed")
        before = consumer()
        assert before is not None and before["prefetch_count"] == 3
        # When the broker closes the worker's connection
        name = quote(connection_name(before), safe="")
        await asyncio.to_thread(management._request, "DELETE", f"/api/connections/{name}")

        def restored() -> bool:
            after = consumer()
            return after is not None and connection_name(after) != connection_name(before)

        await eventually(restored, what="the consumer back on a new connection")
        # Then aio-pika's robust channel set its QoS again before consuming
        after = consumer()
        assert after is not None and after["prefetch_count"] == 3
        result = await dispatcher.run("demo.echo", {"again": True}, wait_s=30)
        assert result.status is Status.SUCCESS and worker.ready()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--rate", "http.call=fast"], "--rate http.call=fast: rate 'fast' is not N/s"),
        (["--max-running", "http.call=0"], "--max-running http.call=0: '0' is not a whole"),
        (["--rate", "nope.cap=1/s"], "a limit names 'nope.cap', which this worker does not"),
        (["--max-running", "http.call=9"], "is more than the worker's --concurrency 8"),
        (["--limits-db", "postgresql://127.0.0.1:1/x"], "--limits-db shares rates, and no"),
    ],
)
def test_a_bad_limit_flag_stops_the_worker_in_one_line(
    fabric_env: dict[str, str], flags: list[str], says: str
) -> None:
    done = subprocess.run(
        [*_CLI, "worker", "tests.limit_executors:Fetch", *flags],
        env=fabric_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "e.g." in lines[0] or "lower it" in lines[0]


# -- a rate for the fleet, through PostgreSQL ---------------------------------------------------


async def test_the_fleet_rate_reserves_starts_spaced_by_the_rate_with_its_burst(
    record_db: str,
) -> None:
    rates = SharedRates(record_db)
    await rates.open()
    try:
        starts = []
        for _ in range(5):
            asked = time.monotonic()
            starts.append(asked + await rates.reserve("demo.sleep", Rate.parse("10/s")))
        burst = [await rates.reserve("demo.echo", Rate.parse("10/s,burst=3")) for _ in range(4)]
    finally:
        await rates.close()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(0.1 - 0.02 <= gap <= 0.1 + 0.02 for gap in gaps), gaps
    assert burst[:3] == [0.0, 0.0, 0.0] and 0.05 <= burst[3] <= 0.1, burst


async def test_the_fleet_rate_needs_the_migrated_table(postgres: str) -> None:
    with fresh_database(postgres) as url:
        rates = SharedRates(url)
        with pytest.raises(ConfigError) as caught:
            await rates.open()
    assert "rate_limits" in caught.value.message and "db migrate" in (caught.value.hint or "")


async def test_two_workers_sharing_a_rate_keep_it_together(fabric: Fabric, record_db: str) -> None:
    # Given two workers serving demo.echo, each with --rate demo.echo=10/s and --limits-db
    await fabric.purge("demo.echo")
    stamps = [Stamp(), Stamp()]
    config = {"limits": {"demo.echo": CapabilityLimit(Rate.parse("10/s"))}}
    async with (
        fabric.worker([stamps[0]], executor_id="fleet-a", limits_db_url=record_db, **config),
        fabric.worker([stamps[1]], executor_id="fleet-b", limits_db_url=record_db, **config),
        fabric.dispatcher() as dispatcher,
    ):
        # When 30 tasks are submitted at once
        handles = [await dispatcher.submit("demo.echo", {"n": n}) for n in range(30)]
        results = await asyncio.gather(*(h.result(30) for h in handles))
    # Then both ran some, and together they started 10 a second, not 20
    assert all(r.status is Status.SUCCESS for r in results)
    assert all(stamp.starts for stamp in stamps), "both workers took tasks"
    starts = sorted(stamps[0].starts + stamps[1].starts)
    assert starts[-1] - starts[0] >= 2.9 - 0.1, "29 spacings of 100 ms"
    busiest = max(sum(1 for t in starts if a <= t < a + 1.0) for a in starts)
    assert busiest <= 11, busiest  # +1: the 11th start is 1 s after the 1st (see above)
