"""TLS toward the KME: contexts built from the ``kme:`` policy settings, and failures named by cause.

The client context offers TLS 1.2 (unless ``tls_min_version`` is 1.3) and 1.3. TLS 1.2 suites are
qgate's secure set (ECDHE with AES-GCM or ChaCha20-Poly1305) unless ``tls_ciphers`` replaces it;
TLS 1.3 suites are always OpenSSL's defaults. The server certificate chain is always verified
against ``ca``. Its name is checked against ``server_name`` (else the URL host), unless a pin
(``server_cn``, ``server_sha256``) is set: a pin replaces the name check, so a certificate without
subjectAltName works when pinned.

A failed handshake is classified at once from the ssl error (:func:`classify`, a cause from
:data:`CAUSES`). When that is not enough (a KME that closes the connection on a cipher mismatch
gives only "EOF occurred in violation of protocol"), :func:`diagnostic_handshake` makes one
handshake with a permissive context (every version TLS 1.0-1.3 and every cipher at security
level 0, no verification, no client certificate, nothing sent after the handshake) and reads
the KME's ServerHello and certificate from the raw bytes (RFC 5246 section 7.4, RFC 8446 section
4.1.3); :func:`explain` turns what it saw into the cause and what to change. That handshake
authenticates nothing (a man in the middle can answer it): an explanation built on the certificate
it saw shows its fingerprint and says to check it with the KME's operator out of band, and never
says to trust or pin it. Certificate fields are shown printable (:func:`printable`), so a
certificate cannot write lines of its own into a log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
import ssl
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from qgate.errors import ConfigError
from qgate.policy_schema import normalize_sha256

SECURE_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""qgate's TLS 1.2 cipher list when ``kme.tls_ciphers`` is unset: forward-secret AEAD suites only."""
PERMISSIVE_CIPHERS: Final = "ALL:COMPLEMENTOFALL:@SECLEVEL=0"
"""The diagnostic handshake's cipher list: everything OpenSSL has, at security level 0."""
TLS_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
"""``kme.tls_min_version`` values -> the lowest version offered (TLS 1.0/1.1 never: RFC 8996)."""
_WIRE_VERSIONS: Final = {
    0x0300: "SSLv3",
    0x0301: "TLSv1",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}
"""ProtocolVersion code points (RFC 8446 section 4.2.1) as ``SSLSocket.version()`` names them."""

FIELD_SHOWN_MAX: Final = 256
"""Characters of a certificate field (subject, issuer, a name) shown; the rest is cut."""
NAMES_SHOWN: Final = 8
"""subjectAltNames listed in a message (the rest are counted)."""
UNVERIFIED: Final = (
    "the diagnostic handshake that showed this certificate authenticates nothing (a man in the middle"
    " can answer it)"
)
"""Said wherever a diagnosis describes the certificate a diagnostic handshake saw."""

NO_SHARED_CIPHER: Final = "no_shared_cipher"
PROTOCOL_VERSION: Final = "protocol_version"
UNKNOWN_CA: Final = "unknown_ca"
CERT_EXPIRED: Final = "cert_expired"
CERT_NOT_YET_VALID: Final = "cert_not_yet_valid"
CERT_INVALID: Final = "cert_invalid"
NAME_MISMATCH: Final = "name_mismatch"
PIN_MISMATCH: Final = "pin_mismatch"
CLIENT_CERT_REFUSED: Final = "client_cert_refused"
HANDSHAKE_CLOSED: Final = "handshake_closed"
TLS_OTHER: Final = "tls_other"
CAUSES: Final = (
    NO_SHARED_CIPHER, PROTOCOL_VERSION, UNKNOWN_CA, CERT_EXPIRED, CERT_NOT_YET_VALID, CERT_INVALID,
    NAME_MISMATCH, PIN_MISMATCH, CLIENT_CERT_REFUSED, HANDSHAKE_CLOSED, TLS_OTHER,
)  # fmt: skip
"""Every ``KmsTlsError.cause``."""
AMBIGUOUS: Final = (NO_SHARED_CIPHER, PROTOCOL_VERSION, HANDSHAKE_CLOSED, TLS_OTHER)
"""Causes a diagnostic handshake can sharpen (the ssl error alone does not say what to change)."""
_SERVER_CERT_CAUSES: Final = (UNKNOWN_CA, CERT_EXPIRED, CERT_NOT_YET_VALID, CERT_INVALID, NAME_MISMATCH)

_VERIFY_CAUSES: Final = {
    2: UNKNOWN_CA, 18: UNKNOWN_CA, 19: UNKNOWN_CA, 20: UNKNOWN_CA, 21: UNKNOWN_CA,
    9: CERT_NOT_YET_VALID, 10: CERT_EXPIRED, 62: NAME_MISMATCH, 64: NAME_MISMATCH,
}  # fmt: skip
"""OpenSSL X509_V_ERR codes (``SSLCertVerificationError.verify_code``) -> cause."""
_CLIENT_CERT_ALERTS: Final = frozenset(
    f"{prefix}_ALERT_{name}"
    for prefix, name in (
        ("TLSV1", "UNKNOWN_CA"), ("SSLV3", "BAD_CERTIFICATE"), ("SSLV3", "CERTIFICATE_EXPIRED"),
        ("SSLV3", "CERTIFICATE_REVOKED"), ("SSLV3", "CERTIFICATE_UNKNOWN"), ("TLSV1", "ACCESS_DENIED"),
        ("SSLV3", "UNSUPPORTED_CERTIFICATE"), ("TLSV13", "CERTIFICATE_REQUIRED"),
    )
)  # fmt: skip
"""Alerts the KME sends when it refuses our client certificate (ssl error ``reason``)."""
_CIPHER_REASONS: Final = frozenset(
    {"SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE"}
    | {"TLSV1_ALERT_INSUFFICIENT_SECURITY"}
)
_VERSION_REASONS: Final = frozenset(
    {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "WRONG_VERSION_NUMBER"}
)


# --- Settings and contexts -------------------------------------------------------------------


class TlsOptions(Protocol):
    """The TLS settings of ``qgate.policy.KmePolicy`` (that class, or :class:`TlsSettings`)."""

    @property
    def tls_min_version(self) -> str: ...
    @property
    def tls_ciphers(self) -> str | None: ...
    @property
    def server_name(self) -> str | None: ...
    @property
    def server_cn(self) -> str | None: ...
    @property
    def server_sha256(self) -> str | None: ...


@dataclass(frozen=True)
class TlsSettings:
    """TLS settings toward one KME (attribute names and meanings as in the ``kme:`` policy section).

    Attributes:
        tls_min_version: ``"1.2"`` or ``"1.3"``.
        tls_ciphers: OpenSSL cipher list for TLS 1.2, or None for :data:`SECURE_TLS12_CIPHERS`.
        server_name: the name the server certificate must match instead of the URL host.
        server_cn: pin: the server certificate's subject CN.
        server_sha256: pin: SHA-256 of the server leaf certificate (DER), 64 lowercase hex digits.
    """

    tls_min_version: str = "1.2"
    tls_ciphers: str | None = None
    server_name: str | None = None
    server_cn: str | None = None
    server_sha256: str | None = None

    @property
    def pinned(self) -> bool:
        """True when a pin replaces the hostname check."""
        return self.server_cn is not None or self.server_sha256 is not None


def tls_settings(options: TlsOptions | None = None, *, server_cn: str | None = None) -> TlsSettings:
    """Copy and check TLS settings; ``server_cn`` fills in when ``options`` pins no CN.

    Raises:
        ConfigError: unknown ``tls_min_version`` or a ``server_sha256`` that is not 32 bytes of hex.
    """
    base = options if options is not None else TlsSettings()
    if base.tls_min_version not in TLS_VERSIONS:
        raise ConfigError(f"kme.tls_min_version must be one of {', '.join(TLS_VERSIONS)}")
    pin = base.server_sha256
    digest = normalize_sha256(pin) if pin is not None else None
    if pin is not None and digest is None:
        raise ConfigError(f"kme.server_sha256 {pin!r} is not a SHA-256 fingerprint (64 hex digits)")
    return TlsSettings(
        base.tls_min_version, base.tls_ciphers, base.server_name, base.server_cn or server_cn, digest
    )


def client_context(settings: TlsSettings, *, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Build the SAE's client context: versions and TLS 1.2 ciphers from ``settings``, chain checked
    against ``ca``, hostname checked unless pinned, ``cert``/``key`` as client certificate.

    Raises:
        ConfigError: the cipher list selects nothing, or a file is missing or unusable.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = TLS_VERSIONS[settings.tls_min_version]
    try:
        context.set_ciphers(settings.tls_ciphers or SECURE_TLS12_CIPHERS)
    except ssl.SSLError as exc:
        raise ConfigError(f"kme.tls_ciphers {settings.tls_ciphers!r}: {exc.args[-1]}") from exc
    context.check_hostname = not settings.pinned
    load_credentials(context, ca=ca, cert=cert, key=key)
    return context


def server_context(*, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Build a TLS server context (TLS >= 1.2) demanding a client certificate signed by ``ca``.

    Raises:
        ConfigError: a file is missing or not a usable PEM certificate/key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    load_credentials(context, ca=ca, cert=cert, key=key)
    return context


def load_credentials(context: ssl.SSLContext, *, ca: Path, cert: Path, key: Path) -> None:
    """Load the trusted CA file and our certificate chain and key into ``context``.

    Raises:
        ConfigError: a file is missing or not a usable PEM certificate/key.
    """
    try:
        context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"CA file {ca}: {exc}") from exc
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"certificate {cert} / key {key}: {exc}") from exc


@dataclass(frozen=True)
class Offer:
    """What a client context offers: versions and TLS 1.2 suites (OpenSSL names, preference order).

    Attributes:
        versions: the TLS versions offered, ``("TLSv1.2", "TLSv1.3")`` or ``("TLSv1.3",)``.
        tls12: TLS 1.2 suites offered; empty when TLS 1.2 is not.
        weak: the TLS 1.2 suites among them that are not AEAD or not forward-secret.
        default_set: True when the suites are :data:`SECURE_TLS12_CIPHERS` (no ``tls_ciphers``).
    """

    versions: tuple[str, ...]
    tls12: tuple[str, ...]
    weak: tuple[str, ...]
    default_set: bool

    def describe(self) -> str:
        """Say what is offered, for messages: ``TLSv1.2, TLSv1.3; TLS 1.2 ciphers ECDHE-...``."""
        if not self.tls12:
            return "TLSv1.3 only"
        shown = ", ".join(self.tls12[:6]) + (f" (+{len(self.tls12) - 6} more)" if len(self.tls12) > 6 else "")
        return f"{', '.join(self.versions)}; TLS 1.2 ciphers {shown}"


def offer_of(context: ssl.SSLContext, settings: TlsSettings) -> Offer:
    """Return what ``context`` (built from ``settings``) offers."""
    versions = ("TLSv1.3",) if settings.tls_min_version == "1.3" else ("TLSv1.2", "TLSv1.3")
    suites = [c for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"] if "TLSv1.2" in versions else []
    weak = [c["name"] for c in suites if not c["aead"] or c["kea"] not in ("kx-ecdhe", "kx-dhe")]
    return Offer(versions, tuple(c["name"] for c in suites), tuple(weak), settings.tls_ciphers is None)


# --- Certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CertInfo:
    """What an operator needs to see of an X.509 certificate.

    Every text field but ``common_name`` is printable (:func:`printable`): a certificate is the
    KME's, or anyone's who answers in its place, and must not write lines of its own into a log.

    Attributes:
        subject, issuer: RFC 4514 strings (``CN=KME_A``), printable.
        common_name: the subject CN as the certificate has it (for pin checks), or None; print it
            with :func:`printable`.
        dns_names, ip_addresses: the subjectAltName entries of those kinds (DNS names printable).
        not_before, not_after: validity, UTC.
        sha256: SHA-256 of the DER certificate, 64 lowercase hex digits.
    """

    subject: str
    issuer: str
    common_name: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    sha256: str

    def names(self) -> list[str]:
        """Return the subjectAltNames as ``DNS:x`` / ``IP:y``."""
        return [f"DNS:{n}" for n in self.dns_names] + [f"IP:{a}" for a in self.ip_addresses]

    def names_shown(self) -> str:
        """Return the first NAMES_SHOWN subjectAltNames joined for a message, and how many more."""
        names = self.names()
        more = f" (+{len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else ""
        return ", ".join(names[:NAMES_SHOWN]) + more

    def as_dict(self) -> dict[str, object]:
        """Return a JSON-able view (times in RFC 3339, fingerprint with colons)."""
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "subject_alt_names": self.names(),
            "not_before": stamp(self.not_before),
            "not_after": stamp(self.not_after),
            "sha256": colon_hex(self.sha256),
        }


def cert_info(der: bytes) -> CertInfo:
    """Describe the DER certificate ``der``.

    Raises:
        ValueError: ``der`` is not a parsable X.509 certificate.
    """
    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(sans.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in sans.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    return CertInfo(
        subject=name_of(cert.subject),
        issuer=name_of(cert.issuer),
        common_name=str(cns[0].value) if len(cns) == 1 else None,
        dns_names=tuple(printable(name) for name in dns),
        ip_addresses=ips,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256=hashlib.sha256(der).hexdigest(),
    )


@dataclass(frozen=True)
class Session:
    """A TLS session with the KME, verified as configured: version, cipher, server certificate."""

    version: str
    cipher: str
    certificate: CertInfo


def name_matches(info: CertInfo, name: str) -> bool:
    """Tell whether ``name`` (a DNS name or IP literal) matches the certificate as OpenSSL checks it.

    IP literals must be IP SANs; DNS names a DNS SAN (``*.`` for one leftmost label), or the
    subject CN when the certificate has no DNS SAN (Python's ``hostname_checks_common_name``).
    """
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        wanted = name.lower().rstrip(".")
        candidates = info.dns_names or ((info.common_name,) if info.common_name else ())
        return any(_dns_match(pattern.lower().rstrip("."), wanted) for pattern in candidates)
    return any(ipaddress.ip_address(a) == address for a in info.ip_addresses)


def _dns_match(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def pin_problems(info: CertInfo, settings: TlsSettings) -> list[str]:
    """Return one message per pin in ``settings`` the certificate does not meet (empty: all met)."""
    problems = []
    if settings.server_cn is not None and info.common_name != settings.server_cn:
        problems.append(
            f"server certificate CN {info.common_name!r}, expected kme.server_cn {settings.server_cn!r}"
        )
    if settings.server_sha256 is not None and info.sha256 != settings.server_sha256:
        problems.append(
            f"server certificate SHA-256 {colon_hex(info.sha256)}, expected kme.server_sha256 "
            f"{colon_hex(settings.server_sha256)}"
        )
    return problems


def name_of(name: x509.Name) -> str:
    """Write an X.509 name as RFC 4514 text (``CN=KME_A``), printable (see :func:`printable`)."""
    return printable(name.rfc4514_string())


def printable(text: str, limit: int = FIELD_SHOWN_MAX) -> str:
    """Return ``text`` fit to print on one line: non-printable characters (newlines, terminal escapes,
    bidirectional controls) written as Python escapes (``\\n``, ``\\x1b``, ``\\u202e``), cut to
    ``limit`` characters."""
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def colon_hex(digest: str) -> str:
    """Write a hex digest as ``AB:CD:...`` (the form ``openssl x509 -fingerprint`` prints)."""
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()


def stamp(moment: dt.datetime) -> str:
    """Write a UTC time as RFC 3339 (``2026-05-09T07:35:25Z``)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ca_certs(ca: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(ca.read_bytes())
    except (OSError, ValueError):
        return []


# --- Classifying a failure at once -----------------------------------------------------------


@dataclass(frozen=True)
class TlsFailure:
    """A TLS failure toward the KME: its ``cause`` (one of :data:`CAUSES`) and what to say about it."""

    cause: str
    text: str


def classify(exc: BaseException, *, expected_name: str, cert: Path, handshake_done: bool) -> TlsFailure:
    """Name the cause of a TLS failure from the exception alone (no network).

    Args:
        exc: the ``ssl.SSLError`` or ``OSError`` (reset, broken pipe) the connection raised.
        expected_name: the name the server certificate had to match (``server_name`` or URL host).
        cert: our client certificate file, named when the KME refuses it.
        handshake_done: True when the handshake had completed (a TLS 1.3 KME refuses a client
            certificate after it).
    """
    reason = str(getattr(exc, "reason", "") or "")
    if isinstance(exc, ssl.SSLCertVerificationError):
        cause = _VERIFY_CAUSES.get(int(exc.verify_code or 0), CERT_INVALID)
        detail = exc.verify_message or str(exc)
        if cause == NAME_MISMATCH:
            detail += f" (expected {expected_name})"
        return TlsFailure(cause, f"the KME's certificate does not verify: {detail}")
    if reason in _CLIENT_CERT_ALERTS:
        return TlsFailure(
            CLIENT_CERT_REFUSED, f"the KME refused our client certificate {cert} ({_alert(reason)})"
        )
    if reason in _CIPHER_REASONS:
        return TlsFailure(
            NO_SHARED_CIPHER, f"the KME refused the handshake ({_alert(reason)}): no shared cipher?"
        )
    if reason in _VERSION_REASONS:
        what = "the KME does not answer in TLS" if reason == "WRONG_VERSION_NUMBER" else _alert(reason)
        return TlsFailure(PROTOCOL_VERSION, f"no TLS version in common ({what})")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError | BrokenPipeError):
        when = "right after the handshake, before answering" if handshake_done else "during the handshake"
        return TlsFailure(HANDSHAKE_CLOSED, f"the KME closed the connection {when} ({exc})")
    return TlsFailure(TLS_OTHER, str(exc))


def _alert(reason: str) -> str:
    """Turn ``SSLV3_ALERT_HANDSHAKE_FAILURE`` into ``TLS alert handshake_failure``."""
    _, sep, name = reason.partition("_ALERT_")
    return f"TLS alert {name.lower()}" if sep else reason.lower().replace("_", " ")


# --- The diagnostic handshake ----------------------------------------------------------------


@dataclass(frozen=True)
class ServerFlight:
    """What the KME's first plaintext records show (RFC 5246 section 7.4, RFC 8446 section 4.1.3).

    Attributes:
        version: negotiated version (``TLSv1.2``; from supported_versions for TLS 1.3), or None.
        suite: the chosen cipher suite code point, or None.
        certificate: the leaf certificate DER (TLS <= 1.2 only: TLS 1.3 encrypts it), or None.
        alert: ``(level, description)`` of a plaintext alert the KME sent, or None.
    """

    version: str | None = None
    suite: int | None = None
    certificate: bytes | None = None
    alert: tuple[int, int] | None = None


def parse_server_flight(data: bytes) -> ServerFlight:
    """Read ServerHello, Certificate and any alert from the raw bytes a server sent; never raises.

    Parsing stops at the first ChangeCipherSpec or application-data record (encrypted from
    there on) or at the first truncated or malformed piece; what was read up to there is returned.
    """
    handshake, alert, pos = bytearray(), None, 0
    while pos + 5 <= len(data):
        kind, length = data[pos], int.from_bytes(data[pos + 3 : pos + 5], "big")
        body = data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if kind == 22:
            handshake += body
        elif kind == 21 and len(body) >= 2 and alert is None:
            alert = (body[0], body[1])
        else:
            break
    version, suite, certificate = _read_handshake(bytes(handshake))
    return ServerFlight(version, suite, certificate, alert)


def _read_handshake(stream: bytes) -> tuple[str | None, int | None, bytes | None]:
    version: str | None = None
    suite: int | None = None
    certificate: bytes | None = None
    pos = 0
    while pos + 4 <= len(stream):
        kind, length = stream[pos], int.from_bytes(stream[pos + 1 : pos + 4], "big")
        body = stream[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if len(body) < length:
            break
        if kind == 2 and version is None:
            version, suite = _server_hello(body)
        elif kind == 11 and certificate is None and len(body) >= 6:
            size = int.from_bytes(body[3:6], "big")
            certificate = body[6 : 6 + size] if 0 < size <= len(body) - 6 else None
    return version, suite, certificate


def _server_hello(body: bytes) -> tuple[str | None, int | None]:
    """Return (version, cipher suite) of a ServerHello body (legacy_version, random, session_id, ...)."""
    if len(body) < 38:
        return None, None
    code = int.from_bytes(body[0:2], "big")
    at = 35 + body[34]
    if at + 3 > len(body):
        return _WIRE_VERSIONS.get(code), None
    suite = int.from_bytes(body[at : at + 2], "big")
    at += 3  # suite, compression method
    end = at + 2 + int.from_bytes(body[at : at + 2], "big") if at + 2 <= len(body) else at
    at += 2
    while at + 4 <= min(end, len(body)):
        ext, size = int.from_bytes(body[at : at + 2], "big"), int.from_bytes(body[at + 2 : at + 4], "big")
        if ext == 43 and size == 2 and at + 6 <= len(body):  # supported_versions (RFC 8446 4.2.1)
            code = int.from_bytes(body[at + 4 : at + 6], "big")
        at += 4 + size
    return _WIRE_VERSIONS.get(code, f"0x{code:04x}"), suite


@dataclass(frozen=True)
class Observation:
    """What one diagnostic handshake saw.

    Attributes:
        connected: the TCP connection was made.
        completed: the handshake finished (our side).
        version, cipher: what the KME chose (OpenSSL cipher name), when seen.
        certificate: the KME's leaf certificate DER, when seen.
        alert: the KME's alert (``handshake_failure (40)``), when it sent one in the clear.
        error: what ended the handshake, "" when it completed.
    """

    connected: bool
    completed: bool = False
    version: str | None = None
    cipher: str | None = None
    certificate: bytes | None = None
    alert: str | None = None
    error: str = ""


def permissive_context() -> ssl.SSLContext:
    """Return the diagnostic context: TLS 1.0-1.3, every cipher at security level 0, no verification."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1: offered to learn, never used
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(PERMISSIVE_CIPHERS)
    return context


def diagnostic_handshake(host: str, port: int, *, server_name: str | None, timeout: float) -> Observation:
    """Make one permissive handshake with ``host:port`` and report what the KME chose.

    Offers every version and cipher, verifies nothing, sends no client certificate and nothing
    after the handshake (the connection is closed at once). Never raises.

    Args:
        host, port: the KME.
        server_name: sent as SNI when it is a DNS name.
        timeout: seconds for connecting and for the whole handshake.
    """
    context = permissive_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return Observation(connected=False, error=f"{type(exc).__name__}: {exc}")
    received = bytearray()
    with sock:
        completed, error = _pump(tls, sock, incoming, outgoing, received, time.monotonic() + timeout)
    flight = parse_server_flight(bytes(received))
    names = {c["id"] & 0xFFFF: c["name"] for c in context.get_ciphers()}
    cipher = tls.cipher() if completed else None
    alert = f"{_ALERT_NAMES.get(flight.alert[1], 'alert')} ({flight.alert[1]})" if flight.alert else None
    return Observation(
        connected=True,
        completed=completed,
        version=tls.version() if completed else flight.version,
        cipher=cipher[0] if cipher else names.get(flight.suite or -1, f"0x{flight.suite or 0:04x}"),
        certificate=(tls.getpeercert(binary_form=True) if completed else None) or flight.certificate,
        alert=alert,
        error=error,
    )


def _pump(
    tls: ssl.SSLObject,
    sock: socket.socket,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    received: bytearray,
    deadline: float,
) -> tuple[bool, str]:
    """Drive ``tls``'s handshake over ``sock``, keeping every received byte; return (completed, error)."""
    while True:
        completed, error = False, ""
        try:
            tls.do_handshake()
            completed = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            error = str(exc)
        try:
            sock.sendall(outgoing.read())
            if completed or error:
                return completed, error
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data = sock.recv(65536)
        except OSError as exc:
            return False, error or f"{type(exc).__name__}: {exc}"
        if not data:
            return False, "the KME closed the connection"
        received += data
        incoming.write(data)


_ALERT_NAMES: Final = {
    10: "unexpected_message", 40: "handshake_failure", 42: "bad_certificate", 45: "certificate_expired",
    46: "certificate_unknown", 47: "illegal_parameter", 48: "unknown_ca", 49: "access_denied",
    50: "decode_error", 70: "protocol_version", 71: "insufficient_security", 80: "internal_error",
    112: "unrecognized_name", 116: "certificate_required",
}  # fmt: skip
"""TLS AlertDescription names (RFC 8446 section 6)."""


# --- Explaining --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """What :func:`explain` needs to know about our side.

    Attributes:
        offer: what we offer.
        expected_name: the name the server certificate must match; ``name_source`` says why
            (``kme.server_name`` or ``the URL host``).
        ca, cert: the trusted CA file and our client certificate file.
    """

    offer: Offer
    expected_name: str
    name_source: str
    ca: Path
    cert: Path


def explain(failure: TlsFailure, seen: Observation | None, ctx: Local) -> TlsFailure:
    """Return the cause and a full explanation of ``failure`` given the diagnostic handshake ``seen``.

    ``seen`` may be None for failures that need no handshake (pin mismatch, client certificate
    refused). The returned cause may differ from ``failure.cause`` (an EOF that was a cipher
    mismatch becomes ``no_shared_cipher``).
    """
    if failure.cause == PIN_MISMATCH:
        return failure
    if failure.cause == CLIENT_CERT_REFUSED:
        return TlsFailure(CLIENT_CERT_REFUSED, f"{failure.text}; {_our_cert(ctx)[0]}")
    if seen is None:
        return failure
    if failure.cause in _SERVER_CERT_CAUSES:
        return _explain_certificate(failure, seen, ctx)
    return _explain_negotiation(failure, seen, ctx)


def _explain_negotiation(failure: TlsFailure, seen: Observation, ctx: Local) -> TlsFailure:
    offer, everything = ctx.offer, "a handshake offering TLS 1.0-1.3 and every cipher"
    if not seen.connected:
        return TlsFailure(failure.cause, f"{failure.text}; the diagnostic handshake failed too: {seen.error}")
    if seen.version is None:
        if seen.alert:
            text = f"the KME refuses even {everything} ({seen.alert})"
        else:
            text = f"the KME closes even {everything} before its ServerHello: it does not speak TLS here"
        return TlsFailure(
            failure.cause, f"{text}; it may filter by client address or server name ({failure.text})"
        )
    chose = f"{seen.version} {seen.cipher}"
    if seen.version not in offer.versions:
        if seen.version in ("SSLv3", "TLSv1", "TLSv1.1"):
            fix = "qgate never offers TLS below 1.2 (RFC 8996): the KME needs TLS 1.2 or 1.3"
        else:
            fix = 'kme.tls_min_version is "1.3"; set it to "1.2" if your security policy permits TLS 1.2'
        return TlsFailure(
            PROTOCOL_VERSION, f"the KME offers at most {chose} (its choice from TLS 1.0-1.3); {fix}"
        )
    if seen.version == "TLSv1.2" and seen.cipher not in offer.tls12:
        kind = _suite_kind(seen.cipher or "")
        ours = "kme.tls_ciphers" if not offer.default_set else "qgate's default set (kme.tls_ciphers unset)"
        return TlsFailure(
            NO_SHARED_CIPHER,
            f"the KME offers only {chose} (its choice from every cipher), which {ours} does not allow;"
            f" allow it explicitly with kme.tls_ciphers if your security policy permits {kind}"
            f" (we offer {offer.describe()})",
        )
    ours, out_of_dates = _our_cert(ctx)
    return TlsFailure(
        CLIENT_CERT_REFUSED if out_of_dates else failure.cause,  # then surely our certificate
        f"{failure.text}; without a client certificate the KME agrees on {chose}, which we offer too, so"
        f" it ends our handshake over something else, most likely our client certificate: {ours}",
    )


def _suite_kind(name: str) -> str:
    """Name what is weak about a TLS 1.2 suite, for the advice to allow it."""
    if "GCM" not in name and "CHACHA20" not in name and "CCM" not in name:
        return "CBC suites"
    if not name.startswith(("ECDHE-", "DHE-")):
        return "suites without forward secrecy"
    return "this suite"


def _explain_certificate(failure: TlsFailure, seen: Observation, ctx: Local) -> TlsFailure:
    """Explain a server certificate failure from the certificate the diagnostic handshake saw.

    That handshake verifies nothing, so the explanation never says to trust or pin what it saw: it
    shows the fingerprint and says to check it with the KME's operator out of band first.
    """
    if seen.certificate is None:
        why = seen.error or "no certificate"
        return TlsFailure(
            failure.cause, f"{failure.text} (the diagnostic handshake saw no certificate: {why})"
        )
    try:
        info = cert_info(seen.certificate)
    except ValueError:
        return TlsFailure(failure.cause, f"{failure.text} (the KME's certificate does not parse)")
    what = f"the KME's certificate {info.subject}"
    check = (
        f"; {UNVERIFIED}: its SHA-256 is {colon_hex(info.sha256)}, check it with the KME's operator out of"
        " band before trusting or pinning it"
    )
    if failure.cause == NAME_MISMATCH:
        if not info.names():
            cn = printable(info.common_name) if info.common_name is not None else "none"
            text = (
                f"{what} has no subjectAltName, so no name ({ctx.expected_name}, {ctx.name_source}) can"
                f' verify; a pin replaces the name check: kme.server_cn (its CN reads "{cn}") or'
                " kme.server_sha256"
            )
        else:
            text = (
                f"{what} is for {info.names_shown()}, not {ctx.expected_name} ({ctx.name_source}); set"
                " kme.server_name to one of its names, or pin it with kme.server_cn or kme.server_sha256"
            )
        return TlsFailure(NAME_MISMATCH, text + check)
    now = dt.datetime.now(dt.UTC)
    valid = f"valid {stamp(info.not_before)} to {stamp(info.not_after)}, now {stamp(now)}"
    if failure.cause == CERT_EXPIRED and info.not_after < now:
        return TlsFailure(CERT_EXPIRED, f"{what} expired ({valid}): check this host's clock too")
    if failure.cause == CERT_NOT_YET_VALID and info.not_before > now:
        return TlsFailure(CERT_NOT_YET_VALID, f"{what} is not valid yet ({valid}): check both clocks")
    cas = _ca_certs(ctx.ca)
    if failure.cause == UNKNOWN_CA and not any(_issued_by(seen.certificate, ca) for ca in cas):
        held = "; ".join(name_of(ca.subject) for ca in cas) or "nothing usable"
        self_signed = " (self-signed)" if info.issuer == info.subject else ""
        return TlsFailure(
            UNKNOWN_CA, f"{what} is issued by {info.issuer}{self_signed}, which is not a CA in kme.ca"
            f" {ctx.ca} (it holds {held}); kme.ca must hold the CA the KME's operator names{check}"
        )  # fmt: skip
    dates = "; ".join(f"{name_of(c.subject)} valid to {stamp(c.not_valid_after_utc)}" for c in cas)
    return TlsFailure(
        failure.cause, f"{failure.text}; {what}, issuer {info.issuer}, {valid}; kme.ca: {dates}{check}"
    )


def _issued_by(der: bytes, ca: x509.Certificate) -> bool:
    try:
        x509.load_der_x509_certificate(der).verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


_RENEW: Final = "renew it, and check this host's clock"
_CLOCKS: Final = "check this host's clock and the KME's"


def _our_cert(ctx: Local) -> tuple[str, bool]:
    """Describe our client certificate for a refusal message: out of its dates (check the clock), or
    which issuer the KME must trust (and whether kme.ca's CA of that name issued it). Returns the
    text and whether the certificate is out of its dates."""
    try:
        der = x509.load_pem_x509_certificate(ctx.cert.read_bytes()).public_bytes(Encoding.DER)
    except (OSError, ValueError):
        return f"kme.cert {ctx.cert} is not readable", False
    info = cert_info(der)
    now = dt.datetime.now(dt.UTC)
    valid = f"valid {stamp(info.not_before)} to {stamp(info.not_after)}, now {stamp(now)}"
    if info.not_after < now:
        return f"kme.cert {ctx.cert} ({info.subject}) has expired ({valid}): {_RENEW}", True
    if info.not_before > now:
        return f"kme.cert {ctx.cert} ({info.subject}) is not valid yet ({valid}): {_CLOCKS}", True
    cas = _ca_certs(ctx.ca)
    namesake = any(name_of(ca.subject) == info.issuer for ca in cas)
    impostor = namesake and not any(_issued_by(der, ca) for ca in cas)
    other = " (not the CA of that name in kme.ca: another key)" if impostor else ""
    text = (
        f"kme.cert {ctx.cert} is {info.subject}, issued by {info.issuer}{other}, {valid}: the KME must"
        " trust its issuer for SAE certificates"
    )
    return text, False
