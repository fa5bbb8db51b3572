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

This module holds the executor: its setup (the identity, the clients), a task's checks, and
what outlives one run (the session, cancelling its children). The shapes it reads and writes
are in ``models``, one task's loop in ``loop``, the chat client in ``llm``, the tools in
``tools``, the conversations in ``sessions``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from wayang_mq import ErrorCode, Executor, ExecutorError, Task, current
from wayang_mq.client.dispatcher import Dispatcher, DispatcherConfig
from wayang_mq.core import logs
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.names import valid_word
from wayang_mq.core.scopes import KeyScope, Role, read_scope, scope_path
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.runtime.settings import parse_input
from wayang_mq.security.accounts import instance_id

from .llm import ChatClient
from .loop import Run
from .models import AgentInput, AgentOutput, AgentSettings, ToolSettings
from .schemas import schema_problem
from .sessions import SessionStore
from .tools import AGENT_CAPABILITY, Tool, Toolbox, function_name

__all__ = ["Agent", "AgentInput", "AgentOutput", "AgentSettings", "LongAgent", "ToolSettings"]

log = logging.getLogger("wayang_workers.agent")

CAPABILITY = AGENT_CAPABILITY


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

    async def execute(self, task: Task) -> AgentOutput:
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
        if self._client is None:
            raise RuntimeError("Agent.setup() was not called")
        run = Run(self._client, self.settings, task, request, toolbox, max_steps, history)
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


class LongAgent(Agent):
    """``agent.reason`` for agents whose tools may take longer than the broker lets a
    delivery stay unacked (``consumer_timeout``, 30 min by default): a person answering an
    ``approval.request``, a long ``batch.run``. The task is accepted when it starts (PENDING
    published, the delivery acked) and answered when the loop ends. Give its tasks a
    heartbeat timeout, so a worker death is noticed and the task re-dispatched."""

    long_running = True


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
    """Refuse a task whose ``output_schema`` is no schema before the first model request:
    the fault is the task's (``invalid_task``), and finding it later would cost tokens."""
    problem = schema_problem(schema)
    if problem is not None:
        raise ExecutorError(
            f"input.output_schema is not a JSON schema: {problem}",
            retryable=False,
            code=ErrorCode.INVALID_TASK,
        )
