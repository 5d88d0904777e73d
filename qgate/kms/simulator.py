"""KME simulator core: one Key Management Entity of a simulated QKD link (ETSI GS QKD 014 v1.1.1).

:class:`Kme` answers the ETSI 014 endpoints (section 5) and the private KME-to-KME endpoints from
already-authenticated requests: ``handle(method, path, query, body, caller)`` where ``caller`` is
the subject CN of the client certificate, and returns ``(HTTP status, JSON body)``. The HTTPS
server around it lives in :mod:`qgate.kms.sim_server`; the key stores in :mod:`qgate.kms.sim_store`.

Endpoints:

* ``GET /api/v1/keys/{slave_SAE_ID}/status`` (section 5.1),
* ``GET|POST /api/v1/keys/{slave_SAE_ID}/enc_keys`` (section 5.2; GET takes ``number``, ``size``),
* ``GET|POST /api/v1/keys/{master_SAE_ID}/dec_keys`` (section 5.3; GET takes one ``key_ID``),
* ``POST /kme/v1/delivered`` (peer KME only): key_IDs the peer handed to its master SAE,
  ``{"master_SAE_ID": ..., "slave_SAE_ID": ..., "keys": [{"key_ID": ..., "index": i, "size":
  bits}, ...]}``, plus ``"replace": true`` when they supersede the pair's keys not fetched yet
  (quirk ``replace-on-enc`` of the peer),
* ``GET /kme/v1/info`` (peer KME only): ``{"KME_ID": ..., "SAE_IDs": [...]}``.

Injected faults and their admin API (``/kme/v1/admin/faults``) live in :mod:`qgate.kms.faults`
and are applied by the HTTPS server, around :meth:`Kme.handle`. Product quirks
(:mod:`qgate.kms.quirks`, ``KmeConfig.quirks``) act here on Status, the key counts, the
answers to exhausted stores and unknown key_IDs and the report to the peer; the server applies
the TLS, stall and error-body ones.

Errors: 400 bad request (bad parameters, unknown slave SAE, unknown key_ID), 401 caller not
allowed, 404/405 unknown endpoint or method, 503 not enough key or the peer KME unreachable; all
with the section 6.5 body ``{"message": ..., "details": [...]}``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeGuard
from urllib.parse import unquote

from qgate.constants import ETSI014_API_PREFIX
from qgate.crypto.secret import Secret
from qgate.errors import ConfigError, KmsBadAnswerError, KmsError
from qgate.kms import etsi014
from qgate.kms.etsi014 import JsonObject, QkdKey, Status
from qgate.kms.quirks import Quirks, check_quirks
from qgate.kms.sim_store import (
    MAX_DERIVED_KEY_BITS,
    UNKNOWN_KEY_ID,
    DeliveredKey,
    IncomingStore,
    LinkKeys,
    OutgoingPool,
    Rejection,
    ReleaseSchedule,
)

log = logging.getLogger(__name__)

DELIVERED_PATH: Final = "/kme/v1/delivered"
"""Private KME-to-KME endpoint: the master's KME reports key_IDs delivered to its master SAE."""
INFO_PATH: Final = "/kme/v1/info"
"""Private KME-to-KME endpoint: the KME's ID and the SAE IDs attached to it."""
MAX_CLOCK_SKEW: Final = 300.0
"""Seconds the two KMEs' clocks may differ: how far from "now" a reported key index may lie."""
MIN_LINK_SECRET: Final = 16
"""Bytes: the shortest link secret accepted."""

Query = Mapping[str, Sequence[str]]
"""Decoded URL query: name -> values."""


@dataclass(frozen=True)
class KmeConfig:
    """Settings of one simulated KME; sizes in bits, rate in bits/s.

    Attributes:
        kme_id: this KME's ID (its certificate CN).
        peer_kme_id: the other end of the link (the peer KME's certificate CN).
        saes: SAE IDs attached to this KME (certificate CNs allowed to call the ETSI API).
        link_secret: shared secret of the simulated QKD link (>= MIN_LINK_SECRET bytes).
        peer_saes: SAE IDs attached to the peer; empty: ask the peer (``/kme/v1/info``).
        rate: key released per direction, bits/s: steadily (fibre), or during each pass when
            ``burst_period`` > 0 and ``burst_bits`` is None.
        max_key_count: keys of ``key_size`` bits stored per direction at most.
        key_size: default key size (Status ``key_size``), a multiple of 8.
        min_key_size: smallest ``size`` a request may ask for, a multiple of 8.
        max_key_size: largest ``size`` a request may ask for (<= MAX_DERIVED_KEY_BITS).
        max_key_per_request: largest ``number`` a request may ask for.
        burst_period: seconds per pass cycle (0: steady release at ``rate``).
        burst_duration: seconds each pass lasts, at the start of its cycle (0: its key comes at
            once).
        burst_bits: bits released per direction by each pass (satellite); None:
            ``rate * burst_duration``.
        initial_key_count: keys stored when the KME starts.
        admins: client certificate CNs allowed to call the fault admin API
            (``qgate.kms.faults``); empty: nobody.
        quirks: product quirks, for good (names of ``qgate.kms.quirks.QUIRKS``); empty: none.
    """

    kme_id: str
    peer_kme_id: str
    saes: tuple[str, ...]
    link_secret: Secret = field(repr=False)
    peer_saes: tuple[str, ...] = ()
    rate: float = 100_000.0
    max_key_count: int = 1000
    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = 128
    burst_period: float = 0.0
    burst_duration: float = 0.0
    burst_bits: int | None = None
    initial_key_count: int = 0
    admins: tuple[str, ...] = ()
    quirks: tuple[str, ...] = ()

    def check(self) -> None:
        """Raise ConfigError naming the first inconsistent setting (or an unknown quirk)."""
        ids = [self.kme_id, self.peer_kme_id, *self.saes, *self.peer_saes]
        admins_ok = all(etsi014.valid_id(i, etsi014.SAE_ID_MAX_LEN) for i in self.admins)
        problems = [
            (not all(etsi014.valid_id(i, etsi014.SAE_ID_MAX_LEN) for i in ids), "invalid KME or SAE ID"),
            (len(set(ids)) != len(ids), "KME and SAE IDs must all differ"),
            (not self.saes, "at least one SAE must be attached"),
            (len(self.link_secret) < MIN_LINK_SECRET, f"link secret shorter than {MIN_LINK_SECRET} bytes"),
            (not self.rate >= 0, "rate must be >= 0 bits/s"),
            (self.max_key_count < 1 or self.max_key_per_request < 1, "key counts must be >= 1"),
            (
                not 8 <= self.min_key_size <= self.key_size <= self.max_key_size <= MAX_DERIVED_KEY_BITS,
                f"need 8 <= min_key_size <= key_size <= max_key_size <= {MAX_DERIVED_KEY_BITS}",
            ),
            (any(s % 8 for s in (self.key_size, self.min_key_size, self.max_key_size)), "sizes: bytes"),
            (
                self.burst_period < 0 or not 0 <= self.burst_duration <= max(self.burst_period, 0),
                f"burst duration ({self.burst_duration} s) must be between 0 and the burst period "
                f"({self.burst_period} s)",
            ),
            (
                self.burst_bits is not None and (self.burst_bits < 0 or self.burst_period <= 0),
                "burst bits must be >= 0 and need a burst period > 0",
            ),
            (self.initial_key_count < 0, "initial_key_count must be >= 0"),
            (not admins_ok, "invalid admin CN"),
        ]
        for failed, text in problems:
            if failed:
                raise ConfigError(f"kms-sim {self.kme_id}: {text}")
        try:
            check_quirks(self.quirks)
        except ConfigError as exc:
            raise ConfigError(f"kms-sim {self.kme_id}: {exc}") from exc


class PeerLink(Protocol):
    """The KME-to-KME channel toward the peer KME (mutually authenticated)."""

    def report_delivered(self, body: bytes) -> None:
        """POST ``body`` to the peer's DELIVERED_PATH; raise KmsError unless it answers 200."""

    def fetch_saes(self) -> tuple[str, ...]:
        """GET the peer's INFO_PATH; return its SAE IDs; raise KmsError on any failure."""


class _Rejected(Exception):
    """Internal control flow of :class:`Kme`: always turned into an HTTP error answer."""

    def __init__(self, status: int, message: str, details: Sequence[dict[str, str]] = ()) -> None:
        super().__init__(message)
        self.rejection = Rejection(status, message, tuple(details))


class Kme:
    """One simulated KME: the ETSI 014 API for its SAEs plus the private channel to its peer.

    Args:
        config: checked settings.
        clock: wall-clock time source, seconds since the Unix epoch (the key stream's origin).
        peer: the channel to the peer KME; may be set later through the ``peer`` attribute.

    Raises:
        ConfigError: inconsistent ``config``.
    """

    def __init__(
        self, config: KmeConfig, *, clock: Callable[[], float] = time.time, peer: PeerLink | None = None
    ) -> None:
        config.check()
        self.config = config
        self.quirks = Quirks(config.quirks)
        self.peer = peer
        self._clock = clock
        self._lock = threading.Lock()
        self._link = LinkKeys(config.link_secret)
        self._out_direction = f"{config.kme_id}>{config.peer_kme_id}"
        self._in_direction = f"{config.peer_kme_id}>{config.kme_id}"
        schedule = ReleaseSchedule(config.rate, config.burst_period, config.burst_duration, config.burst_bits)
        self._pool = OutgoingPool(
            schedule,
            key_size=config.key_size,
            max_key_count=config.max_key_count,
            start=clock(),
            initial=config.initial_key_count,
        )
        self._incoming = IncomingStore(config.max_key_count)
        self._learned_peer_saes: frozenset[str] = frozenset()

    def handle(
        self, method: str, path: str, query: Query, body: bytes, caller: str | None
    ) -> tuple[int, bytes]:
        """Answer one request.

        Args:
            method: HTTP method.
            path: URL path, still percent-encoded.
            query: decoded query parameters.
            body: request body (JSON for POST).
            caller: subject CN of the verified client certificate, None if unusable.

        Returns:
            ``(status, body)``: 200 with the section 6 JSON answer, or an error with an Error body.
        """
        try:
            if path.startswith(ETSI014_API_PREFIX + "/"):
                return 200, self._api(method, path, query, body, caller)
            if path in (DELIVERED_PATH, INFO_PATH):
                return 200, self._private(method, path, body, caller)
            raise _Rejected(404, "no such endpoint")
        except _Rejected as exc:
            rejection = exc.rejection
            log.info("%s %s from %s: %d %s", method, path, caller, rejection.status, rejection.message)
            return rejection.status, etsi014.encode_error(rejection.message, rejection.details)

    def stored_key_count(self) -> int:
        """Keys of ``key_size`` bits ready for this KME's master SAEs now."""
        with self._lock:
            return self._pool.available(self._clock())

    def forget(self, method: str, query: Query, body: bytes) -> list[str]:
        """Drop for good the waiting keys a dec_keys request names (fault ``forget``).

        A KME that lost them answers the request with 400 "unknown key_ID" afterwards.

        Args:
            method, query, body: the dec_keys request (GET query or POST body, section 5.3).

        Returns:
            The key_IDs dropped (none if the request is malformed).
        """
        try:
            key_ids = _key_ids_request(method, query, body)
        except _Rejected:
            return []
        with self._lock:
            forgotten = self._incoming.forget(key_ids)
        if forgotten:
            log.warning("fault: forgot delivered key_IDs %s", forgotten)
        return forgotten

    def waiting_key_count(self) -> int:
        """Keys delivered by the peer's master SAEs and not yet fetched by our slave SAEs."""
        with self._lock:
            return len(self._incoming)

    # --- ETSI 014 API ----------------------------------------------------------------------------

    def _api(self, method: str, path: str, query: Query, body: bytes, caller: str | None) -> bytes:
        parts = path[len(ETSI014_API_PREFIX) + 1 :].split("/")
        if len(parts) != 2 or parts[1] not in ("status", "enc_keys", "dec_keys"):
            raise _Rejected(404, "no such endpoint")
        sae_id, endpoint = unquote(parts[0]), parts[1]
        allowed = ("GET",) if endpoint == "status" else ("GET", "POST")
        if method not in allowed:
            raise _Rejected(405, f"method {method} not allowed on {endpoint}")
        if caller is None or caller not in self.config.saes:
            raise _Rejected(401, "caller is not an SAE attached to this KME", [{"caller": str(caller)}])
        if endpoint == "status":
            return self._status(caller, sae_id)
        if endpoint == "enc_keys":
            number, size = _key_request(method, query, body, self.config.key_size)
            return self._enc_keys(caller, sae_id, number, size)
        return self._dec_keys(caller, sae_id, _key_ids_request(method, query, body))

    def _status(self, caller: str, slave: str) -> bytes:
        self._require_peer_sae(slave)
        cfg = self.config
        status = Status(
            source_KME_ID=cfg.kme_id,
            target_KME_ID=cfg.peer_kme_id,
            master_SAE_ID=caller,
            slave_SAE_ID=slave,
            key_size=cfg.key_size,
            stored_key_count=self.stored_key_count(),
            max_key_count=cfg.max_key_count,
            max_key_per_request=cfg.max_key_per_request,
            max_key_size=cfg.max_key_size,
            min_key_size=cfg.min_key_size,
            max_SAE_ID_count=0,
        )
        return self.quirks.status(status).to_json()

    def _enc_keys(self, caller: str, slave: str, asked: int, size: int) -> bytes:
        cfg = self.config
        limit = self.quirks.max_key_per_request(cfg.max_key_per_request)
        if not 1 <= asked <= limit:
            raise _Rejected(400, f"number must be 1..{limit}", [{"number": str(asked)}])
        if size % 8 or not cfg.min_key_size <= size <= cfg.max_key_size:
            text = f"size must be a multiple of 8 in {cfg.min_key_size}..{cfg.max_key_size} bits"
            raise _Rejected(400, text, [{"size": str(size)}])
        self._require_peer_sae(slave)
        number = self.quirks.served_number(asked)  # quirk short: fewer than asked
        per_key = math.ceil(size / cfg.key_size)
        with self._lock:
            now = self._clock()
            behind = self._pool.clock_behind(now)
            first = self._pool.take(number * per_key, now)
            stored = self._pool.available(now)
        if behind > 0:
            log.error("clock went backwards by %.3f s: refusing to serve keys (would reuse key)", behind)
            raise _Rejected(503, "KME clock went backwards: no key served until it catches up")
        if first is None:
            text = f"not enough key: {number} x {size} bits asked, {stored} x {cfg.key_size} bits stored"
            status, text = self.quirks.not_enough() or (503, text)
            raise _Rejected(status, text)
        keys = [
            DeliveredKey(self._link.key_id(self._out_direction, idx), idx, size, caller, slave)
            for idx in range(first, first + number * per_key, per_key)
        ]
        self._report(keys)
        log.info(
            "enc_keys %s -> %s: %d x %d bits, key_IDs %s",
            caller,
            slave,
            number,
            size,
            [k.key_id for k in keys],
        )
        return etsi014.encode_key_container(
            [QkdKey(k.key_id, self._link.key(self._out_direction, k.index, size)) for k in keys]
        )

    def _dec_keys(self, caller: str, master: str, key_ids: list[str]) -> bytes:
        limit = self.quirks.max_key_per_request(self.config.max_key_per_request)
        if len(key_ids) > limit:
            raise _Rejected(400, f"at most {limit} key_IDs per request")
        with self._lock:
            result = self._incoming.take(caller, master, key_ids)
            if isinstance(result, Rejection) and result.message == UNKNOWN_KEY_ID and self.quirks:
                retrieved = any(self._incoming.was_taken(d.get("key_ID", "")) for d in result.details)
                status, text = self.quirks.unknown_key(retrieved=retrieved) or (result.status, result.message)
                result = Rejection(status, text, result.details)
        if isinstance(result, Rejection):
            raise _Rejected(result.status, result.message, result.details)
        log.info("dec_keys %s <- %s: key_IDs %s", caller, master, key_ids)
        return etsi014.encode_key_container(
            [QkdKey(k.key_id, self._link.key(self._in_direction, k.index, k.size_bits)) for k in result]
        )

    def _report(self, keys: Sequence[DeliveredKey]) -> None:
        """Tell the peer KME about ``keys`` before the master SAE sees them; 503 if it cannot."""
        if self.peer is None:
            raise _Rejected(503, "no channel to the peer KME")
        first = keys[0]
        report: JsonObject = {
            "master_SAE_ID": first.master_sae,
            "slave_SAE_ID": first.slave_sae,
            "keys": [{"key_ID": k.key_id, "index": k.index, "size": k.size_bits} for k in keys],
        }
        if "replace-on-enc" in self.quirks:
            report["replace"] = True
        body = etsi014.dumps_json(report)
        try:
            self.peer.report_delivered(body)
        except KmsError as exc:
            log.warning(
                "peer KME %s did not take key_IDs %s (lost): %s",
                self.config.peer_kme_id,
                [k.key_id for k in keys],
                exc,
            )
            raise _Rejected(503, "peer KME unreachable") from exc

    def _require_peer_sae(self, slave: str) -> None:
        if slave in self._peer_saes(slave):
            return
        raise _Rejected(400, "slave SAE is not attached to the peer KME", [{"slave_SAE_ID": slave}])

    def _peer_saes(self, wanted: str) -> frozenset[str]:
        if self.config.peer_saes:
            return frozenset(self.config.peer_saes)
        with self._lock:
            known = self._learned_peer_saes
        if wanted in known:
            return known
        if self.peer is None:
            raise _Rejected(503, "no channel to the peer KME")
        try:
            learned = frozenset(self.peer.fetch_saes())
        except KmsError as exc:
            log.warning("cannot learn the SAEs of peer KME %s: %s", self.config.peer_kme_id, exc)
            raise _Rejected(503, "peer KME unreachable") from exc
        with self._lock:
            self._learned_peer_saes = learned
        return learned

    # --- KME-to-KME --------------------------------------------------------------------------------

    def _private(self, method: str, path: str, body: bytes, caller: str | None) -> bytes:
        if caller != self.config.peer_kme_id:
            raise _Rejected(401, "caller is not the peer KME", [{"caller": str(caller)}])
        if path == INFO_PATH:
            if method != "GET":
                raise _Rejected(405, f"method {method} not allowed")
            return etsi014.dumps_json({"KME_ID": self.config.kme_id, "SAE_IDs": list(self.config.saes)})
        if method != "POST":
            raise _Rejected(405, f"method {method} not allowed")
        keys, replace = self._parse_delivered(body)
        with self._lock:
            dropped, rejection = self._incoming.add(keys)
            superseded = []
            if replace and rejection is None:  # all or none: only once the new keys are in
                new = {k.key_id for k in keys}
                superseded = self._incoming.supersede(keys[0].master_sae, keys[0].slave_sae, keep=new)
        if superseded:
            gone = [k.key_id for k in superseded]
            log.info("peer superseded unfetched key_IDs %s (it replaces on enc_keys)", gone)
        if rejection is not None:
            raise _Rejected(rejection.status, rejection.message, rejection.details)
        if dropped:
            log.warning("slave store full: dropped unfetched key_IDs %s", [k.key_id for k in dropped])
        log.info("peer delivered key_IDs %s for %s", [k.key_id for k in keys], keys[0].slave_sae)
        return b"{}"

    def _parse_delivered(self, body: bytes) -> tuple[list[DeliveredKey], bool]:
        """Return the reported keys and whether they supersede the pair's waiting ones."""
        obj = _json_object(body)
        master, slave, raw_keys = obj.get("master_SAE_ID"), obj.get("slave_SAE_ID"), obj.get("keys")
        if not isinstance(master, str) or not isinstance(slave, str) or slave not in self.config.saes:
            raise _Rejected(400, "master_SAE_ID/slave_SAE_ID invalid or slave not attached here")
        if not isinstance(raw_keys, list) or not raw_keys:
            raise _Rejected(400, "keys must be a non-empty array")
        replace = obj.get("replace", False)
        if not isinstance(replace, bool):
            raise _Rejected(400, "replace must be true or false")
        keys = []
        for raw in raw_keys:
            entry = raw if isinstance(raw, dict) else {}
            index, size, key_id = entry.get("index"), entry.get("size"), entry.get("key_ID")
            if not _is_int(index, 0, 1 << 62) or not _is_int(size, 8, MAX_DERIVED_KEY_BITS) or size % 8:
                raise _Rejected(400, "key index/size invalid")
            if not self._plausible_index(index):
                raise _Rejected(
                    400, "key index too far from the link's current index", [{"index": str(index)}]
                )
            if not isinstance(key_id, str) or key_id != self._link.key_id(self._in_direction, index):
                raise _Rejected(400, "key_ID does not match the link's key stream", [{"key_ID": str(key_id)}])
            keys.append(DeliveredKey(key_id, index, size, master, slave))
        return keys, replace

    def _plausible_index(self, index: int) -> bool:
        """Whether the peer may have released block ``index`` recently, allowing MAX_CLOCK_SKEW."""
        cfg, now = self.config, self._clock()
        with self._lock:
            low = self._pool.released(now - MAX_CLOCK_SKEW) - cfg.max_key_count - cfg.initial_key_count
            high = self._pool.released(now + MAX_CLOCK_SKEW)
        return low <= index <= high


# --- request parsing -------------------------------------------------------------------------------


def _key_request(method: str, query: Query, body: bytes, default_size: int) -> tuple[int, int]:
    """Return ``(number, size)`` from a Get key request (section 5.2: GET query or 6.2 JSON body)."""
    if method == "GET":
        _only(query, {"number", "size"})
        return _query_int(query, "number", 1), _query_int(query, "size", default_size)
    obj = _json_object(body) if body.strip() else {}
    known = {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory", "extension_optional"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise _Rejected(400, "unknown field in key request", [{"field": name} for name in unknown])
    for name in ("additional_slave_SAE_IDs", "extension_mandatory", "extension_optional"):
        if not isinstance(obj.get(name, []), list):
            raise _Rejected(400, f"{name} must be an array")
    if obj.get("additional_slave_SAE_IDs"):
        raise _Rejected(400, "additional_slave_SAE_IDs not supported (max_SAE_ID_count is 0)")
    if obj.get("extension_mandatory"):
        raise _Rejected(400, "mandatory extensions not supported", [{"extension_mandatory": "unsupported"}])
    number, size = obj.get("number", 1), obj.get("size", default_size)
    if not _is_int(number, None, None) or not _is_int(size, None, None):
        raise _Rejected(400, "number and size must be integers")
    return number, size


def _key_ids_request(method: str, query: Query, body: bytes) -> list[str]:
    """Return the distinct key_IDs of a Get key with key IDs request (GET ``key_ID`` or 6.4 body)."""
    if method == "GET":
        _only(query, {"key_ID"})
        values = list(query.get("key_ID", ()))
        if len(values) != 1:
            raise _Rejected(400, "exactly one key_ID query parameter needed")
        key_ids: list[object] = list(values)
    else:
        obj = _json_object(body)
        if not set(obj) <= {"key_IDs", "key_IDs_extension"} or not isinstance(obj.get("key_IDs"), list):
            raise _Rejected(400, 'body must be {"key_IDs": [{"key_ID": ...}, ...]}')
        entries = obj["key_IDs"]
        assert isinstance(entries, list)
        key_ids = [e.get("key_ID") if isinstance(e, dict) else None for e in entries]
    if not key_ids or not all(etsi014.valid_id(k) for k in key_ids):
        raise _Rejected(400, "key_IDs missing or invalid")
    if len(set(key_ids)) != len(key_ids):
        raise _Rejected(400, "repeated key_ID in request")
    return [k for k in key_ids if isinstance(k, str)]


def _json_object(body: bytes) -> JsonObject:
    try:
        obj = etsi014.loads_json(body, "request")
    except KmsBadAnswerError as exc:
        raise _Rejected(400, "request body is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise _Rejected(400, "request body is not a JSON object")
    return obj


def _only(query: Query, names: set[str]) -> None:
    unknown = sorted(set(query) - names)
    if unknown:
        raise _Rejected(400, "unknown query parameter", [{"parameter": name} for name in unknown])


def _query_int(query: Query, name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    if len(values) != 1 or not values[0].isascii() or not values[0].isdigit() or len(values[0]) > 9:
        raise _Rejected(400, f"{name} must be one decimal integer", [{name: values[0][:20]}])
    return int(values[0])


def _is_int(value: object, low: int | None, high: int | None) -> TypeGuard[int]:
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (low is None or value >= low) and (high is None or value <= high)
