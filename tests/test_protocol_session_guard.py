"""Attacks the session mac2, the steering hint and the Kick rules stop (issue 10, review findings).

In memory with an explicit clock, as ``test_protocol_attacks``: each attacked run is compared with
the same run without the attack.

* an on-path attacker that reads the slave's challenge and floods M1s echoing it: they pass mac2
  and draw on the signature budget, but the master's own M1 comes under a session mac2 and never
  waits for that budget, so its ML-KEM rekeys go on;
* an impostor holding the slave's stolen identity key: its "no session" Kicks buy no handshake
  while the real slave's records arrive, and on an idle link they back off;
* an off-path flood of first fragments with zero mac2 at a cold start: each draws a Retry, and so
  does the real master's, so the first handshake is not delayed;
* every message of an established session names a live index of its receiver (kernel steering).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from test_protocol_attacks import (
    ATTACKER,
    RATE,
    SECONDS,
    STEP,
    _baseline,
    _counting_verifies,
    _impostor,
    _pair,
    _run,
)
from test_protocol_peers import IDENT_M, IDENT_S, Pair

from qgate.constants import EXPENSIVE_BURST, EXPENSIVE_RATE, FRAGMENT_PAYLOAD_MAX, KICK_HANDSHAKE_MAX_INTERVAL
from qgate.crypto.identity import IdentityKey, PeerPublicKey
from qgate.crypto.secret import Secret
from qgate.protocol import guard
from qgate.protocol.messages import InitHello
from qgate.protocol.peer import FetchEncKeys, Peer, SendDatagram
from qgate.protocol.wire import MULTI_FRAGMENT_TYPES, classify_datagram, parse_fragment, steering_index

M1_TYPE = InitHello.TYPE


def _forged_m1_echoing(challenge: bytes) -> list[bytes]:
    """One M1 from an impostor master (another identity key) that echoes ``challenge``: passes mac2."""
    impostor = _impostor("master", identity=ATTACKER)
    impostor._peer_challenge = challenge
    impostor.start_handshake(0.0)
    for action in impostor.take_actions():
        if isinstance(action, FetchEncKeys):
            keys = [(f"forged-{random.getrandbits(64):x}", Secret(os.urandom(32)))]
            impostor.keys_fetched(action.request_id, keys, 0.0)
    return [a.data for a in impostor.take_actions() if isinstance(a, SendDatagram)]


def test_an_on_path_flood_of_m1s_echoing_the_fresh_challenge_cannot_starve_the_masters_kem_rekeys() -> None:
    base = _baseline(SECONDS)
    cache: dict[bytes, list[bytes]] = {}

    def flood(pair: Pair) -> None:  # reads the slave's challenge off the wire, as an on-path observer can
        challenge = pair.slave._challenges.current
        if challenge not in cache:
            cache[challenge] = _forged_m1_echoing(challenge)
        frags = cache[challenge]
        for i in range(int(RATE * STEP)):
            pair.slave.receive_fragment(frags[i % len(frags)], pair.now)

    with _counting_verifies() as verifies:
        pair = _pair()
        pair.run(0.3)
        sent, delivered = _run(pair, SECONDS, flood)
    assert delivered == sent
    assert pair.slave.stats.drops_budget > 0, "the flood did reach the signature budget"
    assert pair.master.stats.rekeys_kem == base.master.stats.rekeys_kem, "a KEM rekey was starved"
    assert pair.slave.stats.session_requests >= base.master.stats.rekeys_kem
    assert pair.kme.enc_keys == base.kme.enc_keys
    # Verifies at the slave: the budget's, and the real M1s (free under the session mac2); the
    # master's M2 checks and the baseline's own are on top.
    budget = EXPENSIVE_BURST + EXPENSIVE_RATE * (SECONDS + 0.3)
    assert verifies[0] <= budget + 3 * (base.master.stats.handshakes + 2)


def _stolen_key_kicks(pair: Pair, impostor: Peer) -> None:
    """The impostor (the slave's stolen key, on the path: it reads the master's challenge) Kicks."""
    impostor._peer_challenge = pair.master._challenges.current
    impostor._next_kick_at = 0.0
    impostor.send_kick(pair.now)  # reason 0: "no session"
    for action in impostor.take_actions():
        if isinstance(action, SendDatagram):
            pair.master.receive_fragment(action.data, pair.now)


def test_a_stolen_slave_key_buys_no_kem_handshake_while_the_real_slaves_records_arrive() -> None:
    base = _baseline(SECONDS)
    impostor = _impostor("slave", identity=IDENT_S)
    pair = _pair()
    pair.run(0.3)
    assert pair.send_both_ways(b"first") == (b"first", b"first")  # the real slave's records flow
    sent, delivered = _run(pair, SECONDS, lambda p: _stolen_key_kicks(p, impostor))
    assert delivered == sent
    assert pair.master.stats.kicks_ignored >= SECONDS / STEP * 0.9
    assert pair.master.stats.rekeys_kem == base.master.stats.rekeys_kem
    assert pair.kme.enc_keys == base.kme.enc_keys


def test_on_an_idle_link_stolen_key_kicks_back_off_to_one_handshake_per_max_interval() -> None:
    impostor = _impostor("slave", identity=IDENT_S)
    pair = Pair(interval=10.0, kem_interval=120.0, max_key_age=60.0)
    pair.run(0.3)
    before = pair.master.stats.handshakes
    seconds = 60.0
    for _ in range(round(seconds / 0.5)):  # no traffic: no record shows the real slave's session
        _stolen_key_kicks(pair, impostor)
        pair.run(0.5)
    forced = pair.master.stats.handshakes - before
    assert forced <= seconds / KICK_HANDSHAKE_MAX_INTERVAL + 3  # 2 + 4 + 8 + 8 + ... s apart
    assert pair.master.stats.kicks_ignored > 0
    assert pair.send_both_ways(b"still up") == (b"still up", b"still up")


def _zero_mac2_first_fragments(count: int) -> list[bytes]:
    """Full-size first fragments of M1s from an off-path impostor that knows no challenge (mac2 zero)."""
    impostor = _impostor("master", identity=ATTACKER)
    out: list[bytes] = []
    while len(out) < count:
        out += [d for d in _forged_m1_echoing(b"\x00" * 32)[:1]]
        impostor._pending = None
    return out


def test_a_cold_start_under_an_off_path_zero_mac2_flood_is_not_delayed() -> None:
    firsts = _zero_mac2_first_fragments(32)
    assert all(len(parse_fragment(d).payload) == FRAGMENT_PAYLOAD_MAX for d in firsts)
    clean = _pair()
    clean.run(0.3)
    clean_at = _established_after(clean, lambda p: None)
    pair = _pair()
    ids = iter(range(1, 1 << 30))

    def flood(p: Pair) -> None:  # new message_ids: each could draw its own Retry
        for i in range(int(5 * RATE * 0.05)):
            d = bytearray(firsts[i % len(firsts)])
            d[8:12] = next(ids).to_bytes(4, "big")  # (mac1 then fails: recompute like an attacker)
            p.slave.receive_fragment(_remac(bytes(d)), p.now)

    at = _established_after(pair, flood)
    assert at <= clean_at + 1.0, f"first handshake after {at:.2f} s under the flood ({clean_at:.2f} s clean)"
    assert pair.slave.stats.retries_sent >= 250  # every flooded first fragment drew its Retry


def _remac(datagram: bytes) -> bytes:
    body = guard.strip_macs(datagram)
    return guard.add_macs(
        body, peer_mac1_key=guard.mac1_key(IDENT_S.public_key().public_bytes()), peer_challenge=None
    )


def _established_after(pair: Pair, flood: object) -> float:
    start = pair.now
    while not (pair.master.established and pair.slave.established):
        assert callable(flood)
        flood(pair)
        pair.run(0.05)
        assert pair.now - start < 20.0, "no session after 20 s"
    return pair.now - start


def test_every_message_of_an_established_session_names_a_live_index_of_its_receiver() -> None:
    pair = Pair(interval=1.0, kem_interval=3.0, max_key_age=10.0)
    pair.run(0.3)
    kinds: set[int] = set()
    for receiver in (pair.master, pair.slave):
        original = receiver.receive_fragment

        def checked(
            datagram: bytes, now: float, receiver: Peer = receiver, original: object = original
        ) -> None:
            kind = parse_fragment(datagram).msg_type if classify_datagram(datagram) == "handshake" else 0
            kinds.add(kind)
            assert steering_index(datagram) in receiver.live_indexes(), (
                f"message type {kind} names no live index"
            )
            assert callable(original)
            original(datagram, now)

        receiver.receive_fragment = checked  # type: ignore[method-assign]
    for _ in range(80):
        pair.run(0.1)
        assert pair.send_both_ways(b"x") == (b"x", b"x")
    assert MULTI_FRAGMENT_TYPES & kinds >= {1, 2}, "an ML-KEM handshake ran, its M1 and M2 steered"
    assert {3, 4, 5, 6} <= kinds, "a ratchet ran"


def test_an_on_path_fragment_injected_into_a_session_m1_neither_joins_nor_corrupts_it() -> None:
    base = _baseline(SECONDS)
    pair = _pair()
    pair.run(0.3)
    original = pair.slave.receive_fragment
    injected = [0]

    def receive(datagram: bytes, now: float) -> None:
        if classify_datagram(datagram) == "handshake" and datagram[1] == 1 and datagram[2] == 1:
            body = bytearray(guard.strip_macs(datagram))
            body[20] ^= 0xFF  # same message_id and index, other bytes, under the challenge's mac2
            forged = guard.add_macs(
                bytes(body),
                peer_mac1_key=guard.mac1_key(IDENT_S.public_key().public_bytes()),
                peer_challenge=pair.slave._challenges.current,
            )
            injected[0] += 1
            original(forged, now)
        original(datagram, now)

    pair.slave.receive_fragment = receive  # type: ignore[method-assign]
    sent, delivered = _run(pair, SECONDS)
    assert injected[0] > 0 and delivered == sent
    assert pair.master.stats.rekeys_kem == base.master.stats.rekeys_kem
    assert pair.slave.stats.session_requests == base.slave.stats.session_requests
    assert pair.slave.stats.auth_failures == 0


def test_a_spoofed_mac2_flood_is_reported_once_per_interval_with_its_count() -> None:
    firsts = _zero_mac2_first_fragments(8)
    pair = _pair()
    pair.run(0.3)
    ids = iter(range(1, 1 << 30))
    start = len(pair.events)
    for _ in range(200):  # 20 s, 50 zero-mac2 first fragments per 0.1 s
        for i in range(50):
            d = bytearray(firsts[i % len(firsts)])
            d[8:12] = next(ids).to_bytes(4, "big")
            pair.slave.receive_fragment(_remac(bytes(d)), pair.now)
        pair.run(0.1)
    reports = [e for e in pair.events[start:] if e.kind == "unauth_mac2"]
    assert 4 <= len(reports) <= 5  # one per STALE_REPORT_INTERVAL (5 s), not one per datagram
    counted = sum(int(e.detail["count"]) for e in reports)
    assert 10_000 - 50 * 50 <= counted <= pair.slave.stats.drops_mac2  # the last interval's tail may wait
    assert all("count" in e.detail and isinstance(e.detail["reason"], str) for e in reports)
    assert pair.send_both_ways(b"still up") == (b"still up", b"still up")


def test_a_master_that_starts_before_the_slave_listens_completes_on_the_slaves_first_kick() -> None:
    pair = _pair()

    def lost(d: bytes) -> bool:  # the master's first M1 goes out before the slave's gateway is up
        is_m1 = classify_datagram(d) == "handshake" and parse_fragment(d).msg_type == M1_TYPE
        return pair.now < 0.2 and is_m1

    pair.loss = lost
    pair.run(5.0)
    assert pair.master.established
    assert pair.master.stats.handshake_failures == 0  # the first M1 is re-signed for the slave's challenge
    assert pair.kme.enc_keys == pair.master.stats.handshakes + pair.master.stats.rekeys_qkd  # none wasted
    assert pair.slave.stats.stale_challenges <= 1


def _flooded_control_socket(flooded: Peer) -> Callable[[bytes, Peer], bool]:
    """A drop rule: ``flooded``'s control socket is full, so only steered datagrams reach it.

    A record or fragment reaches the data socket (sockfilter.py) only with a live index at bytes 4..7.
    """

    def drop(datagram: bytes, receiver: Peer) -> bool:
        return receiver is flooded and steering_index(datagram) not in flooded.live_indexes()

    return drop


def _restarted(peer: Peer, identity: IdentityKey, peer_key: PeerPublicKey, now: float) -> Peer:
    return Peer(peer.config, identity=identity, peer_key=peer_key, rng=os.urandom, now=now)


@pytest.mark.parametrize("restarting", ["slave", "master"])
def test_a_restarted_peer_gets_a_session_at_once_while_the_other_sides_control_socket_is_flooded(
    restarting: str,
) -> None:
    pair = Pair(interval=1.0, kem_interval=30.0, max_key_age=60.0)  # the old key would last a minute
    pair.run(0.3)
    if restarting == "slave":
        pair.slave = fresh = _restarted(pair.slave, IDENT_S, IDENT_M.public_key(), pair.now)
        survivor = pair.master
    else:
        pair.master = fresh = _restarted(pair.master, IDENT_M, IDENT_S.public_key(), pair.now)
        survivor = pair.slave
    pair.drop_to = _flooded_control_socket(survivor)
    start = pair.now
    for _ in range(100):
        datagram = survivor.seal(b"traffic to the restarted peer", pair.now)
        assert datagram is not None
        fresh.open(datagram, pair.now)  # unknown index: the restarted side learns its old one
        pair.run(0.05)
        if fresh.has_session(pair.now) and pair.send_both_ways(b"x") == (b"x", b"x"):
            break
    assert pair.now - start <= 2.5, f"restarted {restarting} waited {pair.now - start:.2f} s"
    assert pair.master.stats.handshake_failures == 0


def test_every_retry_for_a_masters_m1_names_an_index_live_at_the_master() -> None:
    pair = Pair(interval=1.0, kem_interval=2.0, max_key_age=3.0)
    pair.run(0.3)
    pair.slave = _restarted(pair.slave, IDENT_S, IDENT_M.public_key(), pair.now)  # no challenge of ours
    seen: list[bool] = []

    def record(datagram: bytes, receiver: Peer) -> bool:
        if classify_datagram(datagram) == "retry" and receiver is pair.master:  # (answers its M1)
            seen.append(steering_index(datagram) in receiver.live_indexes())
        return False

    pair.drop_to = record
    pair.run(8.0)
    assert seen and all(seen), seen
    assert pair.send_both_ways(b"x") == (b"x", b"x")


def test_a_replayed_r2_or_r1_draws_at_most_one_cached_answer_per_half_second() -> None:
    from qgate.protocol.messages import RatchetRequest, RatchetResponse

    pair = _pair()
    pair.run(1.5)  # one ratchet step done
    r1 = [d for d in pair.wire if classify_datagram(d) == "handshake" and d[1] == RatchetRequest.TYPE][-1:]
    r2 = [d for d in pair.wire if classify_datagram(d) == "handshake" and d[1] == RatchetResponse.TYPE][-1:]
    assert r1 and r2
    pair.master.take_actions(), pair.slave.take_actions()
    sent = {"master": 0, "slave": 0}
    for _ in range(1000):  # 1000 replays of each in 0.1 s (on-path: they reach the data socket)
        pair.master.receive_fragment(r2[0], pair.now)
        pair.slave.receive_fragment(r1[0], pair.now)
        sent["master"] += sum(isinstance(a, SendDatagram) for a in pair.master.take_actions())
        sent["slave"] += sum(isinstance(a, SendDatagram) for a in pair.slave.take_actions())
        pair.now += 0.0001
    assert sent["master"] <= 1 and sent["slave"] <= 1, sent
    assert pair.send_both_ways(b"still up") == (b"still up", b"still up")


def test_spoofed_garbage_never_hides_the_local_reason_the_tunnel_is_down() -> None:
    pair = _pair()
    pair.kme.down = True  # the master's own KME: a local problem
    pair.run(2.0)
    state, why = pair.master.state(pair.now)
    assert state == "down" and why.startswith(("qkd_request_failed", "handshake_abandoned")), why
    junk = bytearray(_remac(_zero_mac2_first_fragments(1)[0]))
    junk[1] = 3  # an M3 (single fragment: no mac2 needed) with a body that cannot parse
    before = pair.master.stats.malformed_messages + pair.master.stats.auth_failures
    for _ in range(50):
        pair.master.receive_fragment(_remac(bytes(junk[:60])), pair.now)
    assert pair.master.stats.malformed_messages + pair.master.stats.auth_failures > before
    assert pair.master.state(pair.now)[1] == why
