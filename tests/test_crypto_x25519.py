"""X25519 (RFC 7748) through qgate.crypto.x25519: all Wycheproof cases."""

from __future__ import annotations

from typing import Any

import pytest
from vectors import wycheproof_tests

from qgate.crypto.secret import Secret
from qgate.crypto.x25519 import X25519KeyPair
from qgate.errors import CryptoError

CASES = [
    pytest.param(t, id=f"tc{t['tcId']}")
    for _g, t in wycheproof_tests("x25519", "wycheproof_x25519_test.json")
]


@pytest.mark.parametrize("test", CASES)
def test_exchange_matches_wycheproof(test: dict[str, Any]) -> None:
    pair = X25519KeyPair.from_private_bytes(bytes.fromhex(test["private"]))
    public = bytes.fromhex(test["public"])
    if test["shared"] == "00" * 32:  # low-order public point: must be refused
        with pytest.raises(CryptoError):
            pair.exchange(public)
    else:  # valid, and "acceptable" non-canonical / twist points: computed per RFC 7748
        assert pair.exchange(public) == Secret(bytes.fromhex(test["shared"]))


def test_generated_pairs_agree() -> None:
    a, b = X25519KeyPair.generate(), X25519KeyPair.generate()
    assert len(a.public_bytes()) == 32
    assert a.exchange(b.public_bytes()) == b.exchange(a.public_bytes())
    assert "SECRET" in repr(a)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_exchange_rejects_bad_public_length(size: int) -> None:
    with pytest.raises(CryptoError):
        X25519KeyPair.generate().exchange(bytes(size))


def test_from_private_bytes_rejects_bad_length() -> None:
    with pytest.raises(CryptoError):
        X25519KeyPair.from_private_bytes(bytes(31))
