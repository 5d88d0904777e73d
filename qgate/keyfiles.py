"""Key files: write a new gateway identity, load it, load pinned peer keys and preshared keys.

The private key file is PKCS#8 PEM with mode 0600; the public key sits beside it with the
suffix ``.pub`` (SubjectPublicKeyInfo PEM). A post-quantum preshared key (PPK) file holds the
raw secret bytes only. Every failure is a ConfigError naming the file, never its bytes.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Final

from qgate.crypto.identity import IdentityKey, PeerPublicKey
from qgate.crypto.secret import Secret
from qgate.errors import ConfigError

logger = logging.getLogger(__name__)

PRIVATE_KEY_MODE: Final = 0o600
"""File mode of a private identity key."""
PUBLIC_KEY_MODE: Final = 0o644
"""File mode of a public identity key."""
PUBLIC_SUFFIX: Final = ".pub"
_MAX_KEY_FILE_BYTES: Final = 64 * 1024
PPK_MIN_BYTES: Final = 32
"""Bytes: the shortest PPK accepted (256 bits; RFC 8784 section 3 asks for at least that entropy)."""
PPK_MAX_BYTES: Final = 64
"""Bytes: the longest PPK accepted (implementation limit)."""


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


def load_ppk(path: Path) -> Secret:
    """Load a post-quantum preshared key (RFC 8784 style): the raw bytes of the file at ``path``.

    The file must be a regular file of ``PPK_MIN_BYTES``..``PPK_MAX_BYTES`` (32-64) bytes, used as
    they are (no encoding, no trailing newline), e.g. ``head -c 32 /dev/urandom > ppk.bin``.
    Permissions are not checked here (``qgate check`` and ``qgate up`` do that).

    Returns:
        The key bytes as a :class:`Secret`.

    Raises:
        ConfigError: the file is missing, unreadable or not a regular file, or holds fewer than
            32 or more than 64 bytes; the message names the path and size, never the bytes.
    """
    data = _read_regular(path, PPK_MAX_BYTES + 1, what="the PPK")
    if len(data) > PPK_MAX_BYTES:
        raise ConfigError(f"{path}: the PPK is longer than {PPK_MAX_BYTES} bytes")
    if len(data) < PPK_MIN_BYTES:
        raise ConfigError(f"{path}: the PPK is {len(data)} bytes; at least {PPK_MIN_BYTES} are needed")
    weak = _weak_ppk(data)
    if weak:
        raise ConfigError(
            f"{path}: the PPK {weak}; it must be raw random bytes (RFC 8784 asks for at least 256 bits of"
            " entropy), e.g. head -c 32 /dev/urandom > ppk.bin"
        )
    return Secret(data)


PPK_MIN_DISTINCT: Final = 16
"""Distinct byte values a PPK must hold at least. 32 random bytes hold about 30; fewer than 16 happens
with probability below 1e-9, so only a pattern (a repeated byte, a short cycle) is refused."""


def _weak_ppk(data: bytes) -> str:
    """Say why ``data`` cannot be a random PPK (text, or a pattern), or "" (the bytes are never quoted).

    A random 32-byte file is all printable ASCII with probability (98/256)^32, about 1e-13.
    """
    if all(0x20 <= b <= 0x7E or b in b"\t\n\r" for b in data):
        return "is text (a passphrase, or hex or Base64 of a key), not raw bytes"
    if len(set(data)) < PPK_MIN_DISTINCT:
        return f"holds fewer than {PPK_MIN_DISTINCT} distinct byte values (a pattern)"
    return ""


def _read_regular(path: Path, limit: int, *, what: str) -> bytes:
    """Return up to ``limit`` bytes of the regular file ``path``; a FIFO or device is refused unread.

    Raises:
        ConfigError: ``path`` cannot be opened or read, or is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: {what} is not a regular file")
        data = b""
        while len(data) < limit and (chunk := os.read(fd, limit - len(data))):
            data += chunk
        return data
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    finally:
        os.close(fd)
