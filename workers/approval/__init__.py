"""``approval.request``: a person decides. The worker that runs :class:`Approvals` also serves
a web inbox; a task is filed in PostgreSQL and answered PENDING at once (its delivery acked,
never held for hours), and the decision made in the browser later publishes its terminal
result. docs/executors.md is the contract.

Run ``wayang-mq worker wayang_workers.approval:Approvals --config worker.toml --secrets env``
with an ``[approval.request]`` table (workers/examples/approval.toml).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import ClassVar

from aiohttp.web import AppRunner, TCPSite

from wayang_mq import Executor, Task, current
from wayang_mq.core import logs
from wayang_mq.core.errors import ConfigError, WayangError
from wayang_mq.core.model import JsonLike, TaskRef
from wayang_mq.runtime.executor import Pending
from wayang_mq.runtime.settings import parse_input

from .auth import LoginLimit, Users
from .decisions import DECISIONS, error_of, output_of
from .models import ApprovalSettings, Escalate, RequestInput
from .store import Filed, Request, Store
from .web import inbox_app

__all__ = ["ApprovalSettings", "Approvals", "RequestInput"]

log = logging.getLogger(__name__)


class Approvals(Executor):
    """Files approval requests for people and publishes their decisions."""

    serves: ClassVar[tuple[str, ...]] = ("approval.request",)
    settings_model: ClassVar[type[ApprovalSettings]] = ApprovalSettings
    #: a request is shown to people: a task may carry no secret into it
    allowed_secrets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: ApprovalSettings | None = None) -> None:
        self.settings = settings or ApprovalSettings()
        self.url = ""  # the inbox's base URL, once set up
        self._store: Store | None = None
        self._site: AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def setup(self) -> None:
        """Open the store, serve the inbox, start checking deadlines."""
        if not self.settings.dsn:
            raise ConfigError(
                "[approval.request] needs dsn (the PostgreSQL that keeps the requests)",
                hint='dsn = {"$secret" = "approval-dsn"} with --secrets env',
            )
        store = Store(await self.reveal(self.settings.dsn))
        await store.open(create_schema=self.settings.create_schema)
        self._store = store
        users = Users(self.settings.users)
        limit = LoginLimit(self.settings.login_max_failures, self.settings.login_window_s)
        app = inbox_app(store, users, limit, self.settings, self._publish)
        runner = AppRunner(app, access_log=None)
        await runner.setup()
        site = TCPSite(runner, self.settings.host, self.settings.port)
        await site.start()
        self._site = runner
        host, port = runner.addresses[0][:2]
        self.url = self.settings.public_url.rstrip("/") or f"http://{host}:{port}"
        logs.event(log, "approval.inbox_url", url=self.url)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="approval deadlines")

    async def teardown(self) -> None:
        """Stop the deadline checks and the inbox, close the store."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._site is not None:
            await self._site.cleanup()
        if self._store is not None:
            await self._store.close()

    # -- the contract --------------------------------------------------------------------------

    async def execute(self, task: Task) -> JsonLike | Pending:
        """File the request (idempotent per task and attempt) and accept the task."""
        ask = parse_input(RequestInput, task.input)
        escalate = ask.on_deadline.escalate_to if isinstance(ask.on_deadline, Escalate) else None
        filed = Filed(
            ref=TaskRef.of(task),
            issuer=task.issuer,
            title=ask.title,
            requester=ask.requester,
            context=ask.context,
            assignees=ask.assignees,
            groups=ask.groups,
            editable=dict(ask.editable),
            deadline=ask.due(datetime.now(UTC)),
            escalate_to=escalate,
        )
        try:
            await self._opened().file(filed)
        except asyncio.CancelledError:
            if current().is_cancelled:
                # A cancel request while filing (not the worker stopping: then the delivery
                # goes back and is filed again): withdraw what may have been stored, so no
                # stale request waits in the inbox. The runner answers the task cancelled.
                await asyncio.shield(self._opened().withdraw(task.task_id, None, "cancelled"))
            raise
        logs.event(log, "approval.filed", task_id=task.task_id, title=ask.title)
        return Pending({"inbox": f"{self.url}/r/{task.task_id}"})

    async def withdraw(self, task_id: str, reason: str, requester: str | None) -> bool:
        """A cancel of a pending request: withdrawn, answered FAILED ``cancelled``."""
        withdrawn = await self._opened().withdraw(task_id, requester, reason)
        if withdrawn is None:
            return False
        logs.event(log, "approval.withdrawn", task_id=task_id, reason=reason)
        await self._publish(withdrawn)
        return True

    # -- answers ---------------------------------------------------------------------------------

    async def _publish(self, request: Request) -> None:
        """Publish an ended request's result, then mark it answered. A failure is logged and
        left to the sweeper, which publishes again (the dispatcher drops a duplicate)."""
        try:
            answers = self.answers()
            if request.state in DECISIONS:
                await answers.succeed(request.ref, output_of(request))
            else:
                await answers.fail(request.ref, error_of(request))
            await self._opened().mark_answered(request.task_id)
        except (WayangError, RuntimeError) as exc:
            logs.event(
                log, "approval.unanswered", logging.WARNING, task_id=request.task_id, error=exc
            )
            return
        logs.event(log, "approval.answered", task_id=request.task_id, decision=request.state)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.deadline_check_s)
            try:
                await self._sweep()
            except Exception:  # the database away a moment: next round
                log.exception("event=approval.sweep_failed")

    async def _sweep(self) -> None:
        """End (or escalate, once) overdue requests; publish what is still unanswered."""
        store = self._opened()
        for request in await store.overdue():
            if request.escalate_to and not request.escalated:
                assert request.deadline is not None
                until = datetime.now(UTC) + (request.deadline - request.created_at)
                if await store.escalate(request, until):
                    logs.event(
                        log, "approval.escalated", task_id=request.task_id, to=request.escalate_to
                    )
                continue
            ended = await store.decide(request.task_id, "timeout", "deadline")
            if ended is not None:
                await self._publish(ended)
        for request in await store.unanswered():
            await self._publish(request)

    def _opened(self) -> Store:
        if self._store is None:
            raise RuntimeError("approval.request is not set up")
        return self._store
