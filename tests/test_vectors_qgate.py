"""qgate's own recorded protocol vectors (tests/vectors_qgate/handshake_ratchet_v1.json).

The recording (written by ``python tests/qgate_recorder.py --write``) holds every datagram of a
full handshake (M1, M2, M3), one QKD ratchet step (R1, R2, R3) and 3 data packets each way on
each epoch, made by two production engines with fixed randomness, clock and QKD keys.

- Replay: the engines must reproduce every datagram byte for byte. Any change of the wire format
  or key schedule fails here; re-record only for an intentional, documented change.
- Interop: production providers (``cryptography`` ML-KEM and ML-DSA, ``RecordKey``) must
  decapsulate, verify and open what the test-only kyber-py / dilithium-py providers produced.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import pytest
from qgate_recorder import (
    MASTER_TO_SLAVE,
    RERECORD_HINT,
    Datagram,
    DerivedKeys,
    Inputs,
    data_indexes,
    derive_keys,
    load,
    messages,
    record,
    run_scenario,
)
from testproviders import KyberPyMlKem, ScriptedRng

from qgate.constants import DATA_HEADER_SIZE
from qgate.crypto.aead import RecordKey
from qgate.crypto.identity import PeerPublicKey
from qgate.crypto.kem import CryptographyMlKem
from qgate.crypto.secret import Secret
from qgate.errors import AuthenticationError
from qgate.protocol import keyschedule as ks
from qgate.protocol.messages import (
    InitConfirm,
    InitHello,
    RatchetConfirm,
    RatchetRequest,
    RatchetResponse,
    RespHello,
)
from qgate.protocol.wire import classify_datagram, parse_data_header

DOC: Final = load()
INPUTS: Final = Inputs.from_json(DOC["inputs"])
DRAWS: Final[dict[str, str]] = DOC["draws"]
RECORDED: Final = [Datagram.from_json(item) for item in DOC["datagrams"]]
MSGS: Final = messages(RECORDED)


def _derived() -> DerivedKeys:
    return derive_keys(INPUTS, DRAWS, RECORDED)


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
            "The wire format or the key schedule changed. " + RERECORD_HINT
        )


def test_recording_has_the_full_handshake_one_ratchet_step_and_three_packets_each_way_per_epoch() -> None:
    whats = [d.what for d in RECORDED]
    assert {w.split()[0] for w in whats if "fragment" in w} == {"M1", "M2", "M3", "R1", "R2", "R3"}
    assert whats.count("keepalive") == 2
    for direction in ("m2s", "s2m"):
        assert sum(d.what == "data" and d.direction == direction for d in RECORDED) == 6
    assert len(RECORDED) == 27


def test_vector_file_was_recorded_from_the_recorder_defaults() -> None:
    assert Inputs() == INPUTS, "the file's inputs differ from qgate_recorder.Inputs(); " + RERECORD_HINT


def test_replay_reproduces_every_recorded_datagram_byte_for_byte() -> None:
    replay = _Replay(RECORDED)
    run_scenario(INPUTS, replay)
    assert replay.position == len(RECORDED), (
        f"the engines sent {replay.position} datagrams, the recording has {len(RECORDED)}. " + RERECORD_HINT
    )


def test_recorded_draws_and_derived_keys_follow_from_the_inputs() -> None:
    fresh = record(INPUTS)
    assert fresh["draws"] == DRAWS, "rng draws changed. " + RERECORD_HINT
    assert fresh["derived"] == DOC["derived"], "derived keys changed. " + RERECORD_HINT


def test_production_mlkem_decapsulates_the_recorded_m2_ciphertext_with_the_dk_from_the_recorded_seed() -> (
    None
):
    m1, m2 = MSGS["M1"][0], MSGS["M2"][0]
    assert isinstance(m1, InitHello) and isinstance(m2, RespHello)
    seed = bytes.fromhex(DRAWS["master_ml_kem_seed"])
    production = CryptographyMlKem(INPUTS.kem).from_seed(seed)
    assert production.encapsulation_key() == m1.ek
    shared = production.decapsulate(m2.ct)
    assert shared.reveal().hex() == DOC["derived"]["handshake"]["ss_kem"]
    assert KyberPyMlKem(INPUTS.kem, ScriptedRng()).from_seed(seed).decapsulate(m2.ct) == shared


def test_production_mldsa_verifies_the_recorded_m1_and_m2_signatures() -> None:
    (m1, m1_bytes), (m2, _) = MSGS["M1"], MSGS["M2"]
    assert isinstance(m1, InitHello) and isinstance(m2, RespHello)
    master = PeerPublicKey.from_raw(INPUTS.identity_alg, bytes.fromhex(DRAWS["master_ml_dsa_public_key"]))
    slave = PeerPublicKey.from_raw(INPUTS.identity_alg, bytes.fromhex(DRAWS["slave_ml_dsa_public_key"]))
    m1_signed = ks.SIG_M1 + m1.signed_part()
    m2_signed = ks.SIG_M2 + ks.transcript_hash(m1_bytes) + m2.signed_part()
    master.verify(m1.signature, m1_signed)
    slave.verify(m2.signature, m2_signed)
    with pytest.raises(AuthenticationError):
        slave.verify(m1.signature, m1_signed)
    with pytest.raises(AuthenticationError):
        master.verify(m2.signature, m2_signed)


def test_recorded_confirmations_and_ratchet_mac_verify_under_production_derived_keys() -> None:
    derived = _derived()
    assert derived.to_json() == DOC["derived"]
    hs, rk = (
        {k: Secret(v) for k, v in derived.epoch(n).items() if k not in ("th", "r1_hash")} for n in (1, 2)
    )
    th, r1_hash = derived.epoch(1)["th"], derived.epoch(2)["r1_hash"]
    m2, m3, r1, r2, r3 = (MSGS[name][0] for name in ("M2", "M3", "R1", "R2", "R3"))
    assert isinstance(m2, RespHello) and isinstance(m3, InitConfirm) and isinstance(r1, RatchetRequest)
    assert isinstance(r2, RatchetResponse) and isinstance(r3, RatchetConfirm)
    assert ks.mac_ok(hs["kc_s"], ks.CONFIRM_M2, m2.confirm, th)
    assert ks.mac_ok(hs["kc_m"], ks.CONFIRM_M3, m3.confirm, th)
    assert ks.mac_ok(rk["k_auth"], ks.MAC_R1, r1.mac, r1.mac_part())
    assert r1_hash == ks.transcript_hash(r1.mac_part())
    r1_full_hash = ks.transcript_hash(MSGS["R1"][1])
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
        values += [bytes.fromhex(v) for k, v in section.items() if k not in ("th", "r1_hash")]
    return values


def test_engine_logs_and_events_never_contain_recorded_key_material(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    harness = run_scenario(INPUTS, lambda d: None)
    text = caplog.text + "".join(repr(e) for e in harness.events)
    assert harness.events, "expected some engine events"
    for secret in _secrets(DOC):
        assert secret.hex() not in text and secret.hex().upper() not in text
        assert repr(secret)[2:-1] not in text
