"""Prometheus metrics: the gateway's status object exposed as a scrape target.

``GatewayCollector`` is a ``prometheus_client`` custom collector: on every scrape it calls a
function returning the gateway's status (the shape of ``Gateway.status(now)``) and turns the
whitelisted numeric fields into metric families. Nothing is kept between scrapes (no global
mutable metrics), so the numbers are exactly the gateway's own counters. Only the fields named
in this module are exported; free text (``why``), unknown fields and anything that is not a
number are ignored, so no key material can reach a scrape.

``start_metrics_server`` serves a private ``CollectorRegistry`` over HTTP in a daemon thread
(Prometheus text exposition format 0.0.4, any path, e.g. ``/metrics``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from qgate import __version__
from qgate.errors import ConfigError

log = logging.getLogger(__name__)

StatusFn = Callable[[], Mapping[str, object]]
"""Returns the gateway's status object (``Gateway.status(now)`` shape); called once per scrape."""

PEER_STATES: Final = ("up", "rekeying", "degraded", "down")
"""Values of a peer's ``state`` (``Peer.state``); ``qgate_peer_state`` has one series per value."""
CARRYING_STATES: Final = frozenset({"up", "rekeying", "degraded"})
"""States in which the peer has a usable traffic key (``qgate_peer_up`` is 1)."""
DROP_REASONS: Final = (
    "bad_tag",
    "replay",
    "unknown_epoch",
    "key_expired",
    "key_exhausted",
    "no_session",
    "malformed",
    "too_big",
)
"""Keys of a peer's ``drops`` mapping, exported as ``qgate_drops_total{reason=...}``."""
GUARD_EVENTS: Final = (
    "mac1_failed",
    "mac2_failed",
    "stale_challenge",
    "over_budget",
    "retries_sent",
    "retries_received",
    "retries_unmatched",
    "kicks_ignored",
    "degrade_refused",
)
"""Keys of a peer's ``guard`` mapping (v2 handshake defences): ``qgate_guard_events_total{event=...}``."""
GATEWAY_COUNTERS: Final[Mapping[str, str]] = {
    "audit_failures": "Audit log records that could not be written",
    "audit_dropped": "Audit records lost: queue full, or still queued when writing failed",
    "rx_not_qgate": "UDP datagrams that are not qgate messages",
    "rx_unknown_source": "Handshake fragments from an address that is no configured peer",
    "rx_unknown_index": "Data records matching no peer (receiver index or address)",
    "drops_bad_inner_source": "Decrypted packets whose source address is not routed to the sending peer",
    "drops_no_route": "Inner packets from the TUN with no peer route for their destination",
    "drops_send_error": "Datagrams the UDP socket failed to send",
    "drops_bad_offload": "TUN packets with an unusable offload (virtio-net) header",
    "drops_aqm": "TUN reads dropped by the flow queue (CoDel standing-queue drops, byte limit), RFC 8290",
    "ecn_marks": "TUN reads marked ECN CE by the flow queue instead of dropped (RFC 3168)",
    "drops_bad_checksum": "TCP/UDP packets from the TUN whose checksum failed (dropped before sealing)",
    "tun_write_errors": "Decrypted packets the TUN device failed to take",
}
"""Keys of the status ``counters`` mapping (GatewayStats + ForwarderStats) exported as
``qgate_gateway_<key>_total``, with their help text; a counter added to those dataclasses must be
added here too (a test checks)."""
STATUS_TIMEOUT: Final = 2.0
"""Seconds a scrape waits for the event loop to answer the status call."""
STOP_TIMEOUT: Final = 5.0
"""Seconds ``MetricsServer.stop`` waits for the server thread to end."""

_PEER: Final = ("gateway", "peer")


@dataclass(frozen=True)
class _Spec:
    kind: Literal["gauge", "counter"]
    doc: str
    labels: tuple[str, ...] = _PEER


SPECS: Final[Mapping[str, _Spec]] = {
    "qgate_status_up": _Spec("gauge", "1 when the gateway answered this scrape's status call", ()),
    "qgate_build_info": _Spec("gauge", "Always 1; the qgate version as a label", ("gateway", "version")),
    "qgate_uptime_seconds": _Spec("gauge", "Seconds since the gateway started", ("gateway",)),
    "qgate_peer_info": _Spec("gauge", "Always 1; static peer settings", (*_PEER, "role", "fail_mode")),
    "qgate_peer_up": _Spec("gauge", "1 when the peer has a usable traffic key (state up/rekeying/degraded)"),
    "qgate_peer_state": _Spec("gauge", "1 for the peer's current state, 0 for the others", (*_PEER, "state")),
    "qgate_peer_degraded": _Spec("gauge", "1 when the current epoch has no QKD key (ML-KEM/X25519 only)"),
    "qgate_epoch": _Spec("gauge", "Number of the current key epoch (absent before the first handshake)"),
    "qgate_epoch_age_seconds": _Spec("gauge", "Seconds since the current epoch was installed"),
    "qgate_last_handshake_age_seconds": _Spec("gauge", "Seconds since the last completed handshake/rekey"),
    "qgate_rekey_interval_seconds": _Spec(
        "gauge", "Current fast-rekey interval (stretches when QKD stock runs low)"
    ),
    "qgate_qkd_keys_available": _Spec(
        "gauge", "QKD keys available: in the KME store (kme) or fetched ahead (prefetch)", (*_PEER, "where")
    ),
    "qgate_rekeys_total": _Spec(
        "counter", "Completed rekeys by kind (qkd ratchet, kem handshake)", (*_PEER, "kind")
    ),
    "qgate_rekey_failures_total": _Spec("counter", "Handshakes or ratchet steps abandoned"),
    "qgate_packets_total": _Spec("counter", "Inner packets carried, by direction", (*_PEER, "direction")),
    "qgate_bytes_total": _Spec("counter", "Inner bytes carried, by direction", (*_PEER, "direction")),
    "qgate_drops_total": _Spec("counter", "Packets dropped, by reason", (*_PEER, "reason")),
    "qgate_guard_events_total": _Spec(
        "counter",
        "Handshake guard events (mac1/mac2 drops, Retries, budget, refused downgrades)",
        (*_PEER, "event"),
    ),
    **{
        f"qgate_gateway_{key}_total": _Spec("counter", doc, ("gateway",))
        for key, doc in GATEWAY_COUNTERS.items()
    },
}
"""Every metric family this collector can export, with its type, help text and label names."""

_PEER_GAUGES: Final = (
    ("qgate_epoch", "epoch"),
    ("qgate_epoch_age_seconds", "epoch_age_s"),
    ("qgate_last_handshake_age_seconds", "last_handshake_s"),
    ("qgate_rekey_interval_seconds", "rekey_interval_s"),
)


def _number(row: Mapping[str, object], key: str) -> float | None:
    """Return ``row[key]`` as a float when it is an int or float (not bool), else None."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(row: Mapping[str, object], key: str) -> str:
    value = row.get(key)
    return value if isinstance(value, str) else ""


def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    made: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    for name, spec in SPECS.items():
        if spec.kind == "gauge":
            made[name] = GaugeMetricFamily(name, spec.doc, labels=spec.labels)
        else:
            made[name] = CounterMetricFamily(name, spec.doc, labels=spec.labels)
    return made


class GatewayCollector:
    """A ``prometheus_client`` collector reading the gateway's status on every scrape.

    Args:
        status_fn: returns the status object (``Gateway.status(now)`` shape). It runs in the
            HTTP server's thread; wrap it with ``status_from_loop`` when the gateway lives on an
            asyncio loop. If it raises, the scrape still answers with ``qgate_status_up 0``.
    """

    def __init__(self, status_fn: StatusFn) -> None:
        self._status_fn = status_fn

    def describe(self) -> Iterable[Metric]:
        """Return the families without samples (lets the registry check names without a status call)."""
        return list(_families().values())

    def collect(self) -> Iterable[Metric]:
        """Return every family filled from one status call."""
        families = _families()
        try:
            status = self._status_fn()
        except Exception as exc:  # a scrape must never take the gateway down; say so in the metric
            log.warning("metrics: status call failed: %s", exc, exc_info=not isinstance(exc, TimeoutError))
            families["qgate_status_up"].add_metric([], 0.0)
            return [families["qgate_status_up"]]
        families["qgate_status_up"].add_metric([], 1.0)
        gateway = _text(status, "gateway")
        self._fill_gateway(families, gateway, status)
        peers = status.get("peers")
        for row in peers if isinstance(peers, list) else []:
            if isinstance(row, Mapping) and _text(row, "name"):
                self._fill_peer(families, gateway, row)
        return list(families.values())

    @staticmethod
    def _fill_gateway(
        families: Mapping[str, GaugeMetricFamily | CounterMetricFamily],
        gateway: str,
        status: Mapping[str, object],
    ) -> None:
        families["qgate_build_info"].add_metric([gateway, __version__], 1.0)
        uptime = _number(status, "uptime_s")
        if uptime is not None:
            families["qgate_uptime_seconds"].add_metric([gateway], uptime)
        counters = status.get("counters")
        if isinstance(counters, Mapping):
            for key in GATEWAY_COUNTERS:
                value = _number(counters, key)
                if value is not None:
                    families[f"qgate_gateway_{key}_total"].add_metric([gateway], value)

    @staticmethod
    def _fill_peer(
        families: Mapping[str, GaugeMetricFamily | CounterMetricFamily],
        gateway: str,
        row: Mapping[str, object],
    ) -> None:
        base = [gateway, _text(row, "name")]

        def put(name: str, extra: Sequence[str], value: float | None) -> None:
            if value is not None:
                families[name].add_metric([*base, *extra], value)

        state = _text(row, "state")
        put("qgate_peer_info", [_text(row, "role"), _text(row, "fail_mode")], 1.0)
        put("qgate_peer_up", [], float(state in CARRYING_STATES))
        for known in PEER_STATES:
            put("qgate_peer_state", [known], float(known == state))
        put("qgate_peer_degraded", [], float(row.get("mode") == "degraded"))
        for name, key in _PEER_GAUGES:
            put(name, [], _number(row, key))
        put("qgate_qkd_keys_available", ["kme"], _number(row, "qkd_kme_stock"))
        put("qgate_qkd_keys_available", ["prefetch"], _number(row, "qkd_prefetch_stock"))
        put("qgate_rekeys_total", ["qkd"], _number(row, "rekeys_qkd"))
        put("qgate_rekeys_total", ["kem"], _number(row, "rekeys_kem"))
        put("qgate_rekey_failures_total", [], _number(row, "rekeys_failed"))
        for direction in ("tx", "rx"):
            put("qgate_packets_total", [direction], _number(row, f"{direction}_packets"))
            put("qgate_bytes_total", [direction], _number(row, f"{direction}_bytes"))
        drops = row.get("drops")
        if isinstance(drops, Mapping):
            for reason in DROP_REASONS:
                put("qgate_drops_total", [reason], _number(drops, reason))
        guard = row.get("guard")
        if isinstance(guard, Mapping):
            for event in GUARD_EVENTS:
                put("qgate_guard_events_total", [event], _number(guard, event))


def status_from_loop(
    loop: asyncio.AbstractEventLoop, status_fn: StatusFn, *, timeout: float = STATUS_TIMEOUT
) -> StatusFn:
    """Return a status function that runs ``status_fn`` on ``loop`` and waits for its answer.

    The gateway's state belongs to its event loop thread; the metrics server calls from its
    own thread, so each scrape hands the call to the loop (``call_soon_threadsafe``).

    Args:
        loop: the gateway's running event loop.
        status_fn: the gateway's status call, e.g. ``lambda: gateway.status(time.monotonic())``.
        timeout: seconds to wait for the loop; a scrape then reports ``qgate_status_up 0``.

    Raises:
        TimeoutError: (from the returned function) the loop did not answer within ``timeout``.
        RuntimeError: (from the returned function) the loop is closed.
    """

    def call() -> Mapping[str, object]:
        future: concurrent.futures.Future[Mapping[str, object]] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(status_fn())
            except Exception as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        try:
            return future.result(timeout)
        finally:
            future.cancel()

    return call


def format_address(host: str, port: int) -> str:
    """Return ``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """Parse a listen address ``HOST:PORT`` or ``[IPV6]:PORT`` (e.g. for a ``--metrics`` option).

    Raises:
        ConfigError: no port, a port outside 0..65535, or an empty host.
    """
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # bare IPv6 needs brackets: [::1]:9108
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"metrics address {text!r}: expected HOST:PORT or [IPV6]:PORT, port 0-65535")
    return host, int(port_text)


class MetricsServer:
    """A running metrics HTTP server (from ``start_metrics_server``); ``stop`` ends it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self._stopped = False

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; the port is the real one when 0 was asked for."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        return f"http://{format_address(*self.address)}/metrics"

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the thread (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT)

    close = stop

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def build_registry(status_fn: StatusFn, *, process_metrics: bool = True) -> CollectorRegistry:
    """Return a private registry holding a ``GatewayCollector`` (and the process collector).

    Args:
        status_fn: see ``GatewayCollector``.
        process_metrics: also export ``process_*`` (CPU seconds, resident memory bytes, open fds).
    """
    registry = CollectorRegistry()
    registry.register(GatewayCollector(status_fn))
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


def start_metrics_server(
    host: str, port: int, status_fn: StatusFn, *, process_metrics: bool = True
) -> MetricsServer:
    """Serve the gateway's metrics over HTTP from a daemon thread.

    Args:
        host: address to bind (``127.0.0.1`` keeps metrics local; IPv6 literals without brackets).
        port: TCP port (Prometheus exporter convention for qgate: 9108); 0 picks a free one.
        status_fn: returns the status object on each scrape (see ``status_from_loop``).
        process_metrics: also export the ``process_*`` metrics of this process.

    Returns:
        The running server; call ``stop()`` (or use it as a context manager) on shutdown.

    Raises:
        ConfigError: the address cannot be bound (in use, not local, bad host or port); the
            message names the address.
    """
    where = format_address(host, port)
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics address {where}: port must be 0-65535")
    registry = build_registry(status_fn, process_metrics=process_metrics)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except (OSError, UnicodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot serve metrics on {where}: {reason}") from exc
    running = MetricsServer(server, thread)
    log.info("serving Prometheus metrics on %s", running.url)
    return running
