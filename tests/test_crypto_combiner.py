"""ETSI TS 103 744 CatKDF / CasKDF: every HKDF and HMAC row of the ETSI vectors.

Vectors: ../shared/vectors/etsi_ts103744/qhkex_vectors_v1_2.json (output of ETSI's reference
code etsi-forge/cyber.103744_QHKEX). Inputs per row r: k1 = ECDH secret, k2 = ML-KEM secret,
MA = cid || len(LA) || LA || len(PA1) || PA1 [|| len(PA2) || PA2], lengths in hex characters.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from vectors import load_json

from qgate.crypto.combiner import (
    cas_kdf,
    cat_kdf,
    combine_labels,
    context_hash,
    format_message,
    hkdf,
    one_step_kdf_hmac,
)
from qgate.crypto.secret import Secret
from qgate.errors import CryptoError

ETSI = load_json("etsi_ts103744", "qhkex_vectors_v1_2.json")
ROWS = range(ETSI["TEST_VECTOR_CNT"])
INFO = ETSI["INFO_TEST_VECTOR"].encode()


def _b(key: str, row: int) -> bytes:
    return bytes.fromhex(ETSI[key][row])


def _hash(row: int) -> str:
    # rows 0-5: HKDF/HMAC with SHA-256 (cid 1xxx/4xxx); rows 6-11: SHA-384 (2xxx/5xxx)
    return "sha256" if ETSI["cids_concatenate_hkdf"][row][0] in "14" else "sha384"


def _cat(row: int, cid_key: str, kdf: Any) -> bytes:
    cid = bytes.fromhex(ETSI[cid_key][row])
    msg_a = format_message(
        cid, [_b("strLA1", row), _b("strPA1", row), _b("strPA2", row)], reference_prefixes=True
    )
    msg_b = format_message(
        cid, [_b("strLB1", row), _b("strPB1", row), _b("strPB2", row)], reference_prefixes=True
    )
    return cat_kdf(
        [_b("strk1", row), _b("strk2", row)],
        label_a=_b("strLA1", row),
        label_b=_b("strLB1", row),
        info=INFO,
        msg_a=msg_a,
        msg_b=msg_b,
        length=ETSI["key_length"][row],
        hash_name=_hash(row),
        reference_prefixes=True,
        kdf=kdf,
    )


def _cas(row: int, cid_key: str, kdf: Any) -> bytes:
    cid = bytes.fromhex(ETSI[cid_key][row])
    chain = b""  # previous_chain_secret of round 1: empty (no psk)
    key_material = b""
    for n in ("1", "2"):
        k, pa, pb = ("strk1", "strPA1", "strPB1") if n == "1" else ("strk2", "strPA2", "strPB2")
        la, lb = _b("strLA" + n, row), _b("strLB" + n, row)
        chain, key_material = cas_kdf(
            chain,
            _b(k, row),
            label_a=la,
            label_b=lb,
            info=INFO,
            msg_a=format_message(cid, [la, _b(pa, row)], reference_prefixes=True),
            msg_b=format_message(cid, [lb, _b(pb, row)], reference_prefixes=True),
            length=ETSI["key_length"][row],
            hash_name=_hash(row),
            reference_prefixes=True,
            kdf=kdf,
        )
    return key_material


@pytest.mark.parametrize("row", ROWS)
def test_cat_kdf_hkdf_reproduces_etsi_row(row: int) -> None:
    assert _cat(row, "cids_concatenate_hkdf", "hkdf") == _b("strkmcat_hkdf", row)


@pytest.mark.parametrize("row", ROWS)
def test_cas_kdf_hkdf_reproduces_etsi_row(row: int) -> None:
    assert _cas(row, "cids_cascade_hkdf", "hkdf") == _b("strkmcas_hkdf", row)


@pytest.mark.parametrize("row", ROWS)
def test_cat_kdf_hmac_one_step_reproduces_etsi_row(row: int) -> None:
    assert _cat(row, "cids_concatenate_hmac", "hmac") == _b("strkmcat_hmac", row)


@pytest.mark.parametrize("row", ROWS)
def test_cas_kdf_hmac_one_step_reproduces_etsi_row(row: int) -> None:
    assert _cas(row, "cids_cascade_hmac", "hmac") == _b("strkmcas_hmac", row)


def test_etsi_rows_need_reference_mode() -> None:
    """The TS-text mode (LA || LB label, byte-length prefixes) must not match the reference rows."""
    cid = bytes.fromhex(ETSI["cids_concatenate_hkdf"][0])
    msg_a = format_message(cid, [_b("strLA1", 0), _b("strPA1", 0), _b("strPA2", 0)])
    msg_b = format_message(cid, [_b("strLB1", 0), _b("strPB1", 0), _b("strPB2", 0)])
    out = cat_kdf(
        [_b("strk1", 0), _b("strk2", 0)],
        label_a=_b("strLA1", 0),
        label_b=_b("strLB1", 0),
        info=INFO,
        msg_a=msg_a,
        msg_b=msg_b,
        length=16,
        hash_name="sha256",
    )
    assert out != _b("strkmcat_hkdf", 0)


def test_cat_kdf_ts_text_reproduces_ts_103744_v111_annex_c21() -> None:
    """TS 103 744 V1.1.1 test C.2.1 (CatKDF, HKDF-SHA-256, P-256 + Kyber): label = LA || LB.

    This vector is printed in the TS itself (not produced by the reference code), so it pins
    the TS reading used in production: label concatenated, MA/MB as given, f with byte lengths.
    """
    la = bytes.fromhex("0102030405060708090A0B0C0D0E0F10")
    lb = bytes.fromhex("0202030405060708090A0B0C0D0E0F10")
    pa1 = bytes.fromhex(
        "119F2F047902782AB0C9E27A54AFF5EB9B964829CA99C06B02DDBA95B0A3F6D08F52B726664CAC366FC"
        "98AC7A012B2682CBD962E5ACB544671D41B9445704D1D"
    )
    pa2 = bytes.fromhex(
        "4484D7AADB44B40CC180DC568B2C142A60E6E2863F5988614A6215254B2F5F6F79B48F329AD1A2DED2"
        "0B7ABAB10F7DBF59C3E20B59A700093060D2A44ACDC0083A53CF0808E0B3A827C45176BEE0DC6EC7CC1"
        "6461E38461C12451BB95191407C1E942BB50D4C7B25A49C644B630159E6C403653838E689FBF4A7ADEA"
        "693ED0657BA4A724786AF7953F7BA6E15F9BBF9F5007FB711569E72ACAB05D3463A458536CAB647F00C"
        "205D27D5311B2A5113D4B26548000DB237515931A040804E769361F94FF0167C78353D2630A1E6F595A"
        "1F80E87F6A5BCD679D7A64C5006F6191D4ADEFA1EA67F6388B7017D453F4FE2DFE80CCC709000B52175"
        "BFC3ADE52ECCB0CEBE1654F89D39131C357EACB61E5F13C80AB0165B7714D6BE6DF65F8DE73FF47B7F3"
        "304639F0903653ECCFA252F6E2104C4ABAD3C33AF24FD0E56F58DB92CC66859766035419AB2DF600"
    )
    pb1 = bytes.fromhex(
        "809F04289C64348C01515EB03D5CE7AC1A8CB9498F5CAA50197E58D43A86A7AEB29D84E811197F25EBA"
        "8F5194092CB6FF440E26D4421011372461F579271CDA3"
    )
    pb2 = bytes.fromhex(
        "0FDEB26DBD96E0CD272283CA5BDD1435BC9A7F9AB7FC24F83CA926DEED038AE4E47F39F9886E0BD7EEB"
        "EAACD12AB435CC92AA3383B2C01E6B9E02BC3BEF9C6C2719014562A96A0F3E784E3FA44E5C62ED8CEA7"
        "9E1108B6FECD5BF8836BF2DAE9FEB1863C4C8B3429220E2797F601FB4B8EBAFDD4F17355508D259CA60"
        "721D167F6E5480B5133E824F76D3240E97F31325DBB9A53E9A3EEE2E0712734825615A027857E2000D4"
        "D00E11988499A738452C93DA895BFA0E10294895CCF25E3C261CBE38F5D7E19ABE4E322094CB8DEC5BF"
        "7484902BABDE33CC69595F6013B20AABA9698C1DEA2BC6F65D57519294E6FEEA3B549599D480948374D"
        "2D21B643573C276E1A5B0745301F648D7982AB46A3065639960182BF365819EFC0D4E61E87D2820DBC0"
        "E849E99E875B21501D1CA7588A1D458CD70C7DF793D4993B9B1679886CAE8013A8DD854F010A100C993"
        "3FA642DC0AEA9985786ED36B98D3"
    )
    k1 = bytes.fromhex("057D636096CB80B67A8C038C890E887D1ADFA4195E9B3CE241C8A778C59CDA67")
    k2 = bytes.fromhex("35F7F8FF388714DEDC41F139078CEDC9")
    out = cat_kdf(
        [k1, k2],
        label_a=la,
        label_b=lb,
        info=b"CONCATENATION TEST VECTOR 1",
        msg_a=la + pa1 + pa2,
        msg_b=lb + pb1 + pb2,
        length=16,
        hash_name="sha256",
    )
    assert out == bytes.fromhex("5C366F23281D33EB85CAB026D3D9A35A")


def test_context_hash_is_length_prefixed_hash() -> None:
    expected = hashlib.sha384(b"\x00\x00\x00\x01a\x00\x00\x00\x00\x00\x00\x00\x02bc").digest()
    assert context_hash("sha384", b"a", b"", b"bc") == expected


def test_format_message_reference_prefixes_count_hex_characters() -> None:
    assert format_message(b"\x11", [b"\xaa\xbb"], reference_prefixes=True) == b"\x11\x00\x00\x00\x04\xaa\xbb"
    assert format_message(b"\x11", [b"\xaa\xbb"]) == b"\x11\x00\x00\x00\x02\xaa\xbb"


def test_combine_labels_concatenates_by_default_and_xors_in_reference_mode() -> None:
    assert combine_labels(b"\x01\x02", b"\x03") == b"\x01\x02\x03"
    assert combine_labels(b"\x01\x02", b"\x03\x01", reference_prefixes=True) == b"\x02\x03"
    with pytest.raises(CryptoError):
        combine_labels(b"\x01\x02", b"\x03", reference_prefixes=True)


def test_cat_kdf_accepts_secret_objects_and_component_order_matters() -> None:
    common: dict[str, Any] = {
        "label_a": b"A",
        "label_b": b"B",
        "info": b"qgate",
        "msg_a": b"ma",
        "msg_b": b"mb",
        "length": 96,
    }
    a = cat_kdf([Secret(b"\x01" * 32), b"\x02" * 32, b"\x03" * 32], **common)
    b = cat_kdf([b"\x01" * 32, b"\x02" * 32, b"\x03" * 32], **common)
    c = cat_kdf([b"\x02" * 32, b"\x01" * 32, b"\x03" * 32], **common)
    assert a == b and len(a) == 96 and a != c


def test_cat_kdf_rejects_bad_arguments() -> None:
    kwargs: dict[str, Any] = {"label_a": b"", "label_b": b"", "info": b"", "msg_a": b"", "msg_b": b""}
    with pytest.raises(CryptoError):
        cat_kdf([], length=32, **kwargs)
    with pytest.raises(CryptoError):
        cat_kdf([b"k"], length=255 * 48 + 1, **kwargs)
    with pytest.raises(CryptoError):
        cat_kdf([b"k"], length=32, hash_name="md5", **kwargs)
    with pytest.raises(CryptoError):
        cat_kdf([b"k"], length=32, kdf="kmac", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        cas_kdf(b"", b"k", length=0, **kwargs)


def test_cas_kdf_chain_secret_has_hash_length() -> None:
    chain, km = cas_kdf(
        b"", b"k" * 32, label_a=b"a", label_b=b"b", info=b"i", msg_a=b"", msg_b=b"", length=64
    )
    assert len(chain) == 48 and len(km) == 64


def test_one_step_kdf_hmac_empty_salt_uses_zero_block() -> None:
    explicit = one_step_kdf_hmac("sha256", b"z", salt=bytes(64), info=b"i", length=40)
    assert one_step_kdf_hmac("sha256", b"z", salt=b"", info=b"i", length=40) == explicit


def test_hkdf_rejects_zero_length() -> None:
    with pytest.raises(CryptoError):
        hkdf("sha256", b"k", salt=b"", info=b"", length=0)


@pytest.mark.skip(reason="ETSI KMAC rows (24): cryptography offers no KMAC, so qgate has no KMAC combiner")
def test_kmac_rows_are_not_covered() -> None:
    """Stated as a visible skip so the uncovered rows show in every test report."""
