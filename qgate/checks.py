"""``qgate check``: validate a policy and every file it names, with no side effects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from qgate.errors import ConfigError
from qgate.keyfiles import load_identity, load_peer_public_key
from qgate.policy import GatewayPolicy, load_policy


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


def certificate_cn(path: Path) -> str:
    """Return the subject CN of the PEM certificate at ``path``.

    Raises:
        ConfigError: unreadable file, not a PEM certificate, or no CN.
    """
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read certificate: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM X.509 certificate") from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ConfigError(f"{path}: certificate has no subject CN")
    return str(names[0].value)


def _readable(path: Path, what: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc


def check_policy_file(path: Path) -> CheckSummary:
    """Parse the policy at ``path`` and check the identity, pinned keys and TLS files it names.

    Raises:
        PolicyError: the policy itself is invalid (every problem listed, with lines).
        ConfigError: a named file is missing, unreadable or does not match the policy.
    """
    policy = load_policy(path)
    summary = CheckSummary(policy)
    identity = load_identity(policy.identity)
    summary.items.append(
        f"identity {policy.identity} ({identity.alg}, {identity.public_key().fingerprint()})"
    )
    for peer in policy.peers:
        key = load_peer_public_key(peer.public_key)
        summary.items.append(
            f"peer {peer.name}: pinned key {peer.public_key} ({key.alg}, {key.fingerprint()})"
        )
    kme = policy.kme
    _readable(kme.ca, "CA certificate")
    _readable(kme.key, "SAE private key")
    cn = certificate_cn(kme.cert)
    if cn != kme.sae_id:
        raise ConfigError(f"{kme.cert}: certificate CN {cn!r} differs from kme.sae_id {kme.sae_id!r}")
    summary.items.append(f"SAE certificate {kme.cert} (CN={cn})")
    return summary
