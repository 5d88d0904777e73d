"""What a protocol engine asks its adapter to do, its settings and its counters (frozen dataclasses).

The engine (``qgate.protocol.peer.Peer``) never performs I/O: it returns these actions from
``take_actions()`` and the adapter (``qgate.gateway``) carries them out and reports back
(``keys_fetched`` / ``keys_failed`` / ``kme_observed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qgate.crypto.kem import KemAlgorithm
from qgate.crypto.secret import Secret


@dataclass(frozen=True)
class PeerConfig:
    """What the state machine needs from the policy (``qgate.policy.PeerPolicy``).

    Attributes:
        ppk: the post-quantum preshared key (32-64 bytes, RFC 8784 style) or None.
        ppk_id: the PPK's public name (printable ASCII, sent in M1); "" without a PPK.
        ppk_mandatory: refuse any handshake that does not use this PPK (RFC 8784 section 3).
    """

    name: str
    role: Literal["master", "slave"]
    my_sae: str
    peer_sae: str
    kem: KemAlgorithm
    x25519: bool
    qkd_bits: int
    interval: float
    kem_interval: float
    max_key_age: float
    fail_mode: Literal["qkd_and_pqc", "pqc_only_if_qkd_down"] = "qkd_and_pqc"
    ppk: Secret | None = field(default=None, repr=False)
    ppk_id: str = ""
    ppk_mandatory: bool = False

    @property
    def may_degrade(self) -> bool:
        """Whether the policy allows a handshake without a QKD key when this side's KME fails."""
        return self.fail_mode == "pqc_only_if_qkd_down"


@dataclass(frozen=True)
class SendDatagram:
    """Send ``data`` to the peer's configured endpoint (never to another address)."""

    data: bytes


@dataclass(frozen=True)
class FetchEncKeys:
    """Master: call ETSI 014 enc_keys for ``number`` keys of ``size_bits``; answer with keys_fetched."""

    request_id: int
    number: int
    size_bits: int


@dataclass(frozen=True)
class FetchDecKeys:
    """Slave: call ETSI 014 dec_keys for ``key_ids``; answer with keys_fetched."""

    request_id: int
    key_ids: tuple[str, ...]


@dataclass(frozen=True)
class ProbeKme:
    """Ask this side's own KME for its status (ETSI 014 section 5.1); answer with ``kme_observed``.

    Emitted when a degraded handshake needs local evidence that QKD keys are down.
    """


@dataclass(frozen=True)
class PeerEvent:
    """Something worth a log line or audit record (never key bytes).

    Kinds starting with ``unauth_`` report input that did not authenticate; the adapter
    aggregates them instead of writing one record each.
    """

    kind: str
    detail: dict[str, str | int | float] = field(default_factory=dict)


Action = SendDatagram | FetchEncKeys | FetchDecKeys | ProbeKme | PeerEvent


@dataclass
class ControlStats:
    """Key-management counters of one peer (docs/protocol.md section 4.4)."""

    handshakes: int = 0
    rekeys_qkd: int = 0
    rekeys_kem: int = 0
    handshake_failures: int = 0
    auth_failures: int = 0
    malformed_messages: int = 0
    qkd_failures: int = 0
    kicks_sent: int = 0
    kicks_ignored: int = 0
    degraded_handshakes: int = 0
    degrade_refused: int = 0
    mode_changes: int = 0
    drops_mac1: int = 0
    drops_mac2: int = 0
    drops_budget: int = 0
    stale_challenges: int = 0
    retries_sent: int = 0
    retries_received: int = 0
    retries_unmatched: int = 0
    session_requests: int = 0
