"""Claims: before it runs a task, a worker asks the control plane whether it may
(``wayang-mq worker --claims``), so that a task id is run once across the fleet and a cancel
recorded before the worker started still stops the task.

The worker publishes a signed :class:`~wayang_mq.core.model.Claim` on ``wayang.control`` as
``claim.<capability>`` and waits, at most ``claim_timeout_s``, for the control plane's signed
:class:`~wayang_mq.core.model.ClaimReply` on its own control queue (``claim-reply.<me>``):

- ``run``: run the task, as without claims;
- ``duplicate``: another copy of this task id runs or ran: the delivery is acked without
  running and without an answer (the control plane answers that copy from its record);
- ``cancelled``: answered FAILED ``cancelled``, as a task whose cancel came first is today.

No answer in time (no control plane, PostgreSQL down, the claims queue missing) and the task
runs anyway, logged ``claim.unanswered`` and counted: claims make duplicates rarer, they never
stop the fabric (delivery stays at-least-once, as without them). Executors stay
database-free: a claim is one AMQP round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractIncomingMessage

from wayang_mq.amqp.control import ControlServer
from wayang_mq.amqp.outcome import LogLine, Outcome, discard
from wayang_mq.amqp.publisher import ConfirmedPublisher, to_amqp
from wayang_mq.core import logs, names
from wayang_mq.core.errors import ErrorCode, KeyNotAllowed, SignatureError, WayangError
from wayang_mq.core.model import Claim, ClaimReply, ClaimVerdict, ErrorInfo, Result, Task
from wayang_mq.core.scopes import Role
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.core.wire import open_signed, signed_message

log = logging.getLogger("wayang_mq.runtime.claims")

#: how long a worker waits for the control plane's verdict before it runs the task anyway
DEFAULT_CLAIM_TIMEOUT_S = 2.0

_Key = tuple[str, int, str]  # task id, attempt, token


@dataclass
class ClaimCounts:
    """What this worker's claims came to (health details, tests)."""

    run: int = 0
    duplicate: int = 0
    cancelled: int = 0
    unanswered: int = 0  # ran without a verdict: no control plane answered in time


class Claims:
    """The worker side of claims: ask, wait for the verdict, say what it means here."""

    def __init__(
        self,
        executor_id: str,
        signer: Signer,
        keyring: KeyRing,
        publisher: Callable[[], ConfirmedPublisher],
        timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S,
    ) -> None:
        self._executor_id = executor_id
        self._signer = signer
        self._keyring = keyring
        self._publisher = publisher
        self._timeout_s = timeout_s
        self._waiting: dict[_Key, asyncio.Future[ClaimReply]] = {}
        self.counts = ClaimCounts()

    def listen(self, control: ControlServer) -> None:
        """Take the control plane's replies on the worker's own control queue."""
        reply_key = names.claim_reply_key(self._executor_id)
        control.listen(reply_key, ClaimReply.wire_type, self._on_reply)

    async def claim(self, task: Task, *, redelivered: bool) -> Result | Outcome | None:
        """None: run the task. A Result: answer it with that (cancelled). An Outcome: settle
        the delivery so (a duplicate: acked, unanswered)."""
        reply = await self._ask(task, redelivered)
        if reply is None:
            return None  # unanswered: run (counted and logged)
        if reply.verdict is ClaimVerdict.RUN:
            self.counts.run += 1
            return None
        if reply.verdict is ClaimVerdict.CANCELLED:
            self.counts.cancelled += 1
            logs.event(log, "task.discarded", task_id=task.task_id, reason=reply.reason)
            error = ErrorInfo(code=ErrorCode.CANCELLED, message=reply.reason or "cancelled")
            return Result.failure(task, self._executor_id, error)
        self.counts.duplicate += 1
        line = LogLine(
            "task.duplicate",
            logging.INFO,
            {"task_id": task.task_id, "attempt": task.attempt, "why": reply.reason},
        )
        return discard(task.task_id, log=line)

    async def _ask(self, task: Task, redelivered: bool) -> ClaimReply | None:
        key = (task.task_id, task.attempt, task.token)
        waiting = self._waiting.get(key)
        if waiting is None:  # the same copy asked twice at once (a redelivery) shares one
            waiting = self._waiting[key] = asyncio.get_running_loop().create_future()
            try:
                await self._publish(task, redelivered)
            except WayangError as exc:
                del self._waiting[key]
                self._unanswered(task, f"the claim was not published: {exc.message}")
                return None
        try:
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.shield(waiting)
        except TimeoutError:
            self._unanswered(task, f"no verdict within {self._timeout_s:g} s")
            return None
        finally:
            if self._waiting.get(key) is waiting:
                del self._waiting[key]

    async def _publish(self, task: Task, redelivered: bool) -> None:
        claim = Claim(
            executor_id=self._executor_id,
            task_id=task.task_id,
            attempt=task.attempt,
            token=task.token,
            capability=task.capability,
            issuer=task.issuer,
            issued_at_ms=task.issued_at_ms,
            redelivered=redelivered,
        )
        message = to_amqp(
            signed_message(claim, self._signer, message_id=task.task_id), persistent=False
        )
        # mandatory: with no wayang.claims queue (topology not applied) it runs at once
        await self._publisher().publish_once(
            names.CONTROL_EXCHANGE, names.claim_key(task.capability), message, mandatory=True
        )

    def _unanswered(self, task: Task, why: str) -> None:
        self.counts.unanswered += 1
        logs.event(
            log, "claim.unanswered", logging.WARNING, task_id=task.task_id, why=why, next="run"
        )

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        """A verdict, verified: signed by a control plane key (else refused and logged)."""
        try:
            headers = message.headers or {}
            reply, signer = open_signed(message.body, headers, self._keyring, ClaimReply)
            if not signer.scope.is_(Role.CONTROL_PLANE):
                who = signer.scope.describe()
                raise KeyNotAllowed(f"claim replies may not be signed by {who}")
        except WayangError as exc:
            refused = isinstance(exc, SignatureError | KeyNotAllowed)
            event = "security.refused" if refused else "claim.refused"
            logs.event(log, event, logging.WARNING, type=message.type, code=exc.code, error=exc)
            return
        waiting = self._waiting.get((reply.task_id, reply.attempt, reply.token))
        if waiting is not None and not waiting.done():
            waiting.set_result(reply)
