"""Two protocol engines in memory with an explicit clock: handshake, ratchet, make-before-break."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable
from dataclasses import replace

import pytest

from qgate.crypto.identity import IdentityKey
from qgate.crypto.kem import get_kem
from qgate.crypto.secret import Secret
from qgate.protocol import peer as peer_module
from qgate.protocol.peer import (
    FetchDecKeys,
    FetchEncKeys,
    Peer,
    PeerConfig,
    PeerEvent,
    ProbeKme,
    SendDatagram,
)
from qgate.protocol.wire import classify_datagram

IDENT_M = IdentityKey.generate("ml-dsa-65")
IDENT_S = IdentityKey.generate("ml-dsa-65")


class Kme:
    """An in-memory stand-in for the KME pair: enc_keys hands out keys that dec_keys returns once."""

    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}
        self.down = False
        self.slave_down = False  # only the slave's KME fails (dec_keys)
        self.enc_keys = 0  # QKD keys handed to the master
        self.dec_calls = 0  # dec_keys requests from the slave

    def enc(self, number: int, bits: int) -> list[tuple[str, Secret]]:
        self.enc_keys += number
        out = []
        for _ in range(number):
            key_id = str(uuid.uuid4())
            self.store[key_id] = os.urandom(bits // 8)
            out.append((key_id, Secret(self.store[key_id])))
        return out

    def dec(self, key_ids: tuple[str, ...]) -> list[tuple[str, Secret]] | None:
        """Return the keys once (ETSI 014 dec_keys), or None for unknown or used key_IDs (HTTP 400)."""
        self.dec_calls += 1
        if not all(k in self.store for k in key_ids):
            return None
        return [(k, Secret(self.store.pop(k))) for k in key_ids]


class Pair:
    """A master and a slave joined by a lossy in-memory wire."""

    def __init__(
        self,
        *,
        interval: float = 1.0,
        kem_interval: float = 4.0,
        max_key_age: float = 3.0,
        kem: str = "ml-kem-768",
        loss: Callable[[bytes], bool] = lambda d: False,
    ) -> None:
        self.now = 0.0
        self.kme = Kme()
        self.loss = loss
        self.events: list[PeerEvent] = []
        base = PeerConfig(
            name="b",
            role="master",
            my_sae="SAE_A",
            peer_sae="SAE_B",
            kem=get_kem(kem),
            x25519=True,
            qkd_bits=256,
            interval=interval,
            kem_interval=kem_interval,
            max_key_age=max_key_age,
        )
        self.master = Peer(
            base,
            identity=IDENT_M,
            peer_key=IDENT_S.public_key(),
            rng=os.urandom,
            now=0.0,
        )
        self.slave = Peer(
            replace(base, name="a", role="slave", my_sae="SAE_B", peer_sae="SAE_A"),
            identity=IDENT_S,
            peer_key=IDENT_M.public_key(),
            rng=os.urandom,
            now=0.0,
        )
        self.wire: list[bytes] = []
        self.drop_to: Callable[[bytes, Peer], bool] = lambda d, receiver: False  # loss seen by receiver

    def pump(self) -> None:
        """Deliver actions until both sides are quiet."""
        for _ in range(100):
            moved = False
            for me, other in ((self.master, self.slave), (self.slave, self.master)):
                for action in me.take_actions():
                    moved = True
                    if isinstance(action, SendDatagram):
                        self.wire.append(action.data)
                        if self.loss(action.data) or self.drop_to(action.data, other):
                            continue
                        if classify_datagram(action.data) == "data":
                            other.open(action.data, self.now)
                        else:
                            other.receive_fragment(action.data, self.now)
                    elif (isinstance(action, FetchEncKeys | FetchDecKeys) and self.kme.down) or (
                        isinstance(action, FetchDecKeys) and self.kme.slave_down
                    ):
                        me.keys_failed(action.request_id, "KME down", self.now)
                    elif isinstance(action, FetchEncKeys):
                        me.keys_fetched(
                            action.request_id, self.kme.enc(action.number, action.size_bits), self.now
                        )
                    elif isinstance(action, FetchDecKeys):
                        got = self.kme.dec(action.key_ids)
                        if got is None:
                            me.keys_failed(
                                action.request_id, "key_IDs unknown or used", self.now, rejected=True
                            )
                        else:
                            me.keys_fetched(action.request_id, got, self.now)
                    elif isinstance(action, ProbeKme):  # the KME's status answer: local evidence
                        down = self.kme.down or (me is self.slave and self.kme.slave_down)
                        me.kme_observed(not down, self.now)
                    else:
                        self.events.append(action)
            if not moved:
                return

    def run(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for peer in (self.master, self.slave):
                due = peer.next_timer()
                if due is not None and due <= self.now:
                    peer.handle_timer(self.now)
            self.pump()

    def send_both_ways(self, payload: bytes) -> tuple[bytes | None, bytes | None]:
        to_slave = self.master.seal(payload, self.now)
        to_master = self.slave.seal(payload, self.now)
        got_s = self.slave.open(to_slave, self.now) if to_slave else None
        got_m = self.master.open(to_master, self.now) if to_master else None
        self.pump()
        return got_s, got_m


def test_handshake_establishes_matching_keys_both_ways() -> None:
    pair = Pair()
    pair.run(0.2)
    assert pair.master.established
    got_s, got_m = pair.send_both_ways(b"hello through the tunnel")
    assert got_s == b"hello through the tunnel"
    assert got_m == b"hello through the tunnel"
    assert all(classify_datagram(d) in ("handshake", "retry", "data") for d in pair.wire)
    assert pair.master.stats.malformed_messages == pair.slave.stats.malformed_messages == 0


@pytest.mark.parametrize("kem", ["ml-kem-768", "ml-kem-1024"])
def test_handshake_messages_are_fragmented_below_1280_bytes(kem: str) -> None:
    pair = Pair(kem=kem)
    pair.run(0.2)
    assert pair.master.established
    assert max(len(d) for d in pair.wire) <= 1280 - 48


def test_ratchet_and_kem_rekeys_happen_on_their_timers_without_losing_packets() -> None:
    pair = Pair(interval=1.0, kem_interval=4.0)
    sent = received = 0
    for _ in range(200):  # 10 s in 50 ms steps, traffic each step
        pair.run(0.05)
        got_s, got_m = pair.send_both_ways(b"x" * 100)
        sent += 2
        received += (got_s is not None) + (got_m is not None)
    assert received == sent
    assert pair.master.stats.rekeys_qkd >= 6
    assert pair.master.stats.rekeys_kem >= 2
    assert pair.slave.stats.rekeys_qkd == pair.master.stats.rekeys_qkd


def test_packets_sealed_under_the_old_epoch_still_open_after_a_rekey() -> None:
    pair = Pair(interval=1.0)
    pair.run(0.2)
    in_flight = [pair.master.seal(b"old-%d" % i, pair.now) for i in range(5)]
    pair.run(1.1)  # a ratchet step completes
    assert pair.master.stats.rekeys_qkd == 1
    assert [pair.slave.open(d, pair.now) for d in in_flight if d] == [b"old-%d" % i for i in range(5)]


def test_handshake_completes_despite_random_fragment_loss() -> None:
    rnd = random.Random(7)
    # Keys live long here: a 30 % loss makes a 9-fragment exchange take seconds, and a key's age
    # counts from the start of its exchange.
    pair = Pair(interval=20.0, kem_interval=60.0, max_key_age=60.0, loss=lambda d: rnd.random() < 0.3)
    pair.run(15.0)
    assert pair.master.established and pair.slave.established
    assert pair.send_both_ways(b"ok") == (b"ok", b"ok")


def test_replayed_data_record_is_dropped_and_counted() -> None:
    pair = Pair()
    pair.run(0.2)
    datagram = pair.master.seal(b"once", pair.now)
    assert datagram is not None
    assert pair.slave.open(datagram, pair.now) == b"once"
    assert pair.slave.open(datagram, pair.now) is None
    assert pair.slave.epochs.stats.drops_replay == 1


def test_flipped_bit_in_a_data_record_is_dropped_and_counted() -> None:
    pair = Pair()
    pair.run(0.2)
    datagram = bytearray(pair.master.seal(b"payload", pair.now) or b"")
    datagram[20] ^= 1
    assert pair.slave.open(bytes(datagram), pair.now) is None
    assert pair.slave.epochs.stats.drops_auth == 1


def test_wrong_pinned_peer_key_keeps_the_tunnel_down() -> None:
    pair = Pair()
    pair.slave._peer_key = IdentityKey.generate("ml-dsa-65").public_key()  # not the master's key
    pair.run(3.0)
    assert not pair.master.established and not pair.slave.established
    assert pair.slave.stats.auth_failures >= 1
    assert any(e.kind == "authentication_failed" for e in pair.events)


def test_key_past_max_key_age_is_never_used_when_rekeys_fail() -> None:
    pair = Pair(interval=1.0, max_key_age=3.0)
    pair.run(0.2)
    pair.kme.down = True
    pair.run(3.5)
    assert pair.master.seal(b"late", pair.now) is None
    assert pair.master.epochs.stats.drops_key_expired == 1
    assert pair.master.stats.qkd_failures >= 2
    pair.kme.down = False
    pair.run(2.0)
    assert pair.send_both_ways(b"back") == (b"back", b"back")


def test_slave_restart_is_healed_by_a_kick_and_a_fresh_handshake() -> None:
    pair = Pair()
    pair.run(0.2)
    fresh = Peer(
        pair.slave.config,
        identity=IDENT_S,
        peer_key=IDENT_M.public_key(),
        rng=os.urandom,
        now=pair.now,
    )
    pair.slave = fresh
    datagram = pair.master.seal(b"to the restarted slave", pair.now)
    assert datagram is not None and fresh.open(datagram, pair.now) is None  # unknown epoch -> kick
    pair.run(0.5)
    assert pair.send_both_ways(b"again") == (b"again", b"again")


def test_slave_near_the_packet_limit_gets_fresh_keys_before_the_hard_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(peer_module, "AEAD_PACKET_SOFT_LIMIT", 500)
    pair = Pair(interval=3600.0, kem_interval=7200.0, max_key_age=10800.0)
    pair.slave.epochs.packet_limit = 600  # the RFC 9001 limit (2^23), scaled down
    pair.run(0.2)
    first = pair.slave.epochs.current
    delivered = 0
    for _ in range(700):
        datagram = pair.slave.seal(b"telemetry", pair.now)
        if datagram is not None and pair.master.open(datagram, pair.now) is not None:
            delivered += 1
        pair.run(0.01)
    assert pair.slave.epochs.current is not first
    assert pair.slave.epochs.stats.drops_key_exhausted == 0
    assert delivered == 700


def test_only_the_master_starts_exchanges_so_rekeys_never_collide() -> None:
    pair = Pair(interval=0.2, kem_interval=1.0)
    sent_by_slave: list[bytes] = []
    original = pair.slave.take_actions

    def spy() -> list[object]:
        actions = original()
        sent_by_slave.extend(a.data for a in actions if isinstance(a, SendDatagram))
        return actions  # type: ignore[return-value]

    pair.slave.take_actions = spy  # type: ignore[method-assign]
    pair.run(5.0)
    kinds = {d[1] for d in sent_by_slave if classify_datagram(d) == "handshake"}
    assert kinds <= {2, 5, 7}  # M2, R2 and Kick: the slave never sends M1 or R1
    assert pair.slave.stats.kicks_sent <= 2  # at start: one, and again with the challenge its Retry brought
    assert pair.master.stats.rekeys_qkd >= 10 and pair.master.stats.rekeys_kem >= 3
    assert pair.master.stats.handshake_failures == 0


def test_master_restart_is_healed_by_a_fresh_handshake_with_fresh_keys() -> None:
    pair = Pair()
    pair.run(0.2)
    old = pair.master.epochs.current
    assert old is not None
    pair.master = Peer(pair.master.config, identity=IDENT_M, peer_key=IDENT_S.public_key(), rng=os.urandom,
                       now=pair.now)  # fmt: skip
    pair.run(0.5)
    assert pair.send_both_ways(b"after restart") == (b"after restart", b"after restart")
    new = pair.master.epochs.current
    assert new is not None and new.my_index != old.my_index and new.send_counter >= 1


def test_key_ids_the_slaves_kme_refuses_reach_the_master_as_rejected_and_are_replaced() -> None:
    pair = Pair(interval=0.5)
    pair.run(0.3)
    assert pair.master.established
    real_enc = pair.kme.enc
    superseded: list[str] = []

    def enc_then_forget(number: int, bits: int) -> list[tuple[str, Secret]]:
        keys = real_enc(number, bits)
        if not superseded:  # the KME drops this key before the slave asks (a replace-on-enc KME)
            superseded.extend(k for k, _ in keys)
            for key_id, _ in keys:
                pair.kme.store.pop(key_id)
        return keys

    pair.kme.enc = enc_then_forget  # type: ignore[method-assign]
    pair.run(2.0)
    unused = [e for e in pair.events if e.kind == "qkd_keys_unused"]
    assert [(e.detail["key_ids"], e.detail["cause"]) for e in unused] == [(superseded[0], "rejected")]
    assert pair.master.epochs.current is not None and superseded[0] not in pair.master.epochs.current.key_ids
    got_s, got_m = pair.send_both_ways(b"still up")
    assert got_s == got_m == b"still up"


def test_a_slave_kme_that_cannot_serve_is_reported_as_unavailable_not_rejected() -> None:
    pair = Pair(interval=0.5)
    pair.run(0.3)
    pair.kme.slave_down = True
    pair.run(1.5)
    pair.kme.slave_down = False
    unused = [e for e in pair.events if e.kind == "qkd_keys_unused"]
    assert unused and {e.detail["cause"] for e in unused} == {"unavailable"}
