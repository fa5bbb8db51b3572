"""Shared test setup: real RabbitMQ and PostgreSQL come from ``wayang_mq.testing.plugin``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from wayang_mq.testing.harness import Fabric

pytest_plugins = ["wayang_mq.testing.plugin"]


@pytest.fixture(scope="session")
async def fabric(rabbitmq: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fabric]:
    """The session's broker with the default topology applied and a trusted key pair."""
    fabric = await Fabric.create(rabbitmq.endpoint, tmp_path_factory.mktemp("fabric"))
    yield fabric
    fabric.stop_processes()


@pytest.fixture
def fabric_env(fabric: Fabric) -> dict[str, str]:
    """The environment that points a ``wayang-mq`` process at the session's fabric."""
    return {
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_MANAGEMENT_URL": fabric.endpoint.management_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
    }
