"""KME error answers (qgate.kms.etsi014.classify_error), zero Status limits and short key answers (issue 11).

The table holds answers of the shapes third-party KMEs send (ETSI GS QKD 014 section 6.5 JSON,
FastAPI ``detail``, 422 validation ``details``, HTML pages from servlet containers and proxies,
empty and plain-text bodies) with the wordings seen from several products and from the
simulator's quirks. The client is then checked end to end against a canned HTTPS KME.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.kmes import Canned, serve_canned

from qgate.errors import (
    KmsAuthError,
    KmsBadAnswerError,
    KmsError,
    KmsExhaustedError,
    KmsKeyRejectedError,
    KmsUnavailableError,
)
from qgate.kms import etsi014
from qgate.kms.client import Etsi014Client
from qgate.kms.etsi014 import ErrorVerdict, Status, classify_error
from qgate.pki import make_pki

ID1 = "550e8400-e29b-41d4-a716-446655440000"
ID2 = "bc490419-7d60-487f-adc1-4ddcc177c139"
ID3 = "0b1e3f8c-2f0e-4a47-9d55-2c4b1f0e6a11"
KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode()  # 44 characters, mixed case and digits
HTML = "text/html;charset=utf-8"


def err(message: str, details: list[object] | None = None) -> bytes:
    obj: dict[str, object] = {"message": message}
    if details is not None:
        obj["details"] = details
    return json.dumps(obj).encode()


def container(*entries: tuple[str, bytes]) -> bytes:
    return json.dumps(
        {"keys": [{"key_ID": i, "key": base64.b64encode(k).decode()} for i, k in entries]}
    ).encode()


def tomcat_page(status: int, phrase: str, message: str) -> bytes:  # servlet-container error page
    title = f"HTTP Status {status} - {phrase}"
    return (
        f'<!doctype html><html lang="en"><head><title>{title}</title></head>'
        f"<body><h1>{title}</h1><p><b>Message</b> {message}</p></body></html>"
    ).encode()


NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
    b"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
NGINX_400_CERT = (
    b"<html>\r\n<head><title>400 No required SSL certificate was sent</title></head>\r\n<body>\r\n"
    b"<center><h1>400 Bad Request</h1></center>\r\n<center>No required SSL certificate was sent</center>\r\n"
    b"</body>\r\n</html>\r\n"
)

# (endpoint, status, body, content type, class, a piece of the summary)
ANSWERS: list[tuple[str, int, bytes, str | None, type[KmsError], str]] = [
    # --- the store is empty: retry later ---------------------------------------------------------
    ("enc_keys", 503, err("not enough key: 2 x 256 bits asked, 0 x 256 bits stored"), None,
     KmsExhaustedError, "HTTP 503: not enough key"),  # qgate simulator
    ("enc_keys", 400, err("not enough keys available"), None, KmsExhaustedError, "HTTP 400"),  # empty-400
    ("enc_keys", 400, err("There is not enough key material for requested parameters."), None,
     KmsExhaustedError, "not enough key material"),  # a C++ KME
    ("enc_keys", 404, b'{"message": "No keys found in storage", "details": null}', None,
     KmsExhaustedError, "No keys found"),  # a Rust KME
    ("enc_keys", 422, err("invalid request", [{"reason": "Insufficient keys in pool. Available: 0"}]), None,
     KmsExhaustedError, "details: [{"),  # generic message, the cause in details
    ("enc_keys", 500, b'{"detail": "Key pool exhausted!"}', None, KmsExhaustedError, "Key pool exhausted"),
    ("enc_keys", 503, tomcat_page(503, "Service Unavailable", "not enough keys available"), HTML,
     KmsExhaustedError, 'HTML page "HTTP Status 503'),  # html-errors
    ("dec_keys", 503, err("not enough key"), None, KmsExhaustedError, "503"),
    # --- unreachable or overloaded: retry later, never a verdict on key_IDs ------------------------
    ("enc_keys", 503, b"", None, KmsUnavailableError, "HTTP 503: empty body"),
    ("dec_keys", 503, err("unknown key_ID"), None, KmsUnavailableError, "unknown key_ID"),
    ("dec_keys", 503, err("peer KME unreachable"), None, KmsUnavailableError, "peer KME unreachable"),
    ("status", 502, NGINX_502, None, KmsUnavailableError, 'HTML page "502 Bad Gateway"'),
    ("enc_keys", 504, err("Gateway timeout (maybe a remote KME is down)"), None, KmsUnavailableError, "504"),
    ("enc_keys", 429, b"Too Many Requests", "text/plain", KmsUnavailableError, '"Too Many Requests"'),
    # --- the caller's certificate or SAE: fix the configuration ------------------------------------
    ("enc_keys", 401, err("Unauthorized"), None, KmsAuthError, "HTTP 401: Unauthorized"),
    ("status", 401, err("caller is not an SAE attached to this KME", [{"caller": "KME_B"}]), None,
     KmsAuthError, "caller"),
    ("enc_keys", 400, err("wrong SAE certificate"), None, KmsAuthError, "wrong SAE certificate"),
    ("dec_keys", 400, err("wrong SAE certificate"), None, KmsAuthError, "wrong SAE certificate"),
    ("dec_keys", 401, err("Authentication error"), None, KmsAuthError, "Authentication error"),
    ("dec_keys", 401, err("caller is not an SAE attached to this KME", [{"key_ID": ID1}]), None,
     KmsAuthError, "caller"),  # names a key_ID, but the refusal is about the caller
    ("dec_keys", 401, b"", None, KmsAuthError, "empty body"),  # a bare 401 names no key
    ("enc_keys", 403, b"<html><body>Forbidden</body></html>", None, KmsAuthError, "Forbidden"),
    ("enc_keys", 400, NGINX_400_CERT, HTML, KmsAuthError, "No required SSL certificate"),
    ("status", 496, b"", None, KmsAuthError, "HTTP 496"),
    # --- dec_keys: these key_IDs are dead ----------------------------------------------------------
    ("dec_keys", 400, err("unknown key_ID", [{"key_ID": ID1}]), None, KmsKeyRejectedError, ID1),  # simulator
    ("dec_keys", 401, err("key_ID already retrieved", [{"key_ID": ID1}]), None,
     KmsKeyRejectedError, "already retrieved"),  # consumed-401
    ("dec_keys", 401, err("key_ID was not delivered for this SAE"), None,
     KmsKeyRejectedError, "not delivered"),
    ("dec_keys", 400, err("keys do not exist"), None,
     KmsKeyRejectedError, "keys do not exist"),  # replace-on-enc
    ("dec_keys", 422, err("invalid request", [{"reason": "unknown key_ID"}, {"key_ID": ID1}]), None,
     KmsKeyRejectedError, "unknown key_ID"),  # details-422
    ("dec_keys", 400, tomcat_page(400, "Bad Request", "unknown key_ID"), HTML,
     KmsKeyRejectedError, "Message unknown key_ID"),  # html-errors
    ("dec_keys", 400, err("Some of the requested keys do not exist in this KME."), None,
     KmsKeyRejectedError, "do not exist"),  # a Flask simulator
    ("dec_keys", 404, err("Key ID Not Found"), None, KmsKeyRejectedError, "Not Found"),
    ("dec_keys", 404, err("Required Key value was not found for the SAE ID: SAE_A"), None,
     KmsKeyRejectedError, "not found"),  # a C++ KME
    ("dec_keys", 401, b'{"detail": "Not authorized for requested keys"}', None,
     KmsKeyRejectedError, "Not authorized for requested keys"),  # a FastAPI KME
    ("dec_keys", 410, err("key expired"), None, KmsKeyRejectedError, "key expired"),
    # --- the KME answered with an error that retrying the same request will not fix -----------------
    ("enc_keys", 400, err("number must be 1..4", [{"number": "8"}]), None,
     KmsBadAnswerError, 'number must be 1..4 (details: [{"number":"8"}])'),  # per-request-4
    ("enc_keys", 400, err("The given slave SAE ID is unknown by this KME."), None,
     KmsBadAnswerError, "slave SAE ID"),  # the path's SAE, not the caller
    ("enc_keys", 400, err("slave SAE is not attached to the peer KME", [{"slave_SAE_ID": "SAE_X"}]), None,
     KmsBadAnswerError, "SAE_X"),
    ("enc_keys", 404, err("Required Key value was not found for the SAE ID: SAE_X"), None,
     KmsBadAnswerError, "SAE_X"),  # only dec_keys answers are verdicts on key_IDs
    ("enc_keys", 422, b'{"detail": [{"loc": ["body", "size"], "msg": "value is not a valid integer"}]}', None,
     KmsBadAnswerError, "JSON {"),  # FastAPI validation error
    ("dec_keys", 400, err("key_IDs missing or invalid"), None, KmsBadAnswerError, "key_IDs"),  # our request
    ("dec_keys", 500, err("unknown key_ID"), None, KmsBadAnswerError, "500"),  # a server bug, not a verdict
    ("enc_keys", 500, b"<html><head><title>Error</title></head><body><h1>Internal error</h1></body></html>",
     None, KmsBadAnswerError, 'HTML page "Error" (82 bytes): Internal error'),
    ("status", 404, b"", None, KmsBadAnswerError, "HTTP 404: empty body"),
    ("status", 302, b"", None, KmsBadAnswerError, "HTTP 302"),
    ("enc_keys", 500, b"Internal Server Error\n", "text/plain",
     KmsBadAnswerError, '"Internal Server Error" (22 bytes)'),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "status", "body", "content_type", "kind", "shown"), ANSWERS)
def test_classify_error_reads_real_kme_answers(
    endpoint: str, status: int, body: bytes, content_type: str | None, kind: type[KmsError], shown: str
) -> None:
    verdict = classify_error(endpoint, status, body, content_type)
    assert verdict.kind is kind, verdict.text
    assert verdict.text.startswith(f"HTTP {status}: ") and shown in verdict.text
    assert verdict.status == status


def test_html_is_recognised_without_a_content_type() -> None:
    assert classify_error("status", 502, NGINX_502).text.startswith('HTTP 502: HTML page "502 Bad Gateway"')


# --- one exception per class: hierarchy and attributes ------------------------------------------


def raised(endpoint: str, status: int, body: bytes, key_ids: tuple[str, ...] = ()) -> KmsError:
    return classify_error(endpoint, status, body).error("KME https://kme.test enc_keys", key_ids=key_ids)


def test_unavailable_keeps_status_and_message_and_is_no_bad_answer() -> None:
    error = raised("enc_keys", 503, err("peer KME unreachable"))
    assert type(error) is KmsUnavailableError and not isinstance(error, KmsBadAnswerError)
    assert str(error) == "KME https://kme.test enc_keys: HTTP 503: peer KME unreachable"
    assert (error.status, error.kme_message, error.kme_details) == (503, "peer KME unreachable", ())


def test_exhausted_is_an_unavailable_error() -> None:
    error = raised("enc_keys", 400, err("not enough keys available", [{"stored_key_count": 0}]))
    assert type(error) is KmsExhaustedError and isinstance(error, KmsUnavailableError)
    assert (error.status, error.kme_message, error.kme_details) == (
        400,
        "not enough keys available",
        ('{"stored_key_count":0}',),
    )


def test_auth_error_is_a_bad_answer() -> None:
    error = raised("enc_keys", 401, err("Unauthorized"))
    assert type(error) is KmsAuthError and isinstance(error, KmsBadAnswerError)
    assert error.status == 401 and error.kme_message == "Unauthorized"


def test_key_rejected_carries_the_key_ids_asked_for() -> None:
    error = raised("dec_keys", 400, err("unknown key_ID", [{"key_ID": ID2}]), key_ids=(ID1, ID2))
    assert type(error) is KmsKeyRejectedError and isinstance(error, KmsBadAnswerError)
    assert not isinstance(error, KmsAuthError)
    assert isinstance(error, KmsKeyRejectedError) and error.key_ids == (ID1, ID2)
    assert (error.status, error.kme_message, error.kme_details) == (
        400,
        "unknown key_ID",
        (f'{{"key_ID":"{ID2}"}}',),
    )


def test_bad_answer_keeps_422_details() -> None:
    details = [{"reason": "size must be a multiple of 8"}, {"size": "12"}]
    error = raised("enc_keys", 422, err("invalid request", details))
    assert type(error) is KmsBadAnswerError
    assert error.kme_details == ('{"reason":"size must be a multiple of 8"}', '{"size":"12"}')
    assert 'invalid request (details: [{"reason":"size must be a multiple of 8"},{"size":"12"}])' in str(
        error
    )


def test_existing_constructors_keep_working() -> None:
    assert KmsUnavailableError("peer down").status is None
    old = KmsBadAnswerError("HTTP 400", status=400, kme_message="x")
    assert (old.status, old.kme_message, old.kme_details) == (400, "x", ())
    assert KmsKeyRejectedError("gone", key_ids=[ID1], status=401).key_ids == (ID1,)


# --- body shapes -------------------------------------------------------------------------------------


def test_fastapi_detail_stands_in_for_the_message() -> None:
    verdict = classify_error("enc_keys", 400, b'{"detail": "size shall be a multiple of 8"}')
    assert verdict.kme_message == "size shall be a multiple of 8"
    assert verdict.text == "HTTP 400: size shall be a multiple of 8"


def test_html_page_without_title_shows_its_first_text() -> None:
    page = b"<html>\n<body><h1>502   Bad\nGateway</h1></body></html>"
    verdict = classify_error("enc_keys", 500, page)
    assert verdict.text == f"HTTP 500: HTML page ({len(page)} bytes): 502 Bad Gateway"
    assert verdict.kme_message is None


def test_empty_blank_and_binary_bodies_are_described() -> None:
    assert classify_error("status", 500, b"").text == "HTTP 500: empty body"
    assert classify_error("status", 500, b" \r\n").text == "HTTP 500: blank body (3 bytes)"
    assert classify_error("status", 500, bytes(range(128, 256))).text == "HTTP 500: 128 bytes, not text"


def test_huge_bodies_are_cut() -> None:
    page = b"<html><head><title>" + b"T" * 5000 + b"</title></head><body>" + b"word " * 300_000
    text_body = b"error " * 400_000  # over MAX_BODY_SIZE: not even tried as JSON
    many = err("m" * 5000, [{"entry": i, "text": "x" * 1000} for i in range(1000)])
    deep = err("deep", [json.loads("[" * 500 + "]" * 500)])
    for body in (page, text_body, many, deep):
        verdict = classify_error("enc_keys", 500, body)
        assert len(verdict.text) <= etsi014.ERROR_TEXT_MAX_LEN
        assert verdict.kme_message is None or len(verdict.kme_message) <= etsi014.ERROR_MESSAGE_MAX_LEN
        assert len(verdict.kme_details) <= etsi014.ERROR_DETAILS_MAX_ENTRIES
        assert all(len(d) <= etsi014.ERROR_DETAILS_MAX_LEN for d in verdict.kme_details)
    assert "and 992 more" in classify_error("enc_keys", 500, many).text
    started = time.monotonic()
    classify_error("enc_keys", 500, b'{"message": "' + b"a1B" * 340_000 + b'"}')  # one 1 MiB Base64-like run
    assert time.monotonic() - started < 1.0
    assert f"({len(text_body)} bytes)" in classify_error("enc_keys", 500, text_body).text


def test_key_bytes_in_an_error_body_never_show() -> None:
    leaky = [
        err("x", [{"keys": [{"key_ID": ID1, "key": KEY_B64}]}]),  # a key container in details
        err(f"cannot deliver {KEY_B64} now"),
        f"<html><body>key {KEY_B64}</body></html>".encode(),
        f"key={KEY_B64}".encode(),
        json.dumps({"error": {"key": KEY_B64}}).encode(),
        err("x", [{"reason": "y" * 180 + " " + KEY_B64}]),  # where the entry is cut
        b" " * (64 * 1024 - 20) + KEY_B64.encode(),  # where the scanned head ends, after blank space
    ]
    for body in leaky:
        verdict = classify_error("enc_keys", 500, body)
        shown = " ".join((verdict.text, verdict.kme_message or "", *verdict.kme_details))
        assert KEY_B64 not in shown and KEY_B64[:43] not in shown, shown
    assert ID1 in classify_error("enc_keys", 500, leaky[0]).text  # key_IDs stay readable


@settings(max_examples=400)
@given(
    endpoint=st.sampled_from(["status", "enc_keys", "dec_keys", "other"]),
    status=st.integers(min_value=-1000, max_value=100_000) | st.sampled_from([400, 401, 404, 422, 503]),
    body=st.binary(max_size=1024)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=20,
    ).map(lambda value: json.dumps({"message": "m", "details": value}).encode()),
    content_type=st.none() | st.sampled_from(["text/html", "application/json", "text/plain"]),
)
def test_classify_error_never_raises_and_stays_short(
    endpoint: str, status: int, body: bytes, content_type: str | None
) -> None:
    verdict = classify_error(endpoint, status, body, content_type)
    assert isinstance(verdict, ErrorVerdict) and issubclass(verdict.kind, KmsError)
    assert len(verdict.text) <= etsi014.ERROR_TEXT_MAX_LEN and verdict.text.isprintable()
    assert verdict.kme_message is None or len(verdict.kme_message) <= etsi014.ERROR_MESSAGE_MAX_LEN
    assert all(len(d) <= etsi014.ERROR_DETAILS_MAX_LEN and d.isprintable() for d in verdict.kme_details)
    if status in (429, 502, 503, 504):
        assert issubclass(verdict.kind, KmsUnavailableError)
    if verdict.kind is KmsKeyRejectedError:
        assert endpoint == "dec_keys"
    assert isinstance(verdict.error("KME", key_ids=[ID1]), verdict.kind)


@settings(max_examples=200)
@given(key=st.binary(min_size=32, max_size=64), where=st.sampled_from(["message", "details", "text", "html"]))
def test_classify_error_never_shows_a_key(key: bytes, where: str) -> None:
    text = base64.b64encode(key).decode()
    body = {
        "message": err(f"refused {text}"),
        "details": err("refused", [{"key_ID": ID1, "key": text}]),
        "text": f"refused {text}".encode(),
        "html": f"<html><title>refused {text}</title></html>".encode(),
    }[where]
    verdict = classify_error("enc_keys", 500, body)
    shown = " ".join((verdict.text, verdict.kme_message or "", *verdict.kme_details))
    mixed = any(c.isdigit() for c in text) and any(c.isupper() for c in text)
    mixed = mixed and any(c.islower() for c in text)
    if where == "details" or mixed:  # a run of one case without digits is no Base64 key in practice
        assert text[:43] not in shown


# --- key material in other forms (review 11 B): hex, pieces, short keys, byte arrays ----------------

LEAK = bytes.fromhex("07aa5fdb9b264b30fb997496f7ce82290c6cc624729244c460ca65d5a38e782e")  # a random key
LEAK_B64 = base64.b64encode(LEAK).decode()


BYTES = ",".join(map(str, LEAK[:3]))  # "7,170,95"


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _url(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def _pieces(text: str, size: int) -> str:
    return " ".join(text[i : i + size] for i in range(0, len(text), size))


def _shown(verdict: ErrorVerdict) -> str:
    return " ".join((verdict.text, verdict.kme_message or "", *verdict.kme_details))


def _visible(encoded: str, shown: str) -> bool:
    """Tell whether 8 characters in a row of ``encoded`` (pieces joined) show in ``shown`` (spaces out)."""
    raw, seen = encoded.replace(" ", "").lower(), shown.replace(" ", "").lower()
    return any(raw[i : i + 8] in seen for i in range(len(raw) - 7))


LEAKY_FORMS: list[tuple[str, bytes, str | None, str]] = [
    ("hex in the message", err(f"key_ID abc key {LEAK.hex()} does not exist"), None, LEAK.hex()),
    ("HEX in the message", err(f"key {LEAK.hex().upper()} mismatch"), None, LEAK.hex()),
    ("0x hex", err(f"key 0x{LEAK.hex()} mismatch"), None, LEAK.hex()),
    ("colon hex", err(f"key {':'.join(f'{b:02x}' for b in LEAK)}"), None, LEAK.hex()),
    ("hex in pieces", err(f"key {_pieces(LEAK.hex(), 8)}"), None, LEAK.hex()),
    ("hex in details", err("invalid request", [{"dump": LEAK.hex()}]), None, LEAK.hex()),
    ("byte array in details", err("invalid", [{"key": None, "raw": list(LEAK)}]), None, BYTES),
    ("byte array as text", err(f"key bytes {list(LEAK)}"), None, BYTES),
    ("signed byte array", err("x", [[b - 256 if b > 127 else b for b in LEAK]]), None, "-86,95,-37"),
    ("member 'Key'", err("bad", [{"Key": LEAK_B64}]), None, LEAK_B64),
    ("member 'key_material'", err("bad", [{"key_material": "not Base64 but secret"}]), None, "not Base64"),
    ("Base64 in pieces of 8", err("dump: " + _pieces(LEAK_B64, 8)), None, LEAK_B64),
    ("Base64 in pieces of 4", err("dump " + _pieces(LEAK_B64, 4)), None, LEAK_B64),
    ("Base64 on lines", err("dump:\n" + "\n".join(_pieces(LEAK_B64, 16).split())), None, LEAK_B64),
    *[(f"{bits}-bit key", err(f"key {_b64(LEAK[: bits // 8])} consumed"), None, _b64(LEAK[: bits // 8]))
      for bits in (64, 128, 192, 248)],
    ("128-bit base64url", err(f"key {_url(LEAK[:16])}"), None, _url(LEAK[:16])),
    ("hex in an HTML page", f"<html><head><title>Error</title></head><body><pre>keys[0].key={LEAK.hex()}"
     "</pre></body></html>".encode(), None, LEAK.hex()),
    ("hex in plain text", f"Internal error: key={LEAK.hex()}".encode(), "text/plain", LEAK.hex()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("form", "body", "content_type", "encoded"), LEAKY_FORMS, ids=[f[0] for f in LEAKY_FORMS]
)
def test_key_material_in_any_form_is_redacted(
    form: str, body: bytes, content_type: str | None, encoded: str
) -> None:
    verdict = classify_error("dec_keys", 400, body, content_type)
    shown = _shown(verdict)
    assert not _visible(encoded, shown) and encoded not in shown.replace(" ", ""), shown
    assert etsi014.REDACTED in shown or etsi014.HIDDEN in shown


def test_redaction_keeps_uuid_key_ids_words_and_the_verdict() -> None:
    verdict = classify_error(
        "dec_keys", 400, err(f"key_ID {ID1} key {LEAK.hex()} does not exist", [{"key_ID": ID2}])
    )
    assert verdict.kind is KmsKeyRejectedError
    assert (
        verdict.text
        == f'HTTP 400: key_ID {ID1} key <redacted> does not exist (details: [{{"key_ID":"{ID2}"}}])'
    )
    short = base64.b64encode(LEAK[:16]).decode()
    assert classify_error("dec_keys", 400, err(f"key {short} consumed")).kind is KmsKeyRejectedError
    for readable in (
        "max_key_per_request 128 exceeded",
        "no route for POST /api/v1/keys/SAE_B/enc_keys",
        "additional_slave_SAE_IDs not supported",
        "There is not enough key material for requested parameters.",
        "size 256 not in [64, 128, 256, 512]",
        "KME_A -> KME_B at 2026-05-09T07:35:25Z",
        "2 x 256 bits asked, 0 x 256 bits stored",
    ):
        assert classify_error("enc_keys", 400, err(readable)).kme_message == readable


@settings(max_examples=300)
@given(
    key=st.binary(min_size=8, max_size=64).filter(lambda k: len(k) % 3),  # padded standard Base64
    form=st.sampled_from(["b64", "b64 pieces 4", "b64 pieces 8", "hex", "HEX", "array", "text array"]),
    where=st.sampled_from(["message", "details", "text", "html"]),
)
def test_padded_base64_hex_and_byte_arrays_never_show(key: bytes, form: str, where: str) -> None:
    b64 = base64.b64encode(key).decode()
    value: object = {
        "b64": b64,
        "b64 pieces 4": _pieces(b64, 4),
        "b64 pieces 8": _pieces(b64, 8),
        "hex": key.hex(),
        "HEX": key.hex().upper(),
        "array": list(key),
        "text array": str(list(key)),
    }[form]
    text = json.dumps(value) if isinstance(value, list) else value
    body = {
        "message": err(f"refused {text} now"),
        "details": json.dumps({"message": "refused", "details": [{"dump": value}]}).encode(),
        "text": f"refused {text} now".encode(),
        "html": f"<html><title>refused</title><body>{text}</body></html>".encode(),
    }[where]
    shown = _shown(classify_error("enc_keys", 500, body))
    if form in ("array", "text array"):
        assert ",".join(map(str, key[:8])) not in shown.replace(" ", "")
    else:
        assert not _visible(str(value), shown), shown


@given(key_id=st.uuids(), upper=st.booleans())
def test_uuid_key_ids_stay_readable(key_id: object, upper: bool) -> None:
    shown = str(key_id).upper() if upper else str(key_id)
    verdict = classify_error("dec_keys", 400, err(f"unknown key_ID {shown}", [{"key_ID": shown}]))
    assert verdict.kme_message == f"unknown key_ID {shown}" and shown in verdict.kme_details[0]


# --- Status with limits of 0 (issue 11: "KME unreachable" while keys were served) --------------------

ZERO_LIMITS = {
    "source_KME_ID": "KME_A",
    "target_KME_ID": "KME_B",
    "master_SAE_ID": "SAE_A",
    "slave_SAE_ID": "SAE_B",
    "key_size": 256,
    "stored_key_count": 0,
    "max_key_count": 0,
    "max_key_per_request": 0,
    "max_key_size": 0,
    "min_key_size": 0,
    "max_SAE_ID_count": 0,
}


def status_of(**fields: int) -> Status:
    return etsi014.parse_status(json.dumps({**ZERO_LIMITS, **fields}).encode(), slave_sae_id="SAE_B")


def test_parse_status_accepts_zero_limits_as_not_stated() -> None:
    status = status_of()
    assert (status.key_size, status.max_key_size, status.min_key_size) == (256, 0, 0)
    assert status.per_request_limit() is None and status.key_count_limit() is None
    assert status.default_key_size() == 256
    assert status.key_size_allowed(256) is None


def test_parse_status_orders_only_the_stated_sizes() -> None:
    assert status_of(min_key_size=64).key_size == 256
    assert status_of(max_key_size=1024, key_size=0).default_key_size() is None
    unordered = [
        {"min_key_size": 512},
        {"max_key_size": 128},
        {"key_size": 0, "min_key_size": 512, "max_key_size": 256},
    ]
    for bad in unordered:
        with pytest.raises(KmsBadAnswerError, match="key sizes not ordered"):
            status_of(**bad)


def test_status_helpers_read_stated_limits() -> None:
    status = status_of(max_key_count=1000, max_key_per_request=4, min_key_size=64, max_key_size=1024)
    assert (status.per_request_limit(), status.key_count_limit()) == (4, 1000)
    assert [status.key_size_allowed(bits) for bits in (32, 64, 1024, 2048)] == [False, True, True, False]
    only_max = status_of(max_key_size=512)
    assert [only_max.key_size_allowed(bits) for bits in (256, 1024)] == [None, False]


# --- short answers ------------------------------------------------------------------------------------


def test_short_answer_keeps_every_valid_key() -> None:
    keys = etsi014.parse_enc_keys(container((ID1, KEY), (ID2, KEY[::-1])), number=4, size_bits=256)
    assert [k.key_id for k in keys] == [ID1, ID2] and keys[1].key.reveal() == KEY[::-1]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (container((ID1, KEY), (ID2, bytes(16))), "has 128 bits"),
        (container((ID1, KEY), (ID1, KEY)), "duplicate key_ID"),
        (json.dumps({"keys": [{"key_ID": ID1, "key": KEY_B64.rstrip("=")}]}).encode(), "Base64"),
        (container((ID1, KEY), (ID2, KEY), (ID3, KEY)), "asked for 2 keys, got 3"),
    ],
)
def test_short_answer_is_checked_key_by_key(answer: bytes, error: str) -> None:
    with pytest.raises(KmsBadAnswerError, match=error):
        etsi014.parse_enc_keys(answer, number=2, size_bits=256)


# --- the client against a canned HTTPS KME ---------------------------------------------------------


@pytest.fixture(scope="module")
def canned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Canned, Etsi014Client]]:
    pki: Path = tmp_path_factory.mktemp("pki")
    make_pki(pki, kmes={"KME_A": ["127.0.0.1"]}, saes=["SAE_A"])
    with serve_canned(pki, timeout=5.0) as served:
        yield served


def test_client_returns_a_short_answer(canned: tuple[Canned, Etsi014Client]) -> None:
    fake, client = canned
    fake.answer = (200, container((ID1, KEY)))
    assert [k.key_id for k in client.enc_keys("SAE_B", number=3, size_bits=256)] == [ID1]


def test_client_calls_an_empty_answer_exhausted(canned: tuple[Canned, Etsi014Client]) -> None:
    fake, client = canned
    fake.answer = (200, b'{"keys": []}')
    with pytest.raises(KmsExhaustedError):
        client.enc_keys("SAE_B", number=2, size_bits=256)
    fake.answer = (400, err("not enough keys available"))
    with pytest.raises(KmsExhaustedError, match=r"enc_keys: HTTP 400: not enough keys available$") as info:
        client.enc_keys("SAE_B")
    assert info.value.status == 400


def test_client_rejects_key_ids_with_their_ids(canned: tuple[Canned, Etsi014Client]) -> None:
    fake, client = canned
    fake.answer = (401, err("key_ID already retrieved", [{"key_ID": ID1}]))
    with pytest.raises(KmsKeyRejectedError) as info:
        client.dec_keys("SAE_B", [ID1, ID2])
    assert info.value.key_ids == (ID1, ID2) and info.value.kme_details == (f'{{"key_ID":"{ID1}"}}',)
    fake.answer = (401, err("caller is not an SAE attached to this KME"))
    with pytest.raises(KmsAuthError) as auth:
        client.dec_keys("SAE_B", [ID1])
    assert not isinstance(auth.value, KmsKeyRejectedError)


def test_client_summarises_an_html_error(canned: tuple[Canned, Etsi014Client]) -> None:
    fake, client = canned
    fake.answer = (500, tomcat_page(500, "Internal Server Error", "NullPointerException"))
    with pytest.raises(
        KmsBadAnswerError, match='HTTP 500: HTML page "HTTP Status 500 - Internal Server Error" '
    ):
        client.status("SAE_B")
