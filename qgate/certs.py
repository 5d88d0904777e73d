"""Inspect X.509 certificates for ``qgate check`` and ``qgate up``: no files, no sockets, no clock.

Every function takes parsed certificates (or PEM bytes) and, where time matters, ``now`` (an
aware UTC ``datetime``). Problems come back as plain sentences naming the certificate; the caller
adds the file, policy line and field. The rules follow what OpenSSL (the TLS stack of both the
gateway and typical KMEs) enforces, RFC 5280 section 4.2 and RFC 6125 section 6.4 for names:

* a CA certificate asserts basicConstraints cA and, when it has keyUsage, keyCertSign;
* a TLS client certificate allows digitalSignature (keyUsage) and clientAuth (extendedKeyUsage)
  when those extensions are present; a TLS server certificate allows serverAuth;
* a server certificate with a subjectAltName is matched on it only (its CN is never used).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

WARN_DAYS_DEFAULT: Final = 30
"""Days before ``not_valid_after`` from which a certificate is expiring soon (implementation choice)."""


@dataclass
class Findings:
    """Problems that make a credential unusable (``errors``) and ones worth a look (``warnings``)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def extend(self, other: Findings) -> None:
        """Append ``other``'s errors and warnings to this one's."""
        self.errors.extend(other.errors)
        self.warnings.extend(other.warnings)


def load_pem_bundle(data: bytes) -> list[x509.Certificate]:
    """Parse every ``CERTIFICATE`` block of a PEM file, in file order (other PEM blocks are skipped).

    Raises:
        ValueError: no certificate in ``data``, or a certificate block does not parse.
    """
    return x509.load_pem_x509_certificates(data)


def certificate_cn(cert: x509.Certificate) -> str | None:
    """Return the subject CN of ``cert``, or None."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def describe(cert: x509.Certificate) -> str:
    """Name ``cert`` for a message: ``CN=SAE_A``, or its whole subject when it has no CN."""
    cn = certificate_cn(cert)
    return f"CN={cn}" if cn is not None else cert.subject.rfc4514_string() or "empty subject"


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """Return the SHA-256 of the DER certificate, 64 lowercase hex digits (``openssl x509 -fingerprint``)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Lowercase ``text`` and drop colons and spaces, so ``AB:CD`` compares equal to ``abcd``."""
    return "".join(ch for ch in text.lower() if ch not in ": ")


def _date(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def validity(cert: x509.Certificate, now: datetime.datetime, warn_days: int = WARN_DAYS_DEFAULT) -> Findings:
    """Check ``cert``'s validity window at ``now`` (RFC 5280 section 4.1.2.5).

    Args:
        cert: the certificate.
        now: the current time, timezone-aware.
        warn_days: a certificate expiring within this many days (>= 0) gets a warning.

    Returns:
        An error when ``now`` is before ``not_valid_before`` or after ``not_valid_after``, a warning
        when it expires within ``warn_days``; each names the dates.
    """
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    found = Findings()
    if now < start:
        found.errors.append(f"not valid yet: valid from {_date(start)} to {_date(end)}; check the clock")
    elif now > end:
        found.errors.append(f"expired on {_date(end)} (valid from {_date(start)})")
    elif end - now <= datetime.timedelta(days=warn_days):
        found.warnings.append(f"expires in {_duration(end - now)}, on {_date(end)}")
    return found


def _duration(left: datetime.timedelta) -> str:
    """``10 days`` (rounded), or ``5 hours`` under a day."""
    if left < datetime.timedelta(days=1):
        hours = max(1, round(left / datetime.timedelta(hours=1)))
        return f"{hours} hour{'s' if hours != 1 else ''}"
    days = round(left / datetime.timedelta(days=1))
    return f"{days} day{'s' if days != 1 else ''}"


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def ca_problems(cert: x509.Certificate) -> list[str]:
    """Say why ``cert`` cannot act as a CA (RFC 5280 sections 4.2.1.9 and 4.2.1.3); empty when it can."""
    constraints = _extension(cert, x509.BasicConstraints)
    usage = _extension(cert, x509.KeyUsage)
    problems = []
    if not isinstance(constraints, x509.BasicConstraints):
        problems.append("not a CA certificate (no basicConstraints)")
    elif not constraints.ca:
        problems.append("not a CA certificate (basicConstraints CA:FALSE)")
    if isinstance(usage, x509.KeyUsage) and not usage.key_cert_sign:
        problems.append("keyUsage does not allow keyCertSign")
    return problems


_EKU_NAMES: Final = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}
"""RFC 5280 section 4.2.1.12 names of the usual extendedKeyUsage purposes, for messages."""


def _eku_problem(cert: x509.Certificate, purpose: x509.ObjectIdentifier, name: str) -> list[str]:
    usages = _extension(cert, x509.ExtendedKeyUsage)
    if isinstance(usages, x509.ExtendedKeyUsage) and purpose not in usages:
        seen = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in usages) or "nothing"
        return [f"extendedKeyUsage does not include {name} (it has {seen})"]
    return []


def client_usage_problems(cert: x509.Certificate) -> list[str]:
    """Say why ``cert`` cannot authenticate a TLS client (RFC 5280 sections 4.2.1.3, 4.2.1.12)."""
    usage = _extension(cert, x509.KeyUsage)
    problems = []
    if isinstance(usage, x509.KeyUsage) and not usage.digital_signature:
        problems.append("keyUsage does not allow digitalSignature (needed to sign the TLS handshake)")
    return problems + _eku_problem(cert, ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")


def server_usage_problems(cert: x509.Certificate) -> list[str]:
    """Say why ``cert`` cannot authenticate a TLS server (RFC 5280 section 4.2.1.12)."""
    return _eku_problem(cert, ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")


def issued(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    """Return whether ``issuer``'s subject and key signed ``cert`` (names and signature only)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def chain_order_problems(chain: Sequence[x509.Certificate]) -> list[str]:
    """Check that each certificate of a chain file was issued by the next one (leaf first).

    RFC 8446 section 4.4.2 and RFC 5246 section 7.4.2 order: the sender's certificate, then
    each following certificate directly certifying the one before it.
    """
    problems = []
    for i, (cert, issuer) in enumerate(itertools.pairwise(chain), start=1):
        if not issued(issuer, cert):
            problems.append(
                f"certificate {i + 1} ({describe(issuer)}) did not issue certificate {i} ({describe(cert)});"
                " list the leaf first, then each issuer in turn"
            )
    return problems


def anchored(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]) -> bool:
    """Return whether some anchor issued, or is, a certificate of ``chain``."""
    return any(cert == anchor or issued(anchor, cert) for cert in chain for anchor in anchors)


def _ca_key_usage(_policy: verification.Policy, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("keyUsage of a CA certificate does not allow keyCertSign")


def _check_time(certs: Sequence[x509.Certificate], now: datetime.datetime) -> datetime.datetime | None:
    """Pick ``now``, or the nearest instant at which every one of ``certs`` is valid (None if none is)."""
    start = max(c.not_valid_before_utc for c in certs)
    end = min(c.not_valid_after_utc for c in certs)
    return min(max(now, start), end) if start <= end else None


def _build_path(
    chain: Sequence[x509.Certificate], anchor: x509.Certificate, when: datetime.datetime
) -> str | None:
    agnostic = verification.Criticality.AGNOSTIC
    ca_policy = (
        verification.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, agnostic, None)
        .may_be_present(x509.KeyUsage, agnostic, _ca_key_usage)
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([anchor]))
        .time(when)
        .extension_policies(ca_policy=ca_policy, ee_policy=verification.ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        verifier.verify(chain[0], list(chain[1:]))
    except verification.VerificationError as exc:
        return str(exc).removeprefix("validation failed: ")
    return None


def verify_chain(
    chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate], now: datetime.datetime
) -> str | None:
    """Build a path from ``chain[0]`` through ``chain[1:]`` to one of ``anchors`` (RFC 5280 section 6).

    Signatures and CA constraints (basicConstraints, keyCertSign when keyUsage is present, path
    length, name constraints) are checked by cryptography's verifier; leaf extensions are not (see
    :func:`client_usage_problems`). Validity windows are left to :func:`validity`: each path is
    built at ``now`` moved into the window its certificates share, so that a date problem is not
    reported twice (and a chain whose certificates were never valid together passes here).

    Returns:
        None when a path exists, else the reason (the verifier's, for the first anchor tried).
    """
    candidates = [a for a in anchors if any(cert == a or issued(a, cert) for cert in chain)]
    if not chain or not candidates:
        return "no trust anchor issued a certificate of the chain"
    reasons = []
    for anchor in candidates:
        when = _check_time([*chain, anchor], now)
        reason = _build_path(chain, anchor, when) if when is not None else None
        if reason is None:
            return None
        reasons.append(reason)
    return reasons[0]


def san_names(cert: x509.Certificate) -> list[str] | None:
    """Return the DNS and IP subjectAltNames as ``DNS:name`` / ``IP:addr``, or None without the extension."""
    sans = _extension(cert, x509.SubjectAlternativeName)
    if not isinstance(sans, x509.SubjectAlternativeName):
        return None
    dns = [f"DNS:{name}" for name in sans.get_values_for_type(x509.DNSName)]
    return dns + [f"IP:{addr}" for addr in sans.get_values_for_type(x509.IPAddress)]


def _dns_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):  # RFC 6125 section 6.4.3: a whole left-most label only
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:] and "." in rest
    return pattern == host


def san_matches(cert: x509.Certificate, host: str) -> bool:
    """Return whether a subjectAltName of ``cert`` matches ``host`` (an IP literal or a DNS name).

    An IP literal matches IP SANs only, a name matches DNS SANs (``*.example`` covers one label),
    as OpenSSL's ``X509_check_ip`` / ``X509_check_host`` do for Python's ``check_hostname``.
    """
    sans = _extension(cert, x509.SubjectAlternativeName)
    if not isinstance(sans, x509.SubjectAlternativeName):
        return False
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return any(_dns_match(name, host) for name in sans.get_values_for_type(x509.DNSName))
    return ip in sans.get_values_for_type(x509.IPAddress)


def key_matches(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    """Return whether ``key`` is the private half of ``cert``'s public key."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
