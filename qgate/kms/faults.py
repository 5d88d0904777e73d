"""Fault injection for the KME simulator: make one KME misbehave the way real KMEs do.

Real KMEs deviate from ETSI GS QKD 014 v1.1.1 (slow answers, 503s, 4xx/5xx with JSON, HTML or
empty bodies, short key lists with 200, repeated key_IDs, key sizes counted in bytes, forgotten
key_IDs, one-shot dec_keys lost in transit, restarts). ``qgate kms-sim`` can be told to do each
of these, at start (``--fault SPEC``, repeatable) or at run time through the admin API, so the
SAE side (:class:`qgate.kms.client.Etsi014Client`, the gateway) can be tested against them.

A fault is a kind plus parameters (:class:`FaultSpec`):

============ =========================== ============================================ ==================
kind         parameters                  effect on a matching request                 endpoints
============ =========================== ============================================ ==================
delay        seconds                     sleep, then answer normally                  all
error        code (400..599), body       answer ``code`` with a ``json`` (ETSI Error  all
             (json, html, empty)         body), ``html`` or ``empty`` body; no key
                                         is touched
short        missing (default 1)         answer 200 with ``missing`` keys fewer       enc_keys, dec_keys
repeat_id    -                           answer 200 with the first key_ID repeated    enc_keys, dec_keys
wrong_size   bits (default: size bytes)  answer 200 with keys of the wrong length     enc_keys, dec_keys
                                         (default: ``size`` bytes, not bits)
forget       -                           drop the asked key_IDs from the store, then  dec_keys
                                         answer (400 "unknown key_ID")
close        -                           serve the request (keys consumed), then      all
                                         close the connection without an answer
down         seconds, after (default 0)  after ``after`` s, stop listening for        (the whole KME)
                                         ``seconds`` s, then listen again
============ =========================== ============================================ ==================

Every kind but ``down`` also takes ``endpoint`` (``status``, ``enc_keys`` or ``dec_keys``;
default: every endpoint the kind applies to) and ``count`` (the fault hits the next ``count``
matching requests, then is gone; default: until cleared). One fault acts per request: the oldest
active one matching its endpoint, whoever the caller (it acts before the caller is checked).
Faults only touch the ETSI 014 endpoints, never the private KME-to-KME or admin endpoints
(``down`` excepted: nothing answers while down).

Admin API (mutual TLS on the KME's own port; only client certificates whose CN is given with
``--admin``; anyone else gets 401)::

    GET    /kme/v1/admin/faults        -> {"faults": [{"id": 1, "kind": ..., "remaining": 2, ...}]}
    POST   /kme/v1/admin/faults        body: one fault as a JSON object -> the fault with its "id"
    DELETE /kme/v1/admin/faults        -> {"cleared": N}  (all faults)
    DELETE /kme/v1/admin/faults/{id}   -> {"cleared": 1}  (404 if no such fault)

Why there and not on a loopback-only plain HTTP port: one listener and one authentication
model (the lab CA), reachable from any namespace the SAEs reach, and no unauthenticated
control surface; the price is that nothing can be changed while the KME is ``down`` (the
outage ends by itself). :class:`FaultAdminClient` calls the API from Python.

The CLI form of a fault is ``KIND[:NAME=VALUE,...]``, for instance
``error:code=500,body=html,endpoint=enc_keys,count=3``; the JSON form is the same names in an
object, ``{"kind": "error", "code": 500, "body": "html", "endpoint": "enc_keys", "count": 3}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypedDict

from qgate.constants import ETSI014_API_PREFIX
from qgate.errors import ConfigError, KmsBadAnswerError
from qgate.kms import etsi014
from qgate.kms.client import MtlsHttps

log = logging.getLogger(__name__)

ADMIN_PATH: Final = "/kme/v1/admin/faults"
"""Admin endpoint: list (GET), add (POST), clear (DELETE) faults; ``/{id}`` clears one."""
ENDPOINTS: Final = ("status", "enc_keys", "dec_keys")
"""The ETSI 014 endpoints faults can be scoped to."""
ERROR_BODIES: Final = ("json", "html", "empty")
"""Bodies an ``error`` fault can answer with."""
MAX_FAULT_SECONDS: Final = 86_400.0
"""Seconds: the longest delay or outage accepted."""
HTML_ERROR_PAGE: Final = b"<html><head><title>Error</title></head><body><h1>Internal error</h1></body></html>"
"""Body of an ``error`` fault with ``body=html`` (what a proxy or servlet container sends)."""

_KEYS = ("enc_keys", "dec_keys")
_KINDS: Final[Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    # kind: (endpoints it applies to, its own parameter names)
    "delay": (ENDPOINTS, ("seconds",)),
    "error": (ENDPOINTS, ("code", "body")),
    "short": (_KEYS, ("missing",)),
    "repeat_id": (_KEYS, ()),
    "wrong_size": (_KEYS, ("bits",)),
    "forget": (("dec_keys",), ()),
    "close": (ENDPOINTS, ()),
    "down": ((), ("seconds", "after")),
}
KINDS: Final = tuple(_KINDS)
"""Every fault kind."""


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One fault, checked (build it with :func:`fault_from_mapping` or :func:`parse_fault_option`).

    Attributes:
        kind: one of KINDS.
        endpoints: the ETSI endpoints it applies to (empty for ``down``).
        count: requests it hits before it is gone; None: until cleared.
        seconds: ``delay``: sleep before answering; ``down``: length of the outage.
        after: ``down``: seconds before the outage starts.
        code: ``error``: the HTTP status answered.
        body: ``error``: ``json``, ``html`` or ``empty``.
        missing: ``short``: keys left out of the answer.
        bits: ``wrong_size``: length of every key answered, bits; None: the asked size in bytes.
    """

    kind: str
    endpoints: tuple[str, ...]
    count: int | None = None
    seconds: float = 0.0
    after: float = 0.0
    code: int = 0
    body: str = "json"
    missing: int = 1
    bits: int | None = None

    def to_json(self) -> dict[str, object]:
        """Return the fault as the admin API shows it (only the fields its kind uses)."""
        out: dict[str, object] = {"kind": self.kind}
        if self.kind != "down":
            out["endpoint"] = list(self.endpoints)
        for name in _KINDS[self.kind][1]:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def describe(self) -> str:
        """One line for logs: ``error(code=500, body=html) on enc_keys``."""
        params = ", ".join(f"{k}={v}" for k, v in self.to_json().items() if k not in ("kind", "endpoint"))
        where = f" on {'/'.join(self.endpoints)}" if self.endpoints else ""
        return f"{self.kind}({params}){where}"


class _Params(TypedDict, total=False):
    seconds: float
    after: float
    code: int
    body: str
    missing: int
    bits: int


def fault_from_mapping(obj: Mapping[str, object]) -> FaultSpec:
    """Check and build a fault from its JSON (admin API) or CLI form.

    Args:
        obj: ``kind`` plus the kind's parameters, ``endpoint`` and ``count``. Values may be JSON
            numbers or decimal strings (the CLI form).

    Returns:
        The fault.

    Raises:
        ConfigError: unknown kind or parameter, a value out of range, or an endpoint the kind
            does not apply to (the message says which).
    """
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ConfigError(f"fault kind must be one of {', '.join(KINDS)}, got {kind!r}")
    applies, params = _KINDS[kind]
    common = ("endpoint", "count") if applies else ()
    unknown = sorted(set(obj) - {"kind", *params, *common})
    if unknown:
        allowed = ", ".join((*params, *common)) or "none"
        raise ConfigError(f"fault {kind}: unknown parameter {', '.join(unknown)} (allowed: {allowed})")
    endpoints = _endpoints(kind, obj.get("endpoint"), applies)
    count = None if obj.get("count") is None else _int(obj, "count", 1, 1 << 31)
    return FaultSpec(kind, endpoints, count, **_kind_params(kind, obj))


def _kind_params(kind: str, obj: Mapping[str, object]) -> _Params:
    """The checked parameters of one kind, as FaultSpec keyword arguments."""
    if kind in ("delay", "down"):
        if "seconds" not in obj:
            raise ConfigError(f"fault {kind}: seconds is required")
        return {
            "seconds": _number(obj, "seconds", low=0.0, strict=True),
            "after": _number(obj, "after", low=0.0),
        }
    if kind == "error":
        if "code" not in obj:
            raise ConfigError("fault error: code is required (an HTTP status, 400..599)")
        body = obj.get("body", "json")
        if body not in ERROR_BODIES:
            raise ConfigError(f"fault error: body must be one of {', '.join(ERROR_BODIES)}, got {body!r}")
        return {"code": _int(obj, "code", 400, 599), "body": str(body)}
    if kind == "short":
        return {"missing": _int(obj, "missing", 1, 1 << 16, default=1)}
    if kind == "wrong_size" and obj.get("bits") is not None:
        bits = _int(obj, "bits", 8, 1 << 20)
        if bits % 8:
            raise ConfigError(f"fault wrong_size: bits must be a multiple of 8, got {bits}")
        return {"bits": bits}
    return {}


def parse_fault_option(text: str) -> FaultSpec:
    """Parse the CLI form ``KIND[:NAME=VALUE,...]`` (``qgate kms-sim --fault``).

    Raises:
        ConfigError: malformed text or an invalid fault (see :func:`fault_from_mapping`).
    """
    kind, _, rest = text.strip().partition(":")
    obj: dict[str, object] = {"kind": kind.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or name.strip() in obj:
            raise ConfigError(f"fault {text!r}: expected KIND[:NAME=VALUE,...], each NAME once")
        obj[name.strip()] = value.strip()
    return fault_from_mapping(obj)


def _endpoints(kind: str, value: object, applies: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return applies
    if not isinstance(value, str) or value not in applies:
        raise ConfigError(f"fault {kind}: endpoint must be one of {', '.join(applies)}, got {value!r}")
    return (value,)


def _int(obj: Mapping[str, object], name: str, low: int, high: int, *, default: int | None = None) -> int:
    value = obj.get(name, default)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(
            f"fault {obj.get('kind')}: {name} must be an integer in {low}..{high}, got {value!r}"
        )
    return value


def _number(obj: Mapping[str, object], name: str, *, low: float, strict: bool = False) -> float:
    value = obj.get(name, 0.0)
    try:
        number = (
            float(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None
        )
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or number < low or (strict and number <= low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ConfigError(
            f"fault {obj.get('kind')}: {name} must be a number of seconds {bound}, got {value!r}"
        )
    if number > MAX_FAULT_SECONDS:
        raise ConfigError(f"fault {obj.get('kind')}: {name} must be at most {MAX_FAULT_SECONDS:.0f} s")
    return number


def etsi_endpoint(path: str) -> str | None:
    """Return ``status``, ``enc_keys`` or ``dec_keys`` for an ETSI 014 request path, else None."""
    if not path.startswith(ETSI014_API_PREFIX + "/"):
        return None
    parts = path[len(ETSI014_API_PREFIX) + 1 :].split("/")
    return parts[1] if len(parts) == 2 and parts[1] in ENDPOINTS else None


@dataclass(slots=True)
class _Active:
    fault_id: int
    spec: FaultSpec
    remaining: int | None


class FaultTable:
    """The faults active on one KME (thread-safe): added, consumed request by request, cleared."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: list[_Active] = []
        self._ids = itertools.count(1)

    def add(self, spec: FaultSpec) -> int:
        """Activate ``spec`` (not ``down``, which is no per-request fault); return its id."""
        if spec.kind == "down":
            raise ConfigError("fault down acts on the server, it is not kept in the table")
        with self._lock:
            fault_id = next(self._ids)
            self._active.append(_Active(fault_id, spec, spec.count))
        log.warning("fault %d on: %s, %s", fault_id, spec.describe(), _count_text(spec.count))
        return fault_id

    def take(self, endpoint: str | None) -> FaultSpec | None:
        """Return the oldest fault matching ``endpoint`` and count one request against it."""
        if endpoint is None:
            return None
        with self._lock:
            for active in self._active:
                if endpoint in active.spec.endpoints:
                    if active.remaining is not None:
                        active.remaining -= 1
                        if active.remaining <= 0:
                            self._active.remove(active)
                    return active.spec
        return None

    def clear(self, fault_id: int | None = None) -> int:
        """Remove fault ``fault_id`` (None: all faults); return how many were removed."""
        with self._lock:
            kept = [a for a in self._active if fault_id is not None and a.fault_id != fault_id]
            cleared = len(self._active) - len(kept)
            self._active = kept
        if cleared:
            log.warning("faults cleared: %s", "all" if fault_id is None else fault_id)
        return cleared

    def snapshot(self) -> list[dict[str, object]]:
        """The active faults as the admin API lists them (``id``, ``remaining`` and the spec)."""
        with self._lock:
            return [{"id": a.fault_id, "remaining": a.remaining, **a.spec.to_json()} for a in self._active]


def _count_text(count: int | None) -> str:
    return "until cleared" if count is None else f"for the next {count} request(s)"


class FaultControl:
    """One KME's faults: the active table, the admin API over it, and the hook taking the KME down.

    Args:
        admins: client certificate CNs allowed to call the admin API (``--admin``).
        on_down: called with a ``down`` fault (from a request thread); must not block.
    """

    def __init__(
        self, admins: Collection[str] = (), on_down: Callable[[FaultSpec], None] | None = None
    ) -> None:
        self.table = FaultTable()
        self.admins = frozenset(admins)
        self.on_down = on_down

    def inject(self, spec: FaultSpec) -> dict[str, object]:
        """Activate ``spec`` (``down``: start the outage); return what the admin API answers."""
        if spec.kind == "down":
            if self.on_down is None:
                raise ConfigError("this KME cannot be taken down (not served by a KmeService)")
            log.warning("fault: %s", spec.describe())
            self.on_down(spec)
            return spec.to_json()
        return {"id": self.table.add(spec), "remaining": spec.count, **spec.to_json()}

    def admin(self, method: str, path: str, body: bytes, caller: str | None) -> tuple[int, bytes]:
        """Answer one admin request (see the module doc); ``caller`` is the client certificate CN.

        Returns:
            ``(status, JSON body)``: 200, or 400 (bad fault), 401 (not an admin), 404, 405.
        """
        if caller is None or caller not in self.admins:
            reason = "caller is not an admin (--admin)" if self.admins else "no admin configured (--admin)"
            return 401, etsi014.encode_error(reason, [{"caller": str(caller)}])
        fault_id: int | None = None
        if path != ADMIN_PATH:
            tail = path[len(ADMIN_PATH) + 1 :] if path.startswith(ADMIN_PATH + "/") else ""
            if not (tail.isascii() and tail.isdigit() and len(tail) < 10):
                return 404, etsi014.encode_error("no such endpoint")
            fault_id = int(tail)
        allowed = ("DELETE",) if fault_id is not None else ("GET", "POST", "DELETE")
        if method not in allowed:
            return 405, etsi014.encode_error(
                f"method {method} not allowed", [{"allowed": ", ".join(allowed)}]
            )
        if method == "GET":
            return 200, etsi014.dumps_json({"faults": self.table.snapshot()})
        if method == "DELETE":
            cleared = self.table.clear(fault_id)
            if fault_id is not None and not cleared:
                return 404, etsi014.encode_error("no such fault", [{"id": str(fault_id)}])
            return 200, etsi014.dumps_json({"cleared": cleared})
        return self._post(body)

    def _post(self, body: bytes) -> tuple[int, bytes]:
        try:
            obj = etsi014.loads_json(body, "fault")
            if not isinstance(obj, dict):
                raise ConfigError("body must be one fault as a JSON object")
            return 200, etsi014.dumps_json(self.inject(fault_from_mapping(obj)))
        except (ConfigError, KmsBadAnswerError) as exc:
            return 400, etsi014.encode_error(str(exc))


# --- serving a request under a fault -------------------------------------------------------------


class FaultTarget(Protocol):
    """What a fault needs from the KME (``qgate.kms.simulator.Kme``)."""

    def handle(
        self, method: str, path: str, query: Mapping[str, Sequence[str]], body: bytes, caller: str | None
    ) -> tuple[int, bytes]:
        """Answer one request normally."""

    def forget(self, method: str, query: Mapping[str, Sequence[str]], body: bytes) -> list[str]:
        """Drop the waiting keys a dec_keys request names; return their key_IDs."""


@dataclass(frozen=True, slots=True)
class FaultyAnswer:
    """What to send: ``status`` and ``body`` with ``content_type``, or nothing (``close``)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    close_without_answer: bool = False


def serve_with_fault(
    fault: FaultSpec,
    kme: FaultTarget,
    request: tuple[str, str, Mapping[str, Sequence[str]], bytes, str | None],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> FaultyAnswer:
    """Serve one ETSI 014 request the way ``fault`` says.

    Args:
        fault: the fault hitting this request (from :meth:`FaultTable.take`).
        kme: the KME that would answer it.
        request: ``(method, path, query, body, caller)`` as given to ``Kme.handle``.
        sleep: how to wait (``delay``).

    Returns:
        The answer to send (``close_without_answer`` for ``close``: the request was served, its
        keys are consumed, and the connection must be closed without a byte).
    """
    method, path, query, body, caller = request
    log.warning("fault %s hits %s %s from %s", fault.describe(), method, path, caller)
    if fault.kind == "error":
        return error_answer(fault.code, fault.body)
    if fault.kind == "delay":
        sleep(fault.seconds)
    elif fault.kind == "forget":
        kme.forget(method, query, body)
    status, answer = kme.handle(method, path, query, body, caller)
    if fault.kind == "close":
        return FaultyAnswer(status, b"", close_without_answer=True)
    if status == 200 and fault.kind in ("short", "repeat_id", "wrong_size"):
        answer = mangle_keys(fault, answer, _asked_bits(query, body))
    return FaultyAnswer(status, answer)


def error_answer(code: int, body: str) -> FaultyAnswer:
    """Answer of an ``error`` fault: ``code`` with an ETSI Error (``json``), HTML or empty body."""
    if body == "html":
        return FaultyAnswer(code, HTML_ERROR_PAGE, "text/html; charset=utf-8")
    if body == "empty":
        return FaultyAnswer(code, b"", "text/plain")
    text = f"simulated fault: HTTP {code}"
    return FaultyAnswer(code, etsi014.encode_error(text, [{"fault": "error"}]))


def mangle_keys(fault: FaultSpec, answer: bytes, asked_bits: int | None) -> bytes:
    """Spoil a Key container (section 6.3) as ``short``, ``repeat_id`` or ``wrong_size`` says.

    Args:
        fault: the fault.
        answer: the KME's correct 200 answer.
        asked_bits: the key size asked for in bits, or None (dec_keys: each key's own size).

    Returns:
        The spoiled container: ``missing`` keys fewer; the first key_ID also on the last key
        (or a second entry when there is one key); or every key ``bits`` bits long (default:
        the asked size read as bytes, eight times too long). Key bytes are never logged.
    """
    container = json.loads(answer)
    keys: list[dict[str, object]] = container["keys"]
    if fault.kind == "short":
        del keys[max(0, len(keys) - fault.missing) :]
    elif fault.kind == "repeat_id" and keys:
        if len(keys) == 1:
            keys.append(dict(keys[0]))
        keys[-1]["key_ID"] = keys[0]["key_ID"]
    elif fault.kind == "wrong_size":
        for entry in keys:
            raw = _b64(entry["key"])
            length = fault.bits // 8 if fault.bits is not None else asked_bits or len(raw) * 8
            entry["key"] = base64.b64encode(hashlib.shake_256(raw).digest(length)).decode("ascii")
    return etsi014.dumps_json(container)


def _b64(value: object) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        return b""


def _asked_bits(query: Mapping[str, Sequence[str]], body: bytes) -> int | None:
    """The ``size`` an enc_keys request asked for (None if it did not say, or for dec_keys)."""
    sizes = query.get("size")
    if sizes and sizes[0].isdigit():
        return int(sizes[0])
    try:
        obj = json.loads(body) if body.strip() else None
    except ValueError:
        return None
    size = obj.get("size") if isinstance(obj, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


# --- the admin API from Python --------------------------------------------------------------------


class FaultAdminClient:
    """Call a simulated KME's admin API (for tests and labs).

    Args:
        base_url: the KME, ``https://host:port``.
        ca, cert, key: the lab CA and an admin client certificate/key (CN given with ``--admin``).
        timeout: seconds per request.

    Raises:
        ConfigError: bad URL or files.
    """

    def __init__(self, base_url: str, *, ca: Path, cert: Path, key: Path, timeout: float = 5.0) -> None:
        self._https = MtlsHttps(base_url, ca=ca, cert=cert, key=key, timeout=timeout)

    def inject(self, kind: str, **params: object) -> dict[str, object]:
        """Add a fault (``inject("error", code=500, body="html", count=2)``); return the KME's answer.

        Raises:
            KmsError: the KME refused (``KmsBadAnswerError`` with the status) or is unreachable.
        """
        return self._call("POST", ADMIN_PATH, etsi014.dumps_json({"kind": kind, **params}))

    def clear(self, fault_id: int | None = None) -> int:
        """Clear one fault, or all; return how many were cleared. Raises KmsError."""
        path = ADMIN_PATH if fault_id is None else f"{ADMIN_PATH}/{fault_id}"
        cleared = self._call("DELETE", path, None).get("cleared")
        return cleared if isinstance(cleared, int) else 0

    def faults(self) -> list[dict[str, object]]:
        """The active faults. Raises KmsError."""
        listed = self._call("GET", ADMIN_PATH, None).get("faults")
        return [f for f in listed if isinstance(f, dict)] if isinstance(listed, list) else []

    def _call(self, method: str, path: str, body: bytes | None) -> dict[str, object]:
        status, answer = self._https.request(method, path, body)
        if status != 200:
            message = etsi014.parse_error_body(answer).message
            raise KmsBadAnswerError(f"KME admin {method} {path}: HTTP {status}: {message}", status=status)
        obj = etsi014.loads_json(answer, "admin answer")
        if not isinstance(obj, dict):
            raise KmsBadAnswerError("KME admin: answer is not a JSON object", status=status)
        return obj
