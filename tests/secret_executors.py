"""Executors that try every careless way to leak a secret (tests/test_secrets.py runs them in a
worker daemon, ``wayang-mq worker tests.secret_executors:Leaky``)."""

from __future__ import annotations

import asyncio
import logging
import os
import traceback

from wayang_mq import Executor, ExecutorError, Task, current
from wayang_mq.core.model import JsonLike
from wayang_mq.security.secrets import Secret

log = logging.getLogger("tests.leaky")


class Leaky(Executor):
    """``payment.charge``: reads ``input.key`` (a secret reference) and leaks its value as
    ``input.mode`` says: in its output, an exception, a traceback, progress, heartbeat details,
    its logs, or (``credentials``) the broker's and database's URLs."""

    serves = ("payment.charge",)

    async def execute(self, task: Task) -> JsonLike:
        ctx = current()
        key = task.input["key"]
        assert isinstance(key, Secret) and ctx.secrets["canary"] is key
        value = key.reveal()
        mode = task.input.get("mode")
        log.info("executing %s with key %s (value %s)", task.task_id, key, value)
        ctx.log(f"the key is {value}")
        if mode == "output":
            return {"echo": value, "nested": [{"k": value.encode()}], value: "as a map key"}
        if mode == "raise":
            try:
                raise RuntimeError(f"the service refused key {value}")
            except RuntimeError:
                log.exception("call failed with %r", {"key": value})
                raise
        if mode == "progress":
            await ctx.progress(0.5, f"authorised with {value}", key=value)
            return {"done": True}
        if mode == "heartbeat":
            ctx.heartbeat(key=value)
            await asyncio.sleep(2.5)  # heartbeats every second carry the details
            return {"done": True}
        if mode == "retry":
            trace = "".join(traceback.format_stack())
            raise ExecutorError(
                f"transient failure with {value}",
                retryable=True,
                details={"key": value, "traceback": f"{trace}\nvalue={value!r}"},
            )
        if mode == "timeout":
            log.warning("about to hang holding %s", value)
            await asyncio.sleep(60)
        if mode == "credentials":
            urls = f"{os.environ['WAYANG_AMQP_URL']} {os.environ['WAYANG_DATABASE_URL']}"
            log.error("cannot reach %s", urls)
            raise RuntimeError(f"cannot reach {urls}")
        if mode == "secret_object":
            return {"key": key}  # msgpack refuses a Secret: invalid_result, nothing published
        raise ExecutorError(f"unknown mode {mode!r}", retryable=False)
