"""Acceptance of issue 4: an IEC 104 flow and ping through a 30 s outage of both KMEs.

Each test builds its own lab (policies: QKD ratchet every 1 s, ML-KEM handshake every 4 s,
keys at most 3 s old, a QKD prefetch of 2 keys so the outage empties the stock) and takes
both KMEs down for 30 s through their admin API (``down`` fault: they stop listening, then
listen again by themselves; the KME-to-KME link must come back too).

* ``pqc_only_if_qkd_down`` on both sides: an IEC 60870-5-104-like TCP flow (host A -> host B
  port 2404, an I-frame every 200 ms echoed, ``TCP_USER_TIMEOUT`` 15 s; it fails if an echo
  takes longer than 15 s or the connection drops) stays up; the gateways run degraded during
  the outage and are hybrid again after it, with ``mode_change`` events both ways.
* ``qkd_and_pqc``: ping stops within ``max_key_age`` (+ margin) of the outage start, no
  packet passes during the rest of the outage, and ping comes back by itself after the KMEs.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from qgate import lab_net as net
from qgate import lab_setup as setup
from qgate.lab import Lab, fresh_stats, read_json_line
from qgate.lab_faults import KmeFaults, kme_records, read_events
from qgate.lab_iec104 import IEC104_PORT
from qgate.lab_procs import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REKEY = {"interval": 1.0, "kem_interval": 4.0, "max_key_age": 3.0}
PREFETCH = 2
"""QKD keys the master keeps in stock: the outage empties it within a few ratchets."""
OUTAGE = 30.0
"""Seconds both KMEs stay down."""
MARGIN = 1.5
"""Seconds of slack on protocol deadlines: timer ticks, ping spacing (0.2 s), log stamps."""
RECOVERY_LIMIT = 15.0
"""Seconds after both KMEs are back within which QKD keying (hybrid mode, ping) must return:
the gateway's KME retry backoff is capped at 8 s, plus two rekey intervals and the margin."""
STEADY = 3.0
"""Seconds of normal running before the outage (the prefetch stock fills)."""
PEER = {"a": "site-b", "b": "site-a"}


@dataclass
class Outage:
    """Wall-clock seconds: when the first KME stopped listening and when the last listened again."""

    start: float
    end: float


@contextmanager
def outage_lab(fail_mode: str) -> Iterator[tuple[Lab, KmeFaults]]:
    """A running two-site lab with ``fail_mode`` on both gateways and fault-admin KMEs."""
    overrides = setup.SiteOverrides(peer={"qkd_prefetch": PREFETCH, "fail_mode": fail_mode})
    with Lab() as lab:
        setup.make_pki_and_identities(lab.run_dir, admin=True)
        setup.write_policies(lab.run_dir, rekey=REKEY, overrides={"a": overrides, "b": overrides})
        lab.start_kmes(admins=[setup.ADMIN_CN])
        lab.wait_path(lab.start_gateways())
        yield lab, KmeFaults(lab.topo, lab.run_dir)


def _row(lab: Lab, site: str) -> dict[str, object]:
    peers = fresh_stats(lab.run_dir / f"stats-{site}.json").get("peers")
    row = peers.get(PEER[site]) if isinstance(peers, dict) else None
    return row if isinstance(row, dict) else {}


def _take_both_kmes_down(lab: Lab, faults: KmeFaults, during: Callable[[], None] = lambda: None) -> Outage:
    """Take both KMEs down for OUTAGE s, call ``during()`` halfway, return once both are back.

    The outage's times come from the KMEs' logs.
    """
    since = time.time()
    for site in ("a", "b"):
        faults.inject(site, "down", seconds=OUTAGE)

    def stamps(text: str) -> list[float]:
        logs = [lab.run_dir / "logs" / f"kme-{site}.log" for site in ("a", "b")]
        return [min((w for w, m in kme_records(p, since=since) if text in m), default=0.0) for p in logs]

    wait_until("both KMEs to go down", lambda: all(stamps("down for")), timeout=5)
    start = min(stamps("down for"))
    time.sleep(max(0.0, start + OUTAGE / 2 - time.time()))
    during()
    wait_until("both KMEs to listen again", lambda: all(stamps("listening again")), timeout=OUTAGE + 10)
    return Outage(start, max(stamps("listening again")))


def _mode_changes(lab: Lab, site: str, since: float) -> list[tuple[float, str]]:
    events = read_events(lab.run_dir / "logs" / f"gateway-{site}.log", since=since, kinds=("mode_change",))
    return [(e.wall, e.detail.get("new", "")) for e in events]


def test_pqc_only_if_qkd_down_keeps_an_iec104_flow_up_through_a_30_s_outage_of_both_kmes() -> None:
    with outage_lab("pqc_only_if_qkd_down") as (lab, faults):
        tool = [sys.executable, "-m", "qgate.lab_iec104"]
        target = f"{net.HOST_B}:{IEC104_PORT}"
        server = lab.start("iec104-server", "hb", [*tool, "server", "--listen", target], pipe_stdout=True)
        read_json_line(server, timeout=10)
        client_argv = [*tool, "client", "--to", target, "--period", "0.2", "--max-wait", "15"]
        client = lab.start("iec104-client", "ha", client_argv, pipe_stdout=True)
        time.sleep(STEADY)
        began = time.time()
        during: dict[str, dict[str, object]] = {}
        outage = _take_both_kmes_down(
            lab, faults, lambda: during.update({s: _row(lab, s) for s in ("a", "b")})
        )

        def hybrid() -> bool:
            lab.kids.check_alive(client)
            return all(_row(lab, s).get("mode") == "hybrid" for s in ("a", "b"))

        wait_until("hybrid mode on both gateways", hybrid, timeout=RECOVERY_LIMIT)
        hybrid_after = time.time() - outage.end
        time.sleep(1.0)  # a few more I-frames on the hybrid session
        client.proc.send_signal(signal.SIGTERM)
        flow = read_json_line(client, timeout=20)
        after = {s: _row(lab, s) for s in ("a", "b")}
        changes = {s: _mode_changes(lab, s, began) for s in ("a", "b")}
        keyed = read_events(
            lab.run_dir / "logs" / "gateway-a.log", since=outage.end, kinds=("ratchet_complete",)
        )

    summary = (
        f"flow={flow} hybrid {hybrid_after:.1f} s after the KMEs; mode changes {changes}; during={during}"
    )
    assert flow.get("ok") is True and flow.get("error") is None, summary
    assert flow["echoed"] == flow["sent"] and float(str(flow["max_echo_s"])) < 15.0, summary
    print(summary)
    assert int(str(during["a"].get("degraded_handshakes"))) >= 1, summary  # the master starts them
    for site in ("a", "b"):
        assert during[site].get("mode") == "degraded", summary
        news = [new for t, new in changes[site]]
        assert news[:2] == ["degraded", "hybrid"], summary
        assert outage.start <= changes[site][0][0] <= outage.end, summary
        assert changes[site][1][0] >= outage.end, summary
        assert int(str(after[site].get("mode_changes"))) >= 2, summary
    assert any(e.key_ids for e in keyed), f"no QKD ratchet after the KMEs came back (KME link?); {summary}"


PING_LINE = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ")


def test_qkd_and_pqc_stops_traffic_within_max_key_age_of_a_kme_outage_and_resumes_by_itself() -> None:
    with outage_lab("qkd_and_pqc") as (lab, faults):
        ping = lab.start(
            "ping", "ha", ["ping", "-n", "-D", "-i", "0.2", "-W", "1", net.HOST_B], pipe_stdout=True
        )
        time.sleep(STEADY)
        outage = _take_both_kmes_down(lab, faults)

        def pinging() -> bool:
            lab.kids.check_alive(ping)
            return bool(
                read_events(
                    lab.run_dir / "logs" / "gateway-a.log",
                    since=outage.end,
                    kinds=("ratchet_complete", "handshake_complete"),
                )
            )

        wait_until("keying after the outage", pinging, timeout=RECOVERY_LIMIT)
        time.sleep(2.0)
        ping.proc.send_signal(signal.SIGINT)
        out, _ = ping.proc.communicate(timeout=10)
        stats = {s: _row(lab, s) for s in ("a", "b")}
        changes = {s: _mode_changes(lab, s, outage.start) for s in ("a", "b")}

    replies = [float(m.group(1)) for line in out.decode().splitlines() if (m := PING_LINE.match(line))]
    before = [t for t in replies if t < outage.start]
    during = [t for t in replies if outage.start <= t < outage.end]
    back = [t for t in replies if t >= outage.end]
    max_age = REKEY["max_key_age"]
    last = max(during, default=before[-1] if before else 0.0)
    first = back[0] - outage.end if back else -1.0
    summary = (
        f"outage {outage.end - outage.start:.1f} s; replies before {len(before)}, during {len(during)} "
        f"(last +{last - outage.start:.2f} s), after {len(back)} (first +{first:.2f} s after the KMEs); "
        f"stats {stats}; mode changes {changes}"
    )
    print(summary)
    assert before, summary
    assert last - outage.start <= max_age + MARGIN, f"traffic went on past max_key_age: {summary}"
    assert back and back[0] - outage.end <= RECOVERY_LIMIT, f"traffic did not come back: {summary}"
    for site in ("a", "b"):
        assert stats[site].get("degraded_handshakes") == 0, summary
        assert stats[site].get("mode") == "hybrid", summary
        # the stop and the return are audited mode changes: hybrid -> closed -> hybrid, never degraded
        assert [mode for _, mode in changes[site]] == ["closed", "hybrid"], summary
