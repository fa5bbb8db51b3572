"""The local stack gives tests a real broker and database, and says clearly when it cannot."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import stat
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pika
import psycopg
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.core.errors import StackError
from wayang_mq.dev.nodes import PostgresNode, RabbitNode
from wayang_mq.testing.harness import eventually
from wayang_mq.testing.plugin import BrokerHandle, service_dir


def management_get(endpoint: BrokerEndpoint, path: str) -> Any:
    """GET a management API resource as the broker's account."""
    token = base64.b64encode(f"{endpoint.username}:{endpoint.password}".encode()).decode()
    request = urllib.request.Request(
        f"{endpoint.management_url}{path}", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@contextmanager
def pika_channel(url: str) -> Iterator[BlockingChannel]:
    """A channel with publisher confirms, closed with its connection afterwards."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        connection.close()


# RabbitMQ 3.10.8 (ra 2.2) records a new quorum queue's Raft server in a dets table saved
# every 500 ms. A node killed sooner after the declare forgets the server: the queue stays
# declared, but every basic.get times out ("leader not known"), even after a clean restart,
# and its confirmed messages are gone. Crash tests let a fresh queue settle first.
RA_DIRECTORY_SAVE_S = 0.5


def declare_quorum_queue(url: str, queue: str) -> None:
    """Declare a durable quorum queue."""
    with pika_channel(url) as channel:
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})


def publish_persistent(url: str, queue: str, body: bytes) -> None:
    """Publish one persistent message and return once the broker confirmed it."""
    with pika_channel(url) as channel:
        channel.basic_publish(
            "", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True
        )


async def take_one(url: str, queue: str) -> bytes:
    """Get (and ack) one message, retrying while the queue recovers after a broker start;
    then delete the queue."""
    found: list[bytes] = []

    def poll() -> bool:
        with pika_channel(url) as channel:
            body: bytes | None = channel.basic_get(queue, auto_ack=True)[2]
        if body is not None:
            found.append(body)
        return body is not None

    try:
        await eventually(
            lambda: asyncio.to_thread(poll), interval_s=0.5, what=f"a message in {queue}"
        )
    finally:
        with pika_channel(url) as channel:
            channel.queue_delete(queue)
    return found[0]


@pytest.fixture
def restartable(rabbitmq: BrokerHandle) -> BrokerHandle:
    """The session broker, when this session owns it and may restart it."""
    if not rabbitmq.can_restart:
        pytest.skip(f"the broker from {rabbitmq.origin} cannot be restarted by tests")
    return rabbitmq


@pytest.fixture
def pg_state_dir() -> Iterator[Path]:
    """A state dir the unprivileged PostgreSQL account can reach even when we are root."""
    with service_dir("wayang-pg-test-") as path:
        yield path


async def test_broker_accepts_amqp_and_serves_management(rabbitmq: BrokerHandle) -> None:
    # Given the session's broker
    # When a client connects with its AMQP URL and asks the management API for an overview
    connection = await aio_pika.connect(rabbitmq.amqp_url)
    async with connection:
        channel = await connection.channel()
        assert not channel.is_closed
    overview = management_get(rabbitmq.endpoint, "/api/overview")

    # Then the connection opened, and the broker runs management and consistent hashing
    assert overview["management_version"]
    assert "x-consistent-hash" in {kind["name"] for kind in overview["exchange_types"]}


def test_endpoint_repr_hides_the_password(rabbitmq: BrokerHandle) -> None:
    # Given the session broker's endpoint, whose URL carries the password
    endpoint = rabbitmq.endpoint
    assert endpoint.password in endpoint.amqp_url

    # When it is printed, Then the password does not show
    assert endpoint.password not in repr(endpoint)
    assert endpoint.password not in repr(rabbitmq)


def test_endpoint_from_an_environment_url_defaults_the_management_api() -> None:
    # Given only an AMQP URL, as WAYANG_AMQP_URL gives it
    url = "amqp://alice:s%40cret@broker.example:5672/"

    # When it is turned into an endpoint
    endpoint = BrokerEndpoint.from_url(url)

    # Then the account comes from the URL and the management API is on the usual port
    assert (endpoint.username, endpoint.password) == ("alice", "s@cret")
    assert endpoint.management_url == "http://broker.example:15672"
    assert endpoint.console_url == "http://broker.example:15672/"
    assert "s%40cret" not in repr(endpoint)


async def test_restart_keeps_quorum_queue_and_persistent_messages(
    restartable: BrokerHandle,
) -> None:
    # Given a quorum queue holding a persistent message the broker confirmed
    queue = f"test.localstack.restart.{uuid.uuid4().hex[:8]}"
    declare_quorum_queue(restartable.amqp_url, queue)
    publish_persistent(restartable.amqp_url, queue, b"survives a restart")
    before = restartable.endpoint

    # When the broker restarts
    await asyncio.to_thread(restartable.restart)

    # Then it answers at the same URLs, and the message is still there
    assert restartable.endpoint == before
    assert await take_one(restartable.amqp_url, queue) == b"survives a restart"


async def test_kill_then_start_keeps_confirmed_messages(restartable: BrokerHandle) -> None:
    # Given a settled quorum queue holding a persistent message the broker confirmed
    queue = f"test.localstack.kill.{uuid.uuid4().hex[:8]}"
    declare_quorum_queue(restartable.amqp_url, queue)
    await asyncio.sleep(RA_DIRECTORY_SAVE_S * 3)  # nothing to observe: ra saves on a timer
    publish_persistent(restartable.amqp_url, queue, b"survives a crash")

    # When the broker is killed (SIGKILL, no clean shutdown) and started again
    await asyncio.to_thread(restartable.kill)
    await asyncio.to_thread(restartable.start)

    # Then the confirmed message survived the crash
    assert await take_one(restartable.amqp_url, queue) == b"survives a crash"


def test_occupied_port_is_refused_naming_the_port(tmp_path: Path) -> None:
    # Given something already listening on a port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        # (the binary is a stand-in: the port is checked before anything is launched)
        node = RabbitNode(tmp_path, amqp_port=port, server_binary=Path("/bin/true"))

        # When a node is asked to use that port
        with pytest.raises(StackError) as raised:
            node.start()

    # Then the error names the port and says what to do, and nothing was launched
    assert str(port) in raised.value.message
    assert raised.value.hint is not None and "omit" in raised.value.hint
    assert not node.is_running()


def test_missing_server_binary_says_how_to_install(tmp_path: Path) -> None:
    # Given a machine without rabbitmq-server
    node = RabbitNode(tmp_path, server_binary=tmp_path / "no-such-rabbitmq-server")

    # When a node is started
    with pytest.raises(StackError) as raised:
        node.start()

    # Then the error says it is not installed and how to fix that
    assert raised.value.message.startswith("rabbitmq-server is not installed")
    assert raised.value.hint is not None
    assert "apt-get install rabbitmq-server" in raised.value.hint
    assert "WAYANG_AMQP_URL" in raised.value.hint


def test_boot_failure_shows_the_node_log(tmp_path: Path) -> None:
    # Given a server that dies at boot, printing why
    server = tmp_path / "broken-rabbitmq-server"
    server.write_text("#!/bin/sh\necho 'boot failed: disk on fire'\nexit 1\n")
    server.chmod(0o755)
    node = RabbitNode(tmp_path / "node", server_binary=server)

    # When the node is started
    with pytest.raises(StackError) as raised:
        node.start(timeout_s=10)

    # Then the error points at the log and quotes its last lines, and nothing is left running
    assert "node log:" in raised.value.message
    assert "disk on fire" in raised.value.message
    assert not node.is_running()


def test_a_nodes_files_with_the_password_are_private_from_the_first_start(tmp_path: Path) -> None:
    # Given a node directory an older version left open: the dir 0755, its config 0644
    state_dir = tmp_path / "node"
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)
    (state_dir / "rabbitmq.conf").write_text("default_pass = old\n")
    (state_dir / "rabbitmq.conf").chmod(0o644)
    server = tmp_path / "stand-in-rabbitmq-server"  # the files are written before it runs
    server.write_text("#!/bin/sh\nexit 1\n")
    server.chmod(0o755)
    node = RabbitNode(state_dir, password="s3cret-pass", server_binary=server)

    # When the node is started
    with pytest.raises(StackError):
        node.start(timeout_s=10)

    # Then every file holding the password is the owner's alone, in directories only the
    # owner may enter; so is the log the server writes its console output to
    assert "s3cret-pass" in (state_dir / "rabbitmq.conf").read_text()
    for secret in ("rabbitmq.conf", "wayang-node.json", "log/console.log"):
        assert stat.S_IMODE((state_dir / secret).stat().st_mode) == 0o600, secret
    for directory in (".", "mnesia", "log"):
        assert stat.S_IMODE((state_dir / directory).stat().st_mode) == 0o700, directory


def test_missing_postgres_binaries_say_how_to_install(tmp_path: Path) -> None:
    # Given a machine without PostgreSQL binaries where we look for them
    node = PostgresNode(tmp_path, bin_dir=tmp_path / "no-such-bin")

    # When the node is started, Then the error says how to install PostgreSQL
    with pytest.raises(StackError) as raised:
        node.start()
    assert raised.value.hint is not None
    assert "apt-get install postgresql" in raised.value.hint


def test_postgres_node_serves_queries_until_stopped(pg_state_dir: Path) -> None:
    # Given a private PostgreSQL node
    node = PostgresNode(pg_state_dir)
    try:
        # When it starts
        url = node.start()

        # Then a client can connect to its URL and run a query
        with psycopg.connect(url) as connection:
            assert connection.execute("select 1").fetchone() == (1,)
    finally:
        node.stop()

    # And once stopped it no longer accepts connections
    assert not node.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another account")
def test_postgres_as_root_refuses_unreachable_state_dir(tmp_path: Path) -> None:
    # Given a state dir inside a directory private to root (mode 0700, like pytest's tmp)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    node = PostgresNode(private / "pg")

    # When the node starts, Then it explains that its account cannot get there
    with pytest.raises(StackError, match="cannot enter"):
        node.start()


def test_postgres_fixture_gives_a_database_url(postgres: str) -> None:
    # Given the session's database URL
    url = urlsplit(postgres)
    # When a client connects, Then it is in the database and account the URL names
    with psycopg.connect(postgres) as connection:
        row = connection.execute("select current_database(), current_user").fetchone()
    assert row == (url.path.lstrip("/"), url.username)
