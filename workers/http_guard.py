"""Where ``http.call`` may connect: the worker operator's host and network rules (SSRF guard).

A task chooses the URL; the operator chooses what it may reach. Two checks, both needed:

- :meth:`Guard.check_url`, before every hop (the first request and each redirect): the
  scheme, credentials in the URL, the host against ``deny_hosts`` / ``allow_hosts``, the
  port, and a host that is an IP literal (also the legacy forms ``2130706433``, ``0x7f.1``,
  ``127.1`` that ``inet_aton`` accepts), because aiohttp connects to a literal without
  resolving it;
- :class:`GuardedResolver`, at connection time: every address a name resolves to. The
  connection is made to the addresses checked here, never to a second lookup, so a name
  whose DNS answer changes between a check and the connect (DNS rebinding) cannot slip by.

Loopback, private, link-local (the cloud metadata service 169.254.169.254 among them),
unspecified, multicast, reserved, carrier-grade NAT and every other address that is not
globally routable are refused, in IPv4, IPv6 and IPv6 forms that embed an IPv4 address
(mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``), unless the operator
lists them in ``allow_networks``.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from wayang_mq import ErrorCode, ExecutorError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = ("http", "https")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 shared address space
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are IPv4
_METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_HINT = (
    "if the worker is meant to reach it, add its address or network to the worker's "
    '[http.call] allow_networks (e.g. "10.1.2.0/24")'
)


class DestinationRefused(Exception):
    """The guard refused a destination. Not an ``OSError``: aiohttp lets it through from the
    resolver as it is, instead of wrapping it as a DNS failure (which would be retried)."""

    def __init__(self, host: str, why: str, hint: str = _HINT) -> None:
        super().__init__(f"{host}: {why}")
        self.host = host
        self.why = why
        self.hint = hint

    def error(self) -> ExecutorError:
        """The task's error: FAILED ``executor_error``, not retryable."""
        return ExecutorError(
            f"http.call refused destination {self.host}: {self.why}; {self.hint}",
            code=ErrorCode.EXECUTOR_ERROR,
            retryable=False,
            details={"reason": "destination_refused", "host": self.host, "why": self.why},
        )


def host_of(url: URL) -> str:
    """The URL's host as the rules see it: lowercase, no trailing dot, no IPv6 brackets."""
    return (url.host or "").rstrip(".").lower()


def literal_address(host: str) -> Address | None:
    """The address ``host`` spells, if it is an IP literal, legacy IPv4 forms included
    (``2130706433``, ``0x7f.1``, ``127.1``: ``inet_aton`` reads them, and so might a
    resolver); None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def is_canonical_ipv4(host: str) -> bool:
    """True for a dotted quad aiohttp accepts as written (``127.0.0.1``, not ``127.1``)."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64 or 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def why_refused(address: Address) -> str | None:
    """Why an address is not a public destination, or None when it is one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            why = why_refused(embedded)
            return f"an address embedding {embedded}, {why}" if why else None
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address in _METADATA, "the cloud metadata service's address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address in _CGNAT, "a carrier-grade NAT (shared) address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a globally routable address"),
    )
    return next((why for refused, why in checks if refused), None)


@dataclass(frozen=True)
class Guard:
    """The operator's rules, applied to URLs and to resolved addresses."""

    allow_hosts: tuple[str, ...] = ()  # fnmatch patterns; empty: any host
    deny_hosts: tuple[str, ...] = ()  # fnmatch patterns; they win over allow_hosts
    allow_networks: tuple[Network, ...] = ()  # reachable even though not public
    allow_ports: tuple[int, ...] = ()  # empty: any port

    def check_url(self, url: URL) -> None:
        """Raise :class:`DestinationRefused` unless ``url`` may be requested."""
        host = host_of(url)
        if url.scheme not in SCHEMES:
            why = f"scheme {url.scheme!r} is not http or https"
            raise DestinationRefused(host or "?", why, "http.call speaks http and https only")
        if not host:
            raise DestinationRefused("?", "the URL has no host", "a URL must name a host")
        if url.user is not None or url.password is not None:
            why = "the URL carries credentials (user:password@)"
            raise DestinationRefused(host, why, "send them in an Authorization header")
        self.check_host(host)
        if self.allow_ports and url.port not in self.allow_ports:
            raise DestinationRefused(
                host, f"port {url.port} is not in allow_ports", "add it to allow_ports"
            )
        address = literal_address(host)
        if address is not None:
            self.check_address(host, address)

    def check_host(self, host: str) -> None:
        """Apply ``deny_hosts``, then ``allow_hosts``, to a host name or literal."""
        denied = _first_match(host, self.deny_hosts)
        if denied is not None:
            raise DestinationRefused(
                host,
                f"it matches deny_hosts pattern {denied!r}",
                "deny_hosts wins over allow_hosts; remove the pattern to reach it",
            )
        if self.allow_hosts and _first_match(host, self.allow_hosts) is None:
            raise DestinationRefused(
                host, "it is not in allow_hosts", "add it (or a pattern) to allow_hosts"
            )

    def check_address(self, host: str, address: Address) -> None:
        """Refuse an address that is not public, unless ``allow_networks`` holds it."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # the same destination: 127.0.0.1/32 allows it
        if any(address in network for network in self.allow_networks):
            return
        why = why_refused(address)
        if why is not None:
            what = "it is" if host == str(address) else f"it resolves to {address},"
            raise DestinationRefused(host, f"{what} {why} (not in allow_networks)")


def _first_match(host: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(host, p.lower())), None)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, checking every address a name resolves to before aiohttp may
    connect to any of them: one refused address refuses the name (a DNS answer mixing a
    public and a private address is an attack, not a fallback)."""

    def __init__(self, guard: Guard, inner: AbstractResolver) -> None:
        self._guard = guard
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The name's addresses, every one of them checked."""
        results = await self._inner.resolve(host, port, family)
        name = host.rstrip(".").lower()
        for result in results:
            self._guard.check_address(name, ipaddress.ip_address(result["host"]))
        return results

    async def close(self) -> None:
        """Close the wrapped resolver."""
        await self._inner.close()
