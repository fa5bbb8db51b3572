"""Broker accounts: one RabbitMQ user per identity, holding only what its role needs.

RabbitMQ checks two kinds of permission for every operation (docs/security.md, section 3):

- *vhost permissions*, three regexes over resource names: ``configure`` (declare, delete),
  ``write`` (publish to an exchange; bind *to* a queue) and ``read`` (consume a queue; bind
  *from* an exchange). Publishing through the default exchange needs write on ``amq.default``.
- *topic permissions*, per topic exchange, two regexes over routing keys: ``write`` is checked
  on ``basic.publish``, ``read`` on the binding key of ``queue.bind`` and ``exchange.bind``
  from that exchange. An exchange for which a user has **no** topic permission is open to
  every key (checked on 3.10), so every role names every fabric exchange it can write or read.

A passive ``queue.declare`` needs no permission at all (checked on 3.10): daemons may check
that their queues exist, and so may anyone else; reading them is what the regexes guard.

The account's name is the identity itself (``demo-0``, ``checkout``): the ``user_id`` the
broker validates on every message then names the executor, dispatcher or reaper that sent
it. One account may run several processes as ``<id>--<instance>`` (their control, reply and
status queues and heartbeat keys carry that id), which is why ids may not contain ``--``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from wayang_mq.amqp.management import JSON, ManagementClient
from wayang_mq.core import names
from wayang_mq.core.errors import ConfigError

__all__ = [
    "INSTANCE_SEPARATOR",
    "NOTHING",
    "Account",
    "AccountView",
    "Granted",
    "Permissions",
    "Role",
    "TopicPermission",
    "account_for",
    "belongs_to",
    "control_plane_account",
    "dispatcher_account",
    "executor_account",
    "grant",
    "instance_id",
    "reaper_account",
    "revoke",
    "show",
]

#: RabbitMQ's idiom for "no resource": only the empty name matches, and no fabric object has one
NOTHING: Final = "^$"
#: ``<account>--<instance>``: one account, several processes (``wayang-mq submit`` runs one each)
INSTANCE_SEPARATOR: Final = "--"
_INSTANCE: Final = r"(?:--[a-z0-9_-]+)?"
_WORD: Final = r"[^.]+"  # one routing-key word (dispatcher ids, tier names)
_ANY_KEY: Final = r".+"  # task ids are free-form: per-task keys cannot be narrowed further
_NO_WILDCARD: Final = r"[^*#]+"  # a task id as a binding key that matches only itself
#: a key that is not ``executor.<id>`` (a lookahead: RabbitMQ's regexes are PCRE)
_NOT_PLACED: Final = r"(?!executor\.)"
_PASSWORD_BYTES: Final = 24  # 32 URL-safe characters, 192 bits


class Role(StrEnum):
    """What an account is for; its tag (``wayang-<role>``) says so in the console."""

    EXECUTOR = "executor"
    DISPATCHER = "dispatcher"
    REAPER = "reaper"
    CONTROL_PLANE = "control-plane"

    @property
    def tag(self) -> str:
        """The RabbitMQ user tag naming the role (no management access comes with it)."""
        return f"wayang-{self.value}"

    @classmethod
    def of_tags(cls, tags: Iterable[str]) -> Role | None:
        """The role a user's tags name, or None for an account wayang-mq did not make."""
        for role in cls:
            if role.tag in tags:
                return role
        return None


@dataclass(frozen=True, slots=True)
class Permissions:
    """Vhost permissions: regexes over exchange and queue names."""

    configure: str
    write: str
    read: str


@dataclass(frozen=True, slots=True)
class TopicPermission:
    """Topic permission on one topic exchange: regexes over routing and binding keys."""

    exchange: str
    write: str
    read: str


@dataclass(frozen=True, slots=True)
class Account:
    """One identity's broker account, as it should be; ``grant`` makes the broker agree."""

    user: str
    role: Role
    permissions: Permissions
    topics: tuple[TopicPermission, ...]


def _names(*resources: str) -> str:
    """A regex matching exactly these names."""
    return "^(?:" + "|".join(resources) + ")$"


def _lit(name: str) -> str:
    return re.escape(name)


def _any_of(words: Sequence[str]) -> str:
    return "(?:" + "|".join(words) + ")"


def _check_id(identity: str) -> str:
    if not names.valid_word(identity) or INSTANCE_SEPARATOR in identity:
        raise ConfigError(
            f"{identity!r} cannot name an account",
            hint="use lowercase letters, digits, '-' or '_' (not '--', which separates instances)",
        )
    return identity


def _check_capabilities(capabilities: Sequence[str]) -> tuple[str, ...]:
    if not capabilities:
        raise ConfigError("an executor account needs at least one --capability")
    for capability in capabilities:
        if not names.valid_capability(capability):
            raise ConfigError(f"{capability!r} is not a capability name", hint="e.g. demo.echo")
    return tuple(dict.fromkeys(capabilities))


def capability_pattern(pattern: str) -> str:
    """A capability, or an AMQP-style pattern of them (``demo.*``: one word, ``payments.#``:
    any words after, ``#``: all), as a regex over routing keys (unanchored)."""
    words = pattern.split(".")
    if "#" in words[:-1] or not all(w in {"*", "#"} or names.valid_word(w) for w in words):
        raise ConfigError(
            f"{pattern!r} is neither a capability nor a pattern of them",
            hint="e.g. demo.echo, demo.* or payments.# ('#' only last)",
        )
    if words == ["#"]:
        return _ANY_KEY
    parts = [_WORD if w == "*" else _lit(w) for w in words if w != "#"]
    return r"\.".join(parts) + (r"(?:\..+)?" if words[-1] == "#" else "")


def executor_account(executor_id: str, capabilities: Sequence[str]) -> Account:
    """Consumes its capabilities' task queues (and shards), its own control queue and its own
    executor queue (``wayang.executor.<me>``, which it declares and binds to
    ``executor.<me>`` on ``wayang.tasks``: the tasks the control plane placed on it); asks
    the control plane for claims (``claim.<its capabilities>``) and reads their replies
    (``claim-reply.<me>``, on its control queue); publishes results, its own events,
    retries (``retry.<tier>.<cap>`` and ``retry.<tier>.place.<cap>``) and dead copies for
    its capabilities, and status reports. Never tasks (write on ``wayang.tasks`` stays
    closed: reading it is only for binding its own key), never another executor's placed
    tasks, never to the default exchange or ``wayang.dlx``."""
    me = _lit(_check_id(executor_id)) + _INSTANCE
    caps = _any_of([_lit(c) for c in _check_capabilities(capabilities)])
    control_queue = _lit("wayang.control.") + me
    own_queue = _lit(names.executor_queue("")) + me
    task_queues = _lit("wayang.task.") + caps + r"(?:\.[0-9]+)?"
    permissions = Permissions(
        configure=_names(control_queue, own_queue),
        # queue.bind needs write on the queue: its own control and executor queues
        write=_names(
            *map(
                _lit,
                (
                    names.RESULTS_EXCHANGE,
                    names.EVENTS_EXCHANGE,
                    names.RETRY_EXCHANGE,
                    names.DEAD_COPY_EXCHANGE,
                    names.CONTROL_EXCHANGE,
                ),
            ),
            control_queue,
            own_queue,
        ),
        # bind needs read on the source exchange: wayang.control (cancel, status, claim
        # replies) and wayang.tasks (executor.<me> only, by the topic permission below)
        read=_names(
            task_queues,
            control_queue,
            own_queue,
            _lit(names.CONTROL_EXCHANGE),
            _lit(names.TASKS_EXCHANGE),
        ),
    )
    topics = (
        TopicPermission(
            names.RESULTS_EXCHANGE,
            write=_names(r"reply\." + _WORD, r"noreply\." + caps),
            read=NOTHING,
        ),
        TopicPermission(
            names.EVENTS_EXCHANGE,
            write=_names(r"(?:heartbeat|registered)\." + me, r"(?:progress|attempt)\." + _ANY_KEY),
            read=NOTHING,
        ),
        # retries of its capabilities (placed ones as retry.<tier>.place.<cap>), and
        # compensations, which name their own capability: the attempt record it signs is
        # what receivers check (docs/security.md §7)
        TopicPermission(
            names.RETRY_EXCHANGE, write=_names(r"retry\." + _WORD + r"\." + _ANY_KEY), read=NOTHING
        ),
        TopicPermission(names.DEAD_COPY_EXCHANGE, write=_names(caps), read=NOTHING),
        TopicPermission(
            names.CONTROL_EXCHANGE,
            write=_names(r"status-reply\." + _WORD, r"claim\." + caps),
            read=_names(r"cancel\.#", r"status\.#", r"claim-reply\." + me),
        ),
        # the binding of its own queue: publishing stays closed (vhost write, and here)
        TopicPermission(names.TASKS_EXCHANGE, write=NOTHING, read=_names(r"executor\." + me)),
        *_closed(names.DEAD_LETTER_EXCHANGE),
    )
    return Account(executor_id, Role.EXECUTOR, permissions, topics)


def dispatcher_account(dispatcher_id: str, capabilities: Sequence[str]) -> Account:
    """Publishes tasks for its capabilities (or patterns), with their capability as key or,
    when their policy needs particular executors, ``place.<capability>``; cancels and status
    requests; declares, binds and reads only its own reply, status-reply, heartbeat-watch and
    progress queues. Never ``executor.<id>``, whatever its patterns: only the control plane places a
    task on one executor."""
    me = _lit(_check_id(dispatcher_id)) + _INSTANCE
    if not capabilities:
        raise ConfigError("a dispatcher account needs at least one capability or pattern")
    caps = _any_of([capability_pattern(c) for c in dict.fromkeys(capabilities)])
    own_queues = _lit("wayang.") + "(?:reply|status-reply|watch|progress)" + r"\." + me
    permissions = Permissions(
        configure=_names(own_queues),
        write=_names(
            _lit(names.TASKS_EXCHANGE),
            _lit(names.CONTROL_EXCHANGE),
            _lit(names.RESULTS_EXCHANGE),  # its own terminal results at its deadline
            own_queues,
        ),
        read=_names(
            own_queues,
            _lit(names.RESULTS_EXCHANGE),
            _lit(names.CONTROL_EXCHANGE),
            _lit(names.EVENTS_EXCHANGE),
        ),
    )
    reply_key = r"reply\." + me
    topics = (
        # a pattern such as "#" would match executor.<id> too: only the control plane places
        TopicPermission(
            names.TASKS_EXCHANGE,
            write=_names(_NOT_PLACED + caps, r"place\." + caps),
            read=NOTHING,
        ),
        TopicPermission(names.RESULTS_EXCHANGE, write=_names(reply_key), read=_names(reply_key)),
        TopicPermission(
            names.CONTROL_EXCHANGE,
            write=_names(r"(?:cancel|status)\." + _ANY_KEY),
            read=_names(r"status-reply\." + me),
        ),
        # the supervisor binds heartbeat.* to watch executors go silent; a caller watching a
        # task's progress binds progress.<task id> (no wildcard word: not everyone's progress)
        TopicPermission(
            names.EVENTS_EXCHANGE,
            write=NOTHING,
            read=_names(r"heartbeat\.\*", r"progress\." + _NO_WILDCARD),
        ),
        *_closed(names.RETRY_EXCHANGE, names.DEAD_COPY_EXCHANGE, names.DEAD_LETTER_EXCHANGE),
    )
    return Account(dispatcher_id, Role.DISPATCHER, permissions, topics)


def reaper_account(reaper_id: str) -> Account:
    """Consumes ``wayang.reaper``; publishes FAILED results and the compensations of the dead
    letters it answers (through a retry tier, to any capability: a compensation names its
    own). It publishes no task: a compensation is the issuer's task plus its attempt record."""
    _check_id(reaper_id)
    permissions = Permissions(
        configure=NOTHING,
        write=_names(_lit(names.RESULTS_EXCHANGE), _lit(names.RETRY_EXCHANGE)),
        read=_names(_lit(names.REAPER_QUEUE)),
    )
    topics = (
        TopicPermission(
            names.RESULTS_EXCHANGE,
            write=_names(r"reply\." + _WORD, r"noreply\." + _ANY_KEY),
            read=NOTHING,
        ),
        TopicPermission(
            names.RETRY_EXCHANGE, write=_names(r"retry\." + _WORD + r"\." + _ANY_KEY), read=NOTHING
        ),
        *_closed(
            names.TASKS_EXCHANGE,
            names.EVENTS_EXCHANGE,
            names.CONTROL_EXCHANGE,
            names.DEAD_COPY_EXCHANGE,
            names.DEAD_LETTER_EXCHANGE,
        ),
    )
    return Account(reaper_id, Role.REAPER, permissions, topics)


def control_plane_account(control_plane_id: str) -> Account:
    """Consumes ``wayang.record`` (its record of every flow, bound by the topology),
    ``wayang.claims`` (executors' claims) and ``wayang.place`` (tasks to place), reads the
    ``wayang.history`` stream (``wayang-mq events`` and ``db rebuild`` run as this role),
    and puts the copies it refuses in ``wayang.record.refused``. It publishes claim replies
    (``claim-reply.<executor>``), placed tasks (``executor.<id>``), re-dispatched tasks of any
    capability, results answered from the record (``reply.*``, ``noreply.*``: duplicates,
    no executor for a policy, re-dispatch notices), cancels and status requests; declares,
    binds and reads only its own ``wayang.cp.<id>[.<name>]`` queues (its status replies among
    them). It consumes no task queue and never publishes to ``wayang.dlx``, retries or dead
    copies.

    The refused copies go through the default exchange, which RabbitMQ checks as write on
    ``amq.default`` alone: not a topic exchange, so no routing key narrows it, and the account
    could put a message in any queue by name. Receivers verify what they get, and the account
    may publish tasks and results anyway; a dedicated exchange would close it."""
    me = _lit(_check_id(control_plane_id)) + _INSTANCE
    own_queues = _lit("wayang.cp.") + me + r"(?:\." + _WORD + ")*"
    permissions = Permissions(
        configure=_names(own_queues),
        # queue.bind needs write on the queue: its own queues
        write=_names(
            *map(
                _lit,
                (
                    names.TASKS_EXCHANGE,
                    names.RESULTS_EXCHANGE,
                    names.CONTROL_EXCHANGE,
                    "amq.default",  # the refused copies, to wayang.record.refused
                ),
            ),
            own_queues,
        ),
        # bind needs read on the source exchange: wayang.control, for its status replies
        read=_names(
            *map(
                _lit,
                (
                    names.RECORD_QUEUE,
                    names.CLAIMS_QUEUE,
                    names.PLACE_QUEUE,
                    names.HISTORY_QUEUE,
                    names.CONTROL_EXCHANGE,
                ),
            ),
            own_queues,
        ),
    )
    topics = (
        # any key: re-dispatches of a task of any capability (its capability, or place.<cap>)
        # and placed tasks (executor.<id>)
        TopicPermission(names.TASKS_EXCHANGE, write=_names(_ANY_KEY), read=NOTHING),
        TopicPermission(
            names.RESULTS_EXCHANGE,
            write=_names(r"reply\." + _WORD, r"noreply\." + _ANY_KEY),
            read=NOTHING,
        ),
        TopicPermission(
            names.CONTROL_EXCHANGE,
            write=_names(r"(?:cancel|status)\." + _ANY_KEY, r"claim-reply\." + _WORD),
            read=_names(r"status-reply\." + me),
        ),
        *_closed(
            names.EVENTS_EXCHANGE,
            names.RETRY_EXCHANGE,
            names.DEAD_COPY_EXCHANGE,
            names.DEAD_LETTER_EXCHANGE,
        ),
    )
    return Account(control_plane_id, Role.CONTROL_PLANE, permissions, topics)


def _closed(*exchanges: str) -> tuple[TopicPermission, ...]:
    """Topic permissions that allow nothing: belt and braces where the vhost permissions
    already refuse (an exchange without any topic permission would allow every key)."""
    return tuple(TopicPermission(exchange, NOTHING, NOTHING) for exchange in exchanges)


def account_for(role: Role, identity: str, capabilities: Sequence[str] = ()) -> Account:
    """The account of ``identity`` in ``role`` (capabilities for executors and dispatchers)."""
    if role is Role.EXECUTOR:
        return executor_account(identity, capabilities)
    if role is Role.DISPATCHER:
        return dispatcher_account(identity, capabilities)
    if role is Role.REAPER:
        return reaper_account(identity)
    return control_plane_account(identity)


def instance_id(account: str) -> str:
    """A fresh id for one more process of ``account`` (``checkout--3f9a1c2e``)."""
    return f"{account}{INSTANCE_SEPARATOR}{secrets.token_hex(4)}"


def belongs_to(identity: str, account: str) -> bool:
    """True when a process with ``identity`` may run under ``account``."""
    return identity == account or identity.startswith(account + INSTANCE_SEPARATOR)


# -- on the broker -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    """What ``grant`` did; ``password`` is set only when a new one was made (shown once)."""

    account: Account
    created: bool
    password: str | None = None

    def __repr__(self) -> str:
        return f"Granted(user={self.account.user!r}, created={self.created})"


@dataclass(frozen=True)
class AccountView:
    """What the broker holds for one wayang-mq account."""

    user: str
    role: Role
    permissions: JSON | None
    topics: tuple[JSON, ...]


def grant(client: ManagementClient, account: Account, *, new_password: bool = False) -> Granted:
    """Create the account, or bring an existing one of the same role up to date.

    An existing account keeps its password unless ``new_password`` (rotation). A user that
    wayang-mq did not make, or one of another role, is refused: never turned into something
    else (the administrator running this must not lose its own rights by a typo).
    """
    existing = client.get_user(account.user)
    tags = [account.role.tag]
    if existing is None or new_password:
        if existing is not None:
            _check_role(existing, account)
        password = secrets.token_urlsafe(_PASSWORD_BYTES)
        client.put_user(account.user, tags=tags, password=password)
    else:
        _check_role(existing, account)
        password = None
        client.put_user(
            account.user,
            tags=tags,
            password_hash=existing.get("password_hash", ""),
            hashing_algorithm=existing.get("hashing_algorithm"),
        )
    # Topic permissions first: until its vhost permissions exist the user cannot even open
    # the vhost, and an exchange without a topic permission would be open to every key.
    for topic in account.topics:
        client.put_topic_permission(
            account.user, exchange=topic.exchange, write=topic.write, read=topic.read
        )
    perms = account.permissions
    client.put_permissions(
        account.user, configure=perms.configure, write=perms.write, read=perms.read
    )
    return Granted(account, created=existing is None, password=password)


def _check_role(existing: JSON, account: Account) -> None:
    tags = _tags(existing)
    role = Role.of_tags(tags)
    if role is None:
        shown = ",".join(tags) or "none"
        raise ConfigError(
            f"user {account.user!r} exists and is not a wayang-mq account (tags: {shown})",
            hint="choose another id; `access` never changes users it did not create",
        )
    if role is not account.role:
        raise ConfigError(
            f"user {account.user!r} is a {role} account, not a {account.role}",
            hint=f"revoke it first: wayang-mq access revoke {account.user}",
        )


def revoke(client: ManagementClient, user: str) -> bool:
    """Delete a wayang-mq account (False when there is none). The broker closes the user's
    open connections itself (``CONNECTION_FORCED``) and refuses its reconnects."""
    existing = client.get_user(user)
    if existing is None:
        return False
    if Role.of_tags(_tags(existing)) is None:
        raise ConfigError(
            f"user {user!r} is not a wayang-mq account",
            hint="`access revoke` deletes only accounts `access grant` made",
        )
    return client.delete_user(user)


def show(client: ManagementClient, user: str | None = None) -> list[AccountView]:
    """The wayang-mq accounts (or one), with what the broker holds for them."""
    if user is not None:
        found = client.get_user(user)
        users = [found] if found is not None else []
    else:
        users = client.list_users()
    views = []
    for entry in sorted(users, key=lambda u: str(u.get("name"))):
        role = Role.of_tags(_tags(entry))
        if role is None:
            continue
        name = str(entry["name"])
        topics = tuple(sorted(client.get_topic_permissions(name), key=lambda t: t["exchange"]))
        views.append(AccountView(name, role, client.get_permissions(name), topics))
    return views


def _tags(user: JSON) -> list[str]:
    """A user's tags: a list on newer brokers, a comma-separated string on 3.10."""
    tags = user.get("tags") or []
    if isinstance(tags, str):
        tags = tags.split(",")
    return [str(tag).strip() for tag in tags if str(tag).strip()]
