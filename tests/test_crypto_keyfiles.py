"""qgate.keyfiles: identity files are written 0600, never overwritten silently, loaded strictly."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from qgate.errors import ConfigError
from qgate.keyfiles import load_identity, load_peer_public_key, write_identity


def test_write_identity_writes_private_0600_and_public_beside_it(tmp_path: Path) -> None:
    priv, pub = write_identity(tmp_path / "site-a.key", "ml-dsa-65")
    assert pub == tmp_path / "site-a.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = load_identity(priv)
    assert key.alg == "ml-dsa-65"
    assert load_peer_public_key(pub) == key.public_key()


def test_write_identity_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    priv, _ = write_identity(tmp_path / "gw.key", "ml-dsa-87")
    first = priv.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        write_identity(priv, "ml-dsa-87")
    assert priv.read_bytes() == first
    priv.chmod(0o644)
    write_identity(priv, "ml-dsa-87", force=True)
    assert priv.read_bytes() != first
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_write_identity_rejects_pub_suffix_and_bad_alg(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        write_identity(tmp_path / "gw.pub", "ml-dsa-65")
    with pytest.raises(ConfigError):
        write_identity(tmp_path / "gw.key", "rsa")
    assert not (tmp_path / "gw.key").exists()


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(ConfigError, match=r"nope\.key"):
        load_identity(missing)
    garbled = tmp_path / "garbled.pub"
    garbled.write_bytes(b"-----BEGIN PUBLIC KEY-----\nzz\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=r"garbled\.pub"):
        load_peer_public_key(garbled)
    priv, pub = write_identity(tmp_path / "a.key", "ml-dsa-65")
    with pytest.raises(ConfigError, match=r"a\.pub"):
        load_identity(pub)  # a public key is not an identity
    with pytest.raises(ConfigError, match=r"a\.key"):
        load_peer_public_key(priv)


def test_load_identity_warns_when_group_or_world_readable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    priv, _ = write_identity(tmp_path / "w.key", "ml-dsa-65")
    priv.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="qgate.keyfiles"):
        load_identity(priv)
    assert "chmod 600" in caplog.text
