"""``wayang-mq cancel`` and ``wayang-mq status``.

``status`` answers from the control plane's record when a database is configured
(WAYANG_DATABASE_URL, or the one `wayang-mq dev` runs), and asks the executors otherwise.
The record's states:

* ``queued``: published, waiting in its queue for an executor;
* ``waiting to retry``: an attempt failed and the next waits in a retry tier;
* ``running``: an executor has it (``executor_id``; ``progress`` and ``message`` from its
  last progress event);
* ``pending``: an executor accepted it and answered PENDING: the answer comes later;
* ``finished``: it has its terminal result (``outcome`` SUCCESS or FAILED, ``error_code``);
* ``unknown``: the record never saw this id (and no executor knows it either).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from wayang_mq.cli.common import dispatcher_config
from wayang_mq.cli.exits import Exit
from wayang_mq.config import Settings
from wayang_mq.core.errors import DatabaseUnavailable, WayangError


def add(sub: Any) -> None:
    """Register this verb's parser and handler."""
    cancel = sub.add_parser("cancel", help="cancel a task, running or still queued")
    cancel.add_argument("task_id")
    cancel.add_argument("--reason", default="", help="recorded in the FAILED result")
    cancel.set_defaults(func=_cmd_cancel)
    status = sub.add_parser(
        "status",
        help="where a task stands: queued, waiting to retry, running, pending, finished or"
        " unknown (from the record; without a database, asks the executors)",
    )
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
    answer = _recorded_status(args.task_id, settings)
    if answer is None or answer["state"] == "unknown":
        # No record, or one that never saw the id (a task of a client the record missed, a
        # control plane not running): what the executors know is better than nothing.
        try:
            asked = _executors_status(args.task_id, args.wait, settings)
        except WayangError:
            if answer is None:
                raise
        else:
            if answer is None or asked["state"] != "not running":
                answer = asked
    print(json.dumps(answer, indent=2))
    return Exit.OK


def _recorded_status(task_id: str, settings: Settings) -> dict[str, Any] | None:
    """The record's answer; None when no database is configured or it does not answer."""
    from wayang_mq.config import saved_database_url

    if settings.database_url is None and saved_database_url(settings) is None:
        return None
    from wayang_mq.cli.controlplane import database_url
    from wayang_mq.controlplane.queries import reading, task_state

    try:
        with reading(database_url(settings)) as conn:
            return task_state(conn, task_id).as_dict()
    except DatabaseUnavailable as exc:
        print(f"wayang-mq: warning: {exc.one_line()}; asking the executors", file=sys.stderr)
        return None


def _executors_status(task_id: str, wait_s: float, settings: Settings) -> dict[str, Any]:
    from wayang_mq.client.dispatcher import Dispatcher

    config = dispatcher_config(settings)

    async def status() -> dict[str, Any]:
        async with Dispatcher(config) as dispatcher:
            return (await dispatcher.status(task_id, wait_s)).as_dict() | {"source": "executors"}

    return asyncio.run(status())
