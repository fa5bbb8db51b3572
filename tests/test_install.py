"""wayang-mq as a user installs and deploys it: from a wheel, on any vhost, without test code.

The checkout hides packaging mistakes: its working directory holds ``topology/wayang.toml``
and a ``workers/`` folder, so a wheel that forgot either still works there. These tests run the
installed product from somewhere else, on a vhost other than ``/``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from wayang_mq.amqp.connect import management_client
from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.core import names
from wayang_mq.testing.harness import Fabric, WorkerProcess, eventually

REPO = Path(__file__).resolve().parents[1]

#: what a source copy for the wheel build leaves out: environments, caches, build output
#: (a stale build/lib would be packed into the wheel as it is)
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".wayang", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "bench"
)

#: module prefixes that belong to tests and dev tooling, never to a production daemon
_TEST_OR_DEV = ("pytest", "_pytest", "testcontainers")
_TEST_OR_DEV_PACKAGES = ("wayang_mq.dev", "wayang_mq.testing")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without WAYANG_* settings or anything pointing Python at the checkout."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    base = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_") and k not in dropped}
    return base | extra


def broker_env(endpoint: BrokerEndpoint, key_dir: Path) -> dict[str, str]:
    """The settings a deployed daemon gets: the broker and the keys, nothing else."""
    return clean_env(
        WAYANG_AMQP_URL=endpoint.amqp_url,
        WAYANG_MANAGEMENT_URL=endpoint.management_url,
        WAYANG_KEY_DIR=str(key_dir),
    )


def run(
    command: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end, output captured as text."""
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def build_wheel(workdir: Path) -> Path:
    """``python -m build --wheel`` on a copy of the checkout, so the checkout stays untouched."""
    source = workdir / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=_NOT_SOURCE)
    out = workdir / "dist"
    built = run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)],
        cwd=workdir,
        env=clean_env(),
        timeout=180,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = out.glob("wayang_mq-*.whl")
    return wheel


def install_in_fresh_venv(wheel: Path, venv: Path) -> Path:
    """A new virtualenv with the wheel and its dependencies; its ``bin`` directory."""
    created = run([sys.executable, "-m", "venv", str(venv)], cwd=venv.parent, env=clean_env())
    assert created.returncode == 0, created.stderr
    installed = run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        cwd=venv.parent,
        env=clean_env(),
        timeout=180,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv / "bin"


def top_level_packages(wheel: Path) -> set[str]:
    """The importable top-level names a wheel installs (its metadata directories left out)."""
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    return {top.removesuffix(".py") for top in tops if not top.endswith((".dist-info", ".data"))}


def start_worker(
    command: list[str], *, executor_id: str, cwd: Path, env: dict[str, str]
) -> WorkerProcess:
    """Start a worker daemon with its output in ``cwd/<executor_id>.log``."""
    log_path = cwd / f"{executor_id}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    return WorkerProcess(executor_id, process, log_path)


def on_vhost(amqp_url: str, vhost: str) -> str:
    """The same broker and account, on another vhost (one path segment, so ``/`` is ``%2F``)."""
    return urlunsplit(urlsplit(amqp_url)._replace(path="/" + quote(vhost, safe="")))


def management_get(endpoint: BrokerEndpoint, path: str) -> Any:
    """GET a management API path as the endpoint's account; the JSON it answers."""
    request = urllib.request.Request(endpoint.management_url + path)
    token = base64.b64encode(f"{endpoint.username}:{endpoint.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def consumes_in(endpoint: BrokerEndpoint, queue: str) -> bool:
    """True when some consumer reads ``queue`` in the endpoint's vhost."""
    consumers = management_get(endpoint, f"/api/consumers/{quote(endpoint.vhost, safe='')}")
    return any(c["queue"]["name"] == queue for c in consumers)


@pytest.fixture
def vhost(fabric: Fabric) -> Iterator[str]:
    """A fresh vhost on the session broker, the account allowed everything in it; then deleted."""
    name = f"wayang-test-{secrets.token_hex(4)}"
    management = management_client(fabric.endpoint)
    management.create_vhost(name)
    try:
        yield name
    finally:
        management.delete_vhost(name)


@pytest.mark.timeout(300)
async def test_a_wheel_installed_outside_the_checkout_applies_the_topology_and_runs_a_worker(
    fabric: Fabric, tmp_path: Path
) -> None:
    # Given: the wheel, installed into a fresh virtualenv outside the checkout
    wheel = build_wheel(tmp_path)
    assert "wayang_workers" in top_level_packages(wheel)
    assert "workers" not in top_level_packages(wheel)
    # with the system executors, their data files and the example settings
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    executors = ("http_call", "db_query", "batch_run", "payment/__init__", "payment/ledger")
    for module in (*executors, "agent/__init__", "agent/llm", "approval/__init__"):
        assert f"wayang_workers/{module}.py" in shipped, module
    assert "wayang_workers/payment/ledger.sql" in shipped
    for data in ("schema.sql", "templates/detail.html", "static/style.css"):
        assert f"wayang_workers/approval/{data}" in shipped, data
    assert "wayang_workers/examples/http_call.toml" in shipped
    home = tmp_path / "deploy"
    home.mkdir()
    bin_dir = install_in_fresh_venv(wheel, tmp_path / "venv")
    env = broker_env(fabric.endpoint, fabric.key_dir)
    located = run(
        [str(bin_dir / "python"), "-c", "import wayang_mq; print(wayang_mq.__file__)"],
        cwd=home,
        env=env,
    )
    assert Path(located.stdout.strip()).is_relative_to(tmp_path / "venv"), located.stderr
    no_workers = run([str(bin_dir / "python"), "-c", "import workers"], cwd=home, env=env)
    assert "ModuleNotFoundError" in no_workers.stderr

    # When: its CLI applies the topology, from a directory with no topology file in it
    applied = run([str(bin_dir / "wayang-mq"), "topology", "apply"], cwd=home, env=env)

    # Then: the shipped topology is the one the fabric applied from the checkout
    assert applied.returncode == 0, applied.stderr
    assert "0 created, 0 updated" in applied.stdout.splitlines()[-1]

    # When: its worker daemon serves the shipped demo executor and a task is submitted
    command = [str(bin_dir / "wayang-mq"), "--log-format", "text", "worker"]
    command += ["wayang_workers.demo:Echo"]
    daemon = start_worker(
        [*command, "--id", "wheel-worker"], executor_id="wheel-worker", cwd=home, env=env
    )
    try:
        await daemon.until_logged("event=worker.started")
        async with fabric.dispatcher() as dispatcher:
            handle = await dispatcher.submit("demo.echo", {"from": "wheel"})
            result = await handle.result(timeout_s=30)
    finally:
        daemon.stop()

    # Then: the installed worker ran it
    assert result.status == "SUCCESS", result
    assert result.executor_id == "wheel-worker"
    assert result.output == {"from": "wheel"}


async def test_the_whole_fabric_runs_on_a_non_default_vhost(
    fabric: Fabric, vhost: str, tmp_path: Path
) -> None:
    # Given: a vhost other than "/", empty, and the CLI's settings pointing at it
    endpoint = BrokerEndpoint.from_url(
        on_vhost(fabric.endpoint.amqp_url, vhost), fabric.endpoint.management_url
    )
    env = broker_env(endpoint, fabric.key_dir)
    cli = [sys.executable, "-m", "wayang_mq.cli"]

    # When: the topology is applied there, a worker serves it and a task is submitted
    applied = run([*cli, "topology", "apply"], cwd=tmp_path, env=env)
    assert applied.returncode == 0, applied.stderr
    daemon = start_worker(
        [*cli, "worker", "wayang_workers.demo:Echo", "--id", "vhost-worker"],
        executor_id="vhost-worker",
        cwd=tmp_path,
        env={**env, "WAYANG_LOG_FORMAT": "text"},  # its log is matched as text
    )
    try:
        await daemon.until_logged("event=worker.started")
        await eventually(
            lambda: consumes_in(endpoint, names.task_queue("demo.echo")),
            what=f"a consumer on demo.echo in vhost {vhost}",
        )
        submitted = run(
            [*cli, "submit", "demo.echo", "--input", '{"x": 1}', "--wait"], cwd=tmp_path, env=env
        )
    finally:
        daemon.stop()

    # Then: the task ran there, and the capability's queue lives in that vhost
    assert submitted.returncode == 0, submitted.stderr
    result = json.loads(submitted.stdout)
    assert result["output"] == {"x": 1}
    assert result["executor_id"] == "vhost-worker"
    assert management_client(endpoint).get_queue(names.task_queue("demo.echo")) is not None


@pytest.mark.parametrize(
    "module",
    [
        "wayang_mq.runtime.worker",
        "wayang_mq.client.dispatcher",
        "wayang_mq.ops.reaper",
        "wayang_mq.cli",
    ],
)
def test_importing_the_worker_loads_no_test_or_dev_code(module: str, tmp_path: Path) -> None:
    # Given: a fresh interpreter that reports every module it imports
    command = [sys.executable, "-X", "importtime", "-c", f"import {module}"]

    # When: it imports a production entry point
    imported = run(command, cwd=tmp_path, env=clean_env())

    # Then: nothing of pytest, the test harness or the dev stack came along
    assert imported.returncode == 0, imported.stderr
    loaded = [
        line.rsplit("|", 1)[1].strip()
        for line in imported.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    assert module in loaded
    stray = [
        name
        for name in loaded
        if name.startswith(_TEST_OR_DEV)
        or any(name == p or name.startswith(p + ".") for p in _TEST_OR_DEV_PACKAGES)
    ]
    assert stray == [], f"import {module} loaded test or dev code: {stray}"
