"""Test-only crypto providers that take their randomness from the caller (never for production).

Production providers (``qgate.crypto.kem``, ``qgate.crypto.identity``) draw randomness from
OpenSSL and cannot be made deterministic, so known-answer tests and recorded protocol vectors
use these pure-Python stand-ins instead:

- :class:`ShakeRng`: a deterministic ``rng(n) -> bytes`` stream, SHAKE-256 of a label (FIPS 202).
- :class:`KyberPyMlKem`: ML-KEM-512/768/1024 (FIPS 203) through kyber-py, implementing
  ``qgate.crypto.kem.KemAlgorithm``; key generation takes the 64-byte seed ``d || z`` and
  encapsulation the 32-byte message ``m`` from the rng.
- :class:`DilithiumPySigner`: ML-DSA-65/87 (FIPS 204) through dilithium-py with deterministic
  signing (``rnd`` = 32 zero bytes, FIPS 204 algorithm 2); satisfies ``qgate.protocol.peer.Signer``.

Every value a provider draws is appended to its ``drawn`` list as ``(what, bytes)`` so that a
recording can store it and a test can feed it to a production provider (interop).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from dilithium_py.ml_dsa import ML_DSA_65, ML_DSA_87  # type: ignore[import-untyped, unused-ignore]
from kyber_py.ml_kem import ML_KEM_512, ML_KEM_768, ML_KEM_1024

from qgate.crypto.identity import PeerPublicKey
from qgate.crypto.kem import MLKEM_SEED_SIZE, MLKEM_SHARED_SECRET_SIZE, check_mlkem_encapsulation_key
from qgate.crypto.secret import Secret
from qgate.errors import CryptoError

Rng = Callable[[int], bytes]

MLKEM_MESSAGE_SIZE: Final = 32
"""Bytes: the FIPS 203 encapsulation randomness m (algorithm 17)."""
MLDSA_SEED_SIZE: Final = 32
"""Bytes: the FIPS 204 key-generation seed xi (algorithm 6)."""


class ShakeRng:
    """A deterministic byte stream: the output of SHAKE-256(label), read from the start.

    ``rng(n)`` returns the next ``n`` bytes, so a sequence of calls is reproducible from the
    label alone. For tests only: the label is public, so the bytes are not secret.
    """

    def __init__(self, label: bytes) -> None:
        self.label = label
        self._offset = 0

    def __call__(self, n: int) -> bytes:
        """Return the next ``n`` bytes of the stream."""
        if n < 0:
            raise ValueError("negative length")
        end = self._offset + n
        out = hashlib.shake_256(self.label).digest(end)[self._offset :]
        self._offset = end
        return out

    @property
    def consumed(self) -> int:
        """Bytes handed out so far."""
        return self._offset


class ScriptedRng:
    """An rng that hands out given values in order; each call must ask for the next value's size.

    Used to feed a known-answer input (such as the ACVP ``m``) to a provider; asking for more
    or for a different size fails the test.
    """

    def __init__(self, *values: bytes) -> None:
        self._values = list(values)

    def __call__(self, n: int) -> bytes:
        """Return the next scripted value, which must be ``n`` bytes long."""
        assert self._values, "provider drew more randomness than scripted"
        value = self._values.pop(0)
        assert len(value) == n, f"provider asked for {n} bytes, the script has {len(value)}"
        return value


@dataclass(frozen=True)
class _KyberParams:
    name: str
    k: int
    impl: object

    @property
    def encapsulation_key_size(self) -> int:
        return 384 * self.k + 32  # FIPS 203 section 8, table 3

    @property
    def decapsulation_key_size(self) -> int:
        return 768 * self.k + 96  # FIPS 203 section 8, table 3

    @property
    def ciphertext_size(self) -> int:
        du, dv = (11, 5) if self.k == 4 else (10, 4)
        return 32 * (du * self.k + dv)  # FIPS 203 section 8, table 3


KYBER_PARAMS: Final = {
    "ml-kem-512": _KyberParams("ml-kem-512", 2, ML_KEM_512),
    "ml-kem-768": _KyberParams("ml-kem-768", 3, ML_KEM_768),
    "ml-kem-1024": _KyberParams("ml-kem-1024", 4, ML_KEM_1024),
}
"""kyber-py parameter sets by qgate-style name (ML-KEM-512 only for known-answer tests)."""


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"kyber-py returned {type(value).__name__}, expected bytes")
    return value


class KyberPyDecapsulationKey:
    """An expanded FIPS 203 decapsulation key ``dk`` (768k + 96 bytes) held by kyber-py."""

    __slots__ = ("_dk", "_ek", "_params")

    def __init__(self, params: _KyberParams, dk: bytes) -> None:
        if len(dk) != params.decapsulation_key_size:
            raise CryptoError(
                f"{params.name} decapsulation key must be {params.decapsulation_key_size} bytes"
            )
        self._params = params
        self._dk = dk
        self._ek = dk[384 * params.k : 768 * params.k + 32]

    def __repr__(self) -> str:
        return "<KyberPyDecapsulationKey <SECRET>>"

    def encapsulation_key(self) -> bytes:
        """Return ``ek`` (384k + 32 bytes), the copy embedded in ``dk``."""
        return self._ek

    def decapsulate(self, ciphertext: bytes) -> Secret:
        """Run ML-KEM.Decaps (FIPS 203 algorithm 21, implicit rejection included).

        Raises:
            CryptoError: the ciphertext has the wrong length, or dk fails its hash check.
        """
        if len(ciphertext) != self._params.ciphertext_size:
            raise CryptoError(
                f"KEM ciphertext has {len(ciphertext)} bytes, expected {self._params.ciphertext_size}"
            )
        try:
            return Secret(_bytes(self._params.impl.decaps(self._dk, ciphertext)))  # type: ignore[attr-defined]
        except ValueError as exc:
            raise CryptoError("kyber-py decapsulation failed") from exc


class KyberPyMlKem:
    """ML-KEM through kyber-py with caller-supplied randomness (implements ``KemAlgorithm``).

    Args:
        name: ``ml-kem-512``, ``ml-kem-768`` or ``ml-kem-1024``.
        rng: source of the 64-byte key-generation seed ``d || z`` (FIPS 203 algorithm 16) and the
            32-byte encapsulation message ``m`` (FIPS 203 algorithm 17).
    """

    def __init__(self, name: str, rng: Rng) -> None:
        self._params = KYBER_PARAMS[name]
        self._rng = rng
        self.drawn: list[tuple[str, bytes]] = []

    def __repr__(self) -> str:
        return f"KyberPyMlKem({self.name!r})"

    @property
    def name(self) -> str:
        return self._params.name

    @property
    def encapsulation_key_size(self) -> int:
        return self._params.encapsulation_key_size

    @property
    def ciphertext_size(self) -> int:
        return self._params.ciphertext_size

    @property
    def shared_secret_size(self) -> int:
        return MLKEM_SHARED_SECRET_SIZE

    def generate(self) -> KyberPyDecapsulationKey:
        """Make a key pair from the next 64 rng bytes ``d || z`` (ML-KEM.KeyGen_internal)."""
        seed = self._rng(MLKEM_SEED_SIZE)
        self.drawn.append(("ml_kem_seed", seed))
        return self.from_seed(seed)

    def from_seed(self, seed: bytes) -> KyberPyDecapsulationKey:
        """Make the key pair of the 64-byte seed ``d || z`` (FIPS 203 section 7.1)."""
        if len(seed) != MLKEM_SEED_SIZE:
            raise CryptoError(f"ML-KEM seed must be {MLKEM_SEED_SIZE} bytes")
        _ek, dk = self._params.impl.key_derive(seed)  # type: ignore[attr-defined]
        return KyberPyDecapsulationKey(self._params, _bytes(dk))

    def load_expanded(self, dk: bytes) -> KyberPyDecapsulationKey:
        """Wrap an expanded decapsulation key ``dk`` (768k + 96 bytes), as ACVP gives it."""
        return KyberPyDecapsulationKey(self._params, dk)

    def encapsulate(self, encapsulation_key: bytes) -> tuple[Secret, bytes]:
        """ML-KEM.Encaps with ``m`` = the next 32 rng bytes; the FIPS 203 section 7.2 checks first.

        Raises:
            CryptoError: the key fails the type or modulus check.
        """
        check_mlkem_encapsulation_key(encapsulation_key, self._params.k)
        m = self._rng(MLKEM_MESSAGE_SIZE)
        self.drawn.append(("ml_kem_m", m))
        try:
            shared, ciphertext = self._params.impl._encaps_internal(encapsulation_key, m)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise CryptoError("kyber-py rejected the encapsulation key") from exc
        return Secret(_bytes(shared)), _bytes(ciphertext)


_MLDSA: Final = {"ml-dsa-65": ML_DSA_65, "ml-dsa-87": ML_DSA_87}


class DilithiumPySigner:
    """An ML-DSA identity from a 32-byte seed, signing deterministically (FIPS 204, pure mode).

    Satisfies ``qgate.protocol.peer.Signer``. Deterministic signing is the FIPS 204 variant
    with ``rnd`` = 32 zero bytes; production (``IdentityKey``) uses the hedged variant, whose
    signatures verify the same way.

    Args:
        alg: ``ml-dsa-65`` or ``ml-dsa-87``.
        seed: the key-generation seed xi (32 bytes, FIPS 204 algorithm 6).
    """

    def __init__(self, alg: str, seed: bytes) -> None:
        if len(seed) != MLDSA_SEED_SIZE:
            raise CryptoError(f"ML-DSA seed must be {MLDSA_SEED_SIZE} bytes")
        self.alg = alg
        self._impl = _MLDSA[alg]
        pk, sk = self._impl.key_derive(seed)
        self._pk = _bytes(pk)
        self._sk = _bytes(sk)

    def __repr__(self) -> str:
        return f"<DilithiumPySigner {self.alg} <SECRET>>"

    def public_bytes(self) -> bytes:
        """Return the raw FIPS 204 public key (1952 / 2592 bytes)."""
        return self._pk

    def public_key(self) -> PeerPublicKey:
        """Return the public key loaded into the production verifier."""
        return PeerPublicKey.from_raw(self.alg, self._pk)

    def sign(self, message: bytes) -> bytes:
        """Return the deterministic ML-DSA signature over ``message`` (empty context)."""
        return _bytes(self._impl.sign(self._sk, message, deterministic=True))
