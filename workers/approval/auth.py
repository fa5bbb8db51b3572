"""Who may sign in to the inbox: users and groups from the executor's settings, passwords
checked against their Argon2id hashes (argon2-cffi), and a limit on wrong passwords per user
and address. Sessions and their CSRF tokens live in the store (:mod:`.store`)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from .models import User

_HASHER = PasswordHasher()  # Argon2id with argon2-cffi's current recommended parameters
#: checked when the user does not exist, so a wrong name takes as long as a wrong password
_DUMMY_HASH = _HASHER.hash("not a password anybody has")


def hash_password(password: str) -> str:
    """An Argon2id hash of ``password`` for a user's ``password_hash`` setting."""
    return _HASHER.hash(password)


@dataclass(frozen=True)
class Person:
    """A signed-in user."""

    name: str
    groups: tuple[str, ...]
    display_name: str


class Users:
    """The configured users; checks passwords off the event loop (Argon2 is slow on purpose)."""

    def __init__(self, users: Mapping[str, User]) -> None:
        self._users = dict(users)

    def get(self, name: str) -> Person | None:
        """The user named ``name``, if configured."""
        user = self._users.get(name)
        if user is None:
            return None
        return Person(name, user.groups, user.display_name or name)

    async def check(self, name: str, password: str) -> Person | None:
        """The user, when ``password`` is theirs."""
        user = self._users.get(name)
        stored = user.password_hash if user is not None else _DUMMY_HASH
        ok = await asyncio.to_thread(_verify, stored, password)
        return self.get(name) if ok and user is not None else None


def _verify(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


class LoginLimit:
    """At most ``max_failures`` wrong passwords per (user, address) in ``window_s``; then
    sign-ins for that pair are refused until the oldest failure leaves the window. Kept in
    memory: a restart forgets it (Argon2's cost still slows guessing)."""

    def __init__(self, max_failures: int, window_s: float) -> None:
        self._max = max_failures
        self._window_s = window_s
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def wait_s(self, user: str, ip: str) -> float:
        """0 when a sign-in may be tried now; else how long to wait."""
        failures = self._recent(user, ip)
        if len(failures) < self._max:
            return 0.0
        return max(0.0, failures[0] + self._window_s - time.monotonic())

    def failed(self, user: str, ip: str) -> None:
        """Count a wrong password."""
        self._recent(user, ip).append(time.monotonic())
        if len(self._failures) > 10_000:  # bounded: drop the stalest pairs
            for key in list(self._failures)[:1000]:
                del self._failures[key]

    def succeeded(self, user: str, ip: str) -> None:
        """A right password clears the pair's failures."""
        self._failures.pop((user, ip), None)

    def _recent(self, user: str, ip: str) -> deque[float]:
        failures = self._failures.setdefault((user, ip), deque())
        while failures and failures[0] < time.monotonic() - self._window_s:
            failures.popleft()
        return failures
