"""``wayang-mq dev``: the whole fabric on one machine, in the foreground.

A private RabbitMQ node (unless ``WAYANG_AMQP_URL`` names a broker), the topology, a signing
key, a private PostgreSQL (unless ``WAYANG_DATABASE_URL`` names one) migrated for the control
plane, demo worker daemons, the reaper and the control plane as real processes (restarted
when they die), and a burst of demo tasks whose results are shown, and then how many of them
the record holds; then it stays up until Ctrl-C, printing where the console and the database
are. The state directory and every file in it that holds a secret are private.

The administrator's account only applies the topology and grants the role accounts
(``wayang-mq access``): each worker runs as its own executor account, the reaper as a reaper,
the control plane as a control plane, the demo as a dispatcher. ``endpoint.json`` keeps a
dispatcher's, an executor's, the reaper's and the control plane's URL besides the
administrator's, and the database's, so commands in another terminal run under a role.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.endpoint import BrokerEndpoint, with_credentials
from wayang_mq.amqp.tls import with_tls
from wayang_mq.client.dispatcher import Dispatcher, DispatcherConfig
from wayang_mq.config import ENDPOINT_FILE, Settings, broker_endpoint, save_endpoint
from wayang_mq.controlplane.migrate import migrate
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.model import Result, RetryHints
from wayang_mq.core.private_files import private_dir, write_private
from wayang_mq.core.scopes import FULL_TRUST, KeyScope, Role
from wayang_mq.core.signing import KeyRing, Signer, write_keypair
from wayang_mq.dev import dev_cluster
from wayang_mq.dev.certs import DevCertificates
from wayang_mq.dev.cluster import RabbitCluster
from wayang_mq.dev.database import postgres_node, recorded, shown_url
from wayang_mq.dev.monitoring import Monitoring
from wayang_mq.dev.nodes import NodeTls, PostgresNode, RabbitNode
from wayang_mq.dev.supervise import DaemonSpec, Supervisor
from wayang_mq.security.accounts import (
    Account,
    control_plane_account,
    dispatcher_account,
    executor_account,
    grant,
    reaper_account,
)
from wayang_mq.topology.apply import apply_topology
from wayang_mq.topology.spec import Topology, load_topology

RETRY_ONCE = RetryHints(max_attempts=3, initial_backoff_ms=1000)  # through the 1 s retry tier
DEMO_EXECUTORS = (
    "wayang_workers.demo:Echo",
    "wayang_workers.demo:Sleep",
    "wayang_workers.demo:Fail",
)
DEMO_CAPABILITIES = ("demo.echo", "demo.sleep", "demo.fail")  # what DEMO_EXECUTORS serve
DEV_DISPATCHER = "dev-dispatcher"  # the demo; `submit` elsewhere runs as dev-dispatcher--<n>
DEV_EXECUTOR = "dev-executor"  # every capability, for workers started in another terminal
DEV_REAPER = "dev-reaper"
DEV_CONTROL_PLANE = "dev-control-plane"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What an earlier run of `dev` leaves in its state directory: such a directory is the stack's.
_STATE_MARKERS = (ENDPOINT_FILE, "rabbitmq", dev_cluster.CLUSTER_DIR, "logs", "keys", "postgres")


@dataclass(frozen=True)
class DevAccounts:
    """The AMQP URL of each role account the stack granted (they hold passwords)."""

    dispatcher: str
    executor: str
    reaper: str
    control_plane: str
    workers: dict[str, str]  # demo worker id -> its own executor account's URL

    def by_role(self) -> dict[str, str]:
        """What ``endpoint.json`` keeps for other commands, by role."""
        return {
            "dispatcher": self.dispatcher,
            "executor": self.executor,
            "reaper": self.reaper,
            "control-plane": self.control_plane,
        }


def grant_dev_accounts(
    endpoint: BrokerEndpoint,
    topology: Topology,
    workers: int,
    certs: DevCertificates | None = None,
) -> DevAccounts:
    """One account per daemon, each with a fresh password (a restarted stack rotates them);
    with --tls each URL also names a client certificate for that account (EXTERNAL login)."""
    admin = management_client(endpoint)

    def url(account: Account) -> str:
        password = grant(admin, account, new_password=True).password
        assert password is not None  # new_password: always a new one
        amqp_url = with_credentials(endpoint.amqp_url, account.user, password)
        if certs is None:
            return amqp_url
        files = certs.client(account.user)
        return with_tls(amqp_url, cert=files.cert, key=files.key)

    every = [c.name for c in topology.capabilities]
    return DevAccounts(
        dispatcher=url(dispatcher_account(DEV_DISPATCHER, every)),
        executor=url(executor_account(DEV_EXECUTOR, every)),
        reaper=url(reaper_account(DEV_REAPER)),
        control_plane=url(control_plane_account(DEV_CONTROL_PLANE)),
        workers={
            f"demo-{n}": url(executor_account(f"demo-{n}", DEMO_CAPABILITIES))
            for n in range(workers)
        },
    )


@dataclass(frozen=True)
class DevOptions:
    """What ``wayang-mq dev`` was asked for."""

    state_dir: Path
    amqp_port: int | None = None
    management_port: int | None = None
    workers: int = 2
    demo_tasks: int = 20
    wait: bool = True
    tls: bool = False  # a TLS-only broker; daemons log in with client certificates
    prometheus: bool = True  # a private Prometheus scraping the daemons, when installed
    cluster: int = 1  # private RabbitMQ nodes: more than one form a cluster (dev_cluster.py)


def say(line: str) -> None:
    """Progress for the person at the terminal."""
    print(line, flush=True)


def run_dev(options: DevOptions, settings: Settings) -> int:
    """Start everything, show tasks flowing, then stay up until interrupted."""
    dev_cluster.check_cluster_options(
        options.cluster,
        broker_named=settings.amqp_url is not None,
        tls=options.tls,
        ports_given=options.amqp_port is not None or options.management_port is not None,
    )
    state_dir = _private_state_dir(options.state_dir.resolve())
    # SIGTERM while starting unwinds like Ctrl-C, so the finally below stops what started
    signal.signal(signal.SIGTERM, _interrupt)
    node: RabbitNode | None = None
    cluster: RabbitCluster | None = None
    postgres: PostgresNode | None = None
    topology = load_topology(settings.topology)
    certs = _dev_certificates(options, settings, state_dir)
    try:
        if settings.amqp_url is None and options.cluster > 1:
            cluster = dev_cluster.start_cluster(
                state_dir,
                options.cluster,
                say,
                server_binary=settings.rabbitmq_server,
                max_message_bytes=topology.defaults.max_body_bytes,
            )
            endpoint = dev_cluster.cluster_endpoint(cluster)
            save_endpoint(state_dir, endpoint)
        elif settings.amqp_url is None:
            node = RabbitNode(
                state_dir / "rabbitmq",
                amqp_port=options.amqp_port,
                management_port=options.management_port,
                server_binary=settings.rabbitmq_server,
                max_message_bytes=topology.defaults.max_body_bytes,
                tls=_node_tls(certs),
            )
            say(f"==> starting a private RabbitMQ node (state in {node.state_dir})")
            endpoint = _with_client_cert(node.start(), certs)
            save_endpoint(state_dir, endpoint)
        else:
            endpoint = broker_endpoint(settings)
            say("==> using the broker in WAYANG_AMQP_URL")
        keys = settings.key_dir or private_dir(state_dir / "keys")
        say(f"==> applying topology {settings.topology}")
        report = asyncio.run(
            apply_topology(topology, endpoint.amqp_url, management_client(endpoint))
        )
        say("    " + report.lines()[-1])
        accounts = grant_dev_accounts(endpoint, topology, options.workers, certs)
        say(
            f"==> granted role accounts: {DEV_DISPATCHER}, {', '.join(accounts.workers)}, "
            f"{DEV_EXECUTOR}, {DEV_REAPER}, {DEV_CONTROL_PLANE} (see `wayang-mq access show`)"
        )
        signing = _dev_keys(keys, accounts.workers)
        say(f"==> a signing key per role, each with its scope, in {keys}")
        if settings.database_url is None:
            postgres = postgres_node(state_dir)
        database_url = _start_database(settings, postgres)
        if node is not None or cluster is not None:
            save_endpoint(
                state_dir,
                endpoint,
                accounts.by_role(),
                {role: str(signing[name]) for role, name in _KEY_OF_ROLE.items()},
                database_url,
            )
        stack = _Stack(
            endpoint,
            accounts,
            keys,
            signing,
            state_dir,
            database_url,
            certs,
            broker_prometheus=_broker_prometheus(node, cluster),
            prometheus=options.prometheus,
            cluster=cluster,
        )
        asyncio.run(_run_daemons(options, stack))
    finally:
        if postgres is not None:
            say("==> stopping PostgreSQL")
            postgres.stop()
        if node is not None:
            say("==> stopping RabbitMQ")
            node.stop()
        if cluster is not None:
            say(f"==> stopping the RabbitMQ cluster ({len(cluster.nodes)} nodes)")
            cluster.stop()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _broker_prometheus(node: RabbitNode | None, cluster: RabbitCluster | None) -> str | None:
    """The broker's metrics to scrape, if it is ours (a cluster's: its first node's; a
    TLS-only node's are HTTPS with the stack's CA: not scraped here)."""
    if cluster is not None:
        return cluster.nodes[0].prometheus_url
    return None if node is None or node.tls else node.prometheus_url


def _start_database(settings: Settings, postgres: PostgresNode | None) -> str:
    """The control plane's database, started (a private node) and migrated; its URL."""
    if postgres is None:
        assert settings.database_url is not None  # no private node: the user named one
        database_url = settings.database_url.get_secret_value()
        say("==> using the database in WAYANG_DATABASE_URL")
    else:
        say(f"==> starting a private PostgreSQL (state in {postgres.state_dir})")
        database_url = postgres.start()
    applied = migrate(database_url)
    say(f"    schema migrated ({len(applied)} applied)" if applied else "    schema up to date")
    return database_url


@dataclass(frozen=True)
class _Stack:
    """Where everything the daemons and the demo need is."""

    endpoint: BrokerEndpoint
    accounts: DevAccounts
    keys: Path
    signing: dict[str, Path]
    state_dir: Path
    database_url: str
    certs: DevCertificates | None = None
    monitoring: Monitoring = field(default_factory=Monitoring)
    broker_prometheus: str | None = None  # the broker's rabbitmq_prometheus, if ours
    prometheus: bool = True
    cluster: RabbitCluster | None = None  # with --cluster N


def _dev_certificates(
    options: DevOptions, settings: Settings, state_dir: Path
) -> DevCertificates | None:
    """With ``--tls``, the stack's CA and certificates (in ``<state>/tls``)."""
    if not options.tls:
        return None
    if settings.amqp_url is not None:
        raise ConfigError(
            "--tls starts a TLS-only broker of its own, but WAYANG_AMQP_URL names a broker",
            hint="unset WAYANG_AMQP_URL, or drop --tls and set WAYANG_TLS_CA/CERT/KEY "
            "for that broker",
        )
    certs = DevCertificates(state_dir / "tls")
    say(f"==> TLS: CA and certificates in {certs.directory}")
    return certs


def _node_tls(certs: DevCertificates | None) -> NodeTls | None:
    if certs is None:
        return None
    server = certs.server()
    return NodeTls(certs.ca.cert_path, server.cert, server.key)


def _with_client_cert(endpoint: BrokerEndpoint, certs: DevCertificates | None) -> BrokerEndpoint:
    """The node's endpoint, logging in by certificate as its account (EXTERNAL) with --tls.

    The password stays in the URL for the management API (HTTP Basic over HTTPS).
    """
    if certs is None:
        return endpoint
    files = certs.client(endpoint.username)
    amqp_url = with_tls(endpoint.amqp_url, cert=files.cert, key=files.key)
    return BrokerEndpoint.from_url(amqp_url, endpoint.management_url)


def _dev_keys(keys: Path, workers: Iterable[str]) -> dict[str, Path]:
    """A signing key per identity, each scoped to its role (docs/security.md §4): the
    dispatcher, each demo worker, the spare executor, the reaper, the control plane, and an
    admin key for operators (dead-letter replays). Public halves and scopes in ``keys``
    (every daemon trusts them); private keys in ``keys/private``, each handed to its daemon
    only. The dispatcher's is also ``keys/dev-dispatcher.key``: commands run in another
    terminal sign with the first ``*.key`` there. Kept across runs."""
    private = private_dir(keys / "private")
    wanted = {
        DEV_DISPATCHER: KeyScope(Role.DISPATCHER, DEV_DISPATCHER, ("*",)),
        DEV_EXECUTOR: KeyScope(Role.EXECUTOR, DEV_EXECUTOR, ("*",)),
        DEV_REAPER: KeyScope(Role.REAPER, DEV_REAPER, ("*",)),
        DEV_CONTROL_PLANE: KeyScope(Role.CONTROL_PLANE, DEV_CONTROL_PLANE, ("*",)),
        "admin": FULL_TRUST,
        **{w: KeyScope(Role.EXECUTOR, w, DEMO_CAPABILITIES) for w in workers},
    }
    paths: dict[str, Path] = {}
    for name, scope in wanted.items():
        path = private / f"{name}.key"
        if not path.exists():
            key_path, _ = write_keypair(keys, Signer.generate(), scope)
            os.replace(key_path, path)
        paths[name] = path
    default = keys / f"{DEV_DISPATCHER}.key"
    if not default.exists():
        write_private(default, paths[DEV_DISPATCHER].read_bytes())
    return paths


#: which key ``endpoint.json`` names for commands of each role run in another terminal
_KEY_OF_ROLE = {
    "dispatcher": DEV_DISPATCHER,
    "executor": DEV_EXECUTOR,
    "reaper": DEV_REAPER,
    "control-plane": DEV_CONTROL_PLANE,
    "admin": "admin",
}


def _private_state_dir(state_dir: Path) -> Path:
    """The stack's directory, 0700: it holds the broker's password and the signing key.

    One that exists is narrowed only when it is empty or the stack's from an earlier run:
    ``--state-dir`` aimed at a directory shared with others must not lock them out (the
    files with secrets in it are 0600 regardless).
    """
    ours = not state_dir.exists() or not any(state_dir.iterdir())
    ours = ours or any((state_dir / marker).exists() for marker in _STATE_MARKERS)
    private_dir(state_dir, narrow_existing=ours)
    if not ours and state_dir.stat().st_mode & 0o077:
        say(f"    note: {state_dir} holds other files, so its mode stays as it is")
    return state_dir


async def _run_daemons(options: DevOptions, stack: _Stack) -> None:
    """The daemons, supervised; the demo; then, unless --no-wait, until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    supervisor = Supervisor(say)
    try:
        log_dir = private_dir(stack.state_dir / "logs")
        for spec in _daemons(stack, log_dir):
            pid = await supervisor.start(spec)
            title = _TITLES.get(spec.kind) or f"{spec.kind} {spec.name}"
            say(f"==> started {title} (pid {pid}, log {spec.log_path})")
        _print_endpoint(stack)
        finished = await _unless_stopped(_demo(stack, options.demo_tasks), stop)
        if finished and options.wait:
            say("==> running; Ctrl-C stops the workers and the broker")
            await stop.wait()
    finally:
        await supervisor.stop()
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


#: how the lines name the daemons there is one of
_TITLES = {
    "reaper": "the reaper",
    "control-plane": "the control plane",
    "prometheus": "Prometheus",
}


def _daemons(stack: _Stack, log_dir: Path) -> list[DaemonSpec]:
    """Demo worker daemons, the reaper and the control plane, started exactly as a user would
    start them, each under its own account and signing with its own scoped key (with --tls,
    each logs in with a client certificate naming its account)."""
    base = {**os.environ, "WAYANG_KEY_DIR": str(stack.keys)}
    base.setdefault("WAYANG_MANAGEMENT_URL", stack.endpoint.management_url)
    cli = (sys.executable, "-m", "wayang_mq.cli")
    signing, accounts = stack.signing, stack.accounts
    specs: list[DaemonSpec] = []
    # --claims: the control plane runs here, so a task id runs once across the demo workers
    # and a recorded cancel stops a worker that never heard it (with the control plane down,
    # a claim goes unanswered for --claim-timeout and the task runs anyway)
    for executor_id, url in accounts.workers.items():
        command = (
            *cli,
            "worker",
            *DEMO_EXECUTORS,
            "--id",
            executor_id,
            "--concurrency",
            "16",
            "--claims",
            *stack.monitoring.metrics_args(executor_id, "worker"),
        )
        log_path = log_dir / f"{executor_id}.log"
        # on a cluster, daemon i connects to node i mod N first (rotated): connections spread
        amqp_url = dev_cluster.rotated(url, len(specs))
        env = base | {"WAYANG_AMQP_URL": amqp_url, "WAYANG_SIGNING_KEY": str(signing[executor_id])}
        specs.append(DaemonSpec(executor_id, "worker", command, env, log_path))
    # The reaper: the broker's dead letters (expired, poison) become FAILED results.
    reaper = (
        *cli,
        "reaper",
        "--id",
        DEV_REAPER,
        *stack.monitoring.metrics_args(DEV_REAPER, "reaper"),
    )
    env = base | {
        "WAYANG_AMQP_URL": dev_cluster.rotated(accounts.reaper, len(specs)),
        "WAYANG_SIGNING_KEY": str(signing[DEV_REAPER]),
    }
    specs.append(DaemonSpec(DEV_REAPER, "reaper", reaper, env, log_dir / "reaper.log"))
    # The control plane: wayang.record, written into the database. It may start after the
    # others: the record is a queue, it holds what flowed before.
    metrics = stack.monitoring.metrics_args(DEV_CONTROL_PLANE, "control-plane")
    control_plane = (*cli, "control-plane", "--id", DEV_CONTROL_PLANE, *metrics)
    env = base | {
        "WAYANG_AMQP_URL": dev_cluster.rotated(accounts.control_plane, len(specs)),
        "WAYANG_SIGNING_KEY": str(signing[DEV_CONTROL_PLANE]),
        "WAYANG_DATABASE_URL": stack.database_url,
    }
    log_path = log_dir / "control-plane.log"
    specs.append(DaemonSpec(DEV_CONTROL_PLANE, "control-plane", control_plane, env, log_path))
    # Prometheus, scraping the daemons' --metrics-port and the broker, with deploy/'s alerts
    if stack.prometheus:
        prometheus = stack.monitoring.prometheus(stack.state_dir, stack.broker_prometheus)
        if prometheus is not None:
            specs.append(prometheus)
    return specs


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``work`` to its end, unless ``stop`` is set first (then cancel it); True if it ended."""
    job = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({job, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not job.done():
        job.cancel()
    await asyncio.gather(job, return_exceptions=True)
    if job.cancelled():
        return False
    job.result()  # the demo's own error, if it failed
    return True


def _print_endpoint(stack: _Stack) -> None:
    endpoint, keys, state_dir, certs = stack.endpoint, stack.keys, stack.state_dir, stack.certs
    say("")
    say(f"    RabbitMQ console  {endpoint.console_url}")
    say(f"    login             {endpoint.username} / {endpoint.password}")
    say("    (the administrator: daemons, the demo and commands run as role accounts)")
    say(f"    AMQP URL          {endpoint.amqp_url}")
    if stack.cluster is not None:
        dev_cluster.print_nodes(stack.cluster, say)
    say(f"    PostgreSQL        {shown_url(stack.database_url)}  (the control plane's record)")
    say(f"    signing keys      {keys}")
    _print_monitoring(stack)
    if certs is not None:
        admin = certs.client(endpoint.username)
        say(f"    TLS CA            {certs.ca.cert_path}  (the console's too: trust it or accept)")
        say(f"    client cert       {admin.cert} / {admin.key}  (CN {endpoint.username})")
        say("    TLS only          no plain AMQP port; log in with a certificate (EXTERNAL)")
    say(
        "    try (another terminal, same directory):  wayang-mq submit demo.echo "
        '--input \'{"hello": "world"}\' --wait'
    )
    say(f"    (state in {state_dir}: other commands find it there, or set WAYANG_STATE_DIR)")
    say("")


def _print_monitoring(stack: _Stack) -> None:
    monitoring = stack.monitoring
    if stack.prometheus and monitoring.prometheus_url is not None:
        say(f"    Prometheus        {monitoring.prometheus_url}  (alerts: deploy/prometheus)")
    elif stack.prometheus:
        say("    Prometheus        not installed (apt-get install prometheus), not started")
    for n, (name, url) in enumerate(monitoring.metrics_urls().items()):
        say(f"    {'metrics' if n == 0 else '':<18}{url}  ({name})")
    if stack.broker_prometheus is not None:
        say(f"    broker metrics    {stack.broker_prometheus}/metrics")


async def _demo(stack: _Stack, count: int) -> None:
    """Send a burst of demo tasks, show each result as it arrives, then what the record holds."""
    if count <= 0:
        return
    config = DispatcherConfig(
        amqp_url=dev_cluster.rotated(
            stack.accounts.dispatcher, -1
        ),  # on a cluster: from the last node
        signer=Signer.from_file(stack.signing[DEV_DISPATCHER]),
        results_keyring=KeyRing.load_dir(stack.keys),
        dispatcher_id=DEV_DISPATCHER,
    )
    say(f"==> sending {count} demo tasks (echo, a sleep with progress, a failure, a retry)")
    started = time.monotonic()
    async with Dispatcher(config) as dispatcher:
        handles = [await dispatcher.submit("demo.sleep", {"seconds": 2})]
        handles.append(await dispatcher.submit("demo.fail", {"mode": "permanent"}))
        retried = {"mode": "retryable", "succeed_on_attempt": 2}
        handles.append(await dispatcher.submit("demo.fail", retried, retry=RETRY_ONCE))
        handles += [
            await dispatcher.submit("demo.echo", {"n": n}) for n in range(max(0, count - 3))
        ]
        for next_done in asyncio.as_completed([h.result(60) for h in handles]):
            say("    " + _describe(await next_done))
    say(f"==> {len(handles)} results in {time.monotonic() - started:.2f}s")
    written = await recorded(stack.database_url, [h.task_id for h in handles])
    behind = "" if written == len(handles) else " (behind: see logs/control-plane.log)"
    say(f"==> recorded in PostgreSQL: {written} of {len(handles)} demo tasks finished{behind}")


def _describe(result: Result) -> str:
    outcome = str(result.status)
    if result.error is not None:
        outcome += f" {result.error.code}: {result.error.message}"
    else:
        outcome += f" output={result.output}"
    duration = result.metrics.get("duration_ms", 0.0)
    return (
        f"task {result.task_id[:8]} {result.capability:<10} {outcome} "
        f"(by {result.executor_id}, attempt {result.attempt}, ran {duration:.1f} ms)"
    )
