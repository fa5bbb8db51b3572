"""``wayang-mq dev --cluster N``: the stack on N private RabbitMQ nodes forming one cluster.

The cluster lives in ``<state>/rabbitmq-cluster`` and is made afresh on every run (its
queues do not outlive the stack, unlike the single node's): node names and ports are picked
anew each time, and old members' data would name a cluster that no longer exists. Every
client gets every node's address; each daemon lists them starting at another node, so their
connections spread over the cluster (docs/cluster.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from wayang_mq.amqp.endpoint import BrokerEndpoint, split_urls
from wayang_mq.core.errors import ConfigError
from wayang_mq.dev.cluster import RabbitCluster

CLUSTER_DIR = "rabbitmq-cluster"  # in the state dir


def check_cluster_options(
    size: int,
    *,
    broker_named: bool,
    tls: bool,
    ports_given: bool,
) -> None:
    """Refuse what a dev cluster cannot do, before anything starts."""
    if size < 1:
        raise ConfigError(
            f"--cluster {size}: a cluster needs at least one node",
            hint="use --cluster 3, the usual size: a majority survives one node's loss",
        )
    if size == 1:
        return
    if broker_named:
        raise ConfigError(
            "--cluster starts a cluster of its own, but WAYANG_AMQP_URL names a broker",
            hint="unset WAYANG_AMQP_URL, or drop --cluster to use that broker; "
            "it may list every node of your cluster, comma-separated",
        )
    if tls:
        raise ConfigError(
            "--tls and --cluster do not go together: the dev cluster's nodes are plain AMQP",
            hint="drop --cluster for one TLS-only node, or --tls for a plain cluster",
        )
    if ports_given:
        raise ConfigError(
            "--amqp-port and --management-port name one node's ports; a cluster picks a "
            "free pair for each of its nodes",
            hint="drop the port options with --cluster: each node's address is printed",
        )


def start_cluster(
    state_dir: Path,
    size: int,
    say: Callable[[str], None],
    *,
    server_binary: Path | None,
    max_message_bytes: int,
) -> RabbitCluster:
    """A fresh ``size``-node cluster in ``state_dir``, booted and listing every node as
    running; nothing left running when it fails to boot."""
    directory = state_dir / CLUSTER_DIR
    shutil.rmtree(directory, ignore_errors=True)
    cluster = RabbitCluster(
        size,
        directory,
        server_binary=server_binary,
        max_message_bytes=max_message_bytes,
    )
    say(f"==> starting a {size}-node RabbitMQ cluster (state in {directory})")
    cluster.start()  # waits until every member runs in the one cluster; stops them on failure
    say(f"    {size} nodes running: {', '.join(cluster.node_names)}")
    return cluster


def cluster_endpoint(cluster: RabbitCluster) -> BrokerEndpoint:
    """The administrator's endpoint naming every node (AMQP and management, member order)."""
    return BrokerEndpoint.from_url(cluster.amqp_url, ",".join(cluster.management_urls))


def rotated(urls: str, start: int) -> str:
    """The comma-separated ``urls`` beginning at the one at ``start`` (mod their count):
    daemon *i* connects to node *i mod N* first and fails over to the others in turn."""
    addresses = split_urls(urls)
    if len(addresses) < 2:
        return urls
    at = start % len(addresses)
    return ",".join(addresses[at:] + addresses[:at])


def print_nodes(cluster: RabbitCluster, say: Callable[[str], None]) -> None:
    """Each member's name, AMQP address and console, for the person at the terminal."""
    for index, node in enumerate(cluster.nodes, start=1):
        endpoint = node.endpoint
        host_port = endpoint.amqp_url.rsplit("@", 1)[-1].rstrip("/")
        say(f"    node {index:<13}{node.node_name}  amqp://{host_port}  {endpoint.console_url}")
