"""Configuration, read once at the edge (the CLI's ``main``) and passed in, never at import
time: the ``WAYANG_*`` settings, and what they resolve to (the broker's endpoint, the keys).

A URL in the environment wins; otherwise the endpoint that ``wayang-mq dev`` wrote into its
state directory, so a second terminal finds the local stack without copying URLs around.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.core.errors import BrokerUnreachable, ConfigError
from wayang_mq.core.private_files import private_dir, write_private
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.topology.spec import DEFAULT_TOPOLOGY_PATH

ENDPOINT_FILE = "endpoint.json"


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


def broker_endpoint(settings: Settings, role: str | None = None) -> BrokerEndpoint:
    """The broker to use: ``WAYANG_AMQP_URL``, else the one ``wayang-mq dev`` is running.

    From ``wayang-mq dev``'s file, ``role`` (``dispatcher``, ``executor``, ``reaper``) picks
    the account the stack granted for it; without a role (or in a file from before roles)
    it is the administrator's, which only ``topology``, ``access`` and ``dead`` need.
    """
    if settings.amqp_url is not None:
        return BrokerEndpoint.from_url(
            settings.amqp_url.get_secret_value(), settings.management_url
        )
    path = settings.state_dir / ENDPOINT_FILE
    try:
        saved = json.loads(path.read_text())
        url = saved.get("accounts", {}).get(role) or saved["amqp_url"]
        return BrokerEndpoint.from_url(url, saved["management_url"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise BrokerUnreachable(
            "no broker configured",
            hint="set WAYANG_AMQP_URL=amqp://user:pass@host:5672/, "
            "or start a local stack with `wayang-mq dev`",
        ) from None


def save_endpoint(
    state_dir: Path, endpoint: BrokerEndpoint, accounts: Mapping[str, str] | None = None
) -> None:
    """Remember the dev stack's endpoint (the administrator's URL) and the AMQP URL of each
    role's account for other commands (private, 0600: it holds their passwords)."""
    private_dir(state_dir, narrow_existing=False)
    saved: dict[str, object] = {
        "amqp_url": endpoint.amqp_url,
        "management_url": endpoint.management_url,
    }
    if accounts:
        saved["accounts"] = dict(accounts)
    write_private(state_dir / ENDPOINT_FILE, json.dumps(saved))


def keyring(settings: Settings) -> KeyRing:
    """The public keys a worker trusts; refusing to start with none."""
    ring = KeyRing.load_dir(settings.keys_path)
    if not ring.keys:
        raise ConfigError(
            f"no public keys (*.pub) in {settings.keys_path}: every task would be refused",
            hint="create one with `wayang-mq keys new --dir DIR` and set WAYANG_KEY_DIR=DIR",
        )
    return ring


def signer(settings: Settings) -> Signer:
    """The private key this process signs with: WAYANG_SIGNING_KEY, else the key dir's first."""
    if settings.signing_key is not None:
        return Signer.from_file(settings.signing_key)
    found = sorted(settings.keys_path.glob("*.key")) if settings.keys_path.is_dir() else []
    if not found:
        raise ConfigError(
            f"no signing key (*.key) in {settings.keys_path}",
            hint="create one with `wayang-mq keys new --dir DIR`, or set WAYANG_SIGNING_KEY",
        )
    return Signer.from_file(found[0])
