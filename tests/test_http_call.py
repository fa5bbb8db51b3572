"""``http.call`` through a real broker against a local HTTP server: responses as output,
retries (503, 429 with Retry-After), timeouts, the body cap, secret headers, redirects, and
the SSRF guard refusing loopback, private and metadata addresses unless allowed."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from wayang_workers.http_call import HttpCall, HttpCallSettings

from wayang_mq import ErrorCode, Status
from wayang_mq.core.model import JsonLike, Result
from wayang_mq.runtime.executor import load_executor
from wayang_mq.runtime.settings import WorkerFile
from wayang_mq.security.providers import MappingProvider
from wayang_mq.testing.harness import Fabric

CAPABILITY = "http.call"
WAIT_S = 30
EXAMPLES = Path(__file__).resolve().parent.parent / "workers" / "examples"
LOOPBACK_ONLY: dict[str, Any] = {"allow_networks": ["127.0.0.1/32"]}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Hit:
    """One request the server received."""

    path: str
    headers: dict[str, str]
    at: float  # time.monotonic()


@dataclass
class Server:
    """A local HTTP server whose handlers play an API's parts; it records every request.
    Each test uses paths with a key of its own: the server counts requests per path."""

    port: int = 0
    hits: list[Hit] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def seen(self, path: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.path == path]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.record])
        app.router.add_get("/json/{key}", self.json_body)
        app.router.add_get("/text/{key}", self.text_body)
        app.router.add_get("/binary/{key}", self.binary_body)
        app.router.add_route("*", "/flaky/{key}", self.flaky)
        app.router.add_get("/throttled/{after}/{key}", self.throttled)
        app.router.add_get("/slow/{key}", self.slow)
        app.router.add_get("/big/{key}", self.big)
        app.router.add_get("/missing/{key}", self.missing)
        app.router.add_get("/redirect/{key}", self.redirect)
        app.router.add_get("/authed/{key}", self.authed)
        return app

    @web.middleware
    async def record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits.append(Hit(request.path, dict(request.headers), time.monotonic()))
        return await handler(request)

    async def json_body(self, request: web.Request) -> web.Response:
        return web.json_response({"hello": "world", "n": [1, 2]})

    async def text_body(self, request: web.Request) -> web.Response:
        return web.Response(text="plain ünïcode")

    async def binary_body(self, request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)), content_type="application/octet-stream")

    async def flaky(self, request: web.Request) -> web.Response:
        """503 the first time, then 200."""
        if len(self.seen(request.path)) == 1:
            return web.Response(status=503, text="busy")
        return web.json_response({"ok": True})

    async def throttled(self, request: web.Request) -> web.Response:
        """429 with Retry-After (seconds in the path) the first time, then 200."""
        if len(self.seen(request.path)) == 1:
            headers = {"Retry-After": request.match_info["after"]}
            return web.Response(status=429, headers=headers, text="slow down")
        return web.json_response({"ok": True})

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(text="late")

    async def big(self, request: web.Request) -> web.Response:
        return web.json_response({"blob": "x" * 5000})

    async def missing(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "no such thing"}, status=404)

    async def redirect(self, request: web.Request) -> web.Response:
        """302 to the ``to`` query parameter."""
        raise web.HTTPFound(request.query["to"])

    async def authed(self, request: web.Request) -> web.Response:
        """Answers whether an Authorization header came, never its value."""
        return web.json_response({"authorized": "Authorization" in request.headers})


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[Server]:
    """The local API on 127.0.0.1, on a free port."""
    state = Server()
    runner = web.AppRunner(state.app(), shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


def key() -> str:
    return secrets.token_hex(4)


def settings(**values: Any) -> HttpCallSettings:
    return HttpCallSettings.model_validate(values)


async def run(
    fabric: Fabric,
    executor: HttpCall,
    task_input: dict[str, JsonLike],
    **worker: Any,
) -> Result:
    """One task through the broker to an in-process worker running ``executor``."""
    await fabric.purge(CAPABILITY)
    async with fabric.worker([executor], **worker), fabric.dispatcher() as dispatcher:
        return await dispatcher.run(CAPABILITY, task_input, wait_s=WAIT_S)


def output_of(result: Result) -> dict[str, Any]:
    assert result.status is Status.SUCCESS, result.error
    assert isinstance(result.output, dict)
    return result.output


def refusal_of(result: Result) -> tuple[str, dict[str, Any]]:
    assert result.status is Status.FAILED and result.error is not None, result
    assert result.error.code == ErrorCode.EXECUTOR_ERROR and not result.error.retryable
    assert result.error.details["reason"] == "destination_refused", result.error
    return result.error.message, result.error.details


# -- responses as output ------------------------------------------------------------------


async def test_a_json_response_is_returned_decoded(fabric: Fabric, server: Server) -> None:
    path = f"/json/{key()}"
    result = await run(fabric, HttpCall(settings(**LOOPBACK_ONLY)), {"url": server.url(path)})
    output = output_of(result)
    assert output["status"] == 200
    assert output["body"] == {"hello": "world", "n": [1, 2]}
    assert output["body_encoding"] == "json" and output["truncated"] is False
    assert output["headers"]["content-type"].startswith("application/json")
    assert output["url"] == server.url(path) and output["attempts"] == 1
    assert output["bytes"] == len(json.dumps({"hello": "world", "n": [1, 2]}))
    assert result.metrics["units.http_requests"] == 1
    assert result.logs == (f"GET {server.url(path)} -> 200 (attempt 1)",)


async def test_text_and_binary_bodies_say_how_they_are_encoded(
    fabric: Fabric, server: Server
) -> None:
    text_path, binary_path = f"/text/{key()}", f"/binary/{key()}"
    executor = HttpCall(settings(**LOOPBACK_ONLY))
    await fabric.purge(CAPABILITY)
    async with fabric.worker([executor]), fabric.dispatcher() as dispatcher:
        text = await dispatcher.run(
            CAPABILITY,
            {"url": server.url(text_path), "query": {"q": ["a b", 2], "on": True}},
            wait_s=WAIT_S,
        )
        binary = await dispatcher.run(CAPABILITY, {"url": server.url(binary_path)}, wait_s=WAIT_S)
    assert output_of(text)["body"] == "plain ünïcode"
    assert output_of(text)["body_encoding"] == "text"
    assert output_of(text)["url"] == server.url(text_path) + "?q=a+b&q=2&on=true"
    assert output_of(binary)["body_encoding"] == "base64"
    assert output_of(binary)["bytes"] == 256


async def test_an_error_status_is_output_unless_fail_on_status(
    fabric: Fabric, server: Server
) -> None:
    path = f"/missing/{key()}"
    executor = HttpCall(settings(**LOOPBACK_ONLY))
    await fabric.purge(CAPABILITY)
    async with fabric.worker([executor]), fabric.dispatcher() as dispatcher:
        plain = await dispatcher.run(CAPABILITY, {"url": server.url(path)}, wait_s=WAIT_S)
        failing = await dispatcher.run(
            CAPABILITY, {"url": server.url(path), "fail_on_status": True}, wait_s=WAIT_S
        )
    assert output_of(plain)["status"] == 404
    assert output_of(plain)["body"] == {"error": "no such thing"}
    assert failing.status is Status.FAILED and failing.error is not None
    assert failing.error.code == ErrorCode.EXECUTOR_ERROR and not failing.error.retryable
    assert failing.error.details["reason"] == "http_status"
    assert failing.error.details["status"] == 404


# -- retries and timeouts -------------------------------------------------------------------


async def test_a_503_is_retried_and_the_second_attempt_answers(
    fabric: Fabric, server: Server
) -> None:
    path = f"/flaky/{key()}"
    result = await run(fabric, HttpCall(settings(**LOOPBACK_ONLY)), {"url": server.url(path)})
    output = output_of(result)
    assert output["status"] == 200 and output["attempts"] == 2
    assert len(server.seen(path)) == 2
    assert result.metrics["units.http_requests"] == 2
    assert result.logs == (
        f"GET {server.url(path)} -> 503 (attempt 1)",
        f"GET {server.url(path)} -> 200 (attempt 2)",
    )


async def test_a_post_is_retried_only_when_the_task_says_it_is_safe(
    fabric: Fabric, server: Server
) -> None:
    once, safe, keyed = f"/flaky/{key()}", f"/flaky/{key()}", f"/flaky/{key()}"
    executor = HttpCall(settings(**LOOPBACK_ONLY))
    await fabric.purge(CAPABILITY)
    async with fabric.worker([executor]), fabric.dispatcher() as dispatcher:
        plain = await dispatcher.run(
            CAPABILITY, {"method": "POST", "url": server.url(once), "json": {"a": 1}}, wait_s=WAIT_S
        )
        flagged = await dispatcher.run(
            CAPABILITY,
            {"method": "POST", "url": server.url(safe), "retry_unsafe": True},
            wait_s=WAIT_S,
        )
        with_key = await dispatcher.run(
            CAPABILITY,
            {"method": "POST", "url": server.url(keyed), "headers": {"Idempotency-Key": "k-1"}},
            wait_s=WAIT_S,
        )
    assert output_of(plain)["status"] == 503 and output_of(plain)["attempts"] == 1
    assert output_of(flagged)["status"] == 200 and output_of(flagged)["attempts"] == 2
    assert output_of(with_key)["status"] == 200 and output_of(with_key)["attempts"] == 2


async def test_a_429_waits_its_retry_after(fabric: Fabric, server: Server) -> None:
    path = f"/throttled/1/{key()}"
    result = await run(fabric, HttpCall(settings(**LOOPBACK_ONLY)), {"url": server.url(path)})
    assert output_of(result)["status"] == 200 and output_of(result)["attempts"] == 2
    first, second = server.seen(path)
    assert second.at - first.at >= 0.95  # Retry-After: 1, not the 0.2 s backoff


async def test_a_retry_after_longer_than_the_worker_waits_fails_retryable_at_once(
    fabric: Fabric, server: Server
) -> None:
    path = f"/throttled/120/{key()}"
    result = await run(fabric, HttpCall(settings(**LOOPBACK_ONLY)), {"url": server.url(path)})
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code == ErrorCode.EXECUTOR_ERROR and result.error.retryable
    assert result.error.details["reason"] == "retry_after_too_long"
    assert result.error.retry_after_ms == 120_000
    assert len(server.seen(path)) == 1


async def test_a_slow_server_fails_the_task_timeout(fabric: Fabric, server: Server) -> None:
    path = f"/slow/{key()}"
    task = {"url": server.url(path), "timeout_s": 0.5}
    result = await run(fabric, HttpCall(settings(**LOOPBACK_ONLY)), task)
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code == ErrorCode.TIMEOUT and result.error.retryable
    assert result.error.details["reason"] == "timeout"
    assert len(server.seen(path)) == 1  # a timeout is left to the fabric's retry policy


async def test_a_refused_connection_is_retried_then_fails_connection_failed(
    fabric: Fabric, server: Server
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task: dict[str, JsonLike] = {"url": f"http://127.0.0.1:{port}/", "retries": 1}
    result = await run(fabric, HttpCall(settings(**LOOPBACK_ONLY)), task)
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code == ErrorCode.EXECUTOR_ERROR and result.error.retryable
    assert result.error.details == {"reason": "connection_failed", "attempts": 2}
    assert len(result.logs) == 2 and "(attempt 2)" in result.logs[1]


async def test_a_body_past_the_cap_is_cut_and_flagged(fabric: Fabric, server: Server) -> None:
    path = f"/big/{key()}"
    executor = HttpCall(settings(max_response_bytes=1000, **LOOPBACK_ONLY))
    output = output_of(await run(fabric, executor, {"url": server.url(path)}))
    assert output["truncated"] is True and output["bytes"] == 1000
    assert output["body_encoding"] == "text"  # JSON is not parsed when cut
    assert output["body"].startswith('{"blob": "xxx') and len(output["body"]) == 1000


# -- secrets and bad input --------------------------------------------------------------------


async def test_a_secret_header_reaches_the_server_but_not_the_result_or_logs(
    fabric: Fabric, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    token = "Bearer tok-" + secrets.token_hex(16)
    path = f"/authed/{key()}"
    task: dict[str, JsonLike] = {
        "url": server.url(path),
        "headers": {"Authorization": {"$secret": "api-token"}, "X-Plain": "visible"},
    }
    caplog.set_level(logging.DEBUG)
    provider = MappingProvider({"api-token": token})
    result = await run(fabric, HttpCall(settings(**LOOPBACK_ONLY)), task, secrets=provider)
    # the server saw the value
    (hit,) = server.seen(path)
    assert hit.headers["Authorization"] == token and hit.headers["X-Plain"] == "visible"
    # the result and every log line did not, nor any header's value
    assert output_of(result)["body"] == {"authorized": True}
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("wayang")]
    assert any("event=http.attempt" in line for line in ours)
    shown = json.dumps([result.output, list(result.logs), ours])
    assert token not in shown and "tok-" not in shown and "visible" not in shown


async def test_a_redirect_to_another_host_drops_the_secret_header(
    fabric: Fabric, server: Server
) -> None:
    target = server.url(f"/authed/{key()}", host="localhost")
    path = f"/redirect/{key()}"
    task: dict[str, JsonLike] = {
        "url": server.url(path),
        "query": {"to": target},
        "headers": {"Authorization": {"$secret": "api-token"}},
    }
    provider = MappingProvider({"api-token": "Bearer tok-" + secrets.token_hex(16)})
    executor = HttpCall(settings(allow_networks=["127.0.0.1/32", "::1/128"]))
    output = output_of(await run(fabric, executor, task, secrets=provider))
    assert output["url"] == target and output["attempts"] == 2
    assert output["body"] == {"authorized": False}


async def test_bad_input_is_invalid_task_naming_the_fields(fabric: Fabric, server: Server) -> None:
    task: dict[str, JsonLike] = {
        "url": "ftp://files.example.com/x",
        "method": "FETCH",
        "json": {"a": 1},
        "body": "also",
    }
    result = await run(fabric, HttpCall(settings(**LOOPBACK_ONLY)), task)
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code == ErrorCode.INVALID_TASK and not result.error.retryable
    assert "input.url" in result.error.message and "input.method" in result.error.message


async def test_a_timeout_past_the_workers_bound_is_invalid_task(
    fabric: Fabric, server: Server
) -> None:
    task: dict[str, JsonLike] = {"url": server.url(f"/json/{key()}"), "timeout_s": 999}
    result = await run(fabric, HttpCall(settings(max_timeout_s=10, **LOOPBACK_ONLY)), task)
    assert result.error is not None and result.error.code == ErrorCode.INVALID_TASK
    assert "input.timeout_s" in result.error.message and "max_timeout_s" in result.error.message


# -- the SSRF guard -------------------------------------------------------------------------


async def test_loopback_is_refused_by_default_as_address_name_or_decimal(
    fabric: Fabric, server: Server
) -> None:
    # Given a worker with default settings (no allow_networks)
    path = f"/json/{key()}"
    urls = {
        "127.0.0.1": server.url(path),
        "localhost": server.url(path, host="localhost"),  # a name resolving to loopback
        "2130706433": server.url(path, host="2130706433"),  # 127.0.0.1 as one number
    }
    await fabric.purge(CAPABILITY)
    async with fabric.worker([HttpCall()]), fabric.dispatcher() as dispatcher:
        results = {
            host: await dispatcher.run(CAPABILITY, {"url": url}, wait_s=WAIT_S)
            for host, url in urls.items()
        }
    # Then each is refused, naming the host and why, and the server saw nothing
    for host, result in results.items():
        message, details = refusal_of(result)
        assert details["host"] == host
        assert "loopback" in message and "allow_networks" in message
    assert server.seen(path) == []


async def test_a_redirect_to_a_private_address_is_refused_before_connecting(
    fabric: Fabric, server: Server
) -> None:
    # Given a first hop the worker may reach (127.0.0.1 is in allow_networks)
    targets = {
        "169.254.169.254": "http://169.254.169.254/latest/meta-data/",
        "10.0.0.1": "http://10.0.0.1/",
        "::1": f"http://[::1]:{server.port}/json/x",
    }
    await fabric.purge(CAPABILITY)
    executor = HttpCall(settings(**LOOPBACK_ONLY))
    async with fabric.worker([executor]), fabric.dispatcher() as dispatcher:
        for host, target in targets.items():
            path = f"/redirect/{key()}"
            task: dict[str, JsonLike] = {"url": server.url(path), "query": {"to": target}}
            # When it redirects to a private or metadata address
            started = time.monotonic()
            result = await dispatcher.run(CAPABILITY, task, wait_s=WAIT_S)
            # Then the redirect is refused at once (10.0.0.1 would not even answer)
            message, details = refusal_of(result)
            assert details["host"] == host, message
            assert time.monotonic() - started < 5
            assert len(server.seen(path)) == 1


async def test_allow_hosts_and_deny_hosts_are_applied(fabric: Fabric, server: Server) -> None:
    path = f"/json/{key()}"
    executor = HttpCall(
        settings(allow_hosts=["api.example.com"], deny_hosts=["127.*"], **LOOPBACK_ONLY)
    )
    result = await run(fabric, executor, {"url": server.url(path)})
    message, _ = refusal_of(result)
    assert "deny_hosts" in message
    assert server.seen(path) == []


# -- the daemon and the example file -------------------------------------------------------


async def test_the_worker_daemon_runs_http_call_with_its_config_file(
    fabric: Fabric, server: Server, tmp_path: Path
) -> None:
    # Given a worker daemon whose --config allows loopback
    config = tmp_path / "worker.toml"
    config.write_text('[http.call]\nallow_networks = ["127.0.0.1/32"]\nmax_retries = 1\n')
    await fabric.purge(CAPABILITY)
    worker = fabric.spawn_worker(
        ["wayang_workers.http_call:HttpCall"],
        executor_id=f"http-{secrets.token_hex(3)}",
        args=["--config", str(config)],
    )
    path = f"/json/{key()}"
    try:
        await asyncio.to_thread(worker.wait_started)
        async with fabric.dispatcher() as dispatcher:
            result = await dispatcher.run(CAPABILITY, {"url": server.url(path)}, wait_s=WAIT_S)
    finally:
        worker.stop()
    # Then the call went through and answered
    assert output_of(result)["body"] == {"hello": "world", "n": [1, 2]}
    assert len(server.seen(path)) == 1


def test_the_example_settings_file_loads() -> None:
    path = EXAMPLES / "http_call.toml"
    executor = load_executor("wayang_workers.http_call:HttpCall", WorkerFile.read(path))
    assert isinstance(executor, HttpCall)
    assert "api.example.com" in executor.settings.allow_hosts
    assert executor.settings.max_response_bytes == 1024 * 1024
