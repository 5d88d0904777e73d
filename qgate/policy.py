"""YAML policy -> validated, frozen policy objects; every error names the file, line and field.

The dataclasses below are the contract the rest of qgate uses. Paths in a policy file are
resolved relative to the directory of that file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qgate import constants as C

KemName = Literal["ml-kem-768", "ml-kem-1024"]
FailMode = Literal["qkd_and_pqc", "pqc_only_if_qkd_down"]
QkdRole = Literal["master", "slave"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Endpoint:
    """A UDP or HTTPS endpoint: literal IP address (v4 or v6) and port (1-65535)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TunPolicy:
    """The TUN device: name (1-15 chars), optional address, inner MTU in bytes (576-9000)."""

    name: str = "qg0"
    address: IPInterface | None = None
    mtu: int = C.DEFAULT_TUN_MTU


@dataclass(frozen=True)
class KmePolicy:
    """The local KME (ETSI GS QKD 014) and this gateway's SAE credentials.

    Attributes:
        url: base URL, ``https://host:port`` (the API lives under /api/v1/keys).
        sae_id: this gateway's SAE ID; must equal the subject CN of ``cert``.
        ca: PEM file of the CA that signed the KME's server certificate.
        cert: PEM client certificate of this SAE.
        key: PEM private key of ``cert``.
        timeout: seconds per HTTPS request (0.1-60, default 5).
    """

    url: str
    sae_id: str
    ca: Path
    cert: Path
    key: Path
    timeout: float = 5.0


@dataclass(frozen=True)
class RekeyPolicy:
    """Rekey timing, all in seconds.

    Attributes:
        interval: QKD ratchet step period (0.1-86400, default 10).
        kem_interval: full ML-KEM handshake period (>= interval, default 120).
        max_key_age: hard lifetime of a traffic key (> interval, default 3 x interval).
    """

    interval: float = C.REKEY_INTERVAL_DEFAULT
    kem_interval: float = C.KEM_INTERVAL_DEFAULT
    max_key_age: float = 3 * C.REKEY_INTERVAL_DEFAULT


@dataclass(frozen=True)
class PeerPolicy:
    """One peer gateway.

    Attributes:
        name: a label for logs (1-32 chars of [A-Za-z0-9_.-]).
        public_key: PEM file of the peer's pinned ML-DSA identity public key.
        endpoint: the peer's UDP address and port on the WAN.
        sae_id: the peer's SAE ID at its KME.
        qkd_role: this gateway's SAE role toward this peer: ``master`` calls enc_keys and
            starts every handshake; ``slave`` calls dec_keys and answers.
        subnets: the peer's inner networks: routed into the tunnel, and the only source
            addresses accepted from this peer.
        kem: ML-KEM parameter set for the handshake (FIPS 203).
        x25519: also mix an X25519 secret into each handshake (default true).
        fail_mode: what happens when QKD keys stop (only ``qkd_and_pqc``, fail closed, in v1).
        qkd_key_bits: bits of QKD key per rekey (ETSI 014 ``size``, 64-4096, multiple of 8).
        rekey: timing.
    """

    name: str
    public_key: Path
    endpoint: Endpoint
    sae_id: str
    qkd_role: QkdRole
    subnets: tuple[IPNetwork, ...]
    kem: KemName = "ml-kem-768"
    x25519: bool = True
    fail_mode: FailMode = "qkd_and_pqc"
    qkd_key_bits: int = C.QKD_KEY_BITS_DEFAULT
    rekey: RekeyPolicy = field(default_factory=RekeyPolicy)


@dataclass(frozen=True)
class GatewayPolicy:
    """A whole policy file.

    Attributes:
        name: this gateway's label for logs.
        identity: PEM file of this gateway's ML-DSA private key (``qgate keygen``).
        listen: UDP address and port the gateway binds on the WAN.
        tun: the TUN device.
        kme: the local KME.
        peers: one or more peers (v1 gateways run with exactly one or more; subnets must not overlap).
        source: the policy file this was read from.
    """

    name: str
    identity: Path
    listen: Endpoint
    tun: TunPolicy
    kme: KmePolicy
    peers: tuple[PeerPolicy, ...]
    source: Path | None = None
