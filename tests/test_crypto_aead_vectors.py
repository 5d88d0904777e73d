"""AES-256-GCM (NIST SP 800-38D) of qgate.crypto.aead against Wycheproof and NIST CAVP vectors.

Only 256-bit keys with 96-bit IVs and 128-bit tags apply (what qgate uses). Vectors whose IV
starts with 4 zero bytes also go through ``RecordKey.seal/open`` (nonce = 0^32 || counter).
"""

from __future__ import annotations

from typing import Any

import pytest
from vectors import parse_rsp, wycheproof_tests

from qgate.crypto.aead import RecordKey, aes256gcm_open, aes256gcm_seal
from qgate.crypto.secret import Secret
from qgate.errors import AuthenticationError

_ZERO4 = bytes(4)


def _record_key_round_trip(key: bytes, iv: bytes, aad: bytes, pt: bytes, sealed: bytes) -> None:
    if iv[:4] != _ZERO4:
        return
    record = RecordKey(Secret(key))
    counter = int.from_bytes(iv[4:], "big")
    assert record.seal(counter, aad, pt) == sealed
    assert record.open(counter, aad, sealed) == pt


WYCHEPROOF = [
    pytest.param(t, id=f"tc{t['tcId']}")
    for g, t in wycheproof_tests("aes_gcm", "wycheproof_aes_gcm_test.json")
    if g["keySize"] == 256 and g["ivSize"] == 96 and g["tagSize"] == 128
]


@pytest.mark.parametrize("test", WYCHEPROOF)
def test_aes256gcm_matches_wycheproof(test: dict[str, Any]) -> None:
    key, iv = bytes.fromhex(test["key"]), bytes.fromhex(test["iv"])
    aad, msg = bytes.fromhex(test["aad"]), bytes.fromhex(test["msg"])
    sealed = bytes.fromhex(test["ct"] + test["tag"])
    if test["result"] == "invalid":  # modified tags
        with pytest.raises(AuthenticationError):
            aes256gcm_open(key, iv, aad, sealed)
        if iv[:4] == _ZERO4:
            with pytest.raises(AuthenticationError):
                RecordKey(Secret(key)).open(int.from_bytes(iv[4:], "big"), aad, sealed)
        return
    assert aes256gcm_seal(key, iv, aad, msg) == sealed
    assert aes256gcm_open(key, iv, aad, sealed) == msg
    _record_key_round_trip(key, iv, aad, msg, sealed)


def _cavp(name: str) -> list[Any]:
    return [
        pytest.param(rec, id=f"{rec['ptlen']}-{rec['aadlen']}-{rec['Count']}")
        for rec in parse_rsp("aes_gcm", name, start_key="Count")
    ]


@pytest.mark.parametrize("rec", _cavp("nist_cavp_gcmEncryptExtIV256_IV96_Tag128.rsp"))
def test_aes256gcm_seal_matches_cavp_encrypt(rec: dict[str, str]) -> None:
    key, iv = bytes.fromhex(rec["Key"]), bytes.fromhex(rec["IV"])
    aad, pt = bytes.fromhex(rec["AAD"]), bytes.fromhex(rec["PT"])
    sealed = bytes.fromhex(rec["CT"] + rec["Tag"])
    assert aes256gcm_seal(key, iv, aad, pt) == sealed
    assert aes256gcm_open(key, iv, aad, sealed) == pt
    _record_key_round_trip(key, iv, aad, pt, sealed)


@pytest.mark.parametrize("rec", _cavp("nist_cavp_gcmDecrypt256_IV96_Tag128.rsp"))
def test_aes256gcm_open_matches_cavp_decrypt(rec: dict[str, str]) -> None:
    key, iv, aad = bytes.fromhex(rec["Key"]), bytes.fromhex(rec["IV"]), bytes.fromhex(rec["AAD"])
    sealed = bytes.fromhex(rec["CT"] + rec["Tag"])
    if "FAIL" in rec:
        with pytest.raises(AuthenticationError):
            aes256gcm_open(key, iv, aad, sealed)
    else:
        assert aes256gcm_open(key, iv, aad, sealed) == bytes.fromhex(rec["PT"])


def test_record_key_rejects_truncated_record() -> None:
    with pytest.raises(AuthenticationError):
        RecordKey(Secret(bytes(32))).open(0, b"h", bytes(15))
