"""approval.request's settings (the worker operator's ``[approval.request]`` table) and a
task's input (what the dispatcher asks a person)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from wayang_mq.runtime.settings import SecretRef

#: the types a negotiable field may have, as a task names them
FieldType = Literal["int", "number", "string", "bool"]


class User(BaseModel):
    """A person who may sign in: an Argon2 hash of their password (make one with
    ``python -m wayang_workers.approval.hash``), their groups, the name shown."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    password_hash: str = Field(pattern=r"^\$argon2(id|i|d)\$")
    groups: tuple[str, ...] = ()
    display_name: str = ""


class ApprovalSettings(BaseModel):
    """``[approval.request]`` in the worker's ``--config`` file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dsn: str | SecretRef = ""  # PostgreSQL: requests, decisions, audit, sessions
    host: str = "127.0.0.1"  # where the inbox listens
    port: int = Field(default=8089, ge=0, le=65535)  # 0: any free port (logged)
    public_url: str = ""  # the inbox as people reach it; default http://host:port
    users: dict[str, User] = Field(default_factory=dict)
    deadline_check_s: float = Field(default=5.0, gt=0)  # how often deadlines are checked
    session_hours: float = Field(default=12.0, gt=0)  # a sign-in lasts this long
    login_max_failures: int = Field(default=5, ge=1)  # wrong passwords per user and address
    login_window_s: float = Field(default=300.0, gt=0)  # ... within this window, then refused
    create_schema: bool = True  # apply schema.sql at setup (idempotent)


class Escalate(BaseModel):
    """At the deadline, hand the request to this group (once) instead of failing it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    escalate_to: str = Field(min_length=1)


class RequestInput(BaseModel):
    """A task's input: what to decide, for whom, by when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = Field(min_length=1, max_length=300)
    context: dict[str, Any] = Field(default_factory=dict)
    assignees: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    deadline_s: float | None = Field(default=None, gt=0)
    deadline: datetime | None = None
    on_deadline: Literal["fail"] | Escalate = "fail"
    editable: dict[str, FieldType] = Field(default_factory=dict)
    requester: str = Field(default="", max_length=200)

    @model_validator(mode="after")
    def _someone_and_one_deadline(self) -> RequestInput:
        if not self.assignees and not self.groups:
            raise ValueError("name assignees or groups: somebody must be able to decide")
        if self.deadline_s is not None and self.deadline is not None:
            raise ValueError("give deadline_s or deadline, not both")
        if self.deadline is not None and self.deadline.tzinfo is None:
            raise ValueError("deadline needs a time zone, e.g. 2026-12-03T18:00:00Z")
        if isinstance(self.on_deadline, Escalate) and self.due(datetime.now(UTC)) is None:
            raise ValueError("on_deadline escalates, but the request has no deadline")
        return self

    def due(self, now: datetime) -> datetime | None:
        """When the request ends (or escalates), if it has a deadline."""
        if self.deadline_s is not None:
            return now + timedelta(seconds=self.deadline_s)
        return self.deadline
