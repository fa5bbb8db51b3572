"""Where the broker and the keys are, and opening a connection with errors a person can act on.

A URL in the environment wins; otherwise the endpoint that ``wayang-mq dev`` wrote into its
state directory, so a second terminal finds the local stack without copying URLs around.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection

from wayang_mq.amqp.endpoint import BrokerEndpoint, redact_url
from wayang_mq.amqp.management import ManagementClient
from wayang_mq.core import logs
from wayang_mq.core.errors import BrokerUnreachable, ConfigError
from wayang_mq.core.settings import Settings
from wayang_mq.core.signing import KeyRing, Signer

ENDPOINT_FILE = "endpoint.json"

log = logging.getLogger("wayang_mq.amqp.connect")


def broker_endpoint(settings: Settings) -> BrokerEndpoint:
    """The broker to use: ``WAYANG_AMQP_URL``, else the one ``wayang-mq dev`` is running."""
    if settings.amqp_url is not None:
        return BrokerEndpoint.from_url(
            settings.amqp_url.get_secret_value(), settings.management_url
        )
    path = settings.state_dir / ENDPOINT_FILE
    try:
        saved = json.loads(path.read_text())
        return BrokerEndpoint.from_url(saved["amqp_url"], saved["management_url"])
    except (OSError, ValueError, KeyError, TypeError):
        raise BrokerUnreachable(
            "no broker configured",
            hint="set WAYANG_AMQP_URL=amqp://user:pass@host:5672/, "
            "or start a local stack with `wayang-mq dev`",
        ) from None


def save_endpoint(state_dir: Path, endpoint: BrokerEndpoint) -> None:
    """Remember the dev stack's endpoint for other commands (private: it holds a password)."""
    path = state_dir / ENDPOINT_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {"amqp_url": endpoint.amqp_url, "management_url": endpoint.management_url}, handle
        )


def management_client(endpoint: BrokerEndpoint) -> ManagementClient:
    """A management API client for the endpoint's console and account."""
    return ManagementClient(
        endpoint.management_url,
        username=endpoint.username,
        password=endpoint.password,
        vhost=endpoint.vhost,
    )


def keyring(settings: Settings) -> KeyRing:
    """The public keys a worker trusts; refusing to start with none."""
    ring = KeyRing.load_dir(settings.keys_path)
    if not ring.keys:
        raise ConfigError(
            f"no public keys (*.pub) in {settings.keys_path}: every task would be refused",
            hint="create one with `wayang-mq keys new --dir DIR` and set WAYANG_KEY_DIR=DIR",
        )
    return ring


def signer(settings: Settings) -> Signer:
    """The private key this process signs with: WAYANG_SIGNING_KEY, else the key dir's first."""
    if settings.signing_key is not None:
        return Signer.from_file(settings.signing_key)
    found = sorted(settings.keys_path.glob("*.key")) if settings.keys_path.is_dir() else []
    if not found:
        raise ConfigError(
            f"no signing key (*.key) in {settings.keys_path}",
            hint="create one with `wayang-mq keys new --dir DIR`, or set WAYANG_SIGNING_KEY",
        )
    return Signer.from_file(found[0])


async def connect(url: str, name: str) -> AbstractRobustConnection:
    """A robust connection (it reconnects and redeclares by itself) or a one-line error."""
    try:
        connection = await aio_pika.connect_robust(url, client_properties={"connection_name": name})
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise BrokerUnreachable(
            f"the broker at {redact_url(url)} refused the credentials",
            hint="check the user and password in WAYANG_AMQP_URL",
        ) from exc
    except (ConnectionError, OSError, aiormq.exceptions.AMQPConnectionError) as exc:
        raise BrokerUnreachable(
            f"cannot reach the broker at {redact_url(url)}: {exc}",
            hint="is it running? start a local one with `wayang-mq dev`, or fix WAYANG_AMQP_URL",
        ) from exc
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
