"""One contract for code, people and AI, end to end: an ``agent.reason`` task asks a person
through the real ``approval.request`` inbox (a tool call dispatched through the fabric), the
person approves in a browser, and the agent reads the decision and finishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wayang_workers.agent import LongAgent
from wayang_workers.approval import Approvals, ApprovalSettings

from tests.test_agent import (
    WAIT_S,
    ModelServer,
    agent_key,
    call,
    model,
    say,
    sessions_dsn,
    settings,
    tool_messages,
    workers,
)
from tests.test_approval import database, users
from tests.test_console_browser import CHROMIUM_FLAGS, chromium
from wayang_mq import Status
from wayang_mq.testing.harness import Fabric, eventually

# fixtures shared with their home modules (module-scoped there, module-scoped here)
__all__ = ["agent_key", "database", "model", "sessions_dsn", "users"]

REQUEST = {
    "title": "Refund order 17?",
    "requester": "support-agent",
    "context": {"order": 17, "refund": {"amount": 1250, "currency": "EUR"}},
    "assignees": ["alice"],
    "deadline_s": 600,
}


async def test_an_agent_asks_a_person_in_the_inbox_and_continues_after_the_browser_approves(
    fabric: Fabric,
    model: ModelServer,
    agent_key: Path,
    database: str,
    users: dict[str, dict[str, Any]],
) -> None:
    from playwright.async_api import async_playwright

    # Given a model that asks a person for an approval, then reports the decision
    base_url = model.script(call(("approval__request", REQUEST)), say("alice approved it"))
    agent = LongAgent(settings(fabric, agent_key, base_url))  # it may wait on a person
    inbox = Approvals(ApprovalSettings.model_validate({"dsn": database, "port": 0, "users": users}))
    await fabric.purge("agent.reason", "approval.request")
    async with workers(fabric, agent, inbox), fabric.dispatcher() as dispatcher:
        # When the agent's task runs: its tool call files a request in the real inbox
        handle = await dispatcher.submit(
            "agent.reason", {"goal": "refund order 17", "tools": ["approval.request"]}
        )
        accepted = await handle.accepted(WAIT_S)
        assert accepted.status is Status.PENDING  # the agent's own task, accepted and acked

        # and Alice signs in, finds it, and approves it in a browser
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS
            )
            try:
                page = await browser.new_page()
                await page.goto(f"{inbox.url}/")
                await page.fill("input[name=username]", "alice")
                await page.fill("input[name=password]", "alice-pw-1")
                await page.click("button[type=submit]")
                await page.wait_for_selector("#who")

                async def listed() -> bool:
                    await page.goto(f"{inbox.url}/")
                    return "Refund order 17?" in await page.inner_text("body")

                await eventually(listed, interval_s=0.5, what="the request in Alice's inbox")
                assert not handle.done()  # the agent waits for the person
                await page.click("a.title")
                await page.wait_for_selector("#decide")
                assert "€12.50" in await page.inner_text("#context")
                await page.fill("#comment", "within the refund window")
                await page.click("#approve")
                await page.wait_for_selector("#decided")
            finally:
                await browser.close()
        result = await handle.result(WAIT_S)

    # Then the agent got the person's decision as its tool result and finished with it
    assert result.status is Status.SUCCESS, result.error
    assert result.output["answer"] == "alice approved it"
    (decision,) = tool_messages(model.of(base_url).requests[1])
    assert decision["status"] == "SUCCESS"
    assert decision["output"]["decision"] == "approved"
    assert decision["output"]["by"] == "alice"
    assert decision["output"]["comment"] == "within the refund window"
