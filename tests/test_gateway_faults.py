"""Gateways in the namespace lab facing bad input: wrong identities, a foreign CA, a KME down, junk UDP.

Each test builds its own lab (unique ``qg`` namespaces, removed on every path) and runs real
``qgate up`` and ``qgate kms-sim`` processes; nothing is mocked.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qgate import lab_net as net
from qgate import lab_setup as setup
from qgate.keyfiles import write_identity
from qgate.lab import Lab, read_stats
from qgate.lab_procs import Child
from qgate.pki import make_pki

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _prepare(lab: Lab) -> None:
    setup.make_pki_and_identities(lab.run_dir)
    setup.write_policies(lab.run_dir)


def _ping(lab: Lab, count: int = 1) -> bool:
    argv = ["ping", "-c", str(count), "-i", "0.2", "-W", "1", net.HOST_B]
    return lab.run("ha", argv, timeout=5 + count).returncode == 0


def _wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def _log(child: Child) -> str:
    return child.tail(400)


def test_wrong_pinned_peer_identity_keeps_the_tunnel_down_with_a_clear_error(tmp_path: Path) -> None:
    with Lab() as lab:
        _prepare(lab)
        _, other_pub = write_identity(tmp_path / "impostor.key", "ml-dsa-65")
        shutil.copy(other_pub, lab.run_dir / "keys" / "site-b.pub")  # site A now pins a key B does not hold
        lab.start_kmes()
        gw_b, gw_a = lab.start_gateways()
        assert _wait_for(lambda: "authentication_failed" in _log(gw_a), timeout=15), _log(gw_a)
        assert not _ping(lab)
        # v2: B's fragments carry mac1 under A's real key, so A sees B's signed Kicks fail; A's own
        # fragments fail mac1 at B (A keys it with the wrong public key of B), which B reports.
        assert "Kick signature does not verify" in _log(gw_a)
        assert _wait_for(lambda: "fail mac1" in _log(gw_b), timeout=15), _log(gw_b)
        assert "Traceback" not in _log(gw_a) + _log(gw_b)
        stats = read_stats(lab.run_dir / "stats-a.json")
        assert stats.get("auth_failures", 0) >= 1
        assert stats.get("handshakes") == 0


def test_sae_certificate_from_another_ca_keeps_the_tunnel_down_with_a_clear_error(tmp_path: Path) -> None:
    with Lab() as lab:
        _prepare(lab)
        make_pki(tmp_path / "rogue", kmes={"KME_X": []}, saes=["SAE_A"])
        for suffix in (".pem", ".key"):
            shutil.copy(tmp_path / "rogue" / f"SAE_A{suffix}", lab.run_dir / "pki" / f"SAE_A{suffix}")
        lab.start_kmes()
        gw_b, gw_a = lab.start_gateways()
        assert _wait_for(lambda: "TLS failed" in _log(gw_a), timeout=15), _log(gw_a)
        assert not _ping(lab)
        log_a = _log(gw_a)
        assert "TLS" in log_a or "certificate" in log_a, log_a
        assert "Traceback" not in log_a + _log(gw_b)
        assert read_stats(lab.run_dir / "stats-a.json").get("handshakes") == 0


def test_kme_down_at_start_is_retried_and_junk_udp_is_counted_and_dropped() -> None:
    with Lab() as lab:
        _prepare(lab)
        _gw_b, gw_a = lab.start_gateways()  # no KME yet
        assert _wait_for(lambda: "retrying with backoff" in _log(gw_a), timeout=15), _log(gw_a)
        lab.kids.check_alive(gw_a)
        assert "Traceback" not in _log(gw_a)
        assert "retry" in _log(gw_a)
        lab.start_kmes()
        assert _wait_for(lambda: _ping(lab), timeout=25), _log(gw_a)

        junk = (
            "import os, socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(200):\n"
            "    s.sendto(os.urandom(1 + i * 7 % 1400), ('10.99.0.1', 51820))\n"
        )
        lab.run("ha", [sys.executable, "-c", junk], timeout=20)
        assert _wait_for(
            lambda: (
                sum(
                    int(read_stats(lab.run_dir / "stats-a.json").get(k, 0))  # type: ignore[call-overload]
                    for k in (
                        "rx_not_qgate",
                        "rx_unknown_source",
                        "rx_unknown_index",
                        "drops_malformed",
                        "malformed_messages",
                        "drops_unknown_index",
                        "drops_auth",
                        "udp_kernel_drops",  # v2: junk that fails the sockets' BPF filters dies in the kernel
                    )
                )
                >= 200
            ),
            timeout=5,
        ), read_stats(lab.run_dir / "stats-a.json")
        lab.kids.check_alive(gw_a)
        assert _ping(lab, count=5)


def test_gateway_removes_its_tun_device_and_routes_on_sigterm() -> None:
    with Lab() as lab:
        _prepare(lab)
        lab.start_kmes()
        _gw_b, gw_a = lab.start_gateways()
        assert _wait_for(lambda: _ping(lab), timeout=25)
        ns = lab.topo.ns("ga")
        assert "qgtun0" in subprocess.run(["ip", "-n", ns, "link"], capture_output=True, text=True).stdout
        assert lab.kids.stop(gw_a) == 0
        assert "qgtun0" not in subprocess.run(["ip", "-n", ns, "link"], capture_output=True, text=True).stdout
        routes = subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True).stdout
        assert "10.2.0.0/24" not in routes


@pytest.mark.parametrize("site", ["a", "b"])
def test_a_restarted_gateway_is_rehandshaken_without_manual_action(site: str) -> None:
    with Lab() as lab:
        _prepare(lab)
        lab.start_kmes()
        gw_b, gw_a = lab.start_gateways()
        assert _wait_for(lambda: _ping(lab), timeout=25)
        victim, role = (gw_a, "ga") if site == "a" else (gw_b, "gb")
        lab.kids.stop(victim, signal.SIGKILL)  # no clean shutdown: the kernel removes its TUN
        lab.start(f"gateway-{site}-again", role, setup.gateway_argv(sys.executable, lab.run_dir, site))
        assert _wait_for(lambda: _ping(lab), timeout=20), "tunnel did not come back after the restart"


def test_gateway_audit_log_records_handshakes_and_ratchets_with_key_ids_and_verifies() -> None:
    with Lab() as lab:
        _prepare(lab)
        lab.start_kmes()
        audit = lab.run_dir / "audit-a.jsonl"
        lab.start("gateway-b", "gb", setup.gateway_argv(sys.executable, lab.run_dir, "b"))
        gw_a = lab.start(
            "gateway-a",
            "ga",
            [*setup.gateway_argv(sys.executable, lab.run_dir, "a"), "--audit-log", str(audit)],
        )
        assert _wait_for(lambda: _ping(lab), timeout=25)
        time.sleep(2.5)  # a couple of QKD ratchet steps
        assert lab.kids.stop(gw_a) == 0
        verify = subprocess.run(
            [sys.executable, "-m", "qgate", "audit", "verify", str(audit), "--json"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stderr
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        events = [r["event"] for r in records]
        assert events[0] == "audit_start" and events[-1] == "gateway_stop"
        assert "handshake_complete" in events and "ratchet_complete" in events
        assert all(r.get("key_ids") for r in records if r["event"] == "ratchet_complete")


def test_status_shows_a_running_gateway_and_down_stops_it_cleanly() -> None:
    with Lab() as lab:
        _prepare(lab)
        lab.start_kmes()
        _gw_b, gw_a = lab.start_gateways()
        assert _wait_for(lambda: _ping(lab), timeout=25)
        sock = str(lab.run_dir / "control-a.sock")
        qgate = [sys.executable, "-m", "qgate"]
        shown = subprocess.run([*qgate, "status", "--socket", sock, "--json"], capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout.splitlines()[-1])
        peer = status["peers"][0]
        assert peer["state"] in ("up", "rekeying") and peer["epoch"] >= 1 and peer["rx_packets"] >= 1
        assert set(peer["drops"]) >= {"bad_tag", "replay", "unknown_epoch", "too_big"}
        table = subprocess.run([*qgate, "status", "--socket", sock], capture_output=True, text=True)
        assert "site-b" in table.stdout and "state" in table.stdout
        stopped = subprocess.run([*qgate, "down", "--socket", sock], capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stderr
        assert gw_a.proc.wait(timeout=10) == 0
        assert not Path(sock).exists()


def test_sighup_applies_a_new_rekey_interval_without_losing_packets_and_reports_a_refused_change() -> None:
    with Lab() as lab:
        _prepare(lab)
        lab.start_kmes()
        _gw_b, gw_a = lab.start_gateways()
        assert _wait_for(lambda: _ping(lab), timeout=25)
        pinger = lab.start("pinger", "ha", ["ping", "-c", "100", "-i", "0.05", net.HOST_B], pipe_stdout=True)
        policy = lab.run_dir / "site-a.yaml"
        text = policy.read_text()
        text = text.replace("interval: 1.0", "interval: 0.5").replace("mtu: 1420", "mtu: 1400")
        policy.write_text(text)
        time.sleep(1.0)
        gw_a.proc.send_signal(signal.SIGHUP)
        assert pinger.proc.wait(timeout=20) == 0
        out = pinger.proc.stdout.read() if pinger.proc.stdout else ""
        assert " 0% packet loss" in str(out)
        log = _log(gw_a)
        assert "rekey applied" in log and "gateway.tun changed (restart to apply)" in log
        sock = str(lab.run_dir / "control-a.sock")
        shown = subprocess.run([sys.executable, "-m", "qgate", "status", "--socket", sock, "--json"],
                               capture_output=True, text=True)  # fmt: skip
        assert json.loads(shown.stdout.splitlines()[-1])["peers"][0]["rekey_interval_s"] == 0.5


def test_gateway_drops_to_a_system_user_keeping_only_cap_net_admin_and_still_forwards() -> None:
    from qgate.privileges import read_capabilities

    with Lab() as lab:
        _prepare(lab)
        lab.start_kmes()
        lab.start("gateway-b", "gb", setup.gateway_argv(sys.executable, lab.run_dir, "b"))
        argv = [sys.executable, "-m", "qgate", "up", str(lab.run_dir / "site-a.yaml"),
                "--socket", str(lab.run_dir / "control-a.sock"), "--user", "nobody"]  # fmt: skip
        gw_a = lab.start("gateway-a", "ga", argv)
        assert _wait_for(lambda: _ping(lab), timeout=25), _log(gw_a)
        assert _wait_for(lambda: "now running as nobody" in _log(gw_a), timeout=5), _log(gw_a)
        time.sleep(2.5)  # rekeys after the drop use the KME client from a worker thread
        assert _ping(lab, count=3)
        pids = subprocess.run(
            ["pgrep", "-f", "--", "site-a.yaml"], capture_output=True, text=True
        ).stdout.split()
        creds = [read_capabilities(int(pid)) for pid in pids]
        daemon = next(c for c in creds if c["Uid"][1] != 0)
        assert daemon["CapEff"] == {"CAP_NET_ADMIN"} and daemon["CapPrm"] == {"CAP_NET_ADMIN"}
        assert daemon["CapBnd"] == {"CAP_NET_ADMIN"}
        assert "Traceback" not in _log(gw_a)


def test_prometheus_metrics_are_served_on_the_policy_address() -> None:
    with Lab() as lab:
        _prepare(lab)
        policy = lab.run_dir / "site-a.yaml"
        policy.write_text(policy.read_text() + "\nmetrics:\n  listen: 127.0.0.1:9108\n")
        lab.start_kmes()
        _gw_b, _gw_a = lab.start_gateways()
        assert _wait_for(lambda: _ping(lab), timeout=25)
        scrape = (
            "import urllib.request\n"
            "print(urllib.request.urlopen('http://127.0.0.1:9108/metrics', timeout=5).read().decode())\n"
        )
        text = lab.run("ga", [sys.executable, "-c", scrape], timeout=15).stdout
        assert 'qgate_peer_up{gateway="site-a",peer="site-b"} 1.0' in text, text[:2000]
        assert "qgate_rekeys_total" in text and "qgate_drops_total" in text


def test_the_inner_dscp_is_copied_to_the_outer_header_on_the_wan() -> None:
    with Lab() as lab:
        _prepare(lab)
        lab.start_kmes()
        lab.start_gateways()
        assert _wait_for(lambda: _ping(lab), timeout=25)
        ns = lab.topo.ns("ga")
        # outer UDP datagrams from gateway A with DSCP EF (46): TOS byte 0xb8 in the IPv4 header
        capture = subprocess.Popen(
            ["ip", "netns", "exec", ns, "tcpdump", "-i", lab.topo.wan_a, "-n", "-c", "5", "-l",
             "udp and src host 10.99.0.1 and ip[1] & 0xfc == 0xb8"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            lab.run("ha", ["ping", "-c", "5", "-i", "0.2", "-Q", "0xb8", net.HOST_B], timeout=10)
            out, _ = capture.communicate(timeout=10)
        finally:
            capture.kill()
        assert len(out.strip().splitlines()) == 5
