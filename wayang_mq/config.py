"""Configuration, read once at the edge (the CLI's ``main``) and passed in, never at import
time: the ``WAYANG_*`` settings, and what they resolve to (the broker's endpoint, the keys).

A URL in the environment wins; otherwise the endpoint that ``wayang-mq dev`` wrote into its
state directory, so a second terminal finds the local stack without copying URLs around.

The passwords read here (broker, database, the secrets key) are added to the process's
redactor as they are read: no log line of a daemon shows them, whatever exception quotes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from wayang_mq.amqp.endpoint import BrokerEndpoint
from wayang_mq.amqp.tls import with_tls
from wayang_mq.core.errors import BrokerUnreachable, ConfigError
from wayang_mq.core.model import DEFAULT_AUDIENCE
from wayang_mq.core.private_files import private_dir, write_private
from wayang_mq.core.redact import REDACTOR
from wayang_mq.core.scopes import KeyScope, read_scope, scope_path
from wayang_mq.core.signing import KeyRing, Signer
from wayang_mq.security.secrets import SecretProvider
from wayang_mq.topology.spec import DEFAULT_TOPOLOGY_PATH

ENDPOINT_FILE = "endpoint.json"


class Settings(BaseModel):
    """Where the broker, database, keys and state are; every field has a ``WAYANG_`` variable.

    Read as pydantic-settings reads them (a variable's name in any case; a value given here
    wins over the variable), without loading it: a worker's memory is 0.7 MB smaller.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    amqp_url: SecretStr | None = None  # None: `wayang-mq dev` starts a local broker
    management_url: str | None = None  # default: http://<amqp host>:15672
    database_url: SecretStr | None = None
    state_dir: Path = Path(".wayang")
    topology: Path = Field(default=DEFAULT_TOPOLOGY_PATH)
    key_dir: Path | None = None  # trusted public keys; default <state_dir>/keys
    signing_key: Path | None = None  # private key; default the first *.key in key_dir
    rabbitmq_server: Path | None = None  # default Debian's /usr/lib/rabbitmq/bin/rabbitmq-server
    audience: str = DEFAULT_AUDIENCE  # the deployment: tasks name it, receivers require it
    secrets: str | None = None  # a worker's secret providers, comma-separated (--secrets)
    secrets_key: SecretStr | None = None  # the Fernet key of an encrypted secrets file
    secrets_key_file: Path | None = None  # or the file that holds it
    # TLS (amqps:// only); each replaces the URL's cafile= / certfile= / keyfile= parameter.
    tls_ca: Path | None = None  # the CA that issued the broker's certificate
    tls_cert: Path | None = None  # our client certificate: its CN is our broker user (EXTERNAL)
    tls_key: Path | None = None  # its private key (default: read from the certificate's file)

    def __init__(self, **values: Any) -> None:
        env = {name.lower(): value for name, value in os.environ.items()}
        found = {
            field: env[f"wayang_{field}"]
            for field in type(self).model_fields
            if f"wayang_{field}" in env
        }
        super().__init__(**(found | values))

    @property
    def keys_path(self) -> Path:
        """The directory of trusted public keys (and, in dev, the signing key)."""
        return self.key_dir or self.state_dir / "keys"


def redact_credentials(settings: Settings) -> None:
    """Keep the configured passwords out of every log line from now on (the CLI calls this
    once; :func:`broker_endpoint` adds the broker's, wherever it was found)."""
    for name, url in (
        ("broker-password", settings.amqp_url),
        ("database-password", settings.database_url),
    ):
        if url is not None:
            _redact_url_password(name, url.get_secret_value())
    if settings.secrets_key is not None:
        REDACTOR.add("secrets-key", settings.secrets_key.get_secret_value())


def _redact_url_password(name: str, urls: str) -> None:
    for url in urls.split(","):  # a cluster's URL list: every node's password
        try:
            password = urlsplit(url.strip()).password
        except ValueError:
            continue
        if password:
            for form in {password, unquote(password), quote(unquote(password), safe="")}:
                REDACTOR.add(name, form)


def broker_endpoint(settings: Settings, role: str | None = None) -> BrokerEndpoint:
    """The broker to use: ``WAYANG_AMQP_URL``, else the one ``wayang-mq dev`` is running.

    From ``wayang-mq dev``'s file, ``role`` (``dispatcher``, ``executor``, ``reaper``) picks
    the account the stack granted for it; without a role (or in a file from before roles)
    it is the administrator's, which only ``topology``, ``access`` and ``dead`` need.

    ``WAYANG_TLS_*`` are folded into its URL (they win over the URL's own parameters), so
    every connection made from the endpoint uses the same CA and client certificate.
    """
    if settings.amqp_url is not None:
        amqp_url, management_url = settings.amqp_url.get_secret_value(), settings.management_url
    else:
        amqp_url, management_url = _saved_endpoint(settings.state_dir / ENDPOINT_FILE, role)
    _redact_url_password("broker-password", amqp_url)
    amqp_url = with_tls(amqp_url, ca=settings.tls_ca, cert=settings.tls_cert, key=settings.tls_key)
    return BrokerEndpoint.from_url(amqp_url, management_url)


def _saved_endpoint(path: Path, role: str | None) -> tuple[str, str | None]:
    try:
        saved = json.loads(path.read_text())
        url = (saved.get("accounts") or {}).get(role) or saved["amqp_url"]
        return str(url), str(saved["management_url"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise BrokerUnreachable(
            "no broker configured",
            hint="set WAYANG_AMQP_URL=amqp://user:pass@host:5672/, "
            "or start a local stack with `wayang-mq dev`",
        ) from None


def saved_database_url(settings: Settings) -> str | None:
    """The database ``wayang-mq dev`` runs, from its endpoint file (None: no dev stack)."""
    try:
        saved = json.loads((settings.state_dir / ENDPOINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    url = saved.get("database_url") if isinstance(saved, dict) else None
    if not isinstance(url, str):
        return None
    _redact_url_password("database-password", url)
    return url


def save_endpoint(
    state_dir: Path,
    endpoint: BrokerEndpoint,
    accounts: Mapping[str, str] | None = None,
    signing_keys: Mapping[str, str] | None = None,
    database_url: str | None = None,
) -> None:
    """Remember the dev stack's endpoint (the administrator's URL), the AMQP URL of each
    role's account and the signing key of each role, for other commands (private, 0600: it
    holds their passwords)."""
    private_dir(state_dir, narrow_existing=False)
    saved: dict[str, object] = {
        "amqp_url": endpoint.amqp_url,
        "management_url": endpoint.management_url,
    }
    if accounts:
        saved["accounts"] = dict(accounts)
    if signing_keys:
        saved["signing_keys"] = dict(signing_keys)
    if database_url:
        saved["database_url"] = database_url
    write_private(state_dir / ENDPOINT_FILE, json.dumps(saved))


def keyring(settings: Settings) -> KeyRing:
    """The public keys a worker trusts; refusing to start with none."""
    ring = KeyRing.load_dir(settings.keys_path)
    if not ring.key_ids:
        raise ConfigError(
            f"no public keys (*.pub) in {settings.keys_path}: every task would be refused",
            hint="create one with `wayang-mq keys new --dir DIR` and set WAYANG_KEY_DIR=DIR",
        )
    return ring


def signing_key_path(settings: Settings, role: str | None = None) -> Path:
    """WAYANG_SIGNING_KEY, else the key ``wayang-mq dev`` keeps for ``role``, else the key
    dir's first ``*.key``."""
    if settings.signing_key is not None:
        return settings.signing_key
    if role is not None and settings.amqp_url is None:
        try:
            saved = json.loads((settings.state_dir / ENDPOINT_FILE).read_text())
            return Path(saved["signing_keys"][role])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    found = sorted(settings.keys_path.glob("*.key")) if settings.keys_path.is_dir() else []
    if not found:
        raise ConfigError(
            f"no signing key (*.key) in {settings.keys_path}",
            hint="create one with `wayang-mq keys new --dir DIR`, or set WAYANG_SIGNING_KEY",
        )
    return found[0]


def signer(settings: Settings, role: str | None = None) -> Signer:
    """The private key this process signs with (see :func:`signing_key_path`)."""
    return Signer.from_file(signing_key_path(settings, role))


def signer_scope(settings: Settings, role: str | None = None) -> KeyScope | None:
    """The scope of the signing key: beside it (``<stem>.toml``), or beside its public half
    in the key directory; None when there is none. A dispatcher issues its tasks under the
    id it names."""
    path = signing_key_path(settings, role)
    signer_key = Signer.from_file(path)
    for candidate in (scope_path(path), settings.keys_path / f"{signer_key.key_id}.toml"):
        if candidate.exists():
            return read_scope(candidate)
    return None


def secrets_key(settings: Settings) -> str:
    """The Fernet key of the encrypted secrets file: WAYANG_SECRETS_KEY, else the content of
    WAYANG_SECRETS_KEY_FILE."""
    if settings.secrets_key is not None:
        return settings.secrets_key.get_secret_value()
    if settings.secrets_key_file is not None:
        try:
            key = settings.secrets_key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the secrets key file {settings.secrets_key_file}: {exc.strerror}"
            ) from None
        REDACTOR.add("secrets-key", key)
        return key
    raise ConfigError(
        "an encrypted secrets file needs its key",
        hint="set WAYANG_SECRETS_KEY_FILE (make one with `wayang-mq secrets keygen --out F`)",
    )


def secret_provider(settings: Settings, specs: Sequence[str] = ()) -> SecretProvider | None:
    """A worker's secret providers, from ``--secrets`` (else ``WAYANG_SECRETS``), chained in
    the order given; None when none is configured."""
    from wayang_mq.security.providers import ProviderChain, from_spec

    if not specs and settings.secrets:
        specs = [spec.strip() for spec in settings.secrets.split(",") if spec.strip()]
    if not specs:
        return None
    providers = [from_spec(spec, lambda: secrets_key(settings)) for spec in specs]
    return providers[0] if len(providers) == 1 else ProviderChain(providers)
