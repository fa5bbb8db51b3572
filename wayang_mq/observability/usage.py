"""Usage for billing: what one run of a task cost, carried in its result's ``metrics``.

A worker runs many tasks on one event-loop thread, so the process's CPU time says nothing
about one task. :class:`Metered` meters the executor's own coroutine instead: it drives the
coroutine step by step (``send``/``throw``, as the event loop's task would) and sums the
thread's CPU time (``time.thread_time_ns``) around each step. Between steps the loop runs
other tasks; their CPU is theirs. What it does not see:

* CPU in other threads (``asyncio.to_thread``, a thread pool): use :meth:`Usage.to_thread`,
  which times the call in its thread, or report it with ``report_usage(cpu_ms=...)``;
* CPU in asyncio tasks the executor starts (``create_task``, ``gather`` of coroutines, a
  ``TaskGroup``): each runs as its own task; wrap their coroutines in :meth:`Usage.metered`.

Executors report their own units (tokens, API calls) with ``ctx.report_usage(tokens=120)``;
units add up across calls and leave as ``units.<name>`` keys (docs/observability.md "Usage").
The same validation (:class:`Billable`) runs again where the control plane bills a result:
a result is signed input from anyone holding a key, not trusted arithmetic.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

#: a unit's name: a short lowercase identifier (it becomes the metrics key ``units.<name>``)
UNIT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: how many distinct units one task may report (a result's metrics stay small)
MAX_UNITS = 16
#: the metrics key prefix of executor-reported units
UNIT_PREFIX = "units."
#: the largest value one unit or counter may reach (beyond it a report is refused)
MAX_VALUE = 1e15


def _check_value(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"usage {name!r} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or number > MAX_VALUE:
        raise ValueError(f"usage {name!r} must be finite, >= 0 and <= {MAX_VALUE:g}, got {value!r}")
    return number


@dataclass
class Usage:
    """What one run of a task used so far: CPU of its metered coroutines, CPU reported or
    timed in threads, the size of the task as received, and the executor's units."""

    bytes_in: int = 0
    cpu_ns: int = 0  # the metered coroutines' steps (event-loop thread only)
    units: dict[str, float] = field(default_factory=dict)
    _thread_ns: int = 0  # timed by to_thread, or reported as cpu_ms (any thread: locked)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def report(self, **units: float) -> None:
        """Add executor-reported units (``tokens=120, api_calls=1``); ``cpu_ms`` adds to the
        task's CPU time instead (CPU spent where the meter cannot see it). A bad name or
        value is a ``ValueError`` and nothing of the call is added."""
        checked = {name: _check_value(name, value) for name, value in units.items()}
        for name in checked:
            if not UNIT_NAME.match(name):
                raise ValueError(
                    f"usage unit {name!r} is not a short lowercase identifier ([a-z][a-z0-9_]*,"
                    " at most 32 characters)"
                )
        cpu_ms = checked.pop("cpu_ms", None)
        new = set(checked) - set(self.units)
        if len(self.units) + len(new) > MAX_UNITS:
            raise ValueError(f"a task may report at most {MAX_UNITS} distinct usage units")
        for name, value in checked.items():
            self.units[name] = min(MAX_VALUE, self.units.get(name, 0.0) + value)
        if cpu_ms is not None:
            self._add_thread_ns(round(cpu_ms * 1e6))

    def metered(self, coro: Awaitable[T]) -> Metered[T]:
        """``coro`` (a coroutine, or any awaitable) as an awaitable whose CPU time adds to
        this usage."""
        return Metered(coro, self)

    async def to_thread(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``asyncio.to_thread(func, ...)``, its CPU time in that thread added to this usage."""

        def timed() -> T:
            started = time.thread_time_ns()
            try:
                return func(*args, **kwargs)
            finally:
                self._add_thread_ns(time.thread_time_ns() - started)

        return await asyncio.to_thread(timed)

    def _add_thread_ns(self, ns: int) -> None:
        with self._lock:
            self._thread_ns += ns

    @property
    def cpu_ms(self) -> float:
        """CPU time so far, in milliseconds: metered steps plus what threads added."""
        with self._lock:
            return (self.cpu_ns + self._thread_ns) / 1e6

    def metrics(self, bytes_out: int) -> dict[str, float]:
        """The result's usage keys: ``cpu_ms``, ``bytes_in``, ``bytes_out``, ``units.*``."""
        values = {
            "cpu_ms": round(self.cpu_ms, 3),
            "bytes_in": float(self.bytes_in),
            "bytes_out": float(bytes_out),
        }
        values.update({UNIT_PREFIX + name: value for name, value in sorted(self.units.items())})
        return values


class Metered(Awaitable[T]):
    """An awaitable that runs ``coro`` and adds the CPU time of each of its steps to
    ``usage.cpu_ns``. It is transparent to the event loop: what the coroutine yields (a
    future to wait on) goes up unchanged, what the loop sends or throws in (a cancellation)
    goes down unchanged, and the coroutine's return or exception comes out unchanged."""

    __slots__ = ("_coro", "_usage")

    def __init__(self, coro: Awaitable[T], usage: Usage) -> None:
        self._coro = coro
        self._usage = usage

    def __await__(self) -> Generator[Any, Any, T]:
        # a coroutine's __await__ (or any awaitable's) is a generator: send, throw, close
        coro, usage, clock = self._coro.__await__(), self._usage, time.thread_time_ns
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            started = clock()
            try:
                if thrown is None:
                    step = coro.send(sent)
                else:
                    step, thrown = coro.throw(thrown), None
            except StopIteration as stop:
                usage.cpu_ns += clock() - started
                return stop.value  # type: ignore[no-any-return]
            except BaseException:
                usage.cpu_ns += clock() - started
                raise
            usage.cpu_ns += clock() - started
            try:
                sent = yield step
            except GeneratorExit:
                coro.close()  # the awaiting frame is closed: close the coroutine with it
                raise
            except BaseException as exc:  # passed down as the loop threw it (a cancel)
                sent, thrown = None, exc


def amount(value: object) -> float | None:
    """``value`` as a billable amount: a finite number from 0 to :data:`MAX_VALUE`, else None."""
    try:
        return _check_value("", value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Billable:
    """What a result's metrics say its run used, as the control plane bills it: each counter
    None when absent or not a valid amount; only valid ``units.*`` keys, at most
    :data:`MAX_UNITS`, in name order."""

    wall_ms: float | None
    cpu_ms: float | None
    bytes_in: int | None
    bytes_out: int | None
    units: dict[str, float]

    @classmethod
    def of(cls, metrics: Mapping[str, float]) -> Billable:
        """Read the usage keys of a result's ``metrics``."""
        units: dict[str, float] = {}
        for key in sorted(metrics):
            name, value = key[len(UNIT_PREFIX) :], amount(metrics[key])
            if key.startswith(UNIT_PREFIX) and UNIT_NAME.match(name) and value is not None:
                if len(units) == MAX_UNITS:
                    break
                units[name] = value
        bytes_in, bytes_out = amount(metrics.get("bytes_in")), amount(metrics.get("bytes_out"))
        return cls(
            wall_ms=amount(metrics.get("duration_ms")),
            cpu_ms=amount(metrics.get("cpu_ms")),
            bytes_in=None if bytes_in is None else int(bytes_in),
            bytes_out=None if bytes_out is None else int(bytes_out),
            units=units,
        )
