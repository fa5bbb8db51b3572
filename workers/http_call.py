"""``http.call``: one HTTP request to an outside API, with bounded retries, redirects checked
hop by hop, and the worker operator's rules on where it may connect (:mod:`.http_guard`).

Run it with ``wayang-mq worker wayang_workers.http_call:HttpCall --config worker.toml``; its
contract (input, output, settings, error reasons) is docs/executors.md, ``http.call``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

import aiohttp
import tenacity
from aiohttp.resolver import ThreadedResolver
from pydantic import BaseModel, ConfigDict, Field
from yarl import URL

from wayang_mq import ErrorCode, Executor, ExecutorError, Task, current
from wayang_mq.core import logs
from wayang_mq.core.model import JsonLike
from wayang_mq.runtime.context import TaskContext
from wayang_mq.runtime.settings import parse_input

from .http_guard import (
    DestinationRefused,
    Guard,
    GuardedResolver,
    host_of,
    is_canonical_ipv4,
    literal_address,
)
from .http_request import REDIRECTS, UNSAFE_METHODS, HttpCallInput, Request
from .http_response import Response, read_response

log = logging.getLogger(__name__)

#: statuses worth another try: the server or a gateway says "not now"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: statuses whose Retry-After is honoured (RFC 9110 §10.2.3, RFC 6585 §4)
RETRY_AFTER_STATUSES = frozenset({429, 503})
MIB = 1024 * 1024


class HttpCallSettings(BaseModel):
    """``[http.call]`` in the worker's ``--config`` file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_hosts: tuple[str, ...] = ()  # fnmatch patterns; empty: any public host
    deny_hosts: tuple[str, ...] = ()  # fnmatch patterns; win over allow_hosts
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_ports: tuple[Annotated[int, Field(ge=1, le=65535)], ...] = ()  # empty: any
    default_timeout_s: float = Field(default=30.0, gt=0)
    max_timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=20)
    backoff_s: float = Field(default=0.2, ge=0)  # the first retry's wait, doubling, jittered
    max_backoff_s: float = Field(default=5.0, ge=0)
    max_retry_after_s: float = Field(default=30.0, ge=0)
    max_redirects: int = Field(default=5, ge=0, le=50)
    max_response_bytes: int = Field(default=MIB, ge=0)
    fail_on_status: bool = False
    max_connections: int = Field(default=100, ge=1)
    user_agent: str = Field(default="wayang-mq http.call", pattern=r"^[\x20-\x7e]*$")

    def guard(self) -> Guard:
        """The SSRF rules these settings hold."""
        return Guard(self.allow_hosts, self.deny_hosts, self.allow_networks, self.allow_ports)


@dataclass(frozen=True)
class Policy:
    """How one task's call runs: the input's choices within the settings' bounds."""

    timeout_s: float
    retries: int
    follow_redirects: bool
    fail_on_status: bool
    may_repeat: bool  # retrying cannot repeat a side effect (or the task accepts it)

    @classmethod
    def of(cls, call: HttpCallInput, settings: HttpCallSettings) -> Policy:
        """The call's policy; a bound exceeded is ``invalid_task`` naming the field."""
        default_s = min(settings.default_timeout_s, settings.max_timeout_s)
        timeout_s = call.timeout_s if call.timeout_s is not None else default_s
        if timeout_s > settings.max_timeout_s:
            raise _invalid(f"input.timeout_s: at most {settings.max_timeout_s:g} (max_timeout_s)")
        retries = call.retries if call.retries is not None else settings.max_retries
        if retries > settings.max_retries:
            raise _invalid(f"input.retries: at most {settings.max_retries} (max_retries)")
        keyed = any(name.lower() == "idempotency-key" for name in call.headers)
        may_repeat = call.method not in UNSAFE_METHODS or call.retry_unsafe or keyed
        return cls(
            timeout_s=timeout_s,
            retries=retries,
            follow_redirects=call.follow_redirects,
            fail_on_status=(
                call.fail_on_status if call.fail_on_status is not None else settings.fail_on_status
            ),
            may_repeat=may_repeat,
        )

    def transient_error(self, exc: BaseException) -> bool:
        """Retry a connection that failed; one that never connected even for POST (nothing
        was sent). A timeout is not retried here: the fabric's retry policy decides."""
        if isinstance(exc, TimeoutError | aiohttp.ClientSSLError):
            return False
        if isinstance(exc, aiohttp.ClientConnectorError):
            return True
        return self.may_repeat and isinstance(exc, aiohttp.ClientConnectionError)

    def transient_response(self, response: Response) -> bool:
        """Retry 429, 502, 503, 504 (POST and PATCH only when the task says it is safe)."""
        return response.status in RETRY_STATUSES and self.may_repeat


@dataclass
class Tally:
    """Requests sent for one task, over every hop and retry."""

    attempts: int = 0
    hop_attempt: int = 0


class RetryAfterTooLong(Exception):
    """The server asked for a longer wait than the worker holds a slot for."""

    def __init__(self, response: Response, wait_s: float) -> None:
        super().__init__(f"Retry-After {wait_s:g}s")
        self.response = response
        self.wait_s = wait_s


class HttpCall(Executor):
    """``http.call``: sends the task's HTTP request and returns the response."""

    serves = ("http.call",)
    settings_model = HttpCallSettings

    def __init__(self, settings: HttpCallSettings | None = None) -> None:
        self.settings = settings or HttpCallSettings()
        self._guard = self.settings.guard()
        self._session: aiohttp.ClientSession | None = None
        # backoff_s, 2x, 4x ... up to max_backoff_s, plus up to backoff_s of jitter
        self._backoff = tenacity.wait_exponential_jitter(
            multiplier=self.settings.backoff_s,
            max=self.settings.max_backoff_s,
            jitter=self.settings.backoff_s,
        )

    async def setup(self) -> None:
        """One session for every task: the guarded resolver, no cookie jar (tasks must not
        share cookies), no proxy from the environment (it would bypass the guard)."""
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self._guard, ThreadedResolver()),
            limit=self.settings.max_connections,
            use_dns_cache=False,  # every connection goes through the guarded resolver
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),  # each attempt has its own timeout
            auto_decompress=True,
        )

    async def teardown(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def execute(self, task: Task) -> JsonLike:
        """Send the request, follow redirects, retry what may be retried, return the
        response (an error status too, unless ``fail_on_status``)."""
        call = parse_input(HttpCallInput, task.input)
        policy = Policy.of(call, self.settings)
        request = Request.of(call, self.settings.user_agent)
        started = time.monotonic()
        tally = Tally()
        try:
            response = await self._follow(request, policy, tally)
        except DestinationRefused as refused:
            raise refused.error() from None
        except RetryAfterTooLong as exc:
            raise _too_long(exc, tally) from None
        body, encoding = response.decoded()
        output: dict[str, JsonLike] = {
            "status": response.status,
            "headers": dict(response.headers_map()),
            "body": body,
            "body_encoding": encoding,
            "truncated": response.truncated,
            "bytes": len(response.body),
            "url": str(response.url),
            "attempts": tally.attempts,
            "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
        }
        if policy.fail_on_status and response.status >= 400:
            raise _status_error(response, body if encoding != "base64" else "", tally)
        return output

    async def _follow(self, request: Request, policy: Policy, tally: Tally) -> Response:
        """Send ``request`` and each redirect it leads to, checking every hop's URL."""
        for hop in range(self.settings.max_redirects + 1):
            self._check(request.url)
            response = await self._send(request, policy, tally)
            location = response.headers.get("Location")
            if not policy.follow_redirects or response.status not in REDIRECTS or not location:
                return response
            if hop == self.settings.max_redirects:
                break
            request = request.redirected(response.status, _location(location, request))
        raise ExecutorError(
            f"more than {self.settings.max_redirects} redirects (max_redirects), last to "
            f"{request.where()}",
            retryable=False,
            details={"reason": "too_many_redirects", "max_redirects": self.settings.max_redirects},
        )

    def _check(self, url: URL) -> None:
        """The guard's URL check; a legacy numeric host it allows is still refused by aiohttp,
        so say so plainly."""
        self._guard.check_url(url)
        host = host_of(url)
        if ":" not in host and literal_address(host) is not None and not is_canonical_ipv4(host):
            raise _invalid(f"input.url: write the host {host} as a dotted IPv4 address")

    async def _send(self, request: Request, policy: Policy, tally: Tally) -> Response:
        """One hop: attempts until a response that is not worth retrying, or the bound."""
        tally.hop_attempt = 0

        def wait(state: tenacity.RetryCallState) -> float:
            # Only called when another attempt follows: a Retry-After longer than the worker
            # may hold the slot for ends the call here, and the fabric's retry tiers wait.
            outcome = state.outcome
            if outcome is not None and not outcome.failed:
                response: Response = outcome.result()
                after = response.retry_after_s
                if after is not None and response.status in RETRY_AFTER_STATUSES:
                    if after > self.settings.max_retry_after_s:
                        raise RetryAfterTooLong(response, after)
                    return after
            waited: float = self._backoff(state)
            return waited

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(policy.retries + 1),
            wait=wait,
            retry=(
                tenacity.retry_if_exception(policy.transient_error)
                | tenacity.retry_if_result(policy.transient_response)
            ),
            retry_error_callback=_last_outcome,
            reraise=True,
        )
        try:
            response: Response = await retrying(self._attempt, request, policy, tally)
        except TimeoutError:
            raise ExecutorError(
                f"{request.method} {request.where()} timed out after {policy.timeout_s:g}s",
                code=ErrorCode.TIMEOUT,
                retryable=True,
                details={"reason": "timeout", "timeout_s": policy.timeout_s},
            ) from None
        except aiohttp.InvalidURL:
            raise _invalid("input.url: aiohttp cannot request this URL") from None
        except aiohttp.ClientError as exc:
            raise _client_error(request, exc, tally) from None
        return response

    async def _attempt(self, request: Request, policy: Policy, tally: Tally) -> Response:
        """One request, read to the body cap within the attempt's timeout."""
        assert self._session is not None, "setup() opens the session"
        tally.attempts += 1
        tally.hop_attempt += 1
        ctx = current()
        ctx.report_usage(http_requests=1)
        line = f"{request.method} {request.where()}"
        try:
            async with (
                asyncio.timeout(policy.timeout_s),
                self._session.request(
                    request.method,
                    request.url,
                    headers=request.revealed(),
                    data=request.body,
                    allow_redirects=False,
                ) as raw,
            ):
                response = await read_response(raw, self.settings.max_response_bytes)
        except TimeoutError:
            _logged(ctx, f"{line} -> timed out (attempt {tally.hop_attempt})", request)
            raise
        except aiohttp.ClientError as exc:
            what = type(exc).__name__
            _logged(ctx, f"{line} -> {what} (attempt {tally.hop_attempt})", request)
            raise
        _logged(ctx, f"{line} -> {response.status} (attempt {tally.hop_attempt})", request)
        return response


def _last_outcome(state: tenacity.RetryCallState) -> Any:
    """When the attempts are spent: the last response, or the last error raised again."""
    assert state.outcome is not None
    return state.outcome.result()


def _location(value: str, request: Request) -> URL:
    try:
        return URL(value)
    except (ValueError, TypeError):
        raise ExecutorError(
            f"{request.where()} redirected to a Location that is not a URL",
            retryable=False,
            details={"reason": "bad_redirect"},
        ) from None


def _logged(ctx: TaskContext, line: str, request: Request) -> None:
    """A line for the result's logs and the worker's log; never a header's value."""
    ctx.log(line)
    logs.event(log, "http.attempt", logging.DEBUG, method=request.method, line=line)


def _invalid(message: str) -> ExecutorError:
    return ExecutorError(message, code=ErrorCode.INVALID_TASK, retryable=False)


def _client_error(request: Request, exc: aiohttp.ClientError, tally: Tally) -> ExecutorError:
    """A failure aiohttp raised, after the retries: TLS (not retryable), connection, or a
    response that broke the protocol."""
    where = f"{request.method} {request.where()}"
    if isinstance(exc, aiohttp.ClientSSLError):
        reason, retryable = "tls_error", False
    elif isinstance(exc, aiohttp.ClientConnectionError):
        reason, retryable = "connection_failed", True
    else:
        reason, retryable = "bad_response", True
    return ExecutorError(
        f"{where} failed after {tally.hop_attempt} attempt(s): {type(exc).__name__}: {exc}",
        retryable=retryable,
        details={"reason": reason, "attempts": tally.attempts},
    )


def _too_long(exc: RetryAfterTooLong, tally: Tally) -> ExecutorError:
    status = exc.response.status
    return ExecutorError(
        f"{exc.response.url.with_query(None)} answered {status} asking to retry after "
        f"{exc.wait_s:g}s, longer than this worker waits (max_retry_after_s): the fabric's "
        "retry policy may try later",
        retryable=True,
        retry_after_s=exc.wait_s,
        details={"reason": "retry_after_too_long", "status": status, "attempts": tally.attempts},
    )


def _status_error(response: Response, body: JsonLike, tally: Tally) -> ExecutorError:
    status = response.status
    preview = body if isinstance(body, str) else json.dumps(body)
    return ExecutorError(
        f"{response.url.with_query(None)} answered {status} (fail_on_status)",
        retryable=status >= 500 or status in (408, 429),
        retry_after_s=response.retry_after_s,
        details={
            "reason": "http_status",
            "status": status,
            "attempts": tally.attempts,
            "body_preview": preview[:500],
        },
    )
