"""``qgate check`` and the start of ``qgate up``: validate a policy and every file it names.

Each problem names the policy file, the line and the field that names the bad file, and all
problems are reported at once (like the policy parser's own errors). Warnings (a certificate
expiring soon, an SAE issuer this host cannot verify, a KME that cannot be reached) are listed the
same way but do not fail the check. Nothing is written; the only network use is an optional TLS
handshake with the KME to fetch its server certificate (no HTTP request, no key consumed).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from qgate.certs import (
    WARN_DAYS_DEFAULT,
    Findings,
    anchored,
    ca_problems,
    certificate_cn,
    chain_order_problems,
    client_usage_problems,
    describe,
    key_matches,
    load_pem_bundle,
    normalize_fingerprint,
    san_matches,
    san_names,
    server_usage_problems,
    sha256_fingerprint,
    validity,
    verify_chain,
)
from qgate.errors import ConfigError, PolicyError
from qgate.keyfiles import load_identity, load_peer_public_key, load_ppk
from qgate.kms.tls import SECURE_TLS12_CIPHERS, TLS_VERSIONS, classify
from qgate.policy import GatewayPolicy, KmePolicy, PeerPolicy, PpkPolicy, load_policy
from qgate.policy_schema import PolicyYamlLoader
from qgate.privileges import check_file_safety

__all__ = [
    "WARN_DAYS_DEFAULT",
    "CheckFailed",
    "CheckSummary",
    "certificate_cn",
    "check_kme_credentials",
    "check_policy_file",
    "fetch_server_chain",
    "field_lines",
]


@dataclass
class CheckSummary:
    """What ``check_policy_file`` found: the policy, a line per verified item, and the warnings."""

    policy: GatewayPolicy
    items: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable lines, one per check passed."""
        return [f"ok: {item}" for item in self.items] + [f"{self.policy.source}: policy is valid"]

    def as_dict(self) -> dict[str, object]:
        """JSON-able summary."""
        return {
            "policy": str(self.policy.source),
            "gateway": self.policy.name,
            "peers": [p.name for p in self.policy.peers],
            "checks": self.items,
            "warnings": self.warnings,
        }


class CheckFailed(PolicyError):
    """The policy's files are unusable; ``warnings`` holds what was found besides the problems.

    Attributes:
        warnings: rendered warning lines (``file:line: field: message``), possibly empty.
    """

    def __init__(
        self, message: str, *, file: Path, problems: list[tuple[int | None, str, str]], warnings: list[str]
    ) -> None:
        super().__init__(message, file=file, problems=problems)
        self.warnings = warnings


def field_lines(text: str) -> dict[str, int]:
    """Map dotted YAML paths (``peers[0].public_key``) to their 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    walk(value, f"{path}.{key.value}" if path else str(key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    try:
        root = yaml.compose(text, Loader=PolicyYamlLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


@dataclass
class _Report:
    """Problems (``errors``) and ``warnings`` found so far, each as ``(field, message)``."""

    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, prefix: str, found: Findings) -> None:
        self.errors += [(where, f"{prefix}: {message}") for message in found.errors]
        self.warnings += [(where, f"{prefix}: {message}") for message in found.warnings]


def _read_certificates(where: str, path: Path, report: _Report) -> list[x509.Certificate]:
    try:
        return load_pem_bundle(path.read_bytes())
    except OSError as exc:
        report.errors.append((where, f"{path}: cannot read: {exc.strerror or exc}"))
    except ValueError:
        report.errors.append((where, f"{path}: not a PEM file of X.509 certificates"))
    return []


def _label(kind: str, certs: list[x509.Certificate], i: int) -> str:
    number = f" {i + 1} of {len(certs)}" if len(certs) > 1 else ""
    return f"{kind}{number} ({describe(certs[i])})"


def _check_ca_file(
    where: str, path: Path, now: datetime, warn_days: int, report: _Report
) -> list[x509.Certificate]:
    """Check a PEM bundle of trust anchors: every certificate a CA, inside its validity window."""
    certs = _read_certificates(where, path, report)
    for i, cert in enumerate(certs):
        label = _label("CA", certs, i)
        report.errors += [(where, f"{path}: {label}: {problem}") for problem in ca_problems(cert)]
        report.add(where, f"{path}: {label}", validity(cert, now, warn_days))
    return certs


def _check_sae_chain(
    kme: KmePolicy, now: datetime, warn_days: int, report: _Report
) -> list[x509.Certificate]:
    """Check ``kme.cert``: leaf (CN = sae_id, client usages) then intermediates, in order, in date."""
    chain = _read_certificates("kme.cert", kme.cert, report)
    for i, cert in enumerate(chain):
        label = f"SAE certificate ({describe(cert)})" if i == 0 else _label("intermediate", chain[1:], i - 1)
        problems = client_usage_problems(cert) if i == 0 else ca_problems(cert)
        report.errors += [("kme.cert", f"{kme.cert}: {label}: {problem}") for problem in problems]
        report.add("kme.cert", f"{kme.cert}: {label}", validity(cert, now, warn_days))
    if chain and certificate_cn(chain[0]) != kme.sae_id:
        cn = certificate_cn(chain[0])
        report.errors.append(("kme.cert", f"{kme.cert}: subject CN {cn!r} is not kme.sae_id {kme.sae_id!r}"))
    report.errors += [("kme.cert", f"{kme.cert}: {problem}") for problem in chain_order_problems(chain)]
    return chain


def _check_sae_issuer(
    kme: KmePolicy,
    chain: list[x509.Certificate],
    anchors: list[x509.Certificate],
    now: datetime,
    report: _Report,
) -> str:
    """Verify ``kme.cert`` up to ``kme.client_ca`` when set, else ``kme.ca``; describe the outcome."""
    client_ca = kme.client_ca
    source = f"kme.client_ca ({client_ca})" if client_ca is not None else f"kme.ca ({kme.ca})"
    if not chain or not anchors:
        return "not verified"  # the unreadable file is already reported
    if not anchored(chain, anchors):
        issuer = chain[-1].issuer.rfc4514_string()
        if client_ca is not None:
            report.errors.append(("kme.cert", f"{kme.cert}: issuer {issuer} is not a CA in {source}"))
        else:
            report.warnings.append(
                (
                    "kme.cert",
                    f"{kme.cert}: issuer {issuer} cannot be verified locally: no CA in {source} issued it;"
                    " if the KME trusts a separate client CA, set kme.client_ca to it",
                )
            )
        return "issuer not verified locally"
    reason = verify_chain(chain, anchors, now)
    if reason is not None:
        report.errors.append(("kme.cert", f"{kme.cert}: does not verify against {source}: {reason}"))
    return f"verified against {source}"


def _check_sae_key(kme: KmePolicy, leaf: x509.Certificate | None, report: _Report) -> None:
    try:
        key = serialization.load_pem_private_key(kme.key.read_bytes(), password=None)
    except OSError as exc:
        report.errors.append(("kme.key", f"{kme.key}: cannot read: {exc.strerror or exc}"))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        report.errors.append(("kme.key", f"{kme.key}: not an unencrypted PEM private key"))
    else:
        if leaf is not None and not key_matches(leaf, key):
            report.errors.append(("kme.key", f"{kme.key}: does not belong to the certificate {kme.cert}"))


def _check_kme_files(
    kme: KmePolicy, now: datetime, warn_days: int, report: _Report
) -> tuple[list[str], list[x509.Certificate]]:
    """Check the SAE credentials and trust anchors.

    Returns:
        The ``ok`` lines (meaningful when ``report`` has no errors) and the certificates of ``kme.ca``.
    """
    ca = _check_ca_file("kme.ca", kme.ca, now, warn_days, report)
    client_ca = kme.client_ca
    anchors = ca if client_ca is None else _check_ca_file("kme.client_ca", client_ca, now, warn_days, report)
    chain = _check_sae_chain(kme, now, warn_days, report)
    outcome = _check_sae_issuer(kme, chain, anchors, now, report)
    _check_sae_key(kme, chain[0] if chain else None, report)
    items = [f"KME CA {kme.ca} ({', '.join(describe(cert) for cert in ca)})"]
    if client_ca is not None:
        items.append(f"SAE client CA {client_ca} ({', '.join(describe(cert) for cert in anchors)})")
    if chain:
        extra = f", {len(chain) - 1} intermediate(s)" if len(chain) > 1 else ""
        items.append(
            f"SAE certificate {kme.cert} (CN={kme.sae_id}{extra}, issued by"
            f" {chain[-1].issuer.rfc4514_string()}, {outcome}; until {chain[0].not_valid_after_utc:%Y-%m-%d})"
        )
    return items, ca


def fetch_server_chain(kme: KmePolicy) -> list[x509.Certificate]:
    """Do a TLS handshake with the KME at ``kme.url`` and return the certificates it sent, leaf first.

    Nothing is verified here (``CERT_NONE``, for this fetch only: the caller verifies with
    cryptography) and no HTTP request is sent, so no key is consumed. The policy's TLS versions
    and TLS 1.2 ciphers (``kme.tls_min_version``, ``kme.tls_ciphers``) are offered, as the gateway
    would. The SAE certificate and key are presented when they load (a KME asking for a client
    certificate may refuse the handshake without).

    Raises:
        OSError: the KME cannot be reached, or the TLS handshake failed (``ssl.SSLError``).
        ValueError: the URL has no host or an invalid port.
    """
    parts = urlsplit(kme.url)
    host, port = parts.hostname, parts.port or 443
    if not host:
        raise ValueError(f"no host in {kme.url!r}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = TLS_VERSIONS[kme.tls_min_version]
    with contextlib.suppress(ssl.SSLError):  # a cipher list that selects nothing fails the policy load
        context.set_ciphers(kme.tls_ciphers or SECURE_TLS12_CIPHERS)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # fetch only; verified below with cryptography
    with contextlib.suppress(OSError, ssl.SSLError):  # an unusable cert/key is reported by the file checks
        context.load_cert_chain(certfile=str(kme.cert), keyfile=str(kme.key))
    sni = kme.server_name or (None if _is_ip(host) else host)
    with (
        socket.create_connection((host, port), timeout=kme.timeout) as raw,
        context.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        return _unverified_chain(tls)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _unverified_chain(tls: ssl.SSLSocket) -> list[x509.Certificate]:
    """The certificates the server sent: Python 3.13's public API, its private 3.10-3.12 form, or the leaf."""
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the KME sent no certificate")
    leaf = x509.load_der_x509_certificate(der)
    getter = getattr(tls, "get_unverified_chain", None) or getattr(
        getattr(tls, "_sslobj", None), "get_unverified_chain", None
    )
    try:
        sent = [
            x509.load_der_x509_certificate(item)
            if isinstance(item, bytes)
            else x509.load_pem_x509_certificate(str(item.public_bytes()).encode())
            for item in (getter() if callable(getter) else [])
        ]
    except (ValueError, TypeError, AttributeError):
        sent = []
    return sent if sent and sent[0] == leaf else [leaf]


def _check_server_name(kme: KmePolicy, server: x509.Certificate, label: str, report: _Report) -> str:
    """Check that the client can verify ``server`` as configured: a pin, or a SAN for the host."""
    pin_cn, pin_sha = kme.server_cn, kme.server_sha256
    server_name = kme.server_name
    host = server_name or urlsplit(kme.url).hostname or ""
    if pin_cn is not None and certificate_cn(server) != pin_cn:
        seen = certificate_cn(server)
        report.errors.append(("kme.server_cn", f"{label}: CN is {seen!r}, expected kme.server_cn {pin_cn!r}"))
    if pin_sha is not None and normalize_fingerprint(pin_sha) != sha256_fingerprint(server):
        report.errors.append(
            (
                "kme.server_sha256",
                f"{label}: SHA-256 is {sha256_fingerprint(server)}, expected kme.server_sha256 {pin_sha}",
            )
        )
    if pin_cn is not None or pin_sha is not None:
        return "pinned by " + " and ".join(n for n, v in (("CN", pin_cn), ("SHA-256", pin_sha)) if v)
    if not san_matches(server, host):
        names = san_names(server)
        has = (
            f"it has {', '.join(names) or 'an empty subjectAltName'}"
            if names is not None
            else "no subjectAltName"
        )
        report.errors.append(
            (
                "kme.server_name" if server_name else "kme.url",
                f"{label}: no SAN matches {host} ({has}): hostname verification can never succeed;"
                " pin it with kme.server_cn or kme.server_sha256",
            )
        )
    return f"SAN matches {host}"


def _check_server(
    kme: KmePolicy, anchors: list[x509.Certificate], now: datetime, warn_days: int, report: _Report
) -> list[str]:
    """Fetch the KME's server certificate (TLS handshake only) and check it; return the ``ok`` line."""
    try:
        chain = fetch_server_chain(kme)
    except ssl.SSLError as exc:  # the handshake failed the way the gateway's would: name the cause
        tls = classify(exc, expected_name=kme.server_name or "", cert=kme.cert, handshake_done=False)
        report.errors.append(
            ("kme.url", f"TLS handshake with {kme.url} failed ({tls.cause}): {tls.text}; "
             "`qgate kme probe` shows what the KME offers")
        )  # fmt: skip
        return []
    except (OSError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        report.warnings.append(
            ("kme.url", f"cannot fetch the KME server certificate from {kme.url} ({reason}); not checked")
        )
        return []
    server = chain[0]
    label = f"KME server certificate of {kme.url} ({describe(server)})"
    report.add("kme.url", label, validity(server, now, warn_days))
    report.errors += [("kme.url", f"{label}: {problem}") for problem in server_usage_problems(server)]
    if anchors and not anchored(chain, anchors):
        issuer = chain[-1].issuer.rfc4514_string()
        report.errors.append(("kme.ca", f"{label}: issuer {issuer} is not a CA in kme.ca ({kme.ca})"))
    elif anchors and (failure := verify_chain(chain, anchors, now)) is not None:
        report.errors.append(("kme.ca", f"{label}: does not verify against kme.ca ({kme.ca}): {failure}"))
    how = _check_server_name(kme, server, label, report)
    return [f"{label}: verified against kme.ca, {how}; until {server.not_valid_after_utc:%Y-%m-%d}"]


def _check_permissions(policy: GatewayPolicy) -> list[tuple[str, str]]:
    """Private keys no one else may read; pins and certificates no one else may replace."""
    files = [("gateway.identity", policy.identity, True), ("kme.key", policy.kme.key, True)]
    files += [("kme.cert", policy.kme.cert, False), ("kme.ca", policy.kme.ca, False)]
    client_ca = policy.kme.client_ca
    files += [("kme.client_ca", client_ca, False)] if client_ca is not None else []
    files += [(f"peers[{i}].public_key", p.public_key, False) for i, p in enumerate(policy.peers)]
    files += [(f"peers[{i}].ppk.file", p.ppk.file, True) for i, p in enumerate(policy.peers) if p.ppk]
    user = os.geteuid() if os.geteuid() != 0 else None
    return [
        (where, warning)
        for where, path, secret in files
        if path.exists()
        for warning in check_file_safety(path, secret=secret, run_user=user)
    ]


def _check_ppk(peer: str, ppk: PpkPolicy) -> str:
    """Load the PPK file (32-64 bytes) and describe it without its bytes."""
    size = len(load_ppk(ppk.file))
    mandatory = ", mandatory" if ppk.mandatory else ""
    return f"peer {peer}: PPK {ppk.id!r} {ppk.file} ({size} bytes{mandatory})"


def _check_keys(policy: GatewayPolicy, summary: CheckSummary, report: _Report) -> None:
    """Load the identity, every pinned peer key and every PPK."""

    def attempt(where: str, action: Callable[[], str]) -> None:
        try:
            summary.items.append(action())
        except ConfigError as exc:
            report.errors.append((where, str(exc)))

    own: list[str] = []

    def identity() -> str:
        key = load_identity(policy.identity)
        own.append(key.public_key().fingerprint())
        return f"identity {policy.identity} ({key.alg}, {key.public_key().fingerprint()})"

    attempt("gateway.identity", identity)
    for i, peer in enumerate(policy.peers):

        def pinned(peer: PeerPolicy = peer) -> str:
            key = load_peer_public_key(peer.public_key)
            if key.fingerprint() in own:
                raise ConfigError(
                    f"{peer.public_key}: this is this gateway's own identity key, not the peer's"
                )
            return f"peer {peer.name}: pinned key {peer.public_key} ({key.alg}, {key.fingerprint()})"

        attempt(f"peers[{i}].public_key", pinned)
        if peer.ppk is not None:
            attempt(f"peers[{i}].ppk.file", functools.partial(_check_ppk, peer.name, peer.ppk))


def _where(file: Path | None, lines: dict[str, int], name: str) -> str:
    """Render ``file:line: field`` as ``PolicyError`` does."""
    place = str(file) if file is not None else "<policy>"
    line = lines.get(name)
    return f"{place}:{line}: {name}" if line is not None else f"{place}: {name}"


def _finish(file: Path | None, report: _Report) -> list[str]:
    """Return the rendered warnings, or raise ``CheckFailed`` listing every problem.

    Raises:
        CheckFailed: ``report`` holds errors (sorted by policy line; warnings attached).
    """
    try:
        lines = field_lines(file.read_text(encoding="utf-8-sig")) if file is not None else {}
    except (OSError, UnicodeDecodeError):
        lines = {}
    ordered = sorted(report.warnings, key=lambda w: lines.get(w[0], 0))
    warnings = [f"{_where(file, lines, where)}: {message}" for where, message in ordered]
    if report.errors:
        raise CheckFailed(
            "files named by the policy are unusable",
            file=file or Path("<policy>"),
            problems=sorted(
                ((lines.get(where), where, message) for where, message in report.errors),
                key=lambda p: p[0] or 0,
            ),
            warnings=warnings,
        )
    return warnings


def check_policy_file(
    path: Path, *, connect: bool = False, warn_days: int = WARN_DAYS_DEFAULT, now: datetime | None = None
) -> CheckSummary:
    """Parse the policy at ``path`` and check the identity, pinned keys, PPKs and TLS files it names.

    Args:
        path: the policy file.
        connect: also fetch the KME's server certificate (one TLS handshake to ``kme.url``, no HTTP
            request) and check it; an unreachable KME is a warning.
        warn_days: certificates expiring within this many days get a warning.
        now: the time to check validity windows at (default: the current UTC time).

    Returns:
        The summary, with warnings.

    Raises:
        PolicyError: the policy is invalid.
        CheckFailed: a file it names is missing, unreadable or does not fit (every problem listed
            with the policy file, line and field; warnings attached).
    """
    policy = load_policy(path)
    now = now or datetime.now(UTC)
    summary = CheckSummary(policy)
    report = _Report()
    _check_keys(policy, summary, report)
    tls_items, ca = _check_kme_files(policy.kme, now, warn_days, report)
    if connect:
        tls_items += _check_server(policy.kme, ca, now, warn_days, report)
    report.errors.extend(_check_permissions(policy))
    summary.warnings = _finish(path, report)
    summary.items += tls_items
    return summary


def check_kme_credentials(
    policy: GatewayPolicy, *, warn_days: int = WARN_DAYS_DEFAULT, now: datetime | None = None
) -> list[str]:
    """Check the SAE certificate, key and CA files as ``qgate check`` does, without the network.

    ``qgate up`` runs this at start: milliseconds (a few files, no handshake).

    Returns:
        The warnings (``file:line: field: message``), e.g. a certificate expiring within ``warn_days``.

    Raises:
        CheckFailed: a certificate is expired or not yet valid, the key does not match, a file is
            unreadable... (the same messages as ``qgate check``).
    """
    report = _Report()
    _check_kme_files(policy.kme, now or datetime.now(UTC), warn_days, report)
    return _finish(policy.source, report)
