"""Floods from an off-path spoofer: do they cost QKD keys, CPU, audit log or latency? (needs root).

In the namespace lab (site A = QKD master, site B = slave; ``qgate.lab``), an attacker namespace
``qg<run>sp`` gets a tap (veth) into each gateway's WAN side and sends UDP datagrams whose source
address and port are the *peer gateway's* (AF_PACKET, pre-built frames, sendmmsg(2)); every answer
goes to the real peer, the attacker receives nothing. The WAN is captured while the tunnel comes
up, for the replay kinds. After an idle ping baseline (``--idle-seconds``), each kind runs for
``--seconds`` while host A pings host B every 10 ms (``ping -i 0.01``; the baseline measures the
period ping really keeps, e.g. 16 ms with CONFIG_HZ=250, and each window sends ``--seconds`` worth
of echoes at that period; the flood runs exactly as long as the window's pings, and a window ends
after 1.25 x ``--seconds`` + 2 s even when a starved ping sent fewer echoes). Before each kind
the bench waits until the tunnel answers ping again (at most 30 s) and ``--settle`` s more.

Kinds (``--kinds``, comma-separated; ``none`` always runs, first; rates are datagrams/s):

  none                no flood: the baseline for QKD keys used
  data_unknown_index  32-byte data datagrams (type 0x04, random receiver_index and counter,
                      16 random tag bytes) to the slave, from the master's address
  garbage             random bytes, 1-1400 of them, to both gateways, each from its peer
  kick_forged         Kicks from a slave-role protocol engine with a freshly generated identity
                      (wrong signature), to the master, from the slave's address
  m1_forged           M1s from master-role engines with a fresh identity and random QKD keys
                      (random key_IDs), to the slave, from the master's address
  m1_replay           real M1 fragments captured at lab start, replayed to the slave
  kick_replay         real Kick fragments captured at lab start, replayed to the master
  fragment_junk       handshake-fragment headers that pass the framing checks (type 0x01,
                      msg_type 1-7, index < count <= 16, random message_id), random payload,
                      to both gateways

Forged messages come from the real engine (``qgate.protocol.peer.Peer``, configured from the
lab policy), so they follow whatever wire format the code has: they pass mac1 (the attacker knows
both public keys) but, off the path, echo no challenge and carry no valid mac2.

Per kind (JSON key ``kinds.<kind>``): ``sent``, ``rate_pps`` (achieved), ``pool`` (distinct
datagrams cycled), ``window_s``, ``ping_sent``, ``ping_received``, ``ping_loss_pct``,
``rtt_p50_ms``, ``rtt_p99_ms``, ``rtt_max_ms``, ``qkd_keys_master`` (distinct key_IDs in the
master's audit records of the window), ``qkd_keys_slave`` (key_IDs the slave fetched with
dec_keys in the window, from its KME's log), ``qkd_keys_master_taken`` (keys the master took from
its stock or KME, from its stats, over a window a second or two longer), per gateway ``a``/``b``:
``cpu_s`` (utime + stime of the gateway process), ``audit_bytes``, ``audit_records``,
``audit_events``, ``mode_changes``, ``degraded`` (mode changes to degraded/closed), ``counters``
(auth_failures, malformed_messages, drops_* (mac1, mac2, budget, ...), rx_*, retries_sent, ...
deltas), ``counters_other`` (further drop/defence counters that moved), ``kernel`` (UDP
datagrams in, socket-buffer drops, tap drops), and ``recovered`` (the tunnel answered before the
window), ``skipped`` (why nothing was sent, e.g. no Kick captured). ``idle``: the baseline ping fields.

Checks per kind (``checks.<kind>``; issue 10): ``keys_master`` and ``keys_slave``: QKD keys used
equal the ``none`` window's (scaled to the window length) within 1; ``ping_no_loss``;
``rtt_p99_within_2x_idle``: p99 <= 2 x the idle p99, the idle p99 taken as at least 1 ms (so
noise on sub-millisecond RTTs cannot fail it); ``audit_under_100kb_per_60s``: each gateway's
audit growth scaled to 60 s below 100,000 bytes; ``ran``.

Output: a table on stderr; with ``--json`` one JSON line last on stdout:
``{"run_id", "seconds", "rate", "idle": {...}, "kinds": {kind: {...}}, "checks": {kind: {...}},
"ok": bool, "replay_captured_messages", "spoofer", "duration_s"}``. Every namespace (the
attacker's included) and process is removed on every path, Ctrl-C and SIGTERM included.

Usage: ``.venv/bin/python bench/flood.py [--json] [--seconds 20] [--rate 1000|max]
[--kinds none,garbage,...]``
Exit status: 0 every check passed, 1 a check failed, 2 the lab could not run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

from qgate.lab_flood import KINDS, FloodOptions, run_flood_bench

COLUMNS = (
    ("kind", 18), ("sent", 8), ("pps", 8), ("loss%", 6), ("p50ms", 6), ("p99ms", 7), ("keysM", 5),
    ("keysS", 5), ("cpuA", 5), ("cpuB", 5), ("auditA", 7), ("auditB", 7), ("macA", 7), ("macB", 7),
    ("kdropA", 8), ("kdropB", 8), ("rtyA", 5), ("rtyB", 5), ("malfA", 6),
    ("malfB", 6), ("hsM", 4), ("modes", 5), ("checks", 0),
)  # fmt: skip


def _site(row: dict[str, object], key: str, site: str, sub: str | None = None) -> object:
    """Return ``row[key][site]`` (or ``row[key][site][sub]``), None when absent."""
    value = row.get(key)
    value = value.get(site) if isinstance(value, dict) else None
    if sub is not None:
        value = value.get(sub) if isinstance(value, dict) else None
    return value


def _macs(row: dict[str, object], site: str) -> object:
    """drops_mac1 + drops_mac2 of one gateway in the window (None when unknown)."""
    values = [_site(row, "counters", site, k) for k in ("drops_mac1", "drops_mac2")]
    return sum(v for v in values if isinstance(v, int)) if any(isinstance(v, int) for v in values) else None


def _row(kind: str, row: dict[str, object], checks: dict[str, bool]) -> list[object]:
    failed = [name for name, ok in checks.items() if not ok]
    modes = row.get("mode_changes")
    return [
        kind, row.get("sent"), row.get("rate_pps"), row.get("ping_loss_pct"), row.get("rtt_p50_ms"),
        row.get("rtt_p99_ms"), row.get("qkd_keys_master"), row.get("qkd_keys_slave"),
        _site(row, "cpu_s", "a"), _site(row, "cpu_s", "b"),
        _site(row, "audit_bytes", "a"), _site(row, "audit_bytes", "b"),
        _macs(row, "a"), _macs(row, "b"),
        _site(row, "kernel", "a", "udp_rcvbuf_errors"), _site(row, "kernel", "b", "udp_rcvbuf_errors"),
        _site(row, "counters", "a", "retries_sent"), _site(row, "counters", "b", "retries_sent"),
        _site(row, "counters", "a", "malformed_messages"), _site(row, "counters", "b", "malformed_messages"),
        _site(row, "counters", "a", "handshakes"),
        sum(modes.values()) if isinstance(modes, dict) else None,
        "pass" if not failed else "FAIL " + ",".join(failed),
    ]  # fmt: skip


def _cells(cells: list[object]) -> str:
    return " ".join(
        f"{'-' if c is None else c!s:>{width}}" if width else str(c)
        for c, (_, width) in zip(cells, COLUMNS, strict=True)
    )


def table(result: dict[str, object]) -> str:
    """Return the human summary: idle baseline, one row per kind, verdict (for stderr)."""
    idle = result.get("idle")
    idle = idle if isinstance(idle, dict) else {}
    kinds = result.get("kinds")
    checks = result.get("checks")
    lines = [
        f"flood bench {result.get('run_id')}: {result.get('seconds')} s per kind at {result.get('rate')}/s: "
        f"{'OK' if result.get('ok') else 'FAILED'}",
        f"  idle: ping loss {idle.get('ping_loss_pct')} %, p50 {idle.get('rtt_p50_ms')} ms, "
        f"p99 {idle.get('rtt_p99_ms')} ms",
        "  " + _cells([name for name, _ in COLUMNS]),
    ]
    for kind, row in kinds.items() if isinstance(kinds, dict) else ():
        kind_checks = checks.get(kind, {}) if isinstance(checks, dict) else {}
        lines.append("  " + _cells(_row(kind, row, kind_checks)))
    lines.append(
        "  keysM/keysS: QKD keys used by master/slave; cpuA/B: gateway CPU s; auditA/B: audit bytes written;"
    )
    lines.append(
        "  macA/B: fragments dropped at mac1/mac2 (user space); kdropA/B: datagrams the kernel dropped"
        " (socket buffer full: the paced control socket); rtyA/B: Retries sent; malfA/B: malformed_messages;"
        " hsM: full handshakes the master made;"
        " modes: mode changes, both gateways"
    )
    return "\n".join(lines)


def _rate(text: str) -> float | None:
    if text == "max":
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("rate must be > 0 or 'max'")
    return value


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    return kinds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/flood.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kinds", type=_kinds, default=KINDS, help="flood kinds, comma-separated (default: all)"
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="window per kind, s (default 20; acceptance 60)"
    )
    parser.add_argument(
        "--rate",
        type=_rate,
        default=1000.0,
        help="attacker datagrams/s, both targets together, or 'max' (default 1000)",
    )
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="idle ping baseline, s (default 5)")
    parser.add_argument("--settle", type=float, default=3.0, help="pause before each window, s (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON line last on stdout")
    parser.add_argument("--log-level", default="WARNING", help="logging level on stderr (default WARNING)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit status as in the module docstring."""
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper())
    missing = [tool for tool in ("ip", "ping", "tcpdump") if shutil.which(tool) is None]
    problem = "the lab needs root (namespaces, veth, TUN, AF_PACKET)" if os.geteuid() != 0 else None
    if problem is None and missing:
        problem = f"missing tools: {', '.join(missing)} (apt-get install -y iproute2 iputils-ping tcpdump)"
    if problem:
        sys.stderr.write(problem + "\n")
        if args.json:
            print(json.dumps({"ok": False, "error": problem}))
        return 2
    opts = FloodOptions(
        kinds=args.kinds,
        seconds=args.seconds,
        rate=args.rate,
        idle_seconds=args.idle_seconds,
        settle_seconds=args.settle,
    )
    try:
        result = run_flood_bench(opts)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; torn down\n")
        if args.json:
            print(json.dumps({"ok": False, "error": "interrupted"}))
        return 130
    except Exception as exc:  # report; the lab tore itself down
        sys.stderr.write(f"flood bench failed: {exc}\n")
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    if args.json:  # first: a table that cannot be drawn must not cost the result
        print(json.dumps(result, separators=(",", ":"), default=str), flush=True)
    sys.stderr.write(table(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
