"""Flood lab: an off-path spoofer floods both gateways; what it costs in keys, CPU, audit and latency.

:func:`run_flood_bench` builds the two-site lab (:class:`qgate.lab.Lab`, site A = QKD master,
site B = slave), captures the WAN while the tunnel comes up (real M1s and Kicks to replay),
adds an attacker namespace ``qg<run>sp`` with a tap into each gateway's WAN side
(:func:`qgate.lab_net.add_spoofer`), measures an idle ping baseline, then runs each flood kind
for ``seconds`` while host A pings host B every 10 ms (``ping -i 0.01``, as many echoes as the
period ping really keeps, measured in the baseline, fits in ``seconds``; the flood stops with the
last echo). Kinds (datagrams carry the *peer
gateway's* source address and port; the attacker never receives anything):

* ``none``: no flood, the baseline (always run first);
* ``data_unknown_index``: 32-byte data datagrams (type 0x04, random receiver_index and counter,
  16 random tag bytes) to the slave, from the master's address;
* ``garbage``: random bytes, 1-1400 of them, to both gateways;
* ``kick_forged``: Kicks signed by an impostor identity, to the master from the slave's address;
* ``m1_forged``: M1s signed by an impostor identity, to the slave from the master's address;
* ``m1_replay`` / ``kick_replay``: real M1 / Kick fragments captured at start, replayed verbatim;
* ``fragment_junk``: valid handshake-fragment headers (type 0x01, msg_type 1-7, index < count
  <= 16, random message_id) with random payload, to both gateways.

Forged messages come only from a real protocol engine (:class:`qgate.protocol.peer.Peer` with the
lab policy's :func:`qgate.gateway.peer_config` and a freshly generated identity), never from
hand-packed message bytes, so they follow the wire format whatever version it is. The sender
(``python -m qgate.lab_flood send``) runs in the attacker namespace and writes pre-built Ethernet
frames to an ``AF_PACKET`` socket with ``sendmmsg(2)``, paced to ``rate`` datagrams/s or as fast as
it can (``rate=None``). Measures per kind: see :func:`measure_kind`; checks: :func:`kind_checks`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from qgate import lab_kstats as kstats
from qgate import lab_net as net
from qgate import lab_setup as setup
from qgate.lab import Lab, fresh_stats
from qgate.lab_faults import key_ids_in, kme_records
from qgate.lab_pcap import ipv4_of, read_pcap, udp_of
from qgate.lab_procs import Child, LabError
from qgate.lab_traffic import PingResult, parse_ping

if TYPE_CHECKING:
    from qgate.protocol.peer import Peer

KINDS: Final = ("none", "data_unknown_index", "garbage", "kick_forged", "m1_forged", "m1_replay",
                "kick_replay", "fragment_junk")  # fmt: skip
TARGETS: Final = {"none": "", "data_unknown_index": "b", "garbage": "ab", "kick_forged": "a",
                  "m1_forged": "b", "m1_replay": "b", "kick_replay": "a", "fragment_junk": "ab"}  # fmt: skip
"""Kind -> the gateway sites it floods (a = master, b = slave)."""
PING_INTERVAL: Final = 0.01
"""Seconds between pings from host A to host B during each window."""
RANDOM_POOL: Final = 4096
"""Distinct datagrams pre-built for the random kinds (the sender cycles through them)."""
FORGED_KICKS: Final = 32
FORGED_M1S: Final = 16
PING_DEADLINE_FACTOR: Final = 1.25
"""A window's ping stops after this many times ``seconds`` (+ 2 s) even if it sent fewer echoes."""
SENDER_LEAD: Final = 2.0
"""Seconds between starting the sender and the flood start it is told (its start-up fits in)."""
IDLE_P99_FLOOR_MS: Final = 1.0
"""ms: the idle p99 used in the RTT check is at least this, so noise on tiny RTTs cannot fail it."""
AUDIT_LIMIT_BYTES: Final = 100_000
"""Bytes (100 KB, 10^3) of audit log per gateway per AUDIT_PERIOD seconds of flood at most."""
AUDIT_PERIOD: Final = 60.0
KEY_SLACK: Final = 2
"""QKD keys a window may differ from the (length-scaled) ``none`` baseline by: a window of W
seconds at rekey interval T holds floor(W/T) or ceil(W/T) rekeys, so the edges alone give one
each for this window and the baseline (measured: 4-6 keys in 5 s windows at T = 1 s on a loaded
2-core machine with no flood). The floods issue 10 fixed cost one key per forged datagram."""
RECOVER_TIMEOUT: Final = 30.0
"""Seconds to wait for the tunnel to answer ping again before a window."""
COUNTERS: Final = (
    "auth_failures", "malformed_messages", "handshake_failures", "handshakes", "rekeys_qkd", "rekeys_kem",
    "kicks_sent", "degraded_handshakes", "mode_changes", "drops_auth", "drops_replay", "drops_unknown_index",
    "drops_malformed", "drops_no_session", "rx_unknown_index", "rx_unknown_source", "rx_not_qgate",
    "qkd_served_from_stock", "qkd_stock_misses", "audit_failures", "drops_mac1", "drops_mac2",
    "drops_budget", "retries_sent", "session_requests", "kicks_ignored",
)  # fmt: skip
"""Gateway stats counters reported per window (deltas; 0 when a gateway does not have one)."""
OTHER_WORDS: Final = ("drop", "fail", "error", "retr", "reject", "mac", "bad", "unknown", "malformed",
                      "limit", "budget", "challenge", "kick", "invalid", "replay", "spoof")  # fmt: skip
"""Name fragments of further gateway counters reported when they move (``counters_other``)."""
_GATEWAY_PORT: Final = setup.GATEWAY_PORT
_WAN: Final = {"a": net.GW_A_WAN, "b": net.GW_B_WAN}
_PEER: Final = {"a": "b", "b": "a"}
_PING_TIME: Final = re.compile(r"packets transmitted, .* time (\d+)ms")
_FRAG_HEAD: Final = struct.Struct("!BBBBII")
"""Fragment header (wire.py): type, msg_type, index, count, steering hint, message_id."""
_POOL_MAGIC: Final = b"QGFLOOD1"
_ETH_P_IP: Final = 0x0800
_BATCH: Final = 64
"""Frames per sendmmsg(2) call at most."""


# ----- frames ---------------------------------------------------------------------------
def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_frame(tap: net.SpoofTap, src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """Return an Ethernet frame (to ``tap.gateway_mac``) of an IPv4/UDP datagram with any source.

    IPv4 (RFC 791): no options, DF set, TTL 64, a random identification, header checksum;
    UDP (RFC 768): length and the checksum over the pseudo-header. ``payload`` at most 1472 bytes.
    """
    s_ip, d_ip = socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    udp_len = 8 + len(payload)
    pseudo = s_ip + d_ip + struct.pack("!BBH", 0, 17, udp_len)
    head = struct.pack("!HHHH", src[1], dst[1], udp_len, 0)
    check = 0xFFFF - _ones_sum(pseudo + head + payload) or 0xFFFF
    udp = struct.pack("!HHHH", src[1], dst[1], udp_len, check) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, random.getrandbits(16), 0x4000, 64, 17, 0, s_ip, d_ip
    )
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _ones_sum(ip)) + ip[12:]
    eth = bytes.fromhex(tap.gateway_mac.replace(":", "")) + bytes.fromhex(tap.attacker_mac.replace(":", ""))
    return eth + struct.pack("!H", _ETH_P_IP) + ip + udp


def spoofed_frames(taps: dict[str, net.SpoofTap], datagrams: Iterable[tuple[str, bytes]]) -> list[bytes]:
    """Frame ``(site, payload)`` datagrams to gateway ``site`` from its peer's WAN address and port."""
    return [
        udp_frame(taps[site], (_WAN[_PEER[site]], _GATEWAY_PORT), (_WAN[site], _GATEWAY_PORT), payload)
        for site, payload in datagrams
    ]


def write_pool(path: Path, frames: list[tuple[int, bytes]]) -> None:
    """Write ``(link index, frame)`` pairs for the sender: magic, then ``link(1) || len(2) || frame``."""
    path.write_bytes(_POOL_MAGIC + b"".join(struct.pack("!BH", i, len(f)) + f for i, f in frames))


def read_pool(path: Path) -> list[tuple[int, bytes]]:
    """Read a pool file written by :func:`write_pool`.

    Raises:
        ValueError: not a pool file, or truncated.
    """
    data = path.read_bytes()
    if not data.startswith(_POOL_MAGIC):
        raise ValueError(f"{path}: not a flood pool file")
    out, pos = [], len(_POOL_MAGIC)
    while pos < len(data):
        link, size = struct.unpack_from("!BH", data, pos)
        if pos + 3 + size > len(data):
            raise ValueError(f"{path}: truncated")
        out.append((link, data[pos + 3 : pos + 3 + size]))
        pos += 3 + size
    return out


# ----- what to send ---------------------------------------------------------------------
def data_unknown_index(count: int) -> list[tuple[str, bytes]]:
    """Data datagrams with random receiver index and counter and a random 16-byte tag, to the slave."""
    from qgate.constants import AEAD_TAG_SIZE
    from qgate.protocol.wire import pack_data_header

    return [
        ("b", pack_data_header(random.getrandbits(32), random.getrandbits(64)) + os.urandom(AEAD_TAG_SIZE))
        for _ in range(count)
    ]


def garbage(count: int) -> list[tuple[str, bytes]]:
    """Random bytes of random length (1-1400), alternately to the master and the slave."""
    return [("ab"[i % 2], os.urandom(random.randint(1, 1400))) for i in range(count)]


def fragment_junk(count: int) -> list[tuple[str, bytes]]:
    """Handshake-fragment headers that pass the framing checks, random payload, to both gateways.

    ``type 0x01 || msg_type 1-7 || index || count || hint || message_id`` (``index < count <= 16``,
    a random steering hint: an off-path sender knows no live index); a
    fragment that is not the last of its message has the full payload size, as the format wants.
    """
    from qgate import constants
    from qgate.constants import FRAGMENT_COUNT_MAX, FRAGMENT_PAYLOAD_MAX, MSG_HANDSHAKE_FRAGMENT

    trailer = int(getattr(constants, "FRAGMENT_TRAILER_SIZE", 0))  # mac1 || mac2 from protocol v2 on
    out = []
    for i in range(count):
        total = random.randint(1, FRAGMENT_COUNT_MAX)
        index = random.randrange(total)
        size = FRAGMENT_PAYLOAD_MAX if index < total - 1 else random.randint(1, FRAGMENT_PAYLOAD_MAX)
        head = _FRAG_HEAD.pack(
            MSG_HANDSHAKE_FRAGMENT,
            random.randint(1, 7),
            index,
            total,
            random.getrandbits(32),
            random.getrandbits(32),
        )
        out.append(("ab"[i % 2], head + os.urandom(size + trailer)))
    return out


@dataclass(frozen=True)
class Impostor:
    """What the forging engines are built from.

    Attributes:
        run_dir: the lab run directory (rendered policies, the gateways' public keys).
    """

    run_dir: Path

    def engine(self, site: str, now: float) -> Peer:
        """Return a ``Peer`` playing ``site``'s role with a fresh identity and the victim's real key."""
        from qgate.crypto.identity import IdentityKey
        from qgate.gateway import peer_config
        from qgate.keyfiles import load_peer_public_key
        from qgate.policy import load_policy
        from qgate.protocol.peer import Peer

        policy = load_policy(self.run_dir / f"site-{site}.yaml")
        peer = policy.peers[0]
        config = peer_config(peer, policy.kme.sae_id)
        identity = IdentityKey.generate(setup.IDENTITY_ALG)  # not the site's key: signatures fail
        victim = load_peer_public_key(peer.public_key)
        return Peer(config, identity=identity, peer_key=victim, rng=os.urandom, now=now)


def _sent(engine: Peer) -> list[bytes]:
    from qgate.protocol.peer import SendDatagram

    return [a.data for a in engine.take_actions() if isinstance(a, SendDatagram)]


def forged_kicks(impostor: Impostor, count: int) -> list[tuple[str, bytes]]:
    """Fragments of ``count`` Kicks from a slave-role impostor engine, to the master.

    The engine sends at most one Kick per KICK_INTERVAL, so its clock jumps an hour per Kick.
    """
    engine = impostor.engine("b", 0.0)
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        now = 3600.0 * (i + 1)
        engine.send_kick(now)
        frags = _sent(engine)
        if not frags:
            engine.handle_timer(now)
            frags = _sent(engine)
        out.extend(("a", f) for f in frags)
    return out


def forged_m1s(impostor: Impostor, count: int) -> list[tuple[str, bytes]]:
    """Fragments of ``count`` M1s from master-role impostor engines (random QKD keys), to the slave.

    Each engine's first timer asks for QKD keys (``FetchEncKeys``); it gets random ones with fresh
    random key_IDs, so every M1 differs.
    """
    from qgate.crypto.secret import Secret
    from qgate.protocol.peer import FetchEncKeys, SendDatagram

    out: list[tuple[str, bytes]] = []
    for _ in range(count):
        engine = impostor.engine("a", 0.0)
        engine.handle_timer(0.0)
        for action in engine.take_actions():
            if isinstance(action, SendDatagram):
                out.append(("b", action.data))
            elif isinstance(action, FetchEncKeys):
                keys = [
                    (str(uuid.uuid4()), Secret(os.urandom(action.size_bits // 8)))
                    for _ in range(action.number)
                ]
                engine.keys_fetched(action.request_id, keys, 0.0)
        out.extend(("b", f) for f in _sent(engine))
    return out


def captured_messages(pcap: Path, src: str, dst: str, msg_type: int) -> list[list[bytes]]:
    """Return the complete handshake messages of ``msg_type`` sent ``src`` -> ``dst`` in a capture.

    Each message is its list of fragment datagrams (as captured, mac trailer included), grouped
    by message_id from the 8-byte fragment header; messages missing a fragment are left out.
    """
    from qgate.constants import MSG_HANDSHAKE_FRAGMENT

    linktype, frames = read_pcap(pcap)
    parts: dict[int, dict[int, bytes]] = {}
    counts: dict[int, int] = {}
    for frame in frames:
        ip = ipv4_of(linktype, frame)
        udp = udp_of(ip) if ip is not None else None
        if udp is None or (udp.src, udp.dst) != (src, dst) or len(udp.payload) < _FRAG_HEAD.size:
            continue
        kind, mtype, index, total, _, message_id = _FRAG_HEAD.unpack_from(udp.payload)
        if kind == MSG_HANDSHAKE_FRAGMENT and mtype == msg_type and index < total:
            parts.setdefault(message_id, {})[index] = udp.payload
            counts[message_id] = total
    return [[p[i] for i in range(counts[mid])] for mid, p in parts.items() if len(p) == counts[mid]]


def build_datagrams(
    kind: str, impostor: Impostor, replay: dict[str, list[list[bytes]]]
) -> list[tuple[str, bytes]]:
    """Return the ``(site, payload)`` datagrams of one flood kind (empty for ``none``)."""
    if kind == "data_unknown_index":
        return data_unknown_index(RANDOM_POOL)
    if kind == "garbage":
        return garbage(RANDOM_POOL)
    if kind == "fragment_junk":
        return fragment_junk(RANDOM_POOL)
    if kind == "kick_forged":
        return forged_kicks(impostor, FORGED_KICKS)
    if kind == "m1_forged":
        return forged_m1s(impostor, FORGED_M1S)
    if kind in ("m1_replay", "kick_replay"):
        site = TARGETS[kind]
        return [(site, frag) for msg in replay[kind] for frag in msg]
    return []


# ----- the sender (runs in the attacker namespace) ----------------------------------------
class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]  # fmt: skip


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


class _SockaddrLl(ctypes.Structure):
    _fields_ = [("sll_family", ctypes.c_ushort), ("sll_protocol", ctypes.c_ushort),
                ("sll_ifindex", ctypes.c_int), ("sll_hatype", ctypes.c_ushort),
                ("sll_pkttype", ctypes.c_ubyte), ("sll_halen", ctypes.c_ubyte),
                ("sll_addr", ctypes.c_ubyte * 8)]  # fmt: skip


class FrameSender:
    """Pre-built frames on one ``AF_PACKET`` socket, sent in batches with ``sendmmsg(2)``.

    Args:
        pool: ``(link index, Ethernet frame)`` pairs, sent in this order, cyclically.
        links: interface names (in this namespace) by link index.
    """

    def __init__(self, pool: list[tuple[int, bytes]], links: list[str]) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
        self._addrs = (_SockaddrLl * len(links))()
        for i, name in enumerate(links):
            addr = self._addrs[i]
            addr.sll_family, addr.sll_protocol = socket.AF_PACKET, socket.htons(_ETH_P_IP)
            addr.sll_ifindex, addr.sll_halen = socket.if_nametoindex(name), 6
        self._bufs = [ctypes.create_string_buffer(frame, len(frame)) for _, frame in pool]
        self._iovs = (_Iovec * len(pool))()
        self._msgs = (_Mmsghdr * len(pool))()
        for i, (link, frame) in enumerate(pool):
            self._iovs[i].iov_base, self._iovs[i].iov_len = ctypes.addressof(self._bufs[i]), len(frame)
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = ctypes.addressof(self._addrs[link])
            hdr.msg_namelen = ctypes.sizeof(_SockaddrLl)
            hdr.msg_iov, hdr.msg_iovlen = ctypes.pointer(self._iovs[i]), 1
        self.size = len(pool)
        self._pos = 0

    def send(self, count: int) -> int:
        """Send up to ``count`` frames (at most one batch, never past the pool's end); return how many."""
        n = min(count, _BATCH, self.size - self._pos)
        done = int(
            self._libc.sendmmsg(
                self.sock.fileno(), ctypes.addressof(self._msgs) + self._pos * ctypes.sizeof(_Mmsghdr), n, 0
            )
        )
        if done <= 0:
            return 0
        self._pos = (self._pos + done) % self.size
        return done


def run_sender(
    sender: FrameSender, rate: float | None, seconds: float, stop: Callable[[], bool]
) -> dict[str, object]:
    """Send for ``seconds`` at ``rate`` frames/s (None: as fast as possible); return what was sent.

    Pacing: every wake sends what the clock says is due (at most one batch), then sleeps up to
    1 ms until the next frame is due.
    """
    start = time.monotonic()
    cpu0, sent, failed = time.process_time(), 0, 0
    while not stop():
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            break
        due = _BATCH if rate is None else int(elapsed * rate) + 1 - sent
        if due <= 0:
            time.sleep(min(0.001, (sent + 1) / rate - elapsed) if rate else 0.001)
            continue
        done = sender.send(due)
        sent += done
        if done == 0:
            failed += 1
            time.sleep(0.0005)  # ENOBUFS and the like: let the kernel drain
    took = time.monotonic() - start
    rate_pps = round(sent / took, 1) if took > 0 else 0.0
    cpu = round(time.process_time() - cpu0, 3)
    return {
        "sent": sent,
        "seconds": round(took, 3),
        "rate_pps": rate_pps,
        "failed_calls": failed,
        "cpu_s": cpu,
    }


def sender_main(argv: list[str] | None = None) -> int:
    """``python -m qgate.lab_flood send``: JSON ``{"ready": ...}``, then (after the flood) the result."""
    parser = argparse.ArgumentParser(prog="python -m qgate.lab_flood send")
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--links", required=True, help="interface names by link index, comma-separated")
    parser.add_argument("--rate", required=True, help="frames per second, or max")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall time (s) to start at")
    args = parser.parse_args(argv)
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopped.append(signum))
    try:
        sender = FrameSender(read_pool(args.pool), args.links.split(","))
    except (OSError, ValueError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"ready": True, "pool": sender.size}), flush=True)
    time.sleep(max(0.0, args.start_at - time.time()))
    start_wall = time.time()
    rate = None if args.rate == "max" else float(args.rate)
    result = run_sender(sender, rate, args.seconds, lambda: bool(stopped))
    print(json.dumps({**result, "start_wall": start_wall}), flush=True)
    return 0


# ----- measuring ------------------------------------------------------------------------
@dataclass
class FloodOptions:
    """Options of one flood bench run (times in seconds, rate in datagrams per second).

    Attributes:
        kinds: flood kinds to run (``none`` is always run, first).
        seconds: length of each kind's window.
        rate: datagrams per second the attacker sends (all targets together); None: as fast as it can.
        idle_seconds: the idle ping baseline before the first window.
        settle_seconds: pause after the tunnel answers again, before each window.
    """

    kinds: tuple[str, ...] = KINDS
    seconds: float = 20.0
    rate: float | None = 1000.0
    idle_seconds: float = 5.0
    settle_seconds: float = 3.0


@dataclass
class Probe:
    """Readings at one edge of a window: wall time, gateway CPU s, audit file sizes, kernel counters."""

    wall: float
    cpu: dict[str, float]
    audit: dict[str, int]
    kernel: kstats.Snapshot


@dataclass
class Run:
    """The running lab of one bench run, and what the kinds need from it."""

    lab: Lab
    gateways: dict[str, Child]
    taps: dict[str, net.SpoofTap]
    impostor: Impostor
    replay: dict[str, list[list[bytes]]] = field(default_factory=dict)
    ping_period: float = PING_INTERVAL
    """Seconds per echo ``ping`` really achieves (measured in the idle baseline)."""

    def path(self, name: str) -> Path:
        """Return ``<run dir>/name``."""
        return self.lab.run_dir / name

    def probe(self) -> Probe:
        """Take the readings of one window edge (about 50 ms: a few ``ip``/``cat`` calls)."""
        audit = {s: _size(self.path(f"audit-{s}.jsonl")) for s in "ab"}
        cpu = {s: kstats.process_cpu(c.proc.pid) for s, c in self.gateways.items()}
        kernel = kstats.snapshot({s: self.lab.topo.ns(f"g{s}") for s in "ab"})
        return Probe(time.time(), cpu, audit, kernel)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def run_flood_bench(opts: FloodOptions) -> dict[str, object]:
    """Run the flood bench in a fresh lab; return the result mapping (see :func:`summarise`).

    Raises:
        LabError, DataPlaneError, QgateError: the lab could not run (failed checks show as
            ``ok: false`` in the result instead). Everything is torn down on every path.
    """
    started = time.monotonic()
    with Lab(keep_run_dir_on_failure=True) as lab:
        try:
            result = _run_inside(lab, opts)
        finally:
            for child in lab.kids.items:  # the senders first: they run in the attacker namespace
                if child.name.startswith("flood-"):
                    lab.kids.stop(child)
            for problem in net.remove_spoofer(lab.topo):
                sys.stderr.write(f"teardown: {problem}\n")
    result["duration_s"] = round(time.monotonic() - started, 1)
    return result


def _run_inside(lab: Lab, opts: FloodOptions) -> dict[str, object]:
    from qgate.protocol.messages import InitHello, Kick

    capture = lab.start_capture()
    taps = net.add_spoofer(lab.topo)
    children = lab.start_qgate()
    run = Run(lab, {c.name[-1]: c for c in children}, taps, Impostor(lab.run_dir))
    lab.wait_path(children)
    idle = ping_window(run, "idle", opts.idle_seconds)
    lab.kids.stop(capture, signal.SIGINT)
    pcap = run.path("wan-a.pcap")
    run.replay = {
        "m1_replay": captured_messages(pcap, net.GW_A_WAN, net.GW_B_WAN, InitHello.TYPE),
        "kick_replay": captured_messages(pcap, net.GW_B_WAN, net.GW_A_WAN, Kick.TYPE),
    }
    kinds: dict[str, dict[str, object]] = {}
    for kind in ("none", *(k for k in opts.kinds if k != "none")):
        recovered = settle(run, opts.settle_seconds)
        kinds[kind] = {**measure_kind(run, kind, opts), "recovered": recovered}
        sys.stderr.write(f"flood {kind}: {short_line(kinds[kind])}\n")
    result = summarise(opts, idle, kinds)
    captured = {k: len(v) for k, v in run.replay.items()}
    return {
        "run_id": lab.topo.run_id,
        **result,
        "replay_captured_messages": captured,
        "spoofer": {"namespace": net.spoofer_ns(lab.topo), "taps": [t.gateway_if for t in taps.values()]},
    }


def settle(run: Run, seconds: float) -> bool:
    """Wait until ping passes the tunnel again (False after RECOVER_TIMEOUT), then ``seconds`` more.

    Raises:
        LabError: a gateway exited.
    """
    for child in run.gateways.values():
        run.lab.kids.check_alive(child)
    try:
        run.lab.wait_path(list(run.gateways.values()), timeout=RECOVER_TIMEOUT)
        ok = True
    except LabError:
        for child in run.gateways.values():
            run.lab.kids.check_alive(child)
        ok = False
    time.sleep(seconds)
    return ok


def ping_argv(count: int, deadline: float) -> list[str]:
    """Return the ``ping`` from host A to host B: ``count`` echoes PING_INTERVAL s apart, 1 s reply wait.

    ``deadline`` (s, ``-w``) bounds the window when a flood starves ping itself of CPU (it then
    sends fewer echoes); normally ``count`` ends it first, every reply in.
    """
    return ["ping", "-n", "-i", f"{PING_INTERVAL:g}", "-c", str(count), "-W", "1",
            "-w", str(math.ceil(deadline)), net.HOST_B]  # fmt: skip


def ping_window(run: Run, name: str, seconds: float) -> dict[str, object]:
    """Ping host B from host A for ``seconds`` with nothing else going on; return :func:`ping_fields`.

    Also sets ``run.ping_period``: the seconds per echo ping really achieved (iputils paces in
    timer ticks: with CONFIG_HZ=250 ``-i 0.01`` gives 16 ms), so later windows last ``seconds``.
    """
    count = max(2, round(seconds / PING_INTERVAL))
    deadline = count * PING_INTERVAL * 4 + 10  # a safety stop only: -c ends it
    child = run.lab.start(f"ping-{name}", "ha", ping_argv(count, deadline))
    result = _ping_result(child, deadline)
    assert child.log_path is not None
    match = _PING_TIME.search(child.log_path.read_text(errors="replace"))
    if match and result.transmitted > 1:
        run.ping_period = max(PING_INTERVAL, int(match.group(1)) / 1000 / (result.transmitted - 1))
    return {**ping_fields(result), "ping_period_s": round(run.ping_period, 4)}


def _ping_result(child: Child, deadline: float) -> PingResult:
    try:
        child.proc.wait(timeout=deadline + 15)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{child.name} did not finish") from exc
    assert child.log_path is not None
    try:
        return parse_ping(child.log_path.read_text(errors="replace"))
    except ValueError as exc:
        raise LabError(f"{child.name}: {exc}: {child.tail(5)}") from exc


def ping_fields(ping: PingResult) -> dict[str, object]:
    """Return the ping measures: ``ping_sent``, ``ping_received``, ``ping_loss_pct``, ``rtt_*_ms``."""
    return {
        "ping_sent": ping.transmitted,
        "ping_received": ping.received,
        "ping_loss_pct": ping.loss_pct,
        "rtt_p50_ms": ping.percentile_ms(50),
        "rtt_p99_ms": ping.percentile_ms(99),
        "rtt_max_ms": max(ping.rtts_ms) if ping.rtts_ms else None,
    }


def write_kind_pool(run: Run, kind: str) -> tuple[Path | None, int]:
    """Build ``kind``'s datagrams, frame them and write the sender's pool; return its path and size.

    Returns ``(None, 0)`` for ``none``, or when there is nothing to send (e.g. no Kick captured).
    """
    datagrams = build_datagrams(kind, run.impostor, run.replay)
    if not datagrams:
        return None, 0
    frames = spoofed_frames(run.taps, datagrams)
    pool = run.path(f"flood-{kind}.pool")
    write_pool(pool, [("ab".index(site), frame) for (site, _), frame in zip(datagrams, frames, strict=True)])
    return pool, len(datagrams)


def start_sender(run: Run, kind: str, pool: Path, opts: FloodOptions, start_at: float) -> Child:
    """Start the sender of ``pool`` in the attacker namespace, flooding from wall time ``start_at``.

    It floods until SIGTERM (when the window's pings end), printing what it sent.

    Raises:
        LabError: the sender failed to start or to load its pool.
    """
    rate = "max" if opts.rate is None else f"{opts.rate:g}"
    links = ",".join(run.taps[s].attacker_if for s in "ab")
    limit = opts.seconds * 4 + 30  # an upper bound: the bench stops it (SIGTERM) when the pings end
    argv = [sys.executable, "-m", "qgate.lab_flood", "send", "--pool", str(pool), "--links", links,
            "--rate", rate, "--seconds", f"{limit:g}", "--start-at", f"{start_at:.3f}"]  # fmt: skip
    child = run.lab.kids.start(f"flood-{kind}", net.spoofer_ns(run.lab.topo), argv, pipe_stdout=True)
    ready = _json_line(child, timeout=SENDER_LEAD + 30)
    if "error" in ready:
        raise LabError(f"flood sender {kind}: {ready['error']}")
    return child


def _json_line(child: Child, timeout: float) -> dict[str, object]:
    from qgate.lab import read_json_line

    return read_json_line(child, timeout)


def measure_kind(run: Run, kind: str, opts: FloodOptions) -> dict[str, object]:
    """Run one window: flood ``kind`` (if any) and ping for ``opts.seconds``; return its measures.

    Keys: ``sent``, ``rate_pps``, ``sender_seconds``, ``sender_cpu_s``, ``pool`` (distinct
    datagrams), ``targets``, ``window_s``, the :func:`ping_fields`, ``qkd_keys_master`` /
    ``qkd_keys_slave`` / ``qkd_keys_master_taken`` (see :func:`key_use`), ``mode_changes`` and
    ``degraded`` per gateway (``mode_change`` audit records, to degraded or closed), ``cpu_s``,
    ``audit_bytes``, ``audit_records``, ``audit_events`` per gateway, ``counters`` (the
    :data:`COUNTERS` deltas) and ``counters_other`` (any other counter that moved) per gateway,
    ``kernel`` per gateway (UDP datagrams in, socket-buffer drops, tap drops), and ``skipped``
    (why nothing was sent, for a flood kind without datagrams).
    """
    pool, size = write_kind_pool(run, kind)
    before = {s: fresh_stats(run.path(f"stats-{s}.json")) for s in "ab"}
    start_at = time.time() + SENDER_LEAD
    sender = start_sender(run, kind, pool, opts, start_at) if pool is not None else None
    time.sleep(max(0.0, start_at - time.time() - 0.05))
    p0 = run.probe()
    count = max(1, round(opts.seconds / run.ping_period))
    deadline = opts.seconds * PING_DEADLINE_FACTOR + 2
    pinged = _ping_result(run.lab.start(f"ping-{kind}", "ha", ping_argv(count, deadline)), deadline)
    sent: dict[str, object] = {"sent": 0, "rate_pps": 0.0, "seconds": 0.0, "cpu_s": 0.0}
    if sender is not None:  # the flood lasts as long as the pings: stop it now, take its count
        sender.proc.send_signal(signal.SIGTERM)
        sent = _json_line(sender, timeout=10)
        run.lab.kids.stop(sender)
    p1 = run.probe()
    after = {s: fresh_stats(run.path(f"stats-{s}.json")) for s in "ab"}
    out: dict[str, object] = {
        "sent": sent.get("sent", 0),
        "rate_pps": sent.get("rate_pps", 0.0),
        "sender_seconds": sent.get("seconds"),
        "sender_cpu_s": sent.get("cpu_s"),
        "pool": size,
        "targets": TARGETS[kind],
        "window_s": round(p1.wall - p0.wall, 2),
        **ping_fields(pinged),
        **key_use(run, p0, p1, before, after),
        "cpu_s": {s: round(p1.cpu[s] - p0.cpu[s], 2) for s in "ab"},
        **audit_fields(run, p0, p1),
        "counters": {s: {k: _int(after[s], k) - _int(before[s], k) for k in COUNTERS} for s in "ab"},
        "counters_other": {s: _other_moved(before[s], after[s]) for s in "ab"},
        "kernel": {s: kernel_fields(run, s, p0, p1) for s in "ab"},
    }
    if kind != "none" and sender is None:
        out["skipped"] = f"nothing to send for {kind} (no such message captured at lab start)"
    return out


def _int(stats: dict[str, object], key: str) -> int:
    value = stats.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _other_moved(before: dict[str, object], after: dict[str, object]) -> dict[str, int]:
    """Return the counters outside COUNTERS whose name says drop/failure/defence and that moved."""
    return {
        k: _int(after, k) - _int(before, k)
        for k in sorted(after)
        if k not in COUNTERS and any(w in k for w in OTHER_WORDS) and _int(after, k) != _int(before, k)
    }


def _audit_records(run: Run, site: str, p0: Probe, p1: Probe) -> list[dict[str, object]]:
    """Return the audit records ``site``'s gateway appended between two probes."""
    try:
        with run.path(f"audit-{site}.jsonl").open("rb") as handle:
            handle.seek(p0.audit[site])
            data = handle.read(max(0, p1.audit[site] - p0.audit[site]))
    except OSError:
        return []
    records = []
    for line in data.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


def key_use(
    run: Run, p0: Probe, p1: Probe, before: dict[str, dict[str, object]], after: dict[str, dict[str, object]]
) -> dict[str, object]:
    """Count the QKD keys each side used in the window.

    * ``qkd_keys_master``: distinct key_IDs named by the master's audit records written in the
      window (M1 sent, handshake and ratchet completed; ``mode_change`` records, which repeat the
      current epoch's key_IDs, are left out). The check uses it.
    * ``qkd_keys_slave``: distinct key_IDs the slave's KME handed out through ``dec_keys`` in the
      window (its log), i.e. every key the slave fetched, whether a handshake completed or not.
    * ``qkd_keys_master_taken``: keys the master took for rekeys (from its prefetch stock, or
      fetched at once when the stock was empty), from its stats counters; these are read just
      before and after the window, so they span a second or two more than it (it also counts a
      ratchet that never completed, which the audit does not name).
    """
    master: set[str] = set()
    for rec in _audit_records(run, "a", p0, p1):
        ids = rec.get("key_ids")
        if rec.get("event") != "mode_change" and isinstance(ids, str):
            master.update(k for k in ids.split(",") if k and k != "-")
    slave: set[str] = set()
    for wall, message in kme_records(run.path("logs/kme-b.log"), since=p0.wall):
        if wall <= p1.wall and message.startswith("dec_keys"):
            slave |= key_ids_in(message)
    taken = sum(
        _int(after["a"], k) - _int(before["a"], k) for k in ("qkd_served_from_stock", "qkd_stock_misses")
    )
    return {"qkd_keys_master": len(master), "qkd_keys_slave": len(slave), "qkd_keys_master_taken": taken}


def audit_fields(run: Run, p0: Probe, p1: Probe) -> dict[str, object]:
    """Return the audit measures per gateway: bytes, records, events, ``mode_changes``, ``degraded``.

    ``degraded`` counts the ``mode_change`` records to ``degraded`` or ``closed``.
    """
    out: dict[str, dict[str, object]] = {
        k: {} for k in ("audit_bytes", "audit_records", "audit_events", "mode_changes", "degraded")
    }
    for site in "ab":
        records = _audit_records(run, site, p0, p1)
        events: dict[str, int] = {}
        for rec in records:
            events[str(rec.get("event"))] = events.get(str(rec.get("event")), 0) + 1
        modes = [r for r in records if r.get("event") == "mode_change"]
        out["audit_bytes"][site] = p1.audit[site] - p0.audit[site]
        out["audit_records"][site] = len(records)
        out["audit_events"][site] = events
        out["mode_changes"][site] = len(modes)
        out["degraded"][site] = sum(1 for r in modes if r.get("new") in ("degraded", "closed"))
    return dict(out)


def kernel_fields(run: Run, site: str, p0: Probe, p1: Probe) -> dict[str, int]:
    """Kernel counters of gateway ``site``'s namespace in the window: UDP in, UDP errors, tap drops."""
    tap = run.taps[site].gateway_if
    names = {
        "udp_in_datagrams": "Udp.InDatagrams",
        "udp_rcvbuf_errors": "Udp.RcvbufErrors",
        "udp_in_errors": "Udp.InErrors",
        "tap_rx_dropped": f"{tap}.rx_dropped",
    }
    a, b = p0.kernel.get(site, {}), p1.kernel.get(site, {})
    return {key: b.get(name, 0) - a.get(name, 0) for key, name in names.items()}


# ----- verdict --------------------------------------------------------------------------
def kind_checks(row: dict[str, object], none: dict[str, object], idle: dict[str, object]) -> dict[str, bool]:
    """The acceptance checks of one window (issue 10).

    * ``keys_master`` / ``keys_slave``: QKD keys used equal the ``none`` window's, scaled to this
      window's length and rounded, within :data:`KEY_SLACK`;
    * ``ping_no_loss``: every ping answered;
    * ``rtt_p99_within_2x_idle``: p99 RTT at most twice the idle p99 (idle floored at
      :data:`IDLE_P99_FLOOR_MS`);
    * ``audit_under_100kb_per_60s``: each gateway's audit growth, scaled to 60 s, under 100 KB;
    * ``ran``: the window ran (datagrams were sent, for a flood kind).
    """
    scale = _num(row.get("window_s")) / max(_num(none.get("window_s")), 0.001)
    keys = {
        side: abs(_num(row.get(f"qkd_keys_{side}")) - round(_num(none.get(f"qkd_keys_{side}")) * scale))
        <= KEY_SLACK
        for side in ("master", "slave")
    }
    limit = 2 * max(_num(idle.get("rtt_p99_ms"), IDLE_P99_FLOOR_MS), IDLE_P99_FLOOR_MS)
    p99 = row.get("rtt_p99_ms")
    audit = row.get("audit_bytes")
    per_60 = [
        _num(v) * AUDIT_PERIOD / max(_num(row.get("window_s")), 0.001)
        for v in (audit.values() if isinstance(audit, dict) else [])
    ]
    return {
        "keys_master": keys["master"],
        "keys_slave": keys["slave"],
        "ping_no_loss": row.get("ping_loss_pct") == 0 and _num(row.get("ping_received")) > 0,
        "rtt_p99_within_2x_idle": p99 is not None and _num(p99) <= limit,
        "audit_under_100kb_per_60s": bool(per_60) and max(per_60) < AUDIT_LIMIT_BYTES,
        "ran": "skipped" not in row,
    }


def _num(value: object, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def summarise(
    opts: FloodOptions, idle: dict[str, object], kinds: dict[str, dict[str, object]]
) -> dict[str, object]:
    """Return ``{"seconds", "rate", "idle", "kinds", "checks", "ok"}`` (checks per kind)."""
    checks = {kind: kind_checks(row, kinds["none"], idle) for kind, row in kinds.items()}
    return {
        "seconds": opts.seconds,
        "rate": "max" if opts.rate is None else opts.rate,
        "idle": idle,
        "kinds": kinds,
        "checks": checks,
        "ok": all(all(c.values()) for c in checks.values()),
    }


def short_line(row: dict[str, object]) -> str:
    """Return a one-line progress note of a window (for stderr)."""
    return (
        f"sent {row.get('sent')} ({row.get('rate_pps')}/s), ping loss {row.get('ping_loss_pct')} %, "
        f"p99 {row.get('rtt_p99_ms')} ms, keys {row.get('qkd_keys_master')}/{row.get('qkd_keys_slave')}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] != ["send"]:
        sys.exit("usage: python -m qgate.lab_flood send --pool FILE --links IF,IF --rate R|max --seconds S")
    sys.exit(sender_main(sys.argv[2:]))
