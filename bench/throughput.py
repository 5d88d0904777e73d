"""Throughput and latency: bare veth vs OpenVPN vs qgate, in the same lab topology (needs root).

Three paths between host A and host B of the lab (:mod:`qgate.lab_net`), each in a fresh
topology built and torn down by :class:`qgate.lab.Lab`:

* ``veth``: the gateway namespaces just route (plain IP forwarding, no tunnel);
* ``openvpn``: OpenVPN 2.6 in both gateway namespaces, TLS peer-to-peer mode, AES-256-GCM
  data channel, user-space data path, TUN MTU equal to qgate's (``bench/openvpn_lab.py``;
  ``apt-get install -y openvpn`` when missing);
* ``qgate``: both KMEs and both gateways with the lab policies, as ``qgate lab run``.

Methods, the same for every path (host A sends, host B receives):

* ``tcp_gbps``: one iperf3 TCP flow for ``--seconds`` (default 10); receiver Gbit/s;
* ``udp64_kpps``: one iperf3 UDP sender offering 64-byte payloads as fast as it can
  (``-u -l 64 -b 0``) for ``--seconds``; thousands of datagrams per second that host B's
  iperf3 received (``udp64_sent_kpps``: what the sender managed to offer; one iperf3 sender
  is one CPU-bound thread, so on the bare veth path the sender is the limit);
* ``rtt_p50_ms`` / ``rtt_p99_ms``: ``--pings`` (default 1000) pings 10 ms apart on the idle
  path (nearest-rank percentiles of the replies; ``ping_loss_pct`` the rest);
* ``rtt_p99_loaded_ms``: the same pings while one iperf3 TCP flow runs host A -> host B
  (started 1 s before the first ping; ``loaded_ping_loss_pct``).

A table with qgate's ratios to each other path (qgate / other, per metric: below 1 is slower
for throughput, above 1 is slower for RTT) goes to stderr. ``--json`` prints one JSON line,
last on stdout: ``{"veth": {...}, "openvpn": {...}, "qgate": {...}, "ratios": {"qgate/veth":
{...}, "qgate/openvpn": {...}}}``; a path that failed has ``"error"`` in its object, a path
that could not run at all (OpenVPN not installable) is listed under ``"skipped"``. Every
namespace and process is removed on every path. Default settings take about 3 minutes.

Usage: ``.venv/bin/python bench/throughput.py [--json] [--seconds 10] [--pings 1000]
[--only veth,openvpn,qgate]``
Exit status: 0 every selected path measured, 2 a path failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Final

import openvpn_lab

from qgate import lab_net as net
from qgate.lab import Lab, listens
from qgate.lab_procs import Child, LabError, wait_until
from qgate.lab_traffic import parse_ping

IPERF_PORT: Final = 5201
PATHS: Final = ("veth", "openvpn", "qgate")
METRICS: Final = ("tcp_gbps", "udp64_kpps", "rtt_p50_ms", "rtt_p99_ms", "rtt_p99_loaded_ms")
UDP_PAYLOAD: Final = 64
"""Bytes of UDP payload per datagram in the packet-rate test."""
PING_INTERVAL: Final = 0.01
LOAD_LEAD: Final = 1.0
"""Seconds the TCP flow runs before the loaded pings start."""
SETTLE: Final = 1.0
"""Seconds of quiet between two tests of a path (queues drain)."""
TUN_DEVICES: Final = {"openvpn": openvpn_lab.DEVICE, "qgate": "qgtun0"}

Value = float | int | str | None
Result = dict[str, Value]


def measure_ping(lab: Lab, count: int, *, key: str = "rtt") -> Result:
    """Ping host B from host A ``count`` times, 10 ms apart; p50/p99 RTT (ms) and loss (%).

    Args:
        key: ``rtt`` gives ``rtt_p50_ms``, ``rtt_p99_ms``, ``ping_loss_pct``; ``loaded`` gives
            ``rtt_p50_loaded_ms``, ``rtt_p99_loaded_ms``, ``loaded_ping_loss_pct``.
    """
    argv = ["ping", "-n", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "1", net.HOST_B]
    proc = lab.run("ha", argv, timeout=count * PING_INTERVAL * 5 + 20)
    try:
        result = parse_ping(proc.stdout)
    except ValueError as exc:
        raise LabError(f"ping failed: {proc.stdout[-300:]} {proc.stderr[-300:]}") from exc
    suffix, loss = ("_ms", "ping_loss_pct") if key == "rtt" else ("_loaded_ms", "loaded_ping_loss_pct")
    return {
        f"rtt_p50{suffix}": result.percentile_ms(50),
        f"rtt_p99{suffix}": result.percentile_ms(99),
        loss: result.loss_pct,
    }


def start_iperf_server(lab: Lab) -> Child:
    """Start a one-shot iperf3 server on host B and wait until it listens."""
    server = lab.start("iperf3-server", "hb", ["iperf3", "-s", "-1", "-B", net.HOST_B, "-p", str(IPERF_PORT)])

    def listening() -> bool:
        lab.kids.check_alive(server)
        return listens(lab.topo.ns("hb"), IPERF_PORT)

    wait_until("iperf3 server", listening, timeout=10)
    return server


def iperf_client(lab: Lab, seconds: float, *extra: str) -> dict[str, object]:
    """Run an iperf3 client on host A against host B for ``seconds``; return its ``end`` report.

    Raises:
        LabError: iperf3 failed, hung or printed no JSON result.
    """
    server = start_iperf_server(lab)
    argv = ["iperf3", "-c", net.HOST_B, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J", *extra]
    try:
        proc = lab.run("ha", argv, timeout=seconds + 40)
    finally:
        lab.kids.stop(server)
    try:
        report = json.loads(proc.stdout)
        if "error" in report:
            raise LabError(f"iperf3 {' '.join(extra)}: {report['error']}")
        end = report["end"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"iperf3 client failed: {proc.stdout[-500:]} {proc.stderr[-500:]}") from exc
    if not isinstance(end, dict):
        raise LabError("iperf3 printed no end report")
    return end


def _number(obj: object, *keys: str) -> float:
    for key in keys:
        obj = obj[key] if isinstance(obj, dict) else None
    if not isinstance(obj, int | float):
        raise LabError(f"iperf3 report has no number at {'.'.join(keys)}")
    return float(obj)


def measure_tcp_from_end(end: dict[str, object]) -> float:
    """Receiver Gbit/s of an iperf3 TCP ``end`` report (3 decimals)."""
    return round(_number(end, "sum_received", "bits_per_second") / 1e9, 3)


def measure_tcp(lab: Lab, seconds: float) -> Result:
    """One iperf3 TCP flow host A -> host B for ``seconds``; ``tcp_gbps`` = receiver Gbit/s."""
    return {"tcp_gbps": measure_tcp_from_end(iperf_client(lab, seconds))}


def measure_udp(lab: Lab, seconds: float) -> Result:
    """iperf3 UDP, 64-byte payloads, unlimited rate, ``seconds``; received and offered kpps.

    Received datagrams = the receiver's byte count / 64 (iperf3 counts lost datagrams from
    sequence gaps, which misses a lost tail; bytes do not).
    """
    end = iperf_client(lab, seconds, "-u", "-l", str(UDP_PAYLOAD), "-b", "0")
    received = _number(end, "sum_received", "bytes") / UDP_PAYLOAD
    sent = _number(end, "sum_sent", "packets")
    rx_seconds = _number(end, "sum_received", "seconds") or seconds
    tx_seconds = _number(end, "sum_sent", "seconds") or seconds
    return {
        "udp64_kpps": round(received / rx_seconds / 1e3, 1),
        "udp64_sent_kpps": round(sent / tx_seconds / 1e3, 1),
        "udp64_received": int(received),
        "udp64_sent": int(sent),
    }


def measure_loaded_ping(lab: Lab, pings: int) -> Result:
    """Ping as :func:`measure_ping` while one iperf3 TCP flow runs host A -> host B."""
    duration = LOAD_LEAD + pings * PING_INTERVAL * 2 + 5  # outlasts the pings; stopped after them
    server = start_iperf_server(lab)
    client = lab.start("iperf3-load", "ha", ["iperf3", "-c", net.HOST_B, "-p", str(IPERF_PORT),
                                              "-t", f"{duration:g}"])  # fmt: skip
    try:
        time.sleep(LOAD_LEAD)
        lab.kids.check_alive(client)
        result = measure_ping(lab, pings, key="loaded")
        lab.kids.check_alive(client)
    finally:
        lab.kids.stop(client)
        lab.kids.stop(server)
    return result


def tun_mtu(lab: Lab, path: str) -> int | None:
    """Return the MTU of the path's tunnel device in gateway A (None for the bare veth path)."""
    device = TUN_DEVICES.get(path)
    if device is None:
        return None
    proc = lab.run("ga", ["cat", f"/sys/class/net/{device}/mtu"], timeout=5)
    return int(proc.stdout) if proc.returncode == 0 and proc.stdout.strip().isdigit() else None


def start_path(lab: Lab, path: str) -> tuple[list[Child], Result]:
    """Start what carries ``path`` (nothing, OpenVPN or qgate); return the children to watch and facts."""
    if path == "openvpn":
        children = openvpn_lab.start_openvpn(lab)
        return children, {"cipher": openvpn_lab.require_cipher(children), "mode": "tls-p2p, no DCO"}
    if path == "qgate":
        return lab.start_qgate(), {"cipher": "AES-256-GCM", "mode": "qgate lab policies"}
    return [], {}


def measure_path(path: str, *, seconds: float, pings: int) -> Result:
    """Build the lab for ``path``, measure all metrics, tear it down; return the path's results."""
    with Lab(tunnel=path != "veth") as lab:
        watch, result = start_path(lab, path)
        lab.wait_path(watch)
        result["run_id"] = lab.topo.run_id
        result["tun_mtu"] = tun_mtu(lab, path)
        steps: tuple[Callable[[], Result], ...] = (
            lambda: measure_ping(lab, pings),
            lambda: measure_tcp(lab, seconds),
            lambda: measure_udp(lab, seconds),
            lambda: measure_loaded_ping(lab, pings),
        )
        for step in steps:
            result.update(step())
            for child in watch:
                lab.kids.check_alive(child)
            time.sleep(SETTLE)
    return result


def _ratio(mine: Value, base: Value) -> float | None:
    if isinstance(mine, int | float) and isinstance(base, int | float) and base:
        return round(mine / base, 3)
    return None


def ratios(results: dict[str, Result]) -> dict[str, dict[str, float | None]]:
    """Return qgate / other for each metric, per other measured path (None when a value is missing or 0)."""
    if "qgate" not in results:
        return {}
    ours = results["qgate"]
    return {
        f"qgate/{other}": {m: _ratio(ours.get(m), results[other].get(m)) for m in METRICS}
        for other in PATHS
        if other != "qgate" and other in results
    }


def _fmt(value: Value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    return "-" if value is None else str(value)


def table(results: dict[str, Result], skipped: dict[str, str]) -> str:
    """Format the results, qgate's ratios and any skipped or failed path as a text table."""
    rows = [f"{'path':14} " + " ".join(f"{m:>17}" for m in METRICS)]
    for path, values in results.items():
        rows.append(f"{path:14} " + " ".join(f"{_fmt(values.get(m)):>17}" for m in METRICS))
    for name, row in ratios(results).items():
        rows.append(f"{name:14} " + " ".join(f"{_fmt(row.get(m)):>17}" for m in METRICS))
    for path, values in results.items():
        extras = {k: v for k, v in values.items() if k not in METRICS}
        rows.append(f"  {path}: " + ", ".join(f"{k}={v}" for k, v in extras.items()))
    rows += [f"  {path}: skipped: {why}" for path, why in skipped.items()]
    return "\n".join(rows)


def _paths(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PATHS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(PATHS)} (comma-separated), not {text!r}")
    return chosen


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="one JSON line last on stdout")
    parser.add_argument("--seconds", type=float, default=10.0, help="iperf3 TCP and UDP test length (s)")
    parser.add_argument("--pings", type=int, default=1000, help="pings per RTT test, 10 ms apart")
    parser.add_argument("--only", type=_paths, default=list(PATHS),
                        help="comma-separated paths to measure (veth,openvpn,qgate)")  # fmt: skip
    parser.add_argument("--log-level", default="WARNING")
    return parser


def run(paths: list[str], *, seconds: float, pings: int) -> tuple[dict[str, Result], dict[str, str]]:
    """Measure every path in ``paths`` (in the order given); return results and skipped paths.

    A path that fails gets ``{"error": ...}`` and the others still run; OpenVPN is installed
    when missing, and skipped (with the reason) when that fails.
    """
    results: dict[str, Result] = {}
    skipped: dict[str, str] = {}
    for path in paths:
        if path == "openvpn" and (why := openvpn_lab.ensure_openvpn()) is not None:
            skipped[path] = why
            sys.stderr.write(f"skipping openvpn: {why}\n")
            continue
        sys.stderr.write(f"measuring {path} ...\n")
        started = time.monotonic()
        try:
            results[path] = measure_path(path, seconds=seconds, pings=pings)
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            sys.stderr.write(f"{path} failed: {exc}\n")
            results[path] = {"error": str(exc)}
        except Exception as exc:  # a bench reports any failure and goes on
            sys.stderr.write(f"{path} failed: {type(exc).__name__}: {exc}\n")
            results[path] = {"error": f"{type(exc).__name__}: {exc}"}
        results[path]["duration_s"] = round(time.monotonic() - started, 1)
    return results, skipped


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when every selected path was measured, 2 otherwise, 130 on Ctrl-C."""
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper())
    if shutil.which("iperf3") is None:
        sys.stderr.write("iperf3 is not installed (apt-get install -y iperf3)\n")
        return 2
    try:
        results, skipped = run(args.only, seconds=args.seconds, pings=args.pings)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; torn down\n")
        return 130
    sys.stderr.write(table(results, skipped) + "\n")
    if args.json:
        out: dict[str, object] = {**results, "ratios": ratios(results)}
        if skipped:
            out["skipped"] = skipped
        print(json.dumps(out, separators=(",", ":")))
    return 2 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
