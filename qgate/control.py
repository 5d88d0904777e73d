"""The daemon's control socket: ``qgate status`` and ``qgate down`` talk to a running ``qgate up``.

One JSON object per line over a Unix stream socket: the client sends ``{"cmd": "status"}`` or
``{"cmd": "down"}``, the daemon answers one object and closes. The socket lives in a directory
only root may enter (mode 0700) and is itself mode 0600; no secret ever crosses it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

from qgate.errors import ConfigError

log = logging.getLogger(__name__)

SOCKET_DIR: Final = Path("/run/qgate")
"""Default directory of control sockets (one ``<gateway name>.sock`` per running gateway)."""
REQUEST_MAX: Final = 4096
"""Bytes: the longest request line accepted."""
CLIENT_TIMEOUT: Final = 5.0
"""Seconds a client waits for the daemon's answer."""

Handler = Callable[[dict[str, object]], dict[str, object]]


def default_socket(gateway_name: str) -> Path:
    """Return the default control socket path of gateway ``gateway_name``."""
    return SOCKET_DIR / f"{gateway_name}.sock"


def _check_dir(directory: Path) -> None:
    """Create ``directory`` (0700) or check it is a directory no one but its owner (root) can write."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise ConfigError(f"control socket directory {directory}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"control socket directory {directory}: not a directory")
    if info.st_mode & 0o022 or info.st_uid != os.geteuid():
        raise ConfigError(
            f"control socket directory {directory}: must be owned by uid {os.geteuid()} and not writable"
            f" by group or others (mode {stat.filemode(info.st_mode)})"
        )


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    """Listen on ``path``; answer each request line with ``handler(request)``.

    Raises:
        ConfigError: unsafe directory, or another daemon already answers on ``path``.
    """
    _check_dir(path.parent)
    if path.exists() or path.is_symlink():
        if await _answers(path):
            raise ConfigError(f"control socket {path}: another qgate daemon is running there")
        path.unlink()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT)
            answer = _answer(line, handler)
            writer.write(json.dumps(answer, sort_keys=True).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.debug("control client: %s", exc)
        finally:
            writer.close()

    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path), limit=REQUEST_MAX)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


async def _answers(path: Path) -> bool:
    """Tell whether a daemon answers a ping on ``path`` (a stale socket file does not)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 0.5)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b'{"cmd": "ping"}\n')
        return bool(await asyncio.wait_for(reader.readline(), 0.5))
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def _answer(line: bytes, handler: Handler) -> dict[str, object]:
    try:
        request_obj = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "request is not JSON"}
    if not isinstance(request_obj, dict) or not isinstance(request_obj.get("cmd"), str):
        return {"ok": False, "error": 'request must be {"cmd": "..."}'}
    if request_obj["cmd"] == "ping":
        return {"ok": True}
    return handler(request_obj)


def request(path: Path, cmd: str, *, timeout: float = CLIENT_TIMEOUT) -> dict[str, object]:
    """Send ``cmd`` to the daemon at ``path`` and return its answer.

    Raises:
        ConfigError: no daemon answers there (with the reason), or the answer is not JSON.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ConfigError(f"control socket {path}: {exc.strerror or exc} (is qgate up running?)") from exc
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"control socket {path}: the daemon's answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise ConfigError(f"control socket {path}: unexpected answer")
    return answer


def find_socket(explicit: Path | None) -> Path:
    """Return ``explicit``, or the only socket in SOCKET_DIR.

    Raises:
        ConfigError: none or several sockets there (the message lists them; use --socket).
    """
    if explicit is not None:
        return explicit
    found = sorted(SOCKET_DIR.glob("*.sock")) if SOCKET_DIR.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"no control socket in {SOCKET_DIR}: is qgate up running? (or give --socket)")
    raise ConfigError(f"several gateways run here ({', '.join(map(str, found))}): choose one with --socket")
