"""docs/policy.md is the generated policy reference, current with the validator's tables."""

from __future__ import annotations

from pathlib import Path

from qgate.policy import describe_schema
from qgate.schema_doc import policy_reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "policy.md"


def test_docs_policy_md_is_the_generated_reference() -> None:
    assert DOC.read_text() == policy_reference(), "regenerate: qgate schema > docs/policy.md"


def test_every_policy_field_is_documented_with_a_meaning() -> None:
    text = policy_reference()
    for field in describe_schema():
        assert f"`{field.path}`" in text
        assert field.description
