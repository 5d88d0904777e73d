"""Gateway identities (FIPS 204 ML-DSA-65 / ML-DSA-87): PEM round trips, sign and verify."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from qgate.crypto.identity import IdentityKey, PeerPublicKey
from qgate.errors import AuthenticationError, ConfigError

ALGS = ["ml-dsa-65", "ml-dsa-87"]
SIG_SIZE = {"ml-dsa-65": 3309, "ml-dsa-87": 4627}


@pytest.mark.parametrize("alg", ALGS)
def test_sign_verify_round_trip_through_pem(alg: str) -> None:
    key = IdentityKey.generate(alg)
    loaded = IdentityKey.from_pem(key.to_pem())
    public = PeerPublicKey.from_pem(key.public_key().to_pem())
    assert loaded.alg == public.alg == alg
    assert public == loaded.public_key() == key.public_key()
    signature = loaded.sign(b"transcript")
    assert len(signature) == public.signature_size == SIG_SIZE[alg]
    public.verify(signature, b"transcript")
    assert b"PRIVATE KEY" in key.to_pem() and b"PUBLIC KEY" in public.to_pem()


@pytest.mark.parametrize("alg", ALGS)
def test_verify_rejects_wrong_key_message_context_and_length(alg: str) -> None:
    key, other = IdentityKey.generate(alg), IdentityKey.generate(alg)
    signature = key.sign(b"m", context=b"qgate")
    key.public_key().verify(signature, b"m", context=b"qgate")
    with pytest.raises(AuthenticationError):
        other.public_key().verify(signature, b"m", context=b"qgate")
    with pytest.raises(AuthenticationError):
        key.public_key().verify(signature, b"M", context=b"qgate")
    with pytest.raises(AuthenticationError):
        key.public_key().verify(signature, b"m")
    with pytest.raises(AuthenticationError):
        key.public_key().verify(signature[:-1], b"m", context=b"qgate")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(AuthenticationError):
        key.public_key().verify(flipped, b"m", context=b"qgate")


def test_fingerprint_is_sha256_of_raw_public_key_16_hex() -> None:
    public = IdentityKey.generate("ml-dsa-65").public_key()
    assert public.fingerprint() == hashlib.sha256(public.public_bytes()).hexdigest()[:16]
    assert public.fingerprint() in repr(public)
    assert PeerPublicKey.from_raw("ml-dsa-65", public.public_bytes()) == public


def test_identity_repr_hides_key() -> None:
    assert "SECRET" in repr(IdentityKey.generate("ml-dsa-65"))


def test_unsupported_and_garbled_keys_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        IdentityKey.generate("ed448")
    with pytest.raises(ConfigError):
        IdentityKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError):
        PeerPublicKey.from_pem(b"not pem")
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_pem = ed.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError):
        IdentityKey.from_pem(ed_pem)
    ec_pub = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError):
        PeerPublicKey.from_pem(ec_pub)
    with pytest.raises(ConfigError):
        PeerPublicKey.from_raw("ml-dsa-65", bytes(10))
    encrypted = IdentityKey.generate("ml-dsa-65")._key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(ConfigError):
        IdentityKey.from_pem(encrypted)
