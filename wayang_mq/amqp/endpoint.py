"""Where a broker answers: its AMQP URL, its management API, the account and the vhost.

Production code needs this to connect and to apply the topology; how a local node is started
is :mod:`wayang_mq.dev`'s business, not this module's.

A cluster is named by several URLs separated by commas, ``amqp://u:p@a:5672/,amqp://u:p@b:5672/``
(``WAYANG_AMQP_URL``, ``WAYANG_MANAGEMENT_URL``): one string travels through every daemon and
CLI command as one URL did, and :func:`wayang_mq.amqp.connect.connect` tries the addresses in
order and moves to the next when its node is gone. A comma inside one URL must be
percent-encoded (``%2C``). Every address must name the same scheme, account and vhost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from wayang_mq.core.errors import ConfigError


def split_urls(urls: str) -> list[str]:
    """The addresses of a comma-separated URL list (one URL is a list of one)."""
    return [url.strip() for url in urls.split(",") if url.strip()]


def _each(urls: str, change: Callable[[str], str]) -> str:
    return ",".join(change(url) for url in split_urls(urls))


def redact_url(url: str) -> str:
    """The URL (or each of a list) with its password replaced, for logs and error messages."""
    if "," in url:
        return _each(url, redact_url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def with_credentials(amqp_url: str, username: str, password: str) -> str:
    """The same broker and vhost, logged in as another account (``wayang-mq access``)."""
    if "," in amqp_url:
        return _each(amqp_url, lambda url: with_credentials(url, username, password))
    parts = urlsplit(amqp_url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal keeps its brackets
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=netloc))


def url_vhost(amqp_url: str) -> str:
    """The vhost an AMQP URL names, as AMQP clients read it: ``amqp://host/`` is ``/``."""
    first = split_urls(amqp_url)[0] if amqp_url.strip() else amqp_url
    return unquote(urlsplit(first).path[1:]) or "/"


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where a broker answers and the account to use; ``repr`` never shows the password."""

    amqp_url: str  # amqp://user:password@host:port/vhost, or several comma-separated
    management_url: str  # http://host:port of the management API and console (or several)
    username: str
    password: str = field(repr=False)

    @classmethod
    def from_url(cls, amqp_url: str, management_url: str | None = None) -> BrokerEndpoint:
        """Describe a broker known by URL (or a cluster by a comma-separated list); the
        management API defaults to port 15672 on each AMQP host."""
        addresses = [urlsplit(url) for url in split_urls(amqp_url)]
        for parts in addresses or [urlsplit(amqp_url)]:
            if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
                raise ConfigError(
                    f"not an AMQP URL: {redact_url(urlunsplit(parts))}",
                    hint="use amqp://user:password@host:5672/ (several: separated by commas)",
                )
        first = addresses[0]
        same = {(p.scheme, p.username, p.password, p.path) for p in addresses}
        if len(same) > 1:
            raise ConfigError(
                f"the AMQP URLs {redact_url(amqp_url)} differ in scheme, account or vhost",
                hint="list the nodes of one cluster, with the same account and vhost",
            )
        username = unquote(first.username or "guest")  # AMQP's default account
        password = unquote(first.password or "guest")
        # RabbitMQ's conventional ports: 15672 for HTTP, 15671 for HTTPS beside amqps.
        default = "https://{}:15671" if first.scheme == "amqps" else "http://{}:15672"
        hosts = dict.fromkeys(str(p.hostname) for p in addresses)
        management = management_url or ",".join(default.format(host) for host in hosts)
        return cls(amqp_url, _each(management, lambda url: url.rstrip("/")), username, password)

    @property
    def amqp_urls(self) -> list[str]:
        """Each node's AMQP URL (one for a single broker)."""
        return split_urls(self.amqp_url)

    @property
    def management_urls(self) -> list[str]:
        """Each node's management API base URL (one for a single broker)."""
        return split_urls(self.management_url)

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
        return f"{self.management_urls[0]}/"

    def __repr__(self) -> str:
        return (
            f"BrokerEndpoint(amqp_url={redact_url(self.amqp_url)!r}, "
            f"management_url={self.management_url!r}, username={self.username!r})"
        )
