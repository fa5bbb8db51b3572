"""Real RabbitMQ and PostgreSQL for tests: a pytest plugin plus plain context managers.

Load it with ``pytest_plugins = ["wayang_mq.testing.plugin"]`` to get two session fixtures:
``rabbitmq`` (a :class:`BrokerHandle`) and ``postgres`` (a database URL). Each service comes
from the first source that works:

1. an environment URL (``WAYANG_AMQP_URL`` / ``WAYANG_DATABASE_URL``): always wins;
2. testcontainers, when a Docker engine answers;
3. a private node from the installed Debian package (:mod:`wayang_mq.dev.nodes`).

When none works the fixture skips, or fails when ``CI=true``, so CI cannot go green by
skipping every test that needs a broker.

``local_rabbitmq_cluster(3)`` runs a cluster of private nodes for a block (a
:class:`RabbitCluster`: URLs, the leader of a queue, kill and restart a member).

A third, ``rabbitmq_tls`` (a :class:`TlsBrokerHandle`), is a TLS-only private node with its
own CA, started only when a test asks for it (always a local node: a broker from the
environment cannot be made TLS-only for the tests).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from yarl import URL

from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.amqp.tls import with_tls
from wayang_mq.core.errors import StackError
from wayang_mq.dev.certs import CertFiles, CertificateAuthority

# A 3-node cluster of private nodes, started by the tests that need one (module scope), not
# for the session: ``with local_rabbitmq_cluster(3) as cluster: ...`` (see docs/cluster.md).
from wayang_mq.dev.cluster import RabbitCluster as RabbitCluster
from wayang_mq.dev.cluster import local_rabbitmq_cluster as local_rabbitmq_cluster
from wayang_mq.dev.nodes import NodeTls, PostgresNode, RabbitNode, wait_for_broker

AMQP_URL_ENV = "WAYANG_AMQP_URL"
MANAGEMENT_URL_ENV = "WAYANG_MANAGEMENT_URL"
DATABASE_URL_ENV = "WAYANG_DATABASE_URL"
RABBITMQ_IMAGE = "rabbitmq:3.13-management"
POSTGRES_IMAGE = "postgres:16-alpine"

_T = TypeVar("_T")


class _Lifecycle(Protocol):
    """What a broker we started can do; RabbitNode and the container adapter both fit."""

    def start(self) -> BrokerEndpoint: ...
    def stop(self) -> None: ...
    def restart(self) -> BrokerEndpoint: ...
    def kill(self) -> None: ...
    def ctl(self, *args: str, timeout_s: float = 60) -> str: ...


class BrokerHandle:
    """The broker a test session talks to, with its URLs and account.

    ``start``/``stop``/``restart``/``kill`` work only when this session started the broker,
    not for one given by ``WAYANG_AMQP_URL`` (see ``can_restart``).
    """

    def __init__(
        self, endpoint: BrokerEndpoint, *, origin: str, lifecycle: _Lifecycle | None = None
    ) -> None:
        self.endpoint = endpoint
        self.origin = origin  # where the broker came from, for messages
        self._lifecycle = lifecycle

    @property
    def amqp_url(self) -> str:
        """The AMQP URL, credentials included."""
        return self.endpoint.amqp_url

    @property
    def management_url(self) -> str:
        """The management API base URL (http://host:port)."""
        return self.endpoint.management_url

    @property
    def username(self) -> str:
        """The broker account (an administrator)."""
        return self.endpoint.username

    @property
    def password(self) -> str:
        """The account's password."""
        return self.endpoint.password

    @property
    def prometheus_url(self) -> str:
        """The broker's rabbitmq_prometheus endpoint: a private node's own port, else the
        plugin's conventional port 15692 on the broker's host."""
        url = getattr(self._lifecycle, "prometheus_url", None)
        if isinstance(url, str):
            return url
        return f"http://{urlsplit(self.amqp_url).hostname}:15692"

    @property
    def can_restart(self) -> bool:
        """True when this session owns the broker, so tests may stop, kill and restart it."""
        return self._lifecycle is not None

    def start(self) -> BrokerEndpoint:
        """Start the broker again after ``stop()`` or ``kill()``; data is kept."""
        self.endpoint = self._owned().start()
        return self.endpoint

    def stop(self) -> None:
        """Stop the broker cleanly."""
        self._owned().stop()

    def restart(self) -> BrokerEndpoint:
        """Stop and start; durable queues and persistent messages survive."""
        self.endpoint = self._owned().restart()
        return self.endpoint

    def kill(self) -> None:
        """Kill the broker as a crash would; ``start()`` brings it back."""
        self._owned().kill()

    def ctl(self, *args: str, timeout_s: float = 60) -> str:
        """Run ``rabbitmqctl ARGS`` on the broker (e.g. to raise a memory alarm); its output."""
        return self._owned().ctl(*args, timeout_s=timeout_s)

    def _owned(self) -> _Lifecycle:
        if self._lifecycle is None:
            raise StackError(
                f"the broker came from {self.origin}; this session cannot stop or restart it",
                hint=f"unset {AMQP_URL_ENV} to let the tests run a broker of their own",
            )
        return self._lifecycle

    def __repr__(self) -> str:
        return f"BrokerHandle({self.endpoint!r}, origin={self.origin!r})"


class TlsBrokerHandle(BrokerHandle):
    """A TLS-only broker: amqps with a client certificate from ``ca``, EXTERNAL login.

    ``amqp_url`` logs in as the administrator (a certificate whose CN is its user name);
    :meth:`client_certificate` issues more, one per broker user a test logs in as.
    """

    def __init__(
        self, endpoint: BrokerEndpoint, *, ca: CertificateAuthority, node: RabbitNode
    ) -> None:
        super().__init__(endpoint, origin=f"a TLS-only node in {node.state_dir}", lifecycle=node)
        self.ca = ca
        self.node = node

    @property
    def address(self) -> str:
        """``amqps://host:port/`` with no account and no files (add them with ``with_tls``)."""
        return str(URL(self.endpoint.amqp_url).with_user(None).with_query(None))

    def client_certificate(self, common_name: str) -> CertFiles:
        """A client certificate from the broker's CA; EXTERNAL logs it in as ``common_name``."""
        return self.ca.issue_client(common_name)


# --- sources -----------------------------------------------------------------------------------


@contextlib.contextmanager
def local_rabbitmq(state_dir: Path, *, clean_shutdown: bool = True) -> Iterator[BrokerHandle]:
    """A private RabbitMQ node in ``state_dir`` for the duration of the block.

    ``clean_shutdown=False`` kills the node at the end instead of stopping it: for data that
    is thrown away, as 3.10's clean stop spends about 5 s waiting on the management agent.
    """
    node = RabbitNode(state_dir)
    node.start()
    try:
        yield BrokerHandle(node.endpoint, origin=f"a private node in {state_dir}", lifecycle=node)
    finally:
        if clean_shutdown:
            node.stop()
        else:
            node.kill()


@contextlib.contextmanager
def local_rabbitmq_tls(state_dir: Path) -> Iterator[TlsBrokerHandle]:
    """A private TLS-only RabbitMQ node in ``state_dir``, with its CA in ``state_dir/ca``.

    The server certificate names 127.0.0.1 only, so a test can dial ``localhost`` to see a
    hostname mismatch.
    """
    ca = CertificateAuthority.open(state_dir / "ca", name="wayang-mq test CA")
    server = ca.issue_server("server", ("127.0.0.1",))
    node = RabbitNode(state_dir / "node", tls=NodeTls(ca.cert_path, server.cert, server.key))
    admin = ca.issue_client(node.username)
    node.start()
    try:
        plain = node.endpoint
        endpoint = BrokerEndpoint.from_url(
            with_tls(plain.amqp_url, cert=admin.cert, key=admin.key), plain.management_url
        )
        yield TlsBrokerHandle(endpoint, ca=ca, node=node)
    finally:
        node.kill()  # thrown away: no need to wait for a clean stop


@contextlib.contextmanager
def local_postgres(state_dir: Path) -> Iterator[str]:
    """A private PostgreSQL node in ``state_dir``; yields its URL.

    As root, ``state_dir`` must be reachable by an unprivileged account (see
    :func:`service_dir`), because PostgreSQL refuses to run as root.
    """
    with PostgresNode(state_dir) as node:
        yield node.url


@contextlib.contextmanager
def service_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory under the system temp dir, removed afterwards.

    Not pytest's ``tmp_path``: that lives in a 0700 directory which the unprivileged
    PostgreSQL account cannot enter when tests run as root.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def open_rabbitmq(state_dir: Path, *, clean_shutdown: bool = True) -> Iterator[BrokerHandle]:
    """The session broker from the first source that works; StackError names why none did."""
    amqp_url = os.environ.get(AMQP_URL_ENV)
    if amqp_url:
        endpoint = BrokerEndpoint.from_url(amqp_url, os.environ.get(MANAGEMENT_URL_ENV))
        yield BrokerHandle(endpoint, origin=AMQP_URL_ENV)
        return
    sources: list[Callable[[], contextlib.AbstractContextManager[BrokerHandle]]] = [
        _container_rabbitmq,
        lambda: local_rabbitmq(state_dir, clean_shutdown=clean_shutdown),
    ]
    with _first_available(
        sources, hint=f"install rabbitmq-server, or set {AMQP_URL_ENV}"
    ) as handle:
        yield handle


@contextlib.contextmanager
def open_postgres(state_dir: Path) -> Iterator[str]:
    """The session database URL from the first source that works (see :func:`open_rabbitmq`)."""
    database_url = os.environ.get(DATABASE_URL_ENV)
    if database_url:
        yield database_url
        return
    sources: list[Callable[[], contextlib.AbstractContextManager[str]]] = [
        _container_postgres,
        lambda: local_postgres(state_dir),
    ]
    with _first_available(sources, hint=f"install postgresql, or set {DATABASE_URL_ENV}") as url:
        yield url


@contextlib.contextmanager
def _first_available(
    sources: list[Callable[[], contextlib.AbstractContextManager[_T]]], *, hint: str
) -> Iterator[_T]:
    reasons: list[str] = []
    with contextlib.ExitStack() as stack:
        for source in sources:
            try:
                value = stack.enter_context(source())
            except StackError as error:
                reasons.append(error.message)
                hint = error.hint or hint  # the last source (a local node) says what to install
                continue
            yield value
            return
    raise StackError("; ".join(reasons), hint=hint)


# --- testcontainers (only where a Docker engine answers) ---------------------------------------


def docker_available() -> bool:
    """True when a Docker engine answers, so testcontainers can run services."""
    host = urlsplit(os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    if host.scheme == "unix":
        # Probed by hand: the Docker SDK leaks its socket when the engine is absent, which
        # filterwarnings=error turns into a failure of whichever test runs next.
        return _unix_socket_pings(host.path)
    return _sdk_pings()


def _unix_socket_pings(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(3)
            probe.connect(path)
            probe.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return probe.recv(64).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


def _sdk_pings() -> bool:
    try:
        import docker  # type: ignore[import-untyped]  # testcontainers' own dependency

        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


class _ContainerBroker:
    """Lifecycle of a RabbitMQ container; ports are re-read as Docker may move them."""

    def __init__(self, container: Any) -> None:
        self._container = container

    def endpoint(self) -> BrokerEndpoint:
        container = self._container
        host = container.get_container_host_ip()
        amqp = f"amqp://{container.username}:{container.password}@{host}:"
        return BrokerEndpoint(
            f"{amqp}{container.get_exposed_port(5672)}/",
            f"http://{host}:{container.get_exposed_port(15672)}",
            container.username,
            container.password,
        )

    def start(self) -> BrokerEndpoint:
        self._container.get_wrapped_container().start()
        return self._ready()

    def stop(self) -> None:
        self._container.get_wrapped_container().stop()

    def restart(self) -> BrokerEndpoint:
        self._container.get_wrapped_container().restart()
        return self._ready()

    def kill(self) -> None:
        self._container.get_wrapped_container().kill()

    def ctl(self, *args: str, timeout_s: float = 60) -> str:
        done = self._container.exec(["rabbitmqctl", *args])
        output = done.output.decode(errors="replace") if done.output else ""
        if done.exit_code != 0:
            raise StackError(f"rabbitmqctl {' '.join(args)} failed in the container: {output}")
        return output

    def _ready(self) -> BrokerEndpoint:
        self._container.get_wrapped_container().reload()
        endpoint = self.endpoint()
        wait_for_broker(endpoint, 60)
        return endpoint


@contextlib.contextmanager
def _container_rabbitmq() -> Iterator[BrokerHandle]:
    if not docker_available():
        raise StackError("no Docker engine answers")
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer(RABBITMQ_IMAGE, username="wayang", password="wayang")
        container.with_exposed_ports(15672).start()
    except Exception as error:
        raise StackError(f"testcontainers could not start {RABBITMQ_IMAGE}: {error}") from None
    try:
        # The image ships the plugin but does not enable it; the file it writes survives restarts.
        enabled = container.exec(
            ["rabbitmq-plugins", "enable", "rabbitmq_consistent_hash_exchange"]
        )
        if enabled.exit_code != 0:
            raise StackError(f"could not enable consistent hashing in {RABBITMQ_IMAGE}")
        broker = _ContainerBroker(container)
        yield BrokerHandle(broker._ready(), origin=RABBITMQ_IMAGE, lifecycle=broker)
    finally:
        container.stop()


@contextlib.contextmanager
def _container_postgres() -> Iterator[str]:
    if not docker_available():
        raise StackError("no Docker engine answers")
    try:
        from testcontainers.community.postgres import PostgresContainer

        container = PostgresContainer(
            POSTGRES_IMAGE, username="wayang", password="wayang", dbname="wayang", driver=None
        ).start()
    except Exception as error:
        raise StackError(f"testcontainers could not start {POSTGRES_IMAGE}: {error}") from None
    try:
        yield str(container.get_connection_url())
    finally:
        container.stop()


# --- pytest fixtures ---------------------------------------------------------------------------


def _unavailable(service: str, error: StackError) -> NoReturn:
    """Skip a test that needs a missing service; fail it on CI, where a skip would hide it."""
    reason = f"no {service} for the tests: {error.one_line()}"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _enter_or_give_up(
    stack: contextlib.ExitStack,
    service: str,
    opener: Callable[[], contextlib.AbstractContextManager[_T]],
) -> _T:
    try:
        return stack.enter_context(opener())
    except StackError as error:
        failure = error
    _unavailable(service, failure)  # outside the except: no chained traceback in the report


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """A real RabbitMQ broker for the test session (see the module docstring for the source)."""
    state_dir = tmp_path_factory.mktemp("rabbitmq")
    with contextlib.ExitStack() as stack:
        # The session's broker data is thrown away: no need to wait for a clean stop.
        yield _enter_or_give_up(
            stack, "RabbitMQ", lambda: open_rabbitmq(state_dir, clean_shutdown=False)
        )


@pytest.fixture(scope="session")
def rabbitmq_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBrokerHandle]:
    """A TLS-only RabbitMQ node (client certificates, EXTERNAL login), for the TLS tests."""
    state_dir = tmp_path_factory.mktemp("rabbitmq-tls")
    with contextlib.ExitStack() as stack:
        yield _enter_or_give_up(stack, "RabbitMQ (TLS)", lambda: local_rabbitmq_tls(state_dir))


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL database URL for the test session."""
    with contextlib.ExitStack() as stack:
        state_dir = stack.enter_context(service_dir("wayang-pg-"))
        yield _enter_or_give_up(stack, "PostgreSQL", lambda: open_postgres(state_dir))


@pytest.fixture
def record_db(postgres: str) -> Iterator[str]:
    """A fresh database on the session's PostgreSQL, migrated to the control plane's schema,
    dropped after the test."""
    from wayang_mq.controlplane.migrate import migrate

    with fresh_database(postgres) as url:
        migrate(url)
        yield url


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new empty database on the server of ``server_url``; dropped when the block ends."""
    import psycopg

    name = f"wayang_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server_url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
