"""Where a gateway's CPU time goes during one bulk TCP flow: py-spy samples of both gateways (needs root).

Builds the lab (:class:`qgate.lab.Lab`), starts both gateways, runs one iperf3 TCP flow host A ->
host B for ``--seconds`` while ``py-spy record`` samples each gateway process (100 Hz, native
frames off, GIL-holding and idle samples both kept), then prints, per gateway, the share of
samples whose innermost qgate/stdlib frame is each function (self time) and the share under each
qgate function anywhere on the stack (inclusive time). Gateway A seals (TUN -> UDP), gateway B
opens (UDP -> TUN). ``--json`` prints one JSON line last on stdout:
``{"tcp_gbps": ..., "a": {"self": {...}, "inclusive": {...}, "samples": n}, "b": {...}}``.

Usage: ``.venv/bin/python bench/profile_path.py [--seconds 10] [--top 25] [--json]``
(py-spy is installed into the venv from PyPI when missing.)
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import throughput

from qgate.lab import Lab

RATE_HZ: Final = 100
"""py-spy samples per second per process."""


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return found


def summarise(raw: str, top: int) -> dict[str, object]:
    """Turn py-spy's collapsed stacks (``frame;frame;... count``) into self and inclusive shares (%)."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        self_time[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    share = lambda c: {k: round(100 * v / total, 1) for k, v in c.most_common(top)}  # noqa: E731
    return {"samples": total, "self": share(self_time), "inclusive": share(inclusive)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--traffic", choices=("tcp", "udp64"), default="tcp",
                        help="one TCP flow, or 64-byte UDP datagrams as fast as iperf3 sends")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    spy = _py_spy()
    out: dict[str, object] = {}
    with Lab(tunnel=True) as lab:
        watch = lab.start_qgate()
        lab.wait_path(watch)
        server = throughput.start_iperf_server(lab)
        del server
        recorders = []
        for child, site in zip(watch, ("b", "a"), strict=True):
            path = lab.run_dir / f"profile-{site}.txt"
            argv_spy = [spy, "record", "-r", str(RATE_HZ), "-d", str(int(opts.seconds)),
                        "-f", "raw", "-o", str(path), "-p", str(child.proc.pid)]
            recorders.append((site, path, subprocess.Popen(argv_spy, stdout=subprocess.DEVNULL,
                                                           stderr=subprocess.DEVNULL)))
        time.sleep(0.5)
        if opts.traffic == "tcp":
            out.update(throughput.measure_tcp(lab, opts.seconds))
        else:
            out.update(throughput.measure_udp(lab, opts.seconds))
        for site, path, proc in recorders:
            proc.wait(timeout=opts.seconds + 30)
            out[site] = summarise(path.read_text() if path.exists() else "", opts.top)
    for site in ("a", "b"):
        report = out[site]
        assert isinstance(report, dict)
        print(f"gateway {site.upper()} ({report['samples']} samples), self % / inclusive %:", file=sys.stderr)
        for name, pct in report["self"].items():
            print(f"  self {pct:5.1f}  {name}", file=sys.stderr)
        for name, pct in report["inclusive"].items():
            print(f"  incl {pct:5.1f}  {name}", file=sys.stderr)
    print(f"tcp_gbps {out.get('tcp_gbps')} udp64_kpps {out.get('udp64_kpps')}", file=sys.stderr)
    if opts.json:
        print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
