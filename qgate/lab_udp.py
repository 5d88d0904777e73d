"""Lab UDP stream: a paced sender of numbered datagrams and a receiver that counts distinct ones.

Run inside the host namespaces as ``python -m qgate.lab_udp recv|send ...``. Each datagram's
payload starts with a 16-byte header, big-endian: sequence number (u64, from 0) and the
sender's wall clock at sending (u64 nanoseconds since the Unix epoch), then filler up to
``--size`` bytes. Both print JSON lines on stdout (a pipe read by the lab):

* the receiver ``{"ready": true}`` once it listens, then, on SIGTERM or SIGINT,
  ``{"received": distinct, "duplicates": n, "reordered": n, "max_seq": n, "missing": [[a, b], ...],
  "bad": n}`` (``missing``: the first :data:`MISSING_RANGES_MAX` ranges of sequence numbers
  below ``max_seq`` never received, inclusive; ``bad``: datagrams too short or of another size);
* the sender ``{"sent": n, "start_wall_ns": t, "seconds": s, "pps": rate, "size": bytes,
  "send_errors": n}`` when done.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Final

HEADER: Final = struct.Struct(">QQ")
"""Sequence number and send wall-clock time (ns) at the start of every payload (16 bytes)."""
MISSING_RANGES_MAX: Final = 200
"""Ranges of missing sequence numbers reported at most."""
SOCKET_BUFFER: Final = 8 << 20
"""Bytes of kernel socket buffer asked for (receive side: no loss in the host's own queue)."""
POLL: Final = 0.2
"""Seconds the receiver blocks at most before it looks at its stop flag."""


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@dataclass
class Tally:
    """What a receiver has seen: distinct sequence numbers, duplicates, order, size errors.

    Attributes:
        size: expected payload size in bytes (0: any size of at least the header).
    """

    size: int = 0
    seen: bytearray = field(default_factory=bytearray)
    received: int = 0
    duplicates: int = 0
    reordered: int = 0
    max_seq: int = -1
    bad: int = 0

    def add(self, payload: bytes) -> None:
        """Count one datagram payload."""
        if len(payload) < HEADER.size or (self.size and len(payload) != self.size):
            self.bad += 1
            return
        seq, _ = HEADER.unpack_from(payload)
        if seq >= len(self.seen):
            self.seen.extend(bytes(max(seq + 1 - len(self.seen), len(self.seen))))
        if self.seen[seq]:
            self.duplicates += 1
            return
        self.seen[seq] = 1
        self.received += 1
        if seq < self.max_seq:
            self.reordered += 1
        self.max_seq = max(self.max_seq, seq)

    def missing(self, limit: int = MISSING_RANGES_MAX) -> list[list[int]]:
        """Return up to ``limit`` inclusive ranges ``[first, last]`` of numbers below ``max_seq`` not seen."""
        ranges: list[list[int]] = []
        seq = self.seen.find(0, 0, self.max_seq + 1)
        while seq != -1 and len(ranges) < limit:
            end = self.seen.find(1, seq, self.max_seq + 1)
            last = (end if end != -1 else self.max_seq + 1) - 1
            ranges.append([seq, last])
            seq = self.seen.find(0, last + 1, self.max_seq + 1)
        return ranges

    def report(self) -> dict[str, object]:
        """Return the receiver's JSON result (see the module docstring)."""
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "max_seq": self.max_seq,
            "missing": self.missing(),
            "bad": self.bad,
        }


def receive(listen: str, *, size: int = 0) -> dict[str, object]:
    """Count numbered datagrams arriving on ``listen`` (``ip:port``) until SIGTERM or SIGINT.

    Returns:
        the :meth:`Tally.report` mapping.
    """
    stop = False

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    tally = Tally(size=size)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.bind(_hostport(listen))
        sock.settimeout(POLL)
        _emit({"ready": True})
        while not stop:
            try:
                payload = sock.recv(65535)
            except (TimeoutError, InterruptedError):
                continue
            tally.add(payload)
        sock.setblocking(False)
        while True:  # what is already queued counts too
            try:
                tally.add(sock.recv(65535))
            except (BlockingIOError, InterruptedError):
                break
    return tally.report()


def send(target: str, *, pps: float, size: int, seconds: float) -> dict[str, object]:
    """Send ``pps`` datagrams of ``size`` bytes per second to ``target`` (``ip:port``) for ``seconds``.

    Pacing follows the clock (a late sender catches up in a burst), so the count is
    ``round(pps * seconds)`` unless a send fails.

    Raises:
        ValueError: ``size`` is below the 16-byte header.
    """
    if size < HEADER.size:
        raise ValueError(f"size must be >= {HEADER.size} bytes")
    total = round(pps * seconds)
    filler = os.urandom(size - HEADER.size)
    errors = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.connect(_hostport(target))
        start_wall, start = time.time_ns(), time.monotonic()
        seq = 0
        while seq < total:
            due = min(total, int((time.monotonic() - start) * pps) + 1)
            while seq < due:
                try:
                    sock.send(HEADER.pack(seq, time.time_ns()) + filler)
                except OSError:  # e.g. ENOBUFS, or ICMP unreachable reported on the socket
                    errors += 1
                seq += 1
            time.sleep(max(0.0, start + seq / pps - time.monotonic()))
        elapsed = time.monotonic() - start
    return {"sent": seq - errors, "start_wall_ns": start_wall, "seconds": round(elapsed, 3), "pps": pps,
            "size": size, "send_errors": errors}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qgate.lab_udp``."""
    parser = argparse.ArgumentParser(prog="python -m qgate.lab_udp")
    sub = parser.add_subparsers(dest="cmd", required=True)
    recv_p = sub.add_parser("recv", help="count numbered datagrams until SIGTERM/SIGINT")
    recv_p.add_argument("--listen", required=True, help="ip:port")
    recv_p.add_argument("--size", type=int, default=0, help="expected payload bytes (0: any)")
    send_p = sub.add_parser("send", help="send numbered datagrams at a fixed rate")
    send_p.add_argument("--to", required=True, help="ip:port")
    send_p.add_argument("--pps", type=float, default=2000.0, help="datagrams per second")
    send_p.add_argument("--size", type=int, default=1000, help="payload bytes (>= 16)")
    send_p.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "recv":
            _emit(receive(args.listen, size=args.size))
        else:
            _emit(send(args.to, pps=args.pps, size=args.size, seconds=args.seconds))
    except (OSError, ValueError) as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
