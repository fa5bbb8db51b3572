"""Micro-benchmark of the wire codec: what decoding a task and building, encoding and decoding
a result cost (strict validation of every id included). Run: .venv/bin/python bench/codec.py

Compare two versions by running it from each checkout (``PYTHONPATH=<checkout>``); the numbers
are microseconds per call on this machine, so only a same-machine comparison means anything.
"""

from __future__ import annotations

import timeit

from wayang_mq.core.model import Result, Status, Task
from wayang_mq.core.wire import decode, encode

CALLS = 20_000


def main() -> None:
    task = Task.create("demo.echo", {"x": 1, "text": "hello"}, reply_to="reply.abc", issuer="d-1")
    task_body = encode(task)
    result = Result.answering(task, "worker-1", Status.SUCCESS, output={"x": 1})
    result_body = encode(result)
    cases = {
        "decode a task": lambda: decode(task_body, Task),
        "build a result": lambda: Result.answering(task, "worker-1", Status.SUCCESS, output={}),
        "encode a result": lambda: encode(result),
        "decode a result": lambda: decode(result_body, Result),
    }
    for name, call in cases.items():
        best = min(timeit.repeat(call, number=CALLS, repeat=3)) / CALLS * 1e6
        print(f"{name:<16} {best:6.2f} µs")


if __name__ == "__main__":
    main()
