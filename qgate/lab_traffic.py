"""Lab traffic: a paced TCP sender and a hashing receiver, plus ``ping`` output parsing.

Run inside the host namespaces as ``python -m qgate.lab_traffic recv|send ...``. Each prints
JSON lines on its stdout (a pipe read by the lab): the receiver ``{"ready": true}`` once it
listens, then ``{"bytes": N, "sha256": HEX, "seconds": T}``; the sender (a file, or ``--rate`` bytes/s of
fresh random bytes) ``{"bytes": N, "sha256": HEX, "seconds": T}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CHUNK: Final = 32 * 1024
"""Bytes per send() call of the paced sender."""
SOCKET_TIMEOUT: Final = 30.0
"""Seconds of silence after which sender or receiver gives up."""


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def receive(listen: str) -> dict[str, object]:
    """Accept one TCP connection on ``listen`` (``ip:port``), read to EOF, hash what arrived.

    Returns:
        ``{"bytes": received bytes, "sha256": hex digest, "seconds": duration}``.
    """
    digest = hashlib.sha256()
    total = 0
    with socket.create_server(_hostport(listen), reuse_port=False) as server:
        server.settimeout(SOCKET_TIMEOUT)
        _emit({"ready": True})
        conn, _ = server.accept()
        with conn:
            conn.settimeout(SOCKET_TIMEOUT)
            start = time.monotonic()
            while chunk := conn.recv(256 * 1024):
                digest.update(chunk)
                total += len(chunk)
    return {"bytes": total, "sha256": digest.hexdigest(), "seconds": round(time.monotonic() - start, 3)}


def send(target: str, payload: bytes, seconds: float) -> dict[str, object]:
    """Send ``payload`` to ``target`` (``ip:port``) over one TCP connection, paced over ``seconds``.

    The rate is ``len(payload) / seconds`` bytes per second, in 32 KiB chunks.

    Returns:
        ``{"bytes": sent bytes, "sha256": hex digest of the payload, "seconds": duration}``.
    """
    rate = len(payload) / max(seconds, 0.001)
    view = memoryview(payload)
    with socket.create_connection(_hostport(target), timeout=SOCKET_TIMEOUT) as conn:
        start = time.monotonic()
        sent = 0
        while sent < len(payload):
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            conn.sendall(view[sent : sent + CHUNK])
            sent += min(CHUNK, len(payload) - sent)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the receiver to close: everything arrived
    elapsed = time.monotonic() - start
    return {"bytes": sent, "sha256": hashlib.sha256(payload).hexdigest(), "seconds": round(elapsed, 3)}


def send_stream(target: str, rate: float, seconds: float) -> dict[str, object]:
    """Send fresh random bytes (os.urandom) to ``target`` over one TCP connection, paced.

    Like :func:`send`, without holding the payload in memory: ``round(rate * seconds)`` bytes
    at ``rate`` bytes per second in 32 KiB chunks, hashed as they go out.

    Returns:
        ``{"bytes": sent bytes, "sha256": hex digest of what was sent, "seconds": duration}``.
    """
    total = round(rate * seconds)
    digest = hashlib.sha256()
    with socket.create_connection(_hostport(target), timeout=SOCKET_TIMEOUT) as conn:
        start = time.monotonic()
        sent = 0
        while sent < total:
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            chunk = os.urandom(min(CHUNK, total - sent))
            conn.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the receiver to close: everything arrived
    elapsed = time.monotonic() - start
    return {"bytes": sent, "sha256": digest.hexdigest(), "seconds": round(elapsed, 3)}


@dataclass(frozen=True)
class PingResult:
    """Parsed ``ping`` output.

    Attributes:
        transmitted: echo requests sent.
        received: echo replies received.
        rtts_ms: round-trip times of the replies, milliseconds, in order.
    """

    transmitted: int
    received: int
    rtts_ms: tuple[float, ...]

    @property
    def loss_pct(self) -> float:
        """Packet loss in percent (100 when nothing was sent)."""
        if self.transmitted == 0:
            return 100.0
        return round(100.0 * (self.transmitted - self.received) / self.transmitted, 2)

    def percentile_ms(self, pct: float) -> float | None:
        """Return the ``pct`` percentile (0-100, nearest rank) of the RTTs in ms, None without replies."""
        if not self.rtts_ms:
            return None
        ordered = sorted(self.rtts_ms)
        rank = max(1, min(len(ordered), round(pct / 100.0 * len(ordered) + 0.5)))
        return ordered[rank - 1]

    @property
    def median_ms(self) -> float | None:
        """Median RTT in ms, None without replies."""
        return statistics.median(self.rtts_ms) if self.rtts_ms else None


_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT = re.compile(r"time=([0-9.]+) ms")


def parse_ping(output: str) -> PingResult:
    """Parse iputils ``ping`` output (summary line and per-reply ``time=X ms``).

    Raises:
        ValueError: no summary line found.
    """
    match = _SUMMARY.search(output)
    if match is None:
        raise ValueError("no ping summary line in output")
    rtts = tuple(float(m.group(1)) for m in _RTT.finditer(output))
    return PingResult(int(match.group(1)), int(match.group(2)), rtts)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qgate.lab_traffic``."""
    parser = argparse.ArgumentParser(prog="python -m qgate.lab_traffic")
    sub = parser.add_subparsers(dest="cmd", required=True)
    recv_p = sub.add_parser("recv", help="receive one TCP stream and hash it")
    recv_p.add_argument("--listen", required=True, help="ip:port")
    send_p = sub.add_parser("send", help="send a file (or --rate random bytes/s) over TCP, paced")
    send_p.add_argument("--to", required=True, help="ip:port")
    what = send_p.add_mutually_exclusive_group(required=True)
    what.add_argument("--file", type=Path)
    what.add_argument("--rate", type=float, help="bytes/s of fresh random bytes (no file)")
    send_p.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "recv":
            _emit(receive(args.listen))
        elif args.file is None:
            _emit(send_stream(args.to, args.rate, args.seconds))
        else:
            _emit(send(args.to, args.file.read_bytes(), args.seconds))
    except OSError as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
