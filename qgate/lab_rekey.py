"""Rekey-under-load lab: TCP bulk + a numbered UDP stream through QKD ratchets every 0.1 s.

:func:`run_rekey_bench` builds the two-site lab (:class:`qgate.lab.Lab`) with KMEs far faster
than the rekeys need and policies that ratchet every ``interval`` seconds, measures the
tunnel's TCP capacity briefly (iperf3), then for ``seconds`` runs at the same time, host A to
host B: a TCP transfer of fresh random bytes paced at ``tcp_fraction`` of that capacity
(SHA-256 on both ends) and a UDP stream of ``udp_size``-byte datagrams at ``udp_pps``
(:mod:`qgate.lab_udp`: numbered, the receiver counts distinct ones). Gateway counters are
read from the stats files just before and after (deltas = the measured window), sampled
during it (a drop timeline), and the kernel counters of every namespace are compared
(:mod:`qgate.lab_kstats`), so a loss can be placed: which drop counter, which namespace,
and how far from which epoch transition (from the gateways' ``ratchet_complete`` /
``handshake_complete`` log lines).
"""

from __future__ import annotations

import itertools
import json
import re
import selectors
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from qgate import lab_kstats as kstats
from qgate import lab_net as net
from qgate.lab import TRAFFIC_PORT, Lab, fresh_stats, listens, read_json_line, read_stats
from qgate.lab_procs import Child, LabError, wait_until

IPERF_PORT: Final = 5201
UDP_PORT: Final = 5002
SAMPLE_PERIOD: Final = 0.5
"""Seconds between reads of the stats files during the window (they are rewritten every 1 s)."""
DRAIN: Final = 0.5
"""Seconds waited after the senders finish, for datagrams still in flight."""
DROP_KEYS: Final = {
    "auth_drops": "drops_auth",
    "replay_drops": "drops_replay",
    "key_expired_drops": "drops_key_expired",
    "unknown_index_drops": "drops_unknown_index",
    "no_session_drops": "drops_no_session",
    "key_exhausted_drops": "drops_key_exhausted",
    "malformed_drops": "drops_malformed",
}
"""Result key -> gateway stats key (per-peer data-plane drops, summed over both gateways)."""
LOSS_COUNTERS: Final = (
    *DROP_KEYS.values(), "drops_bad_inner_source", "drops_no_route", "drops_send_error", "rx_unknown_index",
    "rx_unknown_source", "rx_not_qgate", "tun_write_errors", "auth_failures", "handshake_failures",
    "malformed_messages", "qkd_failures", "qkd_refill_failures",
)  # fmt: skip
"""Gateway counters (top level of the stats file) that mean a drop or a failure."""
STRICT_ZERO: Final = ("auth_drops", "replay_drops", "key_expired_drops", "unknown_index_drops")
LOSS_DETAIL_MAX: Final = 20
_EVENT = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) \S+: (\w+)(?:.*? epoch=(\d+))?")


@dataclass
class RekeyOptions:
    """Options of one rekey bench run (times in seconds, rates per second, sizes in bytes).

    Attributes:
        seconds: length of the measured traffic window.
        interval: QKD ratchet period forced into both policies (``rekey.interval``).
        kem_interval: full ML-KEM handshake period (``rekey.kem_interval``).
        max_key_age: hard traffic-key lifetime (``rekey.max_key_age``).
        kme_rate: simulated QKD key rate of each KME, bits per second.
        probe_seconds: iperf3 capacity probe length.
        tcp_fraction: pace the TCP transfer at this fraction of the probed capacity.
        udp_pps: UDP datagrams per second; udp_size: UDP payload bytes.
    """

    seconds: float = 60.0
    interval: float = 0.1
    kem_interval: float = 5.0
    max_key_age: float = 1.0
    kme_rate: int = 1_000_000
    probe_seconds: float = 3.0
    tcp_fraction: float = 0.5
    udp_pps: float = 2000.0
    udp_size: int = 1000


@dataclass
class Traffic:
    """What the traffic tools reported (their JSON result lines) and the probed capacity.

    Attributes:
        capacity_bps: iperf3 TCP capacity of the tunnel, bits per second.
        tcp_rate: pacing of the TCP transfer, bytes per second.
    """

    capacity_bps: float
    tcp_rate: float
    tcp_sent: dict[str, object]
    tcp_got: dict[str, object]
    udp_sent: dict[str, object]
    udp_got: dict[str, object]


@dataclass
class Samples:
    """Gateway counters read during the window: ``(seconds since start, {site: stats})``."""

    start: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, dict[str, dict[str, object]]]] = field(default_factory=list)

    def take(self, run_dir: Path) -> None:
        """Read both stats files now (no waiting)."""
        now = round(time.monotonic() - self.start, 2)
        self.rows.append((now, {s: read_stats(run_dir / f"stats-{s}.json") for s in ("a", "b")}))


def run_rekey_bench(opts: RekeyOptions) -> dict[str, object]:
    """Run the rekey bench in a fresh lab; return the result mapping (see :func:`summarise`).

    Raises:
        LabError, DataPlaneError, QgateError: the lab could not run (failed checks show as
            ``ok: false`` in the result instead).
    """
    started = time.monotonic()
    with Lab() as lab:
        result = _run_inside(lab, opts)  # an exception marks the run failed in Lab.__exit__
        if not result["ok"]:
            lab.mark_failed()
    result["duration_s"] = round(time.monotonic() - started, 1)
    return result


def _run_inside(lab: Lab, opts: RekeyOptions) -> dict[str, object]:
    rekey = {"interval": opts.interval, "kem_interval": opts.kem_interval, "max_key_age": opts.max_key_age}
    gateways = lab.start_qgate(rekey=rekey, kme_rate=opts.kme_rate)
    lab.wait_path(gateways)
    capacity = measure_capacity(lab, opts.probe_seconds)
    sys.stderr.write(f"tunnel TCP capacity {capacity / 1e6:.1f} Mbit/s (iperf3, {opts.probe_seconds:g} s)\n")
    tcp_rate = capacity * opts.tcp_fraction / 8  # bytes/s
    tcp_recv, udp_recv = start_receivers(lab, opts)
    namespaces = {role: lab.topo.ns(role) for role in net.ROLES}
    k_before = kstats.snapshot(namespaces)
    before = {s: fresh_stats(lab.run_dir / f"stats-{s}.json") for s in ("a", "b")}
    cpu0, gw_cpu0 = kstats.host_cpu(), {c.name[-1]: kstats.process_cpu(c.proc.pid) for c in gateways}
    samples = Samples()
    senders = start_senders(lab, opts, tcp_rate)
    sent = await_senders(lab, senders, gateways, timeout=opts.seconds * 3 + 30,
                         sample=lambda: samples.take(lab.run_dir))  # fmt: skip
    time.sleep(DRAIN)
    udp_recv.proc.send_signal(15)  # SIGTERM: the receiver reports what it counted
    udp_got = _checked(read_json_line(udp_recv, timeout=10), udp_recv)
    tcp_got = _checked(read_json_line(tcp_recv, timeout=30), tcp_recv)
    after = {s: fresh_stats(lab.run_dir / f"stats-{s}.json") for s in ("a", "b")}
    window = round(time.monotonic() - samples.start, 2)
    k_after = kstats.snapshot(namespaces)
    cpu = {c.name[-1]: round(100 * (kstats.process_cpu(c.proc.pid) - gw_cpu0[c.name[-1]]) / window, 1)
           for c in gateways}  # fmt: skip
    cpu["host"] = kstats.busy_pct(cpu0, kstats.host_cpu()) or 0.0
    for child in gateways:
        lab.kids.check_alive(child)
    traffic = Traffic(capacity, tcp_rate, sent["tcp"], tcp_got, sent["udp"], udp_got)
    events = {s: parse_events(lab.run_dir / "logs" / f"gateway-{s}.log") for s in ("a", "b")}
    result = summarise(opts, traffic, before, after, samples, kstats.drop_deltas(k_before, k_after), events,
                       window=window)  # fmt: skip
    return {"run_id": lab.topo.run_id, **result, "cpu_pct": cpu}


def measure_capacity(lab: Lab, seconds: float) -> float:
    """Run one iperf3 TCP flow host A -> host B for ``seconds``; return receiver bits per second.

    Raises:
        LabError: iperf3 failed or printed no result.
    """
    server = lab.start("iperf3-server", "hb", ["iperf3", "-s", "-1", "-B", net.HOST_B, "-p", str(IPERF_PORT)])

    def listening() -> bool:
        lab.kids.check_alive(server)
        return listens(lab.topo.ns("hb"), IPERF_PORT)

    wait_until("iperf3 server", listening, timeout=10)
    proc = lab.run("ha", ["iperf3", "-c", net.HOST_B, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"],
                   timeout=seconds + 30)  # fmt: skip
    lab.kids.stop(server)
    try:
        return float(json.loads(proc.stdout)["end"]["sum_received"]["bits_per_second"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"iperf3 client failed: {proc.stdout[-500:]} {proc.stderr[-500:]}") from exc


def _tool(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"qgate.{module}", *args]


def start_receivers(lab: Lab, opts: RekeyOptions) -> tuple[Child, Child]:
    """Start the TCP and UDP receivers in host B; return them once both said they are ready."""
    tcp_argv = _tool("lab_traffic", "recv", "--listen", f"{net.HOST_B}:{TRAFFIC_PORT}")
    udp_argv = _tool("lab_udp", "recv", "--listen", f"{net.HOST_B}:{UDP_PORT}", "--size", str(opts.udp_size))
    tcp = lab.start("tcp-receiver", "hb", tcp_argv, pipe_stdout=True)
    udp = lab.start("udp-receiver", "hb", udp_argv, pipe_stdout=True)
    for child in (tcp, udp):
        _checked(read_json_line(child, timeout=10), child)
    return tcp, udp


def start_senders(lab: Lab, opts: RekeyOptions, tcp_rate: float) -> dict[str, Child]:
    """Start the paced TCP sender and the UDP stream in host A; return ``{"tcp": .., "udp": ..}``."""
    secs = f"{opts.seconds:g}"
    udp_argv = _tool("lab_udp", "send", "--to", f"{net.HOST_B}:{UDP_PORT}", "--pps", f"{opts.udp_pps:g}",
                     "--size", str(opts.udp_size), "--seconds", secs)  # fmt: skip
    tcp_argv = _tool("lab_traffic", "send", "--to", f"{net.HOST_B}:{TRAFFIC_PORT}",
                     "--rate", f"{tcp_rate:.0f}", "--seconds", secs)  # fmt: skip
    return {
        "udp": lab.start("udp-sender", "ha", udp_argv, pipe_stdout=True),
        "tcp": lab.start("tcp-sender", "ha", tcp_argv, pipe_stdout=True),
    }


def await_senders(
    lab: Lab, senders: dict[str, Child], watch: list[Child], *, timeout: float, sample: Callable[[], None]
) -> dict[str, dict[str, object]]:
    """Wait for every sender's JSON result line, calling ``sample()`` every :data:`SAMPLE_PERIOD` s.

    Raises:
        LabError: timeout, a sender reported an error, or a watched child (gateway) exited.
    """
    results: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for name, child in senders.items():
            assert child.proc.stdout is not None
            sel.register(child.proc.stdout, selectors.EVENT_READ, name)
        while len(results) < len(senders):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabError(
                    f"senders {sorted(set(senders) - set(results))} not done within {timeout:.0f} s"
                )
            for key, _ in sel.select(min(SAMPLE_PERIOD, remaining)):
                name = str(key.data)
                sel.unregister(key.fileobj)
                results[name] = _checked(read_json_line(senders[name], timeout=5), senders[name])
            sample()
            for child in watch:
                lab.kids.check_alive(child)
    return results


def _checked(obj: dict[str, object], child: Child) -> dict[str, object]:
    if "error" in obj:
        raise LabError(f"{child.name} failed: {obj['error']}")
    return obj


def parse_events(log_path: Path) -> list[tuple[float, str, str, int | None]]:
    """Return a gateway log's protocol events as ``(wall time s, level, kind, epoch or None)``.

    Only ``*_complete`` events and WARNING/ERROR lines are kept; timestamps are the logging
    module's local ``asctime`` (millisecond resolution).
    """
    events: list[tuple[float, str, str, int | None]] = []
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        match = _EVENT.match(line)
        if match is None:
            continue
        stamp, level, kind, epoch = match.groups()
        if not kind.endswith("_complete") and level not in ("WARNING", "ERROR"):
            continue
        wall = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        events.append((wall, level, kind, int(epoch) if epoch else None))
    return events


def _int(stats: dict[str, object], key: str) -> int:
    value = stats.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _master(stats: dict[str, object], key: str) -> int:
    master = stats.get("master")
    return _int(master, key) if isinstance(master, dict) else 0


def counter_deltas(before: dict[str, object], after: dict[str, object]) -> dict[str, int]:
    """Return the :data:`LOSS_COUNTERS` that grew between two stats snapshots of one gateway."""
    return {k: _int(after, k) - _int(before, k) for k in LOSS_COUNTERS if _int(after, k) > _int(before, k)}


def drop_timeline(samples: Samples, before: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    """Return every increase of a loss counter seen while sampling: ``{t_s, gateway, counter, delta}``."""
    out: list[dict[str, object]] = []
    last = dict(before)
    for t, row in samples.rows:
        for site, stats in row.items():
            if not stats:
                continue
            for name, delta in counter_deltas(last.get(site, {}), stats).items():
                out.append({"t_s": t, "gateway": site, "counter": name, "delta": delta})
            last[site] = stats
    return out


def locate_losses(
    missing: list[list[int]],
    udp_sent: dict[str, object],
    events: dict[str, list[tuple[float, str, str, int | None]]],
) -> list[dict[str, object]]:
    """Place each missing UDP range in time and next to the nearest epoch transitions.

    A datagram's send time is estimated as ``start + seq / pps`` (the sender paces by the
    clock). For each gateway, the last transition at or before that time and the first after
    it are given with their epoch number and distance in milliseconds.
    """
    start = _int(udp_sent, "start_wall_ns") / 1e9
    pps = float(str(udp_sent.get("pps", 1.0)))
    out: list[dict[str, object]] = []
    for first, last in missing[:LOSS_DETAIL_MAX]:
        sent_at = start + first / pps
        row: dict[str, object] = {
            "seqs": [first, last],
            "count": last - first + 1,
            "t_s": round(sent_at - start, 3),
        }
        for site, evs in events.items():
            switches = [(t, kind, epoch) for t, _level, kind, epoch in evs if kind.endswith("_complete")]
            prev = [s for s in switches if s[0] <= sent_at]
            nxt = [s for s in switches if s[0] > sent_at]
            if prev:
                row[f"{site}_prev"] = {
                    "epoch": prev[-1][2],
                    "kind": prev[-1][1],
                    "ms_before": round((sent_at - prev[-1][0]) * 1000),
                }
            if nxt:
                row[f"{site}_next"] = {
                    "epoch": nxt[0][2],
                    "kind": nxt[0][1],
                    "ms_after": round((nxt[0][0] - sent_at) * 1000),
                }
        out.append(row)
    return out


def warnings_in_window(
    events: dict[str, list[tuple[float, str, str, int | None]]], start: float, end: float
) -> dict[str, dict[str, int]]:
    """Count each gateway's WARNING/ERROR log events between wall times ``start`` and ``end``."""
    out: dict[str, dict[str, int]] = {}
    for site, evs in events.items():
        counts: dict[str, int] = {}
        for t, level, kind, _ in evs:
            if level in ("WARNING", "ERROR") and start <= t <= end:
                counts[kind] = counts.get(kind, 0) + 1
        if counts:
            out[site] = counts
    return out


def max_gaps(
    events: dict[str, list[tuple[float, str, str, int | None]]], start: float, end: float
) -> dict[str, int]:
    """Return, per gateway, the longest time in ms between epoch transitions inside the window.

    With a ratchet due every ``interval`` s, a gap far above it means the gateway's event
    loop (or the KME path) stalled.
    """
    out: dict[str, int] = {}
    for site, evs in events.items():
        times = [t for t, _, kind, _ in evs if kind.endswith("_complete") and start <= t <= end]
        if len(times) > 1:
            out[site] = round(max(b - a for a, b in itertools.pairwise(times)) * 1000)
    return out


def summarise(
    opts: RekeyOptions,
    traffic: Traffic,
    before: dict[str, dict[str, object]],
    after: dict[str, dict[str, object]],
    samples: Samples,
    kernel: dict[str, dict[str, int]],
    events: dict[str, list[tuple[float, str, str, int | None]]],
    *,
    window: float,
) -> dict[str, object]:
    """Build the JSON-ready result and its checks (keys listed in ``bench/rekey.py``)."""
    udp_sent, udp_got, tcp_sent, tcp_got = (
        traffic.udp_sent,
        traffic.udp_got,
        traffic.tcp_sent,
        traffic.tcp_got,
    )
    a0, a1 = before["a"], after["a"]
    sent_n, got_n = _int(udp_sent, "sent"), _int(udp_got, "received")
    missing = udp_got.get("missing")
    missing_list = [list(map(int, r)) for r in missing] if isinstance(missing, list) else []
    start = _int(udp_sent, "start_wall_ns") / 1e9
    result: dict[str, object] = {
        "seconds": opts.seconds,
        "window_s": window,
        "interval_s": opts.interval,
        "kem_interval_s": opts.kem_interval,
        "max_key_age_s": opts.max_key_age,
        "kme_rate_bps": opts.kme_rate,
        "rekeys": _master(a1, "rekeys_qkd") - _master(a0, "rekeys_qkd"),
        "rekeys_kem": _master(a1, "rekeys_kem") - _master(a0, "rekeys_kem"),
        "rekeys_slave": _int(after["b"], "rekeys_qkd") - _int(before["b"], "rekeys_qkd"),
        "epoch_start": _epoch(a0),
        "epoch_end": _epoch(a1),
        "udp_sent": sent_n,
        "udp_received": got_n,
        "udp_lost": sent_n - got_n,
        "udp_duplicates": udp_got.get("duplicates"),
        "udp_reordered": udp_got.get("reordered"),
        "udp_send_errors": udp_sent.get("send_errors"),
        "udp_seconds": udp_sent.get("seconds"),
        "tcp_capacity_mbps": round(traffic.capacity_bps / 1e6, 1),
        "tcp_rate_mbps": round(traffic.tcp_rate * 8 / 1e6, 1),
        "tcp_bytes": tcp_sent.get("bytes"),
        "tcp_bytes_received": tcp_got.get("bytes"),
        "tcp_seconds": tcp_sent.get("seconds"),
        "tcp_goodput_mbps": _mbps(tcp_got.get("bytes"), tcp_sent.get("seconds")),
        "tcp_sha256_match": tcp_sent.get("sha256") is not None
        and tcp_sent.get("sha256") == tcp_got.get("sha256"),
        **{
            key: sum(_int(after[s], name) - _int(before[s], name) for s in ("a", "b"))
            for key, name in DROP_KEYS.items()
        },
        "gateway_drops": {s: counter_deltas(before[s], after[s]) for s in ("a", "b")},
        "gateway_warnings": warnings_in_window(events, start, start + window),
        "transition_max_gap_ms": max_gaps(events, start, start + window),
        "udp_start": datetime.fromtimestamp(start).isoformat(timespec="milliseconds"),
        "drop_timeline": drop_timeline(samples, before)[: LOSS_DETAIL_MAX * 5],
        "kernel_drops": kernel,
        "udp_missing": missing_list[:LOSS_DETAIL_MAX],
        "udp_loss_location": locate_losses(missing_list, udp_sent, events),
    }
    result["checks"] = _checks(result, opts)
    result["ok"] = all(_obj(result["checks"]).values())
    return result


def _obj(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _epoch(stats: dict[str, object]) -> object:
    peers = _obj(stats.get("peers"))
    return next((_obj(row).get("epoch") for row in peers.values()), None)


def _mbps(nbytes: object, seconds: object) -> float | None:
    if not isinstance(nbytes, int) or not isinstance(seconds, int | float) or seconds <= 0:
        return None
    return round(nbytes * 8 / seconds / 1e6, 1)


def _checks(r: dict[str, object], opts: RekeyOptions) -> dict[str, bool]:
    expected = opts.seconds / opts.interval
    return {
        "rekeys_at_least_half_nominal": _int(r, "rekeys") >= expected / 2,
        "udp_no_loss": r["udp_lost"] == 0 and _int(r, "udp_sent") > 0,
        "tcp_sha256_match": r["tcp_sha256_match"] is True,
        "tcp_complete": r["tcp_bytes_received"] == r["tcp_bytes"],
        **{f"no_{key}": r[key] == 0 for key in STRICT_ZERO},
    }
