"""``qgate lab quirks``: one namespace lab per KME quirk, all at once (issue 11's acceptance runs).

Each lab is a ``qgate lab run --kme-quirk NAME`` child (its own namespaces, KMEs, gateways and
run directory, so they do not meet): a paced TCP transfer over ``seconds`` with a ping every
0.2 s and rekeys every 1 s. The result per quirk is the child's JSON result; the summary table
gives ping loss, sha256, rekeys per configured interval and what ``qgate status`` said about the
KME (its behaviour notes, supply mode and TLS suite).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from qgate.kms.quirks import QUIRK_NAMES

TRANSFER_MB: Final = 4.0
"""MB (10^6 bytes) each lab sends, paced over its seconds (light: 13 labs share the CPUs)."""
EXTRA_TIMEOUT: Final = 360.0
"""Seconds all runs may take beyond their traffic (start-up of every lab on a busy machine)."""


def run_quirk_labs(
    quirks: Sequence[str] = QUIRK_NAMES, *, seconds: float = 60.0
) -> dict[str, dict[str, object]]:
    """Run one lab per quirk concurrently; return each lab's JSON result by quirk.

    A lab that could not run or gave no JSON result maps to ``{"ok": False, "error": ...}``;
    every result carries ``stderr_tail`` (the last 3000 characters of the child's stderr).
    """
    procs: dict[str, subprocess.Popen[str]] = {}
    for quirk in quirks:
        argv = [sys.executable, "-m", "qgate", "lab", "run", "--kme-quirk", quirk, "--seconds", str(seconds),
                "--pings", str(int(seconds * 5)), "--transfer-mb", str(TRANSFER_MB), "--json"]  # fmt: skip
        procs[quirk] = subprocess.Popen(
            argv, cwd=Path.cwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    deadline = time.monotonic() + seconds + EXTRA_TIMEOUT
    results: dict[str, dict[str, object]] = {}
    try:
        for quirk, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()  # SIGTERM: the lab tears itself down
                out, err = proc.communicate(timeout=60)
            try:
                parsed = json.loads(out.strip().splitlines()[-1])
                results[quirk] = (
                    parsed if isinstance(parsed, dict) else {"ok": False, "error": "not an object"}
                )
            except (ValueError, IndexError):
                results[quirk] = {"ok": False, "error": "no JSON result"}
            results[quirk]["stderr_tail"] = err[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


def summary_rows(results: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    """One row per quirk: verdict, ping loss, sha256, rekeys per interval, KME notes, TLS suite."""
    rows = []
    for quirk, result in results.items():
        checks = result.get("checks")
        failed = [k for k, v in checks.items() if not v] if isinstance(checks, dict) else ["ran"]
        status = result.get("status")
        master = status[0] if isinstance(status, list) and status and isinstance(status[0], dict) else {}
        peers = master.get("peers")
        kme = (
            peers[0].get("kme", {})
            if isinstance(peers, list) and peers and isinstance(peers[0], dict)
            else {}
        )
        tls = master.get("kme_tls", {})
        rows.append({
            "quirk": quirk,
            "ok": bool(result.get("ok")),
            "failed": failed,
            "ping_loss_pct": result.get("ping_loss_pct"),
            "sha256_match": result.get("sha256_match"),
            "rekeys_per_interval": result.get("rekeys_per_interval"),
            "supply_mode": kme.get("supply_mode") if isinstance(kme, dict) else None,
            "notes": kme.get("behaviour") if isinstance(kme, dict) else None,
            "tls": f"{tls.get('version')} {tls.get('cipher')}" if isinstance(tls, dict) else None,
            "error": result.get("error"),
        })  # fmt: skip
    return rows


def format_rows(rows: list[dict[str, object]]) -> str:
    """The summary as text, one quirk per line."""
    lines = [f"{'quirk':15} {'verdict':7} {'loss %':>6} {'sha256':6} {'rekeys/T':>8}  supply     KME as seen"]
    for r in rows:
        verdict = "ok" if r["ok"] else "FAILED"
        notes = "; ".join(str(n) for n in r["notes"]) if isinstance(r["notes"], list) else ""
        seen = notes or str(r["tls"])
        extra = f"  failed: {', '.join(map(str, r['failed']))}" if r["failed"] else ""  # type: ignore[call-overload]
        lines.append(
            f"{r['quirk']:15} {verdict:7} {r['ping_loss_pct']!s:>6} {r['sha256_match']!s:6} "
            f"{r['rekeys_per_interval']!s:>8}  {r['supply_mode']!s:10} {seen}{extra}"
        )
    return "\n".join(lines)
