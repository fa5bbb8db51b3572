"""The ledger: proof that nothing was lost (every confirmed task, exactly one terminal result).

The fabric promises that every task the broker confirmed ends in exactly one terminal result,
whatever fails. A :class:`Ledger` checks that promise from the outside, the way an auditor
would, trusting no single witness:

- it records every task a dispatcher got confirmed (and every one the caller was refused);
- it taps ``wayang.results`` for the dispatcher's reply key with a queue of its own, so it
  counts the terminal results *on the wire* per task id, independently of the dispatcher;
- it listens to the dispatcher (:meth:`Dispatcher.observe`), so it sees every result the
  dispatcher received and what it did with it: handed to the caller, dropped as a duplicate,
  fenced, unclaimed, invalid. The caller must get exactly one per task, and every extra result
  on the wire must have reached the dispatcher and been dropped there;
- at the end it checks that the capability queues drained (nothing ready, nothing unacked,
  nothing waiting to be dead-lettered) and that every dead letter of its tasks in
  ``wayang.dead.<capability>`` was answered with a FAILED result.

A result the dispatcher decided itself (its deadline expiry, executor ``dispatcher:<id>``) is
the dispatcher's bookkeeping, not evidence that the fabric answered: it is counted apart
(``decided_by_dispatcher``), never as a result on the wire, and never as a dead letter's answer.

:meth:`Ledger.check` returns a :class:`LedgerReport`, or raises :class:`LedgerMismatch` with
that report as its message. Duplicates on the wire are allowed (execution is at-least-once)
and reported apart; duplicates handed to the caller are not.

The tap queue is a durable classic queue (not exclusive), and results are persistent, so the
count survives a broker restart; a redelivery to the tap after a lost ack is recognised by its
body and not counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, Unpack

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.management import ManagementClient
from wayang_mq.client.dispatcher import (
    DECIDED_BY_DISPATCHER,
    Dispatcher,
    ResultSeen,
    TaskHandle,
    TaskOptions,
    Verdict,
)
from wayang_mq.core import logs, names
from wayang_mq.core.errors import ConfigError, ErrorCode, ResultTimeout, WayangError
from wayang_mq.core.model import JsonLike, Result, Status, Task, new_id
from wayang_mq.core.wire import decode
from wayang_mq.ops.deadletters import DeadLetter, list_dead_letters
from wayang_mq.testing.harness import eventually

log = logging.getLogger("wayang_mq.testing.ledger")

#: an abandoned tap queue (its ledger crashed) is deleted by the broker after this long idle
TAP_EXPIRES_MS: Final = 30 * 60 * 1000
#: ids of each kind shown in a report; the counts are always complete
SHOWN_IDS: Final = 10
#: dead letters read per capability, at most (held unacked while they are read)
DEAD_LETTERS_READ: Final = 100_000
#: the AMQP type of the tap's own catch-up markers (never a result)
MARKER_TYPE: Final = "wayang.ledger.marker"
#: how long the tap may take to count what reached its queue, at most
CATCH_UP_S: Final = 60.0
#: how long closing the tap may wait for the broker to delete its queue
CLOSE_WAIT_S: Final = 10.0

#: a terminal result's outcome: its status and, when FAILED, its error code
Outcome = tuple[Status, ErrorCode | None]


class LedgerMismatch(WayangError):
    """The ledger found a confirmed task lost, answered twice to its caller, or left behind."""

    def __init__(self, report: LedgerReport) -> None:
        super().__init__(report.render(), hint="see the report above; each line names task ids")
        self.report = report


def tap_queue(ledger_id: str) -> str:
    """The ledger's own queue on ``wayang.results``."""
    return f"wayang.ledger.{ledger_id}"


def decided_by_dispatcher(result: Result) -> bool:
    """True for a result a dispatcher decided itself (an expiry), not an executor's answer."""
    return result.executor_id.startswith(DECIDED_BY_DISPATCHER)


def outcome(result: Result) -> Outcome:
    """The result's status and error code (None on SUCCESS)."""
    return result.status, result.error.code if result.error else None


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """Messages left in a queue: ready, delivered but unacked, waiting to be dead-lettered."""

    queue: str
    ready: int
    unacked: int
    dead_lettering: int = 0

    @property
    def empty(self) -> bool:
        """True when nothing at all is left in the queue."""
        return self.ready == self.unacked == self.dead_lettering == 0

    def __str__(self) -> str:
        return (
            f"{self.queue}: {self.ready} ready, {self.unacked} unacked,"
            f" {self.dead_lettering} being dead-lettered"
        )


@dataclass(frozen=True)
class LedgerReport:
    """What the ledger saw; ``ok`` when the promise held."""

    confirmed: int  # tasks the broker confirmed to the dispatcher
    refused: int  # tasks whose submit raised: the caller knows they were not taken
    delivered: int  # terminal results the dispatcher handed to its caller (seen via its hook)
    on_wire: int  # terminal results from the fabric on the wire (duplicates included)
    lost: tuple[str, ...] = ()  # confirmed, yet no terminal result anywhere
    undelivered: tuple[str, ...] = ()  # a terminal result exists, none handed to the caller
    # The dispatcher took more than one terminal result as a task's answer (handed out, or
    # kept unclaimed) instead of dropping the later ones: task id -> how many it took
    delivered_twice: Mapping[str, int] = field(default_factory=dict)
    misdelivered: tuple[str, ...] = ()  # the caller got another task's result
    # Results on the wire that never reached the dispatcher, so it cannot have dropped them:
    unseen_by_dispatcher: Mapping[str, int] = field(default_factory=dict)
    unknown: Mapping[str, int] = field(default_factory=dict)  # results for ids never submitted
    undecodable: int = 0  # messages on the reply key that are not results
    undrained: tuple[QueueDepth, ...] = ()
    unanswered_dead_letters: tuple[DeadLetter, ...] = ()  # no FAILED result matches them
    # Allowed, reported for the record:
    wire_duplicates: Mapping[str, int] = field(default_factory=dict)  # at-least-once at work
    dropped: int = 0  # results the dispatcher received and dropped (duplicate or fenced)
    decided_by_dispatcher: tuple[str, ...] = ()  # answered by the dispatcher's own decision
    refused_but_answered: tuple[str, ...] = ()  # caller got an error, but the task was taken
    outcomes: Mapping[Outcome, int] = field(default_factory=dict)  # of the results handed out
    verdicts: Mapping[Verdict, int] = field(default_factory=dict)  # the dispatcher's, counted

    @property
    def ok(self) -> bool:
        """True when every confirmed task has exactly one terminal result and nothing is left."""
        return not self.problems()

    def problems(self) -> list[str]:
        """One line per broken promise (empty when ``ok``)."""
        out: list[str] = []
        _add(out, "lost: confirmed, but no terminal result at all", self.lost)
        _add(out, "undelivered: a terminal result, none handed to the caller", self.undelivered)
        _add(
            out,
            "answered twice: the dispatcher took a later result too, instead of dropping it",
            _counted(self.delivered_twice),
        )
        _add(out, "misdelivered: the caller got another task's result", self.misdelivered)
        _add(
            out,
            "on the wire but never received by the dispatcher (so never dropped by it)",
            _counted(self.unseen_by_dispatcher),
        )
        _add(out, "results for task ids never submitted", _counted(self.unknown))
        if self.undecodable:
            out.append(f"{self.undecodable} message(s) on the reply key are not results")
        _add(out, "queues not drained", [str(d) for d in self.undrained])
        _add(
            out,
            "dead letters without a FAILED result",
            [
                f"{d.task_id} in {names.dead_queue(d.capability)} ({d.reason})"
                for d in self.unanswered_dead_letters
            ],
        )
        return out

    def notes(self) -> list[str]:
        """What is allowed but worth knowing: duplicates on the wire, refused-yet-run tasks."""
        out: list[str] = []
        extra = sum(self.wire_duplicates.values()) - len(self.wire_duplicates)
        if self.wire_duplicates:
            out.append(
                f"wire duplicates (allowed, at-least-once): {len(self.wire_duplicates)} task(s),"
                f" {extra} extra result(s), e.g. {_sample(_counted(self.wire_duplicates))}"
            )
        _add(out, "refused to the caller, but taken and answered", self.refused_but_answered)
        _add(
            out,
            "answered by the dispatcher's own decision (no executor's result)",
            self.decided_by_dispatcher,
        )
        if self.outcomes:
            out.append("outcomes handed out: " + ", ".join(_outcomes(self.outcomes)))
        return out

    def summary(self) -> str:
        """One line of counts."""
        verdict = "OK" if self.ok else "BROKEN"
        return (
            f"ledger {verdict}: {self.confirmed} confirmed, {self.refused} refused,"
            f" {self.delivered} delivered to the caller, {self.on_wire} terminal results on"
            f" the wire, {self.dropped} dropped by the dispatcher,"
            f" {len(self.decided_by_dispatcher)} decided by the dispatcher"
        )

    def render(self) -> str:
        """The summary, then every problem and note, one per line."""
        lines = [self.summary()]
        lines += [f"  PROBLEM {line}" for line in self.problems()]
        lines += [f"  note    {line}" for line in self.notes()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _counted(counts: Mapping[str, int]) -> list[str]:
    return [f"{key} x{n}" for key, n in sorted(counts.items())]


def _outcomes(counts: Mapping[Outcome, int]) -> list[str]:
    named = {f"{status} {code or ''}".strip(): n for (status, code), n in counts.items()}
    return [f"{name} x{n}" for name, n in sorted(named.items())]


def _sample(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:SHOWN_IDS])
    return shown + (f", ... ({len(items) - SHOWN_IDS} more)" if len(items) > SHOWN_IDS else "")


def _add(out: list[str], what: str, items: Iterable[str]) -> None:
    items = list(items)
    if items:
        out.append(f"{what}: {len(items)}: {_sample(items)}")


# -- the wire tap -----------------------------------------------------------------------------


class WireTap:
    """Counts results per task id on ``wayang.results`` for one reply key, in its own queue.

    Durable, with manual acks, on a robust connection: results published while the tap is
    reconnecting wait in its queue, and a broker restart loses none of them. Results a
    dispatcher decided itself are counted apart from the fabric's.
    """

    def __init__(self, amqp_url: str, reply_to: str, queue_name: str) -> None:
        self.amqp_url = amqp_url
        self.reply_to = reply_to
        self.queue_name = queue_name
        self.terminal: Counter[str] = Counter()  # task id -> the fabric's terminal results
        self.by_dispatcher: Counter[str] = Counter()  # task id -> a dispatcher's own results
        self.failed: set[str] = set()  # task ids with at least one FAILED result of the fabric
        self.pending: Counter[str] = Counter()  # non-terminal (PENDING) results
        self.undecodable = 0
        self._digests: set[bytes] = set()
        self._markers: set[str] = set()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None

    async def start(self) -> None:
        """Declare and bind the tap queue, and start counting."""
        self._connection = await connect(self.amqp_url, f"ledger-{self.queue_name}")
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=1000)
        self._queue = await self._channel.declare_queue(
            self.queue_name, durable=True, arguments={"x-expires": TAP_EXPIRES_MS}
        )
        await self._queue.bind(names.RESULTS_EXCHANGE, self.reply_to)
        await self._queue.consume(self._on_message)

    async def close(self) -> None:
        """Delete the tap queue and close the connection.

        Bounded: with the broker away, a robust channel waits for a reconnect that may never
        come; the queue is then left for its ``x-expires`` to delete.
        """
        if self._connection is None:
            return
        if self._queue is not None:
            try:
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await self._queue.delete(if_unused=False, if_empty=False)
            except (
                TimeoutError,
                aiormq.exceptions.AMQPError,
                ConnectionError,
                RuntimeError,
            ) as exc:
                logs.event(log, "ledger.tap_kept", queue=self.queue_name, reason=repr(exc))
        await self._connection.close()
        self._connection = None

    async def ready_count(self) -> int:
        """Results waiting in the tap queue, not yet counted."""
        assert self._connection is not None, "start() the tap first"
        return await passive_ready(self._connection, self.queue_name)

    async def caught_up(self, timeout_s: float) -> None:
        """Until every result that reached the tap queue before this call has been counted.

        A marker sent to the end of the queue is a barrier: a queue delivers in order to its
        one consumer, so once the marker is counted, everything ahead of it was too.
        """
        assert self._channel is not None, "start() the tap first"
        marker = new_id()
        message = aio_pika.Message(marker.encode(), type=MARKER_TYPE, message_id=marker)
        await self._channel.default_exchange.publish(message, self.queue_name)
        await eventually(
            lambda: marker in self._markers,
            timeout_s=timeout_s,
            what="the ledger's tap catching up",
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if message.type == MARKER_TYPE:
            self._markers.add(message.body.decode())
        else:
            self._count(message.body)
        # If the channel died meanwhile, the broker redelivers it, and its body is known then.
        with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            await message.ack()

    def _count(self, body: bytes) -> None:
        # The same bytes twice are one result, counted once: a redelivery after a lost ack,
        # or a publish its sender retried after a lost confirm.
        digest = hashlib.blake2b(body, digest_size=16).digest()
        if digest in self._digests:
            return
        self._digests.add(digest)
        try:
            result = decode(body, Result)
        except WayangError:
            self.undecodable += 1
            return
        if not result.terminal:
            self.pending[result.task_id] += 1
        elif decided_by_dispatcher(result):
            self.by_dispatcher[result.task_id] += 1
        else:
            self.terminal[result.task_id] += 1
            if result.status is Status.FAILED:
                self.failed.add(result.task_id)


# -- what the dispatcher said it did -------------------------------------------------------


class DispatcherWitness:
    """What a dispatcher reported doing with each result (its :meth:`Dispatcher.observe`)."""

    def __init__(self) -> None:
        self.verdicts: Counter[Verdict] = Counter()
        self.handed_out: Counter[str] = Counter()  # task id -> results handed to a caller
        self.taken: Counter[str] = Counter()  # task id -> results taken as its answer
        self.received: Counter[str] = Counter()  # task id -> the fabric's results received
        self.dropped: Counter[str] = Counter()  # task id -> results dropped (duplicate, fenced)
        self.decided_here: set[str] = set()  # tasks whose answer the dispatcher decided
        self.outcomes: Counter[Outcome] = Counter()  # of the results handed out

    def __call__(self, seen: ResultSeen) -> None:
        """Record one verdict."""
        self.verdicts[seen.verdict] += 1
        result = seen.result
        if result is None or not result.terminal:
            return
        task_id = result.task_id
        own = decided_by_dispatcher(result)
        if not own:
            self.received[task_id] += 1
        if seen.verdict in (Verdict.DUPLICATE, Verdict.FENCED):
            self.dropped[task_id] += 1
        if seen.verdict in (Verdict.HANDED_OUT, Verdict.UNCLAIMED):
            self.taken[task_id] += 1
            if own:
                self.decided_here.add(task_id)
        if seen.verdict is Verdict.HANDED_OUT:
            self.handed_out[task_id] += 1
            self.outcomes[outcome(result)] += 1


# -- the ledger -------------------------------------------------------------------------------


class Ledger:
    """Records a dispatcher's confirmed tasks and proves each got exactly one terminal result.

    Use it as an async context manager (made with :meth:`for_dispatcher`, so it hears the
    dispatcher's verdicts); submit through :meth:`submit` and wait through :meth:`collect`
    (or record with :meth:`confirmed` and :meth:`refused`), then call :meth:`check`.
    """

    def __init__(
        self,
        amqp_url: str,
        management: ManagementClient,
        reply_to: str,
        *,
        dispatcher: Dispatcher | None = None,
        reply_queue: str | None = None,
        expect_deliveries: bool = True,
        ledger_id: str | None = None,
    ) -> None:
        self.ledger_id = ledger_id or f"l-{new_id()[:8]}"
        self.amqp_url = amqp_url
        self.management = management
        self.dispatcher = dispatcher  # its verdicts are heard while the ledger is open
        self.reply_queue = reply_queue  # checked for drain too, when given
        self.expect_deliveries = expect_deliveries  # False: an audit with no caller to ask
        self.tap = WireTap(amqp_url, reply_to, tap_queue(self.ledger_id))
        self.witness = DispatcherWitness()
        self._capability: dict[str, str] = {}  # task id -> capability, for every task seen
        self._confirmed: set[str] = set()
        self._refused: dict[str, str] = {}  # task id -> why
        self._misdelivered: list[str] = []
        self._stop_observing: Callable[[], None] | None = None

    @classmethod
    def for_dispatcher(cls, dispatcher: Dispatcher, management: ManagementClient) -> Ledger:
        """A ledger tapping ``dispatcher``'s reply key, hearing its verdicts on every result,
        and watching its reply queue."""
        return cls(
            dispatcher.config.amqp_url,
            management,
            dispatcher.reply_to,
            dispatcher=dispatcher,
            reply_queue=names.reply_queue(dispatcher.dispatcher_id),
        )

    async def __aenter__(self) -> Self:
        if self.dispatcher is not None:
            self._stop_observing = self.dispatcher.observe(self.witness)
        await self.tap.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stop_observing is not None:
            self._stop_observing()
        await self.tap.close()

    # -- recording -----------------------------------------------------------------------

    def confirmed(self, task: Task) -> None:
        """The broker confirmed ``task``: from now on it must get exactly one terminal result."""
        self._capability[task.task_id] = task.capability
        self._confirmed.add(task.task_id)

    def refused(self, task: Task, error: BaseException) -> None:
        """Submitting ``task`` raised: the caller knows it was not taken (it is not counted)."""
        self._capability[task.task_id] = task.capability
        self._refused[task.task_id] = f"{type(error).__name__}: {error}"

    async def submit(
        self,
        dispatcher: Dispatcher,
        capability: str,
        input: dict[str, JsonLike] | None = None,
        **options: Unpack[TaskOptions],
    ) -> TaskHandle | None:
        """Submit through ``dispatcher`` and record the outcome; None when it was refused."""
        task = dispatcher.task(capability, input, **options)
        try:
            handle = await dispatcher.submit_task(task)
        except WayangError as exc:
            self.refused(task, exc)
            return None
        self.confirmed(task)
        return handle

    async def collect(self, handle: TaskHandle, timeout_s: float) -> Result | None:
        """Wait for the handle's terminal result; None if none came in time.

        What the dispatcher hands out is counted through its verdicts, not here; this only
        checks that the caller got its own task's result.
        """
        try:
            result = await handle.result(timeout_s)
        except ResultTimeout:
            return None
        if result.task_id != handle.task_id:
            self._misdelivered.append(f"{handle.task_id} got {result.task_id}")
        return result

    # -- looking ---------------------------------------------------------------------------

    @property
    def confirmed_ids(self) -> frozenset[str]:
        """Task ids the broker confirmed."""
        return frozenset(self._confirmed)

    @property
    def refused_ids(self) -> frozenset[str]:
        """Task ids whose submit raised."""
        return frozenset(self._refused)

    @property
    def delivered_count(self) -> int:
        """Terminal results the dispatcher handed to its callers so far."""
        return self.witness.verdicts[Verdict.HANDED_OUT]

    def progress(self) -> str:
        """One line for a progress printout."""
        return (
            f"confirmed={len(self._confirmed)} refused={len(self._refused)}"
            f" delivered={self.delivered_count}"
            f" on_wire={sum(self.tap.terminal.values())}"
            f" dropped={sum(self.witness.dropped.values())}"
        )

    def unanswered(self) -> set[str]:
        """Confirmed task ids with no terminal result from the fabric on the wire yet."""
        return {t for t in self._confirmed if t not in self.tap.terminal}

    async def wait_for_results(self, timeout_s: float) -> bool:
        """Until every confirmed task has a fabric's terminal result on the wire; False on
        timeout (a result the dispatcher decided itself does not count)."""
        deadline = time.monotonic() + timeout_s
        while self.unanswered():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    # -- checking ----------------------------------------------------------------------------

    async def check(
        self, *, drain_timeout_s: float = 30.0, stats_interval_s: float = 5.0
    ) -> LedgerReport:
        """The report; raises :class:`LedgerMismatch` (carrying it) when a promise broke.

        ``drain_timeout_s`` bounds the wait for the queues to empty; ``stats_interval_s`` is
        the management API's statistics interval, which its unacked counts lag by.
        """
        report = await self.report(
            drain_timeout_s=drain_timeout_s, stats_interval_s=stats_interval_s
        )
        if not report.ok:
            raise LedgerMismatch(report)
        return report

    async def report(
        self, *, drain_timeout_s: float = 30.0, stats_interval_s: float = 5.0
    ) -> LedgerReport:
        """What the ledger saw, once the queues had time to drain and the tap has caught up."""
        depths = await wait_drained(
            self.amqp_url,
            self.management,
            await self._watched_queues(),
            timeout_s=drain_timeout_s,
            stats_interval_s=stats_interval_s,
        )
        await self.tap.caught_up(CATCH_UP_S)
        dead = await self._dead_letters()
        return self._build(depths, dead)

    async def _watched_queues(self) -> list[str]:
        capabilities = set(self._capability.values())
        queues = await asyncio.to_thread(capability_queues, self.management, capabilities)
        return queues + ([self.reply_queue] if self.reply_queue else [])

    async def _dead_letters(self) -> list[DeadLetter]:
        found: list[DeadLetter] = []
        for capability in sorted(set(self._capability.values())):
            try:
                letters = await list_dead_letters(
                    self.amqp_url, capability, limit=DEAD_LETTERS_READ
                )
            except ConfigError:
                continue  # no dead queue (a topology without it): nothing died there
            found.extend(d for d in letters if d.task_id in self._capability)
        return found

    def _build(self, depths: list[QueueDepth], dead: list[DeadLetter]) -> LedgerReport:
        wire, said = self.tap.terminal, self.witness
        known = self._capability.keys()
        heard = self.dispatcher is not None  # else there are no verdicts to cross-check
        lost = [t for t in self._confirmed if t not in wire and t not in said.taken]
        answered = [t for t in self._confirmed if t in wire or t in said.taken]
        undelivered = [t for t in answered if not said.handed_out[t]]
        # Every result on the wire must have reached the dispatcher: the one it handed out,
        # and the extra ones it dropped. (It may receive more: redeliveries after a lost ack.)
        unseen = {t: n - said.received[t] for t, n in wire.items() if n > said.received[t]}
        return LedgerReport(
            confirmed=len(self._confirmed),
            refused=len(self._refused),
            delivered=self.delivered_count,
            on_wire=sum(wire.values()),
            lost=tuple(sorted(lost)),
            undelivered=tuple(sorted(undelivered)) if heard and self.expect_deliveries else (),
            delivered_twice={t: n for t, n in said.taken.items() if n > 1},
            misdelivered=tuple(self._misdelivered),
            unseen_by_dispatcher=unseen if heard else {},
            unknown={t: n for t, n in wire.items() if t not in known},
            undecodable=self.tap.undecodable,
            undrained=tuple(d for d in depths if not d.empty),
            unanswered_dead_letters=tuple(d for d in dead if d.task_id not in self.tap.failed),
            wire_duplicates={t: n for t, n in wire.items() if n > 1 and t in known},
            dropped=sum(said.dropped.values()),
            decided_by_dispatcher=tuple(sorted(said.decided_here)),
            refused_but_answered=tuple(sorted(t for t in self._refused if t in wire)),
            outcomes=dict(said.outcomes),
            verdicts=dict(said.verdicts),
        )


# -- queues ---------------------------------------------------------------------------------


def capability_queues(management: ManagementClient, capabilities: Iterable[str]) -> list[str]:
    """The task queues of the capabilities: their own queue or their shard queues."""
    wanted = [re.compile(names.policy_pattern(c)) for c in sorted(set(capabilities))]
    if not wanted:
        return []
    existing = [str(q["name"]) for q in management.list_queues()]
    return sorted(q for q in existing if any(p.search(q) for p in wanted))


async def passive_ready(connection: AbstractRobustConnection, queue: str) -> int:
    """A queue's ready messages, exact and current (a passive declare); 0 if it is gone."""
    # A passive declare of a missing queue closes its channel (404): one channel per look.
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return 0
    finally:
        if not channel.is_closed:
            await channel.close()


def management_depth(management: ManagementClient, queue: str) -> QueueDepth:
    """A queue's depth as the management API saw it at its last statistics sample."""
    info: Mapping[str, Any] = management.get_queue(queue) or {}
    return QueueDepth(
        queue,
        int(info.get("messages_ready") or 0),
        int(info.get("messages_unacknowledged") or 0),
        int(info.get("messages_dlx") or 0),
    )


async def current_depths(
    connection: AbstractRobustConnection, management: ManagementClient, queues: Iterable[str]
) -> list[QueueDepth]:
    """Depths with the exact ready count (AMQP) and the management API's unacked counts."""
    out: list[QueueDepth] = []
    for queue in queues:
        sampled = await asyncio.to_thread(management_depth, management, queue)
        ready = await passive_ready(connection, queue)
        out.append(QueueDepth(queue, ready, sampled.unacked, sampled.dead_lettering))
    return out


async def wait_drained(
    amqp_url: str,
    management: ManagementClient,
    queues: list[str],
    *,
    timeout_s: float,
    stats_interval_s: float = 5.0,
) -> list[QueueDepth]:
    """Wait until every queue is empty; the last depths seen (all empty when drained).

    Only AMQP's ready count is current; unacked counts come from the management API, which
    samples every ``stats_interval_s``. So "empty" must hold again one interval later: a
    stale sample cannot hide a message delivered just before it.
    """
    connection = await connect(amqp_url, "ledger-depths")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            depths = await current_depths(connection, management, queues)
            if all(d.empty for d in depths):
                await asyncio.sleep(stats_interval_s)
                depths = await current_depths(connection, management, queues)
                if all(d.empty for d in depths):
                    return depths
            if time.monotonic() > deadline:
                return depths
            await asyncio.sleep(0.5)
    finally:
        await connection.close()
