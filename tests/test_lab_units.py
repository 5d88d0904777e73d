"""Lab helpers that need no root: ping parsing, policy rendering, names, traffic over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from qgate import lab_net, lab_setup
from qgate.lab import format_summary
from qgate.lab_traffic import parse_ping, receive, send

PING_OUT = """PING 10.2.0.2 (10.2.0.2) 56(84) bytes of data.
64 bytes from 10.2.0.2: icmp_seq=1 ttl=62 time=0.210 ms
64 bytes from 10.2.0.2: icmp_seq=2 ttl=62 time=0.190 ms
64 bytes from 10.2.0.2: icmp_seq=4 ttl=62 time=1.50 ms

--- 10.2.0.2 ping statistics ---
4 packets transmitted, 3 received, 25% packet loss, time 603ms
rtt min/avg/max/mdev = 0.190/0.633/1.500/0.612 ms
"""


def test_parse_ping_reports_loss_and_rtts() -> None:
    result = parse_ping(PING_OUT)
    assert (result.transmitted, result.received) == (4, 3)
    assert result.loss_pct == 25.0
    assert result.rtts_ms == (0.21, 0.19, 1.5)
    assert result.percentile_ms(50) == 0.21
    assert result.percentile_ms(99) == 1.5


def test_parse_ping_without_summary_raises() -> None:
    with pytest.raises(ValueError):
        parse_ping("ping: connect: Network is unreachable")


def test_lab_names_fit_linux_limits() -> None:
    topo = lab_net.Topology(lab_net.new_run_id())
    names = [topo.link(e) for e in ("ha", "al", "aw", "bw", "bl", "hb")] + topo.namespaces
    assert all(n.startswith("qg") and len(n) <= 15 for n in names)
    assert len(set(names[:6])) == 6


@pytest.mark.parametrize("site", ["a", "b"])
def test_rendered_policy_matches_lab_topology(site: str) -> None:
    doc = lab_setup.render_policy(site)
    peer = doc["peers"][0]  # type: ignore[index]
    gateway = doc["gateway"]
    assert gateway["listen"] == (f"{lab_net.GW_A_WAN}:51820" if site == "a" else f"{lab_net.GW_B_WAN}:51820")  # type: ignore[index]
    assert peer["qkd_role"] == ("master" if site == "a" else "slave")
    assert peer["subnets"] == [lab_net.LAN_B if site == "a" else lab_net.LAN_A]
    assert doc["kme"]["url"] == "https://127.0.0.1:8443"  # type: ignore[index]


def test_rendered_policy_forced_rekey_wins() -> None:
    doc = lab_setup.render_policy("a", rekey={"interval": 2.0, "kem_interval": 8.0, "max_key_age": 6.0})
    assert doc["peers"][0]["rekey"]["interval"] == 2.0  # type: ignore[index]


def test_write_policies_validates_with_policy_parser(tmp_path: Path) -> None:
    paths = lab_setup.write_policies(tmp_path)
    assert yaml.safe_load(paths["a"].read_text())["gateway"]["identity"] == "keys/site-a.key"


def test_paced_sender_and_receiver_agree_on_sha256() -> None:
    payload = os.urandom(300_000)
    port = 40000 + int.from_bytes(os.urandom(2), "big") % 20000
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(receive(f"127.0.0.1:{port}")))
    thread.start()
    import time

    time.sleep(0.2)
    sent = send(f"127.0.0.1:{port}", payload, seconds=0.5)
    thread.join(10)
    assert sent["seconds"] >= 0.45  # type: ignore[operator]
    assert result["bytes"] == len(payload)
    assert result["sha256"] == sent["sha256"] == hashlib.sha256(payload).hexdigest()


def test_format_summary_lists_checks() -> None:
    text = format_summary({"run_id": "abc123", "mode": "qgate", "ok": False, "ping_loss_pct": 0.0,
                           "checks": {"sha256_match": False}})  # fmt: skip
    assert "FAILED" in text and "sha256_match" in text and "FAIL" in text


def test_lab_traffic_module_runs_as_script() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qgate.lab_traffic", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "recv" in proc.stdout
    assert json.dumps  # the CLI prints JSON lines (covered by the e2e test)


def test_lab_run_json_without_root_exits_2_with_json_last_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from click.testing import CliRunner

    lab_cli = importlib.import_module("qgate.cli.lab")  # the package attribute is the click group

    monkeypatch.setattr(lab_cli.os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(lab_cli.lab, ["run", "--json"])
    assert result.exit_code == 2
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["ok"] is False and "root" in last["error"]


def test_lab_down_unknown_run_id_raises_nothing_found() -> None:
    from qgate.lab import lab_down
    from qgate.lab_procs import LabError

    run_id = lab_net.new_run_id()
    while lab_net.namespace_exists(f"qg{run_id}ha") or lab_net.namespace_exists(f"qg{run_id}ga"):
        run_id = lab_net.new_run_id()
    with pytest.raises(LabError, match=f"no lab run {run_id} found"):
        lab_down(run_id)


def test_keep_message_names_run_id_reach_and_teardown() -> None:
    from qgate.lab import Lab

    text = Lab(keep=True, run_id="abc123").keep_message()
    assert "lab abc123 kept running" in text
    assert f"ip netns exec qgabc123ha ping {lab_net.HOST_B}" in text
    assert "qgate lab down abc123" in text


def test_kill_kept_kills_only_processes_still_running_from_run_dir(tmp_path: Path) -> None:
    from qgate.lab import KEPT_PIDS_FILE, kill_kept

    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    ours = subprocess.Popen([*sleeper, str(tmp_path / "site-a.yaml")])
    other = subprocess.Popen([*sleeper, "/elsewhere"])
    try:
        (tmp_path / KEPT_PIDS_FILE).write_text(f"{ours.pid} gateway-a\n{other.pid} kme-a\nnot-a-pid x\n")
        assert kill_kept(tmp_path) == 1
        assert ours.wait(5) == -9
        assert other.poll() is None
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
