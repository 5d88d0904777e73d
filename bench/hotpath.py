"""Per-packet cost of each data-plane stage, in process (no I/O), against raw AES-256-GCM in the same run.

Stages, each timed over ``--rounds`` 64 KB TCP super-packets as a TUN with TSO hands them over
(MSS 1368 bytes, the lab's; 47 segments each):

* ``aesgcm_encrypt`` (baseline): ``AESGCM.encrypt`` of one 1420-byte packet, nothing else;
* ``split_tso``: super-packet -> real IP packets with complete checksums;
* ``seal``: :meth:`qgate.protocol.epoch.EpochSet.seal_batch` of one super-packet's segments
  (header, counter, AES-GCM), as the forwarder calls it;
* ``open``: :meth:`qgate.protocol.epoch.EpochSet.open` (header, epoch, AES-GCM, replay window);
* ``coalesce``: :func:`qgate.dataplane.coalesce.coalesce` of one super-packet's segments as the
  receiver has them after opening, without re-verifying checksums (what the gateway runs:
  protocol.md section 2.1); ``coalesce_verify``: the same, summing each segment first;
* ``sum16``: the Internet checksum of one 1420-byte packet.

Figures are microseconds per inner packet (median of ``--repeat`` runs) and the ratio to the
baseline. ``--json`` prints one JSON line last on stdout: ``{"stage": {"us": x, "x_aesgcm": y}}``.

Usage: ``.venv/bin/python bench/hotpath.py [--rounds 200] [--repeat 5] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qgate.crypto.secret import Secret
from qgate.dataplane.coalesce import coalesce as coalesce_packets
from qgate.dataplane.offload import (
    GSO_TCPV4,
    VNET_F_NEEDS_CSUM,
    VnetHeader,
    fold,
    split_tso,
    sum16,
)
from qgate.protocol.epoch import Epoch, EpochSet

MSS: Final = 1368
"""Bytes of TCP payload per segment (lab MTU 1420 - 20 IP - 32 TCP with timestamps)."""
SEGMENTS: Final = 47


def super_packet() -> tuple[VnetHeader, bytes]:
    """A 64 KB TCP/IPv4 super-packet with a partial checksum, as the kernel hands it over."""
    tcp = bytearray(32)
    tcp[0:4] = (40000).to_bytes(2, "big") + (5201).to_bytes(2, "big")
    tcp[4:8] = (123456789).to_bytes(4, "big")
    tcp[8:12] = (987).to_bytes(4, "big")
    tcp[12] = 8 << 4
    tcp[13] = 0x18
    tcp[14:16] = (500).to_bytes(2, "big")
    tcp[20:32] = b"\x01\x01\x08\x0a" + os.urandom(8)
    payload = os.urandom(MSS * SEGMENTS)
    total = 20 + 32 + len(payload)
    ip = bytearray(b"\x45\x00" + total.to_bytes(2, "big") + b"\x12\x34\x40\x00\x40\x06\x00\x00")
    ip += bytes((10, 1, 0, 2, 10, 2, 0, 2))
    tcp[16:18] = fold(sum16(ip[12:20]) + 6 + 32 + len(payload)).to_bytes(2, "big")
    return VnetHeader(VNET_F_NEEDS_CSUM, GSO_TCPV4, 52, MSS, 20, 16), bytes(ip + tcp + payload)


def epoch_pair() -> tuple[EpochSet, EpochSet]:
    """Two epoch sets that share one epoch's keys (sender, receiver)."""
    k1, k2 = os.urandom(32), os.urandom(32)
    sets = []
    for send, recv, mine, peer in ((k1, k2, 1, 2), (k2, k1, 2, 1)):
        epochs = EpochSet(max_key_age=1e9)
        epoch = Epoch(number=1, my_index=mine, peer_index=peer, send_key=Secret(send), recv_key=Secret(recv),
                      chaining_key=Secret(os.urandom(32)), created_at=0.0, kind="bench", key_ids=())
        epochs.install_current(epoch, 0.0)
        sets.append(epochs)
    return sets[0], sets[1]


def per_packet_us(fn: Callable[[], int], repeat: int) -> float:
    """Median over ``repeat`` runs of (seconds / packets handled) in microseconds."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        packets = fn()
        runs.append((time.perf_counter() - start) / packets * 1e6)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="super-packets per run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    vnet, packet = super_packet()
    segments = split_tso(vnet, packet)
    sender, receiver = epoch_pair()
    sealed = [sender.seal(s, 1.0) for s in segments * opts.rounds]
    datagrams = [d for d in sealed if d is not None]
    aead, nonce, one = AESGCM(os.urandom(32)), os.urandom(12), segments[0]
    n = len(segments) * opts.rounds

    def baseline() -> int:
        for _ in range(n):
            aead.encrypt(nonce, one, None)
        return n

    def split() -> int:
        for _ in range(opts.rounds):
            split_tso(vnet, packet)
        return n

    def seal() -> int:
        for _ in range(opts.rounds):
            sender.seal_batch(segments, 1.0)
        return n

    def open_all() -> int:
        for epoch in receiver.by_index.values():
            epoch.replay.__init__()  # type: ignore[misc]
        for d in datagrams:
            receiver.open(d, 1.0)
        return len(datagrams)

    def coalesce(verify: bool) -> Callable[[], int]:
        def run() -> int:
            for _ in range(opts.rounds):
                coalesce_packets(segments, verify=verify)
            return n
        return run

    def checksum() -> int:
        for _ in range(n):
            sum16(one)
        return n

    stages: dict[str, Callable[[], int]] = {
        "aesgcm_encrypt": baseline, "split_tso": split, "seal": seal, "open": open_all,
        "coalesce": coalesce(False), "coalesce_verify": coalesce(True), "sum16": checksum,
    }
    per_packet_us(split, 1)  # warm-up: the CPU clock ramps up and caches fill before anything counts
    base = per_packet_us(baseline, opts.repeat)
    result: dict[str, dict[str, float]] = {}
    for name, fn in stages.items():
        us = base if name == "aesgcm_encrypt" else per_packet_us(fn, opts.repeat)
        result[name] = {"us": round(us, 3), "x_aesgcm": round(us / base, 2)}
        print(f"{name:20s} {us:8.3f} us/packet  {us / base:6.2f} x AES-GCM encrypt", file=sys.stderr)
    if opts.json:
        print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
