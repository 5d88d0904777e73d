"""The policy field docs come from the validator's own tables and cover the whole contract."""

from __future__ import annotations

import dataclasses

from qgate.policy import (
    GatewayPolicy,
    KmePolicy,
    PeerPolicy,
    PpkPolicy,
    RekeyPolicy,
    TunPolicy,
    describe_schema,
    schema,
)


def _contract_paths() -> set[str]:
    """Dotted paths of every dataclass field a policy file sets (``source`` is not in the file)."""
    nested: dict[str, tuple[str, type]] = {
        "gateway": ("gateway.", GatewayPolicy),
        "tun": ("gateway.tun.", TunPolicy),
        "kme": ("kme.", KmePolicy),
        "peers": ("peers[].", PeerPolicy),
        "rekey": ("peers[].rekey.", RekeyPolicy),
        "ppk": ("peers[].ppk.", PpkPolicy),
    }
    paths = {"gateway", "kme", "peers"}
    for prefix, cls in nested.values():
        for f in dataclasses.fields(cls):
            if f.name in ("source", "kme", "peers", "tun", "metrics") and cls is GatewayPolicy:
                if f.name == "tun":
                    paths.add("gateway.tun")
                if f.name == "metrics":  # a top-level section with one key: metrics.listen
                    paths.update({"metrics", "metrics.listen"})
                continue
            paths.add(prefix + f.name)
    return paths


def test_schema_documents_exactly_the_contract_fields() -> None:
    assert {doc.path for doc in describe_schema()} == _contract_paths()


def test_schema_alias_gives_the_same_docs() -> None:
    assert schema() == describe_schema()


def test_schema_gives_type_unit_default_and_range() -> None:
    docs = {doc.path: doc for doc in describe_schema()}
    interval = docs["peers[].rekey.interval"]
    assert (interval.type, interval.unit, interval.default, interval.range) == (
        "number",
        "seconds",
        "10",
        "0.1-86400 seconds",
    )
    assert docs["peers[].rekey.max_key_age"].default == "3 x interval"
    assert "> interval" in docs["peers[].rekey.max_key_age"].range
    assert ">= interval" in docs["peers[].rekey.kem_interval"].range
    assert docs["gateway.tun.mtu"].range == "576-9000 bytes"
    assert docs["kme.timeout"].range == "0.1-60 seconds" and docs["kme.timeout"].default == "5"
    assert docs["peers[].qkd_key_bits"].range == "64-4096 bits, a multiple of 8"
    assert docs["peers[].kem"].range == "one of: ml-kem-768, ml-kem-1024"
    assert docs["peers[].x25519"].default == "true"
    assert docs["gateway.tun.name"].default == TunPolicy().name


def test_required_flags_match_the_dataclass_defaults() -> None:
    docs = {doc.path: doc for doc in describe_schema()}
    for path in ("gateway.name", "kme.url", "peers[].name", "peers[].subnets", "peers[].qkd_role"):
        assert docs[path].required and docs[path].default == "required"
    for path in ("gateway.tun", "peers[].rekey", "peers[].kem", "kme.timeout", "gateway.tun.address"):
        assert not docs[path].required


def test_every_field_has_a_description_and_type() -> None:
    for doc in describe_schema():
        assert doc.description and doc.type, doc
