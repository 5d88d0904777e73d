"""qgate's own recorded protocol vectors, version 2 (tests/vectors_qgate/handshake_ratchet_v2.json).

The recording (written by ``.venv/bin/python tests/qgate_recorder.py --write``) holds every datagram
of a start with the challenge exchange (the master's first M1 and the slave's first Kick carry no
mac2 and are answered by Retries, then resent), a full handshake (M1, M2, M3), one QKD ratchet
step (R1, R2, R3) and 3 data packets each way on each epoch, made by two production engines with
fixed randomness, clock and QKD keys.

- Replay: the engines must reproduce every datagram byte for byte. Any change of the wire format,
  key schedule or engine behaviour fails here; re-record only for an intentional, documented change.
- Interop: production providers (``cryptography`` ML-KEM and ML-DSA, ``RecordKey``, AES-GCM in
  ``guard.open_retry``) must decapsulate, verify and open what the test-only kyber-py /
  dilithium-py providers and the recorded engines produced.
- Guard (docs/protocol.md section 2.3): the recorded K_mac1/K_retry are ``guard.mac1_key`` /
  ``guard.retry_key`` of the recorded public keys, every fragment's mac1 and mac2 verify with
  ``guard.mac1_ok`` / ``guard.mac2_ok``, each Retry opens only for the fragment it answers, and
  every challenge on the wire was drawn by its sender.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives.hashes import SHA384
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from qgate_recorder import (
    MASTER_TO_SLAVE,
    PUBLIC_DERIVED,
    RERECORD_HINT,
    ROLES,
    SLAVE_TO_MASTER,
    Datagram,
    DerivedKeys,
    Inputs,
    Sent,
    data_indexes,
    derive_keys,
    last,
    load,
    messages,
    receiver_of,
    record,
    retries,
    run_scenario,
    sender_of,
    wire_challenges,
)
from testproviders import KyberPyMlKem, ScriptedRng

from qgate.constants import DATA_HEADER_SIZE, FRAGMENT_MAC_SIZE, RETRY_SIZE
from qgate.crypto.aead import RecordKey
from qgate.crypto.identity import PeerPublicKey
from qgate.crypto.kem import CryptographyMlKem
from qgate.crypto.secret import Secret
from qgate.errors import AuthenticationError
from qgate.protocol import guard
from qgate.protocol import keyschedule as ks
from qgate.protocol.messages import (
    NO_ANCHOR,
    NO_CHALLENGE,
    InitConfirm,
    InitHello,
    Kick,
    RatchetConfirm,
    RatchetRequest,
    RatchetResponse,
    RespHello,
)
from qgate.protocol.wire import MULTI_FRAGMENT_TYPES, classify_datagram, parse_data_header, parse_fragment

DOC: Final = load()
INPUTS: Final = Inputs.from_json(DOC["inputs"])
DRAWS: Final[dict[str, str]] = DOC["draws"]
GUARD: Final[dict[str, dict[str, Any]]] = DOC["guard"]
RECORDED: Final = [Datagram.from_json(item) for item in DOC["datagrams"]]
SENT: Final = messages(RECORDED)
NO_MAC: Final = bytes(FRAGMENT_MAC_SIZE)


def _derived() -> DerivedKeys:
    return derive_keys(INPUTS, DRAWS, RECORDED)


def _key(role: str, name: str) -> bytes:
    return bytes.fromhex(GUARD[role][name])


def _challenges(role: str) -> list[bytes]:
    return [bytes.fromhex(c) for c in GUARD[role]["challenges"]]


def _public(role: str) -> PeerPublicKey:
    return PeerPublicKey.from_raw(INPUTS.identity_alg, bytes.fromhex(DRAWS[f"{role}_ml_dsa_public_key"]))


def _all(name: str) -> list[Sent]:
    return [s for s in SENT if s.name == name]


def _fragments() -> list[tuple[int, Datagram]]:
    return [(i, d) for i, d in enumerate(RECORDED) if classify_datagram(d.data) == "handshake"]


def _open(retry_at: int, answered_at: int) -> bytes:
    """Open a recorded Retry with the production guard, as the fragment's sender does."""
    return guard.open_retry(
        RECORDED[retry_at].data,
        sent_mac1=guard.fragment_mac1(RECORDED[answered_at].data),
        peer_retry_key=_key(sender_of(RECORDED[retry_at].direction), "k_retry"),
    )


class _Replay:
    """Compares each datagram the engines send with the next recorded one."""

    def __init__(self, expected: list[Datagram]) -> None:
        self.expected = expected
        self.position = 0

    def __call__(self, got: Datagram) -> None:
        i = self.position
        self.position += 1
        if i >= len(self.expected):
            pytest.fail(
                f"the engines sent datagram #{i} ({got.direction} {got.what}) beyond the recording. "
                + RERECORD_HINT
            )
        want = self.expected[i]
        if (got.direction, got.what, got.data) == (want.direction, want.what, want.data):
            return
        offset = next(
            (n for n, (a, b) in enumerate(zip(got.data, want.data, strict=False)) if a != b),
            min(len(got.data), len(want.data)),
        )
        pytest.fail(
            f"datagram #{i}: recorded {want.direction} {want.what} ({len(want.data)} bytes), engines sent "
            f"{got.direction} {got.what} ({len(got.data)} bytes), first difference at byte {offset}. "
            "The wire format, the key schedule or the engine changed. " + RERECORD_HINT
        )


# ----- what the recording holds -----------------------------------------------------------------


def test_recording_has_the_challenge_exchange_handshake_one_ratchet_step_and_three_packets_each_way() -> None:
    names = {s.name for s in SENT}
    assert {"M1", "M2", "M3", "R1", "R2", "R3"} <= names <= {"M1", "M2", "M3", "R1", "R2", "R3", "Kick"}
    assert len(_all("M1")) >= 2, "the first M1 must be answered by a Retry and resent"
    for name in ("M3", "R1", "R2", "R3"):  # single fragments (wire.SINGLE_FRAGMENT_TYPES)
        assert all(len(s.positions) == 1 for s in _all(name)), name
    whats = [d.what for d in RECORDED]
    assert whats.count("keepalive") == 2
    for direction in (MASTER_TO_SLAVE, SLAVE_TO_MASTER):
        assert sum(d.what == "data" and d.direction == direction for d in RECORDED) == 6
    assert retries(RECORDED), "no Retry recorded"
    assert all(len(RECORDED[at].data) == RETRY_SIZE for at, _ in retries(RECORDED))


def test_vector_file_was_recorded_from_the_recorder_defaults() -> None:
    assert Inputs() == INPUTS, "the file's inputs differ from qgate_recorder.Inputs(); " + RERECORD_HINT
    assert "wall_ns" not in DOC["inputs"], "version 2 reads no wall clock"


def test_replay_reproduces_every_recorded_datagram_byte_for_byte() -> None:
    replay = _Replay(RECORDED)
    run_scenario(INPUTS, replay)
    assert replay.position == len(RECORDED), (
        f"the engines sent {replay.position} datagrams, the recording has {len(RECORDED)}. " + RERECORD_HINT
    )


def test_recorded_draws_guard_values_and_derived_keys_follow_from_the_inputs() -> None:
    fresh = record(INPUTS)
    assert fresh["draws"] == DRAWS, "provider rng draws changed. " + RERECORD_HINT
    assert fresh["engine_draws"] == DOC["engine_draws"], "engine rng draws changed. " + RERECORD_HINT
    assert fresh["guard"] == GUARD, "mac keys or challenges changed. " + RERECORD_HINT
    assert fresh["derived"] == DOC["derived"], "derived keys changed. " + RERECORD_HINT


def test_engine_draws_are_the_shake256_streams_of_their_labels() -> None:
    for role in ROLES:
        drawn = [bytes.fromhex(v) for v in DOC["engine_draws"][role]]
        stream = hashlib.shake_256(INPUTS.rng_labels[f"{role} engine"].encode()).digest(sum(map(len, drawn)))
        assert b"".join(drawn) == stream, role


# ----- challenges, mac1, mac2 and Retries (guard.py) --------------------------------------------


def test_recorded_mac1_and_retry_keys_are_the_production_guard_keys_of_the_recorded_public_keys() -> None:
    for role in ROLES:
        public = bytes.fromhex(DRAWS[f"{role}_ml_dsa_public_key"])
        assert guard.mac1_key(public) == _key(role, "k_mac1")
        assert guard.retry_key(public) == _key(role, "k_retry")
    assert _key("master", "k_mac1") != _key("slave", "k_mac1")


def test_every_fragment_carries_the_receivers_mac1_and_not_one_for_the_sender() -> None:
    for _, d in _fragments():
        assert guard.mac1_ok(d.data, _key(receiver_of(d.direction), "k_mac1")), d.what
        assert not guard.mac1_ok(d.data, _key(sender_of(d.direction), "k_mac1")), d.what


def _session_mac2_keys() -> list[bytes]:
    """K_sm of each recorded epoch, computed here from its chaining key (HKDF-Expand-SHA384, RFC 5869)."""
    keys = []
    for section in ("handshake", "ratchet"):
        ck = bytes.fromhex(DOC["derived"][section]["ck"])
        keys.append(HKDFExpand(SHA384(), 32, b"qgate v2 session mac2").derive(ck))
    return keys


def test_session_mac2_key_is_ks_sm_of_the_chaining_key() -> None:
    ck = Secret(bytes.fromhex(DOC["derived"]["handshake"]["ck"]))
    assert ks.session_mac2_key(ck) == _session_mac2_keys()[0]


def test_mac2_is_a_challenge_or_session_mac2_of_the_receiver_or_zero_and_answered_by_a_retry() -> None:
    answered = {fragment for _, fragment in retries(RECORDED)}
    zero, session = set(), set()
    session_keys = _session_mac2_keys()
    for at, d in _fragments():
        if d.data[-FRAGMENT_MAC_SIZE:] == NO_MAC:
            zero.add(at)
            continue
        if guard.session_mac2_ok(d.data, session_keys):  # sent by a side that held an epoch
            session.add(at)
            assert not guard.mac2_ok(d.data, _challenges(receiver_of(d.direction))), f"#{at} {d.what}"
            continue
        assert guard.mac2_ok(d.data, _challenges(receiver_of(d.direction))), f"#{at} {d.what}"
        assert not guard.mac2_ok(d.data, _challenges(sender_of(d.direction))), f"#{at} {d.what}"
    multi = {at for at, d in _fragments() if parse_fragment(d.data).msg_type in MULTI_FRAGMENT_TYPES}
    assert zero, "no fragment was sent before its sender knew a challenge"
    assert session, "no fragment was sent under a session mac2"
    first = {at for at, d in _fragments() if parse_fragment(d.data).index == 0}
    assert answered <= zero & multi & first, "a Retry answers only a first M1/M2/Kick fragment without mac2"
    for s in SENT:  # every such request got at least one Retry (one per message is engine policy)
        if s.name in ("M1", "M2", "Kick") and set(s.positions) <= zero:
            assert set(s.positions) & answered, f"{s.name} #{s.positions[0]} got no Retry"


def test_every_retry_opens_only_with_the_mac1_of_the_fragment_it_answers_and_its_senders_key() -> None:
    for retry_at, answered_at in retries(RECORDED):
        role = sender_of(RECORDED[retry_at].direction)
        assert _open(retry_at, answered_at) in _challenges(role)
        data = RECORDED[retry_at].data
        other_mac1 = next(
            guard.fragment_mac1(d.data)
            for i, d in _fragments()
            if guard.fragment_mac1(d.data) != guard.fragment_mac1(RECORDED[answered_at].data)
        )
        with pytest.raises(AuthenticationError):
            guard.open_retry(data, sent_mac1=other_mac1, peer_retry_key=_key(role, "k_retry"))
        other_role = "slave" if role == "master" else "master"
        with pytest.raises(AuthenticationError):
            guard.open_retry(
                data,
                sent_mac1=guard.fragment_mac1(RECORDED[answered_at].data),
                peer_retry_key=_key(other_role, "k_retry"),
            )


def _retry_for(sent: Sent) -> bytes:
    """The challenge brought by the first Retry answering one of ``sent``'s fragments."""
    found = [(r, f) for r, f in retries(RECORDED) if f in sent.positions]
    assert found, f"{sent.name} #{sent.positions[0]} got no Retry"
    return _open(*found[0])


def test_the_first_m1_has_no_echo_and_its_resend_echoes_the_challenge_its_retry_brought() -> None:
    first, resent = _all("M1")[0], _all("M1")[1]
    assert isinstance(first.msg, InitHello) and isinstance(resent.msg, InitHello)
    assert first.msg.echo == NO_CHALLENGE
    assert all(RECORDED[at].data[-FRAGMENT_MAC_SIZE:] == NO_MAC for at in first.positions)
    assert resent.msg.echo == _retry_for(first) == _challenges("slave")[0]
    assert resent.message_id != first.message_id
    same = ("sender_index", "epoch", "ek", "x25519_pub", "key_ids", "challenge", "anchor_id", "ppk_id")
    for name in same:  # the resend keeps its keys and key_IDs; only random, echo and signature change
        assert getattr(resent.msg, name) == getattr(first.msg, name), name
    assert resent.msg.random != first.msg.random
    assert last(SENT, "M1") is _all("M1")[-1]


def test_a_kick_without_echo_is_answered_by_a_retry_and_resent_with_the_masters_challenge() -> None:
    kicks = _all("Kick")
    if not kicks:
        pytest.skip("the slave did not Kick in this recording")
    first = kicks[0]
    assert isinstance(first.msg, Kick) and first.msg.echo == NO_CHALLENGE
    assert len(kicks) >= 2, "the Kick's Retry must make the slave resend it"
    resent = kicks[1].msg
    assert isinstance(resent, Kick)
    assert resent.echo == _retry_for(first) == _challenges("master")[0]
    assert (resent.master_sae, resent.slave_sae) == (INPUTS.master_sae, INPUTS.slave_sae)


def test_every_challenge_on_the_wire_was_drawn_by_its_sender_and_the_first_draw_is_a_challenge() -> None:
    keys = {role: _key(role, "k_retry") for role in ROLES}
    seen = wire_challenges(RECORDED, keys)
    for role in ROLES:
        drawn = [bytes.fromhex(v) for v in DOC["engine_draws"][role]]
        assert drawn[0] == _challenges(role)[0], "ChallengeBook issues its first challenge at start"
        assert set(_challenges(role)) <= set(drawn)
        assert {c for _, r, c in seen if r == role} <= set(_challenges(role)), role
    assert not set(_challenges("master")) & set(_challenges("slave"))


def test_m2_and_r1_hand_out_challenges_of_their_senders() -> None:
    m2, r1 = last(SENT, "M2").msg, last(SENT, "R1").msg
    assert isinstance(m2, RespHello) and isinstance(r1, RatchetRequest)
    assert m2.challenge in _challenges("slave")
    assert r1.challenge in _challenges("master")
    # The slave consumed the echo of the M1 it answered: M2 hands out a fresh challenge.
    m1 = last(SENT, "M1").msg
    assert isinstance(m1, InitHello) and m2.challenge != m1.echo


# ----- key schedule and anchors -----------------------------------------------------------------


def test_anchor_ids_are_ks_an_of_each_epochs_chaining_key() -> None:
    derived = _derived()
    ids = []
    for number in (1, 2):
        keys = derived.epoch(number)
        assert ks.anchor_id(Secret(keys["ck"])) == keys["anchor_id"]
        # KS-AN is HKDF-Expand-SHA-384 (RFC 5869 section 2.3): one block T(1) = HMAC(ck, info || 0x01).
        t1 = hmac.new(keys["ck"], ks.INFO_ANCHOR_ID + b"\x01", hashlib.sha384).digest()[:16]
        assert t1 == keys["anchor_id"]
        ids.append(keys["anchor_id"])
    assert ids[0] != ids[1]
    m1 = last(SENT, "M1").msg
    assert isinstance(m1, InitHello) and m1.anchor_id == NO_ANCHOR and m1.ppk_id == ""  # hybrid, no PPK


def test_production_mlkem_decapsulates_the_recorded_m2_ciphertext_with_the_dk_from_the_recorded_seed() -> (
    None
):
    m1, m2 = last(SENT, "M1").msg, last(SENT, "M2").msg
    assert isinstance(m1, InitHello) and isinstance(m2, RespHello)
    seed = bytes.fromhex(DRAWS["master_ml_kem_seed"])
    production = CryptographyMlKem(INPUTS.kem).from_seed(seed)
    assert all(isinstance(s.msg, InitHello) and s.msg.ek == m1.ek for s in _all("M1"))
    assert production.encapsulation_key() == m1.ek
    shared = production.decapsulate(m2.ct)
    assert shared.reveal().hex() == DOC["derived"]["handshake"]["ss_kem"]
    assert KyberPyMlKem(INPUTS.kem, ScriptedRng()).from_seed(seed).decapsulate(m2.ct) == shared


def test_production_mldsa_verifies_every_recorded_m1_m2_and_kick_signature() -> None:
    master, slave = _public("master"), _public("slave")
    m1_bytes = last(SENT, "M1").body
    signed: list[tuple[PeerPublicKey, PeerPublicKey, bytes, bytes]] = []
    for s in SENT:
        if isinstance(s.msg, InitHello):
            signed.append((master, slave, s.msg.signature, ks.SIG_M1 + s.msg.signed_part()))
        elif isinstance(s.msg, RespHello):
            message = ks.SIG_M2 + ks.transcript_hash(m1_bytes) + s.msg.signed_part()
            signed.append((slave, master, s.msg.signature, message))
        elif isinstance(s.msg, Kick):
            signed.append((slave, master, s.msg.signature, ks.SIG_KICK + s.msg.signed_part()))
    assert len(signed) == len([s for s in SENT if s.name in ("M1", "M2", "Kick")])
    for right, wrong, signature, message in signed:
        right.verify(signature, message)
        with pytest.raises(AuthenticationError):
            wrong.verify(signature, message)


def test_recorded_confirmations_and_ratchet_mac_verify_under_production_derived_keys() -> None:
    derived = _derived()
    assert derived.to_json() == DOC["derived"]
    hs, rk = ({k: Secret(v) for k, v in derived.epoch(n).items() if k not in PUBLIC_DERIVED} for n in (1, 2))
    th, r1_hash = derived.epoch(1)["th"], derived.epoch(2)["r1_hash"]
    m2, m3, r1, r2, r3 = (last(SENT, name).msg for name in ("M2", "M3", "R1", "R2", "R3"))
    assert isinstance(m2, RespHello) and isinstance(m3, InitConfirm) and isinstance(r1, RatchetRequest)
    assert isinstance(r2, RatchetResponse) and isinstance(r3, RatchetConfirm)
    assert ks.mac_ok(hs["kc_s"], ks.CONFIRM_M2, m2.confirm, th)
    assert ks.mac_ok(hs["kc_m"], ks.CONFIRM_M3, m3.confirm, th)
    assert ks.mac_ok(rk["k_auth"], ks.MAC_R1, r1.mac, r1.mac_part())
    assert r1_hash == ks.transcript_hash(r1.mac_part())
    r1_full_hash = ks.transcript_hash(last(SENT, "R1").body)
    assert ks.mac_ok(rk["kc_s"], ks.CONFIRM_R2, r2.confirm, r1_full_hash, r2.confirmed_part())
    assert ks.mac_ok(rk["kc_m"], ks.CONFIRM_R3, r3.confirm, r1_full_hash, r3.confirmed_part())


def test_production_record_key_opens_every_recorded_data_packet() -> None:
    derived = _derived()
    index = data_indexes(RECORDED)
    opened: list[tuple[int, str, bytes]] = []
    for datagram in RECORDED:
        if classify_datagram(datagram.data) != "data":
            continue
        receiver_index, counter = parse_data_header(datagram.data)
        epoch, direction = index[receiver_index]
        assert direction == datagram.direction
        key = RecordKey(Secret(derived.epoch(epoch)["k_m2s" if direction == MASTER_TO_SLAVE else "k_s2m"]))
        header, body = datagram.data[:DATA_HEADER_SIZE], datagram.data[DATA_HEADER_SIZE:]
        plaintext = key.open(counter, header, body)
        assert (plaintext == b"") == (datagram.what == "keepalive")
        if plaintext:
            opened.append((epoch, direction, plaintext))
    assert opened == list(INPUTS.payloads)


def _secrets(doc: dict[str, Any]) -> list[bytes]:
    values = [bytes.fromhex(q["key"]) for q in doc["inputs"]["qkd_keys"]]
    for section in doc["derived"].values():
        values += [bytes.fromhex(v) for k, v in section.items() if k not in PUBLIC_DERIVED]
    return values


def test_engine_logs_and_events_never_contain_recorded_key_material(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    harness = run_scenario(INPUTS, lambda d: None)
    text = caplog.text + "".join(repr(e) for e in harness.events)
    assert harness.events, "expected some engine events"
    for secret in _secrets(DOC):
        assert secret.hex() not in text and secret.hex().upper() not in text
        assert repr(secret)[2:-1] not in text
