"""A daemon's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``, and the health JSON.

Plain asyncio, HTTP/1.0, one request per connection: enough for Prometheus and probes, and
no web framework in a daemon. The request is hostile input: its head is read up to
:data:`MAX_HEAD_BYTES` within :data:`READ_TIMEOUT_S`, only its first line is looked at, and
anything unreadable gets the health JSON, as every path did before these routes existed.

- ``GET /metrics``: the daemon's registry in Prometheus' text format (404 when metrics are
  off);
- ``GET /healthz``: liveness, 200 while the event loop answers and the daemon is not stopped
  (draining is alive);
- ``GET /readyz``: readiness, 200 only when every check holds (connected, consuming, and the
  daemon's own: the control plane's database), else 503; the body names each check;
- any other path: the health JSON, 200 while consuming on a live connection, 503 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol

from wayang_mq.observability.health import Health

if TYPE_CHECKING:  # a daemon without metrics never loads the client
    from prometheus_client import CollectorRegistry

#: a request head larger than this is not read further (the health JSON is answered)
MAX_HEAD_BYTES = 8 * 1024
#: a client that has not sent its request head by then gets the health JSON
READ_TIMEOUT_S = 5.0

_JSON = b"application/json"
_STATUS = {200: b"200 OK", 404: b"404 Not Found", 503: b"503 Service Unavailable"}


class Probed(Protocol):
    """What the endpoint asks of a daemon."""

    @property
    def registry(self) -> CollectorRegistry | None: ...

    def health(self) -> Health: ...

    def alive(self) -> bool: ...

    async def readiness(self) -> Mapping[str, bool]: ...


async def serve(daemon: Probed, host: str, port: int) -> asyncio.Server:
    """Listen on ``host:port`` (0: any free port) and answer each request."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            path = await _path(reader)
            status, content_type, body = await respond(daemon, path)
            writer.write(
                b"HTTP/1.0 " + _STATUS[status] + b"\r\nContent-Type: " + content_type + b"\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port, limit=MAX_HEAD_BYTES)


async def respond(daemon: Probed, path: str) -> tuple[int, bytes, bytes]:
    """Status, content type and body for a GET of ``path``."""
    if path == "/metrics":
        registry = daemon.registry
        if registry is None:
            return 404, b"text/plain", b"metrics are off: start the daemon with --metrics-port\n"
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

        return 200, CONTENT_TYPE_PLAIN_0_0_4.encode(), generate_latest(registry)
    health = daemon.health()
    fields: dict[str, Any] = asdict(health)
    if path == "/healthz":
        ok = daemon.alive()
    elif path == "/readyz":
        checks = dict(await daemon.readiness())
        ok = all(checks.values())
        fields["checks"] = checks
    else:
        ok = health.ok
    return (200 if ok else 503), _JSON, json.dumps(fields | {"ok": ok}).encode()


async def _path(reader: asyncio.StreamReader) -> str:
    """The request's path, without its query; "" when the head cannot be read in time."""
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    except (
        TimeoutError,
        ConnectionError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
    ):
        return ""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return ""
    return parts[1].split(b"?", 1)[0].decode("ascii", "replace")
