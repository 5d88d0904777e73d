"""HTTPS front of the KME simulator: mutual-TLS server, KME-to-KME channel, foreground runner.

The server is a stdlib ``ThreadingHTTPServer``; the TLS handshake runs in each connection's own
thread (a stalled client never blocks ``accept``). A client without a certificate signed by the
lab CA fails the handshake; the verified certificate's subject CN is the caller's identity
(ETSI GS QKD 014 section 4), never a request field. All logic sits in
:class:`qgate.kms.simulator.Kme`; injected faults (:mod:`qgate.kms.faults`) are applied here,
including ``down`` (:meth:`KmeService.go_down`: the listening socket is closed, then bound again),
and so are the quirks of the wire (:mod:`qgate.kms.quirks`): ``cbc-only`` and ``no-san`` on TLS
(both ways: the peer KME is taken to be the same product), ``stall``, ``html-errors`` and
``details-422``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Final
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from qgate.errors import ConfigError, KmsBadAnswerError
from qgate.kms import etsi014
from qgate.kms.client import MtlsHttps, peer_common_name, server_context
from qgate.kms.faults import ADMIN_PATH, FaultControl, FaultSpec, etsi_endpoint, serve_with_fault
from qgate.kms.quirks import Quirks, describe
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
SERVE_POLL: Final = 0.1
"""Seconds between checks for a stop request while serving (how fast stop and ``down`` act)."""
REBIND_RETRY: Final = 0.5
"""Seconds between attempts to listen again after a ``down`` fault, while the port is taken."""


class HttpsPeerLink:
    """The KME-to-KME channel over HTTPS with mutual TLS (implements ``simulator.PeerLink``).

    Args:
        url: the peer KME's base URL (``https://10.99.0.2:8443``).
        peer_kme_id: the CN the peer's server certificate must carry.
        ca, cert, key: lab CA and this KME's own certificate and key (presented as client cert).
        timeout: seconds per request.
        quirks: the product's quirks, the peer's too: ``cbc-only`` offers the CBC suites,
            ``no-san`` skips the hostname check (the peer stays pinned by CN and CA).

    Raises:
        ConfigError: bad URL or unusable files.
    """

    def __init__(
        self,
        url: str,
        *,
        peer_kme_id: str,
        ca: Path,
        cert: Path,
        key: Path,
        timeout: float = PEER_TIMEOUT,
        quirks: Quirks | None = None,
    ) -> None:
        self._https = _PeerHttps(url, ca=ca, cert=cert, key=key, timeout=timeout, server_cn=peer_kme_id)
        if quirks is not None:
            self._https.fit(quirks)
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


class _PeerHttps(MtlsHttps):
    """MtlsHttps toward the peer KME, whose TLS may carry the product's quirks."""

    def fit(self, quirks: Quirks) -> None:
        """Apply ``quirks.peer_tls`` to this origin's client context."""
        quirks.peer_tls(self._context)


class KmeHttpServer(ThreadingHTTPServer):
    """HTTPS server (mutual TLS) dispatching every request to a :class:`Kme`.

    Args:
        address: ``(host, port)`` to listen on; port 0 picks a free one (see ``server_address``).
        kme: the KME answering requests.
        context: server TLS context that requires client certificates.
        faults: the faults to apply and the admin API; default: none and no admin.

    The wire quirks (``stall``, the error bodies) are ``kme.quirks``; ``context`` must already
    carry the TLS ones (:meth:`qgate.kms.quirks.Quirks.server_tls`).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], kme: Kme, context: ssl.SSLContext, faults: FaultControl | None = None
    ) -> None:
        self.kme = kme
        self.quirks = kme.quirks if isinstance(kme, Kme) else Quirks()  # a stand-in has none
        self.tls_context = context
        self.faults = faults if faults is not None else FaultControl()
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

    def do_PUT(self) -> None:
        self._refuse_method()

    def do_DELETE(self) -> None:
        if urlsplit(self.path).path.startswith(ADMIN_PATH):
            self._serve("DELETE")
        else:
            self._refuse_method()

    def do_PATCH(self) -> None:
        self._refuse_method()

    def do_HEAD(self) -> None:
        self._refuse_method()

    def do_OPTIONS(self) -> None:
        self._refuse_method()

    def do_TRACE(self) -> None:
        self._refuse_method()

    def do_CONNECT(self) -> None:
        self._refuse_method()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer a request the stdlib refuses (unknown method, bad request line) with an ETSI Error body."""
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        self._answer(code, etsi014.encode_error(text, [{"reason": explain or text}]))

    def _refuse_method(self) -> None:
        self._body()  # drain what the client sent
        self._answer(
            405, etsi014.encode_error(f"method {self.command} not allowed", [{"allowed": "GET, POST"}])
        )

    def _serve(self, method: str) -> None:
        connection = self.connection
        cert = connection.getpeercert() if isinstance(connection, ssl.SSLSocket) else None
        caller = peer_common_name(cert)
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        body = self._body()
        faults, kme = self.server.faults, self.server.kme
        endpoint = etsi_endpoint(url.path)
        stall = self.server.quirks.stall_seconds(endpoint)
        if stall > 0:
            log.info("quirk stall: holding %s %s from %s for %.1f s", method, url.path, caller, stall)
            time.sleep(stall)
        if body is None:
            self._answer(400, etsi014.encode_error("bad or too large request body"))
        elif url.path.startswith(ADMIN_PATH):
            self._answer(*faults.admin(method, url.path, body, caller))
        elif (fault := faults.table.take(endpoint)) is not None:
            faulty = serve_with_fault(fault, kme, (method, url.path, query, body, caller))
            if faulty.close_without_answer:
                self.close_connection = True  # the request was served; the answer is "lost"
                return
            self._answer(faulty.status, faulty.body, faulty.content_type, quirky=fault.kind != "error")
        else:
            self._answer(*kme.handle(method, url.path, query, body, caller))

    def _answer(
        self, status: int, answer: bytes, content_type: str = "application/json", *, quirky: bool = True
    ) -> None:
        """Send one answer; error answers of the ETSI API first go through the error-body quirks."""
        quirks = self.server.quirks
        if quirky and status >= 400 and quirks and not _private_path(getattr(self, "path", "")):
            status, answer, content_type = quirks.error_answer(status, answer, content_type)
        self.send_response(status)
        if status == 405:
            self.send_header("Allow", "GET, POST")
        self.send_header("Content-Type", content_type)
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


class KmeService:
    """A KME with its HTTPS server, served from a background thread (tests, ``run_kme``).

    Build it with :meth:`bind`. ``server`` is replaced when the KME comes back after a ``down``
    fault (same address and port).

    Attributes:
        kme: the KME.
        server: the HTTPS server currently bound (closed while down).
        faults: the KME's faults and admin API.
    """

    def __init__(self, kme: Kme, server: KmeHttpServer, context: ssl.SSLContext) -> None:
        self.kme = kme
        self.server = server
        self.faults = server.faults
        self.faults.on_down = self.go_down
        self._context = context
        self._address = (str(server.server_address[0]), int(server.server_address[1]))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._down = False

    @classmethod
    def bind(
        cls, config: KmeConfig, *, listen: tuple[str, int], ca: Path, cert: Path, key: Path
    ) -> KmeService:
        """Create the KME and bind its server (not yet serving).

        Raises:
            ConfigError: bad config or certificate files (``cert`` CN is not the KME ID, ``ca``
                is not a CA certificate, a subjectAltName in ``cert`` under quirk ``no-san``), or
                the address cannot be bound (named in the message).
        """
        check_kme_certificates(config.kme_id, ca=ca, cert=cert, no_san="no-san" in config.quirks)
        kme = Kme(config)
        context = server_context(ca=ca, cert=cert, key=key)
        kme.quirks.server_tls(context)
        for line in describe(kme.quirks.names):
            log.warning("KME %s quirk %s", config.kme_id, line)
        try:
            server = KmeHttpServer(listen, kme, context, FaultControl(config.admins))
        except OSError as exc:
            where = f"[{listen[0]}]:{listen[1]}" if ":" in listen[0] else f"{listen[0]}:{listen[1]}"
            raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
        return cls(kme, server, context)

    @property
    def port(self) -> int:
        """The TCP port bound (kept across a ``down`` fault)."""
        return self._address[1]

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            args=(SERVE_POLL,),
            name=f"kms-sim-{self.kme.config.kme_id}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket (in-flight requests finish on their own).

        Also ends a ``down`` fault in progress: the KME does not come back.
        """
        self._closed.set()
        with self._lock:
            self._halt()

    def go_down(self, fault: FaultSpec) -> None:
        """Fault ``down``: after ``fault.after`` seconds stop listening (new connections are
        refused) for ``fault.seconds`` seconds, then listen again on the same address.

        Returns at once (the outage runs in its own thread); ignored while already down.
        """
        threading.Thread(
            target=self._outage, args=(fault.seconds, fault.after), name="kms-sim-down", daemon=True
        ).start()

    def _outage(self, seconds: float, after: float) -> None:
        if self._closed.wait(after):
            return
        with self._lock:
            if self._closed.is_set() or self._down:
                return
            self._down = True
            self._halt()
        log.warning("fault: KME %s down for %.1f s", self.kme.config.kme_id, seconds)
        if self._closed.wait(seconds):
            return
        while not self._comeback():
            if self._closed.wait(REBIND_RETRY):
                return
        log.warning("fault: KME %s listening again on port %d", self.kme.config.kme_id, self.port)

    def _comeback(self) -> bool:
        """Bind and serve again; False if the address cannot be bound yet."""
        with self._lock:
            if self._closed.is_set():
                return True
            try:
                self.server = KmeHttpServer(self._address, self.kme, self._context, self.faults)
            except OSError as exc:
                log.error("KME cannot listen again on port %d yet: %s", self.port, exc)
                return False
            self._down = False
            self.start()
            return True

    def _halt(self) -> None:
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
    faults: Sequence[FaultSpec] = (),
) -> None:
    """Run one KME in the foreground until SIGINT or SIGTERM (``qgate kms-sim``).

    Args:
        config: the KME's settings (``config.admins`` may call the fault admin API).
        listen: ``(host, port)`` to serve HTTPS on.
        ca, cert, key: lab CA, this KME's certificate (CN = ``config.kme_id``) and key.
        peer_url: the peer KME's base URL; None: enc_keys answers 503.
        faults: faults active from the start (``--fault``); a ``down`` one starts the outage.
            Quirks come with ``config.quirks`` and are logged at start.

    Raises:
        ConfigError: bad config (an unknown quirk too), URL or certificate files.
        OSError: the address cannot be bound.
    """
    peer = None
    if peer_url is not None:
        peer = HttpsPeerLink(
            peer_url,
            peer_kme_id=config.peer_kme_id,
            ca=ca,
            cert=cert,
            key=key,
            quirks=Quirks(config.quirks),
        )
    service = KmeService.bind(config, listen=listen, ca=ca, cert=cert, key=key)
    service.kme.peer = peer
    if peer is None:
        log.warning("no --peer-url: enc_keys will answer 503 (no channel to the peer KME)")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    for fault in faults:  # request faults act from the first request on
        if fault.kind != "down":
            service.faults.inject(fault)
    service.start()
    for fault in faults:
        if fault.kind == "down":
            service.faults.inject(fault)
    log.info(
        "KME %s listening on %s:%d (SAEs %s; peer %s at %s; admins %s)",
        config.kme_id,
        listen[0],
        service.port,
        list(config.saes),
        config.peer_kme_id,
        peer_url,
        list(config.admins),
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("KME %s stopped", config.kme_id)


def check_kme_certificates(kme_id: str, *, ca: Path, cert: Path, no_san: bool = False) -> None:
    """Check that ``cert``'s subject CN is ``kme_id`` and that ``ca`` is a CA certificate.

    Args:
        kme_id: the KME ID given on the command line.
        ca: the lab CA certificate (PEM; the first one of the file).
        cert: this KME's certificate (PEM; the first one of the file, a chain may follow).
        no_san: quirk ``no-san``: ``cert`` must also have no subjectAltName.

    Raises:
        ConfigError: a file is unreadable or not a PEM certificate, the CN differs from
            ``kme_id`` (peers and SAEs would know this KME by the CN), ``ca`` lacks
            basicConstraints CA=true (RFC 5280 section 4.2.1.9), or ``no_san`` and ``cert``
            has a subjectAltName (RFC 5280 section 4.2.1.6).
    """
    ca_cert, own = _read_certificate(ca, "--ca"), _read_certificate(cert, "--cert")
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"--ca {ca}: not a CA certificate (basicConstraints CA is not true)")
    names = [a.value for a in own.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [kme_id]:
        shown = ", ".join(str(n) for n in names) or "none"
        raise ConfigError(
            f"--cert {cert}: certificate CN is {shown}, but --kme-id is {kme_id}; they must match"
        )
    if no_san and _has_san(own):
        raise ConfigError(
            f"--cert {cert}: quirk no-san needs a certificate without subjectAltName "
            "(qgate.pki.make_pki(no_san_kmes=...) writes one)"
        )


def _has_san(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    return True


def _private_path(raw_path: str) -> bool:
    """Whether a request path is a KME-to-KME or admin endpoint (quirks leave their answers alone)."""
    path = urlsplit(raw_path).path
    return path in (DELIVERED_PATH, INFO_PATH) or path.startswith(ADMIN_PATH)


def _read_certificate(path: Path, option: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{option} {path}: not a readable PEM certificate: {exc}") from exc


def _close_quietly(sock: ssl.SSLSocket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
