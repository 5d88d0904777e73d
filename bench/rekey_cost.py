"""What fast rekeying costs a bulk TCP flow: throughput with a QKD ratchet every 0.1 s vs none (needs root).

Alternates ``--rounds`` pairs of fresh labs (:class:`qgate.lab.Lab`), identical but for the
rekey timing forced into both policies:

* ``steady``: no rekey during the test (ratchet every hour, ML-KEM handshake every 2 h);
* ``rekey``: a QKD ratchet every ``--interval`` s (default 0.1), a full ML-KEM handshake every
  ``--kem-interval`` s (default 5), hard key age 3 s;

and in each runs one iperf3 TCP flow host A -> host B for ``--seconds``. Reported:
``tcp_gbps_steady`` / ``tcp_gbps_rekey`` (medians over the rounds), ``cost_pct`` = 100 x (1 -
rekey / steady) (issue 5's goal: under 5), ``rekeys_per_s`` (QKD ratchets plus ML-KEM handshakes
completed by the master per second of flow), and ``lost`` = the gateways' drop counters that a
rekey could move (auth, replay, unknown index, expired or exhausted key, no session), summed
over both gateways and all ``rekey`` flows (goal: 0). iperf3's own ``retransmits`` are listed
too; they come from queue overflows in any mode. ``--json`` prints one JSON line last on stdout.

Usage: ``.venv/bin/python bench/rekey_cost.py [--seconds 10] [--rounds 2] [--interval 0.1] [--json]``
Exit status: 0 measured, 2 a lab failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Final

import throughput

from qgate.lab import Lab, fresh_stats
from qgate.lab_procs import LabError

STEADY: Final = {"interval": 3600.0, "kem_interval": 7200.0, "max_key_age": 10800.0}
"""Seconds: rekey timing under which no rekey happens during a flow."""
LOSS_COUNTERS: Final = (
    "drops_auth", "drops_replay", "drops_unknown_index", "drops_key_expired", "drops_key_exhausted",
    "drops_no_session",
)  # fmt: skip
"""Gateway counters a badly timed key switch would move."""
KME_RATE: Final = 1_000_000
"""Bits per second of simulated QKD key per KME: far above ten 256-bit ratchets a second."""


def _int(stats: dict[str, object], *keys: str) -> int:
    value: object = stats
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, int) else 0


def one_flow(rekey: dict[str, float], seconds: float) -> dict[str, float]:
    """Build a lab with ``rekey`` timing, run one TCP flow; return Gbit/s, rekeys, losses, retransmits."""
    with Lab(tunnel=True) as lab:
        watch = lab.start_qgate(rekey=rekey, kme_rate=KME_RATE)
        lab.wait_path(watch)
        time.sleep(1.0)
        paths = {site: lab.run_dir / f"stats-{site}.json" for site in ("a", "b")}
        before = {site: fresh_stats(path) for site, path in paths.items()}
        started = time.monotonic()
        end = throughput.iperf_client(lab, seconds)
        elapsed = time.monotonic() - started
        after = {site: fresh_stats(path) for site, path in paths.items()}
        for child in watch:
            lab.kids.check_alive(child)
    kinds = ("rekeys_qkd", "rekeys_kem")
    rekeys = sum(_int(after["a"], "master", key) - _int(before["a"], "master", key) for key in kinds)
    lost = sum(_int(after[s], key) - _int(before[s], key) for s in ("a", "b") for key in LOSS_COUNTERS)
    sent = end.get("sum_sent")
    retransmits = sent.get("retransmits", 0) if isinstance(sent, dict) else 0
    gbps = throughput.measure_tcp_from_end(end)
    return {"gbps": gbps, "rekeys_per_s": rekeys / elapsed, "lost": lost, "retransmits": retransmits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.1, help="QKD ratchet interval, s")
    parser.add_argument("--kem-interval", type=float, default=5.0, help="ML-KEM handshake interval, s")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    fast = {"interval": opts.interval, "kem_interval": opts.kem_interval, "max_key_age": 3.0}
    runs: dict[str, list[dict[str, float]]] = {"steady": [], "rekey": []}
    try:
        for round_no in range(opts.rounds):
            for mode, timing in (("steady", STEADY), ("rekey", fast)):
                run = one_flow(timing, opts.seconds)
                runs[mode].append(run)
                print(f"round {round_no + 1} {mode:6s}: {run['gbps']:.3f} Gbit/s, {run['rekeys_per_s']:.1f} "
                      f"rekeys/s, lost {run['lost']:.0f}, retransmits {run['retransmits']:.0f}",
                      file=sys.stderr)  # fmt: skip
    except LabError as exc:
        print(f"rekey cost bench failed: {exc}", file=sys.stderr)
        if opts.json:
            print(json.dumps({"error": str(exc)}, separators=(",", ":")))
        return 2
    steady = statistics.median(r["gbps"] for r in runs["steady"])
    rekeyed = statistics.median(r["gbps"] for r in runs["rekey"])
    result = {
        "tcp_gbps_steady": round(steady, 3),
        "tcp_gbps_rekey": round(rekeyed, 3),
        "cost_pct": round(100 * (1 - rekeyed / steady), 1) if steady else None,
        "rekeys_per_s": round(statistics.median(r["rekeys_per_s"] for r in runs["rekey"]), 1),
        "steady_rekeys_per_s": round(statistics.median(r["rekeys_per_s"] for r in runs["steady"]), 2),
        "lost": int(sum(r["lost"] for r in runs["rekey"])),
        "retransmits": {mode: [int(r["retransmits"]) for r in rs] for mode, rs in runs.items()},
        "rounds": opts.rounds,
        "seconds": opts.seconds,
    }
    summary = (
        f"rekey every {opts.interval:g} s: {result['tcp_gbps_rekey']} vs {result['tcp_gbps_steady']} Gbit/s"
        f" steady, cost {result['cost_pct']} %, {result['rekeys_per_s']} rekeys/s, lost {result['lost']}"
    )
    print(summary, file=sys.stderr)
    if opts.json:
        print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
