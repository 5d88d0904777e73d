"""ETSI GS QKD 014 v1.1.1 data formats (section 6): models, encoders and strict parsers (sans-I/O).

The parsers check every answer a KME gives against what was asked: valid UTF-8 JSON without
duplicate names, field types, the number of keys, each key's length in bits, strict Base64
(RFC 4648 section 4, canonical padding), unique key_IDs and, for "Get key with key IDs", the
returned set of key_IDs. Any violation raises :class:`~qgate.errors.KmsBadAnswerError`; no other
exception escapes a parser. Key bytes are wrapped in :class:`~qgate.crypto.secret.Secret` at once
and never appear in an error message.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeGuard

from qgate.crypto.secret import Secret
from qgate.errors import KmsBadAnswerError

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

    Attributes:
        source_KME_ID: the KME answering (the master SAE's KME).
        target_KME_ID: the KME the slave SAE is attached to.
        master_SAE_ID: the calling SAE.
        slave_SAE_ID: the SAE named in the request path.
        key_size: default key size, bits.
        stored_key_count: keys (of ``key_size`` bits) ready for the master SAE now.
        max_key_count: the most keys the KME stores for this pair.
        max_key_per_request: the most keys one request may ask for.
        max_key_size: largest key size a request may ask for, bits.
        min_key_size: smallest key size a request may ask for, bits.
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

    Raises:
        KmsBadAnswerError: not a JSON object, a field missing or of the wrong type, a negative
            count or size, ``min_key_size <= key_size <= max_key_size`` violated, or the wrong slave.
    """
    obj = _object(loads_json(body, "status"), "status")
    strs = {name: _id_field(obj, name, "status") for name in _STATUS_STR_FIELDS}
    ints = {name: _int_field(obj, name, "status", minimum=0) for name in _STATUS_INT_FIELDS}
    extension = _optional_object(obj, "status_extension", "status")
    if not ints["min_key_size"] <= ints["key_size"] <= ints["max_key_size"]:
        raise _bad("status: key sizes not ordered min_key_size <= key_size <= max_key_size")
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

    Args:
        body: the HTTP 200 answer body.
        number: keys asked for; exactly this many must come back.
        size_bits: size asked for; every key must have exactly this many bits.

    Returns:
        The keys, in the KME's order.

    Raises:
        KmsBadAnswerError: malformed container, wrong number of keys, a key of the wrong length
            (for instance a KME counting ``size`` in bytes), non-canonical Base64, a bad or
            duplicate key_ID.
    """
    keys = parse_key_container(body)
    if len(keys) != number:
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

    Empty, non-JSON (an HTML error page), or oddly shaped bodies give ``ErrorBody(None)``; a
    ``message`` is kept only if it is a string, with non-printable characters replaced.
    """
    try:
        obj = loads_json(body, "error")
    except KmsBadAnswerError:
        return ErrorBody(None)
    if not isinstance(obj, dict):
        return ErrorBody(None)
    message = obj.get("message")
    details = obj.get("details")
    text = _printable(message)[:ERROR_MESSAGE_MAX_LEN] if isinstance(message, str) else None
    return ErrorBody(text, tuple(details) if isinstance(details, list) else ())


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


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def dumps_json(obj: object) -> bytes:
    """Encode ``obj`` as compact ASCII JSON bytes (RFC 8259), as every qgate KMS message is sent."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _bad(text: str) -> KmsBadAnswerError:
    return KmsBadAnswerError(text, status=200)
