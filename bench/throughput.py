"""Throughput and latency: bare veth forwarding vs qgate, in the same lab topology (needs root).

For each path (``veth``: the gateway namespaces just route; ``qgate``: KMEs, gateways and the
tunnel, as ``qgate lab run``) it measures, between host A and host B:

* ``tcp_gbps``: one iperf3 TCP flow for ``--seconds`` (default 10), receiver-side Gbit/s;
* ``rtt_p50_ms`` / ``rtt_p99_ms``: ``--pings`` (default 300) pings 10 ms apart on the idle path.

A table with the qgate/veth ratios goes to stderr; ``--json`` prints one JSON line last on
stdout: ``{"veth": {...}, "qgate": {...}, "ratio": {...}}``. Every namespace and process is
removed on every path (``qgate.lab.Lab``).

Usage: ``.venv/bin/python bench/throughput.py [--json] [--seconds 10] [--pings 300] [--only veth|qgate]``
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from typing import Final

from qgate import lab_net as net
from qgate.lab import Lab, listens
from qgate.lab_procs import LabError, wait_until
from qgate.lab_traffic import parse_ping

IPERF_PORT: Final = 5201
PATHS: Final = ("veth", "qgate")
METRICS: Final = ("tcp_gbps", "rtt_p50_ms", "rtt_p99_ms")


def measure_ping(lab: Lab, count: int) -> dict[str, float | None]:
    """Ping host B from host A ``count`` times, 10 ms apart; RTT p50/p99 in ms and loss in %."""
    proc = lab.run("ha", ["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", net.HOST_B],
                   timeout=count * 0.05 + 20)  # fmt: skip
    result = parse_ping(proc.stdout)
    return {
        "rtt_p50_ms": result.percentile_ms(50),
        "rtt_p99_ms": result.percentile_ms(99),
        "ping_loss_pct": result.loss_pct,
    }


def measure_tcp(lab: Lab, seconds: float) -> float:
    """Run one iperf3 TCP flow host A -> host B for ``seconds``; return receiver Gbit/s."""
    server = lab.start("iperf3-server", "hb", ["iperf3", "-s", "-1", "-B", net.HOST_B, "-p", str(IPERF_PORT)])

    def listening() -> bool:
        lab.kids.check_alive(server)
        return listens(lab.topo.ns("hb"), IPERF_PORT)

    wait_until("iperf3 server", listening, timeout=10)
    proc = lab.run("ha", ["iperf3", "-c", net.HOST_B, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
                   timeout=seconds + 30)  # fmt: skip
    try:
        report = json.loads(proc.stdout)
        bps = float(report["end"]["sum_received"]["bits_per_second"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"iperf3 client failed: {proc.stdout[-500:]} {proc.stderr[-500:]}") from exc
    lab.kids.stop(server)
    return round(bps / 1e9, 3)


def measure_path(path: str, *, seconds: float, pings: int) -> dict[str, float | None]:
    """Build the lab for ``path`` (``veth`` or ``qgate``), measure it, tear it down."""
    with Lab(tunnel=path == "qgate") as lab:
        watch = lab.start_qgate() if lab.tunnel else []
        lab.wait_path(watch)
        result = measure_ping(lab, pings)
        result["tcp_gbps"] = measure_tcp(lab, seconds)
        for child in watch:
            lab.kids.check_alive(child)
    return result


def ratios(results: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Return qgate/veth for each metric (None when a value is missing or zero)."""
    out: dict[str, float | None] = {}
    for metric in METRICS:
        base, ours = results.get("veth", {}).get(metric), results.get("qgate", {}).get(metric)
        out[metric] = round(ours / base, 3) if base and ours is not None else None
    return out


def table(results: dict[str, dict[str, float | None]]) -> str:
    """Format the results (and ratios when both paths ran) as a text table."""
    rows = [f"{'path':8} " + " ".join(f"{m:>12}" for m in METRICS)]
    for path, values in results.items():
        rows.append(f"{path:8} " + " ".join(f"{_fmt(values.get(m)):>12}" for m in METRICS))
    if len(results) == len(PATHS):
        rows.append(f"{'q/veth':8} " + " ".join(f"{_fmt(v):>12}" for v in ratios(results).values()))
    return "\n".join(rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 on success, 2 when a path could not be measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="one JSON line last on stdout")
    parser.add_argument("--seconds", type=float, default=10.0, help="iperf3 duration (s)")
    parser.add_argument("--pings", type=int, default=300, help="pings per path, 10 ms apart")
    parser.add_argument("--only", choices=PATHS, help="measure one path only")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper())
    if shutil.which("iperf3") is None:
        sys.stderr.write("iperf3 is not installed (apt-get install -y iperf3)\n")
        return 2
    results: dict[str, dict[str, float | None]] = {}
    try:
        for path in [args.only] if args.only else PATHS:
            sys.stderr.write(f"measuring {path} ...\n")
            results[path] = measure_path(path, seconds=args.seconds, pings=args.pings)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; torn down\n")
        return 130
    except Exception as exc:  # report, still print what was measured
        sys.stderr.write(f"benchmark failed: {exc}\n")
        if args.json:
            print(json.dumps({**results, "error": str(exc)}))
        return 2
    sys.stderr.write(table(results) + "\n")
    if args.json:
        out: dict[str, object] = dict(results)
        if len(results) == len(PATHS):
            out["ratio"] = ratios(results)
        print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
