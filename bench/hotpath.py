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
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repo's ``tests/fuzz_corpus.py`` importable
    sys.path.insert(0, str(REPO))

from qgate.dataplane.coalesce import coalesce as coalesce_packets  # noqa: E402
from qgate.dataplane.offload import parse_vnet_header, split_tso, sum16  # noqa: E402
from tests.fuzz_corpus import EpochPair, super_packet  # noqa: E402

MSS: Final = 1368
"""Bytes of TCP payload per segment (lab MTU 1420 - 20 IP - 32 TCP with timestamps)."""
SEGMENTS: Final = 47
TIMESTAMP: Final = b"\x01\x01\x08\x0a" + bytes(8)
"""NOP, NOP, TCP timestamp option (12 bytes), as Linux sends on every segment."""


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
    read = super_packet(random.Random(1), 4, 6, MSS * SEGMENTS, MSS, TIMESTAMP)
    vnet, packet = parse_vnet_header(read[:10]), read[10:]
    segments = split_tso(vnet, packet)
    pair = EpochPair.build()
    sender, receiver = pair.senders[1], pair.receiver  # the receiver's current epoch
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
