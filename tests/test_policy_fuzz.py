"""Fuzzed policies raise only PolicyError: anything else escaping the parser is a bug."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TypeAlias

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qgate.errors import PolicyError
from qgate.policy import describe_schema, parse_policy

Yamlish: TypeAlias = bool | int | float | str | list["Yamlish"] | dict[str, "Yamlish"] | None

KEYS = sorted({doc.path.rsplit(".", 1)[-1].removesuffix("[]") for doc in describe_schema()})
SOURCE = Path("/etc/qgate/fuzz.yaml")
BASE = (Path(__file__).resolve().parent.parent / "policies" / "site-a.yaml").read_text()

plausible_strings = st.sampled_from(
    [
        "10.99.0.1:51820",
        "[::1]:51820",
        "10.2.0.0/24",
        "10.2.0.1/24",
        "::/0",
        "https://127.0.0.1:8443",
        "http://x",
        "https://[::1]:99999",
        "SAE_A",
        "master",
        "slave",
        "ml-kem-768",
        "qkd_and_pqc",
        "keys/site-a.key",
        "",
        "..",
    ]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    plausible_strings,
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))
values: st.SearchStrategy[Yamlish] = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=25,
)


def _parse_only_policy_errors(text: str) -> None:
    try:
        parse_policy(text, source=SOURCE)
    except PolicyError as err:
        assert err.problems
        assert str(err)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_random_text_raises_only_policy_error(text: str) -> None:
    _parse_only_policy_errors(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \n\t:-[]{},'\"#&*!|>%@`?abc01.", max_size=200))
def test_random_yaml_punctuation_raises_only_policy_error(text: str) -> None:
    _parse_only_policy_errors(text)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["gateway", "kme", "peers", "x"]), values, max_size=4))
def test_random_yamlish_mappings_raise_only_policy_error(document: dict[str, Yamlish]) -> None:
    _parse_only_policy_errors(yaml.safe_dump(document))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_policy_raises_only_policy_error(data: st.DataObject) -> None:
    document = yaml.safe_load(BASE)
    node = document
    while True:
        if isinstance(node, list):
            index = data.draw(st.integers(0, len(node) - 1))
            child = node[index]
        else:
            index = data.draw(st.sampled_from(sorted(node)))
            child = node[index]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        break
    if isinstance(node, dict) and data.draw(st.booleans()):
        del node[index]
    else:
        node[index] = data.draw(values)
    _parse_only_policy_errors(yaml.safe_dump(document))


@pytest.mark.parametrize(
    "text",
    [
        'gateway: {tun: {mtu: !!int ""}}\n',  # PyYAML reads value[0] of an empty explicit int
        'kme: {timeout: !!float "-"}\n',
        "peers: [{x25519: !!bool maybe}]\n",
        'kme: {url: "https://' + "a" * 60 + '_:8443"}\n',  # once exponential regex backtracking
    ],
)
def test_inputs_found_by_the_fuzzer_raise_policy_error_quickly(text: str) -> None:
    start = time.monotonic()
    with pytest.raises(PolicyError):
        parse_policy(text, source=None)
    assert time.monotonic() - start < 1.0
