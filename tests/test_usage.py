"""Usage metering without a broker: the CPU meter around one coroutine, unit reports, and the
control plane's reading of a result's usage keys (pure logic, as the style asks)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from wayang_mq.observability.usage import MAX_UNITS, Billable, Usage


def _burn(seconds: float) -> None:
    """Spin the CPU of the calling thread for ``seconds`` of its CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_a_busy_coroutine_is_metered_and_a_sleeping_one_beside_it_is_not() -> None:
    # Given a coroutine that burns 200 ms of CPU in steps, and one that only sleeps, run at
    # once on one event loop (as a worker runs tasks)
    busy, idle = Usage(), Usage()

    async def burner() -> str:
        for _ in range(4):
            _burn(0.05)
            await asyncio.sleep(0)
        return "burnt"

    async def sleeper() -> str:
        await asyncio.sleep(0.3)
        return "slept"

    # When both run metered
    got = await asyncio.gather(busy.metered(burner()), idle.metered(sleeper()))
    # Then each returns its value; the burner's CPU time is its own, the sleeper's near 0
    assert got == ["burnt", "slept"]
    assert 190 <= busy.cpu_ms <= 260
    assert idle.cpu_ms < 10


async def test_a_cancel_reaches_the_metered_coroutine_exactly_as_without_the_meter() -> None:
    # Given a metered coroutine waiting on a future, that cleans up when cancelled
    usage, seen = Usage(), []
    started = asyncio.Event()

    async def waits() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("finally")

    async def runs() -> None:
        await usage.metered(waits())

    task = asyncio.create_task(runs())
    await started.wait()
    # When the task is cancelled
    task.cancel("stop")
    # Then the coroutine saw the CancelledError, and the task ends cancelled
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled() and seen == ["cancelled", "finally"]


async def test_a_timeout_and_a_swallowed_cancel_behave_as_without_the_meter() -> None:
    # Given a metered coroutine under asyncio.timeout: the timeout fires as TimeoutError
    async def slow() -> None:
        await asyncio.sleep(10)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await Usage().metered(slow())

    # and one that catches its cancel and returns a value returns it through the meter
    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "kept going"
        return "not reached"

    task = asyncio.create_task(_await(Usage().metered(stubborn())))
    await asyncio.sleep(0.01)
    task.cancel()
    assert await task == "kept going"


async def _await(awaitable: object) -> object:
    return await awaitable  # type: ignore[misc]


async def test_an_exception_and_close_pass_through_the_meter() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await Usage().metered(fails())

    # a meter closed before it finished closes its coroutine (no "never awaited" warning)
    closed = []

    async def gen_like() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            closed.append(True)

    it = Usage().metered(gen_like()).__await__()
    next(it)
    it.close()
    assert closed == [True]


def test_units_add_up_and_bad_reports_are_refused_whole() -> None:
    usage = Usage(bytes_in=42)
    usage.report(tokens=100, api_calls=1)
    usage.report(tokens=20.5, cpu_ms=3)
    assert usage.units == {"tokens": 120.5, "api_calls": 1.0}
    assert usage.cpu_ms == pytest.approx(3.0)
    for bad in (
        {"Tokens": 1},
        {"a-b": 1},
        {"x" * 33: 1},
        {"tokens": -1},
        {"tokens": math.nan},
        {"tokens": math.inf},
        {"tokens": True},
        {"tokens": "1"},
    ):
        with pytest.raises(ValueError):
            usage.report(**bad)  # type: ignore[arg-type]
    assert usage.units == {"tokens": 120.5, "api_calls": 1.0}  # nothing of a bad call added
    usage.report(**{f"u{i}": 1 for i in range(MAX_UNITS - 2)})
    with pytest.raises(ValueError, match="at most"):
        usage.report(one_more=1)
    metrics = usage.metrics(bytes_out=7)
    assert metrics["bytes_in"] == 42 and metrics["bytes_out"] == 7
    assert metrics["units.tokens"] == 120.5 and metrics["cpu_ms"] == pytest.approx(3.0)


async def test_to_thread_counts_the_threads_cpu() -> None:
    usage = Usage()
    await usage.to_thread(_burn, 0.05)
    assert 45 <= usage.cpu_ms <= 80


def test_the_control_plane_bills_only_valid_usage_keys() -> None:
    # Given metrics as a hostile result might carry them
    metrics = {
        "duration_ms": 12.5,
        "cpu_ms": -3.0,
        "bytes_in": 100.0,
        "bytes_out": math.inf,
        "units.tokens": 5.0,
        "units.BAD": 1.0,
        "units.nan": math.nan,
        **{f"units.u{i:02d}": 1.0 for i in range(20)},
    }
    # When billed
    billed = Billable.of(metrics)
    # Then what is not a finite amount >= 0 is None, bad units are dropped, at most MAX_UNITS
    assert (billed.wall_ms, billed.cpu_ms, billed.bytes_in, billed.bytes_out) == (
        12.5,
        None,
        100,
        None,
    )
    assert "tokens" in billed.units and "BAD" not in billed.units and "nan" not in billed.units
    assert len(billed.units) == MAX_UNITS
