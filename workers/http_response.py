"""What ``http.call`` keeps of a response: its body read up to a cap, decoded for JSON
output (JSON, text or base64), its headers as a map, its ``Retry-After`` in seconds."""

from __future__ import annotations

import base64
import codecs
import json
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from wayang_mq.core.model import JsonLike

BodyEncoding = Literal["json", "text", "base64"]

#: types that are text whatever their charset says (text/* is too)
_TEXT_TYPES = frozenset(
    {
        "application/xml",
        "application/javascript",
        "application/x-www-form-urlencoded",
        "application/x-ndjson",
        "application/graphql",
        "application/yaml",
        "application/x-yaml",
    }
)
_CHARSET = re.compile(r"""charset\s*=\s*"?([\w.:-]+)"?""", re.IGNORECASE)
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Response:
    """One response as read: status, headers, the body up to the cap."""

    status: int
    url: URL
    headers: CIMultiDictProxy[str]
    body: bytes
    truncated: bool

    @property
    def retry_after_s(self) -> float | None:
        """``Retry-After`` in seconds (delay-seconds or an HTTP date), None when absent or
        unreadable."""
        return retry_after_s(self.headers.get("Retry-After"))

    def headers_map(self) -> dict[str, str]:
        """Headers by lowercase name; a repeated header's values joined with ``, `` (RFC
        9110 §5.3), except ``set-cookie``, whose values are joined with a newline (a cookie
        may hold a comma)."""
        joined: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            joined.setdefault(name.lower(), []).append(value)
        return {
            name: ("\n" if name == "set-cookie" else ", ").join(values)
            for name, values in joined.items()
        }

    def decoded(self) -> tuple[JsonLike, BodyEncoding]:
        """The body as JSON output, and how: see :func:`decode_body`."""
        return decode_body(self.body, self.headers.get("Content-Type"), self.truncated)


async def read_response(response: aiohttp.ClientResponse, limit: int) -> Response:
    """Read ``response``'s body, at most ``limit`` bytes (after decompression: a small gzip
    cannot grow past the cap); a longer body is cut there and the connection closed rather
    than drained."""
    chunks: list[bytes] = []
    size = 0
    truncated = False
    while True:
        chunk = await response.content.read(min(_CHUNK, limit - size + 1))
        if not chunk:
            break
        if size + len(chunk) > limit:
            chunks.append(chunk[: limit - size])
            size = limit
            truncated = True
            response.close()  # the rest is unread: the connection cannot be reused
            break
        chunks.append(chunk)
        size += len(chunk)
    headers = CIMultiDictProxy(CIMultiDict(response.headers))
    return Response(response.status, response.url, headers, b"".join(chunks), truncated)


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` value in seconds from now (never negative)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT; a zone-less one is read the same way
        return None
    return max(0.0, when.timestamp() - time.time())


def decode_body(
    body: bytes, content_type: str | None, truncated: bool
) -> tuple[JsonLike, BodyEncoding]:
    """A body as JSON output:

    - ``json``: the parsed value, for ``application/json`` and ``*/*+json`` bodies that were
      read whole and parse;
    - ``text``: decoded with the declared charset (UTF-8 by default, bad bytes replaced), for
      text types, JSON that is truncated or does not parse, an empty body, and a body without
      a content type that is valid UTF-8;
    - ``base64``: anything else (images, ``application/octet-stream``, ...).
    """
    if not body:
        return "", "text"
    mime, charset = _media_type(content_type)
    is_json = mime == "application/json" or mime.endswith("+json")
    if is_json and not truncated:
        try:
            value: JsonLike = json.loads(body)
        except ValueError:  # includes a UnicodeDecodeError
            pass
        else:
            return value, "json"
    if is_json or mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith("+xml"):
        return body.decode(charset, errors="replace"), "text"
    if not mime:
        try:
            return body.decode("utf-8"), "text"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode("ascii"), "base64"


def _media_type(content_type: str | None) -> tuple[str, str]:
    """``(type/subtype, charset)`` of a Content-Type; an unknown charset is UTF-8."""
    if not content_type:
        return "", "utf-8"
    mime = content_type.split(";", 1)[0].strip().lower()
    found = _CHARSET.search(content_type)
    charset = found.group(1) if found else "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    return mime, charset
