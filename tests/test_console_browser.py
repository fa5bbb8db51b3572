"""The RabbitMQ console, in a real browser (Debian's Chromium, driven by Playwright), on a real
run: what a person sees there tells the story.

Given workers, a dispatcher and a task that died after a retry hop, when a person logs in to
the console, then: the connections page names each daemon and what it serves; the queues page
shows every fabric queue under the fabric's policies, and the reply queue's owner; the dead
queue's message shows its real reason, capability, attempt, time and a redacted preview of its
input in plain headers, and no stale ``x-death`` from the retry hop.

The screenshots go to ``$WAYANG_SCREENSHOT_DIR`` (README's "In the console" pictures are made
with ``WAYANG_SCREENSHOT_DIR=docs/img ./scripts/test tests/test_console_browser.py``), else
into the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from wayang_workers.demo import Echo, Fail, Sleep

from wayang_mq.core import names
from wayang_mq.core.model import RetryHints
from wayang_mq.testing.harness import Fabric, eventually

SECRET_VALUE = "hunter2-browser"
CHROMIUM_FLAGS = [
    "--no-sandbox",  # root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # the machine's network is closed: no background calls to Google's hosts
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STATS_WAIT_S = 30.0  # the console's listings come from stats emitted every ~5 s


def chromium() -> str:
    """Debian's Chromium (scripts/setup installs it); Playwright never downloads its own."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: run ./scripts/setup (it installs chromium)")
    return path


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where this run's screenshots go."""
    wanted = os.environ.get("WAYANG_SCREENSHOT_DIR")
    directory = Path(wanted) if wanted else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh headless Chromium page, 1440x900."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            context = await browser.new_context(viewport={"width": 1440, "height": 900})
            yield await context.new_page()
        finally:
            await browser.close()


async def _log_in(page: Any, fabric: Fabric) -> None:
    endpoint = fabric.endpoint
    await page.goto(f"{endpoint.management_url}/")
    await page.fill("input[name=username]", endpoint.username)
    await page.fill("input[name=password]", endpoint.password)
    await page.click("input[type=submit]")
    await page.wait_for_selector("#logout", timeout=30_000)


async def _depth(fabric: Fabric, queue: str) -> int:
    async with await aio_pika.connect(fabric.endpoint.amqp_url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def _text(page: Any) -> str:
    return str(await page.inner_text("#main"))


@pytest.mark.timeout(240)
async def test_the_console_tells_the_story_of_a_run(fabric: Fabric, page: Any, shots: Path) -> None:
    await fabric.purge("demo.fail", "demo.echo", "demo.sleep")
    dead_queue = names.dead_queue("demo.fail")
    worker_id = "console-worker-0"
    async with (
        fabric.worker([Echo(), Sleep(), Fail()], executor_id=worker_id),
        fabric.dispatcher(dispatcher_id="console-dispatcher") as dispatcher,
    ):
        # Given tasks flowing, and one that fails every attempt after a retry hop
        for n in range(20):
            await dispatcher.run("demo.echo", {"n": n}, wait_s=30)
        dying = {"mode": "retryable", "customer": "ACME", "password": SECRET_VALUE}
        twice = RetryHints(max_attempts=2, initial_backoff_ms=1_000)
        dead = await dispatcher.run("demo.fail", dying, retry=twice, wait_s=60)
        await eventually(lambda: _depth(fabric, dead_queue), what="the dead letter in its queue")

        # When a person logs in to the console
        await _log_in(page, fabric)

        # Then the connections page names each daemon and what it serves
        await page.goto(f"{fabric.endpoint.management_url}/#/connections")

        async def named() -> bool:
            await page.reload()
            await page.wait_for_selector("#main table", timeout=10_000)
            text = await _text(page)
            return f"worker {worker_id} (demo.echo, demo.sleep, demo.fail)" in text

        await eventually(named, timeout_s=STATS_WAIT_S, interval_s=2, what="named connections")
        text = await _text(page)
        assert "dispatcher console-dispatcher" in text
        await page.screenshot(path=str(shots / "console-connections.png"))

        # and the queues page shows the fabric's queues under its policies, and whose the
        # reply queue is
        await page.goto(f"{fabric.endpoint.management_url}/#/queues")

        async def with_policies() -> bool:
            await page.reload()
            await page.wait_for_selector("input#queues-name", timeout=10_000)
            # a regex: a long test session leaves more wayang.* queues (executors' own,
            # replies) than the console's first page holds
            regex_mode = page.locator("input#queues-filter-regex-mode")
            if not await regex_mode.is_checked():
                await regex_mode.check()
                await page.wait_for_selector("input#queues-name", timeout=10_000)
            await page.fill("input#queues-name", r"^wayang\.(task|dead)\.demo|console-dispatcher")
            await page.keyboard.press("Enter")
            await page.wait_for_timeout(500)
            text = await _text(page)
            # (a quorum queue's policy and counts show once its first stats arrive)
            return "wayang.defaults" in text and "wayang.dead-queues" in text

        await eventually(with_policies, timeout_s=STATS_WAIT_S, interval_s=2, what="policies")
        await page.screenshot(path=str(shots / "console-queues.png"), full_page=True)
        text = await _text(page)
        assert "wayang.task.demo.echo" in text and dead_queue in text
        assert "wayang.reply.console-dispatcher" in text

        # and the dead letter says why, in headers a person can read, with its input
        # previewed and the secret masked, and no retry hop's x-death
        queue_path = f"#/queues/%2F/{dead_queue}"
        await page.goto(f"{fabric.endpoint.management_url}/{queue_path}")
        # the page's own refresh every 5 s would clear the message shown
        await page.select_option("select#update-every", label="Do not refresh")
        await page.wait_for_selector("text=Get messages", timeout=10_000)
        await page.click("text=Get messages")
        get = page.locator("input[type=submit][value='Get Message(s)']")
        await get.click()
        await page.wait_for_selector("text=wayang-error-code", timeout=10_000)
        # (the picture: the message as the console shows it, below the button)
        # (a viewport as tall as the page, cut to the message: the console's fixed header
        # breaks scrolled shots)
        await page.set_viewport_size({"width": 1440, "height": 3000})
        await page.wait_for_timeout(500)
        top = await page.locator("text=Message 1").first.bounding_box()
        bottom = await page.locator("th", has_text="wayang-task-attempt").first.bounding_box()
        assert top is not None and bottom is not None
        clip = {"x": 0, "y": top["y"] - 10, "width": 1440, "height": bottom["y"] - top["y"] + 60}
        await page.screenshot(path=str(shots / "console-dead-letter.png"), clip=clip)
        text = await _text(page)
        assert "retries_exhausted" in text
        assert "wayang-input-preview" in text and "ACME" in text
        assert SECRET_VALUE not in text
        assert "x-death" not in text
        assert "wayang-retry-history" in text
        assert dead.error is not None and dead.task_id in text
