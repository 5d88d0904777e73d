"""Rekeys under load (issue 4 item 1): ratchets every 0.1 s lose and reject nothing.

The lab test runs ``bench/rekey.py`` for about 6 s (needs root: namespaces, TUN) and checks
the acceptance figures; the others cover the bench's helpers without root: the UDP stream's
counting, the kernel-counter parsing, the gateway log events and where a loss is placed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qgate import lab_kstats, lab_udp
from qgate.lab_rekey import locate_losses, parse_events

REPO = Path(__file__).resolve().parent.parent
SECONDS = 6.0
INTERVAL = 0.1
MIN_RATCHETS = 30


@pytest.fixture(scope="module")
def rekey_run() -> dict[str, object]:
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        pytest.skip("needs root and iperf3")
    proc = subprocess.run(
        [sys.executable, "bench/rekey.py", "--json", "--seconds", str(SECONDS), "--interval", str(INTERVAL)],
        capture_output=True, text=True, timeout=240, check=False, cwd=REPO,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr:\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    result["_stderr"] = proc.stderr[-4000:]
    return result


@pytest.mark.netns
@pytest.mark.slow
def test_ratchets_every_tenth_second_under_load_lose_and_reject_nothing(rekey_run: dict[str, object]) -> None:
    r, err = rekey_run, rekey_run["_stderr"]
    assert "error" not in r, err
    assert isinstance(r["rekeys"], int) and r["rekeys"] >= MIN_RATCHETS, err
    assert r["udp_sent"] == round(2000 * SECONDS), err
    assert r["udp_lost"] == 0, err
    assert r["tcp_sha256_match"] is True and r["tcp_bytes_received"] == r["tcp_bytes"], err
    for key in ("auth_drops", "replay_drops", "key_expired_drops", "unknown_index_drops"):
        assert r[key] == 0, f"{key}: {r[key]}\n{err}"


@pytest.mark.netns
@pytest.mark.slow
def test_rekey_bench_leaves_no_namespace_behind(rekey_run: dict[str, object]) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    run_id = rekey_run.get("run_id")
    assert isinstance(run_id, str) and len(run_id) == 6
    assert not [line for line in listed.splitlines() if line.startswith(f"qg{run_id}")]


def test_udp_tally_counts_distinct_duplicates_reordering_and_missing_ranges() -> None:
    tally = lab_udp.Tally(size=100)
    for seq in (0, 1, 3, 2, 2, 7):
        tally.add(lab_udp.HEADER.pack(seq, 0) + bytes(100 - lab_udp.HEADER.size))
    tally.add(b"short")
    report = tally.report()
    assert report["received"] == 5 and report["duplicates"] == 1 and report["reordered"] == 1
    assert report["missing"] == [[4, 6]] and report["max_seq"] == 7 and report["bad"] == 1


def test_udp_stream_over_loopback_arrives_complete() -> None:
    port = 40000 + int.from_bytes(os.urandom(2), "big") % 20000
    proc = subprocess.Popen(
        [sys.executable, "-m", "qgate.lab_udp", "recv", "--listen", f"127.0.0.1:{port}", "--size", "200"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and json.loads(proc.stdout.readline()) == {"ready": True}
        sent = lab_udp.send(f"127.0.0.1:{port}", pps=1000, size=200, seconds=0.3)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        got = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert sent["sent"] == 300 and got["received"] == 300 and got["missing"] == []


def test_kernel_drop_deltas_keep_only_moved_drop_counters() -> None:
    snmp = "Udp: InDatagrams RcvbufErrors\nUdp: {} {}\nTcp: RetransSegs\nTcp: 0\n"
    links = '[{"ifname": "qgtun0", "stats64": {"rx": {"dropped": 0}, "tx": {"dropped": %d}}}]'
    before = {"gb": {**lab_kstats.parse_snmp(snmp.format(10, 0)), **lab_kstats.parse_links(links % 1)}}
    after = {"gb": {**lab_kstats.parse_snmp(snmp.format(90, 4)), **lab_kstats.parse_links(links % 3)}}
    assert lab_kstats.drop_deltas(before, after) == {"gb": {"Udp.RcvbufErrors": 4, "qgtun0.tx_dropped": 2}}


def test_lost_datagrams_are_placed_between_the_epoch_transitions_around_them(tmp_path: Path) -> None:
    log = tmp_path / "gateway-a.log"
    log.write_text(
        "2030-01-01 00:00:10,000 INFO qgate.gateway: ratchet_complete epoch=7 key_ids=x\n"
        "2030-01-01 00:00:10,050 INFO qgate.gateway: tx something else\n"
        "2030-01-01 00:00:10,100 WARNING qgate.gateway: ratchet_abandoned reason=y\n"
        "2030-01-01 00:00:10,200 INFO qgate.gateway: handshake_complete epoch=8 key_ids=z\n"
    )
    events = parse_events(log)
    assert [(kind, epoch) for _, _, kind, epoch in events] == [
        ("ratchet_complete", 7), ("ratchet_abandoned", None), ("handshake_complete", 8),
    ]  # fmt: skip
    start = events[0][0] + 0.03  # UDP stream started 30 ms after epoch 7
    placed = locate_losses([[100, 104]], {"start_wall_ns": int(start * 1e9), "pps": 1000.0}, {"a": events})
    assert placed[0]["count"] == 5
    assert placed[0]["a_prev"] == {"epoch": 7, "kind": "ratchet_complete", "ms_before": 130}
    assert placed[0]["a_next"] == {"epoch": 8, "kind": "handshake_complete", "ms_after": 70}


def test_udp_sender_refuses_payload_smaller_than_header() -> None:
    with pytest.raises(ValueError, match="16"):
        lab_udp.send("127.0.0.1:9", pps=1, size=8, seconds=0.1)
