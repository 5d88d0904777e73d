"""Cheap checks in front of the expensive handshake work: MAC1, MAC2, Retry, challenges, budgets.

docs/protocol.md section 2.3 (after WireGuard's MAC1/cookie, with the responder's challenge as the
cookie). Every handshake fragment ends with a 32-byte trailer ``mac1(16) || mac2(16)``:

* ``mac1 = HMAC-SHA-384(K_mac1(R), fragment[..mac1])[:16]`` with ``K_mac1(R) = SHA-384("qgate v2
  mac1" || public key of the receiver R)[:32]``. Only a sender that knows R's pinned public key can
  make it, so scanners and junk are dropped before any reassembly, parsing or signature work.
* ``mac2 = HMAC-SHA-384(C, "qgate v2 mac2" || fragment[..mac2])[:16]`` where C is the receiver's
  current *challenge* (32 random bytes it handed out), or, from a sender holding a usable epoch,
  a **session mac2** ``HMAC-SHA-384(K_sm(ck), "qgate v2 mac2 session" || fragment[..mac2])[:16]``
  under that epoch's ``K_sm`` (``keyschedule.session_mac2_key``): a request whose every fragment
  has one comes from the holder of the session's keys, so an on-path attacker who reads challenges
  still cannot spend the receiver's signature budget on it. Required on M1, M2 and Kick, the messages
  that cost a signature check, a KEM operation or a QKD key. The challenge reaches the peer in
  signed or MACed messages (M1, M2, R1, Kick) or in a Retry, always addressed to the peer's
  configured endpoint, so a valid mac2 proves the sender receives there: an off-path spoofer of
  the peer's address cannot make one (the Retry is encrypted, and bound to a fragment it never saw).

A **Retry** datagram (type 0x02) answers a full-size first fragment whose mac2 fails, handing out
the current challenge: ``type(1) || reserved(3) || receiver_index(4) || message_id(4) || index(1) ||
reserved(3) || nonce(12) || AES-256-GCM(K_retry(S), nonce, challenge(32), aad = header(16) ||
nonce(12) || mac1 of that fragment)`` (76 bytes; ``receiver_index`` is the steering hint of
``wire.py``) with ``K_retry(S) = SHA-384("qgate v2 retry" || public key of the sender S)[:32]``.

Sans-I/O: bytes, ``now`` (monotonic seconds) and randomness in; nothing here touches a socket.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from qgate.constants import (
    AEAD_TAG_SIZE,
    CHALLENGE_BOOK_SIZE,
    CHALLENGE_SIZE,
    FRAGMENT_MAC_SIZE,
    FRAGMENT_TRAILER_SIZE,
    MSG_RETRY,
    RETRY_NONCE_SIZE,
    RETRY_SIZE,
)
from qgate.crypto.aead import RecordKey, aes256gcm_open, aes256gcm_seal
from qgate.errors import AuthenticationError

LABEL_MAC1: Final = b"qgate v2 mac1"
LABEL_MAC2: Final = b"qgate v2 mac2"
LABEL_MAC2_SESSION: Final = b"qgate v2 mac2 session"
LABEL_RETRY: Final = b"qgate v2 retry"

_RETRY_HEAD: Final = struct.Struct("!B3xIIB3x")
"""Retry header before the nonce: type, reserved, receiver_index, message_id, index, reserved (16 bytes)."""
_NO_MAC: Final = bytes(FRAGMENT_MAC_SIZE)


def mac1_key(public_key: bytes) -> bytes:
    """Return ``K_mac1`` (32 bytes) for the receiver whose raw public identity key is ``public_key``."""
    return hashlib.sha384(LABEL_MAC1 + public_key).digest()[:32]


def retry_key(public_key: bytes) -> bytes:
    """Return ``K_retry`` (32-byte AES-256 key) for the Retry sender with raw public key ``public_key``."""
    return hashlib.sha384(LABEL_RETRY + public_key).digest()[:32]


def _mac1(key: bytes, body: bytes | memoryview) -> bytes:
    return hmac.digest(key, body, "sha384")[:FRAGMENT_MAC_SIZE]  # one-shot C path (no HMAC object)


def _mac2(challenge: bytes, body: bytes | memoryview) -> bytes:
    return hmac.digest(challenge, LABEL_MAC2 + body, "sha384")[:FRAGMENT_MAC_SIZE]


def _session_mac2(key: bytes, body: bytes | memoryview) -> bytes:
    return hmac.digest(key, LABEL_MAC2_SESSION + body, "sha384")[:FRAGMENT_MAC_SIZE]


def add_macs(
    fragment: bytes, *, peer_mac1_key: bytes, peer_challenge: bytes | None, session_key: bytes | None = None
) -> bytes:
    """Return ``fragment || mac1 || mac2`` for sending to the peer.

    Args:
        fragment: header and payload of one handshake fragment (``wire.fragment_message``).
        peer_mac1_key: ``mac1_key`` of the peer's public key (the receiver's).
        peer_challenge: the peer's latest challenge (32 bytes), or None when none is known yet:
            mac2 is then 16 zero bytes and the peer answers M1/M2/Kick with a Retry.
        session_key: ``keyschedule.session_mac2_key`` of a usable epoch (32 bytes): a session mac2
            instead of the challenge's.
    """
    with_mac1 = fragment + _mac1(peer_mac1_key, fragment)
    if session_key is not None:
        mac2 = _session_mac2(session_key, with_mac1)
    else:
        mac2 = _mac2(peer_challenge, with_mac1) if peer_challenge is not None else _NO_MAC
    return with_mac1 + mac2


def mac1_ok(datagram: bytes, my_mac1_key: bytes) -> bool:
    """Whether a fragment datagram's mac1 is right for this receiver (constant time)."""
    if len(datagram) <= FRAGMENT_TRAILER_SIZE:
        return False
    body_end = len(datagram) - FRAGMENT_TRAILER_SIZE
    view = memoryview(datagram)
    want = _mac1(my_mac1_key, view[:body_end])
    return hmac.compare_digest(want, datagram[body_end : body_end + FRAGMENT_MAC_SIZE])


def _mac2_matches(datagram: bytes, keys: list[bytes], mac: Callable[[bytes, memoryview], bytes]) -> bool:
    """Whether mac2 equals ``mac(key, datagram[..mac2])`` for any key; every key is tried (no timing hint)."""
    if len(datagram) <= FRAGMENT_TRAILER_SIZE:
        return False
    view = memoryview(datagram)[:-FRAGMENT_MAC_SIZE]
    got = datagram[-FRAGMENT_MAC_SIZE:]
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(mac(key, view), got)
    return ok


def mac2_ok(datagram: bytes, challenges: list[bytes]) -> bool:
    """Whether a fragment datagram's mac2 was made with one of this receiver's ``challenges``."""
    return _mac2_matches(datagram, challenges, _mac2)


def session_mac2_ok(datagram: bytes, session_keys: list[bytes]) -> bool:
    """Whether a fragment datagram's mac2 is a session mac2 under one of ``session_keys`` (32 bytes each)."""
    return _mac2_matches(datagram, session_keys, _session_mac2)


def fragment_mac1(datagram: bytes) -> bytes:
    """Return the mac1 field of a fragment datagram (16 bytes)."""
    end = len(datagram) - FRAGMENT_MAC_SIZE
    return datagram[end - FRAGMENT_MAC_SIZE : end]


def strip_macs(datagram: bytes) -> bytes:
    """Return a fragment datagram without its 32-byte trailer."""
    return datagram[:-FRAGMENT_TRAILER_SIZE]


def seal_retry(
    *,
    message_id: int,
    index: int,
    answered_mac1: bytes,
    challenge: bytes,
    my_retry_key: bytes | RecordKey,
    nonce: bytes,
    receiver_index: int = 0,
) -> bytes:
    """Return a Retry datagram (76 bytes) handing ``challenge`` to the sender of one fragment.

    Args:
        message_id, index: the answered fragment's message_id (u32) and index (u8).
        receiver_index: the steering hint (a live index of the fragment's sender, or 0).
        answered_mac1: that fragment's mac1 (16 bytes): the Retry opens only for its sender.
        challenge: this side's current challenge (32 bytes).
        my_retry_key: ``retry_key`` of this side's own public key (or its ``RecordKey``, built once).
        nonce: 12 fresh random bytes.
    """
    head = _RETRY_HEAD.pack(MSG_RETRY, receiver_index, message_id, index) + nonce
    if isinstance(my_retry_key, RecordKey):
        return head + my_retry_key.seal_nonce(nonce, head + answered_mac1, challenge)
    return head + aes256gcm_seal(my_retry_key, nonce, head + answered_mac1, challenge)


def parse_retry_head(datagram: bytes) -> tuple[int, int] | None:
    """Return ``(message_id, index)`` of a well-formed Retry datagram, or None."""
    if len(datagram) != RETRY_SIZE or datagram[0] != MSG_RETRY:
        return None
    _, _, message_id, index = _RETRY_HEAD.unpack_from(datagram)
    return message_id, index


def open_retry(datagram: bytes, *, sent_mac1: bytes, peer_retry_key: bytes) -> bytes:
    """Return the challenge (32 bytes) in a Retry answering a fragment this side sent with ``sent_mac1``.

    Raises:
        AuthenticationError: the Retry is not 76 bytes or was not made by the peer for that fragment.
    """
    if len(datagram) != RETRY_SIZE:
        raise AuthenticationError("Retry of the wrong size")
    head = datagram[: _RETRY_HEAD.size + RETRY_NONCE_SIZE]
    nonce = head[_RETRY_HEAD.size :]
    return aes256gcm_open(peer_retry_key, nonce, head + sent_mac1, datagram[len(head) :])


assert _RETRY_HEAD.size + RETRY_NONCE_SIZE + CHALLENGE_SIZE + AEAD_TAG_SIZE == RETRY_SIZE


@dataclass
class _Issued:
    value: bytes
    used: bool = False


class ChallengeBook:
    """This side's challenges: the newest is handed out; each may answer (echo) one request only.

    At most ``CHALLENGE_BOOK_SIZE`` are kept (newest first). ``mac2`` is accepted under any of them,
    so retransmitted fragments of an answered request still pass and reach the answer cache; an
    echo in a signed request is accepted once (``consume``), after which a fresh challenge is
    issued. Only verified requests consume, so an attacker can never churn the book.
    """

    def __init__(self, rng: Callable[[int], bytes]) -> None:
        self._rng = rng
        self._issued: OrderedDict[bytes, _Issued] = OrderedDict()
        self._issue()

    def _issue(self) -> None:
        value = self._rng(CHALLENGE_SIZE)
        self._issued[value] = _Issued(value)
        self._issued.move_to_end(value, last=False)
        while len(self._issued) > CHALLENGE_BOOK_SIZE:
            self._issued.popitem(last=True)

    @property
    def current(self) -> bytes:
        """The challenge to hand out now (32 bytes)."""
        return next(iter(self._issued))

    def all(self) -> list[bytes]:
        """Every challenge mac2 may be made with."""
        return list(self._issued)

    def fresh(self, echo: bytes) -> bool:
        """Whether ``echo`` is a challenge of this side not yet used by a verified request."""
        issued = self._issued.get(echo)
        return issued is not None and not issued.used

    def consume(self, echo: bytes) -> None:
        """Mark ``echo`` used (its request verified) and issue a fresh current challenge."""
        issued = self._issued.get(echo)
        if issued is not None and not issued.used:
            issued.used = True
            self._issue()


class TokenBucket:
    """A rate limit: ``rate`` tokens per second, at most ``burst`` saved up (monotonic time)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, now

    def available(self, now: float) -> float:
        """Return the tokens there are at ``now``."""
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough; return whether it did."""
        if self.available(now) < cost:
            return False
        self._tokens -= cost
        return True


class SentMacs:
    """mac1 values of recently sent fragments by ``(message_id, index)``, to open Retries with."""

    def __init__(self, limit: int = 128) -> None:
        self._limit = limit
        self._macs: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def note(self, datagram: bytes) -> None:
        """Remember a fragment datagram just sent (with its trailer)."""
        message_id = int.from_bytes(datagram[8:12], "big")
        self._macs[(message_id, datagram[2])] = fragment_mac1(datagram)
        while len(self._macs) > self._limit:
            self._macs.popitem(last=False)

    def get(self, message_id: int, index: int) -> bytes | None:
        """Return the mac1 sent in fragment ``index`` of message ``message_id``, if remembered."""
        return self._macs.get((message_id, index))

    def take(self, message_id: int, index: int) -> bytes | None:
        """Return the mac1 sent in fragment ``index`` of ``message_id`` and forget the whole message.

        So each message is answered by at most one Retry: a replayed Retry finds nothing.
        """
        mac1 = self._macs.get((message_id, index))
        if mac1 is not None:
            for key in [k for k in self._macs if k[0] == message_id]:
                del self._macs[key]
        return mac1


class AnsweredIds:
    """message_ids this side sent a Retry for, and when (bounded): a message draws one per ``gap`` seconds.

    So a lost Retry is drawn again by the sender's next retransmission (HS-RT, same message_id, so
    reassembly still combines fragments of several transmissions), while a replayed fragment never
    draws more than one Retry per ``gap``.
    """

    def __init__(self, limit: int = 64, gap: float = 0.5) -> None:
        self._limit, self._gap = limit, gap
        self._ids: OrderedDict[int, float] = OrderedDict()

    def recent(self, message_id: int, now: float) -> bool:
        """Whether a Retry was sent for ``message_id`` less than ``gap`` seconds before ``now``."""
        at = self._ids.get(message_id)
        return at is not None and now - at < self._gap

    def add(self, message_id: int, now: float) -> None:
        """Record a Retry sent for ``message_id`` at ``now`` (the oldest is forgotten past the limit)."""
        self._ids.pop(message_id, None)
        self._ids[message_id] = now
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)
