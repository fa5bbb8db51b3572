"""Names the fabric builds: default ids are valid on any machine (no broker needed)."""

from __future__ import annotations

import socket

import pytest

from wayang_mq.core import names
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.ops.reaper import ReaperConfig
from wayang_mq.runtime.worker import WorkerConfig


@pytest.mark.parametrize(
    "hostname", ["ip-10-0-0-1.ec2.internal", "MyHost", "host_01", "..", "web.Example.COM."]
)
def test_default_ids_are_valid_whatever_the_host_is_called(
    hostname: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a machine whose name is not a valid id as it stands
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    signer = Signer.generate()
    # When a worker and a reaper are configured without an id
    worker = WorkerConfig(amqp_url="amqp://x/", keyring=KeyRing.of([]), signer=signer)
    reaper = ReaperConfig(amqp_url="amqp://x/", keyring=KeyRing.of([]), signer=signer)
    # Then both get a valid id built from the host name, the reaper's marked as such
    assert names.valid_word(worker.executor_id) and names.valid_word(reaper.reaper_id)
    assert reaper.reaper_id.startswith("reaper-")
    assert worker.executor_id == names.default_id()
    assert "." not in worker.executor_id and worker.executor_id == worker.executor_id.lower()
