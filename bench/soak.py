"""Gateway memory under sustained load: RSS of both gateways sampled over a long bulk transfer (needs root).

Builds the lab (:class:`qgate.lab.Lab`) with the lab policies (QKD ratchets and ML-KEM
handshakes keep happening), then for ``--minutes`` (default 10) runs back-to-back iperf3 TCP
flows host A -> host B (30 s each, so the flows' own state comes and goes) plus one ping a
second, and reads each gateway's resident set size (``VmRSS`` in ``/proc/<pid>/status``) every
``--interval`` seconds. Reported per gateway, in MB (10^6 bytes): ``rss_mb_start`` (first sample
after ``--warmup`` seconds of load), ``rss_mb_max``, ``rss_mb_end``, and ``growth_mb_per_10min``
(least-squares slope over the post-warm-up samples, scaled to 10 minutes), plus the bytes iperf3
moved and the gateways' rekey counts. Goal (issue 5): max under 80 MB and flat (growth well under
the noise of a few MB). ``--json`` prints one JSON line last on stdout.

Usage: ``.venv/bin/python bench/soak.py [--minutes 10] [--interval 5] [--json]``
Exit status: 0 measured (the goal is reported, not enforced), 2 a gateway died or the lab failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Final

import throughput

from qgate import lab_net as net
from qgate.lab import Lab, gateway_status
from qgate.lab_procs import Child, LabError

FLOW_SECONDS: Final = 30.0
"""Seconds per iperf3 flow; flows run back to back."""
RSS_GOAL_MB: Final = 80.0
"""Issue 5: each gateway's RSS stays under this, MB."""


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (10^6 bytes), from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise LabError(f"no VmRSS for pid {pid}")


def slope_per_10min(times: list[float], values: list[float]) -> float:
    """Least-squares slope of ``values`` over ``times`` (seconds), in units per 10 minutes."""
    if len(times) < 2:
        return 0.0
    return statistics.linear_regression(times, values).slope * 600


def _rekeys(status: dict[str, object]) -> int:
    """Sum of the peers' rekey counters in a ``qgate status --json`` object."""
    peers = status.get("peers")
    rows = peers if isinstance(peers, list) else []
    return sum(int(row.get("rekeys", 0) or 0) for row in rows if isinstance(row, dict))


def load(lab: Lab, stop: threading.Event, moved: list[float], errors: list[str]) -> None:
    """Run iperf3 flows back to back until ``stop`` is set; add the bytes received to ``moved``."""
    while not stop.is_set():
        try:
            end = throughput.iperf_client(lab, FLOW_SECONDS)
            moved.append(float(end["sum_received"]["bytes"]))  # type: ignore[index]
        except (LabError, KeyError, TypeError) as exc:
            errors.append(str(exc))
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before counting")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    result: dict[str, object] = {}
    try:
        with Lab(tunnel=True) as lab:
            watch: list[Child] = lab.start_qgate()
            lab.wait_path(watch)
            gateways = {"b": watch[0], "a": watch[1]}
            stop, moved, errors = threading.Event(), [], []
            loader = threading.Thread(target=load, args=(lab, stop, moved, errors), daemon=True)
            pinger = lab.start("soak-ping", "ha", ["ping", "-n", "-q", "-i", "1", net.HOST_B])
            started = time.monotonic()
            loader.start()
            samples: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
            while (elapsed := time.monotonic() - started) < opts.minutes * 60:
                for site, child in gateways.items():
                    lab.kids.check_alive(child)
                    samples[site].append((elapsed, rss_mb(child.proc.pid)))
                if errors:
                    raise LabError(errors[0])
                print(f"{elapsed:6.0f} s  " + "  ".join(f"{s.upper()} {v[-1][1]:5.1f} MB"
                                                      for s, v in samples.items()), file=sys.stderr)
                time.sleep(opts.interval)
            stop.set()
            loader.join(timeout=FLOW_SECONDS + 60)
            lab.kids.stop(pinger)
            for site, points in samples.items():
                counted = [(t, v) for t, v in points if t >= opts.warmup] or points
                times, values = [t for t, _ in counted], [v for _, v in counted]
                status = gateway_status(lab, site)
                result[site] = {
                    "rss_mb_start": round(values[0], 1),
                    "rss_mb_max": round(max(v for _, v in points), 1),
                    "rss_mb_end": round(values[-1], 1),
                    "growth_mb_per_10min": round(slope_per_10min(times, values), 2),
                    "samples": len(points),
                    "rekeys": _rekeys(status),
                }
            result["minutes"] = opts.minutes
            result["gbytes_moved"] = round(sum(moved) / 1e9, 2)
    except LabError as exc:
        print(f"soak failed: {exc}", file=sys.stderr)
        if opts.json:
            print(json.dumps({"error": str(exc)}, separators=(",", ":")))
        return 2
    for site in ("a", "b"):
        r = result[site]
        assert isinstance(r, dict)
        verdict = "ok" if r["rss_mb_max"] < RSS_GOAL_MB else "OVER GOAL"
        print(
            f"gateway {site.upper()}: RSS start {r['rss_mb_start']} MB, max {r['rss_mb_max']} MB, "
            f"end {r['rss_mb_end']} MB, growth {r['growth_mb_per_10min']} MB/10 min ({verdict})",
            file=sys.stderr,
        )
    print(f"moved {result['gbytes_moved']} GB in {opts.minutes:g} min", file=sys.stderr)
    if opts.json:
        print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
