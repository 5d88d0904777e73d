"""Throw-away lab PKI: one CA and certificates for KMEs and SAEs (X.509, ECDSA P-256).

Every certificate's subject CN is the entity's ID: the KME simulator identifies a calling SAE
(ETSI GS QKD 014 section 4: mutual TLS) and a peer KME by that CN. KME certificates serve both
ways (serverAuth for SAEs and the peer KME, clientAuth toward the peer KME) and carry IP SANs
(127.0.0.1 always) plus DNS ``localhost``; SAE certificates are clientAuth only. Private keys and
the QKD link secret are written with mode 0600. For labs and tests only: no revocation, no
key protection beyond file modes.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qgate.errors import ConfigError

log = logging.getLogger(__name__)

LINK_SECRET_SIZE: Final = 32
"""Bytes of random link secret shared by the two simulated KMEs (``link.secret``)."""
CERT_LIFETIME: Final = datetime.timedelta(days=825)
"""Validity of every lab certificate (825 days, the CA/Browser Forum's old ceiling)."""
CLOCK_SKEW: Final = datetime.timedelta(days=2)
"""Certificates are valid from this long before their creation, for clock skew and steps between hosts
(a gateway whose wall clock steps back past a KME certificate's start loses its QKD keys)."""
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""KME and SAE IDs: 1-64 characters, safe in a URL path segment and as a file name."""


def make_pki(
    out_dir: Path,
    *,
    kmes: Mapping[str, Sequence[str]],
    saes: Sequence[str],
    force: bool = False,
) -> None:
    """Create a lab CA and one certificate per KME and SAE in ``out_dir``.

    Writes ``ca.pem``, ``ca.key``, ``<ID>.pem`` and ``<ID>.key`` for every ID, and
    ``link.secret`` (LINK_SECRET_SIZE random bytes, the simulated QKD link's shared secret).
    ``*.key`` and ``link.secret`` get mode 0600. The directory is created if missing.

    Args:
        out_dir: directory to write into.
        kmes: KME ID -> IP addresses (v4 or v6) for its certificate's SANs; 127.0.0.1 is always
            added.
        saes: SAE IDs.
        force: overwrite existing files instead of refusing.

    Raises:
        ConfigError: an ID is invalid or repeated, an IP address is invalid, a file exists and
            ``force`` is false, or writing fails.
    """
    ids = [*kmes, *saes]
    _check_ids(ids)
    sans = {kme: _ip_sans(kme, addrs) for kme, addrs in kmes.items()}
    names = ["ca.pem", "ca.key", "link.secret"] + [f"{i}{ext}" for i in ids for ext in (".pem", ".key")]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out_dir}: {exc}") from exc
    if not force:
        existing = [n for n in names if (out_dir / n).exists()]
        if existing:
            raise ConfigError(f"{out_dir}: would overwrite {', '.join(existing)} (use --force)")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, now)
    _write(out_dir / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out_dir / "ca.key", _key_pem(ca_key), private=True)
    for entity in ids:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf_certificate(entity, key.public_key(), ca_key, ca_cert, now, sans.get(entity))
        _write(out_dir / f"{entity}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(out_dir / f"{entity}.key", _key_pem(key), private=True)
    _write(out_dir / "link.secret", secrets.token_bytes(LINK_SECRET_SIZE), private=True)
    log.info("lab PKI written to %s: KMEs %s, SAEs %s", out_dir, sorted(kmes), list(saes))


def _check_ids(ids: Sequence[str]) -> None:
    for entity in ids:
        if not ID_PATTERN.fullmatch(entity) or entity.lower() == "ca":
            raise ConfigError(f"invalid KME/SAE ID {entity!r}: use 1-64 of A-Z a-z 0-9 _ . - (not 'ca')")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"KME and SAE IDs must be distinct: {list(ids)}")


def _ip_sans(kme: str, addrs: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    result: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ipaddress.IPv4Address("127.0.0.1")]
    for addr in addrs:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError as exc:
            raise ConfigError(f"KME {kme}: invalid IP address {addr!r}") from exc
        if ip not in result:
            result.append(ip)
    return result


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qgate lab CA")])
    builder = _base_builder(name, name, key.public_key(), now)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=False,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    return builder.sign(key, hashes.SHA256())


def _leaf_certificate(
    entity: str,
    public_key: ec.EllipticCurvePublicKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: datetime.datetime,
    ip_sans: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] | None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, entity)])
    builder = _base_builder(subject, ca_cert.subject, public_key, now)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=True,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if ip_sans is not None:  # a KME: server toward SAEs and the peer, client toward the peer
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        general: list[x509.GeneralName] = [x509.DNSName("localhost")]
        general += [x509.IPAddress(ip) for ip in ip_sans]
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
    )
    return builder.sign(ca_key, hashes.SHA256())


def _base_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CERT_LIFETIME)
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path`` (replacing it), mode 0600 if ``private`` else 0644."""
    mode = 0o600 if private else 0o644
    try:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
