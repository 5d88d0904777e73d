"""Prometheus metrics: collector output, HTTP scrape, bind errors, and nothing secret exported."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from qgate.dataplane.forwarder import ForwarderStats
from qgate.errors import ConfigError
from qgate.gateway import Gateway, GatewayStats
from qgate.keyfiles import write_identity
from qgate.metrics import (
    GATEWAY_COUNTERS,
    SPECS,
    build_registry,
    parse_address,
    start_metrics_server,
    status_from_loop,
)
from qgate.pki import make_pki
from qgate.policy import load_policy

SECRET_MARK = "deadbeefcafe0123"


def sample_status(**peer_changes: object) -> dict[str, object]:
    """A status object in the shape of ``Gateway.status(now)``: one master peer, one slave peer."""
    drops = {
        "bad_tag": 3,
        "replay": 2,
        "unknown_epoch": 1,
        "key_expired": 0,
        "key_exhausted": 0,
        "no_session": 5,
        "malformed": 0,
        "too_big": 4,
    }
    master: dict[str, object] = {
        "name": "site-b",
        "role": "master",
        "state": "up",
        "why": "",
        "mode": "hybrid",
        "fail_mode": "qkd_and_pqc",
        "epoch": 42,
        "epoch_age_s": 0.25,
        "last_handshake_s": 0.5,
        "rekey_interval_s": 1.0,
        "qkd_kme_stock": 900,
        "qkd_prefetch_stock": 8,
        "rekeys": 50,
        "rekeys_qkd": 40,
        "rekeys_kem": 10,
        "rekeys_failed": 2,
        "tx_packets": 1000,
        "tx_bytes": 1_400_000,
        "rx_packets": 990,
        "rx_bytes": 1_300_000,
        "drops": drops,
        "guard": {"mac1_failed": 11, "mac2_failed": 5000, "retries_sent": 30, "degrade_refused": 1},
        **peer_changes,
    }
    slave: dict[str, object] = {
        "name": "site-c",
        "role": "slave",
        "state": "down",
        "why": "no session yet",
        "mode": None,
        "fail_mode": "pqc_only_if_qkd_down",
        "epoch": None,
        "epoch_age_s": None,
        "last_handshake_s": None,
        "rekey_interval_s": 10.0,
        "qkd_kme_stock": None,
        "qkd_prefetch_stock": 0,
        "rekeys_qkd": 0,
        "rekeys_kem": 0,
        "rekeys_failed": 0,
        "tx_packets": 0,
        "tx_bytes": 0,
        "rx_packets": 0,
        "rx_bytes": 0,
        "drops": dict.fromkeys(drops, 0),
    }
    counters = {name: 0 for name in GATEWAY_COUNTERS} | {"rx_not_qgate": 7, "drops_no_route": 9}
    return {
        "gateway": "site-a",
        "pid": 1234,
        "uptime_s": 12.5,
        "peers": [master, slave],
        "counters": counters,
    }


def scrape_text(status: Mapping[str, object]) -> str:
    return generate_latest(build_registry(lambda: status, process_metrics=False)).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Map (sample name, labels) to value over every family of an exposition text."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert isinstance(s, Sample)
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.fixture
def found() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return samples(scrape_text(sample_status()))


def test_collector_exports_peer_state_mode_epoch_and_ages_per_peer(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> None:
    b = {"gateway": "site-a", "peer": "site-b"}
    assert value(found, "qgate_peer_up", **b) == 1
    assert value(found, "qgate_peer_state", **b, state="up") == 1
    assert value(found, "qgate_peer_state", **b, state="down") == 0
    assert value(found, "qgate_peer_degraded", **b) == 0
    assert value(found, "qgate_epoch", **b) == 42
    assert value(found, "qgate_epoch_age_seconds", **b) == 0.25
    assert value(found, "qgate_last_handshake_age_seconds", **b) == 0.5
    assert value(found, "qgate_rekey_interval_seconds", **b) == 1.0
    assert value(found, "qgate_peer_info", **b, role="master", fail_mode="qkd_and_pqc") == 1
    assert value(found, "qgate_uptime_seconds", gateway="site-a") == 12.5
    assert value(found, "qgate_status_up") == 1


def test_collector_exports_rekeys_traffic_drops_and_qkd_stock_as_counters_and_gauges(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> None:
    b = {"gateway": "site-a", "peer": "site-b"}
    assert value(found, "qgate_rekeys_total", **b, kind="qkd") == 40
    assert value(found, "qgate_rekeys_total", **b, kind="kem") == 10
    assert value(found, "qgate_rekey_failures_total", **b) == 2
    assert value(found, "qgate_packets_total", **b, direction="tx") == 1000
    assert value(found, "qgate_bytes_total", **b, direction="rx") == 1_300_000
    assert value(found, "qgate_drops_total", **b, reason="bad_tag") == 3
    assert value(found, "qgate_drops_total", **b, reason="too_big") == 4
    assert value(found, "qgate_guard_events_total", **b, event="mac2_failed") == 5000
    assert value(found, "qgate_guard_events_total", **b, event="degrade_refused") == 1
    assert value(found, "qgate_qkd_keys_available", **b, where="kme") == 900
    assert value(found, "qgate_qkd_keys_available", **b, where="prefetch") == 8
    assert value(found, "qgate_gateway_rx_not_qgate_total", gateway="site-a") == 7
    assert value(found, "qgate_gateway_drops_no_route_total", gateway="site-a") == 9


def test_collector_types_counters_as_counter_and_everything_else_as_gauge() -> None:
    for family in text_string_to_metric_families(scrape_text(sample_status())):
        spec = SPECS[family.name + "_total" if family.type == "counter" else family.name]
        assert family.type == spec.kind


def test_collector_omits_unknown_values_of_a_peer_without_session(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> None:
    c = {"gateway": "site-a", "peer": "site-c"}
    assert value(found, "qgate_peer_up", **c) == 0
    assert value(found, "qgate_peer_state", **c, state="down") == 1
    for name in ("qgate_epoch", "qgate_epoch_age_seconds", "qgate_last_handshake_age_seconds"):
        assert (name, frozenset(c.items())) not in found
    assert ("qgate_qkd_keys_available", frozenset({**c, "where": "kme"}.items())) not in found
    assert value(found, "qgate_qkd_keys_available", **c, where="prefetch") == 0


def test_collector_marks_degraded_peer_as_up_and_degraded() -> None:
    found = samples(scrape_text(sample_status(state="degraded", mode="degraded")))
    b = {"gateway": "site-a", "peer": "site-b"}
    assert value(found, "qgate_peer_up", **b) == 1
    assert value(found, "qgate_peer_degraded", **b) == 1
    assert value(found, "qgate_peer_state", **b, state="degraded") == 1


def test_collector_exports_only_whitelisted_fields_and_no_secret_text() -> None:
    status = sample_status(
        why=SECRET_MARK,
        chaining_key=bytes.fromhex(SECRET_MARK),
        traffic_key=SECRET_MARK,
        key_ids=[SECRET_MARK],
        secret_counter=123456789,
    )
    counters = status["counters"]
    assert isinstance(counters, dict)
    counters["leaked_key_int"] = int(SECRET_MARK, 16)
    status["master_key"] = SECRET_MARK
    text = scrape_text(status)
    assert SECRET_MARK not in text
    assert str(int(SECRET_MARK, 16)) not in text and "123456789" not in text
    names = {family.name for family in text_string_to_metric_families(text)}
    allowed = {name.removesuffix("_total") for name in SPECS}
    assert names <= allowed


def test_collector_ignores_malformed_status_fields() -> None:
    status: dict[str, object] = {
        "gateway": "site-a",
        "uptime_s": "soon",
        "peers": [{"name": "p", "epoch": True, "drops": "none", "tx_packets": "x"}, "junk", {"no": "name"}],
        "counters": ["not", "a", "mapping"],
    }
    found = samples(scrape_text(status))
    assert ("qgate_epoch", frozenset({"gateway": "site-a", "peer": "p"}.items())) not in found
    assert value(found, "qgate_peer_up", gateway="site-a", peer="p") == 0


def test_collector_reports_status_up_zero_when_status_call_fails() -> None:
    def broken() -> Mapping[str, object]:
        raise TimeoutError("loop busy")

    found = samples(generate_latest(build_registry(broken, process_metrics=False)).decode())
    assert found == {("qgate_status_up", frozenset()): 0.0}


def test_gateway_counter_whitelist_covers_every_gateway_and_forwarder_counter() -> None:
    names = {f.name for f in fields(GatewayStats)} | {f.name for f in fields(ForwarderStats)}
    assert names == set(GATEWAY_COUNTERS)


def test_metrics_server_answers_http_scrape_on_ephemeral_port() -> None:
    with start_metrics_server("127.0.0.1", 0, sample_status) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(server.url, timeout=5) as answer:
            assert answer.status == 200
            body = answer.read().decode()
    found = samples(body)
    assert value(found, "qgate_epoch", gateway="site-a", peer="site-b") == 42
    assert any(name == "process_resident_memory_bytes" for name, _ in found)


def test_metrics_server_stop_releases_the_port() -> None:
    server = start_metrics_server("127.0.0.1", 0, sample_status, process_metrics=False)
    port = server.address[1]
    server.stop()
    server.stop()  # idempotent
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_metrics_server_on_busy_port_raises_config_error_naming_the_address(busy_port: int) -> None:
    with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{busy_port}"):
        start_metrics_server("127.0.0.1", busy_port, sample_status)


@pytest.mark.parametrize(
    ("host", "port"), [("192.0.2.1", 9108), ("no-such-host.invalid", 9108), ("127.0.0.1", 70000)]
)
def test_metrics_server_on_unusable_address_raises_config_error(host: str, port: int) -> None:
    with pytest.raises(ConfigError, match=host.replace(".", r"\.")):
        start_metrics_server(host, port, sample_status)


def test_status_from_loop_runs_the_status_call_on_the_loop_thread() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    seen: list[threading.Thread] = []

    def status() -> Mapping[str, object]:
        seen.append(threading.current_thread())
        return sample_status()

    try:
        assert status_from_loop(loop, status)()["gateway"] == "site-a"
        assert seen == [thread]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_status_from_loop_times_out_when_the_loop_does_not_answer() -> None:
    loop = asyncio.new_event_loop()  # never run: the call is never picked up
    try:
        with pytest.raises(TimeoutError):
            status_from_loop(loop, sample_status, timeout=0.05)()
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("[::1]:9108", ("::1", 9108)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_address_accepts_host_port_and_bracketed_ipv6(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9108", ":9108", "::1:9108", "host:port", "host:70000", "host:"])
def test_parse_address_rejects_malformed_addresses(text: str) -> None:
    with pytest.raises(ConfigError, match="metrics address"):
        parse_address(text)


def test_grafana_dashboard_is_json_and_queries_only_exported_metrics() -> None:
    dashboard = json.loads((Path(__file__).parent.parent / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bqgate_[a-z_]+", expr)}
    assert used and used <= set(SPECS)
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("state", "mode", "rekeys", "drops", "throughput", "qkd", "epoch age"):
        assert topic in titles


def test_collector_reads_a_real_gateway_status_before_the_tunnel_is_up(tmp_path: Path) -> None:
    policy_text = (Path(__file__).parent.parent / "policies" / "site-a.yaml").read_text()
    (tmp_path / "site-a.yaml").write_text(policy_text)
    write_identity(tmp_path / "keys" / "site-a.key", "ml-dsa-65")
    write_identity(tmp_path / "keys" / "site-b.key", "ml-dsa-65")
    make_pki(tmp_path / "pki", kmes={"KME_A": ["10.99.0.1"]}, saes=["SAE_A", "SAE_B"])
    gateway = Gateway(load_policy(tmp_path / "site-a.yaml"), control_socket=tmp_path / "ctl.sock")
    found = samples(scrape_text(gateway.status(time.monotonic())))
    b = {"gateway": "site-a", "peer": "site-b"}
    assert value(found, "qgate_peer_state", **b, state="down") == 1
    assert value(found, "qgate_rekeys_total", **b, kind="qkd") == 0
    assert value(found, "qgate_drops_total", **b, reason="too_big") == 0
    assert value(found, "qgate_gateway_rx_not_qgate_total", gateway="site-a") == 0
