"""Secrets by reference: tasks name secrets, workers resolve them at execution time.

A task's ``input`` never holds a secret value, only a **reference**: a map with exactly one
key, ``"$secret"``, whose value is a secret name (:data:`NAME_PATTERN`)::

    {"url": "https://api.stripe.com/v1/charges", "api_key": {"$secret": "stripe"}}

The references are what the issuer signed, so the signed body, the broker's queues, the
dead-letter copies and any store of tasks hold names only. The worker resolves the names
through its :class:`SecretProvider` when the task starts, and the executor receives:

- ``task.input`` with each reference replaced by a :class:`Secret`, a value object whose
  ``str``/``repr`` is ``[secret:stripe]`` (a careless log or f-string shows the name, not the
  value) and whose :meth:`Secret.reveal` gives the value. msgpack, JSON and pickle refuse it,
  so returning it in an output fails the task ``invalid_result`` instead of publishing it;
- ``ctx.secrets`` (``current().secrets["stripe"]``), the same objects by name.

Why replace in place rather than only offering ``ctx.secrets``: the reference's position
says what the secret is for (a header, a DSN), an executor written against plain inputs keeps
working with one ``.reveal()``, and nothing ever holds the value as a plain ``str`` unless the
executor asks for it. Only the secrets the task references are resolved and offered: the
references are the task's grant, and an executor may narrow what it accepts with
``Executor.allowed_secrets``.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn, Protocol, runtime_checkable

from wayang_mq.core import logs
from wayang_mq.core.errors import ErrorCode, WayangError
from wayang_mq.core.fields import printable
from wayang_mq.core.redact import MIN_LENGTH, REDACTOR, Redactor

log = logging.getLogger("wayang_mq.security.secrets")

#: the one key of a reference map
REFERENCE_KEY = "$secret"
MAX_NAME_LENGTH = 128
#: a secret name: ASCII letters, digits, ``_``, ``-`` and ``.``, starting with a letter or a
#: digit (so never ``..`` nor a hidden file), 1 to 128 characters
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = (
    "a secret name is ASCII letters, digits, '_', '-' and '.', starting with a letter or a "
    f"digit, at most {MAX_NAME_LENGTH} characters"
)


def valid_name(name: object) -> bool:
    """True if ``name`` may name a secret."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


class Secret:
    """A resolved secret: shows as ``[secret:<name>]``, gives its value only on :meth:`reveal`.

    It refuses to be pickled, and msgpack and JSON cannot encode it: a secret cannot leave
    the worker inside an output by accident.
    """

    __slots__ = ("_value", "name")

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self._value = value

    def reveal(self) -> str:
        """The value. Use it where it is needed (a header, a connection); do not log it."""
        return self._value

    def __str__(self) -> str:
        return f"[secret:{self.name}]"

    __repr__ = __str__

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{self} cannot be pickled")


class SecretUnavailable(WayangError):
    """A referenced secret could not be had: unknown to the providers, not allowed for the
    capability, or a provider failed. The message names the secret, never a value.

    Providers raise it with ``retryable=True`` for a failure that may pass (a store that did
    not answer); the task then fails ``secret_unavailable`` and its retry hints apply.
    """

    code = ErrorCode.SECRET_UNAVAILABLE

    def __init__(self, message: str, *, retryable: bool = False, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


class BadReference(WayangError):
    """A map holds the ``$secret`` key but is not a reference (other keys, or not a name):
    the task is wrong, retrying cannot help."""

    code = ErrorCode.INVALID_TASK


@runtime_checkable
class SecretProvider(Protocol):
    """Where a worker finds secret values: environment, files, an encrypted file, a vault.

    ``get`` returns the value, or None when the name is unknown here (a chain then asks the
    next provider). It raises :class:`SecretUnavailable` when it cannot tell (``retryable``
    when the failure may pass). It must not put a value in an error message. A Vault-like
    store implements this one method (cache and renew inside it); see
    :mod:`wayang_mq.security.providers`.
    """

    async def get(self, name: str) -> str | None: ...


# -- references in an input tree -----------------------------------------------------------


def is_reference(value: object) -> bool:
    """True for a well-formed reference map."""
    return (
        isinstance(value, Mapping)
        and len(value) == 1
        and REFERENCE_KEY in value
        and valid_name(value[REFERENCE_KEY])
    )


def references(value: Any) -> frozenset[str]:
    """The secret names referenced anywhere in ``value`` (maps and arrays, at any depth).

    Raises :class:`BadReference` for a map that holds the ``$secret`` key but is not a
    reference, so a misspelt reference never travels on as a plain value. Iterative: an
    input may nest as deep as msgpack allows, far past Python's recursion limit.
    """
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if REFERENCE_KEY in item:
                if not is_reference(item):
                    _bad_reference(_path_to(value, item))
                found.add(item[REFERENCE_KEY])
            else:
                stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return frozenset(found)


def _path_to(root: Any, target: Any) -> str:
    """Where ``target`` sits in ``root`` (``input.a.b[2]``), for the error message only."""
    stack: list[tuple[Any, str]] = [(root, "input")]
    while stack:
        item, path = stack.pop()
        if item is target:
            return path
        if isinstance(item, Mapping):
            stack.extend((child, f"{path}.{key}") for key, child in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{n}]") for n, child in enumerate(item))
    return "input"


def _bad_reference(path: str) -> NoReturn:
    # Never echo the map: a caller who put a value where the name goes would see it logged.
    raise BadReference(
        f"{printable(path, limit=200)} holds {REFERENCE_KEY!r} but is not a secret reference",
        hint=f'a reference is a map with the one key "{REFERENCE_KEY}" and a name; {NAME_RULE}',
    )


def substitute(value: Any, secrets: Mapping[str, Secret]) -> Any:
    """A copy of ``value`` with each reference replaced by its :class:`Secret`."""
    if isinstance(value, Mapping):
        if is_reference(value):
            return secrets[value[REFERENCE_KEY]]
        return {key: substitute(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(substitute(item, secrets) for item in value)
    return value


def shown(value: Any) -> Any:
    """A copy of ``value`` with each :class:`Secret` replaced by its ``[secret:<name>]`` form:
    for what is published beside an output (progress and heartbeat details, error details),
    where a Secret would otherwise fail the message's encoding."""
    if isinstance(value, Secret):
        return str(value)
    if isinstance(value, Mapping):
        return {shown(key): shown(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(shown(item) for item in value)
    return value


# -- resolving --------------------------------------------------------------------------------


class Resolver:
    """Resolves a task's references through a provider, and registers every value it hands
    out with the redactor before anyone can see it."""

    def __init__(self, provider: SecretProvider, redactor: Redactor = REDACTOR) -> None:
        self._provider = provider
        self._redactor = redactor

    async def resolve(
        self, names: Iterable[str], allowed: Sequence[str] = ("*",), *, capability: str = ""
    ) -> dict[str, Secret]:
        """Each name's :class:`Secret`; :class:`SecretUnavailable` for the first that fails."""
        resolved: dict[str, Secret] = {}
        for name in sorted(names):
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed):
                raise SecretUnavailable(
                    f"secret {name!r} is not allowed for capability {capability!r}",
                    hint="list it in the executor's allowed_secrets",
                )
            resolved[name] = Secret(name, await self._value(name))
        return resolved

    async def _value(self, name: str) -> str:
        try:
            value = await self._provider.get(name)
        except SecretUnavailable:
            raise
        except Exception as exc:  # a provider's bug or outage must fail the task, not the worker
            logs.event(
                log,
                "secret.provider_failed",
                logging.WARNING,
                secret=name,
                error=printable(f"{type(exc).__name__}: {exc}"),
            )
            raise SecretUnavailable(
                f"secret {name!r}: the provider failed ({type(exc).__name__})", retryable=True
            ) from None
        if value is None:
            raise SecretUnavailable(
                f"secret {name!r} is not known to this worker's secret providers",
                hint="add it to a provider (see `wayang-mq worker --secrets`)",
            )
        if not isinstance(value, str):
            raise SecretUnavailable(f"secret {name!r}: the provider returned no text")
        if len(value) < MIN_LENGTH:
            # A value this short cannot be redacted from logs without destroying them.
            raise SecretUnavailable(
                f"secret {name!r} is shorter than {MIN_LENGTH} characters: too short to redact"
            )
        self._redactor.add(name, value)
        return value
