"""Rekeys under load: does a QKD ratchet every 0.1 s lose or reject any packet? (needs root).

In the namespace lab (``qgate.lab``), with KMEs releasing 1 Mbit/s of key (far above the
~2.6 kbit/s that ten 256-bit rekeys per second use) and both policies set to a QKD ratchet
every ``--interval`` s, a full ML-KEM handshake every ``--kem-interval`` s and a hard key
age of ``--max-key-age`` s, it measures the tunnel's TCP capacity with iperf3 (``--probe``
s), then runs for ``--seconds`` at once, host A -> host B:

* a TCP transfer of random bytes paced at half that capacity, SHA-256 checked on both ends;
* a UDP stream of 1,000-byte payloads at 2,000 datagrams/s, numbered; the receiver counts
  the distinct numbers that arrived.

Result keys (``--json``: one JSON line, last on stdout; everything else on stderr):
``rekeys`` (QKD ratchet steps completed at the master in the window), ``rekeys_kem``,
``rekeys_slave``, ``udp_sent``, ``udp_received``, ``udp_lost`` (sent - received, any cause),
``tcp_capacity_mbps``, ``tcp_rate_mbps``, ``tcp_bytes``, ``tcp_sha256_match``, the drop
counters summed over both gateways in the window (``auth_drops``, ``replay_drops``,
``key_expired_drops``, ``unknown_index_drops``, ``no_session_drops``, ``key_exhausted_drops``,
``malformed_drops``), and where losses went: ``gateway_drops`` (every loss counter that moved,
per gateway), ``drop_timeline``, ``kernel_drops`` (per namespace), ``udp_missing`` and
``udp_loss_location`` (nearest epoch transitions), ``checks`` and ``ok``. Every namespace and
process is removed on every path.

Usage: ``.venv/bin/python bench/rekey.py [--seconds 60] [--interval 0.1] [--kem-interval 5] [--json]``
Exit status: 0 all checks passed, 1 a check failed, 2 the lab could not run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

from qgate.lab_rekey import RekeyOptions, run_rekey_bench

SUMMARY_KEYS = (
    "rekeys", "rekeys_kem", "rekeys_slave", "window_s", "udp_sent", "udp_received", "udp_lost",
    "tcp_capacity_mbps", "tcp_rate_mbps", "tcp_goodput_mbps", "tcp_bytes", "tcp_sha256_match",
    "auth_drops", "replay_drops", "key_expired_drops", "unknown_index_drops", "no_session_drops",
    "gateway_drops", "kernel_drops", "gateway_warnings", "transition_max_gap_ms", "cpu_pct", "udp_start",
    "udp_missing", "udp_loss_location", "duration_s",
)  # fmt: skip


def summary(result: dict[str, object]) -> str:
    """Return a human summary of a result (for stderr)."""
    lines = [f"rekey bench: {'OK' if result.get('ok') else 'FAILED'}"]
    lines += [f"  {k:20} {json.dumps(result[k])}" for k in SUMMARY_KEYS if k in result]
    checks = result.get("checks")
    if isinstance(checks, dict):
        lines += [f"  check {k:32} {'pass' if v else 'FAIL'}" for k, v in checks.items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured traffic window (s)")
    parser.add_argument("--interval", type=float, default=0.1, help="QKD ratchet period (s)")
    parser.add_argument("--kem-interval", type=float, default=5.0, help="ML-KEM handshake period (s)")
    parser.add_argument("--max-key-age", type=float, default=1.0, help="hard traffic-key lifetime (s)")
    parser.add_argument("--kme-rate", type=int, default=1_000_000, help="KME key rate (bits/s)")
    parser.add_argument("--probe", type=float, default=3.0, help="iperf3 capacity probe (s)")
    parser.add_argument("--udp-pps", type=float, default=2000.0, help="UDP datagrams per second")
    parser.add_argument("--json", action="store_true", help="one JSON line last on stdout")
    parser.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit status as in the module docstring."""
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper())
    problem = None
    if os.geteuid() != 0:
        problem = "the lab needs root (network namespaces, veth, TUN)"
    elif shutil.which("iperf3") is None:
        problem = "iperf3 is not installed (apt-get install -y iperf3)"
    if problem:
        sys.stderr.write(problem + "\n")
        if args.json:
            print(json.dumps({"ok": False, "error": problem}))
        return 2
    opts = RekeyOptions(seconds=args.seconds, interval=args.interval, kem_interval=args.kem_interval,
                        max_key_age=args.max_key_age, kme_rate=args.kme_rate, probe_seconds=args.probe,
                        udp_pps=args.udp_pps)  # fmt: skip
    try:
        result = run_rekey_bench(opts)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; torn down\n")
        if args.json:
            print(json.dumps({"ok": False, "error": "interrupted"}))
        return 130
    except Exception as exc:  # report, tear-down already done by the lab
        sys.stderr.write(f"rekey bench failed: {exc}\n")
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    sys.stderr.write(summary(result) + "\n")
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
