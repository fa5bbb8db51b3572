"""approval.request, the human executor: a dispatched task becomes a request in a web inbox,
and what a person decides there, in a real browser (Debian's Chromium driven by Playwright),
is the task's terminal result. Real broker, real PostgreSQL.

The screenshots go to ``$WAYANG_SCREENSHOT_DIR`` (docs/img/approval-*.png are made with
``WAYANG_SCREENSHOT_DIR=docs/img ./scripts/test tests/test_approval.py``), else into the
test's temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from wayang_workers.approval import Approvals, ApprovalSettings, RequestInput
from wayang_workers.approval.auth import hash_password
from wayang_workers.approval.decisions import BadValue, counter_values
from wayang_workers.approval.present import is_url, money

from tests.test_console_browser import CHROMIUM_FLAGS, chromium
from wayang_mq import ErrorCode, ExecutorError, Status
from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.client.replies import TaskHandle
from wayang_mq.runtime.executor import load_executor
from wayang_mq.runtime.settings import WorkerFile, parse_input
from wayang_mq.testing.harness import Fabric, WorkerProcess, eventually
from wayang_mq.testing.plugin import fresh_database

CAPABILITY = "approval.request"
PASSWORDS = {"alice": "alice-pw-1", "carol": "carol-pw-1", "bob": "bob-pw-1", "eve": "eve-pw-1"}
GROUPS = {"alice": ["finance"], "carol": ["finance", "managers"], "bob": ["ops"], "eve": []}
NAMES = {"alice": "Alice Martin", "carol": "Carol Ng", "bob": "Bob Diaz", "eve": "Eve"}
MAX_FAILURES = 3
REFUND = {
    "title": "Refund order #4411",
    "requester": "billing-bot",
    "context": {
        "customer": "ACME GmbH",
        "amount": {"amount": 125000, "currency": "EUR"},
        "invoice": "https://billing.example.com/invoices/4411",
        "reason": "Damaged in transit",
        "lines": [{"sku": "CHAIR-01", "qty": 4}, {"sku": "DESK-02", "qty": 1}],
    },
    "assignees": ["alice"],
    "deadline_s": 3600,
    "editable": {"amount": "int", "note": "string"},
}


@pytest.fixture(scope="module")
def users() -> dict[str, dict[str, Any]]:
    """The inbox's users, with Argon2id hashes of their passwords."""
    return {
        name: {
            "password_hash": hash_password(PASSWORDS[name]),
            "groups": GROUPS[name],
            "display_name": NAMES[name],
        }
        for name in PASSWORDS
    }


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where this run's screenshots go."""
    wanted = os.environ.get("WAYANG_SCREENSHOT_DIR")
    directory = Path(wanted) if wanted else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def database(postgres: str) -> Iterator[str]:
    with fresh_database(postgres) as url:
        yield url


# -- signing in over plain HTTP (for the people who are not the browser) -------------------


class Client:
    """A person's HTTP session with the inbox."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def sign_in(self, user: str, password: str | None = None) -> int:
        async with self.http.get(f"{self.base}/login") as response:
            token = _csrf(await response.text())
        form = {"username": user, "password": password or PASSWORDS[user], "csrf": token}
        async with self.http.post(
            f"{self.base}/login", data=form, allow_redirects=False
        ) as response:
            if response.status != 303:
                return response.status
        async with self.http.get(f"{self.base}/") as response:
            self.csrf = _csrf(await response.text())
        return 303

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(f"{self.base}{path}", allow_redirects=False) as response:
            return response.status, await response.text()

    async def post(self, path: str, form: dict[str, str]) -> tuple[int, str]:
        async with self.http.post(
            f"{self.base}{path}", data=form, allow_redirects=False
        ) as response:
            return response.status, await response.text()

    async def decide(self, task_id: str, action: str, **fields: str) -> tuple[int, str]:
        return await self.post(f"/r/{task_id}", {"csrf": self.csrf, "action": action, **fields})

    async def close(self) -> None:
        await self.http.close()


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found[1]


async def _accepted(dispatcher: Dispatcher, input: dict[str, Any]) -> tuple[TaskHandle, str]:
    """Dispatch a request; its handle and the inbox URL its PENDING answer names."""
    handle = await dispatcher.submit(CAPABILITY, input)
    pending = await handle.accepted(timeout_s=15)
    assert pending.status is Status.PENDING
    assert isinstance(pending.output, dict)
    return handle, str(pending.output["inbox"])


# -- a restart, through the real daemon and its --config file (first: no worker in-process) ---


def _config(path: Path, users: dict[str, dict[str, Any]]) -> Path:
    lines = ["[approval.request]", 'dsn = {"$secret" = "approval-dsn"}', "port = 0"]
    lines.append("deadline_check_s = 0.5")
    for name, user in users.items():
        lines.append(f"[approval.request.users.{name}]")
        lines.append(f"password_hash = {user['password_hash']!r}")
        lines.append(f"groups = {user['groups']!r}")
        lines.append(f"display_name = {user['display_name']!r}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def _daemon(fabric: Fabric, name: str, config: Path, dsn: str) -> tuple[WorkerProcess, str]:
    """A worker daemon serving the inbox, and the inbox URL it logged."""
    process = fabric.spawn_worker(
        ["wayang_workers.approval:Approvals"],
        executor_id=name,
        args=["--config", str(config), "--secrets", "env"],
        env={"WAYANG_SECRET_APPROVAL_DSN": dsn},
    )
    await asyncio.to_thread(process.wait_started)
    found = re.search(r"event=approval\.inbox_url url=(\S+)", process.log())
    assert found, process.log()[-2000:]
    return process, found[1]


@pytest.fixture
def daemons_stopped(fabric: Fabric) -> Iterator[None]:
    yield
    fabric.stop_processes()


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("daemons_stopped")
async def test_a_restarted_daemon_serves_the_pending_request_and_its_approval_answers(
    fabric: Fabric, postgres: str, users: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    await fabric.purge(CAPABILITY)
    config = _config(tmp_path / "worker.toml", users)
    with fresh_database(postgres) as dsn:
        # Given a daemon that filed a request and answered PENDING
        first, _ = await _daemon(fabric, "approval-daemon-1", config, dsn)
        async with fabric.dispatcher() as dispatcher:
            handle, _ = await _accepted(dispatcher, REFUND)

            # When it crashes, and a new daemon starts on the same database
            first.signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait)
            second, base = await _daemon(fabric, "approval-daemon-2", config, dsn)

            # Then the request is in the inbox the new daemon serves, and approving it there
            # answers the dispatcher that still waits
            alice = Client(base)
            try:
                assert await alice.sign_in("alice") == 303
                status, page = await alice.get("/")
                assert handle.task.task_id in page
                status, _ = await alice.decide(handle.task.task_id, "approve")
                assert status == 303
            finally:
                await alice.close()
            result = await handle.result(timeout_s=15)
            assert result.status is Status.SUCCESS
            assert isinstance(result.output, dict)
            assert result.output["decision"] == "approved" and result.output["by"] == "alice"
            assert result.executor_id == "approval-daemon-2"
            second.stop()  # gently: its teardown closes the inbox and the store


# -- the inbox, one worker in-process for the rest ---------------------------------------------


@dataclass
class Inbox:
    base: str
    dispatcher: Dispatcher
    approvals: Approvals


@pytest.fixture(scope="class")
async def inbox(
    fabric: Fabric, database: str, users: dict[str, dict[str, Any]]
) -> AsyncIterator[Inbox]:
    """A worker serving approval.request (its inbox on a free port), and a dispatcher."""
    await fabric.purge(CAPABILITY)
    settings = ApprovalSettings.model_validate(
        {
            "dsn": database,
            "port": 0,
            "users": users,
            "deadline_check_s": 0.2,
            "login_max_failures": MAX_FAILURES,
        }
    )
    approvals = Approvals(settings)
    async with fabric.worker([approvals], executor_id="approvals-0"), fabric.dispatcher() as d:
        yield Inbox(approvals.url, d, approvals)


@pytest.fixture(scope="class")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    """A fresh page (no cookies), 1100x760."""
    context = await browser.new_context(viewport={"width": 1100, "height": 760})
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def _sign_in(page: Any, base: str, user: str) -> None:
    await page.goto(f"{base}/")
    await page.fill("input[name=username]", user)
    await page.fill("input[name=password]", PASSWORDS[user])
    await page.click("button[type=submit]")
    await page.wait_for_selector("#who")


async def _client(inbox: Inbox, user: str) -> Client:
    client = Client(inbox.base)
    assert await client.sign_in(user) == 303
    return client


class TestInbox:
    async def test_a_person_approves_in_the_browser_and_the_dispatcher_gets_success(
        self, inbox: Inbox, page: Any, shots: Path
    ) -> None:
        # Given a dispatched request (and two others, so the inbox shows a list)
        others = [
            {
                "title": "Laptop for a new hire",
                "requester": "it-desk",
                "context": {"model": "ThinkPad X1", "price": {"amount": 189900, "currency": "EUR"}},
                "groups": ["finance"],
                "deadline_s": 5400,
            },
            {
                "title": "Publish the 2.4 release notes",
                "requester": "docs-agent",
                "context": {"draft": "https://docs.example.com/drafts/2.4"},
                "assignees": ["alice"],
            },
        ]
        for other in others:
            await _accepted(inbox.dispatcher, other)
        handle, url = await _accepted(inbox.dispatcher, REFUND)
        task_id = handle.task.task_id
        assert url == f"{inbox.base}/r/{task_id}"

        # When Alice signs in, she sees it in her inbox
        await _sign_in(page, inbox.base, "alice")
        await page.wait_for_selector(f'[data-task="{task_id}"]')
        assert "Refund order #4411" in await page.inner_text("#requests")
        await page.screenshot(path=str(shots / "approval-inbox.png"), full_page=True)

        # and its context reads as money, a link and tables
        await page.click(f'[data-task="{task_id}"] a.title')
        await page.wait_for_selector("#decide")
        context = await page.inner_text("#context")
        assert "€1,250.00" in context and "ACME GmbH" in context and "CHAIR-01" in context
        link = page.locator("#context a")
        assert await link.get_attribute("href") == REFUND["context"]["invoice"]  # type: ignore[index]
        await page.screenshot(path=str(shots / "approval-detail.png"), full_page=True)

        # and on a phone's screen it fits, with nothing to scroll sideways
        await page.set_viewport_size({"width": 390, "height": 844})
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await page.set_viewport_size({"width": 1100, "height": 760})

        # When she approves it
        await page.fill("#comment", "Photos confirm the damage")
        await page.click("#approve")
        await page.wait_for_selector("#decided")

        # Then the dispatcher's handle gets SUCCESS with the decision, and it is audited
        result = await handle.result(timeout_s=15)
        assert result.status is Status.SUCCESS
        assert isinstance(result.output, dict)
        assert result.output["decision"] == "approved" and result.output["by"] == "alice"
        assert result.output["comment"] == "Photos confirm the damage"
        datetime.fromisoformat(str(result.output["at"]))
        assert "alice · approved" in await page.inner_text(".history")

    async def test_a_rejection_needs_a_comment_and_answers_rejected(
        self, inbox: Inbox, page: Any
    ) -> None:
        handle, url = await _accepted(inbox.dispatcher, REFUND)
        await _sign_in(page, inbox.base, "alice")
        await page.goto(url)

        # When Alice rejects without saying why, she is asked to
        await page.click("#reject")
        assert "Say why" in await page.inner_text("#error")

        # When she gives a reason
        await page.fill("#comment", "Outside the refund window")
        await page.click("#reject")
        await page.wait_for_selector("#decided")

        # Then the task succeeds with the rejection and its comment
        result = await handle.result(timeout_s=15)
        assert result.status is Status.SUCCESS
        assert isinstance(result.output, dict)
        assert result.output["decision"] == "rejected"
        assert result.output["comment"] == "Outside the refund window"

    async def test_a_counter_proposal_refuses_a_wrong_type_and_answers_the_edited_value(
        self, inbox: Inbox, page: Any
    ) -> None:
        handle, url = await _accepted(inbox.dispatcher, REFUND)
        await _sign_in(page, inbox.base, "alice")
        await page.goto(url)

        # When Alice proposes an amount that is not a whole number
        await page.click("details.counter summary")
        await page.fill("input[name='v.amount']", "a lot")
        await page.click("#counter")

        # Then she is told, and nothing is answered
        assert "amount must be a whole number" in await page.inner_text("#error")
        assert not handle.done()

        # When she proposes 900.00 €
        await page.fill("input[name='v.amount']", "90000")
        await page.click("#counter")
        await page.wait_for_selector("#decided")

        # Then the task succeeds with the counter-proposal's values
        result = await handle.result(timeout_s=15)
        assert result.status is Status.SUCCESS
        assert result.output is not None and isinstance(result.output, dict)
        assert result.output["decision"] == "counter"
        assert result.output["values"] == {"amount": 90000}

    async def test_someone_else_can_neither_see_nor_decide_it(self, inbox: Inbox) -> None:
        handle, _ = await _accepted(inbox.dispatcher, REFUND)
        task_id = handle.task.task_id
        bob = await _client(inbox, "bob")
        alice = await _client(inbox, "alice")
        try:
            # Bob's inbox does not list Alice's request, its page and a decision are 404
            _, page = await bob.get("/")
            assert task_id not in page
            assert (await bob.get(f"/r/{task_id}"))[0] == 404
            assert (await bob.decide(task_id, "approve"))[0] == 404
            # and it still waits for Alice
            status, page = await alice.get(f"/r/{task_id}")
            assert status == 200 and 'id="decide"' in page
            assert not handle.done()
        finally:
            await bob.close()
            await alice.close()
        await inbox.dispatcher.cancel(task_id)

    async def test_the_inbox_filters_by_assignee_and_group(self, inbox: Inbox) -> None:
        mine, _ = await _accepted(inbox.dispatcher, REFUND | {"assignees": ["carol"]})
        teams, _ = await _accepted(
            inbox.dispatcher, REFUND | {"assignees": [], "groups": ["managers"]}
        )
        carol = await _client(inbox, "carol")
        try:
            _, everything = await carol.get("/")
            _, assigned = await carol.get("/?assignee=carol")
            _, managers = await carol.get("/?group=managers")
        finally:
            await carol.close()
        both = (mine.task.task_id, teams.task.task_id)
        assert all(task_id in everything for task_id in both)
        assert mine.task.task_id in assigned and teams.task.task_id not in assigned
        assert teams.task.task_id in managers and mine.task.task_id not in managers
        for task_id in both:
            await inbox.dispatcher.cancel(task_id)

    async def test_two_people_deciding_at_once_the_first_wins_the_second_is_told(
        self, inbox: Inbox
    ) -> None:
        request = REFUND | {"assignees": [], "groups": ["finance"]}
        handle, _ = await _accepted(inbox.dispatcher, request)
        task_id = handle.task.task_id
        alice, carol = await _client(inbox, "alice"), await _client(inbox, "carol")
        try:
            answers = await asyncio.gather(
                alice.decide(task_id, "approve"), carol.decide(task_id, "reject", comment="no")
            )
        finally:
            await alice.close()
            await carol.close()
        statuses = sorted(status for status, _ in answers)
        assert statuses == [303, 409]
        loser = next(page for status, page in answers if status == 409)
        result = await handle.result(timeout_s=15)
        assert isinstance(result.output, dict)
        assert f"Already decided by {result.output['by']}" in loser

    async def test_a_cancel_withdraws_the_request(self, inbox: Inbox) -> None:
        handle, _ = await _accepted(inbox.dispatcher, REFUND)
        task_id = handle.task.task_id
        # (a cancel signed by someone who did not issue the task withdraws nothing)
        assert not await inbox.approvals.withdraw(task_id, "not yours", requester="mallory")

        # When the dispatcher cancels the accepted task
        assert await inbox.dispatcher.cancel(task_id, "order was refunded by hand")

        # Then it ends FAILED cancelled, and leaves Alice's inbox
        result = await handle.result(timeout_s=15)
        assert result.status is Status.FAILED and result.error is not None
        assert result.error.code is ErrorCode.CANCELLED
        assert result.error.details["reason"] == "withdrawn"
        alice = await _client(inbox, "alice")
        try:
            assert task_id not in (await alice.get("/"))[1]
            assert "Withdrawn" in (await alice.get(f"/r/{task_id}"))[1]
            assert (await alice.decide(task_id, "approve"))[0] == 409
        finally:
            await alice.close()

    async def test_a_deadline_ends_it_failed_timeout(self, inbox: Inbox) -> None:
        handle, _ = await _accepted(inbox.dispatcher, REFUND | {"deadline_s": 0.5})
        result = await handle.result(timeout_s=15)
        assert result.status is Status.FAILED and result.error is not None
        assert result.error.code is ErrorCode.TIMEOUT
        assert result.error.details["reason"] == "deadline_passed"

    async def test_a_deadline_escalates_once_to_the_named_group_then_times_out(
        self, inbox: Inbox
    ) -> None:
        request = REFUND | {
            "assignees": ["bob"],
            "deadline_s": 1.0,
            "on_deadline": {"escalate_to": "managers"},
        }
        handle, _ = await _accepted(inbox.dispatcher, request)
        task_id = handle.task.task_id
        bob, carol = await _client(inbox, "bob"), await _client(inbox, "carol")
        try:
            assert task_id in (await bob.get("/"))[1]

            async def with_managers() -> bool:
                return task_id in (await carol.get("/"))[1]

            # When its deadline passes, Carol (managers) gets it and Bob no longer does
            await eventually(with_managers, timeout_s=10, interval_s=0.1, what="escalation")
            assert task_id not in (await bob.get("/"))[1]
        finally:
            await bob.close()
            await carol.close()
        # and at the next deadline it ends FAILED timeout
        result = await handle.result(timeout_s=15)
        assert result.error is not None and result.error.code is ErrorCode.TIMEOUT

    async def test_a_decision_stored_but_never_published_is_published_by_the_next_check(
        self, inbox: Inbox, database: str
    ) -> None:
        # Given a decision written to the store by a process that died before publishing it
        handle, _ = await _accepted(inbox.dispatcher, REFUND)
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await conn.execute(
                "UPDATE wayang_approval.requests SET state = 'approved', decided_by = 'alice', "
                "decided_at = now() WHERE task_id = %s",
                [handle.task.task_id],
            )
        # Then the deadline check publishes it
        result = await handle.result(timeout_s=15)
        assert result.status is Status.SUCCESS
        assert isinstance(result.output, dict) and result.output["by"] == "alice"

    async def test_a_post_without_the_csrf_token_is_forbidden(self, inbox: Inbox) -> None:
        handle, _ = await _accepted(inbox.dispatcher, REFUND)
        task_id = handle.task.task_id
        alice = await _client(inbox, "alice")
        try:
            assert (await alice.post(f"/r/{task_id}", {"action": "approve"}))[0] == 403
            form = {"action": "approve", "csrf": "forged"}
            assert (await alice.post(f"/r/{task_id}", form))[0] == 403
            assert 'id="decide"' in (await alice.get(f"/r/{task_id}"))[1]
        finally:
            await alice.close()
        assert not handle.done()
        await inbox.dispatcher.cancel(task_id)

    async def test_wrong_passwords_are_rate_limited_per_user_and_address(
        self, inbox: Inbox
    ) -> None:
        eve = Client(inbox.base)
        try:
            for _ in range(MAX_FAILURES):
                assert await eve.sign_in("eve", "guess") == 401
            # the right password too, now: refused until the window passes
            assert await eve.sign_in("eve") == 429
        finally:
            await eve.close()
        # another user from the same address is not locked out
        alice = await _client(inbox, "alice")
        await alice.close()


# -- pure parts ------------------------------------------------------------------------------


def test_amounts_in_minor_units_are_formatted_in_their_currency() -> None:
    assert money({"amount": 125000, "currency": "EUR"}) == "€1,250.00"
    assert money({"amount": 1050, "currency": "JPY"}) == "¥1,050"
    assert money({"amount": -5, "currency": "KWD"}) == "-0.005 KWD"


def test_only_http_urls_become_links() -> None:
    assert is_url("https://example.com/a")
    assert not is_url("javascript:alert(1)") and not is_url("ftp://x") and not is_url("a b")


def test_counter_values_are_typed_and_a_wrong_one_is_named() -> None:
    editable = {"amount": "int", "rate": "number", "ok": "bool", "note": "string"}
    form = {"amount": "12", "rate": "1.5", "ok": "yes", "note": ""}
    assert counter_values(editable, form) == {"amount": 12, "rate": 1.5, "ok": True}
    with pytest.raises(BadValue, match="rate must be a number"):
        counter_values(editable, {"rate": "nan"})
    with pytest.raises(BadValue, match="at least one"):
        counter_values(editable, {})


def test_the_hash_helper_prints_an_argon2id_hash_of_stdin() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wayang_workers.approval.hash"],
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.startswith("$argon2id$") and "s3cret" not in done.stdout


def test_the_example_settings_file_loads() -> None:
    path = Path(__file__).parents[1] / "workers" / "examples" / "approval.toml"
    executor = load_executor("wayang_workers.approval:Approvals", WorkerFile.read(path))
    assert isinstance(executor, Approvals)
    assert "alice" in executor.settings.users


def test_a_request_names_someone_and_escalates_only_with_a_deadline() -> None:
    with pytest.raises(ExecutorError) as caught:
        parse_input(RequestInput, {"title": "Pay it?", "assignees": ["a"], "extra": 1})
    assert caught.value.code is ErrorCode.INVALID_TASK and "input.extra" in caught.value.message
    with pytest.raises(ExecutorError, match="assignees or groups"):
        parse_input(RequestInput, {"title": "Pay it?"})
    with pytest.raises(ExecutorError, match="no deadline"):
        parse_input(
            RequestInput, {"title": "x", "groups": ["g"], "on_deadline": {"escalate_to": "m"}}
        )
