"""ML-KEM (FIPS 203) through qgate.crypto.kem: ACVP, KAT and Wycheproof vectors.

``cryptography`` loads private keys only from the 64-byte seed d || z and encapsulates only
with fresh randomness, so: keyGen is checked from seeds (ACVP, Wycheproof), decapsulation from
seed-derived keys (KAT incl. implicit rejection, Wycheproof), encapsulation by interop
(kyber-py decapsulates what qgate encapsulated) and by rejecting invalid keys (Wycheproof).
"""

from __future__ import annotations

from typing import Any

import pytest
from kyber_py.ml_kem import ML_KEM_768, ML_KEM_1024
from vectors import load_json, parse_rsp, wycheproof_tests

from qgate.crypto.kem import (
    CryptographyMlKem,
    available_kem_providers,
    check_mlkem_encapsulation_key,
    get_kem,
)
from qgate.crypto.secret import Secret
from qgate.errors import CryptoError

_NAMES = {"ML-KEM-768": "ml-kem-768", "ML-KEM-1024": "ml-kem-1024"}
_KYBER_PY = {"ml-kem-768": ML_KEM_768, "ml-kem-1024": ML_KEM_1024}


def _kem(name: str) -> CryptographyMlKem:
    kem = get_kem(name)
    assert isinstance(kem, CryptographyMlKem)
    return kem


def _acvp_keygen() -> list[Any]:
    prompt = load_json("mlkem", "acvp", "ML-KEM-keyGen-FIPS203", "prompt.json")
    expected = load_json("mlkem", "acvp", "ML-KEM-keyGen-FIPS203", "expectedResults.json")
    answers = {(g["tgId"], t["tcId"]): t for g in expected["testGroups"] for t in g["tests"]}
    return [
        pytest.param(_NAMES[g["parameterSet"]], t, answers[(g["tgId"], t["tcId"])], id=f"tc{t['tcId']}")
        for g in prompt["testGroups"]
        if g["parameterSet"] in _NAMES  # ML-KEM-512 is not offered
        for t in g["tests"]
    ]


@pytest.mark.parametrize(("name", "prompt", "answer"), _acvp_keygen())
def test_keygen_from_seed_matches_acvp(name: str, prompt: dict[str, str], answer: dict[str, str]) -> None:
    key = _kem(name).from_seed(bytes.fromhex(prompt["d"] + prompt["z"]))
    assert key.encapsulation_key() == bytes.fromhex(answer["ek"])


def _wycheproof(kind: str) -> list[Any]:
    return [
        pytest.param(name, test, id=f"{name}-tc{test['tcId']}")
        for name, bits in (("ml-kem-768", "768"), ("ml-kem-1024", "1024"))
        for _group, test in wycheproof_tests("mlkem", "wycheproof", f"mlkem_{bits}_{kind}.json")
    ]


@pytest.mark.parametrize(("name", "test"), _wycheproof("keygen_seed_test"))
def test_keygen_from_seed_matches_wycheproof(name: str, test: dict[str, str]) -> None:
    assert _kem(name).from_seed(bytes.fromhex(test["seed"])).encapsulation_key().hex() == test["ek"]


@pytest.mark.parametrize(("name", "test"), _wycheproof("test"))
def test_decapsulate_matches_wycheproof(name: str, test: dict[str, str]) -> None:
    seed, ciphertext = bytes.fromhex(test["seed"]), bytes.fromhex(test["c"])
    if test["result"] == "invalid":  # seed or ciphertext of the wrong length
        with pytest.raises(CryptoError):
            _kem(name).from_seed(seed).decapsulate(ciphertext)
        return
    key = _kem(name).from_seed(seed)
    assert key.encapsulation_key().hex() == test["ek"]
    assert key.decapsulate(ciphertext) == Secret(bytes.fromhex(test["K"]))


@pytest.mark.parametrize(("name", "test"), _wycheproof("encaps_test"))
def test_encapsulate_rejects_invalid_wycheproof_keys(name: str, test: dict[str, str]) -> None:
    ek = bytes.fromhex(test["ek"])
    kem = _kem(name)
    if test["result"] == "invalid":  # modulus overflow, not reduced, too short / long
        with pytest.raises(CryptoError):
            kem.encapsulate(ek)
    else:
        shared, ciphertext = kem.encapsulate(ek)
        assert len(shared) == 32 and len(ciphertext) == kem.ciphertext_size


@pytest.mark.parametrize(("name", "test"), _wycheproof("encaps_test"))
def test_qgates_own_public_key_check_rejects_invalid_wycheproof_keys(name: str, test: dict[str, str]) -> None:
    """The FIPS 203 s7.2 check by itself (not only the provider's own refusal)."""
    ek = bytes.fromhex(test["ek"])
    k = 3 if name.endswith("768") else 4
    if test["result"] == "invalid":
        with pytest.raises(CryptoError):
            check_mlkem_encapsulation_key(ek, k)
    else:
        check_mlkem_encapsulation_key(ek, k)


def _kat(name: str) -> list[Any]:
    bits = name.rsplit("-", 1)[1]
    return [
        pytest.param(name, rec, id=f"{name}-{rec['count']}")
        for rec in parse_rsp("mlkem", "kat", f"kat_MLKEM_{bits}_first25.rsp", start_key="count")
    ]


@pytest.mark.parametrize(("name", "rec"), _kat("ml-kem-768") + _kat("ml-kem-1024"))
def test_kat_keygen_decaps_and_implicit_rejection(name: str, rec: dict[str, str]) -> None:
    key = _kem(name).from_seed(bytes.fromhex(rec["d"] + rec["z"]))
    assert key.encapsulation_key().hex() == rec["pk"]
    assert key.decapsulate(bytes.fromhex(rec["ct"])).reveal().hex() == rec["ss"]
    # FIPS 203 section 6.3: a corrupted ciphertext yields the implicit-rejection key J(z || c)
    assert key.decapsulate(bytes.fromhex(rec["ct_n"])).reveal().hex() == rec["ss_n"]


@pytest.mark.parametrize(("name", "rec"), [*_kat("ml-kem-768")[:5], *_kat("ml-kem-1024")[:5]])
def test_encapsulation_interoperates_with_kyber_py(name: str, rec: dict[str, str]) -> None:
    shared, ciphertext = get_kem(name).encapsulate(bytes.fromhex(rec["pk"]))
    assert _KYBER_PY[name].decaps(bytes.fromhex(rec["sk"]), ciphertext) == shared.reveal()


@pytest.mark.parametrize("name", ["ml-kem-768", "ml-kem-1024"])
def test_generate_encapsulate_decapsulate_round_trip(name: str) -> None:
    kem = get_kem(name)
    key = kem.generate()
    ek = key.encapsulation_key()
    assert len(ek) == kem.encapsulation_key_size
    shared, ciphertext = kem.encapsulate(ek)
    assert len(ciphertext) == kem.ciphertext_size
    assert key.decapsulate(ciphertext) == shared
    assert "SECRET" in repr(key)


@pytest.mark.parametrize("name", ["ml-kem-768", "ml-kem-1024"])
def test_decapsulate_rejects_wrong_ciphertext_length(name: str) -> None:
    kem = get_kem(name)
    key = kem.generate()
    for size in (0, kem.ciphertext_size - 1, kem.ciphertext_size + 1):
        with pytest.raises(CryptoError):
            key.decapsulate(bytes(size))


def test_modulus_check_rejects_coefficient_equal_to_q() -> None:
    ek = bytearray(384 * 3 + 32)
    check_mlkem_encapsulation_key(bytes(ek), 3)
    ek[0], ek[1] = 0x01, 0x0D  # first coefficient = 0xD01 = 3329 = q
    with pytest.raises(CryptoError):
        check_mlkem_encapsulation_key(bytes(ek), 3)
    ek[0], ek[1], ek[2] = 0, 0x10, 0xD0  # second coefficient = 0xD01
    with pytest.raises(CryptoError):
        check_mlkem_encapsulation_key(bytes(ek), 3)


def test_get_kem_rejects_unknown_names_and_providers() -> None:
    with pytest.raises(CryptoError):
        get_kem("ml-kem-512")
    with pytest.raises(CryptoError):
        get_kem("ml-kem-768", provider="nope")
    with pytest.raises(CryptoError):
        _kem("ml-kem-768").from_seed(bytes(63))


def test_available_providers_lists_cryptography_first() -> None:
    assert available_kem_providers()[0] == "cryptography"
