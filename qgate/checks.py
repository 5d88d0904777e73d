"""``qgate check``: validate a policy and every file it names, with no side effects.

Each problem names the policy file, the line and the field that names the bad file, and all
problems are reported at once (like the policy parser's own errors).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from qgate.errors import ConfigError, PolicyError
from qgate.keyfiles import load_identity, load_peer_public_key, load_ppk
from qgate.policy import GatewayPolicy, PeerPolicy, PpkPolicy, load_policy
from qgate.policy_schema import PolicyYamlLoader
from qgate.privileges import check_file_safety


@dataclass
class CheckSummary:
    """What ``check_policy_file`` found: the policy and a line per verified item."""

    policy: GatewayPolicy
    items: list[str] = field(default_factory=list)

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
        }


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


def certificate_cn(cert: x509.Certificate) -> str | None:
    """Return the subject CN of ``cert``, or None."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM X.509 certificate") from exc


def _check_tls(policy: GatewayPolicy) -> list[tuple[str, str]]:
    """Check the SAE credentials: CA is a CA, cert issued by it with CN = sae_id, key matches."""
    kme, problems = policy.kme, []
    try:
        ca = _load_cert(kme.ca)
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            problems.append(("kme.ca", f"{kme.ca}: not a CA certificate"))
    except ConfigError as exc:
        return [("kme.ca", str(exc))]
    except x509.ExtensionNotFound:
        problems.append(("kme.ca", f"{kme.ca}: not a CA certificate (no basicConstraints)"))
    try:
        cert = _load_cert(kme.cert)
    except ConfigError as exc:
        return [*problems, ("kme.cert", str(exc))]
    if certificate_cn(cert) != kme.sae_id:
        problems.append(
            ("kme.cert", f"{kme.cert}: subject CN {certificate_cn(cert)!r} is not kme.sae_id {kme.sae_id!r}")
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        problems.append(("kme.cert", f"{kme.cert}: not issued by the CA in kme.ca ({kme.ca})"))
    try:
        key = serialization.load_pem_private_key(kme.key.read_bytes(), password=None)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, spki) != cert.public_key().public_bytes(
            serialization.Encoding.DER, spki
        ):
            problems.append(("kme.key", f"{kme.key}: does not belong to the certificate {kme.cert}"))
    except OSError as exc:
        problems.append(("kme.key", f"{kme.key}: cannot read: {exc.strerror or exc}"))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        problems.append(("kme.key", f"{kme.key}: not an unencrypted PEM private key"))
    return problems


def _check_permissions(policy: GatewayPolicy) -> list[tuple[str, str]]:
    """Private keys no one else may read; pins and certificates no one else may replace."""
    files = [("gateway.identity", policy.identity, True), ("kme.key", policy.kme.key, True)]
    files += [("kme.cert", policy.kme.cert, False), ("kme.ca", policy.kme.ca, False)]
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


def check_policy_file(path: Path) -> CheckSummary:
    """Parse the policy at ``path`` and check the identity, pinned keys, PPKs and TLS files it names.

    Raises:
        PolicyError: the policy is invalid, or a file it names is missing, unreadable or does
            not fit (every problem listed with the policy file, line and field).
    """
    policy = load_policy(path)
    summary = CheckSummary(policy)
    problems: list[tuple[str, str]] = []

    def attempt(where: str, action: Callable[[], str]) -> None:
        try:
            summary.items.append(action())
        except ConfigError as exc:
            problems.append((where, str(exc)))

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
    problems.extend(_check_tls(policy))
    problems.extend(_check_permissions(policy))
    if problems:
        try:
            lines = field_lines(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError):
            lines = {}
        raise PolicyError(
            "files named by the policy are unusable",
            file=path,
            problems=sorted(
                ((lines.get(where), where, message) for where, message in problems), key=lambda p: p[0] or 0
            ),
        )
    summary.items.append(
        f"SAE certificate {policy.kme.cert} (CN={policy.kme.sae_id}, issued by {policy.kme.ca})"
    )
    return summary
