"""TLS to the broker: certificate files in the AMQP URL, and TLS failures a person can act on.

aio-pika hands an ``amqps://`` URL's query to aiormq, which builds its SSL context from it
(``ssl.create_default_context`` with ``cafile``; ``certfile``/``keyfile`` loaded as the client
certificate; the host checked against the server certificate unless ``no_verify_ssl=1``) and
picks the SASL mechanism from ``auth`` (``plain`` by default, ``external`` for a client
certificate). So the URL is the one carrier of TLS settings through every daemon, the
dispatcher and the CLI; :func:`with_tls` folds ``WAYANG_TLS_*`` into it at the edge.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import aiormq
from yarl import URL

from wayang_mq.amqp.endpoint import redact_url, split_urls
from wayang_mq.core.errors import BrokerUnreachable, ConfigError

CA_PARAM = "cafile"
CERT_PARAM = "certfile"
KEY_PARAM = "keyfile"
AUTH_PARAM = "auth"


@dataclass(frozen=True)
class TlsFiles:
    """The CA to trust and the client certificate to present (any of them may be absent)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def of_url(cls, amqp_url: str) -> TlsFiles:
        """The files an AMQP URL's query names (the first URL's, of a list)."""
        query = URL(split_urls(amqp_url)[0] if "," in amqp_url else amqp_url).query

        def path(name: str) -> Path | None:
            value = query.get(name)
            return Path(value) if value else None

        return cls(path(CA_PARAM), path(CERT_PARAM), path(KEY_PARAM))

    def context(self) -> ssl.SSLContext:
        """A client context: the CA (else the system's), hostname checked, our cert if any.

        The same checks aiormq makes, for the management API over HTTPS.
        """
        context = ssl.create_default_context(cafile=self.ca)
        if self.cert is not None:
            context.load_cert_chain(self.cert, self.key)
        return context


def is_tls(amqp_url: str) -> bool:
    """True for an ``amqps://`` URL (or list: :class:`BrokerEndpoint` refuses mixed ones)."""
    return URL(split_urls(amqp_url)[0] if "," in amqp_url else amqp_url).scheme == "amqps"


def with_tls(
    amqp_url: str, *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> str:
    """``amqp_url`` with the TLS files set, and EXTERNAL auth when a client cert is presented.

    A file given here replaces the URL's own parameter (the settings are per process, the URL
    is often shared); a certificate given without a key drops the URL's ``keyfile`` (the key
    is then read from the certificate's file). ``auth=external`` is added with a client
    certificate unless the URL names a mechanism itself (``auth=plain`` keeps the password).
    A comma-separated list has each of its URLs changed alike.
    """
    if "," in amqp_url:
        return ",".join(with_tls(url, ca=ca, cert=cert, key=key) for url in split_urls(amqp_url))
    url = URL(amqp_url)
    if not (ca or cert or key):
        if url.scheme == "amqps" and url.query.get(CERT_PARAM) and AUTH_PARAM not in url.query:
            return str(url.update_query({AUTH_PARAM: "external"}))
        return amqp_url
    if url.scheme != "amqps":
        raise ConfigError(
            f"TLS files are set (WAYANG_TLS_*) but the broker URL {redact_url(amqp_url)} is "
            "not amqps://",
            hint="use amqps://host:5671/, or unset WAYANG_TLS_CA, WAYANG_TLS_CERT, WAYANG_TLS_KEY",
        )
    if key is not None and cert is None and not url.query.get(CERT_PARAM):
        raise ConfigError(
            "WAYANG_TLS_KEY is set without a client certificate",
            hint="set WAYANG_TLS_CERT too (or certfile= in the URL)",
        )
    query = dict(url.query)
    if ca is not None:
        query[CA_PARAM] = str(ca)
    if cert is not None:
        query[CERT_PARAM] = str(cert)
        query.pop(KEY_PARAM, None)
    if key is not None:
        query[KEY_PARAM] = str(key)
    if query.get(CERT_PARAM):
        query.setdefault(AUTH_PARAM, "external")
    return str(url.with_query(query))


_FIX_FILES = (
    "fix WAYANG_TLS_CA / WAYANG_TLS_CERT / WAYANG_TLS_KEY or the URL's "
    f"{CA_PARAM}/{CERT_PARAM}/{KEY_PARAM}"
)


def check_files(amqp_url: str) -> None:
    """Refuse up front TLS files that cannot be read or used (not PEM, a key that does not
    match its certificate): later they would surface as a handshake failure."""
    if not is_tls(amqp_url):
        return
    files = TlsFiles.of_url(amqp_url)
    for what, path in (("CA", files.ca), ("client certificate", files.cert), ("key", files.key)):
        if path is None:
            continue
        try:
            path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the TLS {what} {path}: {exc.strerror or exc}", hint=_FIX_FILES
            ) from None
    try:
        files.context()
    except ssl.SSLError as exc:
        named = ", ".join(str(path) for path in (files.ca, files.cert, files.key) if path)
        raise ConfigError(
            f"the TLS files ({named}) cannot be used: {exc.reason or exc}", hint=_FIX_FILES
        ) from None


def explain(exc: BaseException, amqp_url: str) -> BrokerUnreachable | None:
    """A one-line error for a TLS or EXTERNAL-login failure of a connection attempt.

    None when ``exc`` is neither (the caller's generic "cannot reach" applies).
    """
    where = _where(amqp_url)
    if isinstance(exc, aiormq.exceptions.AuthenticationError):
        return _no_common_mechanism(exc, amqp_url, where)
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        if URL(amqp_url).query.get(AUTH_PARAM, "").lower() == "external":
            return BrokerUnreachable(
                f"the broker at {where} refused the login of our client certificate "
                "(EXTERNAL): no broker user is named as its common name",
                hint="create the user (`wayang-mq access grant ...`) under the certificate's "
                "CN, or present the certificate issued for this identity",
            )
        return None
    cause = _ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _untrusted_server(cause, where)
    if isinstance(cause, ssl.SSLError):
        return _refused_by_server(cause, amqp_url, where)
    if is_tls(amqp_url) and _closed_early(exc):
        # TLS 1.3: our side of the handshake completes before the server checks our
        # certificate, so its refusal can arrive as a reset instead of the alert.
        return _refused_by_server(None, amqp_url, where)
    if not is_tls(amqp_url) and _closed_early(exc):
        return BrokerUnreachable(
            f"the broker at {where} closed the connection before AMQP started: "
            "is this port TLS only?",
            hint="use amqps:// with WAYANG_TLS_CA and a client certificate (docs/security.md §9)",
        )
    return None


def _where(amqp_url: str) -> str:
    """The broker's address for a message: no credentials, no file paths."""
    url = URL(amqp_url)
    return f"{url.scheme}://{url.host}:{url.port}{url.path}"


def _no_common_mechanism(
    exc: aiormq.exceptions.AuthenticationError, amqp_url: str, where: str
) -> BrokerUnreachable:
    # aiormq raises it with (the server's mechanisms, the ones it knows) before logging in.
    offered = str(exc.args[0]) if exc.args else "?"
    asked = URL(amqp_url).query.get(AUTH_PARAM, "plain").upper()
    if "EXTERNAL" in offered.split() and asked != "EXTERNAL":
        hint = (
            "present a client certificate (WAYANG_TLS_CERT, WAYANG_TLS_KEY) and no auth= "
            "parameter: the certificate is the login (EXTERNAL)"
        )
    else:
        hint = f"set auth= in the URL to one of {offered}, or enable {asked} on the broker"
    return BrokerUnreachable(
        f"the broker at {where} offers login by {offered}, not {asked}", hint=hint
    )


def _untrusted_server(cause: ssl.SSLCertVerificationError, where: str) -> BrokerUnreachable:
    reason = str(cause.verify_message or cause.reason or cause)
    if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
        return BrokerUnreachable(
            f"the broker's certificate at {where} does not name this host: {reason}",
            hint="dial a host the server certificate names (its subjectAltName), "
            "or reissue it for this name",
        )
    return BrokerUnreachable(
        f"the broker's certificate at {where} is not trusted: {reason}",
        hint="set WAYANG_TLS_CA (or cafile= in the URL) to the CA that issued the "
        "broker's certificate",
    )


def _refused_by_server(cause: ssl.SSLError | None, amqp_url: str, where: str) -> BrokerUnreachable:
    """The server ended the handshake: it wants a certificate, or does not trust ours."""
    reason = str(cause.reason or cause) if cause is not None else "connection reset"
    has_cert = TlsFiles.of_url(amqp_url).cert is not None
    if "CERTIFICATE_REQUIRED" in reason.upper() or (cause is None and not has_cert):
        return BrokerUnreachable(
            f"the broker at {where} requires a client certificate ({reason})",
            hint="set WAYANG_TLS_CERT and WAYANG_TLS_KEY (or certfile=/keyfile= in the URL)",
        )
    if cause is None or any(w in reason.upper() for w in ("UNKNOWN_CA", "CERTIFICATE")):
        return BrokerUnreachable(
            f"the broker at {where} refused our client certificate ({reason})",
            hint="present a certificate issued by the CA the broker trusts "
            "(its ssl_options.cacertfile) and not expired",
        )
    return BrokerUnreachable(
        f"the TLS handshake with the broker at {where} failed ({reason})",
        hint="is this the broker's amqps port? check WAYANG_TLS_* and the URL",
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (aiormq re-raises OSErrors as AMQPConnectionError)."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in found):
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    return next((e for e in _chain(exc) if isinstance(e, ssl.SSLError)), None)


def _closed_early(exc: BaseException) -> bool:
    """The peer hung up during the handshake (a reset, or EOF before the AMQP header)."""
    early = (ConnectionResetError, EOFError, aiormq.exceptions.IncompatibleProtocolError)
    return any(isinstance(e, early) for e in _chain(exc))
