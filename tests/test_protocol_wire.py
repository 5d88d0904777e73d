"""Wire formats: round trips, fragmentation, replay window, and parsers that raise only their own errors."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from qgate.constants import FRAGMENT_PAYLOAD_MAX, FRAGMENT_TRAILER_SIZE, REPLAY_WINDOW_SIZE
from qgate.errors import RemoteProtocolError
from qgate.protocol.messages import (
    InitConfirm,
    InitHello,
    Kick,
    RatchetConfirm,
    RatchetRequest,
    RatchetResponse,
    RespHello,
    parse_message,
)
from qgate.protocol.replay import ReplayWindow
from qgate.protocol.wire import (
    Reassembler,
    classify_datagram,
    fragment_message,
    pack_data_header,
    parse_data_header,
    parse_fragment,
)

TRAILER = bytes(FRAGMENT_TRAILER_SIZE)
"""mac1 || mac2 as zeros: framing tests (``guard`` checks the values)."""
u32 = st.integers(0, 2**32 - 1)
sae = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
key_ids = st.lists(st.uuids().map(str), min_size=1, max_size=4, unique=True).map(tuple)
b32 = st.binary(min_size=32, max_size=32)

messages = st.one_of(
    st.builds(
        InitHello,
        kem_id=st.integers(0, 255),
        x25519=st.booleans(),
        qkd_bits=st.integers(0, 65535),
        sender_index=u32,
        epoch=u32,
        random=b32,
        echo=b32,
        challenge=b32,
        anchor_id=st.binary(min_size=16, max_size=16),
        ppk_id=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64),
        master_sae=sae,
        slave_sae=sae,
        ek=st.binary(max_size=1568),
        x25519_pub=st.binary(max_size=32),
        key_ids=key_ids,
        signature=st.binary(max_size=4627),
    ),
    st.builds(
        RespHello,
        sender_index=u32,
        receiver_index=u32,
        epoch=u32,
        random=b32,
        challenge=b32,
        ct=st.binary(max_size=1568),
        x25519_pub=st.binary(max_size=32),
        signature=st.binary(max_size=4627),
        confirm=b32,
    ),
    st.builds(InitConfirm, receiver_index=u32, epoch=u32, confirm=b32),
    st.builds(
        RatchetRequest,
        receiver_index=u32,
        sender_index=u32,
        epoch=u32,
        challenge=b32,
        key_ids=key_ids,
        mac=b32,
    ),
    st.builds(RatchetResponse, receiver_index=u32, sender_index=u32, epoch=u32, confirm=b32),
    st.builds(RatchetConfirm, receiver_index=u32, epoch=u32, confirm=b32),
    st.builds(
        Kick,
        master_sae=sae,
        slave_sae=sae,
        reason=st.sampled_from([0, 1]),
        echo=b32,
        challenge=b32,
        signature=st.binary(max_size=4627),
    ),
)


@given(messages)
def test_every_message_parses_back_to_itself(msg: object) -> None:
    encoded = msg.encode()  # type: ignore[attr-defined]
    assert parse_message(type(msg).TYPE, encoded) == msg  # type: ignore[attr-defined]


@given(messages, st.integers(0, 2**32 - 1), st.randoms(use_true_random=False))
def test_fragments_reassemble_in_any_order_with_duplicates(msg: object, message_id: int, rnd: object) -> None:
    encoded = msg.encode()  # type: ignore[attr-defined]
    frags = fragment_message(type(msg).TYPE, encoded, message_id)  # type: ignore[attr-defined]
    assert all(len(f) <= 8 + FRAGMENT_PAYLOAD_MAX for f in frags)
    shuffled = frags + frags[:1]
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    reassembler = Reassembler()
    done = [r for f in shuffled if (r := reassembler.add(parse_fragment(f + TRAILER), 0.0)) is not None]
    assert done[0] == (type(msg).TYPE, encoded)  # type: ignore[attr-defined]


@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_remote_protocol_error(data: bytes) -> None:
    for msg_type in range(0, 9):
        with contextlib.suppress(RemoteProtocolError):
            parse_message(msg_type, data)
    with contextlib.suppress(RemoteProtocolError):
        parse_fragment(data)
    assert classify_datagram(data) in (None, "data", "handshake")


@given(u32, st.integers(0, 2**64 - 1))
def test_data_header_round_trip(index: int, counter: int) -> None:
    header = pack_data_header(index, counter)
    assert len(header) == 16
    assert parse_data_header(header + bytes(16)) == (index, counter)


def test_partial_messages_expire_and_are_bounded() -> None:
    frags = fragment_message(1, bytes(3000), 1)
    reassembler = Reassembler(slots=2, timeout=5.0)
    reassembler.add(parse_fragment(frags[0] + TRAILER), 0.0)
    for mid in range(2, 6):
        reassembler.add(parse_fragment(fragment_message(1, bytes(3000), mid)[0] + TRAILER), 1.0)
    assert len(reassembler) == 2
    reassembler.add(parse_fragment(fragment_message(1, bytes(3000), 9)[0] + TRAILER), 10.0)
    assert len(reassembler) == 1


class ReplayWindowModel(RuleBasedStateMachine):
    """The RFC 6479 bitmap against a plain set: accept iff new and within the window."""

    @initialize()
    def start(self) -> None:
        self.window = ReplayWindow(REPLAY_WINDOW_SIZE)
        self.seen: set[int] = set()
        self.top = -1

    @rule(delta=st.integers(-REPLAY_WINDOW_SIZE - 10, 3 * REPLAY_WINDOW_SIZE))
    def receive(self, delta: int) -> None:
        counter = max(0, self.top + delta)
        expected = counter not in self.seen and counter > self.top - REPLAY_WINDOW_SIZE
        assert self.window.accept(counter) == expected
        if expected:
            self.seen.add(counter)
            self.top = max(self.top, counter)

    @invariant()
    def highest_matches(self) -> None:
        assert self.window.highest == self.top


TestReplayWindowAgainstSetModel = ReplayWindowModel.TestCase
