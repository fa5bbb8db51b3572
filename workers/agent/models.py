"""The shapes a stranger codes against: the ``[agent.reason]`` settings (and a tool's), a
task's input, and the output an answer carries.

They live apart from the executor so that docs/executors.md's tables, the example settings
file and the code that reads them can be compared in one short file, and so that the loop
(``loop.py``) can take the settings without importing the executor that runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator

from wayang_mq.core.model import DEFAULT_AUDIENCE, JsonLike
from wayang_mq.core.names import valid_capability
from wayang_mq.runtime.settings import SecretRef

from .schemas import schema_problem

SESSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


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
    # the agent's own dispatcher identity (see the package docstring): required
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

    def token_cost(self, tokens_in: int, tokens_out: int) -> float:
        """What the model's tokens cost at this worker's prices (the budget's own share)."""
        return tokens_in / 1000 * self.price_in_per_1k + tokens_out / 1000 * self.price_out_per_1k


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


class Usage(TypedDict):
    """What a run spent: its own tokens, and the cost including its child agents'. A failed
    run's error details carry the same keys, so a caller reads one shape either way."""

    tokens_in: int
    tokens_out: int
    cost: float


class AgentOutput(TypedDict):
    """A successful task's output (docs/executors.md, `agent.reason`, output schema)."""

    answer: JsonLike  # the JSON answer when output_schema was given, else the model's text
    steps: int  # model requests made
    tool_calls: list[dict[str, Any]]  # each call's {capability, task_id, status}, in order
    usage: Usage
    session_id: str | None
