"""``wayang-mq submit``: publish one task, optionally wait for its result."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from wayang_mq.cli import taskopts
from wayang_mq.cli.common import dispatcher_config
from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    p = sub.add_parser("submit", help="publish one task; with --wait, print its result")
    p.add_argument("capability", help="e.g. demo.echo")
    p.add_argument("--input", default="{}", help="the input context as a JSON object")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    p.add_argument("--queue-timeout", type=float, default=60.0, help="seconds it may wait queued")
    p.add_argument("--exec-timeout", type=float, help="seconds it may run")
    p.add_argument("--node-id", help="workflow node id (default: the task id)")
    p.add_argument("--partition-key", help="keeps order per key on sharded capabilities")
    taskopts.add_arguments(p)
    p.add_argument(
        "--traceparent",
        help="continue this W3C trace (00-<trace id>-<parent id>-<flags>; default: a new one)",
    )
    p.add_argument("--tracestate", help="the W3C tracestate that goes with --traceparent")
    p.set_defaults(func=_cmd_submit)


def _cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.client.dispatcher import Dispatcher

    task_input = taskopts.json_object(args.input, "--input")
    options = taskopts.task_options(args)
    options["traceparent"], options["tracestate"] = args.traceparent, args.tracestate
    config = dispatcher_config(settings)

    async def submit() -> int:
        async with Dispatcher(config) as dispatcher:
            handle = await dispatcher.submit(args.capability, task_input, **options)
            if not args.wait:
                submitted = {"task_id": handle.task_id, "status": "SUBMITTED"}
                print(json.dumps(submitted | {"traceparent": handle.traceparent}))
                return Exit.OK
            if sys.stderr.isatty():  # a person watches: show the task's progress
                from wayang_mq.cli.progressbar import result_with_bar

                result = await result_with_bar(handle, args.timeout)
            else:
                result = await handle.result(args.timeout)
            print(result.model_dump_json(indent=2, exclude_defaults=False))
            return Exit.OK if result.status == "SUCCESS" else Exit.TASK_FAILED

    return asyncio.run(submit())
