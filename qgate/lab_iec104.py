"""Lab IEC 60870-5-104-like flow: a telecontrol client sending small I-frames, a server echoing them.

Run inside the host namespaces as ``python -m qgate.lab_iec104 server|client ...`` (port 2404,
the IEC 104 port). The client opens one TCP connection with ``TCP_USER_TIMEOUT`` (default
15000 ms: unacknowledged data older than that kills the connection, as IEC 104's t1 timeout
would) and ``TCP_NODELAY``, sends one I-frame every ``--period`` seconds (APCI start 0x68,
length, I-format control field with send and receive sequence numbers, then a 14-byte ASDU:
M_ME_NC_1, one short float, spontaneous), and matches each echo by its send sequence number.
It fails when an echo takes longer than ``--max-wait`` seconds or the connection drops.

Both print JSON lines on stdout (a pipe read by the lab):

* the server ``{"ready": true}`` once it listens, then ``{"echoed_bytes": n}`` when its peer
  closes or on SIGTERM/SIGINT;
* the client, when ``--seconds`` have passed or on SIGTERM/SIGINT (after waiting up to
  ``--max-wait`` for echoes still due): ``{"ok": bool, "error": text or null, "sent": n,
  "echoed": n, "max_echo_s": s, "longest_silence_s": s, "seconds": s}``
  (``longest_silence_s``: the longest time without any echo while one was due).
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Final

IEC104_PORT: Final = 2404
"""TCP port of IEC 60870-5-104 (IEC 60870-5-104 section 5.1)."""
START: Final = 0x68
"""APCI start octet."""
ASDU: Final = struct.Struct("<BBHHHBfB")
"""ASDU: type 13 (M_ME_NC_1), VSQ, cause (3: spontaneous), common address, IOA (16 + 8 bits), value, QDS."""
FRAME_SIZE: Final = 2 + 4 + ASDU.size
"""Bytes of one I-frame: start, length, 4 control octets, the ASDU."""
SEQ_MODULO: Final = 1 << 15
"""I-frame sequence numbers count modulo 2^15."""
USER_TIMEOUT_MS: Final = 15_000
"""Default ``TCP_USER_TIMEOUT`` of the client, milliseconds."""


def i_frame(send_seq: int, recv_seq: int, value: float) -> bytes:
    """Return one I-frame (APCI + ASDU, :data:`FRAME_SIZE` bytes) with sequence numbers mod 2^15."""
    control = struct.pack("<HH", (send_seq % SEQ_MODULO) << 1, (recv_seq % SEQ_MODULO) << 1)
    asdu = ASDU.pack(13, 1, 3, 1, 1000 + send_seq % 1000, 0, value, 0)
    body = control + asdu
    return bytes((START, len(body))) + body


def split_frames(buffer: bytearray) -> list[int]:
    """Remove the complete I-frames at the start of ``buffer``; return their send sequence numbers.

    Raises:
        ValueError: the stream does not start with an APCI start octet (out of sync).
    """
    seqs = []
    while len(buffer) >= 2:
        if buffer[0] != START:
            raise ValueError(f"APCI start octet expected, got {buffer[0]:#04x}")
        size = 2 + buffer[1]
        if len(buffer) < size:
            break
        (control,) = struct.unpack_from("<H", buffer, 2)
        seqs.append(control >> 1)
        del buffer[:size]
    return seqs


_stop = False


def _on_signal(_signum: int, _frame: FrameType | None) -> None:
    global _stop
    _stop = True


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def serve(listen: str) -> dict[str, object]:
    """Accept one connection on ``listen`` (``ip:port``) and echo every byte until it closes."""
    with socket.create_server(_hostport(listen)) as server:
        server.settimeout(0.2)
        _emit({"ready": True})
        conn = None
        while conn is None and not _stop:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
    if conn is None:
        return {"echoed_bytes": 0}
    echoed = 0
    with conn:
        conn.settimeout(0.2)
        while not _stop:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            conn.sendall(data)
            echoed += len(data)
    return {"echoed_bytes": echoed}


@dataclass
class _Flow:
    """The client's bookkeeping (times: monotonic seconds)."""

    started: float
    pending: dict[int, float] = field(default_factory=dict)
    sent: int = 0
    echoed: int = 0
    max_echo: float = 0.0
    last_echo: float = 0.0
    longest_silence: float = 0.0
    error: str | None = None

    def on_echo(self, seq: int, now: float) -> None:
        sent_at = self.pending.pop(seq, None)
        if sent_at is None:
            self.error = f"echo of I-frame {seq}, which is not outstanding"
            return
        self.echoed += 1
        self.max_echo = max(self.max_echo, now - sent_at)
        self.note_silence(now)
        self.last_echo = now

    def note_silence(self, now: float) -> None:
        if self.pending:
            since = max(self.last_echo, min(self.pending.values()))
            self.longest_silence = max(self.longest_silence, now - since)

    def report(self, now: float) -> dict[str, object]:
        return {
            "ok": self.error is None, "error": self.error, "sent": self.sent, "echoed": self.echoed,
            "max_echo_s": round(self.max_echo, 3), "longest_silence_s": round(self.longest_silence, 3),
            "seconds": round(now - self.started, 3),
        }  # fmt: skip


def run_client(
    target: str, *, period: float, seconds: float, max_wait: float, user_timeout_ms: int = USER_TIMEOUT_MS
) -> dict[str, object]:
    """Send an I-frame every ``period`` s to ``target`` for ``seconds`` or until a signal (module doc)."""
    sock = socket.create_connection(_hostport(target), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    now = time.monotonic()
    flow = _Flow(started=now, last_echo=now)
    with sock, selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        _pump(sock, sel, flow, period=period, seconds=seconds, max_wait=max_wait)
    return flow.report(time.monotonic())


def _pump(
    sock: socket.socket,
    sel: selectors.BaseSelector,
    flow: _Flow,
    *,
    period: float,
    seconds: float,
    max_wait: float,
) -> None:
    inbox, outbox = bytearray(), bytearray()
    next_send = flow.started
    sending_until = flow.started + seconds
    while flow.error is None:
        now = time.monotonic()
        if _stop or now >= sending_until:
            sending_until, next_send = min(sending_until, now), float("inf")
            if not flow.pending or now >= sending_until + max_wait:
                break
        elif now >= next_send:
            outbox += i_frame(flow.sent, flow.echoed, float(flow.sent))
            flow.pending[flow.sent % SEQ_MODULO] = now
            flow.sent += 1
            next_send += period
        if outbox:
            try:
                del outbox[: sock.send(outbox)]
            except BlockingIOError:
                pass
            except OSError as exc:
                flow.error = f"send failed: {exc}"
                break
        for _ in sel.select(max(0.0, min(next_send - time.monotonic(), 0.05))):
            _receive(sock, inbox, flow)
        now = time.monotonic()
        flow.note_silence(now)
        if flow.error is None and flow.pending and now - min(flow.pending.values()) > max_wait:
            flow.error = f"an echo took more than {max_wait:.0f} s"


def _receive(sock: socket.socket, inbox: bytearray, flow: _Flow) -> None:
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return
    except OSError as exc:  # ETIMEDOUT from TCP_USER_TIMEOUT, ECONNRESET
        flow.error = f"connection failed: {exc}"
        return
    if not data:
        flow.error = "connection closed by the server"
        return
    inbox += data
    now = time.monotonic()
    try:
        for seq in split_frames(inbox):
            flow.on_echo(seq, now)
    except ValueError as exc:
        flow.error = str(exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qgate.lab_iec104``."""
    parser = argparse.ArgumentParser(prog="python -m qgate.lab_iec104")
    sub = parser.add_subparsers(dest="cmd", required=True)
    server_p = sub.add_parser("server", help="echo one connection")
    server_p.add_argument("--listen", required=True, help="ip:port")
    client_p = sub.add_parser("client", help="send I-frames, check the echoes")
    client_p.add_argument("--to", required=True, help="ip:port")
    client_p.add_argument("--period", type=float, default=0.2, help="seconds between I-frames")
    client_p.add_argument("--seconds", type=float, default=120.0, help="seconds of sending at most")
    client_p.add_argument("--max-wait", type=float, default=15.0, help="seconds an echo may take")
    client_p.add_argument("--user-timeout-ms", type=int, default=USER_TIMEOUT_MS)
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        if args.cmd == "server":
            _emit(serve(args.listen))
        else:
            _emit(run_client(args.to, period=args.period, seconds=args.seconds, max_wait=args.max_wait,
                             user_timeout_ms=args.user_timeout_ms))  # fmt: skip
    except (OSError, ValueError) as exc:
        _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
