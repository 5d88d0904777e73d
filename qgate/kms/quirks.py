"""Quirks of the KME simulator: behave for good like the third-party ETSI 014 KMEs deployments meet.

A fault (:mod:`qgate.kms.faults`) is a transient event injected into a well-behaved KME; a quirk
is a permanent trait of a KME product, on from start to stop (``qgate kms-sim --quirk NAME``,
repeatable; ``qgate lab run --kme-quirk NAME`` gives it to both lab KMEs). The peer KME is
assumed to be the same product: the TLS quirks also shape this KME's client side toward it.
Each quirk below copies what real products were seen to do with ETSI GS QKD 014 v1.1.1:

``replace-on-enc``
    One pending key set per (master SAE, slave SAE) pair, a slot rather than a queue (products
    built around one key exchange at a time): every enc_keys supersedes the pair's keys handed
    out earlier and not yet fetched by the slave. The master's KME says so in its report to
    the slave's KME (``"replace": true``), which drops them; their dec_keys then gets 400
    ``{"message": "keys do not exist", "details": [{"key_ID": ...}]}`` (a slave KME without the
    quirk says ``"unknown key_ID"``). Breaks masters that fetch keys ahead.
``cbc-only``
    Appliances with an old embedded TLS stack: the HTTPS server speaks TLS 1.2 only, with the
    CBC-SHA suites ``ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA`` only (OpenSSL security
    level 1, so they stay allowed). A client with today's default list (AES-GCM/ChaCha20)
    fails the handshake; the SAE must allow one of them explicitly
    (``curl --ciphers ECDHE-ECDSA-AES256-SHA``).
``zero-count``
    Status always says ``stored_key_count: 0`` while keys are there: products that count keys
    delivered and not yet consumed, not keys ready to serve.
``zero-limits``
    Status reports ``max_key_count``, ``max_key_per_request``, ``max_key_size``,
    ``min_key_size`` and ``stored_key_count`` as 0 (fields a product leaves unset); ``key_size``
    stays, and keys are still served within the real limits.
``per-request-4``, ``per-request-1``
    Products capping one request at 4 keys (or 1): Status ``max_key_per_request`` says so, and
    enc_keys (or dec_keys) asking for more gets 400 ``{"message": "number must be 1..4"}``.
``short``
    enc_keys asking for ``n`` > 1 keys answers 200 with ``ceil(n / 2)`` of them, no error
    (products that hand out what one batch holds); only those are consumed and reported to the
    peer, the others never existed.
``html-errors``
    Every 4xx/5xx answer of the ETSI API has an HTML page (``text/html;charset=utf-8``, the
    status line as title, the message in a paragraph) for body instead of the section 6.5 JSON
    Error: a servlet container or reverse proxy in front of the KME renders the errors.
``details-422``
    Every 400 is sent as 422 Unprocessable Entity, the section 6.5 body carrying a generic
    message and the specifics in ``details``, ``{"message": "invalid request", "details":
    [{"reason": "unknown key_ID"}, {"key_ID": ...}]}`` (request-validation frameworks), for
    dec_keys of unknown key_IDs too; 401, 404, 405 and 5xx keep their status.
``no-san``
    The server certificate has no subjectAltName, CN only (hand-made or old appliance
    certificates): hostname verification never succeeds, the SAE must pin the server by CN or
    SHA-256 fingerprint. kms-sim refuses a ``--cert`` with a subjectAltName under this quirk
    (``qgate.pki.make_pki(no_san_kmes=...)`` writes one without); toward its peer the KME skips
    the hostname check and pins the peer's CN.
``stall``
    Every 5th key request (enc_keys or dec_keys, counted together) is answered only after
    3 s, a little longer than a client's timeout likes (a KME waiting on its QKD device, a
    garbage-collection pause); the request is served all the same. Status answers at once.
``consumed-401``
    dec_keys of a key_ID already fetched answers 401 ``{"message": "key_ID already
    retrieved"}`` instead of 400.
``empty-400``
    enc_keys that the store cannot satisfy (empty, or fewer keys than asked) answers 400
    ``{"message": "not enough keys available"}`` instead of 503.

Quirks apply to the ETSI 014 endpoints (and to errors the HTTP layer itself sends), never to the
private KME-to-KME or fault-admin endpoints. An ``error`` fault's answer keeps the body the fault
asks for.
"""

from __future__ import annotations

import dataclasses
import html
import math
import ssl
import threading
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from qgate.errors import ConfigError

if TYPE_CHECKING:  # at run time only the HTTPS front needs etsi014: keep ``qgate --help`` light
    from qgate.kms.etsi014 import Status

QUIRKS: Final[Mapping[str, str]] = {
    "replace-on-enc": "enc_keys supersedes the pair's keys not yet fetched (then 400)",
    "cbc-only": "TLS 1.2, ECDHE-ECDSA-AES256-SHA/-AES128-SHA only (no AES-GCM/ChaCha20)",
    "zero-count": "Status stored_key_count always 0 while keys are served",
    "zero-limits": "Status stored count, max/min key size, max per request, max count: 0",
    "per-request-4": "at most 4 keys per request (Status says 4; asking more: 400)",
    "per-request-1": "at most 1 key per request (Status says 1; asking more: 400)",
    "short": "enc_keys for n > 1 keys: 200 with ceil(n/2) keys, only those consumed",
    "html-errors": "every 4xx/5xx with an HTML page (text/html), not the JSON Error",
    "details-422": 'every 400 as 422 {"message": "invalid request", "details": [...]}',
    "no-san": "server certificate without subjectAltName: clients pin CN or SHA-256",
    "stall": "every 5th enc_keys/dec_keys answered after 3 s; status at once",
    "consumed-401": "dec_keys of a key_ID fetched before: 401, not 400",
    "empty-400": 'enc_keys without enough key: 400 "not enough keys available", not 503',
}
"""Every quirk name -> one line saying what it does (``kms-sim --help``, start-up log)."""
QUIRK_NAMES: Final = tuple(QUIRKS)
"""Every quirk name, in documentation order."""
_EXCLUSIVE: Final = (frozenset({"per-request-4", "per-request-1"}),)
_PER_REQUEST: Final = {"per-request-4": 4, "per-request-1": 1}

CBC_CIPHERS: Final = "ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA"
"""OpenSSL cipher list of ``cbc-only`` (TLS 1.2 CBC-SHA suites for the lab's EC certificates)."""
CBC_SECLEVEL: Final = "@SECLEVEL=1"
"""OpenSSL security level appended to CBC_CIPHERS, so SHA-1 MAC suites are never refused."""
STALL_EVERY: Final = 5
"""``stall``: every this-many-th key request is held back."""
STALL_SECONDS: Final = 3.0
"""``stall``: seconds a held-back key request waits before it is served."""
SUPERSEDED_MESSAGE: Final = "keys do not exist"
"""``replace-on-enc``: Error message of dec_keys for an unknown (e.g. superseded) key_ID."""
RETRIEVED_MESSAGE: Final = "key_ID already retrieved"
"""``consumed-401``: Error message of dec_keys for a key_ID fetched before."""
NOT_ENOUGH_MESSAGE: Final = "not enough keys available"
"""``empty-400``: Error message of enc_keys the store cannot satisfy."""
GENERIC_422_MESSAGE: Final = "invalid request"
"""``details-422``: the message of every 422; the specifics go to ``details``."""
HTML_CONTENT_TYPE: Final = "text/html;charset=utf-8"


def check_quirks(names: Iterable[str]) -> tuple[str, ...]:
    """Return ``names`` without repeats, in the order given, after checking them.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones), or two that exclude
            each other (``per-request-4`` with ``per-request-1``).
    """
    chosen = tuple(dict.fromkeys(names))
    unknown = [n for n in chosen if n not in QUIRKS]
    if unknown:
        raise ConfigError(f"unknown quirk {', '.join(map(repr, unknown))} (valid: {', '.join(QUIRK_NAMES)})")
    for group in _EXCLUSIVE:
        clash = sorted(group & set(chosen))
        if len(clash) > 1:
            raise ConfigError(f"quirks {' and '.join(clash)} exclude each other: pick one")
    return chosen


class Quirks:
    """The quirks of one KME and what they change (thread-safe; the ``stall`` count is its state).

    Args:
        names: quirk names (checked with :func:`check_quirks`).

    Raises:
        ConfigError: as :func:`check_quirks`.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = check_quirks(names)
        self._on = frozenset(self.names)
        self._lock = threading.Lock()
        self._key_requests = 0

    def __contains__(self, name: object) -> bool:
        return name in self._on

    def __bool__(self) -> bool:
        return bool(self._on)

    def __repr__(self) -> str:
        return f"Quirks({list(self.names)!r})"

    # --- the ETSI 014 core (qgate.kms.simulator) -------------------------------------------------

    def max_key_per_request(self, configured: int) -> int:
        """Return the most keys (or key_IDs) one request may ask for (``per-request-N`` caps it)."""
        caps = [cap for name, cap in _PER_REQUEST.items() if name in self._on]
        return min([configured, *caps])

    def status(self, status: Status) -> Status:
        """Return Status (section 6.1) as the product reports it.

        ``per-request-N`` lowers ``max_key_per_request``; ``zero-count`` zeroes
        ``stored_key_count``; ``zero-limits`` zeroes it and the four limits (``key_size`` stays).
        """
        limit = self.max_key_per_request(status.max_key_per_request)
        status = dataclasses.replace(status, max_key_per_request=limit)
        if "zero-count" in self._on:
            status = dataclasses.replace(status, stored_key_count=0)
        if "zero-limits" in self._on:
            status = dataclasses.replace(
                status,
                stored_key_count=0,
                max_key_count=0,
                max_key_per_request=0,
                max_key_size=0,
                min_key_size=0,
            )
        return status

    def served_number(self, asked: int) -> int:
        """Return how many keys an enc_keys for ``asked`` keys gets (``short``: ``ceil(asked / 2)``)."""
        return math.ceil(asked / 2) if "short" in self._on else asked

    def not_enough(self) -> tuple[int, str] | None:
        """Return ``(status, message)`` for an enc_keys the store cannot satisfy; None: the usual 503.

        ``empty-400``: ``(400, NOT_ENOUGH_MESSAGE)``.
        """
        return (400, NOT_ENOUGH_MESSAGE) if "empty-400" in self._on else None

    def unknown_key(self, *, retrieved: bool) -> tuple[int, str] | None:
        """Return ``(status, message)`` for a dec_keys naming a key_ID not waiting; None: the usual 400.

        Args:
            retrieved: whether that key_ID was fetched with dec_keys before.

        Returns:
            ``consumed-401`` and ``retrieved``: ``(401, RETRIEVED_MESSAGE)``; else
            ``replace-on-enc``: ``(400, SUPERSEDED_MESSAGE)``; else None.
        """
        if retrieved and "consumed-401" in self._on:
            return 401, RETRIEVED_MESSAGE
        if "replace-on-enc" in self._on:
            return 400, SUPERSEDED_MESSAGE
        return None

    # --- the HTTPS front (qgate.kms.sim_server) --------------------------------------------------

    def stall_seconds(self, endpoint: str | None) -> float:
        """Return the seconds to hold this request back before serving it (``stall``); count key requests.

        Args:
            endpoint: ``status``, ``enc_keys``, ``dec_keys`` or None (not an ETSI endpoint).
        """
        if "stall" not in self._on or endpoint not in ("enc_keys", "dec_keys"):
            return 0.0
        with self._lock:
            self._key_requests += 1
            held = self._key_requests % STALL_EVERY == 0
        return STALL_SECONDS if held else 0.0

    def error_answer(self, status: int, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """Rewrite one error answer (``status`` >= 400) the product's way (``details-422``, ``html-errors``).

        Args:
            status: the HTTP status.
            body: the section 6.5 JSON Error body the simulator made.
            content_type: its Content-Type.

        Returns:
            ``(status, body, content_type)`` to send; unchanged without these quirks.
        """
        from qgate.kms import etsi014

        if status < 400:
            return status, body, content_type
        error = etsi014.parse_error_body(body)
        message = error.message or _phrase(status)
        if "details-422" in self._on and status == 400:
            details = [{"reason": message}, *(d for d in error.details if isinstance(d, dict))]
            status, body = 422, etsi014.encode_error(GENERIC_422_MESSAGE, details)
        if "html-errors" in self._on:
            return status, html_error_page(status, message), HTML_CONTENT_TYPE
        return status, body, content_type

    def server_tls(self, context: ssl.SSLContext) -> None:
        """Narrow the KME's server TLS context (``cbc-only``: TLS 1.2, CBC_CIPHERS)."""
        if "cbc-only" in self._on:
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(f"{CBC_CIPHERS}:{CBC_SECLEVEL}")

    def peer_tls(self, context: ssl.SSLContext) -> None:
        """Fit the client TLS context toward a peer KME of the same product.

        ``cbc-only``: offer CBC_CIPHERS (TLS 1.2); ``no-san``: skip the hostname check (the
        caller pins the peer's CN; the chain is still verified against the lab CA).
        """
        if "cbc-only" in self._on:
            context.set_ciphers(f"{CBC_CIPHERS}:{CBC_SECLEVEL}")
        if "no-san" in self._on:
            context.check_hostname = False


def html_error_page(status: int, message: str) -> bytes:
    """Return the HTML page ``html-errors`` answers with: the status line and ``message``, escaped."""
    title = html.escape(f"HTTP Status {status} - {_phrase(status)}")
    text = (
        f'<!doctype html><html lang="en"><head><title>{title}</title></head>'
        f"<body><h1>{title}</h1><p><b>Message</b> {html.escape(message)}</p></body></html>"
    )
    return text.encode("utf-8")


def describe(names: Iterable[str]) -> list[str]:
    """Return ``"NAME: what it does"`` for each quirk name (for the start-up log)."""
    return [f"{name}: {QUIRKS[name]}" for name in names]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
