"""ML-KEM (FIPS 203) ACVP encapDecap vectors through the test-only kyber-py provider, plus interop.

The production ``cryptography`` provider cannot encapsulate with a fixed ``m`` nor load an
expanded ``dk``, so every ACVP encapDecap case runs through ``testproviders.KyberPyMlKem``
(which implements ``qgate.crypto.kem.KemAlgorithm``):

- encapsulation (AFT): ``ek`` and fixed ``m`` -> expected ``c`` and ``k`` (FIPS 203 algorithm 17);
- decapsulation (VAL): expanded ``dk`` and ``c`` -> expected ``k``, including the "modify
  ciphertext" cases that must return the implicit-rejection key ``J(z || c)`` (algorithm 18).

Test ids are ``<parameter set>-<function>-tc<tcId>``; the per-file counts are checked too.
Interop: ``cryptography`` decapsulates kyber-py ciphertexts for a key made from the same seed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

import pytest
from testproviders import KYBER_PARAMS, KyberPyMlKem, ScriptedRng, ShakeRng
from vectors import load_json

from qgate.crypto.kem import CryptographyMlKem, get_kem

ACVP_DIR: Final = ("mlkem", "acvp", "ML-KEM-encapDecap-FIPS203")
KEYGEN_DIR: Final = ("mlkem", "acvp", "ML-KEM-keyGen-FIPS203")
NAMES: Final = {"ML-KEM-512": "ml-kem-512", "ML-KEM-768": "ml-kem-768", "ML-KEM-1024": "ml-kem-1024"}
EXPECTED_CASES: Final = {
    ("ml-kem-512", "encapsulation"): 25,
    ("ml-kem-768", "encapsulation"): 25,
    ("ml-kem-1024", "encapsulation"): 25,
    ("ml-kem-512", "decapsulation"): 10,
    ("ml-kem-768", "decapsulation"): 10,
    ("ml-kem-1024", "decapsulation"): 10,
}
"""Cases in the ACVP sample vector set (vsId 42), by parameter set and function."""


def _cases() -> list[tuple[str, str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """Return ``(name, function, group, prompt test, expected test)`` for every ACVP case."""
    prompt = load_json(*ACVP_DIR, "prompt.json")
    expected = load_json(*ACVP_DIR, "expectedResults.json")
    answers = {(g["tgId"], t["tcId"]): t for g in expected["testGroups"] for t in g["tests"]}
    return [
        (NAMES[g["parameterSet"]], g["function"], g, t, answers[(g["tgId"], t["tcId"])])
        for g in prompt["testGroups"]
        for t in g["tests"]
    ]


def _params(function: str) -> list[Any]:
    return [
        pytest.param(name, group, test, answer, id=f"{name}-{function}-tc{test['tcId']}")
        for name, func, group, test, answer in _cases()
        if func == function
    ]


def test_acvp_encap_decap_file_has_the_expected_case_counts() -> None:
    counts = Counter((name, func) for name, func, _g, _t, _a in _cases())
    assert dict(counts) == EXPECTED_CASES


@pytest.mark.parametrize(("name", "group", "test", "answer"), _params("encapsulation"))
def test_encapsulation_with_fixed_m_matches_acvp(
    name: str, group: dict[str, Any], test: dict[str, str], answer: dict[str, str]
) -> None:
    kem = KyberPyMlKem(name, ScriptedRng(bytes.fromhex(test["m"])))
    shared, ciphertext = kem.encapsulate(bytes.fromhex(test["ek"]))
    assert ciphertext.hex() == answer["c"].lower()
    assert shared.reveal().hex() == answer["k"].lower()


@pytest.mark.parametrize(("name", "group", "test", "answer"), _params("decapsulation"))
def test_decapsulation_with_expanded_dk_matches_acvp_including_implicit_rejection(
    name: str, group: dict[str, Any], test: dict[str, str], answer: dict[str, str]
) -> None:
    kem = KyberPyMlKem(name, ScriptedRng())
    dk = kem.load_expanded(bytes.fromhex(group["dk"]))
    assert dk.decapsulate(bytes.fromhex(test["c"])).reveal().hex() == answer["k"].lower()


def test_decapsulation_cases_cover_implicit_rejection() -> None:
    projection = load_json(*ACVP_DIR, "internalProjection.json")
    reasons = Counter(
        (NAMES[g["parameterSet"]], t["reason"])
        for g in projection["testGroups"]
        if g["function"] == "decapsulation"
        for t in g["tests"]
    )
    for name in ("ml-kem-768", "ml-kem-1024"):
        assert reasons[(name, "modify ciphertext")] == 5
        assert reasons[(name, "no modification")] == 5


def _keygen_seeds() -> list[Any]:
    prompt = load_json(*KEYGEN_DIR, "prompt.json")
    return [
        pytest.param(
            NAMES[g["parameterSet"]], t["d"] + t["z"], id=f"{NAMES[g['parameterSet']]}-tc{t['tcId']}"
        )
        for g in prompt["testGroups"]
        if g["parameterSet"] != "ML-KEM-512"  # the production provider offers 768 and 1024 only
        for t in g["tests"]
    ]


@pytest.mark.parametrize(("name", "seed_hex"), _keygen_seeds())
def test_production_decapsulates_kyber_py_ciphertexts_for_a_key_from_the_same_seed(
    name: str, seed_hex: str
) -> None:
    seed = bytes.fromhex(seed_hex)
    kyber = KyberPyMlKem(name, ShakeRng(b"qgate test: ML-KEM interop m " + seed))
    production = get_kem(name)
    assert isinstance(production, CryptographyMlKem)
    production_dk = production.from_seed(seed)
    assert production_dk.encapsulation_key() == kyber.from_seed(seed).encapsulation_key()
    shared, ciphertext = kyber.encapsulate(production_dk.encapsulation_key())
    assert production_dk.decapsulate(ciphertext) == shared
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    rejected = production_dk.decapsulate(tampered)  # implicit rejection, the same in both
    assert rejected != shared
    assert kyber.from_seed(seed).decapsulate(tampered) == rejected


@pytest.mark.parametrize("name", ["ml-kem-768", "ml-kem-1024"])
def test_kyber_py_decapsulates_production_ciphertexts(name: str) -> None:
    kyber = KyberPyMlKem(name, ShakeRng(b"qgate test: ML-KEM interop seed " + name.encode()))
    dk = kyber.generate()
    shared, ciphertext = get_kem(name).encapsulate(dk.encapsulation_key())
    assert dk.decapsulate(ciphertext) == shared


def test_kyber_py_provider_sizes_match_fips_203_table_3() -> None:
    sizes = {
        n: (p.encapsulation_key_size, p.decapsulation_key_size, p.ciphertext_size)
        for n, p in KYBER_PARAMS.items()
    }
    assert sizes == {
        "ml-kem-512": (800, 1632, 768),
        "ml-kem-768": (1184, 2400, 1088),
        "ml-kem-1024": (1568, 3168, 1568),
    }
