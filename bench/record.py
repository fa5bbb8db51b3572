"""How fast the control plane writes the record, against how fast the fabric makes it.

A backlog is made first with no control plane running: N echo tasks through an in-process
worker and dispatcher (their tasks, results and events pile up in ``wayang.record``). Then a
control plane starts on a fresh database and is timed until it has written every fact, so
the figure is the record's own rate, not the fabric's. The fabric's rate over the same tasks
is printed beside it (the ratio says whether one control plane keeps up).

    .venv/bin/python bench/record.py [--tasks N]

A private RabbitMQ node and PostgreSQL are started in temp dirs (``WAYANG_AMQP_URL`` and
``WAYANG_DATABASE_URL`` use existing ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "workers"))

# mypy reads workers/ as the package `workers`: to it wayang_workers is an editable install's
# import hook (which it cannot follow) or an untyped path. The code runs on wayang_workers.
if TYPE_CHECKING:
    from workers.demo import Echo
else:
    from wayang_workers.demo import Echo

from wayang_mq.controlplane.migrate import migrate  # noqa: E402
from wayang_mq.testing.harness import Fabric  # noqa: E402
from wayang_mq.testing.plugin import (  # noqa: E402
    fresh_database,
    open_postgres,
    open_rabbitmq,
    service_dir,
)


async def _measure(fabric: Fabric, database_url: str, tasks: int) -> None:
    await fabric.purge_record()
    started = time.perf_counter()
    async with fabric.worker([Echo()], concurrency=64), fabric.dispatcher() as dispatcher:
        window = 500
        for start in range(0, tasks, window):
            handles = await asyncio.gather(
                *(dispatcher.submit("demo.echo", {"n": n}) for n in range(start, start + window))
            )
            await asyncio.gather(*(h.result(60) for h in handles))
    fabric_s = time.perf_counter() - started
    print(f"fabric: {tasks} tasks in {fabric_s:.1f} s = {tasks / fabric_s:.0f} tasks/s")
    began = time.perf_counter()
    async with fabric.control_plane(database_url, supervision=None) as cp:
        last, idle = -1, 0
        while idle < 4:  # two seconds without a new fact: the backlog is written
            await asyncio.sleep(0.5)
            done = cp.counts.written + cp.counts.repeated + cp.counts.refused
            idle = idle + 1 if done == last else 0
            last = done
            print(f"  record: {done} facts after {time.perf_counter() - began:.1f} s", flush=True)
    record_s = time.perf_counter() - began - 2.0  # the idle polls
    facts = cp.counts.written
    print(
        f"record: {facts} facts ({cp.counts.refused} refused, {cp.counts.repeated} read again)"
        f" in {record_s:.1f} s ="
        f" {facts / record_s:.0f} facts/s, {tasks / record_s:.0f} tasks/s;"
        f" record/fabric = {fabric_s / record_s:.2f}x"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(
            open_rabbitmq(Path(tempfile.mkdtemp(prefix="wayang-bench-rmq-")), clean_shutdown=False)
        )
        pg_dir = stack.enter_context(service_dir("wayang-bench-pg-"))
        server = stack.enter_context(open_postgres(pg_dir))
        database_url = stack.enter_context(fresh_database(server))
        migrate(database_url)
        workdir = Path(tempfile.mkdtemp(prefix="wayang-bench-"))
        fabric = await Fabric.create(broker.endpoint, workdir)
        await _measure(fabric, database_url, args.tasks)


if __name__ == "__main__":
    asyncio.run(main())
