"""Gateway identity keys: ML-DSA-65 / ML-DSA-87 (FIPS 204) signatures over handshakes.

Private keys are stored as PKCS#8 PEM (seed form, as ``cryptography`` writes them), public
keys as SubjectPublicKeyInfo PEM. Peers' public keys are pinned in the policy; the
fingerprint (first 16 hex characters of SHA-256 over the raw public key) is what operators
compare and what logs show.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from qgate.errors import AuthenticationError, ConfigError

_PrivateKey = mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
_PublicKey = mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey

FINGERPRINT_HEX_CHARS: Final = 16
"""Hex characters of SHA-256(raw public key) shown as a key's fingerprint."""


@dataclass(frozen=True)
class _Alg:
    name: str
    private_cls: type[_PrivateKey]
    public_cls: type[_PublicKey]
    public_key_size: int  # FIPS 204 table 2
    signature_size: int  # FIPS 204 table 2


_ALGS: Final = {
    "ml-dsa-65": _Alg("ml-dsa-65", mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey, 1952, 3309),
    "ml-dsa-87": _Alg("ml-dsa-87", mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey, 2592, 4627),
}

IDENTITY_ALGORITHMS: Final = tuple(sorted(_ALGS))
"""Algorithm names accepted for gateway identities."""


def _alg_by_name(alg: str) -> _Alg:
    try:
        return _ALGS[alg]
    except KeyError:
        raise ConfigError(
            f"unsupported identity algorithm {alg!r} (have: {', '.join(IDENTITY_ALGORITHMS)})"
        ) from None


def _alg_of(key: object) -> _Alg:
    for alg in _ALGS.values():
        if isinstance(key, alg.private_cls | alg.public_cls):
            return alg
    raise ConfigError(f"unsupported identity key type {type(key).__name__} (need ML-DSA-65 or ML-DSA-87)")


class PeerPublicKey:
    """A pinned ML-DSA public key of a peer gateway (or of this gateway)."""

    __slots__ = ("_alg", "_key")

    def __init__(self, key: _PublicKey) -> None:
        self._key = key
        self._alg = _alg_of(key)

    def __repr__(self) -> str:
        return f"PeerPublicKey({self._alg.name}, {self.fingerprint()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeerPublicKey):
            return NotImplemented
        return self._alg == other._alg and self.public_bytes() == other.public_bytes()

    def __hash__(self) -> int:
        return hash((self._alg.name, self.public_bytes()))

    @classmethod
    def from_pem(cls, data: bytes) -> PeerPublicKey:
        """Load a SubjectPublicKeyInfo PEM public key.

        Raises:
            ConfigError: not PEM, garbled, or not ML-DSA-65/87.
        """
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError("not a readable PEM public key") from exc
        if not isinstance(key, mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey):
            raise ConfigError(f"public key is {type(key).__name__}, need ML-DSA-65 or ML-DSA-87")
        return cls(key)

    @classmethod
    def from_raw(cls, alg: str, data: bytes) -> PeerPublicKey:
        """Load a raw FIPS 204 public key (``pk`` encoding) of algorithm ``alg``.

        Raises:
            ConfigError: unknown algorithm or malformed key.
        """
        spec = _alg_by_name(alg)
        if len(data) != spec.public_key_size:
            raise ConfigError(f"{alg} public key must be {spec.public_key_size} bytes, got {len(data)}")
        try:
            return cls(spec.public_cls.from_public_bytes(data))
        except ValueError as exc:
            raise ConfigError(f"malformed {alg} public key") from exc

    @property
    def alg(self) -> str:
        """Algorithm name, ``ml-dsa-65`` or ``ml-dsa-87``."""
        return self._alg.name

    @property
    def signature_size(self) -> int:
        """Bytes of a signature (3309 for ML-DSA-65, 4627 for ML-DSA-87; FIPS 204 table 2)."""
        return self._alg.signature_size

    def public_bytes(self) -> bytes:
        """Return the raw FIPS 204 public key (1952 or 2592 bytes)."""
        return self._key.public_bytes_raw()

    def to_pem(self) -> bytes:
        """Return the key as SubjectPublicKeyInfo PEM."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def fingerprint(self) -> str:
        """Return the first 16 hex characters of SHA-256 over the raw public key."""
        return hashlib.sha256(self.public_bytes()).hexdigest()[:FINGERPRINT_HEX_CHARS]

    def verify(self, signature: bytes, message: bytes, *, context: bytes = b"") -> None:
        """Check an ML-DSA signature (FIPS 204 algorithm 3, ML-DSA.Verify, pure mode).

        Args:
            signature: the signature bytes (``signature_size`` long).
            message: the signed message (qgate signs the handshake transcript).
            context: FIPS 204 context string, at most 255 bytes; empty by default.

        Raises:
            AuthenticationError: the signature does not verify (wrong key, message or length).
        """
        if len(signature) != self._alg.signature_size:
            raise AuthenticationError(f"{self.alg} signature must be {self._alg.signature_size} bytes")
        try:
            self._key.verify(signature, message, context or None)
        except (InvalidSignature, ValueError) as exc:
            raise AuthenticationError(f"{self.alg} signature did not verify ({self.fingerprint()})") from exc


class IdentityKey:
    """This gateway's long-term ML-DSA signing key."""

    __slots__ = ("_alg", "_key")

    def __init__(self, key: _PrivateKey) -> None:
        self._key = key
        self._alg = _alg_of(key)

    def __repr__(self) -> str:
        return f"<IdentityKey {self._alg.name} <SECRET>>"

    @classmethod
    def generate(cls, alg: str) -> IdentityKey:
        """Make a new identity key.

        Args:
            alg: ``ml-dsa-65`` or ``ml-dsa-87``.

        Raises:
            ConfigError: unsupported algorithm.
        """
        return cls(_alg_by_name(alg).private_cls.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> IdentityKey:
        """Load an unencrypted PKCS#8 PEM private key.

        Raises:
            ConfigError: not PEM, garbled, encrypted, or not ML-DSA-65/87.
        """
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError("not a readable, unencrypted PEM private key") from exc
        if not isinstance(key, mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey):
            raise ConfigError(f"private key is {type(key).__name__}, need ML-DSA-65 or ML-DSA-87")
        return cls(key)

    @property
    def alg(self) -> str:
        """Algorithm name, ``ml-dsa-65`` or ``ml-dsa-87``."""
        return self._alg.name

    @property
    def signature_size(self) -> int:
        """Bytes of a signature made by this key."""
        return self._alg.signature_size

    def to_pem(self) -> bytes:
        """Return the key as unencrypted PKCS#8 PEM (keep the file mode 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_key(self) -> PeerPublicKey:
        """Return the matching public key."""
        return PeerPublicKey(self._key.public_key())

    def sign(self, message: bytes, *, context: bytes = b"") -> bytes:
        """Sign ``message`` (FIPS 204 algorithm 2, ML-DSA.Sign, hedged, pure mode).

        Args:
            message: bytes to sign (qgate signs the handshake transcript).
            context: FIPS 204 context string, at most 255 bytes; empty by default.

        Returns:
            The signature, ``signature_size`` bytes.
        """
        return self._key.sign(message, context or None)
