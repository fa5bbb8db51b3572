"""``agent.reason``: an AI agent whose tools are the fabric's capabilities.

Run it with ``wayang-mq worker wayang_workers.agent:Agent --config agent.toml``. A task gives
a goal, a context, the tools it may use (a subset of those the worker's settings allow), a
step limit, optionally a JSON schema for the answer and a session id; its budget is the
task's ``policy.max_cost``. The executor runs a tool-calling loop against an
OpenAI-compatible chat-completions server: each tool call becomes a task dispatched through
the fabric (``http.call``, ``db.query``, ``approval.request``, another ``agent.reason``), its
result goes back to the model, and the loop ends when the model answers.

Why the agent has a dispatcher identity of its own (``dispatcher_key``): an executor's key
may not sign tasks (docs/security.md §4), and the worker's key must not gain that power just
because one of its executors dispatches. The operator grants the agent a dispatcher key and
broker account scoped to exactly the capabilities it may call; every child task says it was
issued by that identity. The tools a task may use are the intersection of the task's list,
the settings' ``tools`` and that key's scope: a task cannot widen any of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from wayang_mq import ErrorCode, Executor, ExecutorError, Task, current
from wayang_mq.client.dispatcher import Dispatcher, DispatcherConfig
from wayang_mq.core import logs
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.model import DEFAULT_AUDIENCE, JsonLike
from wayang_mq.core.names import valid_capability, valid_word
from wayang_mq.core.scopes import KeyScope, Role, read_scope, scope_path
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.runtime.settings import SecretRef, parse_input
from wayang_mq.security.accounts import instance_id

from .llm import ChatClient, Reply
from .schemas import schema_problem, value_problem
from .sessions import SessionStore
from .tools import Tool, Toolbox, function_name

__all__ = ["Agent", "AgentInput", "AgentSettings", "LongAgent", "ToolSettings"]

log = logging.getLogger("wayang_workers.agent")

CAPABILITY = "agent.reason"
SESSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
SYSTEM_PROMPT = (
    "You are an agent working on a task fabric. Reach the goal the user gives, using the "
    "tools when they help: each tool runs a task and answers with its status and output. "
    "When you are done, answer without calling a tool."
)


class ToolSettings(BaseModel):
    """One capability the agent may call, as the model sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(default="", max_length=2000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    timeout_s: float = Field(default=60.0, gt=0)  # the child task's execution timeout
    queue_timeout_s: float = Field(default=30.0, gt=0)  # how long it may wait for an executor

    @field_validator("parameters")
    @classmethod
    def _a_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = schema_problem(value)
        if problem is not None:
            raise ValueError(f"not a JSON schema: {problem}")
        return value


class AgentSettings(BaseModel):
    """``[agent.reason]`` in the worker's ``--config`` file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(pattern=r"^https?://")  # e.g. https://api.openai.com/v1
    model: str = Field(min_length=1)
    api_key: str | SecretRef | None = None  # sent as a bearer token; local servers need none
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_model_retries: int = Field(default=3, ge=0, le=10)  # 429, 5xx, connection errors
    default_max_steps: int = Field(default=10, ge=1)
    max_steps_limit: int = Field(default=30, ge=1, le=1000)  # the most a task may ask for
    max_output_retries: int = Field(default=2, ge=0, le=10)  # re-asks on a schema mismatch
    max_depth: int = Field(default=2, ge=0, le=10)  # agents asking agents: levels below
    tools: dict[str, ToolSettings] = Field(default_factory=dict)  # capability -> tool
    dsn: str | SecretRef | None = None  # PostgreSQL for sessions; None: no sessions
    price_in_per_1k: float = Field(default=0.0, ge=0)  # cost of 1000 prompt tokens
    price_out_per_1k: float = Field(default=0.0, ge=0)  # cost of 1000 completion tokens
    # the agent's own dispatcher identity (see the module docstring): required
    dispatcher_amqp_url: str | SecretRef
    dispatcher_key: Path  # a private key whose scope (<stem>.toml) has role = "dispatcher"
    result_keys: Path  # public keys trusted for the children's results (a key directory)
    audience: str = DEFAULT_AUDIENCE

    @field_validator("tools")
    @classmethod
    def _capabilities(cls, value: dict[str, ToolSettings]) -> dict[str, ToolSettings]:
        for capability in value:
            if not valid_capability(capability):
                raise ValueError(f"{capability!r} is not a capability name")
        return value


class AgentInput(BaseModel):
    """A task's input."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    goal: str = Field(min_length=1, max_length=20_000)
    context: dict[str, Any] = Field(default_factory=dict)
    tools: tuple[str, ...] = ()  # capabilities, each allowed by the worker's settings
    max_steps: Annotated[int, Field(ge=1)] | None = None
    output_schema: dict[str, Any] | None = None
    session_id: Annotated[str, Field(pattern=SESSION_PATTERN)] | None = None
    #: how many agents above this one asked for it (set by the asking agent, not its model)
    depth: int = Field(default=0, ge=0, le=100)


class Agent(Executor):
    """``agent.reason``: see the module docstring and docs/executors.md."""

    serves = (CAPABILITY,)
    settings_model = AgentSettings

    def __init__(self, settings: AgentSettings | None = None) -> None:
        if settings is None:
            raise ConfigError(
                "agent.reason needs settings: base_url, model and its dispatcher identity",
                hint="give the worker --config with an [agent.reason] table "
                "(docs/executors.md, `agent.reason`)",
            )
        self.settings = settings
        self._client: ChatClient | None = None
        self._dispatcher: Dispatcher | None = None
        self._sessions: SessionStore | None = None
        self._tools: dict[str, Tool] = {}

    async def setup(self) -> None:
        s = self.settings
        signer, scope = _dispatcher_key(s.dispatcher_key)
        for capability in s.tools:
            if not scope.covers(capability):
                raise ConfigError(
                    f"[agent.reason] tool {capability!r} is not covered by the dispatcher key's"
                    f" scope ({scope.describe()})",
                    hint="widen the key's capabilities or drop the tool",
                )
        self._tools = {
            capability: Tool(
                capability, t.description, t.parameters, t.timeout_s, t.queue_timeout_s
            )
            for capability, t in s.tools.items()
        }
        results_keyring = KeyRing.load_dir(s.result_keys)
        if not results_keyring.keys:
            raise ConfigError(
                f"[agent.reason] result_keys {s.result_keys} holds no public keys (*.pub): "
                "every child task's result would be refused",
                hint="point it at the workers' key directory (WAYANG_KEY_DIR)",
            )
        amqp_url = await self.reveal(s.dispatcher_amqp_url)
        # its id is an instance of the key's identity (as its broker account allows)
        base = scope.identity if valid_word(scope.identity) else "agent"
        self._dispatcher = Dispatcher(
            DispatcherConfig(
                amqp_url=amqp_url,
                signer=signer,
                results_keyring=results_keyring,
                dispatcher_id=instance_id(base),
                issuer=scope.identity,
                audience=s.audience,
                supervision=None,
            ),
            registry=None,
        )
        await self._dispatcher.start()
        if s.dsn is not None:
            self._sessions = SessionStore(await self.reveal(s.dsn))
            await self._sessions.open()
        api_key = await self.reveal(s.api_key) if s.api_key is not None else None
        self._client = ChatClient(
            s.base_url, s.model, api_key, s.request_timeout_s, s.max_model_retries
        )
        await self._client.open()
        logs.event(log, "agent.ready", model=s.model, tools=",".join(sorted(s.tools)))

    async def teardown(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._sessions is not None:
            await self._sessions.close()
        if self._dispatcher is not None:
            await self._dispatcher.close()

    async def execute(self, task: Task) -> JsonLike:
        request = parse_input(AgentInput, task.input)
        max_steps = self._max_steps(request)
        toolbox = self._toolbox(task, request)
        if request.output_schema is not None:
            _check_output_schema(request.output_schema)
        if request.session_id is not None and self._sessions is None:
            raise ExecutorError(
                "this worker keeps no sessions (no dsn in [agent.reason]): "
                "drop session_id or configure a database",
                retryable=False,
                code=ErrorCode.INVALID_TASK,
                details={"reason": "no_sessions"},
            )
        history: list[dict[str, Any]] = []
        version = 0
        if request.session_id is not None:
            assert self._sessions is not None
            history, version = await self._sessions.load(request.session_id)
        run = _Run(self, task, request, toolbox, max_steps, history)
        try:
            output = await run.loop()
        except asyncio.CancelledError:
            await asyncio.shield(toolbox.cancel_running("the agent's task was cancelled"))
            raise
        except BaseException:
            await asyncio.shield(toolbox.cancel_running("the agent's task ended"))
            raise
        if request.session_id is not None:
            assert self._sessions is not None
            await self._sessions.save(request.session_id, run.messages, version)
        return output

    def _max_steps(self, request: AgentInput) -> int:
        limit = self.settings.max_steps_limit
        if request.max_steps is None:
            return min(self.settings.default_max_steps, limit)
        steps = request.max_steps
        if steps > limit:
            raise ExecutorError(
                f"input.max_steps {steps} is over this worker's limit of {limit}",
                retryable=False,
                code=ErrorCode.INVALID_TASK,
            )
        return steps

    def _toolbox(self, task: Task, request: AgentInput) -> Toolbox:
        refused = [name for name in request.tools if name not in self._tools]
        if refused:
            allowed = ", ".join(sorted(self._tools)) or "none"
            raise ExecutorError(
                f"input.tools: {', '.join(refused)} not allowed on this worker "
                f"(allowed: {allowed})",
                retryable=False,
                code=ErrorCode.INVALID_TASK,
                details={"reason": "tool_not_allowed"},
            )
        if self._dispatcher is None:
            raise RuntimeError("Agent.setup() was not called")
        ctx = current()
        names = list(request.tools)
        if request.depth >= self.settings.max_depth and CAPABILITY in names:
            names.remove(CAPABILITY)  # deep enough: this agent may not ask another
        chosen = {function_name(name): self._tools[name] for name in names}
        return Toolbox(
            self._dispatcher, task, chosen, ctx.traceparent, ctx.tracestate, request.depth
        )

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        s = self.settings
        return tokens_in / 1000 * s.price_in_per_1k + tokens_out / 1000 * s.price_out_per_1k


class LongAgent(Agent):
    """``agent.reason`` for agents whose tools may take longer than the broker lets a
    delivery stay unacked (``consumer_timeout``, 30 min by default): a person answering an
    ``approval.request``, a long ``batch.run``. The task is accepted when it starts (PENDING
    published, the delivery acked) and answered when the loop ends. Give its tasks a
    heartbeat timeout, so a worker death is noticed and the task re-dispatched."""

    long_running = True


class _Run:
    """One task's loop: the conversation, the steps, the usage."""

    def __init__(
        self,
        agent: Agent,
        task: Task,
        request: AgentInput,
        toolbox: Toolbox,
        max_steps: int,
        history: list[dict[str, Any]],
    ) -> None:
        self.agent = agent
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
        return self.agent.cost(self.tokens_in, self.tokens_out) + self.child_cost

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

    async def loop(self) -> JsonLike:
        ctx = current()
        client = self.agent._client
        assert client is not None
        reasks = 0
        while True:
            if self.steps >= self.max_steps:
                raise self._failed(
                    f"no answer within {self.max_steps} steps: raise max_steps or narrow the goal",
                    "max_steps",
                )
            self.steps += 1
            await ctx.progress(self.steps / self.max_steps, f"step {self.steps}: asking the model")
            reply = await client.complete(self.messages, self.toolbox.schemas())
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
            if reasks > self.agent.settings.max_output_retries:
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

    def _usage(self) -> dict[str, JsonLike]:
        return {
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost": round(self.cost, 9),
        }

    def _output(self, answer: JsonLike) -> JsonLike:
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


def _dispatcher_key(path: Path) -> tuple[Signer, KeyScope]:
    """The agent's signing key and its scope, which must make it a dispatcher."""
    try:
        signer = Signer.from_file(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[agent.reason] dispatcher_key {path}: {exc}") from None
    candidate = scope_path(path)
    if not candidate.exists():
        raise ConfigError(
            f"[agent.reason] dispatcher_key {path} has no scope beside it ({candidate.name})",
            hint="make one with `wayang-mq keys new --role dispatcher --id ID --capability ...`",
        )
    scope = read_scope(candidate)
    if scope.role is not Role.DISPATCHER:
        raise ConfigError(
            f"[agent.reason] dispatcher_key {path} has role {scope.role.value}: the agent "
            "signs its tool tasks with a key of role dispatcher (executor keys may not sign "
            "tasks; an admin key would let it sign anything)",
            hint="make one with `wayang-mq keys new --role dispatcher --id ID --capability ...`",
        )
    return signer, scope


def _check_output_schema(schema: dict[str, Any]) -> None:
    problem = schema_problem(schema)
    if problem is not None:
        raise ExecutorError(
            f"input.output_schema is not a JSON schema: {problem}",
            retryable=False,
            code=ErrorCode.INVALID_TASK,
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
