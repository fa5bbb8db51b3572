"""``agent.reason`` through a real broker (and PostgreSQL for sessions) against a local
OpenAI-compatible server that answers scripted chat completions and records what it was sent:
tools called through the fabric, output schema re-asks, step and budget limits, sessions,
an agent asking another agent, cancel, the daemon with ``--config``."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from wayang_workers.agent import Agent, AgentSettings, LongAgent
from wayang_workers.agent.llm import ChatClient
from wayang_workers.demo import Echo, Sleep
from wayang_workers.http_call import HttpCall, HttpCallSettings

from wayang_mq import ErrorCode, Executor, Pending, Status, Task, TaskRef, current
from wayang_mq.core.errors import ConfigError, ExecutorError
from wayang_mq.core.model import JsonLike, PolicyConstraints, Progress
from wayang_mq.core.scopes import KeyScope, Role, scope_path
from wayang_mq.core.signing import KeyRing, Signer, write_keypair
from wayang_mq.runtime.answers import Answers
from wayang_mq.runtime.executor import load_executor
from wayang_mq.runtime.settings import WorkerFile
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.plugin import fresh_database

WAIT_S = 30
ROOT = Path(__file__).resolve().parent.parent
ANSWER_SCHEMA = {
    "type": "object",
    "required": ["echoed", "status"],
    "properties": {"echoed": {"type": "string"}, "status": {"type": "integer"}},
    "additionalProperties": False,
}


# -- a scripted OpenAI-compatible server -------------------------------------------------------


def say(content: str, tokens_in: int = 20, tokens_out: int = 5) -> dict[str, Any]:
    """A completion that answers ``content``."""
    return _completion({"role": "assistant", "content": content}, tokens_in, tokens_out)


def call(*calls: tuple[str, dict[str, Any]], tokens_in: int = 20) -> dict[str, Any]:
    """A completion that calls tools: (function name, arguments)."""
    tool_calls = [
        {
            "id": f"call_{secrets.token_hex(4)}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for name, args in calls
    ]
    message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
    return _completion(message, tokens_in, 5)


def failure(status: int, message: str = "nope", retry_after: float | None = None) -> dict[str, Any]:
    """An HTTP error from the model server."""
    reply: dict[str, Any] = {"__status": status, "__message": message}
    if retry_after is not None:
        reply["__retry_after"] = retry_after
    return reply


def _completion(message: dict[str, Any], tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{secrets.token_hex(4)}",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out},
    }


@dataclass
class Script:
    """One scenario's canned completions (answered in order) and the requests it received."""

    replies: list[dict[str, Any]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    gate: asyncio.Event | None = None  # when set: the first reply waits for it


@dataclass
class ModelServer:
    """Serves ``/<scenario>/v1/chat/completions`` and ``/data/<key>`` (for http.call)."""

    port: int = 0
    scripts: dict[str, Script] = field(default_factory=dict)

    def script(self, *replies: dict[str, Any], gate: asyncio.Event | None = None) -> str:
        """Register a scenario; returns its base_url."""
        key = secrets.token_hex(4)
        self.scripts[key] = Script(list(replies), gate=gate)
        return f"http://127.0.0.1:{self.port}/{key}/v1"

    def of(self, base_url: str) -> Script:
        return self.scripts[base_url.rstrip("/").split("/")[-2]]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{key}/v1/chat/completions", self.complete)
        app.router.add_get("/data/{key}", self.data)
        return app

    async def complete(self, request: web.Request) -> web.Response:
        script = self.scripts[request.match_info["key"]]
        script.requests.append(await request.json())
        script.headers.append(dict(request.headers))
        if script.gate is not None and len(script.requests) == 1:
            await script.gate.wait()
        if not script.replies:
            return web.json_response({"error": {"message": "script exhausted"}}, status=400)
        reply = script.replies.pop(0)
        if "__status" in reply:  # a scripted failure: (status, Retry-After)
            headers = (
                {"Retry-After": str(reply["__retry_after"])} if "__retry_after" in reply else {}
            )
            return web.json_response(
                {"error": {"message": reply["__message"]}},
                status=reply["__status"],
                headers=headers,
            )
        return web.json_response(reply)

    async def data(self, request: web.Request) -> web.Response:
        return web.json_response({"status": 7, "key": request.match_info["key"]})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
async def model() -> AsyncIterator[ModelServer]:
    server = ModelServer()
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    yield server
    await runner.cleanup()


# -- the agent's dispatcher identity and its workers ------------------------------------------


@pytest.fixture(scope="module")
def agent_key(fabric: Fabric, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dispatcher key for the agent, in a directory of its own (the fabric's key dir is
    shared by the session's daemons, which sign with the first ``*.key`` they find there).
    The workers here trust :func:`trusted` : the fabric's public keys and the agent's."""
    root = tmp_path_factory.mktemp("agent-keys")
    capabilities = ("demo.*", "http.call", "agent.reason", "approval.request")
    scope = KeyScope(Role.DISPATCHER, "agent-1", capabilities)
    private, public = write_keypair(root / "agent", Signer.generate(), scope)
    trust = root / "trusted"
    trust.mkdir(mode=0o700)
    for source in [*fabric.key_dir.glob("*.pub"), *fabric.key_dir.glob("*.toml"), public]:
        shutil.copy(source, trust / source.name)
    shutil.copy(scope_path(public), trust / scope_path(public).name)
    return private


def trusted(agent_key: Path) -> Path:
    """The key directory the test's workers and the agent trust (see :func:`agent_key`)."""
    return agent_key.parent.parent / "trusted"


@pytest.fixture(scope="module")
def sessions_dsn(postgres: str) -> Iterator[str]:
    with fresh_database(postgres) as url:
        yield url


def settings(fabric: Fabric, key: Path, base_url: str, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "base_url": base_url,
        "model": "scripted",
        "dispatcher_amqp_url": fabric.endpoint.amqp_url,
        "dispatcher_key": str(key),
        "result_keys": str(trusted(key)),
        "tools": {
            "demo.echo": {
                "description": "echo the input",
                "parameters": {"type": "object", "properties": {"msg": {"type": "string"}}},
                "timeout_s": 10,
            },
            "http.call": {
                "parameters": {
                    "type": "object",
                    "required": ["url"],
                    "properties": {"url": {"type": "string"}},
                },
                "timeout_s": 10,
            },
            "demo.sleep": {"timeout_s": 60},
            "agent.reason": {"timeout_s": 20},
            "approval.request": {"timeout_s": 3600},
        },
    }
    return AgentSettings.model_validate(values | overrides)


@dataclass(eq=False)
class RecordingSleep(Sleep):
    """``demo.sleep`` that records which tasks started and which were cancelled."""

    started: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (node_id, traceparent)

    async def execute(self, task: Task) -> JsonLike:
        self.started.append(task.task_id)
        self.seen.append((task.node_id, current().traceparent))
        try:
            return await super().execute(task)
        except asyncio.CancelledError:
            self.cancelled.append(task.task_id)
            raise


class StandInApproval(Executor):
    """``approval.request`` as a person would answer it: filed and answered PENDING now, the
    decision published later with ``Answers`` (the real inbox is wayang_workers.approval)."""

    serves = ("approval.request",)

    def __init__(self) -> None:
        self.filed: list[TaskRef] = []
        self.inputs: list[dict[str, Any]] = []

    async def execute(self, task: Task) -> JsonLike | Pending:
        self.filed.append(TaskRef.of(task))
        self.inputs.append(task.input)
        return Pending({"inbox": "stand-in"})


def workers(fabric: Fabric, agent: Agent, *others: Any, concurrency: int = 4) -> Any:
    """An in-process worker serving the agent, demo.echo, http.call (loopback allowed) and
    ``others``, trusting the key dir (so the agent's dispatcher key too)."""
    http = HttpCall(HttpCallSettings.model_validate({"allow_networks": ["127.0.0.1/32"]}))
    executors = [agent, Echo(), http, *others]
    return fabric.worker(
        executors,
        keyring=KeyRing.load_dir(agent.settings.result_keys),
        concurrency=concurrency,
    )


async def run_agent(fabric: Fabric, input: dict[str, Any], *, max_cost: float | None = None) -> Any:
    policy = PolicyConstraints(max_cost=max_cost) if max_cost is not None else None
    async with fabric.dispatcher() as dispatcher:
        return await dispatcher.run("agent.reason", input, wait_s=WAIT_S, policy=policy)


def tool_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(m["content"]) for m in request["messages"] if m["role"] == "tool"]


# -- the tests ---------------------------------------------------------------------------------


async def test_a_two_step_plan_calls_demo_echo_and_http_call_and_answers_schema_valid_output(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    # Given a model that calls demo.echo, then http.call, then answers
    gate = asyncio.Event()
    data_url = model.url("/data/plan")
    base_url = model.script(
        call(("demo__echo", {"msg": "hello"})),
        call(("http__call", {"url": data_url})),
        say(json.dumps({"echoed": "hello", "status": 7}), tokens_in=30, tokens_out=9),
        gate=gate,
    )
    agent = Agent(settings(fabric, agent_key, base_url))
    async with workers(fabric, agent), fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit(
            "agent.reason",
            {
                "goal": "echo hello, then fetch the data",
                "context": {"url": data_url},
                "tools": ["demo.echo", "http.call"],
                "output_schema": ANSWER_SCHEMA,
            },
        )
        events: list[Progress] = []

        async def watch() -> None:
            async for event in handle.progress():
                events.append(event)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.3)  # let the watch bind before the model's first answer
        gate.set()
        result = await handle.result(WAIT_S)
        await asyncio.wait_for(watcher, WAIT_S)
    # Then it answered with schema-valid output after calling both tools through the fabric
    assert result.status is Status.SUCCESS, result.error
    output = result.output
    assert output["answer"] == {"echoed": "hello", "status": 7}
    assert output["steps"] == 3
    assert [(c["capability"], c["status"]) for c in output["tool_calls"]] == [
        ("demo.echo", "SUCCESS"),
        ("http.call", "SUCCESS"),
    ]
    assert output["usage"] == {"tokens_in": 70, "tokens_out": 19, "cost": 0}
    assert result.metrics["units.tokens_in"] == 70 and result.metrics["units.tokens_out"] == 19
    # And the model was offered exactly the task's tools and read each tool's result
    first, second, third = model.of(base_url).requests
    names = [t["function"]["name"] for t in first["tools"]]
    assert names == ["demo__echo", "http__call"] and first["tool_choice"] == "auto"
    assert "echo hello" in first["messages"][1]["content"]
    assert tool_messages(second) == [{"status": "SUCCESS", "output": {"msg": "hello"}}]
    fetched = tool_messages(third)[1]
    assert fetched["status"] == "SUCCESS" and fetched["output"]["status"] == 200
    assert fetched["output"]["body"] == {"status": 7, "key": "plan"}
    # And each step was a progress event
    messages = [e.message for e in events]
    assert "step 1: calling demo.echo" in messages and "step 2: calling http.call" in messages


async def test_an_answer_not_matching_the_output_schema_is_re_asked_then_fixed(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    base_url = model.script(
        say('{"echoed": "x", "status": "seven"}'),
        say('```json\n{"echoed": "x", "status": 7}\n```'),
    )
    agent = Agent(settings(fabric, agent_key, base_url))
    async with workers(fabric, agent):
        result = await run_agent(fabric, {"goal": "answer", "output_schema": ANSWER_SCHEMA})
    assert result.status is Status.SUCCESS, result.error
    assert result.output["answer"] == {"echoed": "x", "status": 7}
    assert result.output["steps"] == 2
    reask = model.of(base_url).requests[1]["messages"][-1]
    assert (
        reask["role"] == "user"
        and "at status: 'seven' is not of type 'integer'" in (reask["content"])
    )


async def test_an_answer_still_invalid_after_the_re_asks_fails_invalid_output(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    base_url = model.script(say("no"), say("still no"), say("never"))
    agent = Agent(settings(fabric, agent_key, base_url))
    async with workers(fabric, agent):
        result = await run_agent(fabric, {"goal": "answer", "output_schema": ANSWER_SCHEMA})
    assert result.status is Status.FAILED
    assert result.error.details["reason"] == "invalid_output"
    assert len(model.of(base_url).requests) == 3  # the answer and max_output_retries = 2


async def test_a_model_that_never_answers_within_max_steps_fails_max_steps(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    base_url = model.script(
        call(("demo__echo", {"msg": "1"})), call(("demo__echo", {"msg": "2"})), say("late")
    )
    agent = Agent(settings(fabric, agent_key, base_url))
    async with workers(fabric, agent):
        result = await run_agent(fabric, {"goal": "loop", "tools": ["demo.echo"], "max_steps": 2})
    assert result.status is Status.FAILED
    assert result.error.code is ErrorCode.EXECUTOR_ERROR and not result.error.retryable
    assert result.error.details["reason"] == "max_steps"
    assert result.error.details["steps"] == 2 and result.error.details["tool_calls"] == 2
    assert len(model.of(base_url).requests) == 2


async def test_spending_more_than_policy_max_cost_fails_budget_exceeded(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    # Given 1.0 per 1000 prompt tokens: the second call's 100 more tokens pass 0.1
    base_url = model.script(
        call(("demo__echo", {"msg": "a"}), tokens_in=60), say("done", tokens_in=100)
    )
    agent = Agent(settings(fabric, agent_key, base_url, price_in_per_1k=1.0))
    async with workers(fabric, agent):
        result = await run_agent(fabric, {"goal": "spend", "tools": ["demo.echo"]}, max_cost=0.1)
    assert result.status is Status.FAILED
    details = result.error.details
    assert details["reason"] == "budget_exceeded"
    assert details["tokens_in"] == 160 and details["cost"] == pytest.approx(0.16)


async def test_a_session_continues_the_conversation_across_two_tasks(
    fabric: Fabric, model: ModelServer, agent_key: Path, sessions_dsn: str
) -> None:
    base_url = model.script(say("the capital is Paris"), say("about 2.1 million"))
    agent = Agent(settings(fabric, agent_key, base_url, dsn=sessions_dsn))
    session = f"s-{secrets.token_hex(4)}"
    async with workers(fabric, agent):
        first = await run_agent(fabric, {"goal": "capital of France?", "session_id": session})
        second = await run_agent(fabric, {"goal": "its population?", "session_id": session})
    assert first.status is Status.SUCCESS and second.status is Status.SUCCESS, second.error
    assert second.output["answer"] == "about 2.1 million"
    assert second.output["session_id"] == session
    # The second request to the model carried the first task's conversation
    sent = model.of(base_url).requests[1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert "capital of France?" in sent[1]["content"]
    assert sent[2]["content"] == "the capital is Paris"
    assert "its population?" in sent[3]["content"]


async def test_an_agent_asks_another_agent_through_the_fabric(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    # Given a parent agent that delegates to agent.reason (served by the same pool: two
    # slots, so the parent waiting for its child does not hold the only one)
    base_url = model.script(
        call(("agent__reason", {"goal": "say the password", "tools": ["agent.reason"]})),
        say("swordfish"),  # the child's answer
        say("the child said swordfish"),
    )
    agent = Agent(settings(fabric, agent_key, base_url, price_in_per_1k=0.5, max_depth=1))
    async with workers(fabric, agent, concurrency=2):
        result = await run_agent(fabric, {"goal": "ask a sub-agent", "tools": ["agent.reason"]})
    assert result.status is Status.SUCCESS, result.error
    assert result.output["answer"] == "the child said swordfish"
    assert result.output["tool_calls"][0]["capability"] == "agent.reason"
    # The child, one level down with max_depth = 1, was not offered agent.reason again
    assert "tools" not in model.of(base_url).requests[1]
    parent_view = tool_messages(model.of(base_url).requests[2])[0]
    assert parent_view["output"]["answer"] == "swordfish"
    # The child's cost counts in the parent's: 3 calls of 20 prompt tokens at 0.5 per 1000
    assert result.output["usage"]["cost"] == pytest.approx(0.03)
    assert result.output["usage"]["tokens_in"] == 40  # the parent's own


async def test_an_agent_asks_a_person_through_approval_request_and_continues_after_the_answer(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    # Given a model that asks for an approval, then reports the decision
    base_url = model.script(
        call(("approval__request", {"title": "Refund order 17?", "amount": 1250})),
        say("refund approved by alice"),
    )
    agent = LongAgent(settings(fabric, agent_key, base_url))  # it may wait on a person for hours
    inbox = StandInApproval()
    async with workers(fabric, agent, inbox), fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit(
            "agent.reason", {"goal": "refund order 17", "tools": ["approval.request"]}
        )
        # When the request reaches the person (answered PENDING) and they approve later
        accepted = await handle.accepted(WAIT_S)
        assert accepted.status is Status.PENDING  # the agent's own task: accepted, acked
        await eventually(lambda: bool(inbox.filed), what="the approval request filed")
        assert not handle.done()
        async with Answers(fabric.endpoint.amqp_url, fabric.signer, "alice-inbox") as answers:
            await answers.succeed(inbox.filed[0], {"decision": "approve", "by": "alice"})
        result = await handle.result(WAIT_S)
    # Then the agent read the decision and finished
    assert result.status is Status.SUCCESS, result.error
    assert result.output["answer"] == "refund approved by alice"
    assert inbox.inputs == [{"title": "Refund order 17?", "amount": 1250}]
    (decision,) = tool_messages(model.of(base_url).requests[1])
    assert decision == {"status": "SUCCESS", "output": {"decision": "approve", "by": "alice"}}


async def test_a_cancel_stops_the_loop_and_cancels_the_running_child(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    base_url = model.script(call(("demo__sleep", {"seconds": 30})), say("never asked"))
    agent = Agent(settings(fabric, agent_key, base_url))
    sleeper = RecordingSleep()
    async with workers(fabric, agent, sleeper), fabric.dispatcher() as dispatcher:
        handle = await dispatcher.submit("agent.reason", {"goal": "sleep", "tools": ["demo.sleep"]})
        await eventually(lambda: bool(sleeper.started), what="the child sleeping")
        assert await dispatcher.cancel(handle.task_id, "changed my mind")
        result = await handle.result(WAIT_S)
        await eventually(lambda: sleeper.cancelled == sleeper.started, what="child cancelled")
    assert result.status is Status.FAILED and result.error.code is ErrorCode.CANCELLED
    assert len(model.of(base_url).requests) == 1  # the loop asked nothing more
    # The child ran as the agent's workflow node, in the agent task's trace
    ((node_id, traceparent),) = sleeper.seen
    assert node_id == handle.task.node_id
    assert handle.traceparent is not None and traceparent is not None
    assert traceparent.split("-")[1] == handle.traceparent.split("-")[1]


async def test_a_tool_the_worker_does_not_allow_is_refused_invalid_task(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    base_url = model.script()
    agent = Agent(settings(fabric, agent_key, base_url, tools={}))
    async with workers(fabric, agent):
        result = await run_agent(fabric, {"goal": "x", "tools": ["payment.charge"]})
    assert result.status is Status.FAILED and result.error.code is ErrorCode.INVALID_TASK
    assert "payment.charge not allowed" in result.error.message
    assert model.of(base_url).requests == []


async def test_a_tool_call_naming_a_secret_is_refused_without_a_task(
    fabric: Fabric, model: ModelServer, agent_key: Path
) -> None:
    base_url = model.script(call(("demo__echo", {"msg": {"$secret": "stripe-key"}})), say("ok"))
    agent = Agent(settings(fabric, agent_key, base_url))
    async with workers(fabric, agent):
        result = await run_agent(fabric, {"goal": "leak", "tools": ["demo.echo"]})
    assert result.status is Status.SUCCESS, result.error
    assert result.output["tool_calls"] == [
        {"capability": "demo.echo", "task_id": None, "status": "REFUSED"}
    ]
    (refusal,) = tool_messages(model.of(base_url).requests[1])
    assert refusal["status"] == "REFUSED"
    assert refusal["error"].startswith("secret references are not allowed")


async def test_the_model_client_retries_429_and_5xx_then_answers(model: ModelServer) -> None:
    base_url = model.script(failure(429, retry_after=0), failure(503), say("fine"))
    client = ChatClient(base_url, "scripted", "sk-test", timeout_s=5, max_retries=3, backoff_s=0)
    await client.open()
    try:
        reply = await client.complete([{"role": "user", "content": "hi"}], [])
    finally:
        await client.close()
    assert reply.content == "fine" and (reply.tokens_in, reply.tokens_out) == (20, 5)
    assert len(model.of(base_url).requests) == 3
    assert "tools" not in model.of(base_url).requests[0]  # no tools: none offered


async def test_the_model_client_gives_up_retryable_or_stops_at_a_refusal(
    model: ModelServer,
) -> None:
    base_url = model.script(failure(500), failure(502), failure(401, "Incorrect API key sk-te"))
    client = ChatClient(base_url, "scripted", "sk-test", timeout_s=5, max_retries=1, backoff_s=0)
    await client.open()
    try:
        with pytest.raises(ExecutorError) as unavailable:
            await client.complete([{"role": "user", "content": "hi"}], [])
        with pytest.raises(ExecutorError) as refused:
            await client.complete([{"role": "user", "content": "hi"}], [])
    finally:
        await client.close()
    assert (
        unavailable.value.retryable and unavailable.value.details["reason"] == "model_unavailable"
    )
    assert not refused.value.retryable and refused.value.details == {
        "reason": "model_refused",
        "http_status": 401,
    }
    assert "HTTP 401: Incorrect API key" in str(refused.value)


async def test_an_executor_key_is_refused_as_the_agents_dispatcher_key(
    fabric: Fabric, tmp_path: Path
) -> None:
    scope = KeyScope(Role.EXECUTOR, "worker-1", ("*",))
    private, _ = write_keypair(tmp_path / "keys", Signer.generate(), scope)
    agent = Agent(settings(fabric, private, "http://127.0.0.1:9/v1"))
    with pytest.raises(ConfigError, match="has role executor"):
        await agent.setup()


async def test_the_daemon_runs_the_agent_from_its_config_file_with_a_secret_api_key(
    fabric: Fabric, model: ModelServer, agent_key: Path, tmp_path: Path
) -> None:
    # Given a worker daemon configured by a file, its API key by secret reference
    api_key = "sk-" + secrets.token_hex(12)
    base_url = model.script(call(("demo__echo", {"msg": "from the daemon"})), say("ok"))
    path = tmp_path / "agent.toml"
    path.write_text(
        "[agent.reason]\n"
        f'base_url = "{base_url}"\n'
        'model = "scripted"\n'
        'api_key = {"$secret" = "model-key"}\n'
        f'dispatcher_amqp_url = "{fabric.endpoint.amqp_url}"\n'
        f'dispatcher_key = "{agent_key}"\n'
        f'result_keys = "{trusted(agent_key)}"\n'
        '[agent.reason.tools."demo.echo"]\n'
        'description = "echo"\n'
    )
    await fabric.purge("agent.reason", "demo.echo")
    worker = fabric.spawn_worker(
        ["wayang_workers.agent:Agent", "wayang_workers.demo:Echo"],
        executor_id=f"agent-{secrets.token_hex(3)}",
        args=["--config", str(path), "--secrets", "env", "--concurrency", "2"],
        env={
            "WAYANG_SECRET_MODEL_KEY": api_key,
            "WAYANG_KEY_DIR": str(trusted(agent_key)),
            "WAYANG_SIGNING_KEY": str(fabric.key_dir / f"{fabric.signer.key_id}.key"),
        },
    )
    try:
        await asyncio.to_thread(worker.wait_started)
        result = await run_agent(fabric, {"goal": "echo", "tools": ["demo.echo"]})
    finally:
        worker.stop()
    assert result.status is Status.SUCCESS, result.error
    assert result.output["answer"] == "ok"
    assert tool_messages(model.of(base_url).requests[1])[0]["output"] == {"msg": "from the daemon"}
    assert model.of(base_url).headers[0]["Authorization"] == f"Bearer {api_key}"
    assert api_key not in worker.log()


def test_the_example_settings_file_loads() -> None:
    path = ROOT / "workers" / "examples" / "agent.toml"
    executor = load_executor("wayang_workers.agent:Agent", WorkerFile.read(path))
    assert isinstance(executor, Agent)
    assert executor.settings.model == "gpt-4o-mini"
    assert set(executor.settings.tools) == {"http.call", "db.query"}
    assert executor.settings.tools["http.call"].parameters["required"] == ["url"]
