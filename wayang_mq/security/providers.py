"""Secret providers: where a worker finds the values its tasks' references name.

- :class:`EnvProvider`: environment variables, ``<prefix><NAME>`` (``stripe`` ->
  ``WAYANG_SECRET_STRIPE``; ``.`` and ``-`` become ``_``, letters upper case);
- :class:`DirectoryProvider`: one file per secret, named as the secret, as Docker and Kubernetes
  mount them (``/run/secrets/stripe``); one trailing newline is dropped;
- :class:`FernetFileProvider`: one file holding a JSON map of name -> value, encrypted with
  ``cryptography.fernet`` (edit it with ``wayang-mq secrets set/list/rm``), re-read when it
  changes, so an edit needs no restart;
- :class:`MappingProvider`: values held in memory (tests, embedding);
- :class:`ProviderChain`: asks each provider in turn; the first that knows the name answers.

A Vault-like store is one class with ``async def get(self, name) -> str | None`` (the
:class:`~wayang_mq.security.secrets.SecretProvider` protocol), loaded with
``--secrets class:mymodule:VaultProvider``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from wayang_mq.core.errors import ConfigError
from wayang_mq.core.private_files import write_private
from wayang_mq.security.secrets import SecretProvider, SecretUnavailable, valid_name

DEFAULT_ENV_PREFIX = "WAYANG_SECRET_"


def env_variable(name: str, prefix: str = DEFAULT_ENV_PREFIX) -> str:
    """The environment variable that holds secret ``name``."""
    return prefix + name.upper().replace(".", "_").replace("-", "_")


class EnvProvider:
    """Secrets from environment variables named ``<prefix><NAME>``.

    Simple, and as safe as the process's environment: readable by its owner in
    ``/proc/<pid>/environ`` and inherited by child processes.
    """

    def __init__(
        self, prefix: str = DEFAULT_ENV_PREFIX, environ: Mapping[str, str] | None = None
    ) -> None:
        self.prefix = prefix
        self._environ = os.environ if environ is None else environ

    async def get(self, name: str) -> str | None:
        """The variable's value, or None if it is not set."""
        return self._environ.get(env_variable(name, self.prefix))

    def __repr__(self) -> str:
        return f"EnvProvider(prefix={self.prefix!r})"


class DirectoryProvider:
    """Secrets as files in a directory, one per secret, the file named as the secret.

    Secret names cannot hold ``/`` nor start with ``.``, so a name never leaves the directory.
    One trailing newline (``echo value > file``) is dropped; the rest is the value, UTF-8.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    async def get(self, name: str) -> str | None:
        """The file's text, or None if there is no such file."""
        if not valid_name(name):
            return None
        try:
            data = (self.path / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise SecretUnavailable(
                f"secret {name!r}: cannot read its file in {self.path} ({exc.strerror})"
            ) from None
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise SecretUnavailable(f"secret {name!r}: its file is not UTF-8 text") from None
        return text.removesuffix("\n").removesuffix("\r")

    def __repr__(self) -> str:
        return f"DirectoryProvider({str(self.path)!r})"


# -- the Fernet-encrypted file ---------------------------------------------------------------


def fernet_of(key: str | bytes) -> Fernet:
    """A Fernet from a key as ``wayang-mq secrets keygen`` writes it (url-safe base64)."""
    try:
        return Fernet(key.strip() if isinstance(key, bytes) else key.strip().encode())
    except (ValueError, TypeError):
        raise ConfigError(
            "the secrets key is not a Fernet key (32 url-safe base64-encoded bytes)",
            hint="make one with `wayang-mq secrets keygen --out FILE`",
        ) from None


def read_secrets_file(path: Path, fernet: Fernet) -> dict[str, str]:
    """The name -> value map an encrypted secrets file holds ({} if the file does not exist)."""
    try:
        token = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        values = json.loads(fernet.decrypt(token.strip()))
    except InvalidToken:
        raise ConfigError(
            f"{path} cannot be decrypted with this key (another key, or not a secrets file)",
            hint="use the key the file was written with (WAYANG_SECRETS_KEY_FILE)",
        ) from None
    except ValueError:
        raise ConfigError(f"{path} does not hold a JSON map of secrets") from None
    if not isinstance(values, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in values.items()
    ):
        raise ConfigError(f"{path} does not hold a map of names to text values")
    return values


def write_secrets_file(path: Path, fernet: Fernet, values: Mapping[str, str]) -> None:
    """Encrypt ``values`` into ``path`` (0600), replacing it atomically: a reader never sees
    half a file."""
    token = fernet.encrypt(json.dumps(dict(sorted(values.items()))).encode())
    partial = path.with_name(f".{path.name}.partial")
    write_private(partial, token + b"\n")
    os.replace(partial, path)


class FernetFileProvider:
    """Secrets from a Fernet-encrypted JSON map; the file is decrypted again when it changes
    (its size, mtime or inode), so ``wayang-mq secrets set`` needs no worker restart."""

    def __init__(self, path: Path, key: str | bytes) -> None:
        self.path = Path(path)
        self._fernet = fernet_of(key)
        self._stamp: tuple[int, int, int] | None = None
        self._values: dict[str, str] = {}

    async def get(self, name: str) -> str | None:
        """The value stored under ``name``, or None."""
        return self._current().get(name)

    def _current(self) -> dict[str, str]:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise SecretUnavailable(
                f"the secrets file {self.path} cannot be read ({exc.strerror})"
            ) from None
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if stamp != self._stamp:
            try:
                self._values = read_secrets_file(self.path, self._fernet)
            except ConfigError as exc:
                raise SecretUnavailable(exc.message) from None
            self._stamp = stamp
        return self._values

    def __repr__(self) -> str:
        return f"FernetFileProvider({str(self.path)!r})"


# -- composition -------------------------------------------------------------------------------


class MappingProvider:
    """Secrets held in memory: for tests, and for programs that embed a worker."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    async def get(self, name: str) -> str | None:
        """The value, or None."""
        return self._values.get(name)

    def __repr__(self) -> str:
        return f"MappingProvider(names={sorted(self._values)!r})"


class ProviderChain:
    """Providers asked in order: the first that knows a name answers. A provider that fails
    (raises) stops the chain: answering from the next one might give another, stale value."""

    def __init__(self, providers: Sequence[SecretProvider]) -> None:
        self.providers = tuple(providers)

    async def get(self, name: str) -> str | None:
        """The first provider's value for ``name``, or None if none knows it."""
        for provider in self.providers:
            value = await provider.get(name)
            if value is not None:
                return value
        return None

    def __repr__(self) -> str:
        return f"ProviderChain({list(self.providers)!r})"


# -- configuration -----------------------------------------------------------------------------

SPEC_HELP = (
    "env[:PREFIX] (variables PREFIX<NAME>, default WAYANG_SECRET_), dir:PATH (one file per "
    "secret), fernet:PATH (an encrypted file; key in WAYANG_SECRETS_KEY_FILE), "
    "class:MODULE:CLASS (your own provider)"
)


def from_spec(spec: str, fernet_key: Callable[[], str | bytes]) -> SecretProvider:
    """A provider from its command-line form (:data:`SPEC_HELP`), checked now: a worker
    whose secrets file cannot be read refuses to start rather than fail every task."""
    kind, _, argument = spec.partition(":")
    if kind == "env":
        return EnvProvider(argument or DEFAULT_ENV_PREFIX)
    if kind == "dir" and argument:
        if not Path(argument).is_dir():
            raise ConfigError(f"secrets directory {argument} does not exist")
        return DirectoryProvider(Path(argument))
    if kind == "fernet" and argument:
        path = Path(argument)
        if not path.is_file():
            raise ConfigError(
                f"secrets file {path} does not exist",
                hint=f"create it with `wayang-mq secrets set NAME --file {path}`",
            )
        key = fernet_key()
        read_secrets_file(path, fernet_of(key))  # the key must open it: refuse now, not later
        return FernetFileProvider(path, key)
    if kind == "class" and argument:
        return _load_provider(argument)
    raise ConfigError(f"{spec!r} is not a secret provider", hint=f"use {SPEC_HELP}")


def _load_provider(spec: str) -> SecretProvider:
    from wayang_mq.core.loading import load_class

    provider: object = load_class(spec, object, "mypackage.vault:VaultProvider")
    if not isinstance(provider, SecretProvider):
        raise ConfigError(f"{spec} has no `async def get(self, name) -> str | None`")
    return provider
