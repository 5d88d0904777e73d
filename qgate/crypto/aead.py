"""AES-256-GCM record protection for data packets (NIST SP 800-38D; nonce as in WireGuard).

Each record: ``header(16) || ciphertext || tag(16)``; the header is the associated data; the
96-bit nonce is ``4 zero bytes || counter`` (64-bit big-endian). A counter must never repeat
under one key: the caller (``qgate.protocol.epoch``) owns the counter and its limits.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qgate.constants import AEAD_KEY_SIZE, AEAD_NONCE_SIZE, AEAD_TAG_SIZE
from qgate.crypto.secret import Secret
from qgate.errors import AuthenticationError, LocalProtocolError

NONCE_PREFIX: Final = b"\x00\x00\x00\x00"
"""The 4 bytes before the 8-byte big-endian record counter in every GCM nonce (protocol.md 2.1)."""
_COUNTER_MAX: Final = (1 << 64) - 1


def nonce_for(counter: int) -> bytes:
    """Return the 12-byte GCM nonce ``0x00000000 || counter`` (counter: 0 .. 2^64-1)."""
    return NONCE_PREFIX + counter.to_bytes(8, "big")


def aes256gcm_seal(key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """Encrypt with AES-256-GCM (SP 800-38D section 7.1); return ``ciphertext || tag(16)``.

    Args:
        key: 32 bytes.
        nonce: 12 bytes.
        aad: associated data, authenticated, not encrypted.
        plaintext: 0 .. 2^31 bytes.

    Raises:
        LocalProtocolError: key or nonce of the wrong size.
    """
    if len(key) != AEAD_KEY_SIZE or len(nonce) != AEAD_NONCE_SIZE:
        raise LocalProtocolError("AES-256-GCM needs a 32-byte key and a 12-byte nonce")
    return RecordKey(Secret(key)).seal_nonce(nonce, aad, plaintext)


def aes256gcm_open(key: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    """Decrypt and verify ``ciphertext || tag(16)`` with AES-256-GCM (SP 800-38D section 7.2).

    Raises:
        AuthenticationError: the tag does not verify (or the input is shorter than a tag).
        LocalProtocolError: key or nonce of the wrong size.
    """
    if len(key) != AEAD_KEY_SIZE or len(nonce) != AEAD_NONCE_SIZE:
        raise LocalProtocolError("AES-256-GCM needs a 32-byte key and a 12-byte nonce")
    if len(ciphertext) < AEAD_TAG_SIZE:
        raise AuthenticationError("record shorter than the AES-GCM tag")
    return RecordKey(Secret(key)).open_nonce(nonce, aad, ciphertext)


class RecordKey:
    """One direction's AES-256-GCM key for one epoch; the cipher context is built once.

    The key bytes stay inside; ``repr()`` prints ``<SECRET>``.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: Secret) -> None:
        """Wrap a 32-byte key.

        Raises:
            LocalProtocolError: the key is not 32 bytes.
        """
        raw = key.reveal()
        if len(raw) != AEAD_KEY_SIZE:
            raise LocalProtocolError("AES-256-GCM needs a 32-byte key")
        self._aead = AESGCM(raw)

    def __repr__(self) -> str:
        return "RecordKey(<SECRET>)"

    def seal(self, counter: int, header: bytes, plaintext: bytes) -> bytes:
        """Return ``ciphertext || tag(16)`` for ``plaintext`` under nonce(counter), header as AAD.

        Raises:
            LocalProtocolError: counter outside 0 .. 2^64-1.
        """
        if not 0 <= counter <= _COUNTER_MAX:
            raise LocalProtocolError("record counter out of range")
        return self.seal_nonce(NONCE_PREFIX + counter.to_bytes(8, "big"), header, plaintext)

    def open(self, counter: int, header: bytes, ciphertext: bytes) -> bytes:
        """Verify and decrypt ``ciphertext || tag(16)``; return the plaintext.

        Raises:
            AuthenticationError: the tag does not verify.
        """
        return self.open_nonce(NONCE_PREFIX + counter.to_bytes(8, "big"), header, ciphertext)

    def seal_nonce(self, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """AES-256-GCM encryption (SP 800-38D 7.1) under an explicit 12-byte nonce: the primitive
        ``seal`` uses, exposed so the known-answer vectors run through the same code."""
        return self._aead.encrypt(nonce, plaintext, aad)

    def open_nonce(self, nonce: bytes, aad: bytes | memoryview, ciphertext: bytes | memoryview) -> bytes:
        """AES-256-GCM decryption (SP 800-38D 7.2) under an explicit nonce; the primitive ``open`` uses.

        Raises:
            AuthenticationError: the tag does not verify, or the input is shorter than a tag.
        """
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag as exc:
            raise AuthenticationError("AES-GCM tag did not verify") from exc
        except ValueError as exc:  # shorter than a tag
            raise AuthenticationError("record shorter than the AES-GCM tag") from exc
