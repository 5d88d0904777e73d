"""``qgate status`` as a human table: the daemon's status object rendered for an operator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

COLUMNS = (
    ("peer", "name"),
    ("state", "state"),
    ("mode", "mode"),
    ("fail mode", "fail_mode"),
    ("epoch", "epoch"),
    ("age s", "epoch_age_s"),
    ("last hs s", "last_handshake_s"),
    ("QKD KME", "qkd_kme_stock"),
    ("QKD buf", "qkd_prefetch_stock"),
    ("rekeys", "rekeys"),
    ("failed", "rekeys_failed"),
    ("tx pkts", "tx_packets"),
    ("rx pkts", "rx_packets"),
)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_status(status: Mapping[str, object]) -> str:
    """Return a multi-line table of the peers, their drops by reason, and why a peer is down."""
    peers = status.get("peers")
    rows: Sequence[Mapping[str, object]] = peers if isinstance(peers, list) else []
    lines = [
        f"gateway {status.get('gateway')} (pid {status.get('pid')}, up {_cell(status.get('uptime_s'))} s)"
    ]
    table = [[title for title, _ in COLUMNS]]
    for row in rows:
        table.append([_cell(row.get(key)) for _, key in COLUMNS])
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    for row in rows:
        drops = row.get("drops")
        if isinstance(drops, Mapping):
            shown = ", ".join(f"{k} {v}" for k, v in drops.items() if v)
            name, tx, rx = row.get("name"), row.get("tx_bytes"), row.get("rx_bytes")
            lines.append(f"{name}: bytes tx {tx} rx {rx}; drops: {shown or 'none'}")
        guard = row.get("guard")
        if isinstance(guard, Mapping) and any(guard.values()):
            shown = ", ".join(f"{k} {v}" for k, v in guard.items() if v)
            lines.append(f"{row.get('name')}: handshake guard: {shown}")
        if row.get("why"):
            lines.append(f"{row.get('name')}: {row.get('state')}: {row.get('why')}")
        kme = row.get("kme")
        if isinstance(kme, Mapping):
            lines.append(f"{row.get('name')}: {_kme_line(kme)}")
    tls = status.get("kme_tls")
    if isinstance(tls, Mapping):
        weak = "; weak ciphers allowed by policy" if tls.get("weak_ciphers_allowed") else ""
        suite = f"{_cell(tls.get('version'))} {_cell(tls.get('cipher'))}"
        lines.append(f"kme tls: {suite}, server {tls.get('server_identity')}{weak}")
    return "\n".join(lines)


def _kme_line(kme: Mapping[str, object]) -> str:
    """One line on the peer's KME side: reachability, key supply, and what the KME was seen to do."""
    seen = kme.get("reachable")
    reach = "not heard yet" if not isinstance(seen, bool) else "reachable" if seen else "unreachable"
    parts = [f"kme {reach}", f"supply {kme.get('supply_mode')}"]
    if kme.get("supply_mode") == "prefetch":
        parts.append(f"stock {kme.get('prefetch_stock')}/{kme.get('prefetch_batch')}")
    if kme.get("supply_reason"):
        parts.append(str(kme.get("supply_reason")))
    notes = kme.get("behaviour")
    if isinstance(notes, list) and notes:
        parts.append("; ".join(str(n) for n in notes))
    for key in ("tls_diagnosis", "last_error"):
        if kme.get(key):
            parts.append(f"{key.replace('_', ' ')}: {kme.get(key)}")
            break
    return ", ".join(parts)
