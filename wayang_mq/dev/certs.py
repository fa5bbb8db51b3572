"""A private certificate authority for ``wayang-mq dev --tls`` and the TLS tests.

It makes what a TLS-only broker and its clients need, with ``cryptography``: a CA, a server
certificate naming the hosts clients dial (checked against the URL's host), and client
certificates whose common name is the broker user they log in as (EXTERNAL auth with
``ssl_cert_login_from = common_name``). Private keys are written 0600.

For development and tests only: a production deployment issues certificates from its own PKI
(see docs/security.md §9); nothing here rotates, revokes or protects the CA key beyond 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wayang_mq.core.errors import ConfigError
from wayang_mq.core.private_files import private_dir, write_private

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
_VALID_FOR = datetime.timedelta(days=825)  # what browsers still accept for a leaf
_BACKDATE = datetime.timedelta(minutes=5)  # a little clock skew between this host and others


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


class CertificateAuthority:
    """A CA kept in a directory as ``ca.pem`` and ``ca.key``; issues server and client certs."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.directory = directory
        self._cert = cert
        self._key = key

    @property
    def cert_path(self) -> Path:
        """The CA certificate: what clients and the broker trust (``WAYANG_TLS_CA``)."""
        return self.directory / CA_CERT

    @classmethod
    def open(cls, directory: Path, *, name: str = "wayang-mq dev CA") -> CertificateAuthority:
        """The CA in ``directory``, created (0700 directory, 0600 key) if it has none yet."""
        directory = private_dir(Path(directory).absolute())
        if (directory / CA_CERT).exists() and (directory / CA_KEY).exists():
            return cls._load(directory)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = _builder(subject, subject, key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(_usage(cert_sign=True), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        cert = builder.sign(key, hashes.SHA256())
        write_private(directory / CA_KEY, _key_pem(key))
        (directory / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, cert, key)

    @classmethod
    def _load(cls, directory: Path) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the CA in {directory}: {exc}",
                hint=f"delete {directory} to make a new CA (and new certificates)",
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{directory / CA_KEY} is not an EC key", hint="delete it")
        return cls(directory, cert, key)

    def issue_server(self, name: str, hosts: tuple[str, ...]) -> CertFiles:
        """A server certificate for ``hosts`` (DNS names or IP addresses), as ``name``.pem/.key.

        Clients check the host they dial against these names: a URL naming any other host
        fails verification with a hostname mismatch.
        """
        names: list[x509.GeneralName] = [_general_name(host) for host in hosts]
        extra = [
            (x509.SubjectAlternativeName(names), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ]
        return self._issue(name, hosts[0], extra)

    def issue_client(self, common_name: str, *, name: str | None = None) -> CertFiles:
        """A client certificate whose CN is ``common_name``: the broker user it logs in as."""
        extra = [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]
        return self._issue(name or f"client-{common_name}", common_name, extra)

    def _issue(
        self, name: str, common_name: str, extra: Sequence[tuple[x509.ExtensionType, bool]]
    ) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = _builder(subject, self._cert.subject, key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(_usage(cert_sign=False), critical=True)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
        )
        for extension, critical in extra:
            builder = builder.add_extension(extension, critical)
        cert = builder.sign(self._key, hashes.SHA256())
        files = CertFiles(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        write_private(files.key, _key_pem(key))
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return files


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALID_FOR)
    )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: daemons read it unattended; the file's 0600 mode is its protection.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class DevCertificates:
    """``wayang-mq dev --tls``'s certificates, in one private directory (``<state>/tls``).

    The CA is kept across runs (clients that trust it keep working); the server certificate
    names 127.0.0.1 and localhost, the hosts a local client dials.
    """

    SERVER_HOSTS = ("127.0.0.1", "localhost")

    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority.open(directory)
        self._clients: dict[str, CertFiles] = {}

    @property
    def directory(self) -> Path:
        """Where the CA, the server's and the clients' certificates and keys are."""
        return self.ca.directory

    def server(self) -> CertFiles:
        """The broker's certificate and key (issued anew on every start)."""
        return self.ca.issue_server("server", self.SERVER_HOSTS)

    def client(self, user: str) -> CertFiles:
        """A client certificate logging in as broker user ``user`` (one per user and run)."""
        if user not in self._clients:
            self._clients[user] = self.ca.issue_client(user)
        return self._clients[user]

    def client_env(self, user: str) -> dict[str, str]:
        """``WAYANG_TLS_*`` for a process that logs in as broker user ``user`` (EXTERNAL)."""
        files = self.client(user)
        return {
            "WAYANG_TLS_CA": str(self.ca.cert_path),
            "WAYANG_TLS_CERT": str(files.cert),
            "WAYANG_TLS_KEY": str(files.key),
        }
