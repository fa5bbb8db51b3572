"""One task's reasoning loop: ask the model, run the tools it calls, stop when it answers.

Every way a run ends is decided here, in one place: an answer (checked against the task's
``output_schema`` and re-asked on a mismatch, at most ``max_output_retries`` times), no answer
within ``max_steps`` model requests, or a budget (``policy.max_cost``) spent — counted after
each model reply and each tool call, because both cost. The executor (the package's
``Agent``) builds the run from a parsed input and a toolbox, and keeps what outlives it:
the session, the child tasks to cancel when it ends early.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from wayang_mq import ExecutorError, Task, current
from wayang_mq.core import logs
from wayang_mq.core.model import JsonLike

from .llm import ChatClient, Reply
from .models import AgentInput, AgentOutput, AgentSettings, Usage
from .schemas import value_problem
from .tools import Toolbox

log = logging.getLogger("wayang_workers.agent")

SYSTEM_PROMPT = (
    "You are an agent working on a task fabric. Reach the goal the user gives, using the "
    "tools when they help: each tool runs a task and answers with its status and output. "
    "When you are done, answer without calling a tool."
)


class Run:
    """One task's loop: the conversation, the steps, the usage."""

    def __init__(
        self,
        client: ChatClient,
        settings: AgentSettings,
        task: Task,
        request: AgentInput,
        toolbox: Toolbox,
        max_steps: int,
        history: list[dict[str, Any]],
    ) -> None:
        self.client = client
        self.settings = settings
        self.task = task
        self.request = request
        self.toolbox = toolbox
        self.max_steps = max_steps
        self.budget = task.policy.max_cost
        self.tokens_in = 0
        self.tokens_out = 0
        self.child_cost = 0.0
        self.steps = 0
        self.calls: list[dict[str, Any]] = []
        self.messages = list(history) or [{"role": "system", "content": SYSTEM_PROMPT}]
        self.messages.append({"role": "user", "content": self._prompt()})

    @property
    def cost(self) -> float:
        """The run's own tokens at the worker's prices, plus what its child agents spent."""
        return self.settings.token_cost(self.tokens_in, self.tokens_out) + self.child_cost

    def _prompt(self) -> str:
        parts = [f"Goal: {self.request.goal}"]
        if self.request.context:
            context = json.dumps(self.request.context, default=str, ensure_ascii=False)
            parts.append(f"Context (JSON): {context}")
        if self.request.output_schema is not None:
            schema = json.dumps(self.request.output_schema, ensure_ascii=False)
            parts.append(
                "Your final answer must be JSON only (no prose, no code fence) valid against "
                f"this JSON schema: {schema}"
            )
        return "\n".join(parts)

    async def loop(self) -> AgentOutput:
        """Steps until the model answers; raises the ``ExecutorError`` that ends it otherwise."""
        ctx = current()
        reasks = 0
        while True:
            if self.steps >= self.max_steps:
                raise self._failed(
                    f"no answer within {self.max_steps} steps: raise max_steps or narrow the goal",
                    "max_steps",
                )
            self.steps += 1
            await ctx.progress(self.steps / self.max_steps, f"step {self.steps}: asking the model")
            reply = await self.client.complete(self.messages, self.toolbox.schemas())
            self._count(reply)
            self.messages.append(reply.message)
            if reply.tool_calls:
                for call in reply.tool_calls:
                    await self._tool(call.id, call.name, call.arguments)
                continue
            if self.request.output_schema is None:
                return self._output(reply.content)
            answer, problem = _validated(reply.content, self.request.output_schema)
            if problem is None:
                return self._output(answer)
            reasks += 1
            if reasks > self.settings.max_output_retries:
                raise self._failed(
                    f"the model's answer does not match output_schema after {reasks - 1} "
                    f"re-asks ({problem})",
                    "invalid_output",
                )
            logs.event(log, "agent.output.reask", step=self.steps, problem=problem[:200])
            self.messages.append(
                {
                    "role": "user",
                    "content": f"Your answer is not valid: {problem}. Answer again with JSON "
                    "only, valid against the schema.",
                }
            )

    async def _tool(self, call_id: str, name: str, arguments: str) -> None:
        ctx = current()
        capability = self.toolbox.tools[name].capability if name in self.toolbox.tools else name
        await ctx.progress(self.steps / self.max_steps, f"step {self.steps}: calling {capability}")
        left = None if self.budget is None else max(0.0, self.budget - self.cost)
        done = await self.toolbox.call(name, arguments, left)
        self.calls.append(done.summary())
        self.child_cost += done.cost
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": done.content})
        self._check_budget()

    def _count(self, reply: Reply) -> None:
        self.tokens_in += reply.tokens_in
        self.tokens_out += reply.tokens_out
        current().report_usage(tokens_in=reply.tokens_in, tokens_out=reply.tokens_out)
        self._check_budget()

    def _check_budget(self) -> None:
        if self.budget is not None and self.cost > self.budget:
            raise self._failed(
                f"spent {self.cost:.6g} of a budget of {self.budget:g} (policy.max_cost)",
                "budget_exceeded",
                retryable=False,
            )

    def _usage(self) -> Usage:
        return {
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost": round(self.cost, 9),
        }

    def _output(self, answer: JsonLike) -> AgentOutput:
        return {
            "answer": answer,
            "steps": self.steps,
            "tool_calls": self.calls,
            "usage": self._usage(),
            "session_id": self.request.session_id,
        }

    def _failed(self, message: str, reason: str, *, retryable: bool = False) -> ExecutorError:
        return ExecutorError(
            message,
            retryable=retryable,
            details={
                "reason": reason,
                "steps": self.steps,
                "tool_calls": len(self.calls),
                **self._usage(),
            },
        )


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def _validated(content: str, schema: dict[str, Any]) -> tuple[JsonLike, str | None]:
    """The answer as JSON and, when it is not valid against ``schema``, what is wrong."""
    fenced = _FENCE.match(content)
    text = fenced.group(1) if fenced else content
    try:
        answer = json.loads(text)
    except ValueError as exc:
        return None, f"it is not JSON ({exc})"
    return answer, value_problem(schema, answer)
