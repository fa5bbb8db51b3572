"""An OpenAI-compatible chat-completions client: ``POST {base_url}/chat/completions``.

OpenAI, vLLM, Ollama (``/v1``) and llama.cpp's server speak the same request and response:
``model``, ``messages``, ``tools`` (function schemas) and ``tool_choice`` in; ``choices[0]
.message`` (its ``content`` and ``tool_calls``) and ``usage`` out. A 429 or a 5xx is retried
a bounded number of times (``Retry-After`` honoured up to a cap); any other refusal is final.
The API key is sent as a bearer token and never appears in an error, a log line or a result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from wayang_mq.core import logs
from wayang_mq.core.errors import ErrorCode, ExecutorError
from wayang_mq.core.fields import printable

log = logging.getLogger("wayang_workers.agent")

#: the statuses worth asking again: rate limited, or the server's own trouble
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it (it may be malformed)


@dataclass(frozen=True)
class Reply:
    """The model's answer to one request."""

    message: dict[str, Any]  # the assistant message, as it goes back into the conversation
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass
class ChatClient:
    """Talks to one OpenAI-compatible server with one model."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    async def open(self) -> None:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Reply:
        """One chat completion; ``ExecutorError`` (``details.reason`` ``model_unavailable``,
        ``model_refused`` or ``model_bad_response``) when there is none to be had."""
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if tools:
            body["tools"] = tools
            body["tool_choice"] = "auto"
        attempt = 0
        while True:
            attempt += 1
            try:
                status, payload, retry_after = await self._post(body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}"
                if attempt > self.max_retries:
                    raise _unavailable(f"the model server did not answer ({problem})") from None
                await self._wait(attempt, None, problem)
                continue
            if status == 200:
                return parse_reply(payload)
            if status in RETRYABLE_STATUSES:
                if attempt > self.max_retries:
                    raise _unavailable(f"the model server answered HTTP {status}", retry_after)
                await self._wait(attempt, retry_after, f"HTTP {status}")
                continue
            raise ExecutorError(
                f"the model server refused the request (HTTP {status}: "
                f"{_error_text(payload)}): check base_url, model and api_key",
                retryable=False,
                details={"reason": "model_refused", "http_status": status},
            )

    async def _post(self, body: dict[str, Any]) -> tuple[int, Any, float | None]:
        if self._session is None:
            raise RuntimeError("ChatClient.open() was not called")
        url = self.base_url.rstrip("/") + "/chat/completions"
        async with self._session.post(url, json=body) as response:
            text = await response.text()
            try:
                payload: Any = json.loads(text)
            except ValueError:
                payload = text
            return response.status, payload, _retry_after(response.headers.get("Retry-After"))

    async def _wait(self, attempt: int, retry_after: float | None, problem: str) -> None:
        delay = self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        logs.event(log, "agent.model.retry", attempt=attempt, problem=problem, wait_s=delay)
        await asyncio.sleep(delay)


def parse_reply(payload: Any) -> Reply:
    """The first choice of a chat-completions response."""
    try:
        message = payload["choices"][0]["message"]
        if not isinstance(message, dict):
            raise TypeError("message is not an object")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise TypeError("content is not a string")
        calls = []
        for raw in message.get("tool_calls") or ():
            function = raw["function"]
            arguments = function.get("arguments") or "{}"
            if not isinstance(arguments, str):  # some servers send an object
                arguments = json.dumps(arguments)
            calls.append(ToolCall(str(raw["id"]), str(function["name"]), arguments))
        usage = payload.get("usage") or {}
        tokens_in = int(usage.get("prompt_tokens") or 0)
        tokens_out = int(usage.get("completion_tokens") or 0)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ExecutorError(
            f"the model server's answer is not a chat completion ({exc})",
            retryable=True,
            details={"reason": "model_bad_response"},
        ) from None
    kept: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        kept["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    return Reply(kept, content, tuple(calls), max(0, tokens_in), max(0, tokens_out))


def _unavailable(message: str, retry_after: float | None = None) -> ExecutorError:
    return ExecutorError(
        f"{message}; retried, giving up: the fabric may retry the task later",
        retryable=True,
        retry_after_s=retry_after,
        code=ErrorCode.EXECUTOR_ERROR,
        details={"reason": "model_unavailable"},
    )


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _error_text(payload: Any) -> str:
    """The server's own error message, short and printable."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            return printable(str(error.get("message", "")), limit=200)
        if error is not None:
            return printable(str(error), limit=200)
    return printable(str(payload), limit=200)
