"""HKDF (RFC 5869) as used by the combiner: RFC 5869 appendix A and Wycheproof vectors."""

from __future__ import annotations

from typing import Any

import pytest
from vectors import parse_rsp, wycheproof_tests

from qgate.crypto.combiner import hkdf, hkdf_expand
from qgate.errors import CryptoError

_HASHES = {"SHA-256": "sha256", "SHA-384": "sha384", "SHA-512": "sha512"}

RFC_ROWS = [
    pytest.param(rec, id=f"{name}-{rec['COUNT']}")
    for name in ("rfc-5869-HKDF-SHA256.txt", "hkdf-generated.txt")
    for rec in parse_rsp("hkdf", name, start_key="COUNT")
    if rec["Hash"] in _HASHES  # SHA-1 rows: qgate does not offer HKDF-SHA-1
]


@pytest.mark.parametrize("rec", RFC_ROWS)
def test_hkdf_matches_rfc5869_vectors(rec: dict[str, str]) -> None:
    okm = hkdf(
        _HASHES[rec["Hash"]],
        bytes.fromhex(rec["IKM"]),
        salt=bytes.fromhex(rec["salt"]),
        info=bytes.fromhex(rec["info"]),
        length=int(rec["L"]),
    )
    assert okm.hex() == rec["OKM"].lower()


@pytest.mark.parametrize("rec", [r for r in RFC_ROWS if "PRK" in r.values[0]])
def test_hkdf_expand_matches_rfc5869_prk_to_okm(rec: dict[str, str]) -> None:
    """The Expand step alone (qgate's KS-RA uses it on the chaining key), RFC 5869 appendix A."""
    okm = hkdf_expand(
        _HASHES[rec["Hash"]], bytes.fromhex(rec["PRK"]), info=bytes.fromhex(rec["info"]), length=int(rec["L"])
    )
    assert okm.hex() == rec["OKM"].lower()


WYCHEPROOF = [
    pytest.param(name, test, id=f"{name}-tc{test['tcId']}")
    for name, file in (
        ("sha256", "wycheproof_hkdf_sha256_test.json"),
        ("sha384", "wycheproof_hkdf_sha384_test.json"),
    )
    for _group, test in wycheproof_tests("hkdf", file)
]


@pytest.mark.parametrize(("name", "test"), WYCHEPROOF)
def test_hkdf_matches_wycheproof(name: str, test: dict[str, Any]) -> None:
    ikm = bytes.fromhex(test["ikm"])
    salt, info = bytes.fromhex(test["salt"]), bytes.fromhex(test["info"])
    if test["result"] == "invalid":  # SizeTooLarge: more than 255 x HashLen bytes
        with pytest.raises(CryptoError):
            hkdf(name, ikm, salt=salt, info=info, length=test["size"])
    else:
        assert hkdf(name, ikm, salt=salt, info=info, length=test["size"]).hex() == test["okm"]
