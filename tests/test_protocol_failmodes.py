"""Fail modes when QKD keys stop: fail closed, or degraded on ML-KEM alone and back to hybrid by itself."""

from __future__ import annotations

from dataclasses import replace

from test_protocol_peers import Pair

from qgate.protocol.messages import RatchetConfirm, RatchetRequest, RatchetResponse
from qgate.protocol.peer import PeerEvent
from qgate.protocol.wire import classify_datagram, parse_fragment


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
    assert pair.master.mode == "closed" and "closed" in _modes(pair.events)  # audited
    pair.kme.down = False
    pair.run(10.0)
    assert pair.send_both_ways(b"back") == (b"back", b"back")
    assert "degraded" not in _modes(pair.events)
    assert pair.master.mode == pair.slave.mode == "hybrid"  # closed -> hybrid is audited too


def test_a_fail_closed_slave_refuses_a_degraded_handshake_from_a_degradable_master() -> None:
    pair = Pair(interval=1.0, kem_interval=4.0, max_key_age=3.0)
    _degradable(pair, slave=False)
    pair.run(0.2)
    pair.kme.down = True
    pair.run(4.0)
    assert pair.slave.stats.auth_failures >= 1
    assert pair.master.mode == "closed"  # never installed a degraded epoch: traffic stopped instead
    assert "degraded" not in _modes(pair.events)
    assert pair.send_both_ways(b"no") == (None, None)


def test_a_slave_kme_outage_alone_never_degrades_because_the_master_s_kme_still_has_keys() -> None:
    # Degrade only on local evidence (protocol.md 4.5): the slave's signed Kick (reason 1) makes the
    # master take fresh QKD keys, never drop them; with the master's KME healthy no epoch is degraded.
    pair = Pair(interval=1.0, kem_interval=4.0, max_key_age=3.0)
    _degradable(pair)
    pair.run(0.2)
    pair.kme.slave_down = True
    _traffic(pair, 15.0)
    assert pair.master.stats.degraded_handshakes == 0
    assert "degraded" not in _modes(pair.events)
    assert pair.master.mode == "closed"
    pair.kme.slave_down = False
    _traffic(pair, 12.0)
    assert pair.master.mode == pair.slave.mode == "hybrid"
    assert pair.send_both_ways(b"back") == (b"back", b"back")


def _msg_type(datagram: bytes) -> int | None:
    return parse_fragment(datagram).msg_type if classify_datagram(datagram) == "handshake" else None


def test_dropping_ratchet_messages_never_forces_a_degraded_handshake() -> None:
    pair = Pair(interval=1.0, kem_interval=100.0, max_key_age=3.0)
    _degradable(pair)
    pair.run(0.3)
    pair.loss = lambda d: _msg_type(d) == RatchetRequest.TYPE  # an attacker drops every R1
    _traffic(pair, 20.0)
    assert pair.master.stats.degraded_handshakes == 0
    assert "degraded" not in _modes(pair.events)


def test_a_withheld_r1_replayed_later_cannot_desynchronise_the_peers_for_long() -> None:
    pair = Pair(interval=1.0, kem_interval=60.0, max_key_age=30.0)
    pair.run(0.3)
    withheld: list[bytes] = []
    stage = {"n": 0}

    def network(d: bytes) -> bool:
        kind = _msg_type(d)
        if stage["n"] == 0 and kind == RatchetRequest.TYPE:
            if not withheld:
                withheld.append(d)
            return True  # every copy of the first R1 is withheld until the master gives up
        if stage["n"] == 1 and kind == RatchetResponse.TYPE:
            pair.slave.receive_fragment(withheld[0], pair.now)  # the old R1 arrives at the worst time
            stage["n"] = 2
        if stage["n"] == 2 and (kind == RatchetConfirm.TYPE or classify_datagram(d) == "data"):
            stage["n"] = 3
            return True  # R3 and the keepalive are lost once
        return False

    pair.loss = network
    pair.run(11.0)  # the master abandons the withheld ratchet
    stage["n"] = 1
    pair.run(1.5)
    pair.loss = lambda d: False
    _traffic(pair, 6.0)  # recovery: Kick on an unknown epoch, then a fresh handshake
    assert pair.send_both_ways(b"in sync") == (b"in sync", b"in sync")
    assert pair.slave.epochs.current is not None and pair.master.epochs.current is not None
    assert pair.slave.epochs.current.number == pair.master.epochs.current.number


def test_a_ratchet_in_flight_when_its_key_expires_becomes_a_full_handshake_at_once() -> None:
    # Fail closed (qkd_and_pqc): the slave's KME refuses dec_keys for longer than max_key_age, so the
    # master's last ratchet is still in flight when the key it ratchets from expires. The slave has
    # dropped that epoch and can never accept the ratchet; the master must not keep retransmitting
    # it until HANDSHAKE_TIMEOUT but start a full handshake, so keying returns soon after the KME.
    for offset in (0.0, 0.25, 0.5, 0.75):
        pair = Pair(interval=1.0, kem_interval=4.0, max_key_age=3.0)
        pair.run(0.2 + offset)
        pair.kme.slave_down = True
        pair.run(4.0)
        assert pair.master.mode == "closed"
        pair.kme.slave_down = False
        pair.run(2.5)  # RECOVERY in the lab drill: two intervals and a margin
        got = pair.send_both_ways(b"back")
        assert got == (b"back", b"back"), f"offset {offset}: keying not back 2.5 s after the KME"
