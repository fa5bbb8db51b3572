"""Frames written in one turn of the event loop leave in one ``send``: fewer syscalls here,
fewer TCP segments for the broker to read.

aiormq writes every frame (a publish, an ack) to the socket as it comes: with 16 tasks
finishing at once that is 16 publishes and 16 acks, each its own ``send`` and, with
``TCP_NODELAY``, its own segment, which the broker reads and handles one by one. Profiles of
the worker showed the socket write as its largest single cost. A corked writer gathers what
is written during one turn of the loop and hands it to the transport at the start of the
next one: the order of frames is kept, nothing waits for a timer, and a lone frame leaves
one loop turn later (microseconds).

Nothing about delivery changes: ``drain()`` (which aiormq awaits after a publish or an ack)
has only ever meant "handed to the transport's buffer, not paused", never "sent", and a
process that dies before a write reaches the kernel loses it either way. ``close()`` sends
what is gathered first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL


class CorkedTransportFactory(TransportFactory):
    """aiormq's TCP or TLS transport (by the URL's scheme, at each connect: a failover may
    move to another address), its writer corked."""

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, Any]:
        """Open the connection as aiormq would, then cork its writer."""
        base = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await base.create(url, **kwargs)
        cork(writer)
        return reader, writer


def cork(writer: asyncio.StreamWriter) -> None:
    """Make ``writer.write`` gather its data until the next turn of the loop (see module)."""
    loop = asyncio.get_running_loop()
    gathered: list[bytes] = []
    write, close = writer.write, writer.close

    def flush() -> None:
        if not gathered:
            return
        data = gathered[0] if len(gathered) == 1 else b"".join(gathered)
        gathered.clear()
        if not writer.transport.is_closing():
            write(data)

    def corked_write(data: bytes | bytearray | memoryview) -> None:
        if not gathered:
            loop.call_soon(flush)
        gathered.append(bytes(data))

    def corked_close() -> None:
        flush()
        close()

    # Instance attributes shadow StreamWriter's methods for this writer only.
    writer.write = corked_write  # type: ignore[method-assign]
    writer.close = corked_close  # type: ignore[method-assign]
