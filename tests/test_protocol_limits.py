"""Key-use limits in two engines in memory: packet limit, max key age, and fail-closed without QKD keys.

The packet limits are scaled down by monkeypatching (the real ones, 2^23 and 2^23 - 2^20 records per
key after RFC 9001 section 6.6, would take minutes to reach). The clock is explicit, as in
``test_protocol_peers.Pair``, which these tests reuse.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from seal_log import SealLog
from test_protocol_peers import Pair

from qgate.policy import PeerPolicy
from qgate.protocol import epoch as epoch_module
from qgate.protocol import peer as peer_module
from qgate.protocol.peer import FETCH_BACKOFF_MAX, Peer
from qgate.protocol.wire import classify_datagram, parse_data_header

SOFT_LIMIT = 400
HARD_LIMIT = 500
SLOW_REKEY = {"interval": 3600.0, "kem_interval": 7200.0, "max_key_age": 10800.0}


@pytest.fixture
def seal_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Every record sealed during the test, as ``(key fingerprint, counter)`` in sealing order."""
    monkeypatch.setattr(epoch_module, "RecordKey", SealLog)
    SealLog.uses = []
    yield SealLog.uses


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scale the soft packet limit down: the master starts a rekey at SOFT_LIMIT records."""
    monkeypatch.setattr(peer_module, "AEAD_PACKET_SOFT_LIMIT", SOFT_LIMIT)


def _limited_pair() -> Pair:
    """A pair whose timers never rekey within the test, with the hard packet limit scaled down."""
    pair = Pair(**SLOW_REKEY)
    for peer in (pair.master, pair.slave):
        peer.epochs.packet_limit = HARD_LIMIT
    return pair


def _keys_in_use_order(uses: list[tuple[str, int]]) -> list[str]:
    """The keys of ``uses`` in the order they were first used, one entry per run of uses."""
    runs: list[str] = []
    for fingerprint, _ in uses:
        if not runs or runs[-1] != fingerprint:
            runs.append(fingerprint)
    return runs


def _seal_deliver(pair: Pair, sender: Peer, receiver: Peer, payload: bytes) -> bool:
    datagram = sender.seal(payload, pair.now)
    return datagram is not None and receiver.open(datagram, pair.now) == payload


@pytest.mark.usefixtures("small_limits")
def test_master_key_reaching_the_soft_packet_limit_is_rekeyed_before_the_hard_limit(
    seal_log: list[tuple[str, int]],
) -> None:
    pair = _limited_pair()
    pair.run(0.2)
    delivered = sent = 0
    for _ in range(600):  # 3000 records from the master: six keys' worth at the scaled limit
        for _ in range(5):
            sent += 1
            delivered += _seal_deliver(pair, pair.master, pair.slave, b"steady")
        pair.run(0.01)
    stats = pair.master.epochs.stats
    assert stats.drops_key_exhausted == 0
    assert delivered == sent
    assert pair.master.stats.rekeys_qkd >= 5
    master_keys = {pair.master.epochs.current.send_key.fingerprint} if pair.master.epochs.current else set()
    per_key: dict[str, int] = {}
    for fingerprint, _ in seal_log:
        per_key[fingerprint] = per_key.get(fingerprint, 0) + 1
    assert max(per_key.values()) <= HARD_LIMIT
    order = _keys_in_use_order(seal_log)
    assert len(order) == len(set(order)), "a replaced key was used again"
    assert master_keys <= set(order)


@pytest.mark.usefixtures("small_limits")
def test_key_at_the_hard_packet_limit_is_never_used_again_while_no_qkd_key_is_available(
    seal_log: list[tuple[str, int]],
) -> None:
    pair = _limited_pair()
    pair.run(0.2)
    first = pair.master.epochs.current
    assert first is not None
    pair.kme.down = True
    results = []
    for _ in range(HARD_LIMIT + 100):
        results.append(_seal_deliver(pair, pair.master, pair.slave, b"steady"))
        pair.run(0.01)
    stats = pair.master.epochs.stats
    assert pair.master.epochs.current is first  # no new epoch without a QKD key: fail closed
    assert results.count(True) == HARD_LIMIT - 1  # the keepalive after the handshake took counter 0
    assert not any(results[HARD_LIMIT:])
    assert stats.drops_key_exhausted == 101
    assert pair.master.stats.qkd_failures >= 1
    assert max(counter for _, counter in seal_log) == HARD_LIMIT - 1

    pair.kme.down = False
    pair.run(FETCH_BACKOFF_MAX + 1.0)
    assert pair.master.epochs.current is not first
    assert _seal_deliver(pair, pair.master, pair.slave, b"back")
    assert _seal_deliver(pair, pair.slave, pair.master, b"back")
    order = _keys_in_use_order(seal_log)
    assert len(order) == len(set(order)), "the exhausted key was used again"


def test_key_past_max_key_age_is_never_used_while_rekeys_fail_and_traffic_resumes_when_keys_return() -> None:
    max_age = 3.0
    pair = Pair(interval=1.0, kem_interval=4.0, max_key_age=max_age)
    pair.run(0.2)
    pair.kme.down = True
    held_back: list[tuple[Peer, bytes]] = []
    for _ in range(120):  # 6 s of outage, traffic both ways every 50 ms
        pair.run(0.05)
        for sender, receiver in ((pair.master, pair.slave), (pair.slave, pair.master)):
            datagram = sender.seal(b"during the outage", pair.now)
            epoch = sender.epochs.current
            if datagram is None:
                continue
            assert epoch is not None
            assert parse_data_header(datagram)[0] == epoch.peer_index
            assert pair.now - epoch.created_at <= max_age, "sealed under a key past max_key_age"
            held_back.append((receiver, datagram))
            assert receiver.open(datagram, pair.now) is not None
    assert pair.master.stats.rekeys_qkd == pair.master.stats.rekeys_kem == 0
    assert pair.master.stats.qkd_failures >= 3
    for peer in (pair.master, pair.slave):
        assert peer.seal(b"late", pair.now) is None
        assert peer.epochs.stats.drops_key_expired >= 1
    # A record sealed in time but arriving after the key's age is refused by the receiver too.
    receiver, datagram = held_back[-1]
    expired_before = receiver.epochs.stats.drops_key_expired
    assert receiver.open(datagram, pair.now) is None
    assert receiver.epochs.stats.drops_key_expired == expired_before + 1

    pair.kme.down = False
    waited = 0.0
    while not (
        _seal_deliver(pair, pair.master, pair.slave, b"back")
        and _seal_deliver(pair, pair.slave, pair.master, b"back")
    ):
        assert waited < FETCH_BACKOFF_MAX + 2.0, "traffic did not resume after the KME came back"
        pair.run(0.1)
        waited += 0.1


def test_without_fresh_qkd_keys_the_default_fail_mode_fails_closed() -> None:
    assert PeerPolicy.fail_mode == "qkd_and_pqc"
    pair = Pair(interval=1.0, kem_interval=4.0, max_key_age=3.0)
    pair.run(0.2)
    pair.kme.down = True
    wire_before = len(pair.wire)
    pair.run(8.0)
    handshake_sent = [  # M1 or R1: the slave may Kick once its keys expired, the master sends nothing
        d for d in pair.wire[wire_before:] if classify_datagram(d) == "handshake" and d[1] in (1, 4)
    ]
    assert handshake_sent == [], "a handshake or ratchet message went out without a QKD key"
    assert pair.send_both_ways(b"no qkd, no traffic") == (None, None)
    assert pair.master.epochs.stats.drops_key_expired >= 1
    assert pair.slave.epochs.stats.drops_key_expired >= 1
