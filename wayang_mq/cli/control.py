"""``wayang-mq cancel`` and ``wayang-mq status``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from wayang_mq.cli.common import dispatcher_config
from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    cancel = sub.add_parser("cancel", help="cancel a task, running or still queued")
    cancel.add_argument("task_id")
    cancel.add_argument("--reason", default="", help="recorded in the FAILED result")
    cancel.set_defaults(func=_cmd_cancel)
    status = sub.add_parser("status", help="ask the executors where a task stands")
    status.add_argument("task_id")
    status.add_argument("--wait", type=float, default=1.0, help="seconds to gather answers")
    status.set_defaults(func=_cmd_status)


def _cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.client.dispatcher import Dispatcher

    config = dispatcher_config(settings)

    async def cancel() -> bool:
        async with Dispatcher(config) as dispatcher:
            return await dispatcher.cancel(args.task_id, args.reason)

    listening = asyncio.run(cancel())
    print(json.dumps({"task_id": args.task_id, "cancel_sent": listening}))
    if not listening:
        print("wayang-mq: warning: no executor is listening on wayang.control", file=sys.stderr)
    return Exit.OK


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from wayang_mq.client.dispatcher import Dispatcher

    config = dispatcher_config(settings)

    async def status() -> dict[str, Any]:
        async with Dispatcher(config) as dispatcher:
            return (await dispatcher.status(args.task_id, args.wait)).as_dict()

    print(json.dumps(asyncio.run(status()), indent=2))
    return Exit.OK
