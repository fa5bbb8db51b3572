"""`wayang-mq dev --cluster 3`, run as a user runs it: the stack on a 3-node cluster."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.test_cli import assert_one_line_error, wayang
from tests.test_dev import DevStack, _drop_private_postgres
from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.endpoint import BrokerEndpoint, split_urls
from wayang_mq.dev.dev_cluster import CLUSTER_DIR, rotated
from wayang_mq.dev.nodes import port_in_use
from wayang_mq.testing.harness import eventually

NODE_LINE = r"    node (\d) +(wayang-\d+@localhost)  amqp://127\.0\.0\.1:(\d+)  (http://\S+)/\n"
#: the daemons dev starts, by account, and the node each connects to first (i mod 3)
FIRST_NODE = {"demo-0": 0, "demo-1": 1, "dev-reaper": 2, "dev-control-plane": 0}


def _node_processes(cluster_dir: Path) -> list[int]:
    """Our processes started for a node in ``cluster_dir`` (epmd, shared by every node on
    the machine, excepted)."""
    marker = f"RABBITMQ_MNESIA_BASE={cluster_dir}/".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes() and (
                (proc / "comm").read_text().strip() != "epmd"
            ):
                found.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile, or not ours
    return found


@pytest.mark.timeout(240)
async def test_dev_cluster_runs_the_fabric_on_3_nodes_spreads_daemons_and_stops_every_node(
    tmp_path: Path,
) -> None:
    # Given `wayang-mq dev --cluster 3` started as a user starts it
    stack = DevStack(tmp_path, "--cluster", "3", "--demo-tasks", "6", "--no-prometheus")
    cluster_dir = tmp_path / CLUSTER_DIR
    try:
        stack.until_printed("==> running", timeout_s=150)
        # Then it printed each node's name, AMQP address and console
        nodes = re.findall(NODE_LINE, stack.output)
        assert [int(n[0]) for n in nodes] == [1, 2, 3], stack.output
        names = [n[1] for n in nodes]
        # and the management API of any one node lists the three, running, in one cluster
        saved = json.loads((tmp_path / "endpoint.json").read_text())
        admin = BrokerEndpoint.from_url(saved["amqp_url"], saved["management_url"])
        third = management_client(BrokerEndpoint.from_url(admin.amqp_urls[2], nodes[2][3]))
        listed = await asyncio.to_thread(third.list_nodes)
        assert sorted(n["name"] for n in listed if n["running"]) == sorted(names)
        # and a task queue has a replica on every node
        queue = await asyncio.to_thread(third.get_queue, "wayang.task.demo.echo")
        assert queue is not None and sorted(queue["members"]) == sorted(names)
        # And the demo's tasks flowed, and the record holds them
        assert "==> 6 results" in stack.output
        assert "SUCCESS output={'succeeded_on_attempt': 2}" in stack.output
        assert "==> recorded in PostgreSQL: 6 of 6 demo tasks finished\n" in stack.output
        # And another terminal gets every node: each role's URL lists all three
        for role, url in saved["accounts"].items():
            assert [u.rsplit(":", 1)[-1] for u in split_urls(url)] == [f"{n[2]}/" for n in nodes], (
                role
            )
        # and a task submitted from there gets its result
        env = {"WAYANG_STATE_DIR": str(tmp_path)}
        run = wayang("submit", "demo.echo", "--input", "{}", "--wait", env=env, timeout=90)
        assert run.returncode == 0, run.stdout + run.stderr
        assert json.loads(run.stdout)["status"] == "SUCCESS"

        # And the daemons' connections spread over the nodes: daemon i on node i mod 3
        async def spread() -> bool:
            rows = await asyncio.to_thread(third.list_connections)
            on = {(r["user"], r["node"]) for r in rows if r["user"] in FIRST_NODE}
            wanted = {(user, names[index]) for user, index in FIRST_NODE.items()}
            return on == wanted

        await eventually(
            spread,
            what="demo-0 on node 1, demo-1 on node 2, the reaper on node 3, "
            "the control plane on node 1",
            timeout_s=30,  # the management API lists a connection a few seconds after it opens
            interval_s=0.5,
        )
        assert len({names[i] for i in FIRST_NODE.values()}) == 3
        assert _node_processes(cluster_dir), "the test's process check finds the nodes"
    finally:
        # When dev is stopped with Ctrl-C
        stack.process.send_signal(signal.SIGINT)
        try:
            rest = stack.process.communicate(timeout=90)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            stack.stop()
            raise
        _drop_private_postgres(tmp_path)
    # Then it stopped every node: no node process left, no node port listening
    assert stack.process.returncode == 0, rest
    assert "==> stopping the RabbitMQ cluster (3 nodes)" in rest
    assert _node_processes(cluster_dir) == []
    assert not any(port_in_use(int(n[2])) for n in nodes)


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--cluster", "0"], {}, "--cluster 0: a cluster needs at least one node"),
        (["--cluster", "3", "--tls"], {}, "--tls and --cluster do not go together"),
        (["--cluster", "3", "--amqp-port", "5673"], {}, "a cluster picks a free pair"),
        (
            ["--cluster", "3"],
            {"WAYANG_AMQP_URL": "amqp://u:p@127.0.0.1:1/"},
            "but WAYANG_AMQP_URL names a broker",
        ),
    ],
)
def test_dev_cluster_refuses_what_cannot_work_before_starting_anything(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    # Given a state dir, When dev is asked for a cluster it cannot run
    state_dir = tmp_path / "state"
    run = wayang("dev", "--state-dir", str(state_dir), *args, env=env)
    # Then it says why in one line, and started nothing
    assert_one_line_error(run, 2, needle)
    assert not state_dir.exists()


def test_rotated_starts_the_url_list_at_node_i_mod_n() -> None:
    # Given three nodes' URLs, When daemon i's list is made
    urls = "amqp://a/,amqp://b/,amqp://c/"
    # Then it starts at node i mod 3 and keeps the order after it; one URL stays as it is
    assert rotated(urls, 0) == urls
    assert rotated(urls, 1) == "amqp://b/,amqp://c/,amqp://a/"
    assert rotated(urls, 5) == "amqp://c/,amqp://a/,amqp://b/"
    assert rotated(urls, -1) == "amqp://c/,amqp://a/,amqp://b/"
    assert rotated("amqp://a/", 4) == "amqp://a/"
