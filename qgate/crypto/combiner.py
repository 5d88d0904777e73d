"""ETSI TS 103 744 hybrid key combiners: CatKDF (section 8.2) and CasKDF (section 8.3).

Building blocks, as the TS names them:

- ``f`` (section 7.2, concatenate-and-hash formatting function):
  ``f(a1, ..., an) = H(len(a1) || a1 || ... || len(an) || an)`` with ``len`` the byte length as a
  4-byte big-endian integer.
- PRF (section 7.3.2): ``HMAC-H(secret, f(k_i, MA_i, MB_i))``.
- KDF(secret, label, context, length) (section 7.4): HKDF (RFC 5869; salt = label,
  IKM = secret, info = context) or the NIST SP 800-56C rev. 2 one-step KDF with HMAC
  (``K(i) = HMAC(salt = label, [i]_32 || secret || context)``).
- CatKDF: ``KDF(psk || k_1 || ... || k_n, label, f(context, MA, MB), length)``.
- CasKDF round i: ``round_secret_i = PRF(chain_secret_{i-1}, ...)`` then
  ``chain_secret_i || key_material_i = KDF(round_secret_i, label_i, context_i, |H| + length)``.

Where the TS text and ETSI's informative reference code (etsi-forge/cyber.103744_QHKEX,
whose output is ``../shared/vectors/etsi_ts103744``) part ways:

- label: the TS (V1.1.1 test vector C.2.1) uses ``label = LA || LB``; the reference code uses
  ``LA XOR LB`` (labels of equal length).
- message format (Annex C.1, "not a suggested message format"): the reference code writes
  ``cid || len(L) || L || len(P1) || P1 ...`` with each 4-byte ``len`` holding the number of
  *hex characters* of the field (twice its byte length); the TS length is the byte length.

The TS text could only be checked through its V1.1.1 CatKDF test vector C.2.1 (reproduced in
the tests with ``reference_prefixes=False``); the CasKDF round structure above matches the
reference code and its 24 rows, with no divergence found beyond the two points listed.

``reference_prefixes=True`` selects the reference code's behaviour for both (labels XORed
here, hex-character lengths in :func:`format_message`), to reproduce the published vectors.
Production code leaves it False. KMAC (section 7.3.3 / 7.4.4) is not offered: ``cryptography``
has no KMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from typing import Final, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from qgate.crypto.secret import Secret
from qgate.errors import CryptoError

HashName = Literal["sha256", "sha384", "sha512"]
KdfName = Literal["hkdf", "hmac"]

_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_U32_MAX: Final = 0xFFFFFFFF

SecretLike = bytes | Secret


def _raw(value: SecretLike) -> bytes:
    return value.reveal() if isinstance(value, Secret) else value


def _hash(hash_name: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[hash_name]()
    except KeyError:
        raise CryptoError(f"unsupported hash {hash_name!r} (have: {', '.join(_HASHES)})") from None


def digest_size(hash_name: str) -> int:
    """Return the output size in bytes of ``sha256`` (32), ``sha384`` (48) or ``sha512`` (64)."""
    return _hash(hash_name).digest_size


def _u32(value: int) -> bytes:
    if not 0 <= value <= _U32_MAX:
        raise CryptoError("field too long for a 4-byte length prefix")
    return struct.pack(">I", value)


def context_hash(hash_name: str, *fields: bytes) -> bytes:
    """TS 103 744 section 7.2 formatting function f: ``H(len(a1) || a1 || ... || len(an) || an)``.

    Args:
        hash_name: ``sha256``, ``sha384`` or ``sha512``.
        fields: the arguments in order; each is prefixed with its byte length (4 bytes,
            big-endian).

    Returns:
        The digest (32, 48 or 64 bytes).
    """
    digest = hashlib.new(_hash(hash_name).name)
    for field in fields:
        digest.update(_u32(len(field)))
        digest.update(field)
    return digest.digest()


def format_message(cid: bytes, fields: Sequence[bytes], *, reference_prefixes: bool = False) -> bytes:
    """Build a TS 103 744 Annex C.1 style message ``cid || len(F1) || F1 || ... || len(Fn) || Fn``.

    Args:
        cid: the combiner/cipher-suite identifier, written first with no length.
        fields: label and public values in order (e.g. LA, PA1, PA2).
        reference_prefixes: write each 4-byte big-endian length as the number of hex
            characters (2 x bytes), as the ETSI reference code does; False writes bytes.

    Returns:
        The encoded message.
    """
    scale = 2 if reference_prefixes else 1
    parts = [cid]
    for field in fields:
        parts.append(_u32(scale * len(field)))
        parts.append(field)
    return b"".join(parts)


def hkdf(hash_name: str, ikm: SecretLike, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Extract-then-Expand (RFC 5869 section 2).

    Args:
        hash_name: ``sha256``, ``sha384`` or ``sha512``.
        ikm: input keying material.
        salt: extract salt (empty means a string of HashLen zeros, RFC 5869 section 2.2).
        info: expand context.
        length: output bytes, 1 .. 255 x HashLen.

    Raises:
        CryptoError: unsupported hash or length out of range.
    """
    algorithm = _hkdf_hash(hash_name, length)
    return HKDF(algorithm, length, salt, info).derive(_raw(ikm))


def hkdf_expand(hash_name: str, prk: SecretLike, *, info: bytes, length: int) -> bytes:
    """HKDF-Expand alone (RFC 5869 section 2.3), for a PRK that is already uniformly random.

    Args:
        hash_name: ``sha256``, ``sha384`` or ``sha512``.
        prk: pseudorandom key of at least HashLen bytes (qgate: a 48-byte chaining key).
        info: expand context.
        length: output bytes, 1 .. 255 x HashLen.

    Raises:
        CryptoError: unsupported hash or length out of range.
    """
    return HKDFExpand(_hkdf_hash(hash_name, length), length, info).derive(_raw(prk))


def _hkdf_hash(hash_name: str, length: int) -> hashes.HashAlgorithm:
    """The hash for HKDF, after checking the output length (1 .. 255 x HashLen, RFC 5869 section 2.3)."""
    algorithm = _hash(hash_name)
    if not 0 < length <= 255 * algorithm.digest_size:
        raise CryptoError(f"HKDF-{hash_name} output length {length} out of range")
    return algorithm


def one_step_kdf_hmac(hash_name: str, secret: SecretLike, *, salt: bytes, info: bytes, length: int) -> bytes:
    """NIST SP 800-56C rev. 2 section 4.1 one-step KDF, option 2 (HMAC), as OpenSSL's SSKDF.

    ``K(i) = HMAC-H(salt, [i]_32 || secret || info)`` for i = 1, 2, ...; output truncated to
    ``length`` bytes. An empty salt is replaced by zero bytes of the hash's block length (the
    SP 800-56C default); TS 103 744 section 7.4.3 passes the label as salt.

    Raises:
        CryptoError: unsupported hash or length out of range (1 .. 2^32 - 1 blocks).
    """
    algorithm = _hash(hash_name)
    block = algorithm.digest_size
    if not 0 < length <= _U32_MAX * block:
        raise CryptoError(f"one-step KDF output length {length} out of range")
    key = salt or bytes(hashlib.new(algorithm.name).block_size)
    z = _raw(secret)
    out = bytearray()
    counter = 1
    while len(out) < length:
        out += hmac.new(key, _u32(counter) + z + info, algorithm.name).digest()
        counter += 1
    return bytes(out[:length])


def _kdf(kdf: str, hash_name: str, secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """TS 103 744 section 7.4: KDF(secret, label, context, length)."""
    if kdf == "hkdf":
        return hkdf(hash_name, secret, salt=label, info=context, length=length)
    if kdf == "hmac":
        return one_step_kdf_hmac(hash_name, secret, salt=label, info=context, length=length)
    raise CryptoError(f"unsupported KDF {kdf!r} (have: hkdf, hmac)")


def combine_labels(label_a: bytes, label_b: bytes, *, reference_prefixes: bool = False) -> bytes:
    """Combine both parties' labels: ``LA || LB`` (TS) or ``LA XOR LB`` (reference code).

    Raises:
        CryptoError: XOR asked for labels of different lengths.
    """
    if not reference_prefixes:
        return label_a + label_b
    if len(label_a) != len(label_b):
        raise CryptoError("reference-code labels must have equal lengths (they are XORed)")
    return bytes(a ^ b for a, b in zip(label_a, label_b, strict=True))


def cat_kdf(
    secrets: Sequence[SecretLike],
    *,
    label_a: bytes,
    label_b: bytes,
    info: bytes,
    msg_a: bytes,
    msg_b: bytes,
    length: int,
    hash_name: str = "sha384",
    psk: SecretLike = b"",
    reference_prefixes: bool = False,
    kdf: KdfName = "hkdf",
) -> bytes:
    """Concatenate hybrid key combiner, ETSI TS 103 744 section 8.2 (CatKDF).

    ``key_material = KDF(psk || k_1 || ... || k_n, label, f(info, MA, MB), length)``.

    Args:
        secrets: the component shared secrets k_1..k_n in order (qgate: ML-KEM shared
            secret, QKD key, X25519 secret; the ETSI vectors: ECDH, ML-KEM).
        label_a: initiator's label LA.
        label_b: responder's label LB.
        info: the context string bound into f.
        msg_a: all the initiator sent (MA).
        msg_b: all the responder sent (MB).
        length: bytes of key material to derive.
        hash_name: ``sha384`` (qgate) or ``sha256`` / ``sha512``.
        psk: optional pre-shared key, placed first in the secret.
        reference_prefixes: reproduce the ETSI reference code (labels XORed).
        kdf: ``hkdf`` (section 7.4.2) or ``hmac`` (one-step KDF, section 7.4.3).

    Returns:
        ``length`` bytes of key material.

    Raises:
        CryptoError: no secrets, unsupported hash/KDF, bad label lengths, length out of range.
    """
    if not secrets:
        raise CryptoError("CatKDF needs at least one shared secret")
    secret = _raw(psk) + b"".join(_raw(k) for k in secrets)
    label = combine_labels(label_a, label_b, reference_prefixes=reference_prefixes)
    context = context_hash(hash_name, info, msg_a, msg_b)
    return _kdf(kdf, hash_name, secret, label, context, length)


def cas_kdf(
    previous_chain_secret: SecretLike,
    secret: SecretLike,
    *,
    label_a: bytes,
    label_b: bytes,
    info: bytes,
    msg_a: bytes,
    msg_b: bytes,
    length: int,
    hash_name: str = "sha384",
    reference_prefixes: bool = False,
    kdf: KdfName = "hkdf",
) -> tuple[bytes, bytes]:
    """One round of the cascade hybrid key combiner, ETSI TS 103 744 section 8.3 (CasKDF).

    ``round_secret = HMAC-H(previous_chain_secret, f(k_i, MA_i, MB_i))``;
    ``chain_secret || key_material = KDF(round_secret, label_i, info_i, |H| + length)``.

    Args:
        previous_chain_secret: chain secret of round i-1; empty (or the psk) for round 1.
        secret: this round's shared secret k_i.
        label_a: initiator's label LA_i.
        label_b: responder's label LB_i.
        info: this round's context string (passed to the KDF as is).
        msg_a: what the initiator sent this round (MA_i).
        msg_b: what the responder sent this round (MB_i).
        length: bytes of key material to derive this round.
        hash_name: ``sha384`` (qgate) or ``sha256`` / ``sha512``.
        reference_prefixes: reproduce the ETSI reference code (labels XORed).
        kdf: ``hkdf`` or ``hmac`` as in :func:`cat_kdf`.

    Returns:
        ``(chain_secret, key_material)``: |H| bytes to chain into the next round, and
        ``length`` bytes of key material.

    Raises:
        CryptoError: unsupported hash/KDF, bad label lengths, length out of range.
    """
    if length <= 0:
        raise CryptoError("CasKDF key material length must be positive")
    algorithm = _hash(hash_name)
    label = combine_labels(label_a, label_b, reference_prefixes=reference_prefixes)
    round_secret = hmac.new(
        _raw(previous_chain_secret), context_hash(hash_name, _raw(secret), msg_a, msg_b), algorithm.name
    ).digest()
    out = _kdf(kdf, hash_name, round_secret, label, info, algorithm.digest_size + length)
    return out[: algorithm.digest_size], out[algorithm.digest_size :]
