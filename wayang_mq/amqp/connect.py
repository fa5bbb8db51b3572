"""Where the broker and the keys are, and opening a connection with errors a person can act on.

A URL in the environment wins; otherwise the endpoint that ``wayang-mq dev`` wrote into its
state directory, so a second terminal finds the local stack without copying URLs around.

A cluster is given as comma-separated URLs (see :mod:`wayang_mq.amqp.endpoint`): the first
connection tries them in order, and a lost connection (or a failed reconnect attempt) moves on
to the next address, so a client leaves a dead node at its next attempt (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from wayang_mq.amqp import frames
from wayang_mq.amqp.corked import CorkedTransportFactory
from wayang_mq.amqp.endpoint import BrokerEndpoint, redact_url, split_urls
from wayang_mq.amqp.management import ManagementClient
from wayang_mq.amqp.tls import TlsFiles, check_files, explain
from wayang_mq.core import logs
from wayang_mq.core.errors import BrokerUnreachable

log = logging.getLogger("wayang_mq.amqp.connect")

#: seconds between reconnect attempts with several addresses (aio-pika's default, 5 s, stays
#: for one): the next attempt goes to another node, which is most likely up
FAILOVER_RECONNECT_INTERVAL_S = 1.0

#: the AMQP heartbeat asked for with several addresses, unless a URL sets ``heartbeat=``: a
#: node cut off by a partition is silent, not refused, and the client only notices after
#: missing heartbeats, (heartbeat + 1) x 3 s: 18 s here instead of 183 s at RabbitMQ's 60
FAILOVER_HEARTBEAT_S = 5


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over several node addresses: each lost connection or failed
    attempt moves ``url`` to the next address, so the reconnect loop goes round the cluster.

    aio-pika calls ``_on_connection_close`` both when a live connection closes and when an
    attempt fails, and reads ``self.url`` at every attempt: that is the one hook needed.
    """

    def __init__(self, urls: list[str], first: int = 0, **kwargs: object) -> None:
        self.addresses = [URL(url) for url in urls]
        if len(urls) > 1:
            self.addresses = [
                url
                if "heartbeat" in url.query
                else url.update_query(heartbeat=FAILOVER_HEARTBEAT_S)
                for url in self.addresses
            ]
        self._current = first % len(urls)
        if len(urls) > 1 and "reconnect_interval" not in self.addresses[0].query:
            kwargs.setdefault("reconnect_interval", FAILOVER_RECONNECT_INTERVAL_S)
        super().__init__(self.addresses[self._current], **kwargs)  # type: ignore[arg-type]
        # aio-pika hands its kwargs to aiormq at every (re)connect: the writer is corked
        self.kwargs["transport_factory"] = CorkedTransportFactory()

    async def _on_connection_close(self, closing: asyncio.Future[object]) -> None:
        # Close callbacks first: they still see the address that was lost.
        await super()._on_connection_close(closing)
        if len(self.addresses) > 1 and not (self.is_closed or self.close_called):
            self._current = (self._current + 1) % len(self.addresses)
            self.url = self.addresses[self._current]


def management_client(endpoint: BrokerEndpoint, *, timeout_s: float = 10.0) -> ManagementClient:
    """A management API client for the endpoint's console and account.

    Over HTTPS it trusts the AMQP URL's CA (``cafile``) and presents its client certificate,
    if any: one set of TLS files for both APIs of the broker.
    """
    https = endpoint.management_url.startswith("https:")
    return ManagementClient(
        endpoint.management_url,
        username=endpoint.username,
        password=endpoint.password,
        vhost=endpoint.vhost,
        timeout_s=timeout_s,
        ssl_context=TlsFiles.of_url(endpoint.amqp_url).context() if https else None,
    )


async def connect(url: str, name: str) -> AbstractRobustConnection:
    """A robust connection (it reconnects and redeclares by itself) or a one-line error.

    ``amqps://`` URLs carry their TLS files and login mechanism as query parameters (see
    :mod:`wayang_mq.amqp.tls`). Several comma-separated URLs are tried in order; the error,
    if none answers, is the first address's.
    """
    # One message pamqp cannot decode must not close the connection (see amqp.frames).
    frames.install()
    check_files(url)
    urls = split_urls(url)
    failure: BrokerUnreachable | None = None
    for first in range(len(urls)):
        try:
            connection = await _connect_from(urls, first, name)
            break
        except (ConnectionError, OSError, aiormq.exceptions.AMQPConnectionError) as exc:
            failure = failure or _unreachable(exc, urls[first])
            if len(urls) > 1:
                logs.event(
                    log,
                    "broker.unreachable",
                    logging.WARNING,
                    connection=name,
                    broker=redact_url(urls[first]),
                    reason=exc,
                    next="trying the next address",
                )
    else:
        assert failure is not None
        raise failure
    _log_reconnects(connection, name)
    return connection


async def _connect_from(urls: list[str], first: int, name: str) -> FailoverConnection:
    """One first attempt at ``urls[first]``; the connection closed again if it fails."""
    # What aio_pika.connect_robust does, but a connection whose first attempt failed is closed
    # here: left to its __del__, it cannot close when the garbage collector runs outside the
    # event loop (a thread), and leaks a never-awaited close().
    connection = FailoverConnection(urls, first, client_properties={"connection_name": name})
    try:
        await connection.connect()
    except BaseException:
        await connection.close()
        raise
    return connection


def _log_reconnects(connection: FailoverConnection, name: str) -> None:
    """``broker.disconnected`` when the connection drops, ``broker.reconnected`` naming the
    node address it got back on (another one, in a cluster, when its node died)."""

    def on_close(closed: object, exc: BaseException | None) -> None:
        if connection.is_closed or connection.close_called:
            return  # we closed it ourselves: nothing to reconnect
        logs.event(
            log,
            "broker.disconnected",
            logging.WARNING,
            connection=name,
            broker=redact_url(str(connection.url)),
            reason=exc,
            next="reconnecting; unacked deliveries return to their queues",
        )

    connection.close_callbacks.add(on_close)
    connection.reconnect_callbacks.add(
        lambda _conn: logs.event(
            log, "broker.reconnected", connection=name, broker=redact_url(str(connection.url))
        )
    )


def _unreachable(exc: BaseException, url: str) -> BrokerUnreachable:
    """What a failed first connection attempt means, in one line with what to do."""
    explained = explain(exc, url)
    if explained is not None:
        return explained
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return BrokerUnreachable(
            f"the broker at {redact_url(url)} refused the credentials",
            hint="check the user and password in WAYANG_AMQP_URL",
        )
    return BrokerUnreachable(
        f"cannot reach the broker at {redact_url(url)}: {exc}",
        hint="is it running? start a local one with `wayang-mq dev`, or fix WAYANG_AMQP_URL",
    )
