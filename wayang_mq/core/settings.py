"""Settings, read once at the edge (the CLI's ``main``) and passed in; never at import time."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from wayang_mq.amqp.endpoint import redact_url
from wayang_mq.topology.spec import DEFAULT_TOPOLOGY_PATH

__all__ = ["Settings", "redact_url"]


class Settings(BaseSettings):
    """Where the broker, database, keys and state are; every field has a ``WAYANG_`` variable."""

    model_config = SettingsConfigDict(env_prefix="WAYANG_", extra="forbid", frozen=True)

    amqp_url: SecretStr | None = None  # None: `wayang-mq dev` starts a local broker
    management_url: str | None = None  # default: http://<amqp host>:15672
    database_url: SecretStr | None = None
    state_dir: Path = Path(".wayang")
    topology: Path = Field(default=DEFAULT_TOPOLOGY_PATH)
    key_dir: Path | None = None  # trusted public keys; default <state_dir>/keys
    signing_key: Path | None = None  # private key; default the first *.key in key_dir
    rabbitmq_server: Path | None = None  # default Debian's /usr/lib/rabbitmq/bin/rabbitmq-server

    @property
    def keys_path(self) -> Path:
        """The directory of trusted public keys (and, in dev, the signing key)."""
        return self.key_dir or self.state_dir / "keys"
