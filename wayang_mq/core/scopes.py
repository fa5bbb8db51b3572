"""What a key may sign: its role, the identity it speaks for, and the capabilities it covers.

A signature proves who signed; the scope says whether that signer may say *this*. A task
signed by an executor's key, a result signed by another executor's key, a cancel signed by a
dispatcher that did not issue the task: each verifies, and each is refused here. Receivers
ask the scope of the key that verified (:class:`wayang_mq.core.signing.KeyRing` returns it)
before acting on anything.

A scope is a small TOML file beside the public key (``<stem>.toml`` next to ``<stem>.pub``)::

    role = "executor"            # dispatcher | executor | reaper | control-plane | admin
    id = "worker-1"              # the dispatcher or executor id it signs as
    capabilities = ["demo.*"]    # exact names, "prefix.*", or "*"
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from wayang_mq.core.errors import ConfigError
from wayang_mq.core.names import valid_capability


class Role(StrEnum):
    """Who holds a key, which decides what its signatures may carry."""

    DISPATCHER = "dispatcher"  # tasks for its capabilities, issued as itself; its cancels
    EXECUTOR = "executor"  # results, events and attempt records, as itself, for its capabilities
    REAPER = "reaper"  # FAILED answers to dead letters and their compensations, any capability
    CONTROL_PLANE = "control-plane"  # status reports and records (the control plane)
    ADMIN = "admin"  # anything: operators replaying dead letters, cancelling any task


@dataclass(frozen=True, slots=True)
class KeyScope:
    """One key's authority. ``capabilities`` are patterns: ``demo.echo``, ``demo.*``, ``*``."""

    role: Role
    identity: str
    capabilities: tuple[str, ...] = ("*",)

    def covers(self, capability: str) -> bool:
        """True when the key may speak about tasks of ``capability``."""
        return any(_matches(pattern, capability) for pattern in self.capabilities)

    def is_(self, *roles: Role) -> bool:
        """True when the key holds one of ``roles`` (an admin key holds every role)."""
        return self.role is Role.ADMIN or self.role in roles

    def speaks_for(self, identity: str) -> bool:
        """True when the key may sign as ``identity``: its own id, or one of its instances
        ``<id>--<instance>`` (as broker accounts allow); an admin key signs as anyone."""
        if self.role is Role.ADMIN or self.identity == identity:
            return True
        return identity.startswith(f"{self.identity}--") and "--" not in self.identity

    def describe(self) -> str:
        """``executor worker-1 [demo.*]``, for logs and error messages."""
        return f"{self.role.value} {self.identity} [{','.join(self.capabilities)}]"

    def to_toml(self) -> str:
        """The scope file's text."""
        caps = ", ".join(f'"{c}"' for c in self.capabilities)
        return f'role = "{self.role.value}"\nid = "{self.identity}"\ncapabilities = [{caps}]\n'


#: the scope of keys given to a ring without one (tests, embedding): trusted for everything
FULL_TRUST = KeyScope(Role.ADMIN, "admin")


def _matches(pattern: str, capability: str) -> bool:
    if pattern == "*" or pattern == capability:
        return True
    return pattern.endswith(".*") and fnmatch.fnmatchcase(capability, pattern)


def valid_pattern(pattern: str) -> bool:
    """A capability name, ``prefix.*`` or ``*``."""
    if pattern == "*":
        return True
    name = pattern[:-2] if pattern.endswith(".*") else pattern
    return valid_capability(name)


def scope_path(public_key: Path) -> Path:
    """Where the scope of ``<stem>.pub`` lives: ``<stem>.toml``."""
    return public_key.with_suffix(".toml")


def read_scope(path: Path) -> KeyScope:
    """Parse a scope file; a ConfigError names the file and what is wrong in it."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read key scope {path}: {exc}") from exc
    hint = 'a scope file holds role = "...", id = "...", capabilities = ["..."]'
    unknown = set(data) - {"role", "id", "capabilities"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}", hint=hint)
    try:
        role = Role(str(data.get("role")))
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise ConfigError(f"{path}: role must be one of {roles}", hint=hint) from None
    identity = data.get("id")
    if not isinstance(identity, str) or not identity:
        raise ConfigError(f"{path}: id must be a non-empty string", hint=hint)
    capabilities = data.get("capabilities")  # required: "*" is said, never assumed
    if not isinstance(capabilities, list) or not all(
        isinstance(c, str) and valid_pattern(c) for c in capabilities
    ):
        raise ConfigError(
            f"{path}: capabilities must be a list of capability names, 'prefix.*' or '*' "
            '(write ["*"] for every capability)',
            hint=hint,
        )
    return KeyScope(role, identity, tuple(capabilities))
