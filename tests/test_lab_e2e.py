"""End to end: ``qgate lab run`` in real namespaces, and its teardown on every path (root only).

One qgate lab run (KMEs, gateways, ping, 20 MB paced TCP transfer, WAN capture) is shared by
the acceptance tests; a bare-forwarding baseline run proves the capture analysis does see
plaintext when there is no tunnel; a run killed with SIGTERM must leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def _lab(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", "qgate", "lab", "run", "--json", *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr:\n{proc.stderr[-4000:]}"
    return proc, json.loads(lines[-1])


def _lab_namespaces(run_id: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(f"qg{run_id}")]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def lab_run() -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    return _lab()


def test_lab_run_succeeds_and_prints_only_json_on_stdout(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    proc, result = lab_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(proc.stdout.strip().splitlines()) == 1
    assert result["ok"] is True, result["checks"]
    assert result["duration_s"] < 60  # type: ignore[operator]


def test_lab_ping_through_tunnel_has_no_loss(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    assert lab_run[1]["ping_loss_pct"] == 0


def test_lab_transfer_arrives_complete_with_matching_sha256(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    result = lab_run[1]
    assert result["tcp_bytes_sent"] == result["tcp_bytes_received"] >= 20_000_000  # type: ignore[operator]
    assert result["sha256_match"] is True


def test_lab_rekeys_during_transfer(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    result = lab_run[1]
    assert result["rekeys_qkd"] >= 3  # type: ignore[operator]
    assert result["rekeys_kem"] >= 1  # type: ignore[operator]


def test_lab_every_wan_datagram_is_qgate(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    result = lab_run[1]
    assert result["wan_datagrams"] > 10_000  # type: ignore[operator]
    assert result["wan_unparsed"] == 0
    assert result["wan_ip_fragments"] == 0
    assert result["pcap_dropped_by_kernel"] == 0


def test_lab_wan_capture_has_no_plaintext(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    assert lab_run[1]["wan_plaintext_hits"] == 0


def test_lab_gateways_exit_cleanly_without_drops(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    result = lab_run[1]
    assert result["gateway_exit_status"] == {"a": 0, "b": 0}
    drops = result["gateway_drops_during_traffic"]  # before the tunnel is up, no_session drops are right
    assert isinstance(drops, dict)
    for site in ("a", "b"):
        assert not any(drops[site].values()), drops


def test_lab_leaves_no_namespaces_processes_or_run_dir(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    run_id = str(lab_run[1]["run_id"])
    assert _lab_namespaces(run_id) == []
    assert _processes_mentioning(f"qgate-lab-{run_id}") == []
    assert not Path(f"/tmp/qgate-lab-{run_id}").exists()


def test_baseline_without_tunnel_shows_plaintext_on_wan() -> None:
    proc, result = _lab("--no-tunnel", "--seconds", "2", "--transfer-mb", "5", "--pings", "5")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result["sha256_match"] is True
    assert result["wan_plaintext_hits"] > 0  # type: ignore[operator]
    assert _lab_namespaces(str(result["run_id"])) == []


def test_sigterm_during_run_tears_everything_down() -> None:
    before = set(_lab_namespaces(""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qgate", "lab", "run", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    new: set[str] = set()
    while time.monotonic() < deadline and not any(n.endswith("hb") for n in new):
        time.sleep(0.2)
        new = set(_lab_namespaces("")) - before
    assert new, "lab did not create namespaces"
    run_id = sorted(new)[0][2:8]
    time.sleep(4)  # KMEs and gateways are up by now
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-4000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"ok": False, "error": "interrupted"}
    assert _lab_namespaces(run_id) == []
    assert _processes_mentioning(f"qgate-lab-{run_id}") == []
    assert not Path(f"/tmp/qgate-lab-{run_id}").exists()


def test_lab_reports_each_gateways_status_and_verified_audit_logs(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    result = lab_run[1]
    assert result["audit_verified"] is True
    status = result["status"]
    assert isinstance(status, list) and [s["gateway"] for s in status] == ["site-a", "site-b"]
    assert all(s["peers"][0]["state"] in ("up", "rekeying") for s in status)


def test_lab_run_uses_the_offload_path_on_both_gateways(
    lab_run: tuple[subprocess.CompletedProcess[str], dict[str, object]],
) -> None:
    status = lab_run[1]["status"]
    assert isinstance(status, list)
    for site in status:
        path = site["data_path"]
        assert path["tun_vnet_header"] and path["tun_offloads"] & 0x07 == 0x07, path  # CSUM, TSO4, TSO6
        assert path["udp_gso"] and path["udp_gro"], path


@pytest.mark.parametrize("plain", ["a", "b"])
def test_same_traffic_arrives_intact_when_one_gateway_runs_the_plain_fallback_path(plain: str) -> None:
    # The plain gateway reads one packet per read and sends one datagram per call (a: sender side),
    # or receives one datagram per call and writes one packet per write (b: receiver side); the
    # other gateway keeps its offloads, so this is also the interoperability test of one wire format.
    proc, result = _lab("--no-offload", plain, "--transfer-mb", "10", "--seconds", "4", "--pings", "10")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result["ok"] is True, result["checks"]
    assert result["sha256_match"] is True and result["ping_loss_pct"] == 0
    assert result["tcp_bytes_received"] == 10_000_000
    assert result["wan_unparsed"] == 0 and result["wan_plaintext_hits"] == 0
    status = result["status"]
    assert isinstance(status, list)
    paths = {s["gateway"]: s["data_path"] for s in status}
    plain_path = {"tun_vnet_header": False, "tun_offloads": 0, "udp_gso": False, "udp_gro": False}
    assert paths[f"site-{plain}"] == plain_path
    other = "b" if plain == "a" else "a"
    assert paths[f"site-{other}"]["tun_vnet_header"] and paths[f"site-{other}"]["udp_gro"]
