"""Fail modes when QKD keys stop: fail closed, or degraded on ML-KEM alone and back to hybrid by itself."""

from __future__ import annotations

from dataclasses import replace

from test_protocol_peers import Pair

from qgate.protocol.peer import PeerEvent


def _degradable(pair: Pair, master: bool = True, slave: bool = True) -> None:
    if master:
        pair.master.config = replace(pair.master.config, fail_mode="pqc_only_if_qkd_down")
    if slave:
        pair.slave.config = replace(pair.slave.config, fail_mode="pqc_only_if_qkd_down")


def _modes(events: list[PeerEvent]) -> list[str]:
    return [str(e.detail["new"]) for e in events if e.kind == "mode_change"]


def _traffic(pair: Pair, seconds: float) -> tuple[int, int]:
    sent = delivered = 0
    for _ in range(int(seconds / 0.1)):
        pair.run(0.1)
        got = pair.send_both_ways(b"iec104 I-frame")
        sent += 2
        delivered += sum(g is not None for g in got)
    return sent, delivered


def test_pqc_only_if_qkd_down_keeps_traffic_flowing_through_a_kme_outage_then_returns_to_hybrid() -> None:
    pair = Pair(interval=1.0, kem_interval=4.0, max_key_age=3.0)
    _degradable(pair)
    pair.run(0.2)
    assert pair.master.mode == "hybrid"
    pair.kme.down = True
    sent, delivered = _traffic(pair, 30.0)
    assert delivered == sent
    assert pair.master.mode == pair.slave.mode == "degraded"
    assert pair.master.stats.degraded_handshakes >= 5
    assert pair.master.epochs.stats.drops_key_expired == 0
    pair.kme.down = False
    sent, delivered = _traffic(pair, 3.0)
    assert delivered == sent
    assert pair.master.mode == pair.slave.mode == "hybrid"
    assert _modes(pair.events).count("degraded") == 2  # one audit event per side
    assert pair.master.stats.mode_changes == 2


def test_qkd_and_pqc_stops_traffic_within_max_key_age_and_resumes_by_itself() -> None:
    pair = Pair(interval=1.0, kem_interval=4.0, max_key_age=3.0)
    pair.run(0.2)
    pair.kme.down = True
    pair.run(3.5)
    assert pair.send_both_ways(b"stopped") == (None, None)
    assert pair.master.stats.degraded_handshakes == 0
    pair.kme.down = False
    pair.run(10.0)
    assert pair.send_both_ways(b"back") == (b"back", b"back")
    assert "degraded" not in _modes(pair.events)


def test_a_fail_closed_slave_refuses_a_degraded_handshake_from_a_degradable_master() -> None:
    pair = Pair(interval=1.0, kem_interval=4.0, max_key_age=3.0)
    _degradable(pair, slave=False)
    pair.run(0.2)
    pair.kme.down = True
    pair.run(4.0)
    assert pair.slave.stats.auth_failures >= 1
    assert pair.master.mode == "hybrid"  # never installed a degraded epoch
    assert pair.send_both_ways(b"no") == (None, None)


def test_degradation_when_only_the_slaves_kme_fails_before_the_key_expires() -> None:
    pair = Pair(interval=1.0, kem_interval=4.0, max_key_age=3.0)
    _degradable(pair)
    pair.run(0.2)
    pair.kme.slave_down = True
    sent, delivered = _traffic(pair, 15.0)
    assert pair.master.stats.degraded_handshakes >= 1
    assert pair.master.epochs.stats.drops_key_expired == 0
    assert delivered >= sent - 4  # at most the records of one switch-over may miss the slave's old epoch
    pair.kme.slave_down = False
    _traffic(pair, 3.0)
    assert pair.master.mode == pair.slave.mode == "hybrid"
