"""Unit and property tests of ``qgate.protocol.guard``: mac1, mac2, Retry, ChallengeBook, budgets.

The construction (guard.py docstring, docs/protocol.md section 2.3):

* ``K_mac1(R) = SHA-384("qgate v2 mac1" || pk_R)[:32]``, ``mac1 = HMAC-SHA-384(K_mac1, fragment)[:16]``;
* ``mac2 = HMAC-SHA-384(challenge, "qgate v2 mac2" || fragment || mac1)[:16]`` (16 zero bytes when
  the sender knows no challenge);
* ``K_retry(S) = SHA-384("qgate v2 retry" || pk_S)[:32]``; a Retry is ``head(12) || nonce(12) ||
  AES-256-GCM(K_retry, nonce, challenge, aad = head || nonce || mac1 of the answered fragment)``.

The known-answer test recomputes all of it with hashlib, hmac and ``cryptography``'s AESGCM only.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
from collections.abc import Callable

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from qgate.constants import (
    CHALLENGE_BOOK_SIZE,
    CHALLENGE_SIZE,
    FRAGMENT_COUNT_MAX,
    FRAGMENT_MAC_SIZE,
    FRAGMENT_PAYLOAD_MAX,
    FRAGMENT_TRAILER_SIZE,
    MSG_RETRY,
    RETRY_NONCE_SIZE,
    RETRY_SIZE,
)
from qgate.errors import AuthenticationError
from qgate.protocol import guard
from qgate.protocol.wire import fragment_message, parse_fragment

RECEIVER_PK = hashlib.shake_256(b"qgate guard test: receiver public key").digest(1952)
SENDER_PK = hashlib.shake_256(b"qgate guard test: sender public key").digest(1952)
OTHER_PK = hashlib.shake_256(b"qgate guard test: another public key").digest(1952)
CHALLENGE = bytes(range(32, 64))
NONCE = bytes(range(100, 112))
MESSAGE_ID = 0x0A0B0C0D
HINT = 0x01020304
SESSION_KEY = bytes(range(64, 96))


def _counter_rng() -> Callable[[int], bytes]:
    """A deterministic rng: SHA-384 of a counter, never repeating (distinct challenges)."""
    counter = itertools.count()

    def rng(n: int) -> bytes:
        return hashlib.shake_256(next(counter).to_bytes(8, "big")).digest(n)

    return rng


def _fragment(body: bytes = bytes(range(200)), msg_type: int = 1, message_id: int = MESSAGE_ID) -> bytes:
    return fragment_message(msg_type, body, message_id, HINT)[0]


def _datagram(fragment: bytes, challenge: bytes | None = CHALLENGE, pk: bytes = RECEIVER_PK) -> bytes:
    return guard.add_macs(fragment, peer_mac1_key=guard.mac1_key(pk), peer_challenge=challenge)


def _retry(datagram: bytes, challenge: bytes = CHALLENGE, pk: bytes = SENDER_PK) -> bytes:
    frag = parse_fragment(datagram)
    return guard.seal_retry(
        message_id=frag.message_id,
        index=frag.index,
        answered_mac1=guard.fragment_mac1(datagram),
        challenge=challenge,
        my_retry_key=guard.retry_key(pk),
        nonce=NONCE,
        receiver_index=HINT,
    )


fragments = st.builds(
    lambda msg_type, body, message_id: _fragment(body, msg_type, message_id),
    st.sampled_from([1, 2, 3, 4, 5, 6, 7]),
    st.binary(min_size=1, max_size=FRAGMENT_PAYLOAD_MAX),
    st.integers(0, 2**32 - 1),
)
challenges = st.binary(min_size=CHALLENGE_SIZE, max_size=CHALLENGE_SIZE)


# ----- known answers ------------------------------------------------------------------------------

KAT_FRAGMENT_HEAD = "01010001010203040a0b0c0d"  # type 1, M1, fragment 0 of 1, hint 0x01020304, id 0x0a0b0c0d
KAT_K_MAC1 = "01c46414237aaa1546452ca0932512c253e41dc598622e94daea5cb0de4835fa"
KAT_MAC1 = "63a00db56694bb72e9ceee34139e3041"
KAT_MAC2 = "622b1b52fb363fb9429fc07667fc945e"
KAT_SESSION_MAC2 = "e6904a2d914dbd2ceb137d9d741cf515"
KAT_K_RETRY = "9bdfcd9114f183e8e9c0455a907136e00ff1a96148c18efd04e0d2e47941e1fe"
KAT_RETRY = (
    "02000000010203040a0b0c0d000000006465666768696a6b6c6d6e6f"
    "c3bb7d0b329bfe8365b9d2e7ea55b6aeedd5e1ace92f75b7b3eb052930feede0"
    "ca39eaf2aef69221d03ba1b6c8450a13"
)


def test_k_mac1_k_retry_mac1_mac2_and_retry_of_a_fixed_fragment_match_an_independent_computation() -> None:
    fragment = _fragment()
    assert fragment.hex().startswith(KAT_FRAGMENT_HEAD) and len(fragment) == 12 + 200
    # Independently, with hashlib / hmac / cryptography only:
    k_mac1 = hashlib.sha384(b"qgate v2 mac1" + RECEIVER_PK).digest()[:32]
    mac1 = hmac.new(k_mac1, fragment, hashlib.sha384).digest()[:16]
    mac2 = hmac.new(CHALLENGE, b"qgate v2 mac2" + fragment + mac1, hashlib.sha384).digest()[:16]
    k_retry = hashlib.sha384(b"qgate v2 retry" + SENDER_PK).digest()[:32]
    session_mac2 = hmac.new(SESSION_KEY, b"qgate v2 mac2 session" + fragment + mac1, hashlib.sha384).digest()[
        :16
    ]
    head = (
        bytes([MSG_RETRY, 0, 0, 0])
        + HINT.to_bytes(4, "big")
        + MESSAGE_ID.to_bytes(4, "big")
        + bytes(4)
        + NONCE
    )
    retry = head + AESGCM(k_retry).encrypt(NONCE, CHALLENGE, head + mac1)
    assert (k_mac1.hex(), mac1.hex(), mac2.hex()) == (KAT_K_MAC1, KAT_MAC1, KAT_MAC2)
    assert session_mac2.hex() == KAT_SESSION_MAC2
    assert (k_retry.hex(), retry.hex()) == (KAT_K_RETRY, KAT_RETRY)
    # Production:
    assert guard.mac1_key(RECEIVER_PK) == k_mac1
    assert guard.retry_key(SENDER_PK) == k_retry
    datagram = _datagram(fragment)
    assert datagram == fragment + mac1 + mac2
    assert guard.fragment_mac1(datagram) == mac1 and guard.strip_macs(datagram) == fragment
    assert _retry(datagram) == retry and len(retry) == RETRY_SIZE
    assert guard.open_retry(retry, sent_mac1=mac1, peer_retry_key=k_retry) == CHALLENGE
    with_session = guard.add_macs(
        fragment, peer_mac1_key=k_mac1, peer_challenge=CHALLENGE, session_key=SESSION_KEY
    )
    assert with_session == fragment + mac1 + session_mac2
    assert guard.session_mac2_ok(with_session, [bytes(32), SESSION_KEY])
    assert not guard.session_mac2_ok(with_session, [CHALLENGE]) and not guard.mac2_ok(
        with_session, [SESSION_KEY]
    )
    assert not guard.session_mac2_ok(datagram, [SESSION_KEY, CHALLENGE])  # a challenge mac2 is not one


def test_retry_aad_covers_the_nonce_as_the_code_builds_it() -> None:
    """The associated data is ``head(16) || nonce(12) || mac1``: the nonce is inside it.

    (The guard.py docstring writes ``aad = Retry[..nonce] || mac1``; read like ``fragment[..mac1]``
    that would end before the nonce. The wire, and this vector, include the nonce.)
    """
    retry = bytes.fromhex(KAT_RETRY)
    k_retry, mac1 = bytes.fromhex(KAT_K_RETRY), bytes.fromhex(KAT_MAC1)
    head = retry[:16]
    with pytest.raises(InvalidTag):
        AESGCM(k_retry).decrypt(NONCE, retry[28:], head + mac1)  # aad without the nonce: no
    assert AESGCM(k_retry).decrypt(NONCE, retry[28:], retry[:28] + mac1) == CHALLENGE


def test_mac2_is_sixteen_zero_bytes_when_the_sender_knows_no_challenge() -> None:
    datagram = _datagram(_fragment(), challenge=None)
    assert datagram[-FRAGMENT_MAC_SIZE:] == bytes(FRAGMENT_MAC_SIZE)
    assert guard.mac1_ok(datagram, guard.mac1_key(RECEIVER_PK))
    assert not guard.mac2_ok(datagram, [CHALLENGE, bytes(CHALLENGE_SIZE)])


# ----- mac1 and mac2 ------------------------------------------------------------------------------


@given(fragments, challenges)
def test_mac1_depends_on_the_receivers_public_key(fragment: bytes, challenge: bytes) -> None:
    datagram = _datagram(fragment, challenge, RECEIVER_PK)
    assert guard.mac1_ok(datagram, guard.mac1_key(RECEIVER_PK))
    assert not guard.mac1_ok(datagram, guard.mac1_key(OTHER_PK))
    made_for_other = _datagram(fragment, challenge, OTHER_PK)
    assert not guard.mac1_ok(made_for_other, guard.mac1_key(RECEIVER_PK))


@given(fragments, challenges, st.data())
def test_any_bit_flip_in_a_fragment_fails_mac1_or_mac2(
    fragment: bytes, challenge: bytes, data: st.DataObject
) -> None:
    datagram = bytearray(_datagram(fragment, challenge))
    bit = data.draw(st.integers(0, 8 * len(datagram) - 1))
    datagram[bit // 8] ^= 1 << (bit % 8)
    flipped = bytes(datagram)
    mac1 = guard.mac1_ok(flipped, guard.mac1_key(RECEIVER_PK))
    mac2 = guard.mac2_ok(flipped, [challenge])
    assert not (mac1 and mac2)
    if bit // 8 < len(datagram) - FRAGMENT_MAC_SIZE:  # in the header, payload or mac1
        assert not mac1


@given(st.binary(max_size=FRAGMENT_TRAILER_SIZE + 40), st.lists(challenges, max_size=3))
def test_mac_checks_never_raise_on_any_input(data: bytes, book: list[bytes]) -> None:
    assert guard.mac1_ok(data, guard.mac1_key(RECEIVER_PK)) in (True, False)
    assert guard.mac2_ok(data, book) in (True, False)
    if len(data) <= FRAGMENT_TRAILER_SIZE:
        assert not guard.mac1_ok(data, guard.mac1_key(RECEIVER_PK))
        assert not guard.mac2_ok(data, book)


def test_mac2_verifies_under_every_challenge_in_the_book_and_fails_under_an_evicted_one() -> None:
    book = guard.ChallengeBook(_counter_rng())
    first = book.current
    for _ in range(CHALLENGE_BOOK_SIZE - 1):
        book.consume(book.current)
    held = book.all()
    assert len(held) == CHALLENGE_BOOK_SIZE and first in held
    for challenge in held:
        assert guard.mac2_ok(_datagram(_fragment(), challenge), book.all())
    book.consume(book.current)  # one more: the oldest (``first``) is evicted
    assert first not in book.all()
    assert not guard.mac2_ok(_datagram(_fragment(), first), book.all())
    assert not book.fresh(first)
    assert guard.mac2_ok(_datagram(_fragment(), book.current), book.all())


def test_mac2_fails_with_an_empty_book() -> None:
    assert not guard.mac2_ok(_datagram(_fragment()), [])


# ----- ChallengeBook ------------------------------------------------------------------------------


def test_a_challenge_echo_is_fresh_once_and_consuming_it_issues_a_new_current_one() -> None:
    book = guard.ChallengeBook(_counter_rng())
    echo = book.current
    assert len(echo) == CHALLENGE_SIZE and book.fresh(echo)
    book.consume(echo)
    assert not book.fresh(echo), "an echo is accepted once"
    assert book.current != echo and book.fresh(book.current)
    assert echo in book.all(), "mac2 still verifies under a used challenge (retransmits reach the cache)"
    before = book.all()
    book.consume(echo)  # used already: no new challenge
    book.consume(bytes(CHALLENGE_SIZE))  # never issued: nothing happens
    assert book.all() == before
    assert not book.fresh(bytes(CHALLENGE_SIZE))


@given(st.lists(st.sampled_from(["current", "oldest", "unknown", "used"]), max_size=40))
def test_the_book_never_holds_more_than_its_size_and_matches_a_model(ops: list[str]) -> None:
    book = guard.ChallengeBook(_counter_rng())
    model: list[bytes] = [book.current]  # newest first
    used: list[bytes] = []  # a list: set order of bytes depends on PYTHONHASHSEED
    for op in ops:
        echo = {
            "current": model[0],
            "oldest": model[-1],
            "unknown": b"\xee" * CHALLENGE_SIZE,
            "used": used[0] if used else b"\xee" * CHALLENGE_SIZE,
        }[op]
        was_fresh = echo in model and echo not in used
        assert book.fresh(echo) == was_fresh
        book.consume(echo)
        if was_fresh:
            used.append(echo)
            model = [book.current, *model][:CHALLENGE_BOOK_SIZE]
        assert book.all() == model
        assert len(book.all()) <= CHALLENGE_BOOK_SIZE
        assert not book.fresh(echo)


# ----- Retry --------------------------------------------------------------------------------------


def test_a_retry_round_trips_and_its_head_names_the_answered_fragment() -> None:
    datagram = _datagram(fragment_message(7, bytes(3000), 0xFFFFFFFE)[2])
    retry = _retry(datagram)
    assert len(retry) == RETRY_SIZE and retry[0] == MSG_RETRY
    assert guard.parse_retry_head(retry) == (0xFFFFFFFE, 2)
    mac1 = guard.fragment_mac1(datagram)
    assert guard.open_retry(retry, sent_mac1=mac1, peer_retry_key=guard.retry_key(SENDER_PK)) == CHALLENGE


@pytest.mark.parametrize("size", [0, 1, 24, RETRY_SIZE - 1, RETRY_SIZE + 1, 1192])
def test_parse_retry_head_rejects_any_other_length(size: int) -> None:
    assert guard.parse_retry_head((bytes([MSG_RETRY]) + bytes(size))[:size]) is None


def test_parse_retry_head_rejects_another_type_byte() -> None:
    retry = bytearray(bytes.fromhex(KAT_RETRY))
    for kind in (0x00, 0x01, 0x03, 0x04, 0xFF):
        retry[0] = kind
        assert guard.parse_retry_head(bytes(retry)) is None


@given(fragments, fragments, challenges)
def test_a_retry_opens_only_with_the_mac1_of_the_fragment_it_answers(
    a: bytes, b: bytes, challenge: bytes
) -> None:
    da, db = _datagram(a, challenge), _datagram(b, challenge)
    retry = _retry(da, challenge)
    key = guard.retry_key(SENDER_PK)
    assert guard.open_retry(retry, sent_mac1=guard.fragment_mac1(da), peer_retry_key=key) == challenge
    if guard.fragment_mac1(db) != guard.fragment_mac1(da):
        with pytest.raises(AuthenticationError):
            guard.open_retry(retry, sent_mac1=guard.fragment_mac1(db), peer_retry_key=key)


def test_a_retry_opens_only_with_its_senders_public_key() -> None:
    datagram = _datagram(_fragment())
    retry = _retry(datagram, pk=SENDER_PK)
    mac1 = guard.fragment_mac1(datagram)
    for pk in (RECEIVER_PK, OTHER_PK):
        with pytest.raises(AuthenticationError):
            guard.open_retry(retry, sent_mac1=mac1, peer_retry_key=guard.retry_key(pk))


@settings(max_examples=300)
@given(st.integers(0, 8 * RETRY_SIZE - 1), challenges)
def test_any_bit_flip_in_a_retry_raises_authentication_error(bit: int, challenge: bytes) -> None:
    datagram = _datagram(_fragment())
    retry = bytearray(_retry(datagram, challenge))
    retry[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationError):
        guard.open_retry(
            bytes(retry), sent_mac1=guard.fragment_mac1(datagram), peer_retry_key=guard.retry_key(SENDER_PK)
        )


@given(st.integers(RETRY_NONCE_SIZE + 12, 200))
def test_a_retry_of_the_wrong_length_raises_authentication_error(size: int) -> None:
    datagram = _datagram(_fragment())
    retry = _retry(datagram)
    forged = (retry + bytes(size))[:size]
    if forged == retry:
        return
    with pytest.raises(AuthenticationError):
        guard.open_retry(
            forged, sent_mac1=guard.fragment_mac1(datagram), peer_retry_key=guard.retry_key(SENDER_PK)
        )


def test_a_retry_shorter_than_head_and_nonce_raises_authentication_error() -> None:
    with pytest.raises(AuthenticationError):
        guard.open_retry(bytes(10), sent_mac1=bytes(16), peer_retry_key=guard.retry_key(SENDER_PK))


# ----- budgets ------------------------------------------------------------------------------------


def test_token_bucket_starts_full_spends_its_burst_and_refills_at_its_rate() -> None:
    bucket = guard.TokenBucket(rate=4.0, burst=16.0, now=100.0)
    assert sum(bucket.take(100.0) for _ in range(40)) == 16
    assert not bucket.take(100.2)  # 0.8 tokens
    assert bucket.take(100.25)  # 0.2 more: 1.0
    assert not bucket.take(100.25)
    assert sum(bucket.take(101.25) for _ in range(10)) == 4  # one second: rate tokens


def test_token_bucket_never_saves_more_than_its_burst_and_ignores_time_going_back() -> None:
    bucket = guard.TokenBucket(rate=10.0, burst=10.0, now=0.0)
    assert sum(bucket.take(1e6) for _ in range(50)) == 10  # a long idle time saves only the burst
    assert not bucket.take(1e6 - 100.0)  # the clock going back adds nothing
    assert not bucket.take(1e6 - 99.95)


def test_token_bucket_takes_a_cost_only_when_it_is_all_there() -> None:
    bucket = guard.TokenBucket(rate=1.0, burst=3.0, now=0.0)
    assert bucket.take(0.0, cost=2.0)
    assert not bucket.take(0.0, cost=2.0)
    assert bucket.take(0.0, cost=1.0)
    assert not bucket.take(0.0, cost=0.5)


@given(st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.1, 3.0)), max_size=60))
def test_token_bucket_grants_at_most_burst_plus_rate_times_elapsed(steps: list[tuple[float, float]]) -> None:
    rate, burst = 4.0, 16.0
    bucket = guard.TokenBucket(rate=rate, burst=burst, now=0.0)
    now, granted = 0.0, 0.0
    for dt, cost in steps:
        now += dt
        if bucket.take(now, cost):
            granted += cost
        assert granted <= burst + rate * now + 1e-9


def test_sent_macs_remembers_by_message_id_and_index_and_stays_bounded() -> None:
    sent = guard.SentMacs(limit=4)
    datagrams = [_datagram(d) for d in fragment_message(1, bytes(3 * FRAGMENT_PAYLOAD_MAX), 77)]
    for d in datagrams:
        sent.note(d)
    for index, d in enumerate(datagrams):
        assert sent.get(77, index) == guard.fragment_mac1(d)
    assert sent.get(77, 3) is None and sent.get(78, 0) is None
    noted = [(77, 0), (77, 1), (77, 2)]
    for message_id in range(100, 100 + 3 * FRAGMENT_COUNT_MAX):
        sent.note(_datagram(_fragment(message_id=message_id)))
        noted.append((message_id, 0))
        remembered = [key for key in noted if sent.get(*key) is not None]
        assert remembered == noted[-4:], "only the newest ``limit`` are kept"
    assert sent.get(77, 0) is None, "the oldest are forgotten"


def test_sent_macs_keeps_the_latest_mac1_of_a_resent_fragment() -> None:
    sent = guard.SentMacs(limit=2)
    old, new = _datagram(_fragment(), None), _datagram(_fragment(), CHALLENGE, OTHER_PK)
    sent.note(old)
    sent.note(new)
    assert sent.get(MESSAGE_ID, 0) == guard.fragment_mac1(new)
