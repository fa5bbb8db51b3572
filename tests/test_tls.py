"""TLS (issue 10, deliver 7): a TLS-only broker that takes client certificates as the login.

One private node for the module (``rabbitmq_tls``): amqps only, a client certificate from its
CA required, EXTERNAL auth with the certificate's common name as the broker user. Every
refusal must reach the person as one line saying what to do, never as a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import re
import signal
import stat
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import assert_one_line_error, wayang
from tests.test_dev import _drop_private_postgres, _read_until
from wayang_mq.amqp.connect import connect
from wayang_mq.amqp.tls import TlsFiles, with_tls
from wayang_mq.client.dispatcher import Dispatcher
from wayang_mq.config import Settings, broker_endpoint
from wayang_mq.core.errors import BrokerUnreachable, ConfigError
from wayang_mq.dev.certs import CertificateAuthority
from wayang_mq.testing.harness import Fabric, eventually
from wayang_mq.testing.plugin import TlsBrokerHandle

EXECUTOR_USER = "tls-executor"
DISPATCHER_USER = "tls-dispatcher"


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A CA the broker has never heard of."""
    return CertificateAuthority.open(tmp_path_factory.mktemp("stranger"), name="stranger CA")


@pytest.fixture(scope="module")
async def tls_fabric(
    rabbitmq_tls: TlsBrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fabric]:
    """The topology applied over amqps and HTTPS, and broker users for two certificates."""
    for user in (EXECUTOR_USER, DISPATCHER_USER):
        _add_user(rabbitmq_tls, user)
    fabric = await Fabric.create(rabbitmq_tls.endpoint, tmp_path_factory.mktemp("tls-fabric"))
    yield fabric
    fabric.stop_processes()


async def _refusal(url: str) -> BrokerUnreachable:
    with pytest.raises(BrokerUnreachable) as refused:
        connection = await connect(url, "tls-test")
        await connection.close()
    # Nothing of the failed attempt is left for the garbage collector to close: collected off
    # the loop (as a to_thread call may do), it could not, and warned of an unawaited close().
    await asyncio.to_thread(gc.collect)
    return refused.value


async def test_a_client_without_a_certificate_is_refused(rabbitmq_tls: TlsBrokerHandle) -> None:
    # Given the broker's CA trusted, but no client certificate
    url = with_tls(rabbitmq_tls.address, ca=rabbitmq_tls.ca.cert_path)
    # When it connects, Then the handshake is refused and the error says what is missing
    error = await _refusal(url)
    assert "requires a client certificate" in error.message
    assert error.hint is not None and "WAYANG_TLS_CERT" in error.hint


async def test_a_certificate_from_another_ca_is_refused(
    rabbitmq_tls: TlsBrokerHandle, stranger: CertificateAuthority
) -> None:
    # Given a certificate naming the administrator, but issued by a CA the broker does not trust
    forged = stranger.issue_client(rabbitmq_tls.username)
    url = with_tls(rabbitmq_tls.address, ca=rabbitmq_tls.ca.cert_path, cert=forged.cert,
                   key=forged.key)  # fmt: skip
    # When it connects, Then the broker refuses the certificate
    error = await _refusal(url)
    assert "refused our client certificate" in error.message
    assert error.hint is not None and "CA the broker trusts" in error.hint


async def test_a_server_the_client_does_not_trust_is_refused(
    rabbitmq_tls: TlsBrokerHandle, stranger: CertificateAuthority
) -> None:
    # Given a good client certificate, but the client trusts another CA only
    good = rabbitmq_tls.client_certificate("wayang-untrusting")
    url = with_tls(rabbitmq_tls.address, ca=stranger.cert_path, cert=good.cert, key=good.key)
    # When it connects, Then the client refuses the broker's certificate, and says which setting
    error = await _refusal(url)
    assert "certificate" in error.message and "is not trusted" in error.message
    assert error.hint is not None and "WAYANG_TLS_CA" in error.hint
    # And a host the certificate does not name is refused too (it names 127.0.0.1 only)
    trusted = with_tls(rabbitmq_tls.address, ca=rabbitmq_tls.ca.cert_path, cert=good.cert,
                       key=good.key)  # fmt: skip
    error = await _refusal(trusted.replace("127.0.0.1", "localhost"))
    assert "does not name this host" in error.message


async def test_plain_amqp_is_refused_by_the_tls_only_broker(
    rabbitmq_tls: TlsBrokerHandle,
) -> None:
    # Given the broker's port, dialled without TLS
    plain = rabbitmq_tls.address.replace("amqps://", f"amqp://{rabbitmq_tls.username}:x@")
    # When it connects, Then nothing answers AMQP there, and the error suggests amqps
    error = await _refusal(plain)
    assert "TLS only" in error.message
    # And the broker has no plain AMQP listener at all
    listeners = (await _management(rabbitmq_tls, "/api/overview"))["listeners"]
    protocols = {listener["protocol"] for listener in listeners}
    assert protocols == {"amqp/ssl", "https", "https/prometheus", "clustering"}


async def test_a_certificate_login_needs_its_broker_user(rabbitmq_tls: TlsBrokerHandle) -> None:
    # Given a good certificate whose CN is no broker user
    nobody = rabbitmq_tls.client_certificate("nobody-here")
    url = with_tls(rabbitmq_tls.address, ca=rabbitmq_tls.ca.cert_path, cert=nobody.cert,
                   key=nobody.key)  # fmt: skip
    # When it connects, Then the EXTERNAL login is refused, naming the CN as the cause
    error = await _refusal(url)
    assert "EXTERNAL" in error.message and "common name" in error.message
    # And asking for a password login instead is refused: the broker offers EXTERNAL only
    error = await _refusal(url.replace("auth=external", "auth=plain"))
    assert "offers login by EXTERNAL, not PLAIN" in error.message


def test_settings_fold_into_the_url_and_win_over_its_parameters(tmp_path: Path) -> None:
    # Given a URL that names some files, and settings naming others
    url = "amqps://broker.example:5671/?cafile=/url/ca.pem&certfile=/url/c.pem&keyfile=/url/c.key"
    settings = Settings(
        amqp_url=url, tls_ca=tmp_path / "ca.pem", tls_cert=tmp_path / "me.pem", state_dir=tmp_path
    )
    # When the endpoint is resolved
    endpoint = broker_endpoint(settings)
    # Then the settings win, a certificate without a key drops the URL's key, EXTERNAL is used
    files = TlsFiles.of_url(endpoint.amqp_url)
    assert (files.ca, files.cert, files.key) == (tmp_path / "ca.pem", tmp_path / "me.pem", None)
    assert "auth=external" in endpoint.amqp_url
    assert endpoint.management_url == "https://broker.example:15671"
    # And TLS settings with a plain amqp:// URL are a configuration error, not a silent downgrade
    with pytest.raises(ConfigError, match="not amqps"):
        broker_endpoint(Settings(amqp_url="amqp://h/", tls_ca=tmp_path / "ca.pem"))


async def test_unusable_certificate_files_are_a_configuration_error(
    rabbitmq_tls: TlsBrokerHandle, tmp_path: Path
) -> None:
    url = with_tls(rabbitmq_tls.address, ca=rabbitmq_tls.ca.cert_path,
                   cert=tmp_path / "absent.pem")  # fmt: skip
    with pytest.raises(ConfigError, match="cannot read the TLS client certificate"):
        await connect(url, "tls-test")
    # And a key that is not the certificate's is refused before any connection is tried
    one, other = (rabbitmq_tls.client_certificate(name) for name in ("tls-one", "tls-other"))
    url = with_tls(rabbitmq_tls.address, ca=rabbitmq_tls.ca.cert_path, cert=one.cert,
                   key=other.key)  # fmt: skip
    with pytest.raises(ConfigError, match="cannot be used: KEY_VALUES_MISMATCH"):
        await connect(url, "tls-test")


async def test_a_good_certificate_runs_a_task_end_to_end(
    rabbitmq_tls: TlsBrokerHandle, tls_fabric: Fabric
) -> None:
    # Given a worker daemon started as a user would, its TLS files in the environment only
    executor = rabbitmq_tls.client_certificate(EXECUTOR_USER)
    env = {
        "WAYANG_AMQP_URL": rabbitmq_tls.address,
        "WAYANG_TLS_CA": str(rabbitmq_tls.ca.cert_path),
        "WAYANG_TLS_CERT": str(executor.cert),
        "WAYANG_TLS_KEY": str(executor.key),
    }
    worker = tls_fabric.spawn_worker(["wayang_workers.demo:Echo"], executor_id="tls-0", env=env)
    await asyncio.to_thread(worker.wait_started)
    # And a dispatcher with a certificate of its own
    mine = rabbitmq_tls.client_certificate(DISPATCHER_USER)
    url = with_tls(rabbitmq_tls.address, ca=rabbitmq_tls.ca.cert_path, cert=mine.cert,
                   key=mine.key)  # fmt: skip
    # When the dispatcher submits a task over amqps
    async with Dispatcher(tls_fabric.dispatcher_config(amqp_url=url)) as dispatcher:
        handle = await dispatcher.submit("demo.echo", {"over": "tls"})
        result = await handle.result(timeout_s=30)
        seen = await _logins(rabbitmq_tls)
    # Then the worker ran it and the dispatcher got its result
    assert result.status == "SUCCESS"
    assert result.output == {"over": "tls"}
    assert result.executor_id == "tls-0"
    # And each logged in by its certificate: EXTERNAL, as the user its CN names, over TLS
    assert {(EXECUTOR_USER, "EXTERNAL", True), (DISPATCHER_USER, "EXTERNAL", True)} <= seen
    worker.stop()


async def _logins(broker: TlsBrokerHandle) -> set[tuple[str, str, bool]]:
    """(user, mechanism, tls) of the broker's connections, once both of ours are listed."""
    found: set[tuple[str, str, bool]] = set()

    async def listed() -> bool:
        connections = await _management(broker, "/api/connections")
        found.clear()
        found.update((c["user"], c["auth_mechanism"], c["ssl"]) for c in connections)
        return {EXECUTOR_USER, DISPATCHER_USER} <= {user for user, _, _ in found}

    await eventually(listed, timeout_s=15, interval_s=0.5, what="both connections in the console")
    return found


def _add_user(broker: TlsBrokerHandle, user: str) -> None:
    """A broker user that only a certificate can log in as (no password), with full rights."""
    _request(broker, "PUT", f"/api/users/{user}", {"password_hash": "", "tags": ""})
    rights = {"configure": ".*", "write": ".*", "read": ".*"}
    _request(broker, "PUT", f"/api/permissions/%2F/{user}", rights)


async def _management(broker: TlsBrokerHandle, path: str) -> Any:
    return await asyncio.to_thread(_request, broker, "GET", path)


def _request(broker: TlsBrokerHandle, method: str, path: str, body: Any = None) -> Any:
    # The management API over HTTPS, trusting the broker's CA (what management_client does).
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(broker.management_url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", _basic(broker))
    context = TlsFiles.of_url(broker.endpoint.amqp_url).context()
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def _basic(broker: TlsBrokerHandle) -> str:
    token = base64.b64encode(f"{broker.username}:{broker.password}".encode()).decode()
    return f"Basic {token}"


@pytest.mark.timeout(180)
def test_dev_tls_runs_the_stack_over_amqps_and_other_commands_find_it(
    tmp_path: Path, stranger: CertificateAuthority
) -> None:
    # Given `wayang-mq dev --tls` running in the foreground
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYANG_")}
    state = tmp_path / "state"
    command = [sys.executable, "-m", "wayang_mq.cli", "dev", "--tls", "--state-dir", str(state)]
    process = subprocess.Popen(
        [*command, "--workers", "1", "--demo-tasks", "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
    )
    try:
        output = _read_until(process, "==> running", 150)
        # When another command runs in the same state directory
        run = wayang("submit", "demo.echo", "--input", '{"via": "tls"}', "--wait",
                     env={"WAYANG_STATE_DIR": str(state)})  # fmt: skip
        # Then it found the TLS endpoint and its certificate, and the task ran
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["output"] == {"via": "tls"}
        # And a certificate from another CA, or trusting another CA, is one line, exit 3
        forged = stranger.issue_client("wayang")
        refused = {"WAYANG_TLS_CERT": str(forged.cert), "WAYANG_TLS_KEY": str(forged.key)}
        for settings, needle in (
            (refused, "refused our client certificate"),
            ({"WAYANG_TLS_CA": str(stranger.cert_path)}, "is not trusted"),
        ):
            run = wayang("submit", "demo.echo", "--input", "{}",
                         env={"WAYANG_STATE_DIR": str(state), **settings})  # fmt: skip
            assert_one_line_error(run, 3, needle)
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=90)[0].decode(errors="replace")
        _drop_private_postgres(state)
    # And it said where the CA and certificates are; the broker was TLS only
    assert process.returncode == 0, rest
    assert re.search(r"RabbitMQ console  https://127\.0\.0\.1:\d+/", output)
    assert re.search(r"AMQP URL          amqps://\S+auth=external", output)
    assert f"TLS CA            {state / 'tls' / 'ca.pem'}" in output
    assert "==> 3 results" in output
    # and the control plane, logged in with its certificate, recorded them
    assert "==> recorded in PostgreSQL: 3 of 3 demo tasks finished" in output
    saved = json.loads((state / "endpoint.json").read_text())
    files = TlsFiles.of_url(saved["amqp_url"])
    assert files.ca == state / "tls" / "ca.pem" and files.cert is not None
    assert saved["management_url"].startswith("https://")
    # And every private key is 0600
    for key in (state / "tls").glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
