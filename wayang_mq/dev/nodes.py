"""Private RabbitMQ and PostgreSQL nodes for development and tests, run from the Debian packages.

There is no Docker engine on our machines, so a node is a process started from the installed
package with every path (config, data, logs, Erlang cookie) pointed into one state directory.
Several nodes run side by side on free ports, and a directory can be stopped and started again
with its data, ports and credentials intact.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.amqp.tls import TlsFiles
from wayang_mq.core.errors import ConfigError, StackError
from wayang_mq.core.private_files import open_private_log, private_dir, write_private
from wayang_mq.core.wire import DEFAULT_MAX_BODY_BYTES

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
# rabbitmq_prometheus: the broker's own metrics for deploy/prometheus and the dashboards
RABBITMQ_PLUGINS = (
    "rabbitmq_management",
    "rabbitmq_consistent_hash_exchange",
    "rabbitmq_prometheus",
)
# EXTERNAL SASL: the broker user is the client certificate's common name.
TLS_PLUGINS = ("rabbitmq_auth_mechanism_ssl",)
POSTGRES_OS_USER = "wayang-pg"
LOOPBACK = "127.0.0.1"

_STATE_FILE = "wayang-node.json"
# Credentials end up in rabbitmq.conf (no quoting there) and in URLs: keep them to plain words.
_SAFE_CREDENTIAL = re.compile(r"^[A-Za-z0-9._~-]+$")
_RABBITMQ_HINT = "apt-get install rabbitmq-server, or set WAYANG_AMQP_URL"
_POSTGRES_HINT = "apt-get install postgresql, or set WAYANG_DATABASE_URL"
_LOG_TAIL_LINES = 25


# --- ports -------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    # Hold every socket open until all are picked, so the kernel cannot hand out one port twice.
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind((LOOPBACK, 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def port_in_use(port: int) -> bool:
    """True when a server could not bind 127.0.0.1:``port`` now (something listens on it)."""
    with socket.socket() as probe:
        # SO_REUSEADDR as servers set it: connections lingering in TIME_WAIT do not block a
        # listener, so they must not make a port look busy (they do right after a restart).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


class _Ports:
    """Named ports of one node: requested ones are fixed, others picked once and remembered.

    A port remembered from an earlier run of the directory is given up (and re-picked) if
    something else took it meanwhile; a requested port, or one this object already served on,
    never moves, so clients holding the URL can reconnect after a restart.
    """

    def __init__(self, requested: dict[str, int | None], remembered: dict[str, Any]) -> None:
        for name, port in requested.items():
            if port is not None and not 0 < port < 65536:
                raise ConfigError(f"{name}={port} is not a TCP port", hint="use 1-65535")
        self._fixed = {name for name, port in requested.items() if port is not None}
        fresh = iter(_free_ports(len(requested)))
        self.ports: dict[str, int] = {
            name: port or _remembered_port(remembered.get(name)) or next(fresh)
            for name, port in requested.items()
        }

    def __getitem__(self, name: str) -> int:
        return self.ports[name]

    def claim(self) -> None:
        """Make sure every port is free before a launch; raise naming the port if not."""
        for name, port in self.ports.items():
            if not port_in_use(port):
                continue
            if name in self._fixed:
                raise StackError(
                    f"port {port} ({name}) is already in use on {LOOPBACK}",
                    hint=f"stop what listens on {port}, choose another {name}, or omit it",
                )
            self.ports[name] = free_port()

    def fix(self) -> None:
        """Pin every port: the node served on them, so they must not move any more."""
        self._fixed = set(self.ports)


def _remembered_port(value: Any) -> int | None:
    return value if isinstance(value, int) and 0 < value < 65536 else None


# --- state directory ---------------------------------------------------------------------------


def _load_state(state_dir: Path) -> dict[str, Any]:
    """What an earlier run of this directory chose (ports, node name, password)."""
    try:
        loaded = json.loads((state_dir / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _save_state(state_dir: Path, state: dict[str, Any]) -> None:
    # Holds the broker's password.
    write_private(state_dir / _STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _check_credential(kind: str, value: str) -> str:
    if not _SAFE_CREDENTIAL.match(value):
        raise ConfigError(
            f"the {kind} {value if kind == 'username' else '(hidden)'} has unsupported characters",
            hint="use letters, digits and . _ ~ - only",
        )
    return value


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of a log, for an error message (empty if there is no log yet)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _require_executable(path: Path, message: str, hint: str) -> None:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise StackError(f"{message} ({path} not found)", hint=hint)


# --- RabbitMQ ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeTls:
    """A TLS-only node's files: the CA it trusts for client certificates, its own cert and key.

    With it the node has no plain AMQP listener: amqps only, a client certificate from ``ca``
    required, EXTERNAL auth as the certificate's common name, and the management API on HTTPS
    (where a certificate is verified if sent, not required, so a browser can log in).
    """

    ca: Path
    cert: Path
    key: Path


def _local_endpoint(
    amqp_port: int,
    management_port: int,
    user: str,
    password: str,
    tls: NodeTls | None = None,
    host: str = LOOPBACK,
) -> BrokerEndpoint:
    account = f"{quote(user, safe='')}:{quote(password, safe='')}"
    if tls is None:
        amqp_url = f"amqp://{account}@{host}:{amqp_port}/"
        return BrokerEndpoint(amqp_url, f"http://{host}:{management_port}", user, password)
    # The CA goes with the URL (aiormq reads ``cafile``); the client certificate is the
    # caller's to add (see amqp.tls.with_tls): the node does not know who will connect.
    amqp_url = f"amqps://{account}@{host}:{amqp_port}/?cafile={quote(str(tls.ca), safe='/')}"
    return BrokerEndpoint(amqp_url, f"https://{host}:{management_port}", user, password)


def wait_for_broker(
    endpoint: BrokerEndpoint, timeout_s: float = 60, *, alive: Callable[[], bool] | None = None
) -> None:
    """Return once AMQP accepts connections and the management API answers our account.

    ``alive`` lets a launcher stop waiting as soon as its process died.
    """
    deadline = time.monotonic() + timeout_s
    while not _broker_ready(endpoint):
        if alive is not None and not alive():
            raise StackError("the RabbitMQ node exited while booting")
        if time.monotonic() > deadline:
            raise StackError(f"RabbitMQ did not answer within {timeout_s:g}s")
        time.sleep(0.25)


def _broker_ready(endpoint: BrokerEndpoint) -> bool:
    parts = urlsplit(endpoint.amqp_url)
    try:
        with socket.create_connection((parts.hostname or LOOPBACK, parts.port or 5672), 1):
            pass
    except OSError:
        return False
    return _management_answers(endpoint)


def _management_answers(endpoint: BrokerEndpoint) -> bool:
    token = base64.b64encode(f"{endpoint.username}:{endpoint.password}".encode()).decode()
    request = urllib.request.Request(
        f"{endpoint.management_url}/api/overview", headers={"Authorization": f"Basic {token}"}
    )
    context = TlsFiles.of_url(endpoint.amqp_url).context() if endpoint.tls else None
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 401:
            # The account is created when a node's data directory is first initialised; a
            # different password later is refused for good, so waiting longer cannot help.
            raise StackError(
                f"RabbitMQ refused user {endpoint.username!r} at {endpoint.management_url}",
                hint="use the password the broker's data was created with, or a fresh state dir",
            ) from None
        return False
    except (OSError, ValueError):
        return False


class RabbitNode:
    """A private RabbitMQ node whose config, data, logs and cookie all live in ``state_dir``.

    Listeners bind 127.0.0.1 only; ports, node name and password are remembered in the
    directory, so ``restart()`` (or a new ``RabbitNode`` on the same directory) keeps the data.

    ``host`` binds every listener (AMQP, management, Prometheus, Erlang distribution) to another
    local IPv4 address instead, and ``command_prefix`` wraps the server and ``rabbitmqctl``
    commands, e.g. ``["ip", "netns", "exec", "ns1"]`` to run the node in a network namespace
    (see :mod:`wayang_mq.dev.cluster`).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        amqp_port: int | None = None,
        management_port: int | None = None,
        dist_port: int | None = None,
        prometheus_port: int | None = None,
        node_name: str | None = None,
        username: str = "wayang",
        password: str | None = None,
        server_binary: Path | None = None,
        max_message_bytes: int = DEFAULT_MAX_BODY_BYTES,
        tls: NodeTls | None = None,
        host: str = LOOPBACK,
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.host = host
        self.command_prefix = tuple(command_prefix)
        saved = _load_state(self.state_dir)
        requested = {
            "amqp_port": amqp_port,
            "management_port": management_port,
            "dist_port": dist_port,
            "prometheus_port": prometheus_port,
        }
        self._ports = _Ports(requested, saved)
        self.node_name = node_name or saved.get("node_name") or self._default_node_name()
        self.username = _check_credential("username", username)
        stored = saved.get("password") if saved.get("username") == username else None
        self._password = _check_credential(
            "password", password or stored or secrets.token_urlsafe(18)
        )
        self.server_binary = server_binary or RABBITMQ_SERVER
        # The fabric's largest body: the broker refuses a larger publish before anyone holds it.
        self.max_message_bytes = max_message_bytes
        self.tls = tls
        self._process: subprocess.Popen[bytes] | None = None

    def _default_node_name(self) -> str:
        # Nodes on one machine share epmd, so each needs its own name; the name also names
        # the data directory, which is why it is remembered rather than derived every time.
        return f"wayang-{self._ports['amqp_port']}@localhost"

    @property
    def endpoint(self) -> BrokerEndpoint:
        """URLs and account of this node (valid once ``start()`` returned)."""
        return _local_endpoint(
            self._ports["amqp_port"],
            self._ports["management_port"],
            self.username,
            self._password,
            self.tls,
            self.host,
        )

    @property
    def prometheus_url(self) -> str:
        """The broker's own Prometheus endpoint (rabbitmq_prometheus): ``/metrics`` for
        aggregated metrics, ``/metrics/detailed?family=...`` per queue."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.host}:{self._ports['prometheus_port']}"

    @property
    def log_path(self) -> Path:
        """The node's own log file (its console output goes to ``console.log`` beside it)."""
        return self.state_dir / "log" / f"{self.node_name}.log"

    def is_running(self) -> bool:
        """True while the node's process (started by this object) is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 60) -> BrokerEndpoint:
        """Boot the node and return once AMQP and the management API both answer."""
        if self.is_running():
            return self.endpoint
        _require_executable(self.server_binary, "rabbitmq-server is not installed", _RABBITMQ_HINT)
        self._ports.claim()
        self._write_files()
        self._process = self._spawn()
        try:
            wait_for_broker(self.endpoint, timeout_s, alive=self.is_running)
        except BaseException as error:
            self.kill()  # also on Ctrl-C or a test timeout: never leave a half-booted node
            if isinstance(error, StackError):
                raise self._boot_failure(error) from None
            raise
        self._ports.fix()
        return self.endpoint

    def stop(self, timeout_s: float = 30) -> None:
        """Shut the node down cleanly (SIGTERM), killing it if it does not stop in time."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
        _wait_group_gone(process)
        self._process = None

    def restart(self, timeout_s: float = 60) -> BrokerEndpoint:
        """Stop and start again on the same directory and ports; queues and messages stay."""
        self.stop()
        return self.start(timeout_s)

    def kill(self) -> None:
        """SIGKILL the node, as a crash would (for fault-injection tests)."""
        process = self._process
        if process is None:
            return
        _signal_group(process, signal.SIGKILL)
        _wait_group_gone(process)
        self._process = None

    def ctl(self, *args: str, timeout_s: float = 60) -> str:
        """Run ``rabbitmqctl ARGS`` against this node; its output, or StackError saying why not.

        Same environment as the node (cookie in ``HOME``, ``RABBITMQ_NODENAME``), so the CLI
        reaches this node and no other, e.g. ``node.ctl("set_vm_memory_high_watermark", "0.4")``.
        """
        _require_executable(RABBITMQCTL, "rabbitmqctl is not installed", _RABBITMQ_HINT)
        done = subprocess.run(
            [*self.command_prefix, str(RABBITMQCTL), "-n", self.node_name, *args],
            cwd=self.state_dir,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip()
            raise StackError(
                f"rabbitmqctl {' '.join(args)} failed (exit {done.returncode}): {output}",
                hint=f"read {self.log_path}",
            )
        return done.stdout

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_files(self) -> None:
        # The directory is the node's own: its config holds the password, its data the messages.
        private_dir(self.state_dir)
        for sub in ("mnesia", "log"):
            private_dir(self.state_dir / sub)
        _save_state(
            self.state_dir,
            {
                **self._ports.ports,
                "node_name": self.node_name,
                "username": self.username,
                "password": self._password,
            },
        )
        write_private(self.state_dir / "rabbitmq.conf", self._config())  # default_pass
        plugins = RABBITMQ_PLUGINS + (TLS_PLUGINS if self.tls else ())
        (self.state_dir / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        # An empty env file shields the node from /etc/rabbitmq/rabbitmq-env.conf.
        (self.state_dir / "rabbitmq-env.conf").write_text("# private node: no overrides\n")

    def _config(self) -> str:
        return "\n".join(
            [
                "# Written by wayang_mq.dev.nodes on every start: edit RabbitNode, not this.",
                *(self._listeners() if self.tls is None else self._tls_listeners(self.tls)),
                # Used only when the data directory is first initialised.
                f"default_user = {self.username}",
                f"default_pass = {self._password}",
                "default_user_tags.administrator = true",
                # Listeners are on loopback only, so the account may log in from there.
                "loopback_users = none",
                "log.console = false",
                "log.file.level = info",
                f"max_message_size = {self.max_message_bytes}",
                "",
            ]
        )

    def _listeners(self) -> list[str]:
        return [
            f"listeners.tcp.default = {self.host}:{self._ports['amqp_port']}",
            f"management.tcp.ip = {self.host}",
            f"management.tcp.port = {self._ports['management_port']}",
            # the broker's Prometheus endpoint (rabbitmq_prometheus), on loopback
            f"prometheus.tcp.ip = {self.host}",
            f"prometheus.tcp.port = {self._ports['prometheus_port']}",
        ]

    def _tls_listeners(self, tls: NodeTls) -> list[str]:
        files = [f"cacertfile = {tls.ca}", f"certfile = {tls.cert}", f"keyfile = {tls.key}"]
        return [
            "listeners.tcp = none",  # TLS only: no plain AMQP port at all
            f"listeners.ssl.default = {self.host}:{self._ports['amqp_port']}",
            *(f"ssl_options.{line}" for line in files),
            # A client must present a certificate our CA issued, or the handshake fails.
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            # EXTERNAL only: the certificate is the login (its CN is the broker user), never
            # a password over AMQP.
            "auth_mechanisms.1 = EXTERNAL",
            "ssl_cert_login_from = common_name",
            f"management.ssl.ip = {self.host}",
            f"management.ssl.port = {self._ports['management_port']}",
            *(f"management.ssl.{line}" for line in files),
            # The console is for people with a browser and a password: a certificate is
            # checked if one is sent, not required.
            "management.ssl.verify = verify_peer",
            "management.ssl.fail_if_no_peer_cert = false",
            # TLS only means the metrics too: HTTPS with the node's certificate
            f"prometheus.ssl.ip = {self.host}",
            f"prometheus.ssl.port = {self._ports['prometheus_port']}",
            *(f"prometheus.ssl.{line}" for line in files),
        ]

    def _environment(self) -> dict[str, str]:
        # Inherited RABBITMQ_* variables would point this node at someone else's files.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        home = self.state_dir
        env.update(
            HOME=str(home),  # Erlang creates the node's cookie in $HOME/.erlang.cookie
            RABBITMQ_MNESIA_BASE=str(home / "mnesia"),
            RABBITMQ_LOG_BASE=str(home / "log"),
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_DIST_PORT=str(self._ports["dist_port"]),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(home / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(home / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(home / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(home / "rabbitmq-env.conf"),
            # Erlang distribution would listen on every interface; the node's own is enough.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=_dist_interface_args(self.host),
        )
        if self.tls is None:
            # The plain listener's address: a TLS-only node must not name one at all.
            env.update(
                RABBITMQ_NODE_IP_ADDRESS=self.host,
                RABBITMQ_NODE_PORT=str(self._ports["amqp_port"]),
            )
        return env

    def _spawn(self) -> subprocess.Popen[bytes]:
        # The package's inner script, not the /usr/sbin wrapper, which switches to the
        # rabbitmq user. A new session makes the node a process group we can signal whole.
        # umask 077: what the node writes (data, logs, the Erlang cookie) is private as well.
        console = open_private_log(self.state_dir / "log" / "console.log")
        try:
            return subprocess.Popen(
                [*self.command_prefix, str(self.server_binary)],
                cwd=self.state_dir,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
            )
        finally:
            os.close(console)

    def _boot_failure(self, error: StackError) -> StackError:
        log = self.log_path if self.log_path.exists() else self.state_dir / "log" / "console.log"
        tail = _log_tail(log)
        message = f"{error.message}; node log: {log}" + (f"\n{tail}" if tail else "")
        return StackError(message, hint=error.hint or f"read {log}")


def _dist_interface_args(host: str) -> str:
    """Erlang's flag binding distribution to ``host`` (an IPv4 literal), or none for a name."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return ""
    return "-kernel inet_dist_use_interface {" + str(address).replace(".", ",") + "}"


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Signal the node's whole process group: the launcher script, the VM and its helpers."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _wait_group_gone(process: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """Wait until every process of the node's group has exited.

    Our child is only the launcher script: after SIGKILL it is reaped at once while the VM
    is still being torn down and still holds its ports.
    """
    process.wait()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


# --- PostgreSQL --------------------------------------------------------------------------------


def _postgres_bin_dir(bin_dir: Path | None) -> Path:
    """The newest installed PostgreSQL's binaries (Debian keeps them off PATH)."""
    tools = ("initdb", "pg_ctl", "postgres", "createdb")
    candidates = [bin_dir] if bin_dir is not None else _postgres_bin_candidates()
    for candidate in candidates:
        if all(os.access(candidate / tool, os.X_OK) for tool in tools):
            return candidate
    raise StackError("PostgreSQL is not installed (initdb, pg_ctl not found)", hint=_POSTGRES_HINT)


def _postgres_bin_candidates() -> list[Path]:
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    on_path = shutil.which("pg_ctl")
    return debian + ([Path(on_path).parent] if on_path else [])


@dataclass(frozen=True)
class _Account:
    """The unprivileged OS account PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int


def _postgres_account() -> _Account | None:
    """None when we are not root (PostgreSQL runs as us); else wayang-pg, created if missing."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        entry = _create_account()
    return _Account(POSTGRES_OS_USER, entry.pw_uid, entry.pw_gid)


def _create_account() -> pwd.struct_passwd:
    # PostgreSQL refuses to run as root. A failed useradd may only mean that a parallel run
    # created the account first, so the lookup afterwards decides.
    command = ["useradd", "--system", "--no-create-home", "--user-group",
               "--shell", "/usr/sbin/nologin", POSTGRES_OS_USER]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise StackError(
            f"cannot create the OS user {POSTGRES_OS_USER}: {error}",
            hint=f"create an unprivileged user {POSTGRES_OS_USER}, or run as a non-root user",
        ) from None
    try:
        return pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        raise StackError(
            f"cannot create the OS user {POSTGRES_OS_USER}: {done.stderr.strip()}",
            hint=f"create an unprivileged user {POSTGRES_OS_USER}, or run as a non-root user",
        ) from None


def _check_reachable(path: Path, account: _Account) -> None:
    """Fail early if the PostgreSQL account cannot walk down to ``path`` (pytest tmp is 0700)."""
    for parent in path.parents:
        if not parent.exists():
            continue  # created by us with the umask's usual o+x
        info = parent.stat()
        if info.st_mode & 0o001 or (info.st_uid == account.uid and info.st_mode & 0o100):
            continue
        if info.st_gid == account.gid and info.st_mode & 0o010:
            continue
        raise StackError(
            f"PostgreSQL runs as {account.name}, which cannot enter {parent}",
            hint="put the state dir under /tmp (tempfile.mkdtemp), or chmod o+x the dirs above it",
        )


class PostgresNode:
    """A private PostgreSQL cluster in ``state_dir``, listening on 127.0.0.1 only.

    Authentication is ``trust``: this is a throwaway development node with no password to
    manage, reachable from this machine only (TCP on loopback and a socket in ``state_dir``).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int | None = None,
        user: str = "wayang",
        database: str = "wayang",
        bin_dir: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self._ports = _Ports({"port": port}, _load_state(self.state_dir))
        self.user = _check_credential("username", user)
        self.database = _check_credential("database", database)
        self.bin_dir = bin_dir
        self._account: _Account | None = None

    @property
    def url(self) -> str:
        """The ``postgresql://`` URL of the database (valid once ``start()`` returned)."""
        return f"postgresql://{self.user}@{LOOPBACK}:{self._ports['port']}/{self.database}"

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (PGDATA)."""
        return self.state_dir / "data"

    @property
    def log_path(self) -> Path:
        """The server log."""
        return self.state_dir / "postgres.log"

    def is_running(self) -> bool:
        """True when a server runs on this data directory (its postmaster.pid names a live pid)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except PermissionError:
            return True  # alive, owned by the PostgreSQL account
        except (OSError, ValueError, IndexError):
            return False
        return True

    def start(self, timeout_s: float = 60) -> str:
        """Create the cluster on first use, start it, and return its URL."""
        self._resolve_tools()
        self._prepare_dir()
        if self.is_running():
            return self.url
        self._ports.claim()
        _save_state(self.state_dir, dict(self._ports.ports))
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._write_config()
        started = self._pg_ctl("start", "-w", "-t", str(int(timeout_s)), "-l", str(self.log_path))
        if started.returncode != 0:
            raise self._failure("PostgreSQL did not start", started)
        self._ports.fix()
        self._create_database()
        return self.url

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the server (fast shutdown: sessions are ended, data is kept)."""
        if not self.is_running():
            return
        self._resolve_tools()
        stopped = self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(int(timeout_s)))
        if stopped.returncode != 0 and self.is_running():
            self._pg_ctl("stop", "-m", "immediate", "-w")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _resolve_tools(self) -> None:
        self.bin_dir = _postgres_bin_dir(self.bin_dir)
        self._account = _postgres_account()

    def _prepare_dir(self) -> None:
        if self._account is not None:
            _check_reachable(self.state_dir, self._account)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._account is not None:
            # initdb and pg_ctl create the data dir and the log here as the account.
            os.chown(self.state_dir, self._account.uid, self._account.gid)

    def _initdb(self) -> None:
        done = self._run(
            "initdb", "-D", str(self.data_dir), "-U", self.user, "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions",
        )  # fmt: skip
        if done.returncode != 0:
            raise self._failure("initdb failed", done)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("include_if_exists = 'wayang.conf'\n")

    def _write_config(self) -> None:
        sockets = self.state_dir / "sockets"
        sockets.mkdir(exist_ok=True)
        if self._account is not None:
            os.chown(sockets, self._account.uid, self._account.gid)
        # Unix socket paths are limited to 107 bytes; deep state dirs fall back to TCP only.
        socket_dir = str(sockets) if len(str(sockets)) < 90 else ""
        lines = [
            "# Written by wayang_mq.dev.nodes on every start: edit PostgresNode, not this.",
            f"listen_addresses = '{LOOPBACK}'",
            f"port = {self._ports['port']}",
            f"unix_socket_directories = '{socket_dir.replace(chr(39), chr(39) * 2)}'",
            # A throwaway node: surviving an OS crash is not worth the fsync time in tests
            # (a killed server still recovers from its WAL).
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "",
        ]
        conf = self.data_dir / "wayang.conf"
        conf.write_text("\n".join(lines))
        if self._account is not None:
            os.chown(conf, self._account.uid, self._account.gid)

    def _create_database(self) -> None:
        done = self._run(
            "createdb", "-h", LOOPBACK, "-p", str(self._ports["port"]), "-U", self.user,
            self.database,
        )  # fmt: skip
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise self._failure(f"could not create database {self.database}", done)

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", "-D", str(self.data_dir), *args)

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.bin_dir is not None, "start() resolves the binaries first"
        account = self._account
        # Inherited PG* variables (PGDATA, PGPORT, ...) would aim the tools at another server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", HOME=str(self.state_dir))
        return subprocess.run(
            [str(self.bin_dir / tool), *args],
            cwd=self.state_dir,  # the account may not be allowed into our working directory
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=[] if account else None,
        )

    def _failure(self, what: str, done: subprocess.CompletedProcess[str]) -> StackError:
        output = (done.stderr or done.stdout).strip()
        tail = _log_tail(self.log_path)
        details = "\n".join(part for part in (output, tail) if part)
        return StackError(
            f"{what} (log: {self.log_path})" + (f"\n{details}" if details else ""),
            hint=f"read {self.log_path}; delete {self.state_dir} to start from scratch",
        )
