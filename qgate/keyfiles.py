"""Identity key files: write a new gateway identity, load it, load pinned peer keys.

The private key file is PKCS#8 PEM with mode 0600; the public key sits beside it with the
suffix ``.pub`` (SubjectPublicKeyInfo PEM). Every failure is a ConfigError naming the file.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Final

from qgate.crypto.identity import IdentityKey, PeerPublicKey
from qgate.errors import ConfigError

logger = logging.getLogger(__name__)

PRIVATE_KEY_MODE: Final = 0o600
"""File mode of a private identity key."""
PUBLIC_KEY_MODE: Final = 0o644
"""File mode of a public identity key."""
PUBLIC_SUFFIX: Final = ".pub"
_MAX_KEY_FILE_BYTES: Final = 64 * 1024


def public_key_path(private_path: Path) -> Path:
    """Return where the public key of ``private_path`` lives (``site-a.key`` -> ``site-a.pub``)."""
    return private_path.with_suffix(PUBLIC_SUFFIX)


def _write_file(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise ConfigError(f"{path}: exists; refusing to overwrite (use force)") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)  # O_CREAT honours umask, and an old file keeps its mode
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from exc
    finally:
        if fd >= 0:
            os.close(fd)


def write_identity(out: Path, alg: str, *, force: bool = False) -> tuple[Path, Path]:
    """Generate a gateway identity and write its key files.

    Args:
        out: private key path (mode 0600); the public key goes to ``out.with_suffix(".pub")``.
        alg: ``ml-dsa-65`` or ``ml-dsa-87`` (FIPS 204).
        force: overwrite existing files instead of refusing.

    Returns:
        ``(private_path, public_path)``.

    Raises:
        ConfigError: unsupported algorithm, a file exists (without ``force``), ``out`` ends in
            ``.pub``, or a file cannot be written.
    """
    public_path = public_key_path(out)
    if public_path == out:
        raise ConfigError(f"{out}: the private key path must not end in {PUBLIC_SUFFIX}")
    key = IdentityKey.generate(alg)
    try:
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out.parent}: cannot create directory: {exc.strerror}") from exc
    if not force:
        for path in (out, public_path):
            if path.exists():
                raise ConfigError(f"{path}: exists; refusing to overwrite (use --force)")
    _write_file(out, key.to_pem(), PRIVATE_KEY_MODE, force=force)
    _write_file(public_path, key.public_key().to_pem(), PUBLIC_KEY_MODE, force=force)
    logger.info("wrote %s identity %s to %s", alg, key.public_key().fingerprint(), out)
    return out, public_path


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{path}: too large for a key file")
    return data


def load_identity(path: Path) -> IdentityKey:
    """Load this gateway's private identity key (PKCS#8 PEM).

    Logs a warning when the file is readable by group or others.

    Raises:
        ConfigError: the file is missing, unreadable or not an ML-DSA-65/87 private key.
    """
    data = _read(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot stat: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "%s: private key is accessible by group/others (mode %o); chmod 600", path, mode & 0o777
        )
    try:
        return IdentityKey.from_pem(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_peer_public_key(path: Path) -> PeerPublicKey:
    """Load a pinned peer public key (SubjectPublicKeyInfo PEM).

    Raises:
        ConfigError: the file is missing, unreadable or not an ML-DSA-65/87 public key.
    """
    data = _read(path)
    try:
        return PeerPublicKey.from_pem(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
