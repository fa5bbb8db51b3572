"""Where a broker answers: its AMQP URL, its management API, the account and the vhost.

Production code needs this to connect and to apply the topology; how a local node is started
is :mod:`wayang_mq.dev`'s business, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from wayang_mq.core.errors import ConfigError


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def with_credentials(amqp_url: str, username: str, password: str) -> str:
    """The same broker and vhost, logged in as another account (``wayang-mq access``)."""
    parts = urlsplit(amqp_url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal keeps its brackets
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=netloc))


def url_vhost(amqp_url: str) -> str:
    """The vhost an AMQP URL names, as AMQP clients read it: ``amqp://host/`` is ``/``."""
    return unquote(urlsplit(amqp_url).path[1:]) or "/"


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where a broker answers and the account to use; ``repr`` never shows the password."""

    amqp_url: str  # amqp://user:password@host:port/vhost
    management_url: str  # http://host:port of the management API and console
    username: str
    password: str = field(repr=False)

    @classmethod
    def from_url(cls, amqp_url: str, management_url: str | None = None) -> BrokerEndpoint:
        """Describe a broker known by URL; the management API defaults to port 15672 there."""
        parts = urlsplit(amqp_url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ConfigError(
                f"not an AMQP URL: {redact_url(amqp_url)}",
                hint="use amqp://user:password@host:5672/",
            )
        username = unquote(parts.username or "guest")  # AMQP's default account
        password = unquote(parts.password or "guest")
        # RabbitMQ's conventional ports: 15672 for HTTP, 15671 for HTTPS beside amqps.
        default = "https://{}:15671" if parts.scheme == "amqps" else "http://{}:15672"
        management = management_url or default.format(parts.hostname)
        return cls(amqp_url, management.rstrip("/"), username, password)

    @property
    def vhost(self) -> str:
        """The vhost the AMQP URL names; the management client acts on the same one."""
        return url_vhost(self.amqp_url)

    @property
    def tls(self) -> bool:
        """True when AMQP goes over TLS (``amqps://``)."""
        return urlsplit(self.amqp_url).scheme == "amqps"

    @property
    def console_url(self) -> str:
        """The management console, for people (log in with ``username``/``password``)."""
        return f"{self.management_url.rstrip('/')}/"

    def __repr__(self) -> str:
        return (
            f"BrokerEndpoint(amqp_url={redact_url(self.amqp_url)!r}, "
            f"management_url={self.management_url!r}, username={self.username!r})"
        )
