"""Limits per capability: a rate (a token bucket) and a cap on tasks running at once.

An executor that calls an external system must respect that system's quota, whatever the
executor is. The limits are therefore the worker's, set per capability when it starts
(``--rate http.call=10/s``, ``--max-running http.call=4``), and implemented once, here, for
every executor.

Where a delivery waits: the worker admits it (:meth:`Limits.admit`) *before* it takes one of
its ``--concurrency`` slots, so a task waiting for its rate never holds a slot that another
capability needs. That is why this is not a :class:`~wayang_mq.runtime.middleware.Middleware`:
every hook runs inside the slot, one hook at a time, and none spans the run (there is no
"around" hook to hold the capability's running count until the task ends). The worker asks
:class:`~wayang_mq.runtime.admission.Admission` once per delivery, in ``Worker._handle``;
admission takes the limit, then the slot, and nothing else in the worker or in the executors
knows about limits.

What waits in memory: nothing much. A limited capability is consumed on a channel of its own
whose prefetch is :meth:`CapabilityLimit.prefetch` (its ``max_running``, or for a rate alone
about one second's worth of tasks), so the tasks over the limit stay in the broker's queue,
where other workers can take them and where they are counted and expire as usual.

Order inside :meth:`Limits.admit`: the capability's running count first, then the rate token,
then one of the worker's ``--concurrency`` slots. The token is taken right before the task
starts, so starts are spaced by the rate; a token taken first and then held while waiting for
a running slot would let several tasks start together when slots free up. For the same
reason, when no worker slot was free (the worker is saturated by other capabilities), the
delivery takes a fresh token once it has its slot: starts never come faster than the rate.

The limits are per worker process: N workers with ``--rate cap=Q/s`` call at up to N×Q/s
together, unless their rates are shared through PostgreSQL (``--limits-db``,
:mod:`wayang_mq.runtime.sharedrate`). docs/executors.md, "Limits", says how to size them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from wayang_mq.core import names
from wayang_mq.core.errors import ConfigError

Clock = Callable[[], float]

_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"(?P<n>\d+(?:\.\d+)?)/(?P<unit>[smh])(?:,burst=(?P<burst>\d+))?")
RATE_EXAMPLES = "e.g. 10/s, 600/m, 3600/h, 0.5/s, or 10/s,burst=5"


@dataclass(frozen=True, slots=True)
class Rate:
    """So many tasks per second, minute or hour; ``burst`` of them may start at once after
    a quiet spell (default 1: starts evenly spaced, so no second sees more than the rate)."""

    count: float
    per_s: float  # the unit, in seconds: 1, 60 or 3600
    burst: int = 1
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not (self.count > 0 and math.isfinite(self.count)):
            raise ConfigError(f"rate {self.text or self.count!r} must be more than 0 per unit")
        if self.burst < 1:
            raise ConfigError(f"rate {self.text!r}: burst must be at least 1")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``10/s``, ``600/m``, ``3600/h``, ``0.5/s``, ``10/s,burst=5``; ConfigError otherwise."""
        found = _RATE.fullmatch(text.strip().replace(" ", ""))
        if found is None:
            raise ConfigError(
                f"rate {text!r} is not N/s, N/m or N/h with an optional ,burst=N",
                hint=RATE_EXAMPLES,
            )
        burst = int(found["burst"]) if found["burst"] is not None else 1
        return cls(float(found["n"]), _UNIT_S[found["unit"]], burst, text.strip())

    @property
    def per_second(self) -> float:
        """Tasks per second."""
        return self.count / self.per_s

    def __str__(self) -> str:
        return self.text or f"{self.per_second:g}/s,burst={self.burst}"


class TokenBucket:
    """A token bucket: ``rate.burst`` tokens at most, one more every ``1/rate`` seconds.

    :meth:`acquire` waits until a token is there and takes it. Waiters are served in the
    order they came (an ``asyncio.Lock`` is FIFO), and only the first one sleeps; a waiter
    cancelled while it sleeps has taken nothing, so no token is lost or leaked.
    """

    def __init__(self, rate: Rate, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock  # the event loop's clock is time.monotonic too
        self._tokens = float(rate.burst)
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        gained = (now - self._stamp) * self.rate.per_second
        self._tokens = min(float(self.rate.burst), self._tokens + gained)
        self._stamp = now

    def try_acquire(self) -> bool:
        """Take a token if one is there now and nobody waits before us."""
        if self._lock.locked():
            return False
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a token and take it."""
        if self.try_acquire():
            return
        async with self._lock:
            while True:
                self._refill()
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                # loops again if the loop woke us a hair early (its clock resolution)
                await asyncio.sleep((1 - self._tokens) / self.rate.per_second)


class Bucket(Protocol):
    """What a capability's rate is taken from: this process's :class:`TokenBucket`, or the
    fleet's (:class:`~wayang_mq.runtime.sharedrate.SharedBucket`, ``--limits-db``)."""

    async def acquire(self) -> None:
        """Wait for a start and take it."""


@dataclass(frozen=True, slots=True)
class CapabilityLimit:
    """One capability's limits on a worker: a rate, a cap on running tasks, or both."""

    rate: Rate | None = None
    max_running: int | None = None

    def __post_init__(self) -> None:
        if self.rate is None and self.max_running is None:
            raise ConfigError("a capability limit needs a rate, a max_running, or both")
        if self.max_running is not None and self.max_running < 1:
            raise ConfigError(f"max_running must be at least 1, not {self.max_running}")

    def prefetch(self, concurrency: int) -> int:
        """How many of its deliveries the worker holds: ``max_running`` (it runs no more), or
        for a rate alone what starts within about a second (``max(burst, ⌈rate/s⌉)``), never
        more than the worker's concurrency. The rest wait in the queue, not in memory."""
        if self.max_running is not None:
            return min(self.max_running, concurrency)
        assert self.rate is not None
        soon = max(self.rate.burst, math.ceil(self.rate.per_second))
        return max(1, min(concurrency, soon))


class LimitsClosed(Exception):
    """The worker is stopping: a delivery waiting for its limit goes back to its queue."""


@dataclass(slots=True)
class _Gate:
    """One capability's running count and bucket, and how many deliveries wait for them."""

    running: asyncio.Semaphore | None
    bucket: Bucket | None
    waiting: int = 0


class Limits:
    """A worker's limits by capability; :meth:`admit` is the one place they are taken."""

    def __init__(
        self,
        limits: Mapping[str, CapabilityLimit],
        clock: Clock = time.monotonic,
        bucket: Callable[[str, Rate], Bucket] | None = None,
    ) -> None:
        """``bucket(capability, rate)`` makes each rate's bucket (default: this process's
        :class:`TokenBucket`)."""
        self.limits = dict(limits)
        self._clock = clock
        make = bucket or (lambda _, rate: TokenBucket(rate, clock))
        self._gates = {
            capability: _Gate(
                asyncio.Semaphore(limit.max_running) if limit.max_running is not None else None,
                make(capability, limit.rate) if limit.rate is not None else None,
            )
            for capability, limit in self.limits.items()
        }
        self._waiters: set[asyncio.Task[object]] = set()
        self._closed = False

    def waiting(self, capability: str) -> int:
        """Deliveries of ``capability`` waiting for their limit now."""
        gate = self._gates.get(capability)
        return gate.waiting if gate is not None else 0

    @contextlib.asynccontextmanager
    async def admit(self, capability: str, slots: asyncio.Semaphore) -> AsyncIterator[float]:
        """Wait until ``capability`` may start one more task and one of the worker's
        ``slots`` is free; yields the seconds waited for the limit. The running slot and the
        worker slot are held until the block ends. Raises :class:`LimitsClosed` if the
        worker stops (:meth:`close`) before or while the delivery waits."""
        gate = self._gates.get(capability)
        if gate is None:
            async with slots:
                yield 0.0
            return
        if self._closed:
            raise LimitsClosed(capability)
        waited = await self._enter(capability, gate, slots)
        try:
            yield waited
        finally:
            slots.release()
            if gate.running is not None:
                gate.running.release()

    async def _enter(self, capability: str, gate: _Gate, slots: asyncio.Semaphore) -> float:
        """Take a running slot, then a token, then a worker slot (see the module's docstring
        for the order); the seconds waited for the limit."""
        me = asyncio.current_task()
        assert me is not None
        started = self._clock()
        gate.waiting += 1
        self._waiters.add(me)
        running = slot = False
        try:
            if gate.running is not None:
                await gate.running.acquire()
                running = True
            if gate.bucket is not None:
                await gate.bucket.acquire()
            waited = self._clock() - started
            busy = slots.locked()
            await slots.acquire()
            slot = True
            if busy and gate.bucket is not None:
                # No worker slot was free: the token's moment passed while waiting for one,
                # and tasks whose tokens aged the same way would start together, faster than
                # the rate. Take a fresh token (the old one is wasted: the rate undershoots
                # while the worker is saturated, it is never exceeded).
                await gate.bucket.acquire()
            return waited
        except asyncio.CancelledError:
            if slot:
                slots.release()
            if running:
                assert gate.running is not None
                gate.running.release()
            # cancelled by close() (and by nothing else): the delivery goes back, unharmed
            if self._closed and me.uncancel() == 0:
                raise LimitsClosed(capability) from None
            raise
        finally:
            gate.waiting -= 1
            self._waiters.discard(me)

    def close(self) -> None:
        """The worker stops: deliveries waiting for a limit stop waiting (their ``admit``
        raises :class:`LimitsClosed`), and new ones are not admitted."""
        self._closed = True
        for waiter in list(self._waiters):
            waiter.cancel()


def limits_from_flags(
    rates: Sequence[str], max_running: Sequence[str]
) -> dict[str, CapabilityLimit]:
    """The limits of ``--rate CAP=RATE`` and ``--max-running CAP=N`` flags (each repeatable);
    a ConfigError names the bad flag and gives an example."""
    rate_of: dict[str, Rate] = {}
    for text in rates:
        capability, value = _pair("--rate", text, "http.call=10/s")
        _once("--rate", capability, rate_of)
        try:
            rate_of[capability] = Rate.parse(value)
        except ConfigError as exc:
            raise ConfigError(f"--rate {text}: {exc.message}", hint=exc.hint) from None
    running_of: dict[str, int] = {}
    for text in max_running:
        capability, value = _pair("--max-running", text, "http.call=4")
        _once("--max-running", capability, running_of)
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(
                f"--max-running {text}: {value!r} is not a whole number of at least 1",
                hint="e.g. --max-running http.call=4",
            )
        running_of[capability] = int(value)
    return {
        capability: CapabilityLimit(rate_of.get(capability), running_of.get(capability))
        for capability in [*rate_of, *(c for c in running_of if c not in rate_of)]
    }


def _pair(flag: str, text: str, example: str) -> tuple[str, str]:
    capability, sep, value = text.partition("=")
    capability, value = capability.strip(), value.strip()
    if not sep or not names.valid_capability(capability) or not value:
        raise ConfigError(f"{flag} {text!r} is not CAPABILITY=VALUE", hint=f"e.g. {flag} {example}")
    return capability, value


def _once(flag: str, capability: str, seen: Mapping[str, object]) -> None:
    if capability in seen:
        raise ConfigError(f"{flag} names {capability} twice", hint="give one value per capability")
