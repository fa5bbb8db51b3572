"""The HTTP server ``bench/external.py`` calls: a small JSON body per GET, in a process of its own.

``GET /item/{n}`` answers ``{"id": n, "name": "item-n"}`` (about 30 bytes) and notes when the
request arrived (``time.monotonic`` of this process); ``GET /arrivals`` answers the times
noted since the last ``/arrivals`` and how many client connections they came on, then forgets
them: the bench counts what reached the server per round (and whether connections were
reused), and reads the rate limiter's spacing from the server's side.

Run ``python -m bench.http_target PORT_FILE``: it listens on 127.0.0.1, a free port, and writes
the port into ``PORT_FILE`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

from aiohttp import web

ARRIVALS: web.AppKey[list[float]] = web.AppKey("arrivals", list[float])
PEERS: web.AppKey[set[str]] = web.AppKey("peers", set[str])


async def _item(request: web.Request) -> web.Response:
    request.app[ARRIVALS].append(time.monotonic())
    transport = request.transport  # None only once the connection is gone
    peer = transport.get_extra_info("peername") if transport is not None else None
    request.app[PEERS].add(str(peer))
    n = request.match_info["n"]
    return web.json_response({"id": int(n), "name": f"item-{n}"})


async def _arrivals(request: web.Request) -> web.Response:
    arrivals = request.app[ARRIVALS]
    times = list(arrivals)
    arrivals.clear()
    connections = len(request.app[PEERS])
    request.app[PEERS].clear()
    return web.json_response({"count": len(times), "times": times, "connections": connections})


async def _serve(port_file: Path) -> None:
    app = web.Application()
    app[ARRIVALS] = []
    app[PEERS] = set()
    app.router.add_get(r"/item/{n:\d+}", _item)
    app.router.add_get("/arrivals", _arrivals)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]  # port 0: the one the system picked
    partial = port_file.with_suffix(".tmp")
    partial.write_text(str(port))
    os.replace(partial, port_file)  # whole or absent: the bench never reads half a number
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await runner.cleanup()


def main() -> None:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("port_file", type=Path)
    asyncio.run(_serve(parser.parse_args().port_file))


if __name__ == "__main__":
    main()
