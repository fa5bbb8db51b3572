"""Where a lone task's milliseconds go: the CPU each step on its round trip costs, measured
in this process without a broker (``timeit``, best of several repeats), so the sequential
round trip's gap to raw aio-pika (bench/run.py's p50) can be read as steps, not guessed.

    .venv/bin/python bench/critical_path.py [--number N] [--repeat R] [--json PATH]

The steps are the ones a task takes in order: the dispatcher builds and signs it and makes
the AMQP message; the worker opens it (signature, msgpack, schema, scope, clocks), builds the
result, signs it and makes its message; the dispatcher opens the result. What raw aio-pika's
harness does instead (msgpack in and out, one ``aio_pika.Message`` each way) is measured
beside it. The broker's hops and the AMQP frames are the same for both and not here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
import msgpack  # noqa: E402

from bench.measure import payload  # noqa: E402
from wayang_mq.amqp.publisher import to_amqp  # noqa: E402
from wayang_mq.core import logs  # noqa: E402
from wayang_mq.core.envelope import open_task  # noqa: E402
from wayang_mq.core.model import Result, Status, Task  # noqa: E402
from wayang_mq.core.signing import KeyRing, Signer  # noqa: E402
from wayang_mq.core.wire import open_signed, signed_message, task_message  # noqa: E402


def steps() -> dict[str, tuple[str, Callable[[], object]]]:
    """Each step's side and a call that does it once."""
    signer = Signer.generate()
    keyring = KeyRing.of([signer.public_key])
    task = Task.create("demo.echo", payload(1), reply_to="reply.bench", issuer=signer.key_id)
    wire = task_message(task, signer)
    headers = dict(wire.headers)
    result = Result.answering(task, "bench-w", Status.SUCCESS, output=payload(1))
    answer = signed_message(result, signer, message_id=task.task_id, reply_to="reply.bench")
    answer_headers = dict(answer.headers)
    raw_body = msgpack.packb(payload(1), use_bin_type=True)
    quiet = logging.getLogger("bench.critical_path")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    quiet.setLevel(logging.INFO)
    return {
        "dispatcher: build the task (Task.create)": (
            "dispatcher",
            lambda: Task.create("demo.echo", payload(1), reply_to="reply.bench"),
        ),
        "dispatcher: encode and sign it (task_message)": (
            "dispatcher",
            lambda: task_message(task, signer),
        ),
        "dispatcher: the AMQP message (to_amqp)": ("dispatcher", lambda: to_amqp(wire)),
        "worker: open the task (signature, msgpack, schema, checks)": (
            "worker",
            lambda: open_task(wire.body, headers, keyring),
        ),
        "worker: build the result (Result.answering)": (
            "worker",
            lambda: Result.answering(task, "bench-w", Status.SUCCESS, output=payload(1)),
        ),
        "worker: encode and sign it (signed_message)": (
            "worker",
            lambda: signed_message(result, signer, message_id=task.task_id, reply_to="r"),
        ),
        "worker: the AMQP message (to_amqp)": ("worker", lambda: to_amqp(answer)),
        "worker: the task.finished log line (JSON, to a null handler)": (
            "worker",
            lambda: logs.event(quiet, "task.finished", task_id=task.task_id, status="success"),
        ),
        "dispatcher: open the result (signature, msgpack, schema)": (
            "dispatcher",
            lambda: open_signed(answer.body, answer_headers, keyring, Result),
        ),
        "raw: msgpack in, msgpack out, two aio_pika.Message": (
            "raw",
            lambda: (
                aio_pika.Message(raw_body, correlation_id="c", reply_to="r"),
                msgpack.unpackb(raw_body),
                aio_pika.Message(msgpack.packb({"id": "c", "output": payload(1)}), reply_to="r"),
                msgpack.unpackb(raw_body),
            ),
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """Time every step and print the table (µs per call, best of ``--repeat``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2_000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=5, help="repeats (the best counts)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures: dict[str, dict[str, float | str]] = {}
    totals: dict[str, float] = {}
    print(f"{'step':<62}{'µs':>8}")
    for name, (side, call) in steps().items():
        best = min(timeit.repeat(call, number=args.number, repeat=args.repeat))
        micros = best / args.number * 1e6
        figures[name] = {"side": side, "us": round(micros, 1)}
        totals[side] = totals.get(side, 0.0) + micros
        print(f"{name:<62}{micros:>8.1f}")
    wayang = totals.get("dispatcher", 0.0) + totals.get("worker", 0.0)
    print(f"\n{'wayang-mq, all steps on the round trip':<62}{wayang:>8.1f}")
    print(f"{'raw aio-pika harness, the same steps':<62}{totals.get('raw', 0.0):>8.1f}")
    if args.json:
        report = {"steps": figures, "totals_us": {k: round(v, 1) for k, v in totals.items()}}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
