"""Key encapsulation mechanisms (FIPS 203 ML-KEM) behind one small interface.

The default provider is ``cryptography`` (OpenSSL-backed, always installed). The optional
``liboqs`` provider is used only when the liboqs shared library is present; it is detected
with :func:`ctypes.util.find_library` *before* ``oqs`` is imported, because liboqs-python
tries to download and build liboqs when it cannot find it.

Every encapsulation key from the peer is checked before use: its length and the FIPS 203
section 7.2 modulus check (every 12-bit coefficient of ``t_hat`` below q = 3329). A bad key
or a ciphertext of the wrong length raises :class:`~qgate.errors.CryptoError`. Decapsulation
of a well-formed but wrong ciphertext does not fail: ML-KEM answers with an implicit-rejection
key (FIPS 203 section 6.3), so callers must confirm the derived key.
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import mlkem

from qgate.crypto.secret import Secret
from qgate.errors import CryptoError

logger = logging.getLogger(__name__)

MLKEM_Q: Final = 3329
"""FIPS 203 section 2.4: the ML-KEM modulus q."""
MLKEM_SEED_SIZE: Final = 64
"""Bytes: FIPS 203 key-generation seed d || z (section 7.1)."""
MLKEM_SHARED_SECRET_SIZE: Final = 32
"""Bytes: ML-KEM shared secret K (FIPS 203 section 7.2)."""

PROVIDER_CRYPTOGRAPHY: Final = "cryptography"
PROVIDER_LIBOQS: Final = "liboqs"


class KemDecapsulationKey(Protocol):
    """One party's private key of a KEM key pair (ephemeral in qgate)."""

    def encapsulation_key(self) -> bytes:
        """Return the public encapsulation key to send to the peer."""
        ...

    def decapsulate(self, ciphertext: bytes) -> Secret:
        """Return the shared secret for ``ciphertext``; raise CryptoError on a bad length."""
        ...


class KemAlgorithm(Protocol):
    """A KEM: generate a key pair, encapsulate to a peer's key."""

    @property
    def name(self) -> str:
        """Policy name, such as ``ml-kem-768``."""
        ...

    @property
    def encapsulation_key_size(self) -> int:
        """Bytes of an encapsulation (public) key."""
        ...

    @property
    def ciphertext_size(self) -> int:
        """Bytes of a ciphertext."""
        ...

    @property
    def shared_secret_size(self) -> int:
        """Bytes of the shared secret."""
        ...

    def generate(self) -> KemDecapsulationKey:
        """Make a fresh key pair (randomness from the provider's DRBG)."""
        ...

    def encapsulate(self, encapsulation_key: bytes) -> tuple[Secret, bytes]:
        """Return ``(shared_secret, ciphertext)`` for the peer's key; CryptoError if invalid."""
        ...


@dataclass(frozen=True)
class _MlKemParams:
    name: str
    k: int
    liboqs_name: str

    @property
    def encapsulation_key_size(self) -> int:
        return 384 * self.k + 32  # FIPS 203 section 8, table 3

    @property
    def ciphertext_size(self) -> int:
        return 32 * (11 * self.k + 5) if self.k == 4 else 32 * (10 * self.k + 4)


_MLKEM_PARAMS: Final = {
    "ml-kem-768": _MlKemParams("ml-kem-768", 3, "ML-KEM-768"),
    "ml-kem-1024": _MlKemParams("ml-kem-1024", 4, "ML-KEM-1024"),
}


def check_mlkem_encapsulation_key(encapsulation_key: bytes, k: int) -> None:
    """Run the FIPS 203 section 7.2 input checks on an ML-KEM encapsulation key.

    Args:
        encapsulation_key: ``ByteEncode12(t_hat) || rho``, 384*k + 32 bytes.
        k: module rank (3 for ML-KEM-768, 4 for ML-KEM-1024).

    Raises:
        CryptoError: wrong length (type check) or a coefficient >= q (modulus check:
            ``ByteEncode12(ByteDecode12(ek[0:384k])) == ek[0:384k]``).
    """
    expected = 384 * k + 32
    if len(encapsulation_key) != expected:
        raise CryptoError(f"ML-KEM encapsulation key has {len(encapsulation_key)} bytes, expected {expected}")
    packed = encapsulation_key[: 384 * k]
    for offset in range(0, len(packed), 3):
        b0, b1, b2 = packed[offset], packed[offset + 1], packed[offset + 2]
        if (b0 | (b1 & 0x0F) << 8) >= MLKEM_Q or (b1 >> 4 | b2 << 4) >= MLKEM_Q:
            raise CryptoError("ML-KEM encapsulation key fails the FIPS 203 modulus check")


def _check_ciphertext(ciphertext: bytes, expected: int) -> None:
    if len(ciphertext) != expected:
        raise CryptoError(f"KEM ciphertext has {len(ciphertext)} bytes, expected {expected}")


# --- cryptography (OpenSSL) provider ---------------------------------------------------

_CryptoPrivate = mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey


class _CryptographyDecapsulationKey:
    __slots__ = ("_ciphertext_size", "_key")

    def __init__(self, key: _CryptoPrivate, ciphertext_size: int) -> None:
        self._key = key
        self._ciphertext_size = ciphertext_size

    def __repr__(self) -> str:
        return "<KemDecapsulationKey <SECRET>>"

    def encapsulation_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def decapsulate(self, ciphertext: bytes) -> Secret:
        _check_ciphertext(ciphertext, self._ciphertext_size)
        try:
            return Secret(self._key.decapsulate(ciphertext))
        except ValueError as exc:
            raise CryptoError("ML-KEM decapsulation failed") from exc


class CryptographyMlKem:
    """ML-KEM-768 / ML-KEM-1024 (FIPS 203) through ``cryptography`` (OpenSSL 3.5+).

    Args:
        name: ``ml-kem-768`` or ``ml-kem-1024``.
    """

    def __init__(self, name: str) -> None:
        self._params = _MLKEM_PARAMS[name]
        is_768 = self._params.k == 3
        self._private_cls: type[_CryptoPrivate] = (
            mlkem.MLKEM768PrivateKey if is_768 else mlkem.MLKEM1024PrivateKey
        )
        self._public_cls: type[mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey] = (
            mlkem.MLKEM768PublicKey if is_768 else mlkem.MLKEM1024PublicKey
        )

    def __repr__(self) -> str:
        return f"CryptographyMlKem({self.name!r})"

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

    def generate(self) -> KemDecapsulationKey:
        return _CryptographyDecapsulationKey(self._private_cls.generate(), self.ciphertext_size)

    def from_seed(self, seed: bytes | Secret) -> KemDecapsulationKey:
        """Derive a key pair from the 64-byte seed ``d || z`` (FIPS 203 ML-KEM.KeyGen_internal).

        Raises:
            CryptoError: the seed is not 64 bytes.
        """
        raw = seed.reveal() if isinstance(seed, Secret) else seed
        if len(raw) != MLKEM_SEED_SIZE:
            raise CryptoError(f"ML-KEM seed must be {MLKEM_SEED_SIZE} bytes, got {len(raw)}")
        return _CryptographyDecapsulationKey(self._private_cls.from_seed_bytes(raw), self.ciphertext_size)

    def encapsulate(self, encapsulation_key: bytes) -> tuple[Secret, bytes]:
        check_mlkem_encapsulation_key(encapsulation_key, self._params.k)
        try:
            public = self._public_cls.from_public_bytes(encapsulation_key)
            shared, ciphertext = public.encapsulate()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise CryptoError("ML-KEM encapsulation key rejected") from exc
        return Secret(shared), ciphertext


# --- liboqs provider (optional) ---------------------------------------------------------


@functools.cache
def _liboqs_present() -> bool:
    """True when the liboqs shared library is installed (checked without importing oqs)."""
    return ctypes.util.find_library("oqs") is not None


def _import_oqs() -> object:
    if not _liboqs_present():
        raise CryptoError("liboqs is not installed")
    try:
        return importlib.import_module("oqs")
    except Exception as exc:  # liboqs-python raises assorted errors when misconfigured
        raise CryptoError("liboqs-python could not be loaded") from exc


class _LiboqsDecapsulationKey:
    __slots__ = ("_ciphertext_size", "_kem", "_public")

    def __init__(self, kem: object, public: bytes, ciphertext_size: int) -> None:
        self._kem = kem
        self._public = public
        self._ciphertext_size = ciphertext_size

    def __repr__(self) -> str:
        return "<KemDecapsulationKey <SECRET>>"

    def encapsulation_key(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> Secret:
        _check_ciphertext(ciphertext, self._ciphertext_size)
        try:
            return Secret(bytes(self._kem.decap_secret(ciphertext)))  # type: ignore[attr-defined]
        except Exception as exc:
            raise CryptoError("liboqs decapsulation failed") from exc


class LiboqsKem:
    """Any liboqs KEM (ML-KEM, FrodoKEM, Classic McEliece, HQC, BIKE) via liboqs-python.

    Args:
        name: a qgate name (``ml-kem-768``) or a liboqs mechanism name (``FrodoKEM-976-AES``).

    Raises:
        CryptoError: liboqs is missing or does not enable this mechanism.
    """

    def __init__(self, name: str) -> None:
        self._oqs = _import_oqs()
        params = _MLKEM_PARAMS.get(name)
        self._mlkem_k = params.k if params else None
        self._mechanism = params.liboqs_name if params else name
        self._name = name
        try:
            details = self._oqs.KeyEncapsulation(self._mechanism).details  # type: ignore[attr-defined]
        except Exception as exc:
            raise CryptoError(f"liboqs does not offer KEM {name!r}") from exc
        self._ek_size = int(details["length_public_key"])
        self._ct_size = int(details["length_ciphertext"])
        self._ss_size = int(details["length_shared_secret"])

    def __repr__(self) -> str:
        return f"LiboqsKem({self._name!r})"

    @property
    def name(self) -> str:
        return self._name

    @property
    def encapsulation_key_size(self) -> int:
        return self._ek_size

    @property
    def ciphertext_size(self) -> int:
        return self._ct_size

    @property
    def shared_secret_size(self) -> int:
        return self._ss_size

    def generate(self) -> KemDecapsulationKey:
        kem = self._oqs.KeyEncapsulation(self._mechanism)  # type: ignore[attr-defined]
        public = bytes(kem.generate_keypair())
        return _LiboqsDecapsulationKey(kem, public, self._ct_size)

    def encapsulate(self, encapsulation_key: bytes) -> tuple[Secret, bytes]:
        if self._mlkem_k is not None:
            check_mlkem_encapsulation_key(encapsulation_key, self._mlkem_k)
        elif len(encapsulation_key) != self._ek_size:
            raise CryptoError(
                f"{self._name} encapsulation key has {len(encapsulation_key)} bytes, expected {self._ek_size}"
            )
        try:
            kem = self._oqs.KeyEncapsulation(self._mechanism)  # type: ignore[attr-defined]
            ciphertext, shared = kem.encap_secret(encapsulation_key)
        except Exception as exc:
            raise CryptoError(f"{self._name} encapsulation failed") from exc
        return Secret(bytes(shared)), bytes(ciphertext)


# --- selection --------------------------------------------------------------------------


def available_kem_providers() -> list[str]:
    """List usable KEM providers, default first: ``["cryptography"]`` plus ``"liboqs"`` if present."""
    providers = [PROVIDER_CRYPTOGRAPHY]
    if _liboqs_present():
        try:
            _import_oqs()
        except CryptoError:
            logger.warning("liboqs library found but liboqs-python is not usable")
        else:
            providers.append(PROVIDER_LIBOQS)
    return providers


def get_kem(name: str, provider: str = PROVIDER_CRYPTOGRAPHY) -> KemAlgorithm:
    """Return the KEM ``name`` from ``provider``.

    Args:
        name: ``ml-kem-768`` or ``ml-kem-1024`` (any liboqs mechanism name with ``liboqs``).
        provider: ``cryptography`` (default) or ``liboqs``.

    Raises:
        CryptoError: unknown name or provider, or the provider is not installed.
    """
    if provider == PROVIDER_CRYPTOGRAPHY:
        if name not in _MLKEM_PARAMS:
            raise CryptoError(f"unknown KEM {name!r} (have: {', '.join(sorted(_MLKEM_PARAMS))})")
        return CryptographyMlKem(name)
    if provider == PROVIDER_LIBOQS:
        return LiboqsKem(name)
    raise CryptoError(f"unknown KEM provider {provider!r}")
