"""bench/throughput.py: bare veth vs OpenVPN vs qgate, one invocation (issue 5 item 2).

The lab test runs the bench briefly (``--seconds 2 --pings 50``; needs root, namespaces,
iperf3; OpenVPN is installed by the bench when missing) and checks the JSON shape, that every
path carried TCP, UDP and ping traffic, and that its namespaces are gone. The others cover the
ratio arithmetic and the OpenVPN command line without root.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from qgate import lab_net as net

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
METRICS = ("tcp_gbps", "udp64_kpps", "rtt_p50_ms", "rtt_p99_ms", "rtt_p99_loaded_ms")
TIMEOUT = 120


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # throughput.py imports its sibling openvpn_lab
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run() -> dict[str, object]:
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        pytest.skip("needs root and iperf3")
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--json", "--seconds", "2", "--pings", "50"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd=REPO,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must be one JSON line:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    result["_stderr"] = proc.stderr[-4000:]
    result["_rc"] = proc.returncode
    return result


def _measured(r: dict[str, object]) -> list[str]:
    skipped = r.get("skipped", {})
    assert isinstance(skipped, dict)
    return [p for p in ("veth", "openvpn", "qgate") if p not in skipped]


@pytest.mark.netns
@pytest.mark.slow
def test_bench_json_has_five_metrics_per_path_and_qgate_ratios(bench_run: dict[str, object]) -> None:
    r, err = bench_run, bench_run["_stderr"]
    assert r["_rc"] == 0, err
    paths = _measured(r)
    assert "veth" in paths and "qgate" in paths, err
    for path in paths:
        values = r[path]
        assert isinstance(values, dict) and "error" not in values, f"{path}: {values}\n{err}"
        assert set(METRICS) <= set(values), f"{path}: {sorted(values)}"
    ratios = r["ratios"]
    assert isinstance(ratios, dict)
    assert set(ratios) == {f"qgate/{p}" for p in paths if p != "qgate"}
    for row in ratios.values():
        assert isinstance(row, dict) and set(row) == set(METRICS)
        assert all(isinstance(v, float) and v > 0 for v in row.values()), row


@pytest.mark.netns
@pytest.mark.slow
def test_bench_every_path_delivered_tcp_udp_and_pings(bench_run: dict[str, object]) -> None:
    r, err = bench_run, bench_run["_stderr"]
    for path in _measured(r):
        v = r[path]
        assert isinstance(v, dict)
        assert v["tcp_gbps"] > 0.01, f"{path}: {v}\n{err}"
        assert v["udp64_kpps"] > 1 and 0 < v["udp64_received"] <= v["udp64_sent"], f"{path}: {v}"
        assert v["ping_loss_pct"] < 10 and v["loaded_ping_loss_pct"] < 50, f"{path}: {v}"
        assert 0 < v["rtt_p50_ms"] <= v["rtt_p99_ms"], f"{path}: {v}"
        assert v["rtt_p99_loaded_ms"] > 0, f"{path}: {v}"
        if path != "veth":
            assert v["tun_mtu"] == 1420 and v["cipher"] == "AES-256-GCM", f"{path}: {v}"
        for role in net.ROLES:
            assert not net.namespace_exists(f"qg{v['run_id']}{role}"), f"{path}: namespace left behind"


@pytest.mark.netns
@pytest.mark.slow
def test_bench_openvpn_path_ran_with_aes_256_gcm(bench_run: dict[str, object]) -> None:
    skipped = bench_run.get("skipped", {})
    assert isinstance(skipped, dict)
    if "openvpn" in skipped:
        pytest.skip(f"OpenVPN could not be installed: {skipped['openvpn']}")
    v = bench_run["openvpn"]
    assert isinstance(v, dict) and v.get("cipher") == "AES-256-GCM", v
    assert v["tun_mtu"] == 1420, v


def test_ratios_are_qgate_over_each_other_path() -> None:
    tp = _load("throughput")
    results = {
        "veth": dict.fromkeys(METRICS, 2.0),
        "openvpn": {**dict.fromkeys(METRICS, 4.0), "tcp_gbps": 0.0},
        "qgate": dict.fromkeys(METRICS, 1.0),
    }
    ratios = tp.ratios(results)
    assert ratios["qgate/veth"] == dict.fromkeys(METRICS, 0.5)
    assert ratios["qgate/openvpn"] == {**dict.fromkeys(METRICS, 0.25), "tcp_gbps": None}
    assert tp.ratios({"veth": results["veth"]}) == {}
    assert "qgate/openvpn" in tp.table(results, {})


def test_openvpn_command_forces_aes_256_gcm_tls_and_qgate_mtu() -> None:
    ovpn = _load("openvpn_lab")
    argv_a = ovpn.openvpn_argv("a", Path("/pki"), 1420)
    argv_b = ovpn.openvpn_argv("b", Path("/pki"), 1420)
    for argv in (argv_a, argv_b):
        assert argv[argv.index("--data-ciphers") + 1] == "AES-256-GCM"
        assert argv[argv.index("--tun-mtu") + 1] == "1420"
        assert "--secret" not in argv and "--disable-dco" in argv
    assert "--tls-client" in argv_a and "--tls-server" in argv_b
    assert argv_a[argv_a.index("--remote") + 1] == net.GW_B_WAN
    assert argv_a[argv_a.index("--route") + 1 : argv_a.index("--route") + 3] == ["10.2.0.0", "255.255.255.0"]
    assert ovpn.qgate_tun_mtu() == 1420
