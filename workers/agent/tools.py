"""Fabric capabilities as the model's tools.

Each tool the worker's settings allow is offered to the model as a function: its name is the
capability with ``.`` spelt ``__`` (function names may not hold dots: ``http.call`` is
``http__call``), its parameters the JSON schema the settings give. A call becomes a task
dispatched through the fabric with the agent's own dispatcher identity, awaited, and its
result (output, or the error's code and message) goes back to the model as the tool message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.core import logs
from wayang_mq.core.errors import ErrorCode, ResultTimeout, WayangError
from wayang_mq.core.model import PolicyConstraints, Result, Status, Task
from wayang_mq.runtime.context import current
from wayang_mq.security.secrets import REFERENCE_KEY

from .schemas import value_problem

log = logging.getLogger("wayang_workers.agent")

AGENT_CAPABILITY = "agent.reason"


def function_name(capability: str) -> str:
    """The function name a capability is offered under (``http.call`` -> ``http__call``)."""
    return capability.replace(".", "__")


@dataclass(frozen=True)
class Tool:
    """One capability the model may call."""

    capability: str
    description: str
    parameters: dict[str, Any]
    timeout_s: float
    queue_timeout_s: float

    def schema(self) -> dict[str, Any]:
        """The ``tools`` entry of a chat-completions request."""
        return {
            "type": "function",
            "function": {
                "name": function_name(self.capability),
                "description": self.description or f"run the fabric capability {self.capability}",
                "parameters": self.parameters,
            },
        }


@dataclass
class Call:
    """What one tool call did: the summary in the agent's output, the text the model reads."""

    capability: str
    task_id: str | None
    status: str  # SUCCESS, FAILED, or REFUSED (never dispatched: bad arguments, unknown tool)
    content: str
    cost: float = 0.0  # what a child agent reported spending (counts against the budget)

    def summary(self) -> dict[str, Any]:
        return {"capability": self.capability, "task_id": self.task_id, "status": self.status}


@dataclass
class Toolbox:
    """The tools of one agent task, dispatching through ``dispatcher``."""

    dispatcher: Dispatcher
    parent: Task
    tools: dict[str, Tool]  # by function name
    traceparent: str | None = None
    tracestate: str | None = None
    depth: int = 0  # this agent's depth: a child agent is told depth + 1
    max_result_chars: int = 16_000
    #: the child tasks still running: a cancel of the agent cancels them
    running: set[str] = field(default_factory=set)

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    async def call(self, name: str, arguments: str, budget_left: float | None) -> Call:
        """Run one tool call to its end (a refused call is answered without a task)."""
        tool = self.tools.get(name)
        if tool is None:
            offered = ", ".join(sorted(self.tools)) or "none"
            return Call(
                name, None, "REFUSED", _refusal(f"no tool {name!r}; the tools are {offered}")
            )
        try:
            args = json.loads(arguments)
        except ValueError as exc:
            return _refused(tool, f"the arguments are not JSON ({exc}); send a JSON object")
        if not isinstance(args, dict):
            return _refused(tool, "the arguments must be a JSON object")
        if _references_a_secret(args):
            return _refused(
                tool,
                "secret references are not allowed in a tool's arguments (the model may "
                "not choose which secret a task uses)",
            )
        problem = value_problem(tool.parameters, args)
        if problem is not None:
            return _refused(tool, f"the arguments do not match the tool's schema: {problem}")
        if tool.capability == AGENT_CAPABILITY:  # whatever the model wrote there
            args["depth"] = self.depth + 1
        policy = PolicyConstraints(max_cost=budget_left) if budget_left is not None else None
        try:
            handle = await self.dispatcher.submit(
                tool.capability,
                args,
                node_id=self.parent.node_id,
                queue_timeout_s=tool.queue_timeout_s,
                timeout_s=tool.timeout_s,
                policy=policy,
                traceparent=self.traceparent,
                tracestate=self.tracestate,
            )
        except WayangError as exc:  # no queue for it, a full queue: the model may go on
            code = str(exc.code or ErrorCode.EXECUTOR_ERROR)
            body = {"status": "FAILED", "error": {"code": code, "message": str(exc)}}
            return Call(tool.capability, None, "FAILED", json.dumps(body, ensure_ascii=False))
        self.running.add(handle.task_id)
        logs.event(log, "agent.tool.dispatched", capability=tool.capability, child=handle.task_id)
        await current().progress(None, f"waiting for {tool.capability}", task_id=handle.task_id)
        try:
            result = await handle.result(tool.queue_timeout_s + tool.timeout_s + 5.0)
        except ResultTimeout:
            await self.cancel(handle.task_id, "the agent stopped waiting for it")
            return Call(
                tool.capability,
                handle.task_id,
                "FAILED",
                f"error: {tool.capability} gave no answer within {tool.timeout_s:g}s",
            )
        self.running.discard(handle.task_id)
        return self._answer(tool, result)

    def _answer(self, tool: Tool, result: Result) -> Call:
        if result.status is Status.SUCCESS:
            body: dict[str, Any] = {"status": "SUCCESS", "output": result.output}
        else:
            error = result.error
            body = {
                "status": "FAILED",
                "error": {
                    "code": str(error.code) if error is not None else "executor_error",
                    "message": error.message if error is not None else "",
                },
            }
            reason = error.details.get("reason") if error is not None else None
            if isinstance(reason, str):
                body["error"]["reason"] = reason
        text = json.dumps(body, default=str, ensure_ascii=False)
        if len(text) > self.max_result_chars:
            text = text[: self.max_result_chars] + " [truncated]"
        return Call(
            tool.capability, result.task_id, str(result.status), text, _child_cost(tool, result)
        )

    async def cancel(self, task_id: str, reason: str) -> None:
        self.running.discard(task_id)
        try:
            await self.dispatcher.cancel(task_id, reason)
        except Exception as exc:  # the agent is ending anyway: say so, do not mask why
            logs.event(
                log, "agent.tool.cancel_failed", logging.WARNING, child=task_id, error=repr(exc)
            )

    async def cancel_running(self, reason: str) -> None:
        """Cancel every child task still running (the agent's task was cancelled)."""
        await asyncio.gather(*(self.cancel(child, reason) for child in list(self.running)))


def _refused(tool: Tool, message: str) -> Call:
    return Call(tool.capability, None, "REFUSED", _refusal(message))


def _refusal(message: str) -> str:
    """The tool message of a call that was not dispatched."""
    return json.dumps({"status": "REFUSED", "error": message}, ensure_ascii=False)


def _references_a_secret(value: Any) -> bool:
    """True when ``value`` holds a ``{"$secret": ...}`` reference anywhere: a prompt-injected
    model could otherwise send, say, ``http.call`` a payment key for an address it chose."""
    if isinstance(value, dict):
        return REFERENCE_KEY in value or any(_references_a_secret(v) for v in value.values())
    if isinstance(value, list):
        return any(_references_a_secret(v) for v in value)
    return False


def _child_cost(tool: Tool, result: Result) -> float:
    """What a child agent says it spent: its output's ``usage.cost`` (other capabilities
    report no cost the agent can count)."""
    if tool.capability != AGENT_CAPABILITY or not isinstance(result.output, dict):
        return 0.0
    usage = result.output.get("usage")
    cost = usage.get("cost") if isinstance(usage, dict) else None
    return float(cost) if isinstance(cost, int | float) and cost >= 0 else 0.0
