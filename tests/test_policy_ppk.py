"""The per-peer post-quantum preshared key (``peers[].ppk``, RFC 8784 style): policy, load_ppk, check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_policy import BASE, SOURCE, assert_problem, edit

from qgate import lab_setup as setup
from qgate.checks import check_policy_file
from qgate.errors import ConfigError, PolicyError
from qgate.keyfiles import PPK_MAX_BYTES, PPK_MIN_BYTES, load_ppk
from qgate.policy import PpkPolicy, describe_schema, parse_policy
from qgate.schema_doc import policy_reference

PPK = "    ppk:\n      file: ppk-site-b.bin\n      id: ppk-2026-01\n      mandatory: true\n"
"""A ppk section for the single peer of BASE, starting on line 25 when appended."""


# ----- policy ----------------------------------------------------------------------------------
def test_ppk_section_loads_with_its_file_relative_to_the_policy() -> None:
    peer = parse_policy(BASE + PPK, source=SOURCE).peers[0]
    assert peer.ppk == PpkPolicy(file=Path("/etc/qgate/ppk-site-b.bin"), id="ppk-2026-01", mandatory=True)


def test_ppk_is_optional_and_mandatory_defaults_to_false() -> None:
    assert parse_policy(BASE, source=SOURCE).peers[0].ppk is None
    text = BASE + "    ppk: {file: /etc/qgate/p.bin, id: '~!#'}\n"
    assert parse_policy(text, source=SOURCE).peers[0].ppk == PpkPolicy(Path("/etc/qgate/p.bin"), "~!#", False)


def test_ppk_absolute_file_is_kept_and_without_a_source_relative_stays_as_written() -> None:
    absolute = edit("file: ppk-site-b.bin", "file: /srv/ppk.bin", PPK)
    assert parse_policy(BASE + absolute, source=SOURCE).peers[0].ppk == PpkPolicy(
        Path("/srv/ppk.bin"), "ppk-2026-01", True
    )
    assert parse_policy(BASE + PPK, source=None).peers[0].ppk == PpkPolicy(
        Path("ppk-site-b.bin"), "ppk-2026-01", True
    )


P = "peers[0].ppk"
PPK_ERRORS = [
    ("id-long", "id: ppk-2026-01", "id: " + "x" * 65, 27, f"{P}.id", "1-64 printable ASCII"),
    ("id-space", "id: ppk-2026-01", "id: 'ppk 1'", 27, f"{P}.id", "no space"),
    ("id-empty", "id: ppk-2026-01", "id: ''", 27, f"{P}.id", "1-64 printable ASCII"),
    ("id-non-ascii", "id: ppk-2026-01", "id: ppké", 27, f"{P}.id", "printable ASCII"),
    ("id-int", "id: ppk-2026-01", "id: 7", 27, f"{P}.id", "put it in quotes"),
    ("id-missing", "      id: ppk-2026-01\n", "", 26, f"{P}.id", "missing required key 'id'"),
    ("file-missing", "      file: ppk-site-b.bin\n", "", 26, f"{P}.file", "missing required key 'file'"),
    ("file-empty", "file: ppk-site-b.bin", "file: ''", 26, f"{P}.file", "non-empty file path"),
    ("mandatory-str", "mandatory: true", "mandatory: maybe", 28, f"{P}.mandatory", "true or false"),
    ("unknown-key", "mandatory: true", "mandatory: true\n      size: 32", 29, f"{P}.size", "unknown key"),
    ("not-mapping", PPK, "    ppk: ppk-site-b.bin\n", 25, P, "expected a mapping"),
    ("null", PPK, "    ppk:\n", 25, P, "expected a mapping"),
]


@pytest.mark.parametrize(
    ("old", "new", "line", "path", "fragment"), [c[1:] for c in PPK_ERRORS], ids=[c[0] for c in PPK_ERRORS]
)
def test_each_ppk_mistake_names_file_line_and_path(
    old: str, new: str, line: int, path: str, fragment: str
) -> None:
    assert_problem(BASE + edit(old, new, PPK), line, path, fragment)


def test_ppk_fields_are_in_the_generated_reference() -> None:
    docs = {d.path: d for d in describe_schema()}
    assert docs["peers[].ppk"].default == "none" and not docs["peers[].ppk"].required
    assert docs["peers[].ppk.file"].required and docs["peers[].ppk.id"].required
    assert docs["peers[].ppk.mandatory"].default == "false"
    reference = policy_reference()
    assert "`peers[].ppk.id`" in reference and "sent in the clear" in reference


# ----- load_ppk ----------------------------------------------------------------------------------
def _ppk_file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "ppk.bin"
    path.write_bytes(os.urandom(size))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("size", [PPK_MIN_BYTES, 48, PPK_MAX_BYTES])
def test_load_ppk_returns_the_raw_bytes_as_a_secret(tmp_path: Path, size: int) -> None:
    path = _ppk_file(tmp_path, size)
    secret = load_ppk(path)
    assert secret.reveal() == path.read_bytes() and len(secret) == size
    assert repr(secret) == "<SECRET>"


@pytest.mark.parametrize(
    ("size", "fragment"),
    [(0, "is 0 bytes"), (31, "is 31 bytes"), (65, "longer than 64 bytes"), (1 << 20, "longer than 64 bytes")],
)
def test_load_ppk_refuses_short_and_long_files_naming_the_path_not_the_bytes(
    tmp_path: Path, size: int, fragment: str
) -> None:
    path = tmp_path / "ppk.bin"
    data = b"\xa5" * size
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_ppk(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message
    assert "a5" not in message.lower() and "\\xa5" not in message


def test_load_ppk_refuses_missing_files_directories_and_fifos(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the PPK"):
        load_ppk(tmp_path / "absent.bin")
    with pytest.raises(ConfigError, match="the PPK is not a regular file"):
        load_ppk(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):  # and does not block on it
        load_ppk(fifo)


# ----- qgate check ---------------------------------------------------------------------------
@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The lab's site-a policy with its files, and a ppk section naming ``keys/ppk-site-b.bin``."""
    setup.make_pki_and_identities(tmp_path)
    policy = setup.write_policies(tmp_path)["a"]
    text = policy.read_text().replace(
        "peers:\n- ", "peers:\n- ppk: {file: keys/ppk-site-b.bin, id: ppk-1}\n  ", 1
    )
    policy.write_text(text)
    return policy


def _check_problems(policy: Path) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PolicyError) as info:
        check_policy_file(policy)
    return info.value.problems


def test_check_reports_a_good_ppk_by_id_file_and_size(site: Path) -> None:
    ppk = _ppk_file(site.parent / "keys", 32)
    ppk.rename(site.parent / "keys" / "ppk-site-b.bin")
    summary = check_policy_file(site)
    (item,) = [item for item in summary.items if "PPK" in item]
    assert "'ppk-1'" in item and "ppk-site-b.bin" in item and "32 bytes" in item


@pytest.mark.parametrize(
    ("size", "mode", "fragment"),
    [(None, 0o600, "cannot read the PPK"), (16, 0o600, "is 16 bytes"), (32, 0o640, "mode 0640")],
)
def test_check_reports_a_missing_short_or_readable_ppk_at_its_line(
    site: Path, size: int | None, mode: int, fragment: str
) -> None:
    path = site.parent / "keys" / "ppk-site-b.bin"
    if size is not None:
        path.write_bytes(os.urandom(size))
        path.chmod(mode)
    problems = _check_problems(site)
    assert [(where, fragment in message) for _, where, message in problems] == [("peers[0].ppk.file", True)]
    line = problems[0][0]
    assert line is not None and "ppk" in site.read_text().splitlines()[line - 1]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"correct horse battery staple 2026!", "is text"),
        (os.urandom(32).hex().encode(), "is text"),
        (b"\x00\x01" * 16, "fewer than 16 distinct byte values"),
    ],
)
def test_load_ppk_refuses_text_and_patterns_naming_the_path_not_the_bytes(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "ppk.bin"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=why) as info:
        load_ppk(path)
    assert str(path) in str(info.value) and "urandom" in str(info.value)
    assert content.decode("latin-1") not in str(info.value)
