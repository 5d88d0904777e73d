"""Issue 10's attacks, in memory with an explicit clock: none may cost a QKD key, force a downgrade or stall.

Each test runs the same two engines twice over the same simulated time, once without and once with
the attack, and compares what counts: QKD keys the master took from its KME, dec_keys calls at the
slave, signature checks, degraded epochs and the delivery of traffic sent every 100 ms.

Attackers:
* off-path spoofers that know both public identity keys (so their fragments pass mac1) but never
  see the peers' traffic: forged data records, forged Kicks and M1s, fragment junk;
* replayers of everything the real gateways sent earlier (the wire is recorded);
* an impostor holding a stolen identity key, on the path (it sees the Retries meant for the peer).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from test_protocol_peers import IDENT_M, IDENT_S, Pair

from qgate.constants import FRAGMENT_TRAILER_SIZE, MSG_DATA
from qgate.crypto.identity import IdentityKey, PeerPublicKey
from qgate.crypto.secret import Secret
from qgate.protocol import guard
from qgate.protocol.peer import FetchEncKeys, Peer, SendDatagram
from qgate.protocol.wire import classify_datagram

STEP = 0.1
"""Seconds between traffic rounds (and flood bursts)."""
RATE = 1000
"""Forged datagrams per second in each flood."""
ATTACKER = IdentityKey.generate("ml-dsa-65")


def _run(pair: Pair, seconds: float, flood: Callable[[Pair], None] = lambda p: None) -> tuple[int, int]:
    """Run ``seconds``, sending one record each way and one flood burst every STEP; (sent, delivered)."""
    sent = delivered = 0
    for _ in range(round(seconds / STEP)):
        flood(pair)
        pair.pump()
        pair.run(STEP)
        got = pair.send_both_ways(b"IEC 104 I-frame")
        sent += 2
        delivered += sum(g is not None for g in got)
    return sent, delivered


@contextmanager
def _counting_verifies() -> Iterator[list[int]]:
    """Count ML-DSA signature checks (FIPS 204 Verify) made by any engine."""
    count = [0]
    original = PeerPublicKey.verify

    def verify(self: PeerPublicKey, signature: bytes, message: bytes, *, context: bytes = b"") -> None:
        count[0] += 1
        original(self, signature, message, context=context)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PeerPublicKey, "verify", verify)
        yield count


def _pair() -> Pair:
    return Pair(interval=1.0, kem_interval=10.0, max_key_age=3.0)


def _baseline(seconds: float) -> Pair:
    pair = _pair()
    pair.run(0.3)
    _run(pair, seconds)
    return pair


def _impostor(role: str, identity: IdentityKey = ATTACKER) -> Peer:
    """An engine that speaks v2 with ``identity`` and knows the victims' real public keys (mac1)."""
    pair = _pair()
    engine = pair.master if role == "master" else pair.slave
    victim = IDENT_S if role == "master" else IDENT_M
    return Peer(engine.config, identity=identity, peer_key=victim.public_key(), rng=os.urandom, now=0.0)


def _forged_m1s(count: int) -> list[bytes]:
    """M1 fragments from an off-path impostor master (wrong key, no challenge): they pass mac1 only."""
    impostor = _impostor("master")
    out: list[bytes] = []
    while len(out) < count:
        impostor._pending = None  # a new M1 each round, with a new key_ID
        impostor.start_handshake(0.0)
        for action in impostor.take_actions():
            if isinstance(action, FetchEncKeys):
                keys = [(f"forged-{random.getrandbits(64):x}", Secret(os.urandom(32)))]
                impostor.keys_fetched(action.request_id, keys, 0.0)
        out += [a.data for a in impostor.take_actions() if isinstance(a, SendDatagram)]
    return out[:count]


def _forged_kicks(count: int) -> list[bytes]:
    impostor = _impostor("slave")
    out: list[bytes] = []
    now = 0.0
    while len(out) < count:
        now += 2.0
        impostor.send_kick(now)
        out += [a.data for a in impostor.take_actions() if isinstance(a, SendDatagram)]
    return out[:count]


def _burst(datagrams: list[bytes], to: Callable[[Pair], Peer]) -> Callable[[Pair], None]:
    """A flood of RATE datagrams per second cycling through ``datagrams``, into one engine."""
    state = {"i": 0}

    def flood(pair: Pair) -> None:
        target = to(pair)
        for _ in range(int(RATE * STEP)):
            data = datagrams[state["i"] % len(datagrams)]
            state["i"] += 1
            if classify_datagram(data) == "data":
                target.open(data, pair.now)
            else:
                target.receive_fragment(data, pair.now)

    return flood


def _to_slave(pair: Pair) -> Peer:
    return pair.slave


def _to_master(pair: Pair) -> Peer:
    return pair.master


SECONDS = 30.0


def _attacked(flood: Callable[[Pair], None]) -> tuple[Pair, tuple[int, int], int]:
    with _counting_verifies() as verifies:
        pair = _pair()
        pair.run(0.3)
        result = _run(pair, SECONDS, flood)
    return pair, result, verifies[0]


def _assert_unharmed(pair: Pair, result: tuple[int, int], base: Pair) -> None:
    sent, delivered = result
    assert delivered == sent, "traffic was lost during the flood"
    assert pair.kme.enc_keys == base.kme.enc_keys, "the flood cost QKD keys"
    assert pair.kme.dec_calls == base.kme.dec_calls, "the flood cost dec_keys calls"
    assert pair.master.stats.degraded_handshakes == pair.slave.stats.degraded_handshakes == 0
    assert pair.master.stats.rekeys_qkd == base.master.stats.rekeys_qkd
    assert pair.master.stats.rekeys_kem == base.master.stats.rekeys_kem


def _baseline_verifies() -> tuple[Pair, int]:
    with _counting_verifies() as verifies:
        base = _pair()
        base.run(0.3)
        _run(base, SECONDS)
    return base, verifies[0]


def test_forged_data_records_with_unknown_indexes_never_make_a_healthy_slave_kick() -> None:
    base, _ = _baseline_verifies()
    forged = [bytes([MSG_DATA, 0, 0, 0]) + os.urandom(28) for _ in range(64)]  # 32 bytes, as measured
    pair, result, _ = _attacked(_burst(forged, _to_slave))
    _assert_unharmed(pair, result, base)
    assert pair.slave.stats.kicks_sent == base.slave.stats.kicks_sent
    assert pair.slave.epochs.stats.drops_unknown_index >= RATE * SECONDS * 0.99


def test_forged_m1s_that_pass_mac1_are_dropped_at_mac2_before_any_signature_check() -> None:
    base, base_verifies = _baseline_verifies()
    pair, result, verifies = _attacked(_burst(_forged_m1s(200), _to_slave))
    _assert_unharmed(pair, result, base)
    assert verifies == base_verifies, "a forged M1 reached the signature check"
    assert pair.slave.stats.drops_mac2 >= RATE * SECONDS * 0.99
    assert pair.slave.stats.retries_sent <= base.slave.stats.retries_sent + 100 * SECONDS + 100  # limited


def test_forged_kicks_are_dropped_before_any_signature_check_and_start_no_handshake() -> None:
    base, base_verifies = _baseline_verifies()
    pair, result, verifies = _attacked(_burst(_forged_kicks(60), _to_master))
    _assert_unharmed(pair, result, base)
    assert verifies == base_verifies


def test_fragment_junk_and_garbage_cost_nothing() -> None:
    base, base_verifies = _baseline_verifies()
    rng = random.Random(7)
    junk = [
        bytes([1, rng.choice([1, 2, 7]), 0, 5]) + rng.randbytes(4 + 1152 + FRAGMENT_TRAILER_SIZE)
        for _ in range(32)
    ] + [rng.randbytes(rng.randrange(1, 1400)) for _ in range(32)]

    def flood(pair: Pair) -> None:
        _burst(junk, _to_slave)(pair)
        _burst(junk, _to_master)(pair)

    pair, result, verifies = _attacked(flood)
    _assert_unharmed(pair, result, base)
    assert verifies == base_verifies


def test_replayed_handshake_datagrams_cost_no_qkd_key_and_no_dec_keys() -> None:
    recorder = _pair()
    recorder.run(0.3)
    _run(recorder, 25.0)  # M1s, M2s, Kicks, R1s, ... of an earlier run
    to_slave = [
        d for d in recorder.wire if classify_datagram(d) in ("handshake", "retry") and d[1] in (1, 3, 4, 6)
    ]
    to_master = [
        d for d in recorder.wire if classify_datagram(d) in ("handshake", "retry") and d[1] in (2, 5, 7)
    ]
    assert to_slave and to_master
    base, _ = _baseline_verifies()

    def flood(pair: Pair) -> None:
        _burst(to_slave, _to_slave)(pair)
        _burst(to_master, _to_master)(pair)

    pair, result, _ = _attacked(flood)
    _assert_unharmed(pair, result, base)


def test_an_m1_replayed_to_a_restarted_slave_gets_a_retry_not_a_dec_keys_call() -> None:
    pair = _pair()
    pair.run(0.3)
    m1 = [d for d in pair.wire if classify_datagram(d) == "handshake" and d[1] == 1]
    restarted = Peer(
        pair.slave.config, identity=IDENT_S, peer_key=IDENT_M.public_key(), rng=os.urandom, now=1.0
    )
    for datagram in m1:
        restarted.receive_fragment(datagram, 1.0)
    actions = restarted.take_actions()
    assert not [a for a in actions if type(a).__name__ == "FetchDecKeys"]
    assert restarted.stats.drops_mac2 == len(m1) and restarted.stats.retries_sent >= 1


def _on_path_impostor_master(pair: Pair, impostor: Peer) -> None:
    """Route the slave's Retries to the impostor too (it sits on the path) and its output to the slave."""
    for action in impostor.take_actions():
        if isinstance(action, SendDatagram):
            pair.slave.receive_fragment(action.data, pair.now)


def test_a_stolen_master_key_cannot_force_a_degraded_epoch_while_the_slaves_kme_has_keys() -> None:
    pair = _pair()
    for engine in (pair.master, pair.slave):
        engine.config = replace(engine.config, fail_mode="pqc_only_if_qkd_down")
    pair.run(0.3)
    impostor = _impostor("master", identity=IDENT_M)  # the real master's identity key, stolen
    impostor.config = replace(impostor.config, fail_mode="pqc_only_if_qkd_down")
    original = pair.slave.take_actions

    def tap() -> list[object]:  # the impostor sees the slave's Retries (on-path)
        actions = original()
        for a in actions:
            if isinstance(a, SendDatagram) and classify_datagram(a.data) == "retry":
                impostor.receive_fragment(a.data, pair.now)
        return actions  # type: ignore[return-value]

    pair.slave.take_actions = tap  # type: ignore[method-assign]
    for _ in range(40):
        impostor.start_handshake(pair.now)
        for action in impostor.take_actions():
            if isinstance(action, FetchEncKeys):
                impostor.keys_failed(action.request_id, "KME down", pair.now)  # -> HS-D, degraded M1
        _on_path_impostor_master(pair, impostor)
        pair.pump()
        _on_path_impostor_master(pair, impostor)
        pair.run(STEP)
    assert impostor.stats.degraded_handshakes >= 1
    assert pair.slave.stats.degrade_refused >= 1
    assert pair.slave.mode == "hybrid"
    assert pair.send_both_ways(b"still hybrid") == (b"still hybrid", b"still hybrid")


def test_a_stolen_master_key_cannot_degrade_even_with_the_slaves_kme_down_because_of_the_anchor() -> None:
    pair = _pair()
    for engine in (pair.master, pair.slave):
        engine.config = replace(engine.config, fail_mode="pqc_only_if_qkd_down")
    pair.run(0.3)
    pair.slave.kme_observed(False, pair.now)  # local evidence at the slave: its KME is down
    impostor = _impostor("master", identity=IDENT_M)
    impostor.config = replace(impostor.config, fail_mode="pqc_only_if_qkd_down")
    impostor._peer_challenge = pair.slave._challenges.current  # on-path: it saw the challenge
    impostor.start_handshake(pair.now)
    for action in impostor.take_actions():
        if isinstance(action, FetchEncKeys):
            impostor.keys_failed(action.request_id, "KME down", pair.now)
    _on_path_impostor_master(pair, impostor)
    assert pair.slave.stats.auth_failures == 1  # "degraded M1 without the anchor key this side holds"
    assert pair.slave.epochs.next is None


def test_a_stolen_slave_key_kick_never_makes_the_master_degrade() -> None:
    pair = _pair()
    for engine in (pair.master, pair.slave):
        engine.config = replace(engine.config, fail_mode="pqc_only_if_qkd_down")
    pair.run(0.3)
    impostor = _impostor("slave", identity=IDENT_S)
    for t in range(30):
        impostor._peer_challenge = pair.master._challenges.current  # on-path: it saw M1/R1
        impostor.send_kick(pair.now, 1)
        for action in impostor.take_actions():
            if isinstance(action, SendDatagram):
                pair.master.receive_fragment(action.data, pair.now)
        pair.run(1.0)
        assert pair.send_both_ways(b"t%d" % t) == (b"t%d" % t, b"t%d" % t)
    assert pair.master.stats.degraded_handshakes == 0
    assert pair.master.mode == "hybrid"


def test_an_on_path_m1_flood_with_valid_mac2_is_held_to_the_signature_budget_and_ratchets_go_on() -> None:
    forged = _forged_m1s(60)

    def flood(pair: Pair) -> None:  # the attacker sees the slave's challenge: its fragments pass mac2
        challenge = pair.slave._challenges.current
        mac1_key = guard.mac1_key(IDENT_S.public_key().public_bytes())
        frags = [guard.add_macs(d[:-FRAGMENT_TRAILER_SIZE], peer_mac1_key=mac1_key, peer_challenge=challenge)
                 for d in forged]  # fmt: skip
        _burst(frags, _to_slave)(pair)

    with _counting_verifies() as verifies:
        pair = _pair()
        pair.run(0.3)
        sent, delivered = _run(pair, SECONDS, flood)
    assert delivered == sent
    assert verifies[0] <= 16 + 4 * SECONDS + 10  # EXPENSIVE_BURST + EXPENSIVE_RATE per second, both sides
    assert pair.master.stats.rekeys_qkd >= SECONDS * 0.8
    assert pair.master.stats.degraded_handshakes == 0


def test_the_engines_take_no_wall_clock_so_clock_steps_cannot_matter() -> None:
    import inspect

    params = inspect.signature(Peer.__init__).parameters
    assert "wall_ns" not in params
    for module in ("peer", "core", "master", "slave", "guard", "wire", "messages", "keyschedule", "epoch"):
        source = inspect.getsource(__import__(f"qgate.protocol.{module}", fromlist=["x"]))
        assert not re.search(r"^import time|^from time|\btime\.\w+\(|datetime", source, re.M), module


def test_an_m1_replayed_after_its_answer_left_the_cache_starts_no_resend_loop() -> None:
    pair, base = _pair(), _pair()
    for p in (pair, base):
        p.run(0.3)
        _run(p, 20.0)
    m1_ids = [d[8:12] for d in pair.wire if classify_datagram(d) == "handshake" and d[1] == 1]
    last_m1 = [d for d in pair.wire if classify_datagram(d) == "handshake" and d[8:12] == m1_ids[-1]]
    for p in (pair, base):
        _run(p, 5.0)  # five R2s later the M2 answering it has left the slave's answer cache
    mark = len(pair.wire)
    for datagram in last_m1:
        pair.slave.receive_fragment(datagram, pair.now)
    sent, delivered = _run(pair, 5.0)
    _run(base, 5.0)
    m1_after = [d for d in pair.wire[mark:] if classify_datagram(d) == "handshake" and d[1] == 1]
    base_m1 = [
        d for d in base.wire[-len(pair.wire) + mark :] if classify_datagram(d) == "handshake" and d[1] == 1
    ]
    assert delivered == sent
    assert len(m1_after) <= len(base_m1) + 6, "the master resent an old M1 in a loop"
    assert pair.kme.enc_keys == base.kme.enc_keys


def test_a_kick_replayed_later_never_makes_a_healthy_slave_kick_again() -> None:
    pair, base = _pair(), _pair()
    for p in (pair, base):
        p.run(0.3)  # the slave Kicked at start: once without the master's challenge, once with it
        _run(p, 10.0)
    kicks = [d for d in pair.wire if classify_datagram(d) == "handshake" and d[1] == 7]
    assert kicks
    before = pair.slave.stats.kicks_sent
    for datagram in kicks:
        pair.master.receive_fragment(datagram, pair.now)
    pair.pump()
    _run(pair, 5.0)
    _run(base, 5.0)
    assert pair.slave.stats.kicks_sent == before
    assert pair.kme.enc_keys == base.kme.enc_keys


def test_an_on_path_forged_retry_for_each_m1_does_not_stop_full_handshakes() -> None:
    # An observer on the path (it drops nothing) answers fragment 0 of every M1 with a Retry it made
    # from the slave's public key and the visible mac1: the master re-signs M1, but the slave's M2 for
    # the first variant must still complete the handshake.
    pair, base = _pair(), _pair()
    slave_retry_key = guard.retry_key(IDENT_S.public_key().public_bytes())
    original = pair.master.take_actions
    forged: list[bytes] = []

    def tap() -> list[object]:
        actions = original()
        for a in actions:
            if (
                isinstance(a, SendDatagram)
                and classify_datagram(a.data) == "handshake"
                and a.data[1:3] == b"\x01\x00"
            ):
                forged.append(
                    guard.seal_retry(
                        message_id=int.from_bytes(a.data[8:12], "big"),
                        index=0,
                        answered_mac1=guard.fragment_mac1(a.data),
                        challenge=os.urandom(32),
                        my_retry_key=slave_retry_key,
                        nonce=os.urandom(12),
                    )
                )
        while forged:  # the forged Retry reaches the master before its M1 reaches the slave
            pair.master.receive_fragment(forged.pop(), pair.now)
        return actions  # type: ignore[return-value]

    pair.master.take_actions = tap  # type: ignore[method-assign]
    for p in (pair, base):
        p.run(0.3)
        _run(p, 40.0)
    assert pair.master.stats.retries_received >= 3
    assert pair.master.stats.rekeys_kem >= base.master.stats.rekeys_kem - 1
    assert pair.send_both_ways(b"still up") == (b"still up", b"still up")


def test_a_failed_dec_keys_for_key_ids_the_peer_named_is_no_evidence_for_a_downgrade() -> None:
    pair = _pair()
    for engine in (pair.master, pair.slave):
        engine.config = replace(engine.config, fail_mode="pqc_only_if_qkd_down")
    pair.run(0.3)
    pair.kme.slave_down = True  # dec_keys for the key_IDs of the next R1 fails, as for bogus key_IDs
    pair.run(1.5)
    assert pair.slave.stats.qkd_failures >= 1
    assert not pair.slave._local_evidence(pair.now)  # only the slave's own status answers count
