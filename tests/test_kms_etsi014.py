"""ETSI GS QKD 014 v1.1.1 section 6 models and parsers (qgate.kms.etsi014), on crafted bodies."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgate.crypto.secret import Secret
from qgate.errors import KmsBadAnswerError, KmsExhaustedError
from qgate.kms import etsi014
from qgate.kms.etsi014 import QkdKey, Status

ID1 = "550e8400-e29b-41d4-a716-446655440000"
ID2 = "bc490419-7d60-487f-adc1-4ddcc177c139"
KEY1 = bytes(range(32))
KEY2 = bytes(range(32, 64))

STATUS_SPEC_EXAMPLE = {  # section 6.1 example values
    "source_KME_ID": "AAAABBBBCCCCDDDD",
    "target_KME_ID": "EEEEFFFFGGGGHHHH",
    "master_SAE_ID": "IIIIJJJJKKKKLLLL",
    "slave_SAE_ID": "MMMMNNNNOOOOPPPP",
    "key_size": 352,
    "stored_key_count": 25000,
    "max_key_count": 100000,
    "max_key_per_request": 128,
    "max_key_size": 1024,
    "min_key_size": 64,
    "max_SAE_ID_count": 0,
}


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def container(*entries: tuple[str, bytes]) -> bytes:
    return body({"keys": [{"key_ID": key_id, "key": b64(raw)} for key_id, raw in entries]})


# --- Status -------------------------------------------------------------------------------------


def test_parse_status_reads_every_field_of_the_spec_example() -> None:
    status = etsi014.parse_status(body(STATUS_SPEC_EXAMPLE), slave_sae_id="MMMMNNNNOOOOPPPP")
    assert status == Status(**STATUS_SPEC_EXAMPLE)  # type: ignore[arg-type]
    assert status.status_extension is None


def test_status_round_trips_through_json_with_extension() -> None:
    status = Status(**STATUS_SPEC_EXAMPLE, status_extension={"vendor": 1})  # type: ignore[arg-type]
    assert etsi014.parse_status(status.to_json()) == status
    assert json.loads(status.to_json())["status_extension"] == {"vendor": 1}


@pytest.mark.parametrize("field", sorted(STATUS_SPEC_EXAMPLE))
def test_parse_status_rejects_missing_field(field: str) -> None:
    obj = dict(STATUS_SPEC_EXAMPLE)
    del obj[field]
    with pytest.raises(KmsBadAnswerError, match=field):
        etsi014.parse_status(body(obj))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key_size", "352"),
        ("key_size", 352.0),
        ("stored_key_count", True),
        ("stored_key_count", -1),
        ("max_key_count", None),
        ("master_SAE_ID", 5),
        ("slave_SAE_ID", ""),
        ("source_KME_ID", "has space"),
        ("status_extension", [1]),
    ],
)
def test_parse_status_rejects_wrong_types_and_values(field: str, value: object) -> None:
    with pytest.raises(KmsBadAnswerError):
        etsi014.parse_status(body({**STATUS_SPEC_EXAMPLE, field: value}))


def test_parse_status_rejects_unordered_key_sizes() -> None:
    with pytest.raises(KmsBadAnswerError, match="min_key_size"):
        etsi014.parse_status(body({**STATUS_SPEC_EXAMPLE, "min_key_size": 2048}))


def test_parse_status_rejects_answer_about_another_slave() -> None:
    with pytest.raises(KmsBadAnswerError, match="slave_SAE_ID"):
        etsi014.parse_status(body(STATUS_SPEC_EXAMPLE), slave_sae_id="SAE_X")


# --- Key container (enc_keys) -------------------------------------------------------------------


def test_parse_enc_keys_returns_keys_as_secrets() -> None:
    keys = etsi014.parse_enc_keys(container((ID1, KEY1), (ID2, KEY2)), number=2, size_bits=256)
    assert [k.key_id for k in keys] == [ID1, ID2]
    assert keys[0].key.reveal() == KEY1 and keys[1].size_bits == 256
    assert KEY1.hex() not in repr(keys) and "<SECRET>" in repr(keys)


def test_parse_enc_keys_accepts_spec_extensions_as_objects() -> None:
    answer = body(
        {
            "keys": [{"key_ID": ID1, "key_ID_extension": {}, "key": b64(KEY1), "key_extension": {"x": 1}}],
            "key_container_extension": {"y": 2},
        }
    )
    assert etsi014.parse_enc_keys(answer, number=1, size_bits=256)[0].key_id == ID1


def test_parse_enc_keys_returns_a_short_answer() -> None:  # issue 11: fewer keys than asked are kept
    keys = etsi014.parse_enc_keys(container((ID1, KEY1)), number=2, size_bits=256)
    assert [k.key_id for k in keys] == [ID1]


def test_parse_enc_keys_rejects_more_keys_than_asked() -> None:
    with pytest.raises(KmsBadAnswerError, match="asked for 1 keys, got 2"):
        etsi014.parse_enc_keys(container((ID1, KEY1), (ID2, KEY2)), number=1, size_bits=256)


def test_parse_enc_keys_without_any_key_is_exhausted() -> None:
    with pytest.raises(KmsExhaustedError, match="no key") as info:
        etsi014.parse_enc_keys(body({"keys": []}), number=2, size_bits=256)
    assert info.value.status == 200 and not isinstance(info.value, KmsBadAnswerError)


def test_parse_enc_keys_rejects_size_counted_in_bytes() -> None:
    with pytest.raises(KmsBadAnswerError, match="has 2048 bits"):
        etsi014.parse_enc_keys(container((ID1, bytes(256))), number=1, size_bits=256)


def test_parse_enc_keys_rejects_duplicate_key_ids() -> None:
    with pytest.raises(KmsBadAnswerError, match="duplicate key_ID"):
        etsi014.parse_enc_keys(container((ID1, KEY1), (ID1, KEY2)), number=2, size_bits=256)


@pytest.mark.parametrize(
    "key_text",
    [
        b64(KEY1).rstrip("="),  # padding missing
        b64(KEY1).replace("A", "-"),  # URL-safe alphabet
        b64(KEY1)[:-2] + "B=",  # non-zero pad bits: not canonical
        " " + b64(KEY1),
        b64(KEY1) + "\n",
        "",
        "é" + b64(KEY1),
    ],
)
def test_parse_enc_keys_rejects_non_canonical_base64(key_text: str) -> None:
    answer = body({"keys": [{"key_ID": ID1, "key": key_text}]})
    with pytest.raises(KmsBadAnswerError, match="key"):
        etsi014.parse_enc_keys(answer, number=1, size_bits=256)


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"<html>502 Bad Gateway</html>",
        b"\xff\xfe{}",
        b'{"keys": [], "keys": []}',  # duplicate names
        b'{"keys": NaN}',
        b"[]",
        b'{"keys": {}}',
        b'{"keys": [5]}',
        b'{"keys": [{"key": "AAAA"}]}',
        b'{"keys": [{"key_ID": 7, "key": "AAAA"}]}',
        b'{"keys": [{"key_ID": "' + ID1.encode() + b'"}]}',
        b'{"keys": [{"key_ID": "' + ID1.encode() + b'", "key": "AAAA", "key_extension": 3}]}',
        b'{"keys": [], "key_container_extension": "x"}',
        b"[" * 100_000,
        b"1" * 5000,
        b" " * (etsi014.MAX_BODY_SIZE + 1),
    ],
)
def test_parse_key_container_rejects_malformed_bodies(answer: bytes) -> None:
    with pytest.raises(KmsBadAnswerError):
        etsi014.parse_enc_keys(answer, number=1, size_bits=24)


def test_parse_key_container_rejects_empty_key() -> None:
    with pytest.raises(KmsBadAnswerError, match="empty"):
        etsi014.parse_key_container(body({"keys": [{"key_ID": ID1, "key": ""}]}))


def test_parse_key_container_rejects_overlong_key_id() -> None:
    with pytest.raises(KmsBadAnswerError, match="key_ID"):
        etsi014.parse_key_container(container(("k" * (etsi014.KEY_ID_MAX_LEN + 1), KEY1)))


# --- Key container (dec_keys) -------------------------------------------------------------------


def test_parse_dec_keys_returns_keys_in_the_order_asked() -> None:
    keys = etsi014.parse_dec_keys(container((ID1, KEY1), (ID2, KEY2)), key_ids=[ID2, ID1], size_bits=256)
    assert [k.key_id for k in keys] == [ID2, ID1]
    assert keys[0].key.reveal() == KEY2


@pytest.mark.parametrize(
    ("entries", "asked"),
    [
        (((ID1, KEY1),), [ID1, ID2]),  # missing one
        (((ID1, KEY1), (ID2, KEY2)), [ID1]),  # one not asked for
        (((ID2, KEY2),), [ID1]),  # another key
    ],
)
def test_parse_dec_keys_rejects_key_ids_other_than_asked(
    entries: tuple[tuple[str, bytes], ...], asked: list[str]
) -> None:
    with pytest.raises(KmsBadAnswerError, match="do not match"):
        etsi014.parse_dec_keys(container(*entries), key_ids=asked)


def test_parse_dec_keys_checks_size_when_given() -> None:
    assert etsi014.parse_dec_keys(container((ID1, KEY1)), key_ids=[ID1])[0].size_bits == 256
    with pytest.raises(KmsBadAnswerError, match="bits"):
        etsi014.parse_dec_keys(container((ID1, KEY1)), key_ids=[ID1], size_bits=128)


# --- Encoders and error bodies ------------------------------------------------------------------


def test_encode_key_request_uses_spec_field_names() -> None:
    assert json.loads(etsi014.encode_key_request(3, 512)) == {"number": 3, "size": 512}
    assert json.loads(etsi014.encode_key_request(1, 256, ["SAE_C"])) == {
        "number": 1,
        "size": 256,
        "additional_slave_SAE_IDs": ["SAE_C"],
    }


def test_encode_key_ids_uses_spec_field_names() -> None:
    assert json.loads(etsi014.encode_key_ids([ID1, ID2])) == {"key_IDs": [{"key_ID": ID1}, {"key_ID": ID2}]}


def test_key_container_round_trips() -> None:
    keys = [QkdKey(ID1, Secret(KEY1)), QkdKey(ID2, Secret(KEY2))]
    assert etsi014.parse_enc_keys(etsi014.encode_key_container(keys), number=2, size_bits=256) == keys


def test_parse_error_body_reads_message_and_details() -> None:
    error = etsi014.parse_error_body(etsi014.encode_error("key not found", [{"key_ID": ID1}]))
    assert error.message == "key not found"
    assert error.details == ({"key_ID": ID1},)


@pytest.mark.parametrize(
    "answer", [b"", b"<html><body>Internal error</body></html>", b"[1]", b'{"message": 5}', b"\x80"]
)
def test_parse_error_body_tolerates_empty_html_and_odd_bodies(answer: bytes) -> None:
    assert etsi014.parse_error_body(answer).message is None


def test_parse_error_body_cuts_and_cleans_message() -> None:
    error = etsi014.parse_error_body(body({"message": "bad\nthing" + "x" * 1000, "details": "no"}))
    assert error.message is not None
    assert error.message.startswith("bad?thing") and len(error.message) == etsi014.ERROR_MESSAGE_MAX_LEN
    assert error.details == ()


# --- Properties -----------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_parsers_raise_only_bad_answer_on_random_bytes(data: bytes) -> None:
    for parse in (
        lambda: etsi014.parse_status(data),
        lambda: etsi014.parse_enc_keys(data, number=1, size_bits=256),
        lambda: etsi014.parse_dec_keys(data, key_ids=[ID1]),
    ):
        with contextlib.suppress(KmsBadAnswerError, KmsExhaustedError):  # Exhausted: '{"keys":[]}'
            parse()
    etsi014.parse_error_body(data)


_scalar = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_json = _scalar | st.lists(_scalar, max_size=3) | st.dictionaries(st.text(max_size=4), _scalar, max_size=3)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["keys", "key_container_extension", "x"]),
        st.lists(
            st.dictionaries(
                st.sampled_from(["key_ID", "key", "key_extension", "key_ID_extension"]),
                _json | st.sampled_from([ID1, ID2, b64(KEY1), "AAAA"]),
            ),
            max_size=3,
        )
        | _json,
    )
)
def test_key_container_parser_raises_only_bad_answer_on_random_json(obj: dict[str, object]) -> None:
    data = json.dumps(obj).encode()
    try:
        keys = etsi014.parse_enc_keys(data, number=1, size_bits=256)
    except (KmsBadAnswerError, KmsExhaustedError):  # Exhausted: a valid container with no key
        return
    assert len(keys) == 1 and keys[0].size_bits == 256


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.uuids().map(str), st.binary(min_size=1, max_size=64)),
        max_size=5,
        unique_by=lambda t: t[0],
    )
)
def test_key_container_encode_then_parse_is_identity(entries: list[tuple[str, bytes]]) -> None:
    keys = [QkdKey(key_id, Secret(raw)) for key_id, raw in entries]
    assert etsi014.parse_key_container(etsi014.encode_key_container(keys)) == keys
