"""A small client for the RabbitMQ management HTTP API, on the standard library.

Policies and definitions import exist only in the HTTP API (not in AMQP), and it is also how
``topology apply`` sees what the broker already has. Calls block: async code runs them in a
thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import base64
import copy
import html
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote, urlsplit

from wayang_mq.core.errors import BrokerUnreachable, TopologyError

JSON = dict[str, Any]

_START_HINT: Final = "is the broker running? start one with `wayang-mq dev`"
_BODY_IN_ERRORS: Final = 300  # characters of an error body worth a one-line message


class ManagementClient:
    """The management API of one broker, acting on one vhost (default ``/``).

    ``base_url`` may list a cluster's nodes, comma-separated: a request goes to the node that
    answered last and moves on to the next when one cannot be reached (any node answers for
    the whole cluster).
    """

    __slots__ = ("_auth", "_base_urls", "_ssl_context", "_timeout_s", "_username", "_vhost")

    def __init__(
        self,
        base_url: str,
        *,
        username: str,
        password: str,
        vhost: str = "/",
        timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._base_urls = [url.strip().rstrip("/") for url in base_url.split(",") if url.strip()]
        for url in self._base_urls or [base_url]:
            parts = urlsplit(url)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"management URL must be http(s)://host:port, got {url!r}")
        self._username = username
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._auth = f"Basic {token}"  # the password is kept only inside this header
        self._vhost = vhost
        self._timeout_s = timeout_s
        self._ssl_context = ssl_context  # None: the system's CAs for https

    def __repr__(self) -> str:
        return (
            f"ManagementClient({','.join(self._base_urls)!r}, username={self._username!r},"
            f" vhost={self._vhost!r})"
        )

    @property
    def base_url(self) -> str:
        """The API's root URL, e.g. ``http://127.0.0.1:15672`` (the node answering now)."""
        return self._base_urls[0]

    @property
    def _base_url(self) -> str:
        return self._base_urls[0]

    @property
    def vhost(self) -> str:
        """The vhost the object-level calls act on."""
        return self._vhost

    def for_vhost(self, vhost: str) -> ManagementClient:
        """The same broker and credentials, acting on another vhost."""
        clone = copy.copy(self)
        clone._vhost = vhost
        return clone

    # -- reading ---------------------------------------------------------------------------

    def overview(self) -> JSON:
        """Broker-wide facts: versions, enabled exchange types, cluster name."""
        result: JSON = self._request("GET", "/api/overview")
        return result

    def vhost_exists(self) -> bool:
        """True when the client's vhost exists (object calls on a missing one answer 404)."""
        return self._request("GET", f"/api/vhosts/{self._v}", none=True) is not None

    def list_exchanges(self) -> list[JSON]:
        """The vhost's exchanges, including the built-in ``amq.*`` ones."""
        return self._list(f"/api/exchanges/{self._v}")

    def list_queues(self) -> list[JSON]:
        """The vhost's queues; ``policy`` fields lag up to one stats interval (~5 s)."""
        return self._list(f"/api/queues/{self._v}")

    def list_nodes(self) -> list[JSON]:
        """The cluster's nodes: ``name``, ``running``, ``mem_alarm``, ``disk_free_alarm``, ..."""
        return self._list("/api/nodes")

    def list_consumers(self) -> list[JSON]:
        """The vhost's consumers: ``queue``, ``consumer_tag``, ``channel_details``, ..."""
        return self._list(f"/api/consumers/{self._v}")

    def list_connections(self) -> list[JSON]:
        """The vhost's client connections: ``name``, ``user_provided_name`` (ours name the
        daemon), ``user``, ``state``, ..."""
        return self._list(f"/api/vhosts/{self._v}/connections")

    def get_queue(self, name: str) -> JSON | None:
        """One queue, or None when it does not exist."""
        result: JSON | None = self._request("GET", f"/api/queues/{self._v}/{_seg(name)}", none=True)
        return result

    def list_bindings(self) -> list[JSON]:
        """The vhost's bindings, including the implicit default-exchange ones (source "")."""
        return self._list(f"/api/bindings/{self._v}")

    def list_policies(self) -> list[JSON]:
        """The vhost's (user) policies."""
        return self._list(f"/api/policies/{self._v}")

    def get_policy(self, name: str) -> JSON | None:
        """One policy, or None when it does not exist."""
        path = f"/api/policies/{self._v}/{_seg(name)}"
        result: JSON | None = self._request("GET", path, none=True)
        return result

    # -- writing ---------------------------------------------------------------------------

    def put_policy(
        self,
        name: str,
        *,
        pattern: str,
        definition: Mapping[str, Any],
        priority: int = 0,
        apply_to: str = "queues",
    ) -> None:
        """Create or replace a policy; the broker applies it to matching queues at once."""
        body = {
            "pattern": pattern,
            "definition": dict(definition),
            "priority": priority,
            "apply-to": apply_to,
        }
        self._request("PUT", f"/api/policies/{self._v}/{_seg(name)}", body)

    def delete_policy(self, name: str) -> None:
        """Delete a policy (absent is fine)."""
        self._request("DELETE", f"/api/policies/{self._v}/{_seg(name)}", none=True)

    def import_definitions(self, definitions: Mapping[str, Any]) -> None:
        """Import a definitions document, as the console's "Import definitions" does.

        Objects go to the vhosts the document names (creating those listed in ``vhosts``).
        """
        self._request("POST", "/api/definitions", dict(definitions))

    def create_vhost(self, name: str) -> None:
        """Create a vhost (existing is fine) and give this client's user full permissions."""
        self._request("PUT", f"/api/vhosts/{_seg(name)}", {})
        perms = {"configure": ".*", "write": ".*", "read": ".*"}
        self._request("PUT", f"/api/permissions/{_seg(name)}/{_seg(self._username)}", perms)

    def delete_vhost(self, name: str) -> None:
        """Delete a vhost and everything in it (absent is fine)."""
        self._request("DELETE", f"/api/vhosts/{_seg(name)}", none=True)

    # -- users and permissions (wayang_mq.security.accounts) ---------------------------------

    def list_users(self) -> list[JSON]:
        """Every user of the broker: ``name``, ``tags``, ``password_hash``, ..."""
        return self._list("/api/users")

    def get_user(self, name: str) -> JSON | None:
        """One user, or None when there is none of that name."""
        result: JSON | None = self._request("GET", f"/api/users/{_seg(name)}", none=True)
        return result

    def put_user(
        self,
        name: str,
        *,
        tags: Sequence[str],
        password: str | None = None,
        password_hash: str | None = None,
        hashing_algorithm: str | None = None,
    ) -> None:
        """Create or replace a user. Give ``password``, or the ``password_hash`` (and its
        algorithm) that ``get_user`` returned to keep the current one: with neither, the
        broker would leave the user no password at all."""
        body: JSON = {"tags": ",".join(tags)}  # 3.10 takes tags as one comma-separated string
        if password is not None:
            body["password"] = password
        elif password_hash is not None:
            body["password_hash"] = password_hash
            if hashing_algorithm:
                body["hashing_algorithm"] = hashing_algorithm
        else:
            raise ValueError("put_user needs a password or the current password_hash")
        self._request("PUT", f"/api/users/{_seg(name)}", body)

    def delete_user(self, name: str) -> bool:
        """Delete a user (False when there was none). The broker closes its connections
        (``CONNECTION_FORCED - user '...' is deleted``)."""
        if self.get_user(name) is None:
            return False
        self._request("DELETE", f"/api/users/{_seg(name)}", none=True)
        return True

    def put_permissions(self, user: str, *, configure: str, write: str, read: str) -> None:
        """Set a user's permissions (three regexes over resource names) on this vhost."""
        body = {"configure": configure, "write": write, "read": read}
        self._request("PUT", f"/api/permissions/{self._v}/{_seg(user)}", body)

    def get_permissions(self, user: str) -> JSON | None:
        """A user's permissions on this vhost, or None when it has none."""
        path = f"/api/permissions/{self._v}/{_seg(user)}"
        result: JSON | None = self._request("GET", path, none=True)
        return result

    def put_topic_permission(self, user: str, *, exchange: str, write: str, read: str) -> None:
        """Set a user's topic permission on one topic exchange of this vhost (regexes over
        routing keys: ``write`` for publishing, ``read`` for binding keys)."""
        body = {"exchange": exchange, "write": write, "read": read}
        self._request("PUT", f"/api/topic-permissions/{self._v}/{_seg(user)}", body)

    def get_topic_permissions(self, user: str) -> list[JSON]:
        """A user's topic permissions on this vhost, one per exchange."""
        path = f"/api/topic-permissions/{self._v}/{_seg(user)}"
        result: list[JSON] | None = self._request("GET", path, none=True)
        return result or []

    # -- transport -------------------------------------------------------------------------

    @property
    def _v(self) -> str:
        return _seg(self._vhost)

    def _list(self, path: str) -> list[JSON]:
        result: list[JSON] = self._request("GET", path)
        return result

    def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, none: bool = False
    ) -> Any:
        """Send one request; JSON back. ``none``: a 404 answers None instead of raising.

        An unreachable node is skipped for the next one (the list rotates, so the next
        request starts at the node that answered); the first node's error if none answers.
        """
        failure: BrokerUnreachable | None = None
        for _ in range(len(self._base_urls)):
            try:
                return self._request_once(method, path, body, none=none)
            except _NodeUnreachable as exc:  # refused credentials are the same on every node
                failure = failure or exc
                self._base_urls.append(self._base_urls.pop(0))
        assert failure is not None
        raise failure

    def _request_once(
        self, method: str, path: str, body: Mapping[str, Any] | None, *, none: bool
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base_url + path, data=data, method=method)
        request.add_header("Authorization", self._auth)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(
                request, timeout=self._timeout_s, context=self._ssl_context
            ) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and none:
                return None
            raise self._http_error(method, path, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None
        return json.loads(payload) if payload else None

    def _http_error(
        self, method: str, path: str, exc: urllib.error.HTTPError
    ) -> BrokerUnreachable | TopologyError:
        if exc.code == 401:
            return BrokerUnreachable(
                f"management API at {self._base_url} refused user {self._username!r} (HTTP 401)",
                hint="check the username and password; the user needs the management tag",
            )
        text = exc.read().decode("utf-8", "replace")
        return TopologyError(
            f"management API {method} {path} failed: HTTP {exc.code} {_reason(text)}",
            hint="see the broker log for details" if exc.code >= 500 else None,
        )

    def _unreachable(self, exc: OSError) -> _NodeUnreachable:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, socket.timeout | TimeoutError):
            what = f"timed out after {self._timeout_s:g} s"
        elif isinstance(reason, ssl.SSLCertVerificationError):
            return _NodeUnreachable(
                f"the management API's certificate at {self._base_url} is not trusted: "
                f"{reason.verify_message or reason}",
                hint="set WAYANG_TLS_CA to the CA that issued the broker's certificate",
            )
        else:
            what = str(reason)
        return _NodeUnreachable(
            f"cannot reach the management API at {self._base_url}: {what}", hint=_START_HINT
        )


class _NodeUnreachable(BrokerUnreachable):
    """This node's API did not answer (another node of a cluster may)."""


def _seg(value: str) -> str:
    """One URL path segment: the default vhost ``/`` must travel as ``%2F``."""
    return quote(value, safe="")


def _reason(text: str) -> str:
    """The broker's own explanation out of an error body, kept to one short line."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("reason"):
        text = str(body["reason"])
    # The broker HTML-escapes Erlang terms in reasons (&lt;&lt;"key"&gt;&gt;).
    return " ".join(html.unescape(text).split())[:_BODY_IN_ERRORS]
