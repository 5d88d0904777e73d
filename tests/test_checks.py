"""`qgate check`: unusable files named by a policy are reported with its file, line and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qgate import lab_setup as setup
from qgate.checks import check_policy_file
from qgate.errors import PolicyError
from qgate.pki import make_pki


@pytest.fixture
def site(tmp_path: Path) -> Path:
    setup.make_pki_and_identities(tmp_path)
    return setup.write_policies(tmp_path)["a"]


def _problems(policy: Path) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PolicyError) as info:
        check_policy_file(policy)
    assert str(policy) in str(info.value)
    return info.value.problems


def test_lab_policy_with_its_files_passes(site: Path) -> None:
    summary = check_policy_file(site)
    assert any("pinned key" in item for item in summary.items)


def test_missing_files_are_all_reported_with_line_and_field(site: Path) -> None:
    (site.parent / "keys" / "site-a.key").unlink()
    (site.parent / "keys" / "site-b.pub").unlink()
    problems = _problems(site)
    fields = {path for _, path, _ in problems}
    assert {"gateway.identity", "peers[0].public_key"} <= fields
    assert all(line is not None for line, _, _ in problems)


def test_sae_key_that_does_not_match_the_certificate_is_reported(site: Path) -> None:
    shutil.copy(site.parent / "pki" / "SAE_B.key", site.parent / "pki" / "SAE_A.key")
    assert [path for _, path, _ in _problems(site)] == ["kme.key"]


def test_sae_certificate_from_another_ca_is_reported(site: Path, tmp_path: Path) -> None:
    make_pki(tmp_path / "rogue", kmes={"KME_X": []}, saes=["SAE_A"])
    for suffix in (".pem", ".key"):
        shutil.copy(tmp_path / "rogue" / f"SAE_A{suffix}", site.parent / "pki" / f"SAE_A{suffix}")
    problems = _problems(site)
    assert [path for _, path, _ in problems] == ["kme.cert"]
    assert "not issued by the CA" in problems[0][2]


def test_pinning_the_gateways_own_key_as_the_peer_key_is_reported(site: Path) -> None:
    shutil.copy(site.parent / "keys" / "site-a.pub", site.parent / "keys" / "site-b.pub")
    problems = _problems(site)
    assert [path for _, path, _ in problems] == ["peers[0].public_key"]
    assert "own identity key" in problems[0][2]


def test_private_keys_readable_by_others_are_reported(site: Path) -> None:
    (site.parent / "pki" / "SAE_A.key").chmod(0o644)
    problems = _problems(site)
    assert [path for _, path, _ in problems] == ["kme.key"]
