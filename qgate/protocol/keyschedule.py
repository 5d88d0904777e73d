"""qgate's key schedule: the labelled derivation tree of docs/protocol.md (Key schedule).

::

    handshake (label KS-HS):
      KM(176) = CatKDF-HKDF-SHA-384(                       ETSI TS 103 744 section 8.2.3
                  psk     = PPK or empty                     (RFC 8784 style, policy peers[].ppk)
                  secrets = [ML-KEM ss, QKD key | anchor ck, X25519 ss]
                            (ML-KEM first: SP 800-56C r2 Z' = Z || T; a degraded handshake puts the
                             anchor chaining key (KS-AN) where the QKD key goes, or nothing)
                  label_a = "qgate v2 master", label_b = "qgate v2 slave",
                  info    = "qgate v2 handshake" || mode(1) || th(48) || str8(master SAE) || str8(slave SAE),
                  msg_a   = M1.ek || M1.x25519_pub, msg_b = M2.ct || M2.x25519_pub)
      k_m2s(32) || k_s2m(32) || ck(48) || kc_m(32) || kc_s(32) = KM

    anchor id (label KS-AN):  anchor_id(16) = HKDF-Expand-SHA-384(ck, "qgate v2 anchor id", 16)

    ratchet auth (label KS-RA):  k_auth(32) = HKDF-Expand-SHA-384(ck_n, "qgate v2 ratchet auth", 32)

    ratchet step (label KS-RS):                             qgate's own chaining (not TS 103 744 CasKDF)
      prk = HKDF-Extract-SHA-384(salt = ck_n, ikm = QKD key)
      KM(176) = HKDF-Expand-SHA-384(prk, "qgate v2 ratchet" || u32(epoch n+1) || SHA-384(R1 w/o mac), 176)
      k_m2s || k_s2m || ck_{n+1} || kc_m || kc_s = KM

    confirmation (label KS-KC): HMAC-SHA-384(kc, label || transcript)[:32]

Traffic keys are per direction: the master seals with k_m2s and opens with k_s2m; the slave
the other way round. Sans-I/O: everything here is a pure function of its inputs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from qgate.constants import AEAD_KEY_SIZE, CONFIRM_SIZE, HASH_SIZE
from qgate.crypto.combiner import cat_kdf, hkdf, hkdf_expand
from qgate.crypto.secret import Secret
from qgate.protocol.codec import Writer

LABEL_MASTER: Final = b"qgate v2 master"
LABEL_SLAVE: Final = b"qgate v2 slave"
INFO_HANDSHAKE: Final = b"qgate v2 handshake"
INFO_ANCHOR_ID: Final = b"qgate v2 anchor id"
INFO_RATCHET: Final = b"qgate v2 ratchet"
INFO_RATCHET_AUTH: Final = b"qgate v2 ratchet auth"
INFO_SESSION_MAC2: Final = b"qgate v2 session mac2"
SIG_M1: Final = b"qgate v2 M1 signature"
SIG_M2: Final = b"qgate v2 M2 signature"
SIG_KICK: Final = b"qgate v2 kick signature"
CONFIRM_M2: Final = b"qgate v2 M2 confirm"
CONFIRM_M3: Final = b"qgate v2 M3 confirm"
MAC_R1: Final = b"qgate v2 R1 mac"
CONFIRM_R2: Final = b"qgate v2 R2 confirm"
CONFIRM_R3: Final = b"qgate v2 R3 confirm"

MODE_HYBRID: Final = 0
"""KS-HS mode byte: a QKD key is the second component."""
MODE_ANCHORED: Final = 1
"""KS-HS mode byte: degraded, the anchor chaining key (an earlier QKD-backed epoch) is the second."""
MODE_BARE: Final = 2
"""KS-HS mode byte: degraded with no shared earlier key (first start or after a restart)."""

KEY_MATERIAL_SIZE: Final = 2 * AEAD_KEY_SIZE + HASH_SIZE + 2 * CONFIRM_SIZE
"""Bytes of key material per derivation: two traffic keys, chaining key, two confirm keys (176)."""


@dataclass(frozen=True, repr=False)
class EpochKeys:
    """The keys of one epoch; every field is secret."""

    k_m2s: Secret
    k_s2m: Secret
    chaining_key: Secret
    kc_master: Secret
    kc_slave: Secret

    def __repr__(self) -> str:
        return "EpochKeys(<SECRET>)"


def _split(km: bytes) -> EpochKeys:
    a, c = AEAD_KEY_SIZE, CONFIRM_SIZE
    parts = (a, a, HASH_SIZE, c, c)
    out: list[Secret] = []
    pos = 0
    for size in parts:
        out.append(Secret(km[pos : pos + size]))
        pos += size
    return EpochKeys(*out)


def transcript_hash(*parts: bytes) -> bytes:
    """Return SHA-384 over the concatenation of ``parts`` (48 bytes)."""
    h = hashlib.sha384()
    for part in parts:
        h.update(part)
    return h.digest()


def handshake_keys(
    components: Sequence[Secret],
    *,
    transcript: bytes,
    master_sae: str,
    slave_sae: str,
    msg_master: bytes,
    msg_slave: bytes,
    mode: int = MODE_HYBRID,
    ppk: Secret | None = None,
) -> EpochKeys:
    """Derive an epoch's keys from a full handshake (label KS-HS).

    Args:
        components: in this order: ML-KEM shared secret (32); the QKD key (qkd_bits/8) in mode
            MODE_HYBRID, or the anchor chaining key (48) in MODE_ANCHORED, or nothing in
            MODE_BARE; and the X25519 shared secret (32) when X25519 is on.
        transcript: SHA-384 transcript hash ``th`` (48 bytes) over M1 and M2 before its confirm.
        master_sae, slave_sae: the two SAE IDs (ETSI GS QKD 014).
        msg_master: M1's ek || x25519_pub; msg_slave: M2's ct || x25519_pub.
        mode: MODE_HYBRID, MODE_ANCHORED or MODE_BARE (one byte of the context).
        ppk: the post-quantum preshared key (32-64 bytes, RFC 8784 style), in CatKDF's psk slot.
    """
    info = Writer().fixed(INFO_HANDSHAKE, len(INFO_HANDSHAKE)).u8(mode).fixed(transcript, HASH_SIZE)
    info.str8(master_sae).str8(slave_sae)
    km = cat_kdf(
        [c.reveal() for c in components],
        psk=ppk.reveal() if ppk is not None else b"",
        label_a=LABEL_MASTER,
        label_b=LABEL_SLAVE,
        info=info.getvalue(),
        msg_a=msg_master,
        msg_b=msg_slave,
        length=KEY_MATERIAL_SIZE,
        hash_name="sha384",
    )
    return _split(km)


def anchor_id(chaining_key: Secret) -> bytes:
    """Return the 16-byte public name of chaining key ``ck`` (label KS-AN); it reveals nothing of ck."""
    return hkdf_expand("sha384", chaining_key, info=INFO_ANCHOR_ID, length=16)


def ratchet_auth_key(chaining_key: Secret) -> Secret:
    """Return the 32-byte key that authenticates R1 under chaining key ``ck_n`` (label KS-RA)."""
    return Secret(hkdf_expand("sha384", chaining_key, info=INFO_RATCHET_AUTH, length=AEAD_KEY_SIZE))


def session_mac2_key(chaining_key: Secret) -> bytes:
    """Return the 32-byte key of a session mac2 under chaining key ``ck_n`` (label KS-SM, guard.py).

    A handshake fragment whose mac2 verifies under it comes from the holder of epoch n's keys.
    """
    return hkdf_expand("sha384", chaining_key, info=INFO_SESSION_MAC2, length=AEAD_KEY_SIZE)


def ratchet_keys(chaining_key: Secret, qkd_key: Secret, *, epoch: int, request_hash: bytes) -> EpochKeys:
    """Derive epoch ``epoch``'s keys from ``ck_{n}`` and a fresh QKD key (label KS-RS).

    Args:
        chaining_key: ``ck_n`` (48 bytes).
        qkd_key: the fresh QKD key (qkd_bits/8 bytes).
        epoch: the new epoch number (u32).
        request_hash: SHA-384 of R1 without its MAC (48 bytes).
    """
    info = INFO_RATCHET + epoch.to_bytes(4, "big") + request_hash
    # HKDF-Extract(salt = ck_n, IKM = QKD key), then Expand: the vector-tested combiner.hkdf.
    km = hkdf("sha384", qkd_key, salt=chaining_key.reveal(), info=info, length=KEY_MATERIAL_SIZE)
    return _split(km)


def mac(key: Secret, label: bytes, *parts: bytes) -> bytes:
    """Return HMAC-SHA-384(key, label || parts...) truncated to 32 bytes (label KS-KC)."""
    h = hmac.new(key.reveal(), label, hashlib.sha384)
    for part in parts:
        h.update(part)
    return h.digest()[:CONFIRM_SIZE]


def mac_ok(key: Secret, label: bytes, tag: bytes, *parts: bytes) -> bool:
    """Check a ``mac`` in constant time."""
    return hmac.compare_digest(mac(key, label, *parts), tag)
