"""HTTPS front of the KME simulator: mutual-TLS server, KME-to-KME channel, foreground runner.

The server is a stdlib ``ThreadingHTTPServer``; the TLS handshake runs in each connection's own
thread (a stalled client never blocks ``accept``). A client without a certificate signed by the
lab CA fails the handshake; the verified certificate's subject CN is the caller's identity
(ETSI GS QKD 014 section 4), never a request field. All logic sits in
:class:`qgate.kms.simulator.Kme`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Final
from urllib.parse import parse_qs, urlsplit

from qgate.errors import KmsBadAnswerError
from qgate.kms import etsi014
from qgate.kms.client import MtlsHttps, peer_common_name, server_context
from qgate.kms.simulator import DELIVERED_PATH, INFO_PATH, Kme, KmeConfig

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds a client gets to complete the TLS handshake."""
REQUEST_TIMEOUT: Final = 10.0
"""Seconds of socket inactivity after which a request is abandoned."""
MAX_REQUEST_BODY: Final = 64 * 1024
"""Bytes: the largest request body read (128 key_IDs need under 8 KiB)."""
PEER_TIMEOUT: Final = 5.0
"""Seconds for each KME-to-KME request."""


class HttpsPeerLink:
    """The KME-to-KME channel over HTTPS with mutual TLS (implements ``simulator.PeerLink``).

    Args:
        url: the peer KME's base URL (``https://10.99.0.2:8443``).
        peer_kme_id: the CN the peer's server certificate must carry.
        ca, cert, key: lab CA and this KME's own certificate and key (presented as client cert).
        timeout: seconds per request.

    Raises:
        ConfigError: bad URL or unusable files.
    """

    def __init__(
        self, url: str, *, peer_kme_id: str, ca: Path, cert: Path, key: Path, timeout: float = PEER_TIMEOUT
    ) -> None:
        self._https = MtlsHttps(url, ca=ca, cert=cert, key=key, timeout=timeout, server_cn=peer_kme_id)
        self._peer_kme_id = peer_kme_id

    def report_delivered(self, body: bytes) -> None:
        """POST the delivered key_IDs to the peer. Raises KmsError unless it answers 200."""
        status, answer = self._https.request("POST", DELIVERED_PATH, body)
        if status != 200:
            message = etsi014.parse_error_body(answer).message
            raise KmsBadAnswerError(f"peer KME refused the report: HTTP {status}: {message}", status=status)

    def fetch_saes(self) -> tuple[str, ...]:
        """Return the SAE IDs attached to the peer. Raises KmsError on any failure."""
        status, answer = self._https.request("GET", INFO_PATH)
        if status != 200:
            raise KmsBadAnswerError(f"peer KME info: HTTP {status}", status=status)
        obj = etsi014.loads_json(answer, "peer info")
        saes = obj.get("SAE_IDs") if isinstance(obj, dict) else None
        if (
            not isinstance(obj, dict)
            or obj.get("KME_ID") != self._peer_kme_id
            or not isinstance(saes, list)
            or not all(etsi014.valid_id(s) for s in saes)
        ):
            raise KmsBadAnswerError("peer KME info: malformed answer", status=status)
        return tuple(str(s) for s in saes)


class KmeHttpServer(ThreadingHTTPServer):
    """HTTPS server (mutual TLS) dispatching every request to a :class:`Kme`.

    Args:
        address: ``(host, port)`` to listen on; port 0 picks a free one (see ``server_address``).
        kme: the KME answering requests.
        context: server TLS context that requires client certificates.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], kme: Kme, context: ssl.SSLContext) -> None:
        self.kme = kme
        self.tls_context = context
        super().__init__(address, _Handler)

    def finish_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        """Complete the TLS handshake in this connection's thread, then serve the request."""
        assert isinstance(request, socket.socket)
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            _Handler(tls, client_address, self)
        finally:
            _close_quietly(tls)

    def handle_error(self, request: object, client_address: object) -> None:
        """Log an exception escaping a request (a client vanishing mid-request) without a traceback."""
        log.info("request from %s aborted", client_address, exc_info=log.isEnabledFor(logging.DEBUG))


class _Handler(BaseHTTPRequestHandler):
    server: KmeHttpServer
    timeout = REQUEST_TIMEOUT
    server_version = "qgate-kms-sim/1"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        connection = self.connection
        cert = connection.getpeercert() if isinstance(connection, ssl.SSLSocket) else None
        caller = peer_common_name(cert)
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        body = self._body()
        if body is None:
            status, answer = 400, etsi014.encode_error("bad or too large request body")
        else:
            status, answer = self.server.kme.handle(method, url.path, query, body, caller)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(answer)

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            return None
        length_text = self.headers.get("Content-Length", "0").strip()
        if not length_text.isdigit() or int(length_text) > MAX_REQUEST_BODY:
            return None
        length = int(length_text)
        data = self.rfile.read(length)
        return data if len(data) == length else None

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


@dataclass
class KmeService:
    """A KME with its HTTPS server, served from a background thread (tests, ``run_kme``)."""

    kme: Kme
    server: KmeHttpServer
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    @classmethod
    def bind(
        cls, config: KmeConfig, *, listen: tuple[str, int], ca: Path, cert: Path, key: Path
    ) -> KmeService:
        """Create the KME and bind its server (not yet serving).

        Raises:
            ConfigError: bad config or certificate files.
            OSError: the address cannot be bound.
        """
        kme = Kme(config)
        return cls(kme, KmeHttpServer(listen, kme, server_context(ca=ca, cert=cert, key=key)))

    @property
    def port(self) -> int:
        """The TCP port actually bound."""
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self.server.serve_forever, name=f"kms-sim-{self.kme.config.kme_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket (in-flight requests finish on their own)."""
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
            self._thread = None
        self.server.server_close()


def run_kme(
    config: KmeConfig,
    *,
    listen: tuple[str, int],
    ca: Path,
    cert: Path,
    key: Path,
    peer_url: str | None,
) -> None:
    """Run one KME in the foreground until SIGINT or SIGTERM (``qgate kms-sim``).

    Raises:
        ConfigError: bad config, URL or certificate files.
        OSError: the address cannot be bound.
    """
    peer = None
    if peer_url is not None:
        peer = HttpsPeerLink(peer_url, peer_kme_id=config.peer_kme_id, ca=ca, cert=cert, key=key)
    service = KmeService.bind(config, listen=listen, ca=ca, cert=cert, key=key)
    service.kme.peer = peer
    if peer is None:
        log.warning("no --peer-url: enc_keys will answer 503 (no channel to the peer KME)")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    service.start()
    log.info(
        "KME %s listening on %s:%d (SAEs %s; peer %s at %s)",
        config.kme_id,
        listen[0],
        service.port,
        list(config.saes),
        config.peer_kme_id,
        peer_url,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("KME %s stopped", config.kme_id)


def _close_quietly(sock: ssl.SSLSocket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
