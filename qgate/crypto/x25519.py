"""X25519 Diffie-Hellman (RFC 7748 section 5) for the classical part of the hybrid."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import x25519

from qgate.constants import X25519_SIZE
from qgate.crypto.secret import Secret
from qgate.errors import CryptoError


class X25519KeyPair:
    """An X25519 private key with its public value (ephemeral in qgate)."""

    __slots__ = ("_private",)

    def __init__(self, private: x25519.X25519PrivateKey) -> None:
        self._private = private

    def __repr__(self) -> str:
        return "<X25519KeyPair <SECRET>>"

    @classmethod
    def generate(cls) -> X25519KeyPair:
        """Make a fresh key pair (randomness from OpenSSL's DRBG)."""
        return cls(x25519.X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, private: bytes | Secret) -> X25519KeyPair:
        """Load a 32-byte private scalar (RFC 7748 section 5; clamped on use).

        Raises:
            CryptoError: not 32 bytes.
        """
        raw = private.reveal() if isinstance(private, Secret) else private
        if len(raw) != X25519_SIZE:
            raise CryptoError(f"X25519 private key must be {X25519_SIZE} bytes, got {len(raw)}")
        return cls(x25519.X25519PrivateKey.from_private_bytes(raw))

    def public_bytes(self) -> bytes:
        """Return the 32-byte public value u (little-endian, RFC 7748 section 5)."""
        return self._private.public_key().public_bytes_raw()

    def exchange(self, peer_public: bytes) -> Secret:
        """Compute the 32-byte shared secret X25519(k, peer_public).

        Args:
            peer_public: the peer's 32-byte public value.

        Raises:
            CryptoError: wrong length, or the result is all zero (a low-order peer point;
                RFC 7748 section 6.1 check).
        """
        if len(peer_public) != X25519_SIZE:
            raise CryptoError(f"X25519 public key must be {X25519_SIZE} bytes, got {len(peer_public)}")
        try:
            shared = self._private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # OpenSSL refuses the all-zero result
            raise CryptoError("X25519 shared secret is all zero (low-order public key)") from exc
        if shared == bytes(X25519_SIZE):
            raise CryptoError("X25519 shared secret is all zero (low-order public key)")
        return Secret(shared)
