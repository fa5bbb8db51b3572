"""Where the broker and the keys are, and opening a connection with errors a person can act on.

A URL in the environment wins; otherwise the endpoint that ``wayang-mq dev`` wrote into its
state directory, so a second terminal finds the local stack without copying URLs around.
"""

from __future__ import annotations

import logging

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from wayang_mq.amqp import frames
from wayang_mq.amqp.endpoint import BrokerEndpoint, redact_url
from wayang_mq.amqp.management import ManagementClient
from wayang_mq.amqp.tls import TlsFiles, check_files, explain
from wayang_mq.core import logs
from wayang_mq.core.errors import BrokerUnreachable

log = logging.getLogger("wayang_mq.amqp.connect")


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
    :mod:`wayang_mq.amqp.tls`).
    """
    # One message pamqp cannot decode must not close the connection (see amqp.frames).
    frames.install()
    check_files(url)
    # What aio_pika.connect_robust does, but a connection whose first attempt failed is closed
    # here: left to its __del__, it cannot close when the garbage collector runs outside the
    # event loop (a thread), and leaks a never-awaited close().
    connection = aio_pika.RobustConnection(URL(url), client_properties={"connection_name": name})
    try:
        await connection.connect()
    except (ConnectionError, OSError, aiormq.exceptions.AMQPConnectionError) as exc:
        await connection.close()
        raise _unreachable(exc, url) from exc
    where = redact_url(url)

    def on_close(closed: object, exc: BaseException | None) -> None:
        if connection.is_closed or connection.close_called:
            return  # we closed it ourselves: nothing to reconnect
        logs.event(
            log,
            "broker.disconnected",
            logging.WARNING,
            connection=name,
            broker=where,
            reason=exc,
            next="reconnecting; unacked deliveries return to their queues",
        )

    connection.close_callbacks.add(on_close)
    connection.reconnect_callbacks.add(
        lambda _conn: logs.event(log, "broker.reconnected", connection=name, broker=where)
    )
    return connection


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
