"""Executor settings: what a worker's operator configures for an executor (hosts it may
call, database connections, the commands it may run), kept apart from what a task may ask.

A task is signed by whoever may dispatch it; settings are the worker operator's. Anything a
task must not choose (an allowlist, a DSN, a command line) lives here, in the worker's
``--config`` file (TOML), in the table named after the executor's first capability::

    [http.call]                     # wayang_workers.http_call:HttpCall
    allow_hosts = ["api.example.com"]

    [db.query.connections.reporting]
    dsn = {"$secret" = "reporting-dsn"}   # resolved through the worker's --secrets

Values that are secrets are references (:class:`SecretRef`), resolved when the executor
sets up, through the same providers as tasks' references, and redacted from every log line.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wayang_mq.core.errors import ConfigError, ErrorCode, ExecutorError
from wayang_mq.core.fields import printable
from wayang_mq.security.secrets import NAME_PATTERN, REFERENCE_KEY

M = TypeVar("M", bound=BaseModel)

__all__ = [
    "SecretRef",
    "WorkerFile",
    "describe_errors",
    "parse_input",
    "parse_settings",
]


class SecretRef(BaseModel):
    """A setting that is a secret, by name: ``{"$secret" = "reporting-dsn"}`` in TOML.

    Resolve it in ``setup`` with ``await self.reveal(ref)`` (a plain string setting is
    returned as it is, so a setting may be either)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str = Field(alias=REFERENCE_KEY, pattern=NAME_PATTERN.pattern)


def describe_errors(exc: ValidationError, root: str) -> str:
    """A pydantic error as one readable line: ``input.url: Field required; ...`` (values
    are never echoed: they may be secrets)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join([root, *(str(p) for p in error["loc"])])
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return printable("; ".join(parts), limit=1000)


def parse_input(model: type[M], value: Any) -> M:
    """The task's input as ``model``; a mismatch fails the task ``invalid_task`` (not
    retryable) with a message naming each bad field."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ExecutorError(
            describe_errors(exc, "input"), code=ErrorCode.INVALID_TASK, retryable=False
        ) from None


def parse_settings(model: type[M], table: Mapping[str, Any], where: str) -> M:
    """An executor's settings as ``model``; a mismatch is a :class:`ConfigError` naming the
    table and each bad key (the worker refuses to start)."""
    try:
        return model.model_validate(dict(table))
    except ValidationError as exc:
        raise ConfigError(
            f"bad settings: {describe_errors(exc, f'[{where}]')}",
            hint="see docs/executors.md for the executor's settings",
        ) from None


class WorkerFile:
    """A worker's ``--config`` file: one TOML table per executor, by capability."""

    def __init__(self, doc: Mapping[str, Any], source: str = "<settings>") -> None:
        self._doc = doc
        self.source = source

    @classmethod
    def read(cls, path: Path) -> WorkerFile:
        """Parse ``path``; a missing or malformed file is a :class:`ConfigError`."""
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        return cls(doc, str(path))

    def table(self, capability: str) -> dict[str, Any]:
        """The table ``[<capability>]`` (TOML nests dotted names: ``[http.call]`` is the
        table ``call`` inside ``http``); empty when the file has none."""
        node: Any = self._doc
        for part in capability.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return {}
            node = node[part]
        if not isinstance(node, Mapping):
            raise ConfigError(f"{self.source}: [{capability}] must be a table")
        return dict(node)
