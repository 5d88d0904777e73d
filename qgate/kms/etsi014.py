"""ETSI GS QKD 014 v1.1.1 data formats (section 6): models, encoders and strict parsers (sans-I/O).

The parsers check every answer a KME gives against what was asked: valid UTF-8 JSON without
duplicate names, field types, the number of keys, each key's length in bits, strict Base64
(RFC 4648 section 4, canonical padding), unique key_IDs and, for "Get key with key IDs", the
returned set of key_IDs. Any violation raises :class:`~qgate.errors.KmsBadAnswerError`; the one
other exception a parser raises is :class:`~qgate.errors.KmsExhaustedError`, for a 200 Key
container with no key in it (:func:`parse_enc_keys`). Key bytes are wrapped in
:class:`~qgate.crypto.secret.Secret` at once and never appear in an error message.

:func:`classify_error` reads a non-200 answer (section 6.5 Error body, or whatever a proxy or
framework sent instead) and says which :class:`~qgate.errors.KmsError` it means, with a short
printable summary; it never raises. A KME may echo key material in such an answer: hex runs,
Base64 runs (also printed in pieces) and byte arrays are shown as ``<redacted>`` in the summary
(a heuristic for Base64: see REDACTED and NOISE_PER_CHAR), UUID key_IDs stay readable.
"""

from __future__ import annotations

import base64
import binascii
import html
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeGuard

from qgate.crypto.secret import Secret
from qgate.errors import (
    KmsAuthError,
    KmsBadAnswerError,
    KmsError,
    KmsExhaustedError,
    KmsKeyRejectedError,
    KmsUnavailableError,
)
from qgate.kms.redact import (
    HIDDEN,
    REDACTED,
    byte_array,
    redact_cut,
    secret_name,
    without_cut_tail,
)

JsonObject = dict[str, object]
"""A decoded JSON object."""

MAX_BODY_SIZE: Final = 1 << 20
"""Bytes: the largest KME answer body accepted (1 MiB; 128 keys of 8192 bits need ~150 KiB)."""
KEY_ID_MAX_LEN: Final = 128
"""Characters: the longest key_ID accepted (section 6.3 asks for a UUID, 36 characters)."""
SAE_ID_MAX_LEN: Final = 128
"""Characters: the longest SAE or KME ID accepted."""
ERROR_MESSAGE_MAX_LEN: Final = 200
"""Characters of a KME error ``message`` kept (the rest is cut, for logs and exceptions)."""
ERROR_DETAILS_MAX_LEN: Final = 200
"""Characters of the compact-JSON summary of an Error's ``details`` (and of each kept entry)."""
ERROR_DETAILS_MAX_ENTRIES: Final = 8
"""``details`` entries kept in ``kme_details`` (the rest are counted in the summary only)."""
ERROR_TEXT_MAX_LEN: Final = 600
"""Characters: the longest summary :func:`classify_error` returns (status, message, details)."""
LIMIT_NOT_STATED: Final = 0
"""A Status limit of 0 (``max_key_count``, ``max_key_per_request``, ``max/min_key_size``,
``key_size``): not stated. ETSI GS QKD 014 section 6.1 gives 0 no meaning there; real KMEs send
it for limits they leave unset, and still serve keys."""

_STATUS_STR_FIELDS: Final = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")
_STATUS_INT_FIELDS: Final = (
    "key_size",
    "stored_key_count",
    "max_key_count",
    "max_key_per_request",
    "max_key_size",
    "min_key_size",
    "max_SAE_ID_count",
)


@dataclass(frozen=True, slots=True)
class Status:
    """Status data format (ETSI GS QKD 014 section 6.1), as seen by the calling (master) SAE.

    The fields hold what the KME sent. A 0 in ``key_size``, ``max_key_count``,
    ``max_key_per_request``, ``max_key_size`` or ``min_key_size`` means "not stated"
    (LIMIT_NOT_STATED): read those through the helper methods, which say None then.

    Attributes:
        source_KME_ID: the KME answering (the master SAE's KME).
        target_KME_ID: the KME the slave SAE is attached to.
        master_SAE_ID: the calling SAE.
        slave_SAE_ID: the SAE named in the request path.
        key_size: default key size, bits (0: not stated).
        stored_key_count: keys (of ``key_size`` bits) ready for the master SAE now (some KMEs
            always say 0).
        max_key_count: the most keys the KME stores for this pair (0: not stated).
        max_key_per_request: the most keys one request may ask for (0: not stated).
        max_key_size: largest key size a request may ask for, bits (0: not stated).
        min_key_size: smallest key size a request may ask for, bits (0: not stated).
        max_SAE_ID_count: the most ``additional_slave_SAE_IDs`` a request may name (0: none).
        status_extension: vendor extension object, if the KME sent one.
    """

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_SAE_ID_count: int
    status_extension: JsonObject | None = None

    def per_request_limit(self) -> int | None:
        """Return ``max_key_per_request``, or None when the KME did not state it (0)."""
        return self.max_key_per_request or None

    def key_count_limit(self) -> int | None:
        """Return ``max_key_count``, or None when the KME did not state it (0)."""
        return self.max_key_count or None

    def default_key_size(self) -> int | None:
        """Return ``key_size`` in bits, or None when the KME did not state it (0)."""
        return self.key_size or None

    def key_size_allowed(self, bits: int) -> bool | None:
        """Tell whether keys of ``bits`` bits are within the KME's stated size limits.

        Returns:
            False when a stated limit (``min_key_size`` or ``max_key_size``) excludes ``bits``;
            True when both limits are stated and allow it; None when no stated limit excludes
            it but at least one is not stated (ask, and read the answer).
        """
        low, high = self.min_key_size or None, self.max_key_size or None
        if (low is not None and bits < low) or (high is not None and bits > high):
            return False
        return True if low is not None and high is not None else None

    def to_json(self) -> bytes:
        """Encode as the section 6.1 JSON object (UTF-8 bytes); ``status_extension`` only when set."""
        obj: JsonObject = {name: getattr(self, name) for name in _STATUS_STR_FIELDS + _STATUS_INT_FIELDS}
        if self.status_extension is not None:
            obj["status_extension"] = self.status_extension
        return dumps_json(obj)


@dataclass(frozen=True, slots=True)
class QkdKey:
    """One key from a Key container (section 6.3): its key_ID and the key bytes (secret).

    Attributes:
        key_id: the key_ID string (a UUID for conforming KMEs); safe to log.
        key: the key bytes; ``len(key) * 8`` bits.
    """

    key_id: str
    key: Secret

    @property
    def size_bits(self) -> int:
        """Length of the key in bits."""
        return len(self.key) * 8


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """Error data format (section 6.5), as far as the KME sent one.

    Attributes:
        message: the ``message`` string (printable, cut to ERROR_MESSAGE_MAX_LEN), or None.
        details: the ``details`` array (each entry an object by the spec), empty if absent.
    """

    message: str | None
    details: tuple[object, ...] = ()


# --- encoders ------------------------------------------------------------------------------------


def encode_key_request(number: int, size_bits: int, additional_slave_sae_ids: Sequence[str] = ()) -> bytes:
    """Encode a Key request (section 6.2) for ``POST .../enc_keys``.

    Args:
        number: keys asked for (>= 1).
        size_bits: size of each key in bits (> 0, a multiple of 8 for qgate).
        additional_slave_sae_ids: extra slave SAEs (key multicast); sent only when non-empty.

    Returns:
        UTF-8 JSON ``{"number": n, "size": s[, "additional_slave_SAE_IDs": [...]]}``.
    """
    obj: JsonObject = {"number": number, "size": size_bits}
    if additional_slave_sae_ids:
        obj["additional_slave_SAE_IDs"] = list(additional_slave_sae_ids)
    return dumps_json(obj)


def encode_key_ids(key_ids: Sequence[str]) -> bytes:
    """Encode Key IDs (section 6.4) for ``POST .../dec_keys``: ``{"key_IDs": [{"key_ID": id}, ...]}``."""
    return dumps_json({"key_IDs": [{"key_ID": key_id} for key_id in key_ids]})


def encode_key_container(keys: Sequence[QkdKey]) -> bytes:
    """Encode a Key container (section 6.3): ``{"keys": [{"key_ID": id, "key": base64}, ...]}``.

    Used by the KME simulator; this is the one place key bytes are revealed for encoding.
    """
    entries = [{"key_ID": k.key_id, "key": base64.b64encode(k.key.reveal()).decode("ascii")} for k in keys]
    return dumps_json({"keys": entries})


def encode_error(message: str, details: Sequence[Mapping[str, object]] = ()) -> bytes:
    """Encode an Error (section 6.5): ``{"message": str, "details": [object, ...]}``."""
    return dumps_json({"message": message, "details": [dict(d) for d in details]})


# --- parsers -------------------------------------------------------------------------------------


def parse_status(body: bytes, *, slave_sae_id: str | None = None) -> Status:
    """Parse and check a Status answer (section 6.1).

    Args:
        body: the HTTP 200 answer body.
        slave_sae_id: the slave SAE ID asked about; when given, ``slave_SAE_ID`` must equal it.

    Returns:
        The Status.

    A 0 in ``key_size``, ``max_key_count``, ``max_key_per_request``, ``max_key_size`` or
    ``min_key_size`` is accepted as "not stated" (LIMIT_NOT_STATED): section 6.1 defines no 0
    there, and real KMEs send all-zero limits while serving keys normally. The size ordering
    is checked between the sizes that are stated only.

    Raises:
        KmsBadAnswerError: not a JSON object, a field missing or of the wrong type, a negative
            count or size, the stated (non-zero) sizes not ordered ``min_key_size <= key_size
            <= max_key_size``, or the wrong slave.
    """
    obj = _object(loads_json(body, "status"), "status")
    strs = {name: _id_field(obj, name, "status") for name in _STATUS_STR_FIELDS}
    ints = {name: _int_field(obj, name, "status", minimum=0) for name in _STATUS_INT_FIELDS}
    extension = _optional_object(obj, "status_extension", "status")
    stated = [ints[name] for name in ("min_key_size", "key_size", "max_key_size") if ints[name]]
    if stated != sorted(stated):
        raise _bad("status: key sizes not ordered min_key_size <= key_size <= max_key_size (0: unstated)")
    if slave_sae_id is not None and strs["slave_SAE_ID"] != slave_sae_id:
        raise _bad(f"status: slave_SAE_ID is {strs['slave_SAE_ID']!r}, asked about {slave_sae_id!r}")
    return Status(
        source_KME_ID=strs["source_KME_ID"],
        target_KME_ID=strs["target_KME_ID"],
        master_SAE_ID=strs["master_SAE_ID"],
        slave_SAE_ID=strs["slave_SAE_ID"],
        key_size=ints["key_size"],
        stored_key_count=ints["stored_key_count"],
        max_key_count=ints["max_key_count"],
        max_key_per_request=ints["max_key_per_request"],
        max_key_size=ints["max_key_size"],
        min_key_size=ints["min_key_size"],
        max_SAE_ID_count=ints["max_SAE_ID_count"],
        status_extension=extension,
    )


def parse_enc_keys(body: bytes, *, number: int, size_bits: int) -> list[QkdKey]:
    """Parse and check the Key container answering "Get key" (section 5.2, format 6.3).

    A KME short of keys may answer 200 with fewer keys than asked (products that hand out what
    one batch holds): those keys are valid and consumed at the KME, so they are returned, not
    thrown away. Every key is checked as in a full answer.

    Args:
        body: the HTTP 200 answer body.
        number: keys asked for (>= 1); at most this many may come back.
        size_bits: size asked for; every key must have exactly this many bits.

    Returns:
        At least 1 and at most ``number`` keys, in the KME's order, with distinct key_IDs.

    Raises:
        KmsExhaustedError: a valid container with no key (``status`` 200).
        KmsBadAnswerError: malformed container, more keys than asked, a key of the wrong length
            (for instance a KME counting ``size`` in bytes), non-canonical Base64, a bad or
            duplicate key_ID.
    """
    keys = parse_key_container(body)
    if not keys:
        raise KmsExhaustedError(f"enc_keys: HTTP 200 with no key (asked for {number})", status=200)
    if len(keys) > number:
        raise _bad(f"enc_keys: asked for {number} keys, got {len(keys)}")
    _check_sizes(keys, size_bits, "enc_keys")
    return keys


def parse_dec_keys(body: bytes, *, key_ids: Sequence[str], size_bits: int | None = None) -> list[QkdKey]:
    """Parse and check the Key container answering "Get key with key IDs" (section 5.3, format 6.3).

    Args:
        body: the HTTP 200 answer body.
        key_ids: the key_IDs asked for (distinct); exactly these must come back.
        size_bits: when given, every key must have exactly this many bits.

    Returns:
        The keys in the order of ``key_ids``.

    Raises:
        KmsBadAnswerError: malformed container, a missing, extra or duplicate key_ID, a key of
            the wrong length, non-canonical Base64.
    """
    keys = parse_key_container(body)
    by_id = {k.key_id: k for k in keys}
    if set(by_id) != set(key_ids) or len(keys) != len(key_ids):
        missing = sorted(set(key_ids) - set(by_id))
        extra = sorted(set(by_id) - set(key_ids))
        raise _bad(f"dec_keys: key_IDs do not match the request (missing {missing}, unasked {extra})")
    if size_bits is not None:
        _check_sizes(keys, size_bits, "dec_keys")
    return [by_id[key_id] for key_id in key_ids]


def parse_key_container(body: bytes) -> list[QkdKey]:
    """Parse a Key container (section 6.3) without checking it against a request.

    Checks the JSON, that ``keys`` is an array of objects each with a valid ``key_ID`` and a
    non-empty canonical Base64 ``key``, that optional extensions are objects, and that no
    key_ID repeats.

    Raises:
        KmsBadAnswerError: on any violation.
    """
    obj = _object(loads_json(body, "key container"), "key container")
    _optional_object(obj, "key_container_extension", "key container")
    raw_keys = obj.get("keys")
    if not isinstance(raw_keys, list):
        raise _bad("key container: 'keys' missing or not an array")
    keys: list[QkdKey] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_keys):
        key = _parse_key_entry(raw, f"keys[{index}]")
        if key.key_id in seen:
            raise _bad(f"key container: duplicate key_ID {key.key_id!r}")
        seen.add(key.key_id)
        keys.append(key)
    return keys


def parse_error_body(body: bytes) -> ErrorBody:
    """Read an Error body (section 6.5) from a non-200 answer; never raises.

    Empty, non-JSON (an HTML error page), or oddly shaped bodies give ``ErrorBody(None)``. The
    message is the ``message`` string, else a string ``detail`` or ``error`` member (FastAPI and
    other web frameworks), with non-printable characters replaced, what may be key material
    redacted (hex, Base64, number lists; see REDACTED), cut to ERROR_MESSAGE_MAX_LEN. The
    details are the ``details`` array, else a ``detail`` array (FastAPI's 422 validation errors).
    """
    try:
        obj = loads_json(body, "error")
    except KmsBadAnswerError:
        return ErrorBody(None)
    return _error_fields(obj) if isinstance(obj, dict) else ErrorBody(None)


@dataclass(frozen=True, slots=True)
class ErrorVerdict:
    """What a KME's error answer means (:func:`classify_error`).

    Attributes:
        kind: the class to raise: KmsUnavailableError, KmsExhaustedError, KmsAuthError,
            KmsKeyRejectedError or KmsBadAnswerError.
        text: ``HTTP 400: message (details: [...])``, ``HTTP 502: HTML page "Bad Gateway" (150
            bytes)``, ``HTTP 404: empty body``...; printable, at most ERROR_TEXT_MAX_LEN characters.
        status: the HTTP status.
        kme_message: the Error's message (see :func:`parse_error_body`), or None.
        kme_details: the first ERROR_DETAILS_MAX_ENTRIES ``details`` entries, each compact JSON
            cut to ERROR_DETAILS_MAX_LEN characters, members named like a key shown as ``<SECRET>``
            and what may be key material as ``<redacted>``.
    """

    kind: type[KmsError]
    text: str
    status: int
    kme_message: str | None = None
    kme_details: tuple[str, ...] = ()

    def error(self, where: str, *, key_ids: Sequence[str] = ()) -> KmsError:
        """Build the exception ``"{where}: {text}"``; ``key_ids`` is kept by a KmsKeyRejectedError."""
        text = f"{where}: {self.text}"
        error = self.kind(
            text, status=self.status, kme_message=self.kme_message, kme_details=self.kme_details
        )
        if isinstance(error, KmsKeyRejectedError):
            error.key_ids = tuple(key_ids)
        return error


def classify_error(endpoint: str, status: int, body: bytes, content_type: str | None = None) -> ErrorVerdict:
    """Say what a KME's non-200 answer means (ETSI GS QKD 014 sections 5.1-5.3 and 6.5); never raises.

    ETSI defines 400, 401 and 503 only; products also send 404, 422, 500, HTML pages and
    framework bodies, and say "store empty" or "key consumed" with any of them. So the status
    and the wording of the answer's text decide, first match wins:

    1. 429, 502, 503, 504: KmsExhaustedError if the text says there is not enough key, else
       KmsUnavailableError (never Rejected, never Auth).
    2. any status outside 400..599: KmsBadAnswerError.
    3. text about the caller's certificate, authentication, TLS or SAE identity: KmsAuthError
       (on dec_keys too: "wrong SAE certificate" is no verdict on the key_IDs).
    4. dec_keys, status 400, 401, 403, 404, 409, 410 or 422, text naming keys with a refusal
       ("unknown key_ID", "key_ID already retrieved", "keys do not exist", "Not authorized for
       requested keys"): KmsKeyRejectedError.
    5. 401, 403, 495, 496 (nginx client-certificate errors), or "unauthorized"/"forbidden" text:
       KmsAuthError.
    6. text saying the store is empty ("not enough keys available", "There is not enough key
       material for requested parameters.", "Insufficient keys in pool", "No keys found in
       storage", "Key pool exhausted"): KmsExhaustedError.
    7. anything else: KmsBadAnswerError.

    The text is the JSON body (message, details and every other member), an HTML page's title
    and text, or a plain body's first characters.

    Args:
        endpoint: ``status``, ``enc_keys`` or ``dec_keys``: the request answered.
        status: the HTTP status code.
        body: the answer body (any bytes; at most MAX_BODY_SIZE are parsed as JSON, 64 KiB scanned
            as text).
        content_type: the Content-Type header, when known; ``html`` in it marks an HTML page.

    Returns:
        The verdict with a summary, message and details in which what may be key material (hex
        runs, Base64 runs also when printed in pieces, byte arrays) reads ``<redacted>`` and UUID
        key_IDs stay readable (see REDACTED).
    """
    error, summary, haystack = _summarize(body, content_type)
    code = str(status) if 0 <= status <= 999 else "(invalid status)"
    details = tuple(_compact(d, ERROR_DETAILS_MAX_LEN) for d in error.details[:ERROR_DETAILS_MAX_ENTRIES])
    text = _cut(f"HTTP {code}: {summary}", ERROR_TEXT_MAX_LEN)
    return ErrorVerdict(_error_kind(endpoint, status, haystack), text, status, error.message, details)


def loads_json(body: bytes, what: str) -> object:
    """Decode ``body`` as strict UTF-8 JSON (RFC 8259): no duplicate names, NaN or Infinity.

    Args:
        body: at most MAX_BODY_SIZE bytes.
        what: what the body is, for the error message.

    Raises:
        KmsBadAnswerError: too large, not UTF-8, not JSON, nested too deep, duplicate names.
    """
    if len(body) > MAX_BODY_SIZE:
        raise _bad(f"{what}: body of {len(body)} bytes exceeds {MAX_BODY_SIZE}")
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=_unique_names, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"{what}: not valid JSON ({type(exc).__name__})") from exc


def valid_id(value: object, max_len: int = KEY_ID_MAX_LEN) -> TypeGuard[str]:
    """Tell whether ``value`` is a usable key_ID/SAE ID: 1..max_len printable ASCII, no spaces."""
    return (
        isinstance(value, str) and 0 < len(value) <= max_len and all(0x21 <= ord(ch) <= 0x7E for ch in value)
    )


def decode_key(text: str) -> bytes:
    """Decode a ``key`` field: standard Base64 with padding, canonical (RFC 4648 sections 3.5, 4).

    Raises:
        ValueError: not canonical standard Base64 (the caller maps it to its own error).
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError("not Base64") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("non-canonical Base64")
    return raw


# --- helpers -------------------------------------------------------------------------------------


def _parse_key_entry(raw: object, where: str) -> QkdKey:
    entry = _object(raw, where)
    key_id = entry.get("key_ID")
    if not valid_id(key_id):
        raise _bad(f"{where}: key_ID missing or invalid")
    text = entry.get("key")
    if not isinstance(text, str):
        raise _bad(f"{where} ({key_id}): key missing or not a string")
    try:
        raw_key = decode_key(text)
    except ValueError as exc:
        raise _bad(f"{where} ({key_id}): key is not canonical Base64") from exc
    if not raw_key:
        raise _bad(f"{where} ({key_id}): key is empty")
    _optional_object(entry, "key_ID_extension", where)
    _optional_object(entry, "key_extension", where)
    return QkdKey(key_id, Secret(raw_key))


def _check_sizes(keys: Sequence[QkdKey], size_bits: int, what: str) -> None:
    for key in keys:
        if key.size_bits != size_bits:
            raise _bad(f"{what}: key {key.key_id} has {key.size_bits} bits, asked for {size_bits}")


def _object(value: object, where: str) -> JsonObject:
    if not isinstance(value, dict):
        raise _bad(f"{where}: not a JSON object")
    return value


def _optional_object(obj: JsonObject, name: str, where: str) -> JsonObject | None:
    value = obj.get(name)
    if value is None or isinstance(value, dict):
        return value
    raise _bad(f"{where}: {name} is not an object")


def _id_field(obj: JsonObject, name: str, where: str) -> str:
    value = obj.get(name)
    if not valid_id(value, SAE_ID_MAX_LEN):
        raise _bad(f"{where}: {name} missing or not a valid ID")
    return value


def _int_field(obj: JsonObject, name: str, where: str, *, minimum: int) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{where}: {name} missing or not an integer")
    if value < minimum:
        raise _bad(f"{where}: {name} is {value}, below {minimum}")
    return value


def _unique_names(pairs: list[tuple[str, object]]) -> JsonObject:
    obj: JsonObject = {}
    for name, value in pairs:
        if name in obj:
            raise ValueError(f"duplicate name {name!r}")
        obj[name] = value
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# --- error answers: wording and summaries ------------------------------------------------------

_UNAVAILABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
_AUTH_STATUSES: Final = frozenset({401, 403, 495, 496})
_REJECTING_STATUSES: Final = frozenset({400, 401, 403, 404, 409, 410, 422})
_CALLER_AUTH: Final = re.compile(
    r"certificate|\bcert\b|\bauthenticat|\b(?:ssl|tls)\b|\bcaller\b|\bcalling (?:sae|application|party)\b"
    r"|\brequesting sae\b|\bclient (?:sae|identity)\b"
    r"|(?<!slave )(?<!master )(?<!target )(?<!peer )\bsae(?:[ _]?id)?(?: is)? (?:not |un)"
    r"(?:authori[sz]ed|allowed|permitted|registered|known)",
    re.IGNORECASE,
)
"""The caller's certificate or SAE identity (the path's slave/master SAE IDs are not the caller)."""
_REFUSED: Final = re.compile(
    r"\bunauthori[sz]ed\b|\bnot authori[sz]ed\b|\bforbidden\b|\baccess denied\b|\bpermission denied\b",
    re.IGNORECASE,
)
_KEY_WORD: Final = re.compile(r"\bkey(?:s|[ _]?ids?)?\b", re.IGNORECASE)
_KEY_REFUSAL: Final = re.compile(
    r"not found|\bunknown\b|\bno such\b|\bno (?:matching )?keys? (?:were )?found|\bdo(?:es)? not exist"
    r"|\bdoesn'?t exist|\bno longer\b|\bconsumed\b|\balready (?:been )?(?:used|retrieved|delivered|requested"
    r"|fetched|consumed|taken|read)|\bexpired\b|\bdeleted\b|\brevoked\b|\bsuperseded\b|\bdiscarded\b"
    r"|\bnot delivered\b|\bnot (?:authori[sz]ed|allowed|permitted|intended) for\b|\bnot (?:involved|shared)\b"
    r"|\binvalid key[ _]?ids?\b",
    re.IGNORECASE,
)
_NO_KEY: Final = re.compile(
    r"\bnot enough (?:qkd )?key|\binsufficient (?:qkd )?key|\bno key material\b"
    r"|\bno (?:more )?(?:qkd )?keys? (?:material )?(?:is |are )?(?:available|left|remaining|stored"
    r"|(?:found )?in (?:the )?(?:store|pool|storage|buffer))"
    r"|\bkeys? (?:material )?(?:is |are )?(?:exhausted|depleted|unavailable|not (?:yet )?available)"
    r"|\b(?:store|pool|buffer|storage) (?:is )?(?:empty|exhausted|depleted)|\b(?:ran )?out of keys?\b"
    r"|\bexhausted\b|\bdepleted\b|\bexceeds (?:the )?(?:number of )?(?:keys? )?(?:stored|available)\b",
    re.IGNORECASE,
)
"""The KME has not enough key now (wordings of several products; see classify_error)."""
_SCAN_BYTES: Final = 64 * 1024
_HTML_START: Final = (b"<!doctype", b"<html", b"<head", b"<body", b"<title", b"<h1", b"<?xml")
_HTML_TITLE: Final = re.compile(r"<title[^<>]*>([^<]*)", re.IGNORECASE)
_HTML_SCRIPT: Final = re.compile(r"<(?:script|style)[^<>]*>[^<]*", re.IGNORECASE)
_HTML_TAG: Final = re.compile(r"<[^<>]*>")
_SPACES: Final = re.compile(r"\s+")


def _error_kind(endpoint: str, status: int, text: str) -> type[KmsError]:
    no_key = _NO_KEY.search(text) is not None
    if status in _UNAVAILABLE_STATUSES:
        return KmsExhaustedError if no_key else KmsUnavailableError
    if not 400 <= status <= 599:
        return KmsBadAnswerError
    if _CALLER_AUTH.search(text):
        return KmsAuthError
    if (
        endpoint == "dec_keys"
        and status in _REJECTING_STATUSES
        and _KEY_WORD.search(text)
        and _KEY_REFUSAL.search(text)
    ):
        return KmsKeyRejectedError
    if status in _AUTH_STATUSES or _REFUSED.search(text):
        return KmsAuthError
    return KmsExhaustedError if no_key else KmsBadAnswerError


def _summarize(body: bytes, content_type: str | None) -> tuple[ErrorBody, str, str]:
    """Return an error body's Error fields, a printable summary and the text to match wordings in."""
    size = f"{len(body)} bytes"
    if not body.strip():
        return ErrorBody(None), "empty body" if not body else f"blank body ({size})", ""
    if _is_html(body, content_type):
        title, text = _html_text(body)
        shown = f'HTML page "{title}" ({size})' if title else f"HTML page ({size})"
        return ErrorBody(None), shown + (f": {_cut(text, 120)}" if text else ""), f"{title} {text}"
    try:
        obj = loads_json(body, "error")
    except KmsBadAnswerError:
        text = _clean(_head(body), ERROR_MESSAGE_MAX_LEN)
        if text.count("\ufffd") > 2 or not any(ch.isalnum() for ch in text):
            return ErrorBody(None), f"{size}, not text", ""
        return ErrorBody(None), f'"{text}" ({size})', text
    error = _error_fields(obj) if isinstance(obj, dict) else ErrorBody(None)
    whole = _compact(obj, 4 * ERROR_TEXT_MAX_LEN)
    if error.message is None:
        return error, f"JSON {_cut(whole, ERROR_DETAILS_MAX_LEN)}", whole
    more = len(error.details) - ERROR_DETAILS_MAX_ENTRIES
    details = _compact(list(error.details[:ERROR_DETAILS_MAX_ENTRIES]), ERROR_DETAILS_MAX_LEN)
    shown = f" (details: {details}{f' and {more} more' if more > 0 else ''})" if error.details else ""
    return error, error.message + shown, whole


def _error_fields(obj: JsonObject) -> ErrorBody:
    message = next((v for n in ("message", "detail", "error") if isinstance(v := obj.get(n), str)), None)
    details = next((v for n in ("details", "detail") if isinstance(v := obj.get(n), list)), [])
    text = _printable(redact_cut(message, ERROR_MESSAGE_MAX_LEN)) if message is not None else None
    return ErrorBody(text, tuple(details))


def _is_html(body: bytes, content_type: str | None) -> bool:
    if content_type is not None and "html" in content_type.lower():
        return True
    return body[:64].lstrip().lower().startswith(_HTML_START)


def _html_text(body: bytes) -> tuple[str, str]:
    """Return an HTML page's title and its text after the title, both cleaned (title may be '')."""
    page = _head(body)
    match = _HTML_TITLE.search(page)
    title = _clean(html.unescape(match.group(1)), 120) if match else ""
    text = _clean(html.unescape(_HTML_TAG.sub(" ", _HTML_SCRIPT.sub(" ", page))), 4 * ERROR_MESSAGE_MAX_LEN)
    if title and text.startswith(title):
        text = text[len(title) :].lstrip(" -:")
    if title and text.startswith(title):  # the usual <h1> repeating the title
        text = text[len(title) :].lstrip(" -:")
    return title, text


def _compact(value: object, limit: int) -> str:
    """Compact JSON of a decoded value, bounded (see _bounded), cleaned and cut to ``limit``."""
    return _clean(json.dumps(_bounded(value), ensure_ascii=False, separators=(",", ":")), limit)


def _bounded(value: object, depth: int = 0) -> object:
    """Copy a decoded JSON value cut to 4 levels, a few entries and short strings, hiding key material.

    Members named like a key (``key``, ``Key``, ``key_material``...) show as ``<SECRET>``, arrays
    of REDACT_NUMBERS_MIN or more numbers (byte arrays) as ``<redacted>``, and strings go
    through :func:`redact`.
    """
    if isinstance(value, dict):
        if depth >= 4:
            return "{...}"
        items = itertools.islice(value.items(), 12)
        return {
            redact_cut(str(k), 40): HIDDEN if secret_name(k) else _bounded(v, depth + 1) for k, v in items
        }
    if isinstance(value, list):
        if byte_array(value):
            return REDACTED
        return [_bounded(v, depth + 1) for v in value[:ERROR_DETAILS_MAX_ENTRIES]] if depth < 4 else "[...]"
    return redact_cut(value, ERROR_DETAILS_MAX_LEN) if isinstance(value, str) else value


def _head(body: bytes) -> str:
    """Decode the first _SCAN_BYTES of a body; what may be key material cut at the end is dropped."""
    text = body[:_SCAN_BYTES].decode("utf-8", "replace")
    return without_cut_tail(text) if len(body) > _SCAN_BYTES else text


def _clean(text: str, limit: int) -> str:
    """Collapse white space, redact key material, replace non-printable characters, cut to ``limit``."""
    return _cut(_printable(redact_cut(_SPACES.sub(" ", text).strip(), limit + 1)), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def dumps_json(obj: object) -> bytes:
    """Encode ``obj`` as compact ASCII JSON bytes (RFC 8259), as every qgate KMS message is sent."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _bad(text: str) -> KmsBadAnswerError:
    return KmsBadAnswerError(text, status=200)
