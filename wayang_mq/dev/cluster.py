"""A RabbitMQ cluster of private nodes on one machine, for development and tests.

Each member is a :class:`~wayang_mq.dev.nodes.RabbitNode` in its own directory with its own
ports and node name; they share one Erlang cookie and list each other for RabbitMQ's
``classic_config`` peer discovery, so they form one cluster when booted together (3.10 takes a
lock during discovery, so booting in parallel is safe; if the nodes still came up as separate
clusters, the stragglers are joined with ``rabbitmqctl join_cluster``).

A member may bind another local address (``hosts``) and be spawned through a command prefix
(``command_prefixes``), e.g. ``["ip", "netns", "exec", "ns1"]`` to put it in a network
namespace. Node names are then ``wayang-PORT@ADDRESS`` with Erlang long names
(``RABBITMQ_USE_LONGNAME``); on loopback they are ``wayang-PORT@localhost`` short names.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.amqp.management import ManagementClient
from wayang_mq.core.errors import BrokerUnreachable, ConfigError, StackError, TopologyError
from wayang_mq.core.private_files import write_private
from wayang_mq.dev.nodes import LOOPBACK, RabbitNode, free_port

NodeRef = int | str  # a member by index (0-based) or by Erlang node name
_COOKIE_FILE = ".erlang.cookie"  # in the node's HOME, which RabbitNode sets to its state dir


class ClusterNode(RabbitNode):
    """A :class:`RabbitNode` that joins its peers: shared cookie, classic_config discovery."""

    def __init__(
        self,
        state_dir: Path,
        *,
        cookie: str,
        longnames: bool,
        extra_config: Sequence[str] = (),
        **node_options: Any,
    ) -> None:
        super().__init__(state_dir, **node_options)
        self.cookie = cookie
        self.longnames = longnames
        self.extra_config = tuple(extra_config)
        self.peers: tuple[str, ...] = ()  # whom to join on first boot, set by the cluster

    def _write_files(self) -> None:
        super()._write_files()
        # Erlang reads $HOME/.erlang.cookie and refuses one others may read (0600 is fine).
        write_private(self.state_dir / _COOKIE_FILE, self.cookie)

    def _config(self) -> str:
        peers = [
            f"cluster_formation.classic_config.nodes.{index} = {name}"
            for index, name in enumerate(self.peers, start=1)
        ]
        return "\n".join(
            [
                super()._config().rstrip("\n"),
                # Read only while the node's database is blank: a restarted member already
                # knows its cluster and rejoins it whatever is listed here.
                "cluster_formation.peer_discovery_backend = classic_config",
                *peers,
                # Three nodes: the side that lost the majority pauses instead of diverging,
                # which is what the clustering guide recommends for an odd-sized cluster.
                "cluster_partition_handling = pause_minority",
                *self.extra_config,
                "",
            ]
        )

    def _environment(self) -> dict[str, str]:
        env = super()._environment()
        if self.longnames:
            # Server and rabbitmqctl alike: long and short names never talk to each other.
            env["RABBITMQ_USE_LONGNAME"] = "true"
        return env


class RabbitCluster:
    """``size`` private RabbitMQ nodes forming one cluster; a context manager.

    ``state_dir`` holds one sub-directory per node (a fresh temp dir, removed on ``stop()``,
    when omitted). ``hosts[i]`` and ``command_prefixes[i]`` place node ``i`` (default:
    127.0.0.1, spawned directly). ``longnames`` defaults to True when any host is not loopback.
    ``extra_config`` lines go into every node's rabbitmq.conf (e.g. ``net_ticktime = 10``).
    ``node_options`` are further :class:`RabbitNode` options for every member
    (``server_binary``, ``max_message_bytes``).
    """

    def __init__(
        self,
        size: int = 3,
        state_dir: Path | None = None,
        *,
        hosts: Sequence[str] | None = None,
        command_prefixes: Sequence[Sequence[str] | None] | None = None,
        longnames: bool | None = None,
        username: str = "wayang",
        password: str | None = None,
        cookie: str | None = None,
        extra_config: Sequence[str] = (),
        **node_options: Any,
    ) -> None:
        if size < 1:
            raise ConfigError(f"a cluster needs at least one node, got {size}")
        hosts = list(hosts) if hosts is not None else [LOOPBACK] * size
        prefixes = list(command_prefixes) if command_prefixes is not None else [None] * size
        if len(hosts) != size or len(prefixes) != size:
            raise ConfigError(
                f"{size} nodes but {len(hosts)} hosts and {len(prefixes)} command prefixes",
                hint="give one host and one command prefix (or None) per node",
            )
        self._owns_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="wayang-cluster-")).absolute()
        self.longnames = any(h != LOOPBACK for h in hosts) if longnames is None else longnames
        password = password or secrets.token_urlsafe(18)
        cookie = cookie or secrets.token_hex(20)
        self.nodes: list[ClusterNode] = []
        for index, (host, prefix) in enumerate(zip(hosts, prefixes, strict=True)):
            amqp_port = free_port()
            self.nodes.append(
                ClusterNode(
                    self.state_dir / f"node{index + 1}",
                    cookie=cookie,
                    longnames=self.longnames,
                    extra_config=extra_config,
                    amqp_port=amqp_port,
                    node_name=_node_name(amqp_port, host, self.longnames),
                    username=username,
                    password=password,
                    host=host,
                    command_prefix=prefix or (),
                    **node_options,
                )
            )

    # -- where the cluster answers ---------------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        """The members' Erlang node names, in member order (``rabbit@...`` style)."""
        return [node.node_name for node in self.nodes]

    @property
    def endpoints(self) -> list[BrokerEndpoint]:
        """One endpoint per member (AMQP URL, management URL, account), in member order."""
        return [node.endpoint for node in self.nodes]

    @property
    def amqp_urls(self) -> list[str]:
        """Every member's AMQP URL, in member order."""
        return [node.endpoint.amqp_url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """All members' AMQP URLs comma-separated: the form ``WAYANG_AMQP_URL`` accepts."""
        return ",".join(self.amqp_urls)

    @property
    def management_urls(self) -> list[str]:
        """Every member's management API base URL, in member order."""
        return [node.endpoint.management_url for node in self.nodes]

    def node(self, ref: NodeRef) -> ClusterNode:
        """A member by index or by node name."""
        if isinstance(ref, int):
            return self.nodes[ref]
        for node in self.nodes:
            if node.node_name == ref:
                return node
        raise ConfigError(f"no node {ref!r} in this cluster", hint=f"one of {self.node_names}")

    def index_of(self, ref: NodeRef) -> int:
        """A member's index, by index or node name."""
        return self.nodes.index(self.node(ref))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, node: NodeRef | None = None, timeout_s: float = 90) -> None:
        """Boot every member (in parallel) or one (``node``) and wait until the cluster lists
        it/them as running. A restarted member rejoins by itself: its data names the cluster."""
        try:
            if node is None:
                self._boot(timeout_s)
            else:
                self.node(node).start(timeout_s)
            self.wait_running(timeout_s=timeout_s)
        except BaseException:
            if node is None:
                self.stop()
            raise

    def stop(self, node: NodeRef | None = None, *, clean: bool = False) -> None:
        """Stop every member (and remove a temp state dir) or one member.

        ``clean=False`` kills (SIGKILL): 3.10's clean stop waits seconds per node, and a
        thrown-away cluster's data does not matter. A single ``node`` always stops cleanly.
        """
        if node is not None:
            self.node(node).stop()
            return
        _in_parallel([(n.stop if clean else n.kill) for n in self.nodes])
        if self._owns_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def kill(self, node: NodeRef) -> None:
        """SIGKILL one member (its whole process group), as a crash would."""
        self.node(node).kill()

    def running(self) -> list[str]:
        """Node names the cluster (asked through any live member) lists as running."""
        nodes = self._ask(lambda api: api.list_nodes())
        return sorted(str(n["name"]) for n in nodes if n.get("running"))

    def wait_running(self, nodes: Sequence[NodeRef] | None = None, timeout_s: float = 60) -> None:
        """Wait until the cluster lists ``nodes`` (default: every member started by us) as
        running; StackError naming the missing ones after ``timeout_s``."""
        wanted = {self.node(n).node_name for n in nodes} if nodes is not None else None
        if wanted is None:
            wanted = {n.node_name for n in self.nodes if n.is_running()}
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(BrokerUnreachable, TopologyError):
                if wanted <= set(self.running()):
                    return
            if time.monotonic() > deadline:
                raise StackError(
                    f"cluster nodes not running after {timeout_s:g}s: {sorted(wanted)}",
                    hint=f"read the node logs under {self.state_dir}",
                )
            time.sleep(0.25)

    # -- queues ------------------------------------------------------------------------------

    def queue_info(self, queue: str, vhost: str = "/") -> dict[str, Any]:
        """The management API's view of a queue (``leader``, ``members``, ``online``, ...)."""
        info: dict[str, Any] | None = self._ask(lambda api: api.for_vhost(vhost).get_queue(queue))
        if info is None:
            raise TopologyError(f"queue {queue!r} does not exist in vhost {vhost!r}")
        return info

    def leader_of(self, queue: str, vhost: str = "/") -> str:
        """The node name leading a quorum queue (its ``leader``; ``node`` for other types)."""
        info = self.queue_info(queue, vhost)
        return str(info.get("leader") or info["node"])

    def members_of(self, queue: str, vhost: str = "/") -> list[str]:
        """The node names holding a replica of a quorum queue."""
        return sorted(str(m) for m in self.queue_info(queue, vhost).get("members", []))

    def management(self, node: NodeRef | None = None) -> ManagementClient:
        """A management client on ``node``, or on the first live member."""
        if node is not None:
            return management_client(self.node(node).endpoint)
        for member in self.nodes:
            if member.is_running():
                return management_client(member.endpoint)
        raise StackError("no member of the cluster is running", hint="start() it first")

    # -- internals ---------------------------------------------------------------------------

    def _ask(self, call: Callable[[ManagementClient], Any]) -> Any:
        """``call`` on the first live member that answers (a dying node may not)."""
        failure: Exception | None = None
        for member in self.nodes:
            if not member.is_running():
                continue
            try:
                return call(management_client(member.endpoint, timeout_s=5))
            except BrokerUnreachable as error:
                failure = error
        raise failure or StackError("no member of the cluster is running", hint="start() it")

    def _boot(self, timeout_s: float) -> None:
        """The first member alone (it forms the cluster at once), then the others together.

        All at once is slower: the node holding 3.10's discovery lock first retries its
        not-yet-booted peers for 5 s, and the others back off on the lock for up to 15 s.
        """
        seed, *others = self.nodes
        seed.peers = ()
        seed.start(timeout_s)
        for member in others:
            member.peers = (seed.node_name,)
        _in_parallel([functools.partial(n.start, timeout_s) for n in others])
        self._join_stragglers()

    def _join_stragglers(self) -> None:
        """Join members that booted as clusters of their own to the first member's cluster."""
        seed = self.nodes[0]
        listed = {str(n["name"]) for n in management_client(seed.endpoint).list_nodes()}
        for member in self.nodes[1:]:
            if member.node_name in listed:
                continue
            member.ctl("stop_app")
            member.ctl("reset")
            member.ctl("join_cluster", seed.node_name)
            member.ctl("start_app")

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

    def __repr__(self) -> str:
        return f"RabbitCluster({self.node_names!r}, state_dir={str(self.state_dir)!r})"


def _node_name(amqp_port: int, host: str, longnames: bool) -> str:
    """``wayang-PORT@localhost`` (short names), or ``wayang-PORT@HOST`` with long names."""
    return f"wayang-{amqp_port}@{host if longnames else 'localhost'}"


def _in_parallel(calls: Sequence[Callable[[], object]]) -> None:
    """Run ``calls`` in threads (node boots are mostly waiting); re-raise the first failure."""
    if len(calls) == 1:
        calls[0]()
        return
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        for future in futures:
            future.result()


@contextlib.contextmanager
def local_rabbitmq_cluster(size: int = 3, **options: Any) -> Iterator[RabbitCluster]:
    """A private ``size``-node cluster for the block (``options`` as for RabbitCluster)."""
    cluster = RabbitCluster(size, **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
