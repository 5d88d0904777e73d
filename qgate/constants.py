"""Spec and implementation constants, each with its unit and source."""

from __future__ import annotations

from typing import Final

# --- Wire protocol (docs/protocol.md) -------------------------------------------------
PROTOCOL_VERSION: Final = 2
"""qgate wire-protocol version carried in every handshake message (2: challenge freshness, MAC1/MAC2)."""

MSG_HANDSHAKE_FRAGMENT: Final = 0x01
"""Datagram type byte: one fragment of a handshake-class message."""
MSG_RETRY: Final = 0x02
"""Datagram type byte: a Retry handing out the responder's challenge (protocol.md 2.3)."""
MSG_DATA: Final = 0x04
"""Datagram type byte: one sealed inner IP packet (or an empty keepalive)."""

DATA_HEADER_SIZE: Final = 16
"""Bytes: type(1) || reserved(3) || receiver_index(4) || counter(8); the AES-GCM associated data."""
AEAD_TAG_SIZE: Final = 16
"""Bytes: AES-GCM tag (NIST SP 800-38D, 128-bit tag)."""
AEAD_KEY_SIZE: Final = 32
"""Bytes: AES-256 key."""
AEAD_NONCE_SIZE: Final = 12
"""Bytes: 96-bit GCM nonce = 4 zero bytes || 64-bit big-endian counter (as WireGuard)."""
DATA_OVERHEAD: Final = DATA_HEADER_SIZE + AEAD_TAG_SIZE
"""Bytes qgate adds to each inner packet, before UDP/IP."""
UDP_IPV4_OVERHEAD: Final = 28
"""Bytes: IPv4 header (20) + UDP header (8), no IP options."""
UDP_IPV6_OVERHEAD: Final = 48
"""Bytes: IPv6 header (40) + UDP header (8)."""

FRAGMENT_HEADER_SIZE: Final = 12
"""Bytes: type(1) || msg_type(1) || index(1) || count(1) || receiver_index(4) || message_id(4)."""
FRAGMENT_PAYLOAD_MAX: Final = 1152
"""Bytes of message per handshake fragment, so a fragment fits the IPv6 minimum MTU (RFC 8200: 1280)."""
FRAGMENT_MAC_SIZE: Final = 16
"""Bytes of each of mac1 and mac2 at the end of a handshake fragment (HMAC-SHA-384 truncated)."""
FRAGMENT_TRAILER_SIZE: Final = 2 * FRAGMENT_MAC_SIZE
"""Bytes: mac1(16) || mac2(16) after every fragment's payload; 12 + 1152 + 32 + 48 = 1244 <= 1280."""
CHALLENGE_SIZE: Final = 32
"""Bytes of a responder challenge (the freshness nonce M1 and Kick echo, and the mac2 key)."""
CHALLENGE_BOOK_SIZE: Final = 3
"""Challenges a side keeps (newest first); mac2 is accepted under any of them."""
RETRY_NONCE_SIZE: Final = 12
"""Bytes: the random AES-GCM nonce of a Retry datagram."""
RETRY_SIZE: Final = 76
"""Bytes of a Retry datagram: header(16) || nonce(12) || challenge(32) || tag(16)."""
RETRY_RATE: Final = 10000.0
"""Retry datagrams per second per peer at most (burst 1000). A Retry answers only a full-size first
fragment (1196 bytes of UDP payload) with 76 bytes and one AES-GCM: 15x smaller than what triggers
it (never an amplifier), always sent to the peer's configured address. Set high so a cold start
under an off-path flood still gets its Retry; the control socket's read budget bounds it further."""
RETRY_BURST: Final = 1000.0
"""Retries a peer may draw at once before RETRY_RATE applies."""
EXPENSIVE_RATE: Final = 25.0
"""Signature checks and KEM operations per second per peer at most (burst EXPENSIVE_BURST). Measured
here: ML-DSA-87 verify 0.23 ms, ML-KEM-1024 decapsulation under 0.1 ms, so a peer's whole budget costs
under 1 % of one core; a forged request verified under a live session's key never draws on it."""
EXPENSIVE_BURST: Final = 50.0
"""Expensive operations a peer may use at once before the EXPENSIVE_RATE budget applies."""
KICK_HANDSHAKE_MIN_INTERVAL: Final = 2.0
"""Seconds: a master starts a Kick-driven full handshake at most this often (the first gap)."""
KICK_HANDSHAKE_MAX_INTERVAL: Final = 8.0
"""Seconds: the longest gap between Kick-driven exchanges (the gap doubles while Kicks keep coming)."""
LOCAL_EVIDENCE_TTL: Final = 10.0
"""Seconds a failed request to this side's own KME counts as evidence that QKD keys are down."""
ANCHORS_KEPT: Final = 4
"""QKD-backed chaining keys kept per peer for degraded handshakes (the newest few epochs)."""
FRAGMENT_COUNT_MAX: Final = 16
"""Fragments per handshake message at most (16 x 1152 = 18 KiB, above any message qgate sends)."""
REASSEMBLY_TIMEOUT: Final = 5.0
"""Seconds a partial handshake message is kept waiting for its other fragments."""
REASSEMBLY_SLOTS: Final = 8
"""Partial handshake messages kept at once per source; the oldest is dropped past this."""

REPLAY_WINDOW_SIZE: Final = 8192
"""Packets: anti-replay window per epoch (RFC 6479 bitmap; DESIGN.md asks at least 8192)."""
AEAD_PACKET_LIMIT: Final = 1 << 23
"""Packets sealed under one AES-GCM key at most (RFC 9001 section 6.6 confidentiality limit)."""
AEAD_PACKET_SOFT_LIMIT: Final = AEAD_PACKET_LIMIT - (1 << 20)
"""Packets after which a rekey is started early, ahead of AEAD_PACKET_LIMIT."""

HANDSHAKE_RETRY: Final = 1.0
"""Seconds between retransmissions of an unanswered handshake or ratchet message."""
HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds after which an unfinished handshake is abandoned and restarted with fresh keys."""
EPOCH_GRACE: Final = 2.0
"""Seconds a replaced epoch still opens reordered packets (make-before-break)."""
KICK_INTERVAL: Final = 1.0
"""Seconds between a slave's signed Kicks at most (no usable session, or a dead QKD key_ID)."""

# --- Key sizes -------------------------------------------------------------------------
HASH_SIZE: Final = 48
"""Bytes: SHA-384 digest; the chaining key and transcript hash have this size."""
CONFIRM_SIZE: Final = 32
"""Bytes: key-confirmation MAC (HMAC-SHA-384 truncated to 256 bits)."""
X25519_SIZE: Final = 32
"""Bytes: X25519 public value and shared secret (RFC 7748 section 5)."""
QKD_KEY_BITS_DEFAULT: Final = 256
"""Bits of QKD key fetched per rekey (ETSI GS QKD 014 ``size``)."""

QKD_PREFETCH_DEFAULT: Final = 16
"""QKD keys a master keeps fetched ahead of need (policy ``qkd_prefetch``)."""
QKD_PREFETCH_RETRY_MAX: Final = 8.0
"""Seconds: the longest wait between failed prefetch requests."""
QKD_PREFETCH_PROBATION: Final = 600.0
"""Seconds of fetching on demand, after prefetched keys died at the slave's KME, before
prefetching is tried again (implementation choice; doubles at each new failure)."""
QKD_PREFETCH_PROBATION_MAX: Final = 86400.0
"""Seconds: the longest probation (one day)."""
QKD_OUT_MAX_AGE: Final = 20.0
"""Seconds a key handed to an exchange counts as on its way to the slave at most (twice
HANDSHAKE_TIMEOUT: every exchange ends by then), so a lost completion never blocks refills."""
QKD_HEDGE_AFTER: Final = 0.5
"""Seconds without a KME answer after which a key request counts as stalled at the latest
(before any answer time is known): dec_keys is sent once more in parallel, a rekey waiting for a
refill asks by itself (implementation choice: well below a 1 s rekey interval). With answer
times known it is 4 x their median, at least QKD_HEDGE_MIN (the "tail at scale" hedge)."""
QKD_HEDGE_MIN: Final = 0.1
"""Seconds: the earliest a key request counts as stalled, however fast the KME usually is."""
QKD_SLOW_ANSWER: Final = 1.0
"""Seconds: a KME answer slower than this is counted as slow (status shows it)."""
QKD_STOCK_HORIZON: Final = 60.0
"""Seconds of ratchet steps the QKD key stock should cover; below that it is low (alarm, stretch)."""
STATUS_POLL_INTERVAL: Final = 5.0
"""Seconds between ETSI 014 status requests that publish the KME's key stock."""

# --- ETSI GS QKD 014 v1.1.1 ------------------------------------------------------------
ETSI014_API_PREFIX: Final = "/api/v1/keys"
"""URL prefix of the ETSI GS QKD 014 key delivery API (section 5.1)."""

# --- Policy defaults (DESIGN.md, Rekeying) ----------------------------------------------
REKEY_INTERVAL_DEFAULT: Final = 10.0
"""Seconds between QKD ratchet steps."""
REKEY_INTERVAL_MIN: Final = 0.1
"""Seconds: the fastest ratchet the policy may ask for."""
KEM_INTERVAL_DEFAULT: Final = 120.0
"""Seconds between full ML-KEM handshakes."""
DEFAULT_UDP_PORT: Final = 51820
"""The gateway's UDP port when the policy gives none."""
DEFAULT_TUN_MTU: Final = 1420
"""Bytes: inner MTU; 1500 - 20 (IPv4) - 8 (UDP) - 32 (qgate) = 1440, rounded down for IPv6."""
