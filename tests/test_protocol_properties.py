"""Property tests of the protocol engine (hypothesis): record round trips, bit flips, hostile networks.

Two engines run in memory with an explicit clock (the ``Pair`` pattern of test_protocol_peers).
For the network tests hypothesis chooses what happens to each handshake fragment: delivered,
dropped, duplicated, or delayed (which reorders it). The schedule is bounded: after its last
entry every datagram is delivered at once, so the handshake must then complete.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from seal_log import SealLog
from test_protocol_peers import IDENT_M, IDENT_S, Pair

from qgate.crypto.kem import get_kem
from qgate.crypto.secret import Secret
from qgate.protocol import epoch as epoch_module
from qgate.protocol.epoch import Epoch, EpochSet
from qgate.protocol.peer import FetchDecKeys, FetchEncKeys, Peer, PeerConfig, SendDatagram
from qgate.protocol.wire import classify_datagram

STEP = 0.05
"""Seconds of simulated time per step of the in-memory network."""
PAYLOADS = st.binary(min_size=0, max_size=1500)
DROP_COUNTERS = ("drops_auth", "drops_malformed", "drops_unknown_index", "drops_key_expired", "drops_replay")

# ----- record round trips ------------------------------------------------------------------------


def _epoch_sets() -> tuple[EpochSet, EpochSet]:
    """Two EpochSets holding the two ends of one epoch (as master and slave would)."""
    k_m2s, k_s2m, ck = Secret(os.urandom(32)), Secret(os.urandom(32)), Secret(os.urandom(48))
    master, slave = EpochSet(max_key_age=3.0), EpochSet(max_key_age=3.0)
    master.install_current(
        Epoch(number=1, my_index=11, peer_index=22, send_key=k_m2s, recv_key=k_s2m, chaining_key=ck,
              created_at=0.0, kind="handshake", key_ids=("k",)),
        0.0,
    )  # fmt: skip
    slave.install_current(
        Epoch(number=1, my_index=22, peer_index=11, send_key=k_s2m, recv_key=k_m2s, chaining_key=ck,
              created_at=0.0, kind="handshake", key_ids=("k",)),
        0.0,
    )  # fmt: skip
    return master, slave


@pytest.fixture(scope="module")
def epoch_sets() -> tuple[EpochSet, EpochSet]:
    return _epoch_sets()


@pytest.fixture(scope="module")
def pair() -> Pair:
    """One established pair for the whole module; its clock stands still (no rekeys)."""
    established = Pair()
    established.run(0.2)
    assert established.master.established
    return established


@settings(max_examples=200, deadline=None)
@given(payload=PAYLOADS)
def test_any_payload_up_to_1500_bytes_survives_an_epoch_set_round_trip_both_ways(
    epoch_sets: tuple[EpochSet, EpochSet], payload: bytes
) -> None:
    master, slave = epoch_sets
    for sender, receiver in ((master, slave), (slave, master)):
        datagram = sender.seal(payload, 1.0)
        assert datagram is not None and len(datagram) == len(payload) + 32
        opened = receiver.open(datagram, 1.0)
        assert opened is not None and opened[0] == payload


@settings(max_examples=200, deadline=None)
@given(payload=PAYLOADS)
def test_any_payload_up_to_1500_bytes_survives_a_peer_round_trip_both_ways(
    pair: Pair, payload: bytes
) -> None:
    for sender, receiver in ((pair.master, pair.slave), (pair.slave, pair.master)):
        datagram = sender.seal(payload, pair.now)
        assert datagram is not None and classify_datagram(datagram) == "data"
        assert receiver.open(datagram, pair.now) == payload


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=200), data=st.data(), to_slave=st.booleans())
def test_any_single_bit_flip_in_a_data_datagram_is_rejected_and_counted(
    pair: Pair, payload: bytes, data: st.DataObject, to_slave: bool
) -> None:
    sender, receiver = (pair.master, pair.slave) if to_slave else (pair.slave, pair.master)
    datagram = sender.seal(payload, pair.now)
    assert datagram is not None
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1), label="bit")
    flipped = bytearray(datagram)
    flipped[bit // 8] ^= 1 << (bit % 8)
    stats = receiver.epochs.stats
    before = {name: getattr(stats, name) for name in (*DROP_COUNTERS, "rx_packets")}
    assert receiver.open(bytes(flipped), pair.now) is None
    after = {name: getattr(stats, name) for name in before}
    assert after["rx_packets"] == before["rx_packets"]
    assert sum(after[n] - before[n] for n in DROP_COUNTERS) == 1
    assert after["drops_replay"] == before["drops_replay"]  # the tag failed before the replay window
    assert receiver.open(datagram, pair.now) == payload  # the forgery moved no replay window


# ----- an in-memory network whose schedule hypothesis chooses ------------------------------------


class Kme:
    """In-memory KME pair; unknown key_IDs fail like the ETSI 014 400 answer instead of raising."""

    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}
        self.down = False

    def serve(self, peer: Peer, action: FetchEncKeys | FetchDecKeys, now: float) -> None:
        if self.down:
            peer.keys_failed(action.request_id, "KME down", now)
        elif isinstance(action, FetchEncKeys):
            keys = []
            for _ in range(action.number):
                key_id = str(uuid.uuid4())
                self.store[key_id] = os.urandom(action.size_bits // 8)
                keys.append((key_id, Secret(self.store[key_id])))
            peer.keys_fetched(action.request_id, keys, now)
        elif all(k in self.store for k in action.key_ids):
            peer.keys_fetched(
                action.request_id, [(k, Secret(self.store.pop(k))) for k in action.key_ids], now
            )
        else:
            peer.keys_failed(action.request_id, "unknown key_ID", now)


Fate = tuple[str, int]
"""What the network does to one handshake fragment: ("deliver" | "drop" | "dup", delay in steps)."""
FATES = st.lists(
    st.tuples(st.sampled_from(["deliver", "drop", "dup"]), st.integers(min_value=0, max_value=30)),
    max_size=60,
)


class Network:
    """A master and a slave; handshake fragments meet the fates of ``schedule``, data goes straight.

    Args:
        schedule: one fate per handshake fragment sent, in sending order; afterwards all are delivered.
        flip: ``(n, bit)``: flip ``bit`` (modulo the length) of the n-th handshake fragment sent.
    """

    def __init__(
        self, *, schedule: Sequence[Fate] = (), flip: tuple[int, int] | None = None, interval: float = 1.0
    ) -> None:
        self.now = 0.0
        self.kme = Kme()
        config = PeerConfig(
            name="b", role="master", my_sae="SAE_A", peer_sae="SAE_B", kem=get_kem("ml-kem-768"),
            x25519=True, qkd_bits=256, interval=interval, kem_interval=4 * interval, max_key_age=3 * interval,
        )  # fmt: skip
        self.master = Peer(
            config, identity=IDENT_M, peer_key=IDENT_S.public_key(), rng=os.urandom, now=0.0,
        )  # fmt: skip
        self.slave = Peer(
            replace(config, name="a", role="slave", my_sae="SAE_B", peer_sae="SAE_A"),
            identity=IDENT_S, peer_key=IDENT_M.public_key(), rng=os.urandom, now=0.0,
        )  # fmt: skip
        self.fates = iter(schedule)
        self.flip = flip
        self.fragments_sent = 0
        self.queue: list[tuple[float, int, Peer, bytes]] = []
        self.seq = itertools.count()

    def _route(self, receiver: Peer, data: bytes) -> None:
        if classify_datagram(data) == "data":
            receiver.open(data, self.now)
            return
        index = self.fragments_sent
        self.fragments_sent += 1
        if self.flip is not None and self.flip[0] == index:
            flipped = bytearray(data)
            bit = self.flip[1] % (len(data) * 8)
            flipped[bit // 8] ^= 1 << (bit % 8)
            data = bytes(flipped)
        fate, delay = next(self.fates, ("deliver", 0))
        copies = {"drop": 0, "deliver": 1, "dup": 2}[fate]
        for copy in range(copies):
            at = self.now + (delay + copy * (delay // 2)) * STEP
            heapq.heappush(self.queue, (at, next(self.seq), receiver, data))

    def pump(self) -> None:
        """Carry out actions and deliver what is due until both sides are quiet."""
        for _ in range(1000):
            moved = False
            while self.queue and self.queue[0][0] <= self.now:
                _, _, receiver, data = heapq.heappop(self.queue)
                receiver.receive_fragment(data, self.now)
                moved = True
            for me, other in ((self.master, self.slave), (self.slave, self.master)):
                for action in me.take_actions():
                    moved = True
                    if isinstance(action, SendDatagram):
                        self._route(other, action.data)
                    elif isinstance(action, FetchEncKeys | FetchDecKeys):
                        self.kme.serve(me, action, self.now)
            if not moved:
                return
        raise AssertionError("the engines never went quiet")

    def step(self, check: bool = True) -> None:
        self.now = round(self.now + STEP, 6)
        for peer in (self.master, self.slave):
            due = peer.next_timer()
            if due is not None and due <= self.now:
                peer.handle_timer(self.now)
        self.pump()
        if check:
            self.assert_no_wrong_session()

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / STEP)):
            self.step()

    def assert_no_wrong_session(self) -> None:
        """The master's sending epoch always exists at the slave, with the same chaining key."""
        mine = self.master.epochs.current
        if mine is None:
            return
        theirs = self.slave.epochs.by_index.get(mine.peer_index)
        assert theirs is not None, "master sends on an epoch the slave does not hold"
        assert theirs.peer_index == mine.my_index and theirs.number == mine.number
        assert theirs.chaining_key == mine.chaining_key, "master and slave hold different keys"

    def exchange(self, payload: bytes) -> tuple[bytes | None, bytes | None]:
        to_slave = self.master.seal(payload, self.now)
        got_s = self.slave.open(to_slave, self.now) if to_slave else None
        to_master = self.slave.seal(payload, self.now)
        got_m = self.master.open(to_master, self.now) if to_master else None
        self.pump()
        return got_s, got_m


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=FATES)
def test_handshake_and_ratchets_complete_under_any_bounded_loss_duplication_and_reordering(
    schedule: list[Fate],
) -> None:
    net = Network(schedule=schedule)
    for _ in range(12):  # 12 s: the schedule's fates first, then a clean network; data every second
        net.run(1.0)
        net.exchange(b"tick")
    assert net.master.established and net.slave.established
    assert net.exchange(b"settled") == (b"settled", b"settled")
    assert net.master.epochs.current is not None and net.slave.epochs.current is not None
    assert net.slave.epochs.current.number == net.master.epochs.current.number
    assert net.master.stats.rekeys_qkd >= 1
    for peer in (net.master, net.slave):
        assert peer.stats.auth_failures == 0, "an honest network caused an authentication failure"
        assert peer.epochs.stats.drops_auth == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(min_value=0, max_value=40), bit=st.integers(min_value=0, max_value=8 * 1160 - 1))
def test_a_bit_flip_anywhere_in_the_handshake_fragment_stream_never_yields_a_wrong_session(
    index: int, bit: int
) -> None:
    net = Network(flip=(index, bit))
    for _ in range(12):
        net.run(1.0)  # checks after every step that master and slave hold the same keys
        net.exchange(b"tick")
    assert net.master.established and net.slave.established
    assert net.exchange(b"settled") == (b"settled", b"settled")
    assert net.master.epochs.current is not None and net.slave.epochs.current is not None
    assert net.slave.epochs.current.number == net.master.epochs.current.number
    assert net.master.stats.rekeys_qkd >= 1


# ----- nonce uniqueness ----------------------------------------------------------------------------


@pytest.fixture
def seal_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Every record sealed during the test as ``(key fingerprint, counter)``."""
    monkeypatch.setattr(epoch_module, "RecordKey", SealLog)
    SealLog.uses = []
    yield SealLog.uses


@pytest.mark.parametrize(("loss", "ratchets", "handshakes"), [(0.0, 30, 6), (0.1, 5, 3)])
def test_counters_never_repeat_under_one_key_across_ratchets_kem_rekeys_and_outages(
    seal_log: list[tuple[str, int]], loss: float, ratchets: int, handshakes: int
) -> None:
    rnd = random.Random(7)
    pair = Pair(interval=0.5, kem_interval=2.0, max_key_age=1.5, loss=lambda d: rnd.random() < loss)
    for step in range(600):  # 30 s with a 3 s KME outage in the middle
        pair.kme.down = 200 <= step < 260
        pair.run(0.05)
        for sender, receiver in ((pair.master, pair.slave), (pair.slave, pair.master)):
            for _ in range(3):
                datagram = sender.seal(b"x" * 64, pair.now)
                if datagram is not None and not pair.loss(datagram):
                    receiver.open(datagram, pair.now)
    assert pair.master.stats.rekeys_qkd >= ratchets and pair.master.stats.rekeys_kem >= handshakes
    assert pair.master.stats.qkd_failures >= 1
    assert len(seal_log) > 1000
    assert len(set(seal_log)) == len(seal_log), "a (key, counter) pair, so a GCM nonce, was used twice"
    keys = {fingerprint for fingerprint, _ in seal_log}
    assert len(keys) > pair.master.stats.rekeys_qkd + pair.master.stats.rekeys_kem


@settings(max_examples=40, deadline=None)
@given(packets=st.lists(st.binary(max_size=300), max_size=20), limit=st.integers(min_value=0, max_value=25))
def test_sealing_a_batch_gives_the_records_of_sealing_one_by_one_and_stops_at_the_packet_limit(
    packets: list[bytes], limit: int
) -> None:
    batch_sender, receiver = _epoch_sets()
    single_sender, _ = _epoch_sets()
    for sender in (batch_sender, single_sender):
        sender.packet_limit = limit
        assert sender.current is not None
        sender.current.send_key = batch_sender.current.send_key  # type: ignore[union-attr]
    records = batch_sender.seal_batch(packets, 1.0)
    one_by_one = [r for r in (single_sender.seal(p, 1.0) for p in packets) if r is not None]
    assert records == one_by_one
    assert len(records) == min(len(packets), limit)
    assert batch_sender.stats.drops_key_exhausted == len(packets) - len(records)
    opened = [receiver.open(r, 1.0) for r in records]
    assert [o[0] if o else None for o in opened] == packets[: len(records)]
