"""Throw-away lab PKI: one CA and certificates for KMEs and SAEs (X.509, ECDSA P-256).

Every certificate's subject CN is the entity's ID: the KME simulator identifies a calling SAE
(ETSI GS QKD 014 section 4: mutual TLS) and a peer KME by that CN. KME certificates serve both
ways (serverAuth for SAEs and the peer KME, clientAuth toward the peer KME) and carry IP SANs
(127.0.0.1 always) plus DNS ``localhost``; SAE certificates are clientAuth only. Private keys and
the QKD link secret are written with mode 0600. For labs and tests only: no revocation, no
key protection beyond file modes.

Options shaped after deployments (all off by default; the default output is one CA signing
every leaf directly): KME server certificates without subjectAltName (the ``no-san`` KME quirk,
:mod:`qgate.kms.quirks`), SAE certificates from a second CA (``client-ca.pem``) that does not
sign the KME servers, and an intermediate CA under each root, the leaf files then holding the
chain ``leaf || intermediate`` (PEM, RFC 5246 section 7.4.2 order).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
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
CA_CN: Final = "qgate lab CA"
CLIENT_CA_CN: Final = "qgate lab client CA"
INTERMEDIATE_CN: Final = "qgate lab intermediate CA"
CLIENT_INTERMEDIATE_CN: Final = "qgate lab client intermediate CA"

_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Issuer:
    """A CA that signs leaves: its key, its certificate, and the PEM chain sent after a leaf."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain: bytes = b""


def make_pki(
    out_dir: Path,
    *,
    kmes: Mapping[str, Sequence[str]],
    saes: Sequence[str],
    force: bool = False,
    no_san_kmes: Collection[str] = (),
    client_ca: bool = False,
    intermediate: bool = False,
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
        no_san_kmes: KMEs (among ``kmes``) whose certificate has no subjectAltName at all,
            CN only (its addresses are then unused): the ``no-san`` KME quirk, where clients
            must pin the server by CN or SHA-256 fingerprint.
        client_ca: issue the SAE certificates from a second CA, ``client-ca.{pem,key}`` (CN
            CLIENT_CA_CN), instead of ``ca.pem``, which then signs the KMEs only; also writes
            ``ca-bundle.pem`` (``ca.pem`` then ``client-ca.pem``): what a KME trusts
            (``kms-sim --ca``), while SAEs trust ``ca.pem``.
        intermediate: put an intermediate CA under each root, ``intermediate.{pem,key}``
            under ``ca.pem`` (and ``client-intermediate.{pem,key}`` under ``client-ca.pem``),
            sign the leaves with it and write each ``<ID>.pem`` as the chain
            ``leaf || intermediate``; the roots then allow one intermediate (pathLen 1).

    Raises:
        ConfigError: an ID is invalid or repeated or clashes with a CA file name, a
            ``no_san_kmes`` entry is no KME, an IP address is invalid, a file exists and
            ``force`` is false, or writing fails.
    """
    ids = [*kmes, *saes]
    _check_ids(ids)
    stray = sorted(set(no_san_kmes) - set(kmes))
    if stray:
        raise ConfigError(f"no_san_kmes names no KME: {', '.join(stray)}")
    sans = {kme: _ip_sans(kme, addrs) for kme, addrs in kmes.items()}
    cas = _ca_stems(client_ca=client_ca, intermediate=intermediate)
    names = [f"{stem}{ext}" for stem in cas for ext in (".pem", ".key")] + ["link.secret"]
    names += ["ca-bundle.pem"] if client_ca else []
    clash = sorted(set(cas) & set(ids))
    if clash:
        raise ConfigError(f"IDs {', '.join(clash)} clash with the CA files of this PKI")
    names += [f"{i}{ext}" for i in ids for ext in (".pem", ".key")]
    _prepare(out_dir, names, force=force)
    now = datetime.datetime.now(datetime.UTC)
    kme_issuer, sae_issuer = _write_cas(out_dir, now, client_ca=client_ca, intermediate=intermediate)
    for entity in ids:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer = kme_issuer if entity in kmes else sae_issuer
        general = (
            None if entity not in kmes else [] if entity in no_san_kmes else _general_names(sans[entity])
        )
        cert = _leaf_certificate(entity, key.public_key(), issuer, now, general)
        pem = cert.public_bytes(serialization.Encoding.PEM) + issuer.chain
        _write(out_dir / f"{entity}.pem", pem, private=False)
        _write(out_dir / f"{entity}.key", _key_pem(key), private=True)
    _write(out_dir / "link.secret", secrets.token_bytes(LINK_SECRET_SIZE), private=True)
    log.info("lab PKI written to %s: KMEs %s, SAEs %s", out_dir, sorted(kmes), list(saes))


def _ca_stems(*, client_ca: bool, intermediate: bool) -> list[str]:
    """File stems of the CAs written (``ca`` first)."""
    stems = ["ca", *(["intermediate"] if intermediate else [])]
    if client_ca:
        stems += ["client-ca", *(["client-intermediate"] if intermediate else [])]
    return stems


def _write_cas(
    out_dir: Path, now: datetime.datetime, *, client_ca: bool, intermediate: bool
) -> tuple[_Issuer, _Issuer]:
    """Write the CAs (see :func:`make_pki`); return the issuers of the KME and the SAE leaves."""
    path_length = 1 if intermediate else 0
    root = _write_ca(out_dir, "ca", CA_CN, now, path_length=path_length)
    kme_issuer = root
    if intermediate:
        kme_issuer = _write_ca(out_dir, "intermediate", INTERMEDIATE_CN, now, parent=root)
    if not client_ca:
        return kme_issuer, kme_issuer
    client_root = _write_ca(out_dir, "client-ca", CLIENT_CA_CN, now, path_length=path_length)
    sae_issuer = client_root
    if intermediate:
        sae_issuer = _write_ca(
            out_dir, "client-intermediate", CLIENT_INTERMEDIATE_CN, now, parent=client_root
        )
    bundle = [c.public_bytes(serialization.Encoding.PEM) for c in (root.cert, client_root.cert)]
    _write(out_dir / "ca-bundle.pem", b"".join(bundle), private=False)
    return kme_issuer, sae_issuer


def _prepare(out_dir: Path, names: Sequence[str], *, force: bool) -> None:
    """Create ``out_dir``; unless ``force``, refuse when one of ``names`` exists there."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out_dir}: {exc}") from exc
    if not force:
        existing = [n for n in names if (out_dir / n).exists()]
        if existing:
            raise ConfigError(f"{out_dir}: would overwrite {', '.join(existing)} (use --force)")


def _write_ca(
    out_dir: Path,
    stem: str,
    common_name: str,
    now: datetime.datetime,
    *,
    path_length: int = 0,
    parent: _Issuer | None = None,
) -> _Issuer:
    """Make a CA (a root, or an intermediate with pathLen 0 under ``parent``); write ``<stem>.{pem,key}``."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _ca_certificate(key, now, common_name=common_name, path_length=path_length, parent=parent)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(out_dir / f"{stem}.pem", pem, private=False)
    _write(out_dir / f"{stem}.key", _key_pem(key), private=True)
    return _Issuer(key, cert, pem if parent is not None else b"")


def _check_ids(ids: Sequence[str]) -> None:
    for entity in ids:
        if not ID_PATTERN.fullmatch(entity) or entity.lower() == "ca":
            raise ConfigError(f"invalid KME/SAE ID {entity!r}: use 1-64 of A-Z a-z 0-9 _ . - (not 'ca')")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"KME and SAE IDs must be distinct: {list(ids)}")


def _ip_sans(kme: str, addrs: Sequence[str]) -> list[_IpAddress]:
    result: list[_IpAddress] = [ipaddress.IPv4Address("127.0.0.1")]
    for addr in addrs:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError as exc:
            raise ConfigError(f"KME {kme}: invalid IP address {addr!r}") from exc
        if ip not in result:
            result.append(ip)
    return result


def _general_names(ip_sans: Sequence[_IpAddress]) -> list[x509.GeneralName]:
    """subjectAltName entries of a KME: DNS ``localhost``, then its IP addresses."""
    general: list[x509.GeneralName] = [x509.DNSName("localhost")]
    return general + [x509.IPAddress(ip) for ip in ip_sans]


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    *,
    common_name: str = CA_CN,
    path_length: int = 0,
    parent: _Issuer | None = None,
) -> x509.Certificate:
    """A root CA certificate (self-signed), or an intermediate one signed by ``parent``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_name = name if parent is None else parent.cert.subject
    builder = _base_builder(name, issuer_name, key.public_key(), now)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
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
    if parent is None:
        return builder.sign(key, hashes.SHA256())
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False
    )
    return builder.sign(parent.key, hashes.SHA256())


def _leaf_certificate(
    entity: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: _Issuer,
    now: datetime.datetime,
    server_names: Sequence[x509.GeneralName] | None,
) -> x509.Certificate:
    """A leaf: a KME (``server_names`` given; empty: no subjectAltName) or an SAE (None)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, entity)])
    builder = _base_builder(subject, issuer.cert.subject, public_key, now)
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
    if server_names is not None:  # a KME: server toward SAEs and the peer, client toward the peer
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        if server_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(server_names), critical=False)
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
    )
    return builder.sign(issuer.key, hashes.SHA256())


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
