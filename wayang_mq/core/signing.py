"""Ed25519 signatures over the exact body bytes, with key ids so keys can rotate, and scopes
that say what each key may sign.

The signature covers the bytes as they travel, so a receiver verifies before it decodes
anything: a forged body never reaches the msgpack parser or the schema. What is signed is the
body behind a short protected header naming the wire version, the algorithm, the message type
and the key id (:func:`signing_input`): a signature made for a result cannot pass for a task's,
and a signature cannot be moved to another key id.

Keys are ``cryptography`` objects where the API hands them out (``Signer.public_key``,
``KeyRing.keys``); the per-message signing and verification run on libsodium through PyNaCl,
which does the same Ed25519 about twice as fast here (verify 47 µs against 96, sign 21 against
31): verification is the largest single cost of a worker's task. libsodium is the stricter of
the two (it refuses small-order keys and non-canonical signatures, which no honest signer
produces). The PEM files ``wayang-mq keys new`` writes (and ``openssl genpkey -algorithm
ed25519`` too) are read without ``cryptography``: RFC 8410's DER is a fixed prefix and the 32
key bytes; any other form is left to ``cryptography``. A worker that only loads its keys and
signs and verifies thus never imports it (about 6 MB of its memory).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from wayang_mq.core import logs
from wayang_mq.core.errors import ConfigError, KeyNotAllowed, SignatureError, UnknownKey
from wayang_mq.core.private_files import private_dir, write_private
from wayang_mq.core.scopes import FULL_TRUST, KeyScope, read_scope, scope_path

if TYPE_CHECKING:  # imported where a key object is asked for or an unusual PEM is read
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

KEY_ID_HEADER = "wayang-key-id"
SIGNATURE_HEADER = "wayang-signature"
SIGNATURE_VERSION = "wayang-mq/1"
ALGORITHM = "ed25519"
#: the type a signature is made for when the caller names none: tasks are most hand-signed
TASK_TYPE = "wayang.task.v1"

log = logging.getLogger("wayang_mq.core.signing")

#: RFC 8410 DER: a PKCS#8 PrivateKeyInfo of an Ed25519 seed, and a SubjectPublicKeyInfo of an
#: Ed25519 key; the 32 key bytes follow each
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def signing_input(body: bytes, wire_type: str, key_id: str) -> bytes:
    """The bytes an Ed25519 signature covers: ``wayang-mq/1 ed25519 <type> <key id>\n<body>``.

    The header is ASCII (types and key ids are), one line, then the body exactly as it
    travels. A receiver builds it from the type it expects and the key id header, so neither
    can be changed without breaking the signature.
    """
    header = f"{SIGNATURE_VERSION} {ALGORITHM} {wire_type} {key_id}\n".encode()
    return header + body


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """The key's id: first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    return _key_id(_raw_public(public_key))


def _key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pem_der(pem: bytes, label: str, prefix: bytes) -> bytes | None:
    """The 32 key bytes of a PEM file that is exactly one ``label`` block holding ``prefix``
    and the key (RFC 8410's form); None for anything else (``cryptography`` reads it)."""
    begin, end = f"-----BEGIN {label}-----".encode(), f"-----END {label}-----".encode()
    text = pem.strip()
    if not text.startswith(begin) or not text.endswith(end):
        return None
    try:
        der = base64.b64decode(b"".join(text[len(begin) : -len(end)].split()), validate=True)
    except ValueError:
        return None
    if len(der) != len(prefix) + 32 or not der.startswith(prefix):
        return None
    return der[len(prefix) :]


@dataclass(frozen=True)
class Signer:
    """Signs bodies with one private key; the key itself never appears in ``repr``."""

    _fast: SigningKey = field(repr=False, compare=False)
    key_id: str

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> Signer:
        """Wrap a key, deriving its id."""
        from cryptography.hazmat.primitives import serialization

        seed = private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return cls.from_seed(seed)

    @classmethod
    def generate(cls) -> Signer:
        """A fresh random key (tests, `wayang-mq dev`)."""
        return cls.from_seed(os.urandom(32))

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """A key from its 32-byte seed (test vectors)."""
        if len(seed) != 32:
            raise ValueError("An Ed25519 private key is 32 bytes long")
        fast = SigningKey(seed)
        return cls(fast, _key_id(bytes(fast.verify_key)))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        """Load a PKCS#8 PEM private key written by ``wayang-mq keys new``."""
        path = Path(path)
        try:
            pem = path.read_bytes()
            seed = _pem_der(pem, "PRIVATE KEY", _PKCS8_PREFIX)
            if seed is not None:
                return cls.from_seed(seed)
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            key = serialization.load_pem_private_key(pem, password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read signing key {path}: {exc}",
                hint="create one with `wayang-mq keys new --dir DIR`",
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 private key")
        return cls.from_private_key(key)

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The private key (writing it to a file)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(bytes(self._fast))

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The matching public key, for a receiver's key ring."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return Ed25519PublicKey.from_public_bytes(bytes(self._fast.verify_key))

    def sign(self, body: bytes, wire_type: str = TASK_TYPE) -> bytes:
        """The 64-byte signature of ``body`` as a message of ``wire_type``."""
        return self._fast.sign(signing_input(body, wire_type, self.key_id)).signature

    def headers(self, body: bytes, wire_type: str = TASK_TYPE) -> dict[str, str]:
        """The AMQP headers that carry this body's signature."""
        return {
            KEY_ID_HEADER: self.key_id,
            SIGNATURE_HEADER: base64.b64encode(self.sign(body, wire_type)).decode("ascii"),
        }


@dataclass(frozen=True, slots=True)
class Verified:
    """Who signed a message that verified: the key id and what that key may sign."""

    key_id: str
    scope: KeyScope


class KeyRing:
    """Public keys a receiver trusts, by id, each with its scope; several at once so a key can
    be rotated.

    A ring loaded from a directory follows it without a restart. A signature by a key id it
    does not know makes it read the directory again when the directory changed since the
    last read (a file added or renamed into it changes its mtime; one ``stat`` per unknown
    key id) or, failing that, at most once per ``reload_interval_s``, so a flood of made-up
    key ids costs no more than one directory read per interval. Known keys are checked
    against the directory at most once per interval too, so a revoked key (its files
    removed) stops verifying within about a second. ``reload()`` (daemons call it on SIGHUP)
    re-reads it at once. A directory that cannot be read on a reload keeps the keys already
    loaded.

    A ``.pub`` without its scope file (``<stem>.toml``) is loaded but trusted for nothing:
    its signatures are refused as ``key_not_allowed``.
    """

    def __init__(
        self,
        keys: Mapping[str, Ed25519PublicKey] | None = None,
        *,
        scopes: Mapping[str, KeyScope | None] | None = None,
        directory: Path | None = None,
        reload_interval_s: float = 1.0,
    ) -> None:
        self._directory = directory
        self._reload_interval_s = reload_interval_s
        self._last_read = time.monotonic()
        self._stamp = _stamp(directory)
        raw = {key_id: _raw_public(key) for key_id, key in (keys or {}).items()}
        self._set(raw, dict(scopes or {}))

    def _set(self, raw: dict[str, bytes], scopes: dict[str, KeyScope | None]) -> None:
        # One assignment: a verify running meanwhile sees the old ring or the new one.
        self._fast = {key_id: (VerifyKey(key), scopes.get(key_id)) for key_id, key in raw.items()}

    @property
    def keys(self) -> Mapping[str, Ed25519PublicKey]:
        """The trusted keys by key id, as of the last (re)load."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        made = {
            key_id: Ed25519PublicKey.from_public_bytes(bytes(key))
            for key_id, (key, _) in self._fast.items()
        }
        return MappingProxyType(made)

    @property
    def key_ids(self) -> frozenset[str]:
        """The trusted keys' ids, as of the last (re)load."""
        return frozenset(self._fast)

    def scope(self, key_id: str) -> KeyScope | None:
        """What ``key_id`` may sign (None: nothing, or no such key)."""
        entry = self._fast.get(key_id)
        return entry[1] if entry else None

    @classmethod
    def of(cls, public_keys: Iterable[Ed25519PublicKey], scope: KeyScope = FULL_TRUST) -> KeyRing:
        """A fixed ring of the given keys, each under its derived id, all with ``scope``
        (by default trusted for everything: tests and embedding)."""
        keys = {key_id_of(key): key for key in public_keys}
        return cls(keys, scopes=dict.fromkeys(keys, scope))

    @classmethod
    def scoped(cls, entries: Iterable[tuple[Ed25519PublicKey, KeyScope]]) -> KeyRing:
        """A fixed ring of keys, each with its own scope."""
        pairs = [(key_id_of(key), key, scope) for key, scope in entries]
        return cls(
            {key_id: key for key_id, key, _ in pairs},
            scopes={key_id: scope for key_id, _, scope in pairs},
        )

    @classmethod
    def load_dir(cls, directory: Path, *, reload_interval_s: float = 1.0) -> KeyRing:
        """Every ``*.pub`` PEM in ``directory`` with its scope, followed as it changes."""
        ring = cls(directory=directory, reload_interval_s=reload_interval_s)
        ring._set(*_read_public_keys(directory))
        return ring

    def reload(self) -> bool:
        """Read the directory again; True when the set of key ids changed. A ring made of
        fixed keys has nothing to reload."""
        if self._directory is None:
            return False
        self._last_read = time.monotonic()
        self._stamp = _stamp(self._directory)  # before reading: a change meanwhile is seen next
        try:
            keys, scopes = _read_public_keys(self._directory)
        except ConfigError as exc:
            logs.event(log, "keyring.reload_failed", logging.ERROR, error=exc.one_line())
            return False
        known = self._fast.keys()
        added = sorted(keys.keys() - known)
        removed = sorted(known - keys.keys())
        rescoped = sorted(k for k in keys.keys() & known if scopes[k] != self.scope(k))
        self._set(keys, scopes)
        if added or removed or rescoped:
            logs.event(
                log,
                "keyring.reloaded",
                added=",".join(added),
                removed=",".join(removed),
                rescoped=",".join(rescoped),
            )
        return bool(added or removed or rescoped)

    def _lookup(self, key_id: str) -> tuple[VerifyKey, KeyScope | None] | None:
        if self._directory is not None:
            if time.monotonic() - self._last_read >= self._reload_interval_s:
                if _stamp(self._directory) != self._stamp:
                    self.reload()  # a key added, revoked or rescoped since the last read
                else:
                    self._last_read = time.monotonic()
            elif key_id not in self._fast and _stamp(self._directory) != self._stamp:
                self.reload()
        return self._fast.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._fast

    def verify(
        self, body: bytes, headers: Mapping[str, object], wire_type: str = TASK_TYPE
    ) -> Verified:
        """Check ``body`` as a ``wire_type`` message against its signature headers; returns
        who signed it, or raises (SignatureError, UnknownKey, KeyNotAllowed)."""
        key_id = headers.get(KEY_ID_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        if isinstance(key_id, bytes):
            key_id = key_id.decode("utf-8", "replace")
        if isinstance(signature, bytes):
            signature = signature.decode("ascii", "replace")
        if not isinstance(key_id, str) or not isinstance(signature, str):
            raise SignatureError(
                f"message is not signed: headers {KEY_ID_HEADER!r} and {SIGNATURE_HEADER!r} "
                "are required",
                body=body,
                hint="sign the exact body bytes with Ed25519, see docs/wire-format.md",
            )
        entry = self._lookup(key_id)
        if entry is None:
            raise UnknownKey(
                f"unknown signing key id {key_id[:64]!r}",
                body=body,
                hint="add the publisher's public key and its scope to the receiver's key "
                "directory (`wayang-mq keys new`)",
            )
        public_key, scope = entry
        try:
            if not key_id.isascii():
                raise ValueError("key id is not ASCII")
            public_key.verify(
                signing_input(body, wire_type, key_id), base64.b64decode(signature, validate=True)
            )
        except (BadSignatureError, ValueError) as exc:
            raise SignatureError(
                f"signature does not match the body (key id {key_id})", body=body
            ) from exc
        if scope is None:
            raise KeyNotAllowed(
                f"key {key_id} has no scope file: it is trusted for nothing",
                body=body,
                hint="write its scope with `wayang-mq keys new` or beside the .pub as .toml",
            )
        return Verified(key_id, scope)


def _stamp(directory: Path | None) -> int | None:
    """The directory's modification time (ns); None when there is none to read."""
    if directory is None:
        return None
    try:
        return directory.stat().st_mtime_ns
    except OSError:
        return None


def _read_public_keys(directory: Path) -> tuple[dict[str, bytes], dict[str, KeyScope | None]]:
    """Every ``*.pub`` in ``directory`` (PEM SubjectPublicKeyInfo) by derived key id, as its
    raw 32 bytes, and the scope beside each (``<stem>.toml``; None when there is none). File
    names do not matter."""
    if not directory.is_dir():
        raise ConfigError(
            f"key directory {directory} does not exist",
            hint="create keys with `wayang-mq keys new --dir DIR`",
        )
    keys: dict[str, bytes] = {}
    scopes: dict[str, KeyScope | None] = {}
    for path in sorted(directory.glob("*.pub")):
        raw = _read_public_key(path)
        key_id = _key_id(raw)
        keys[key_id] = raw
        scope_file = scope_path(path)
        scopes[key_id] = read_scope(scope_file) if scope_file.exists() else None
        if scopes[key_id] is None:
            logs.event(
                log,
                "keyring.unscoped",
                logging.WARNING,
                key_id=key_id,
                file=str(path),
                hint=f"write {scope_file.name} (role, id, capabilities): until then its "
                "signatures are refused",
            )
    return keys, scopes


def _read_public_key(path: Path) -> bytes:
    """A ``.pub`` file's raw 32 bytes."""
    try:
        pem = path.read_bytes()
        raw = _pem_der(pem, "PUBLIC KEY", _SPKI_PREFIX)
        if raw is not None:
            VerifyKey(raw)  # 32 bytes: always a key to libsodium, as to cryptography
            return raw
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = serialization.load_pem_public_key(pem)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read public key {path}: {exc}",
            hint="a .pub file is a PEM SubjectPublicKeyInfo Ed25519 key",
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return _raw_public(key)


def write_keypair(
    directory: Path, signer: Signer | None = None, scope: KeyScope = FULL_TRUST
) -> tuple[Path, Path]:
    """Write ``<id>.key`` (private, mode 0600), its scope ``<id>.toml`` and ``<id>.pub``;
    returns the key and public key paths. The .pub goes last, renamed into place: a running
    receiver that reloads never sees a key without its scope, nor half a key."""
    from cryptography.hazmat.primitives import serialization

    signer = signer or Signer.generate()
    private_dir(directory, narrow_existing=False)  # a new key directory is private (0700)
    private_path = directory / f"{signer.key_id}.key"
    public_path = directory / f"{signer.key_id}.pub"
    private_pem = signer.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(private_path, private_pem)
    scope_file = scope_path(public_path)
    partial_scope = directory / f".{signer.key_id}.toml.partial"
    partial_scope.write_text(scope.to_toml())
    os.replace(partial_scope, scope_file)
    partial = directory / f".{signer.key_id}.pub.partial"
    partial.write_bytes(
        signer.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    os.replace(partial, public_path)
    return private_path, public_path
