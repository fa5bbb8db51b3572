"""A task's HTTP request as ``http.call`` sends it: the validated input (:class:`HttpCallInput`)
and the request it becomes (:class:`Request`), hop by hop through redirects."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, replace
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator
from yarl import URL

from wayang_mq import ErrorCode, ExecutorError
from wayang_mq.security.secrets import Secret

from .http_guard import SCHEMES

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
Scalar = str | int | float | bool

#: methods whose retry could repeat a side effect (RFC 9110 §9.2.2): retried on a status or a
#: broken connection only when the task says the call is idempotent
UNSAFE_METHODS = frozenset({"POST", "PATCH"})
#: headers the client computes (or that would change where or how the request travels)
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
    }
)
#: headers dropped when a redirect leaves the origin (besides every header holding a secret)
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_BODY_HEADERS = ("content-type", "content-encoding", "content-language", "digest")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 §5.1 field name
_BAD_VALUE = re.compile(r"[\r\n\x00]")
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class HttpCallInput(BaseModel):
    """A task's input (docs/executors.md, ``http.call``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    method: Method = "GET"
    url: str = Field(min_length=1, max_length=8192)
    headers: dict[str, str | Secret] = Field(default_factory=dict, max_length=100)
    query: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)
    json_body: JsonValue = Field(default=None, alias="json")
    body: str | None = None
    body_base64: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    retries: int | None = Field(default=None, ge=0)
    follow_redirects: bool = True
    fail_on_status: bool | None = None
    retry_unsafe: bool = False

    @field_validator("url")
    @classmethod
    def _absolute_http_url(cls, value: str) -> str:
        # Messages never echo the URL: its query may carry a token.
        try:
            url = URL(value)
        except (ValueError, TypeError):
            raise ValueError("not a valid URL") from None
        if url.scheme not in SCHEMES:
            raise ValueError("the scheme must be http or https")
        if not url.host:
            raise ValueError("the URL must name a host")
        if url.user is not None or url.password is not None:
            raise ValueError(
                "credentials in the URL (user:password@) are not allowed: send an "
                "Authorization header, with a secret reference as its value"
            )
        return value

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str | Secret]) -> dict[str, str | Secret]:
        for name, item in value.items():
            if not _TOKEN.match(name):
                raise ValueError("a header name must be an RFC 9110 token")
            if name.lower() in FORBIDDEN_HEADERS:
                raise ValueError(f"the {name} header is set by the client, not by a task")
            if isinstance(item, str) and _BAD_VALUE.search(item):
                raise ValueError(f"the {name} header's value holds CR, LF or NUL")
        return value

    @field_validator("body_base64")
    @classmethod
    def _base64(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("not valid base64") from None
        return value

    @model_validator(mode="after")
    def _one_body(self) -> Self:
        present = {
            "json": "json_body" in self.model_fields_set,
            "body": self.body is not None,
            "body_base64": self.body_base64 is not None,
        }
        given = [name for name, is_given in present.items() if is_given]
        if len(given) > 1:
            raise ValueError(f"give at most one of json, body, body_base64 (got {given})")
        return self

    def payload(self) -> tuple[bytes | None, str | None]:
        """The body to send and its default content type, or ``(None, None)``."""
        if "json_body" in self.model_fields_set:
            return json.dumps(self.json_body).encode(), "application/json"
        if self.body is not None:
            return self.body.encode(), "text/plain; charset=utf-8"
        if self.body_base64 is not None:
            return base64.b64decode(self.body_base64), "application/octet-stream"
        return None, None

    def query_pairs(self) -> list[tuple[str, str]]:
        """``query`` as name/value pairs, a list giving one pair per item (``true`` and
        ``false`` for booleans)."""
        pairs = []
        for name, value in self.query.items():
            for item in value if isinstance(value, list) else [value]:
                text = ("true" if item else "false") if isinstance(item, bool) else str(item)
                pairs.append((name, text))
        return pairs


@dataclass(frozen=True)
class Request:
    """One hop's request. Secret header values stay :class:`Secret` until :meth:`revealed`."""

    method: str
    url: URL
    headers: dict[str, str | Secret]
    body: bytes | None

    @classmethod
    def of(cls, call: HttpCallInput, user_agent: str) -> Request:
        """The first request of a call."""
        headers = dict(call.headers)
        if not _has(headers, "user-agent"):
            headers["User-Agent"] = user_agent
        body, content_type = call.payload()
        if content_type is not None and not _has(headers, "content-type"):
            headers["Content-Type"] = content_type
        url = URL(call.url).with_fragment(None)
        if call.query:
            url = url.extend_query(call.query_pairs())
        return cls(call.method, url, headers, body)

    def revealed(self) -> dict[str, str]:
        """The headers with secret values revealed: build the request with them, nothing else."""
        headers = {}
        for name, value in self.headers.items():
            text = value.reveal() if isinstance(value, Secret) else value
            if _BAD_VALUE.search(text):
                raise ExecutorError(
                    f"input.headers.{name}: the secret {value} holds CR, LF or NUL",
                    code=ErrorCode.INVALID_TASK,
                    retryable=False,
                )
            headers[name] = text
        return headers

    def where(self) -> str:
        """The URL for logs: scheme, host, port and path, never the query (it may hold a
        token) nor the fragment."""
        return str(self.url.with_query(None).with_fragment(None))

    def redirected(self, status: int, location: URL) -> Request:
        """The next hop after a redirect to ``location`` (RFC 9110 §15.4): 303 becomes GET
        (HEAD stays HEAD), and so does a POST answered 301 or 302 (what every browser does);
        307 and 308 keep the method and body. Leaving the origin drops the credentials:
        ``Authorization``, ``Proxy-Authorization``, ``Cookie`` and every header whose value is a
        secret."""
        url = self.url.join(location).with_fragment(None)
        request = replace(self, url=url)
        to_get = (status == 303 and self.method != "HEAD") or (
            status in (301, 302) and self.method == "POST"
        )
        if to_get:
            headers: dict[str, str | Secret] = {
                k: v for k, v in self.headers.items() if k.lower() not in _BODY_HEADERS
            }
            request = replace(request, method="GET", body=None, headers=headers)
        if _origin(url) != _origin(self.url):
            kept: dict[str, str | Secret] = {
                name: value
                for name, value in request.headers.items()
                if name.lower() not in CREDENTIAL_HEADERS and not isinstance(value, Secret)
            }
            request = replace(request, headers=kept)
        return request


def _has(headers: dict[str, str | Secret], name: str) -> bool:
    return any(key.lower() == name for key in headers)


def _origin(url: URL) -> tuple[str, str, int | None]:
    return url.scheme, (url.host or "").rstrip(".").lower(), url.port
