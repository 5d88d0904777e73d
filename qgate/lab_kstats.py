"""Kernel packet counters of the lab namespaces, to tell where a lost packet went.

A snapshot holds, per namespace, the IPv4/UDP/TCP counters of ``/proc/net/snmp`` (the file
shows the counters of the reader's network namespace) and every link's ``ip -s -j link``
drop and error counters. :func:`drop_deltas` keeps only the counters that name a drop or an
error and that moved between two snapshots, e.g. ``{"gb": {"Udp.RcvbufErrors": 12}}``: a
gateway's WAN socket overflowed, or ``{"ga": {"qgtun0.tx_dropped": 3}}``: the kernel's queue
towards gateway A's TUN reader was full.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from qgate.lab_net import ns_argv

Counters = dict[str, int]
Snapshot = dict[str, Counters]
"""Namespace role -> counter name -> value."""

SNMP_PROTOCOLS: Final = ("Ip", "Tcp", "Udp")
DROP_WORDS: Final = ("Errors", "Errs", "Discards", "NoPorts", "NoRoutes", "Fails", "dropped", "errors",
                     "RetransSegs")  # fmt: skip
"""Counter-name fragments that mark a loss or an error (TCP retransmissions are a loss symptom)."""
LINK_FIELDS: Final = ("dropped", "errors", "over_errors", "carrier_errors")
CMD_TIMEOUT: Final = 10.0


def parse_snmp(text: str, protocols: Sequence[str] = SNMP_PROTOCOLS) -> Counters:
    """Parse ``/proc/net/snmp`` (header line, value line per protocol) into ``{"Udp.RcvbufErrors": n}``."""
    out: Counters = {}
    lines = text.splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        names, numbers = head.split(), values.split()
        if not names or names[0] != numbers[0] or names[0].rstrip(":") not in protocols:
            continue
        proto = names[0].rstrip(":")
        for name, number in zip(names[1:], numbers[1:], strict=False):
            if number.lstrip("-").isdigit():
                out[f"{proto}.{name}"] = int(number)
    return out


def parse_links(text: str) -> Counters:
    """Parse ``ip -s -j link`` output into ``{"<ifname>.rx_dropped": n, "<ifname>.tx_errors": n, ...}``."""
    out: Counters = {}
    try:
        links = json.loads(text)
    except ValueError:
        return out
    for link in links if isinstance(links, list) else []:
        name, stats = link.get("ifname"), link.get("stats64", {})
        for direction in ("rx", "tx"):
            for key in LINK_FIELDS:
                value = stats.get(direction, {}).get(key)
                if isinstance(value, int):
                    out[f"{name}.{direction}_{key}"] = value
    return out


def _read(ns: str, argv: list[str]) -> str:
    proc = subprocess.run(ns_argv(ns, argv), capture_output=True, text=True, timeout=CMD_TIMEOUT,
                          check=False, stdin=subprocess.DEVNULL)  # fmt: skip
    return proc.stdout if proc.returncode == 0 else ""


def snapshot(namespaces: Mapping[str, str]) -> Snapshot:
    """Read the counters of every namespace in ``namespaces`` (role -> namespace name)."""
    return {
        role: {
            **parse_snmp(_read(ns, ["cat", "/proc/net/snmp"])),
            **parse_links(_read(ns, ["ip", "-s", "-j", "link"])),
        }
        for role, ns in namespaces.items()
    }


def drop_deltas(before: Snapshot, after: Snapshot) -> dict[str, Counters]:
    """Return, per role, the drop/error counters that grew from ``before`` to ``after`` (only those)."""
    out: dict[str, Counters] = {}
    for role, counters in after.items():
        moved = {
            name: value - before.get(role, {}).get(name, 0)
            for name, value in counters.items()
            if any(word in name for word in DROP_WORDS) and value > before.get(role, {}).get(name, 0)
        }
        if moved:
            out[role] = moved
    return out


def host_cpu() -> tuple[int, int]:
    """Return the host's ``(busy, total)`` CPU time in clock ticks, all CPUs (``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_cpu(pid: int) -> float:
    """Return the CPU seconds (user + system) process ``pid`` has used, 0.0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Return the host CPU busy share in percent of all CPUs between two :func:`host_cpu` readings."""
    total = after[1] - before[1]
    return round(100.0 * (after[0] - before[0]) / total, 1) if total > 0 else None
