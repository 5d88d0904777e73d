"""Blocking ETSI GS QKD 014 v1.1.1 client over HTTPS with mutual TLS (stdlib http.client + ssl).

One TLS connection per call, so an :class:`Etsi014Client` is safe to share between threads.
Failures map to three errors (``qgate.errors``):

* :class:`KmsUnavailableError`: connection refused or reset, timeout (``timeout`` bounds the whole
  request, connect to the answer's last byte), DNS failure, HTTP 503.
* :class:`KmsAuthError`: HTTP 401, or the TLS handshake failed (untrusted server certificate,
  hostname mismatch, our certificate refused, TLS version or cipher mismatch).
* :class:`KmsBadAnswerError`: any other status, a malformed HTTP answer, or a body failing the
  checks of :mod:`qgate.kms.etsi014` (``status`` attribute set).

key_IDs are logged at debug level; key bytes never leave their ``Secret``.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit

from qgate.constants import ETSI014_API_PREFIX, QKD_KEY_BITS_DEFAULT
from qgate.errors import ConfigError, KmsBadAnswerError, KmsTlsError, KmsUnavailableError
from qgate.kms import etsi014
from qgate.kms import tls as _tls
from qgate.kms.etsi014 import QkdKey, Status
from qgate.kms.tls import (
    AMBIGUOUS,
    CLIENT_CERT_REFUSED,
    HANDSHAKE_CLOSED,
    PIN_MISMATCH,
    TLS_OTHER,
    Local,
    Session,
    TlsFailure,
    TlsOptions,
    TlsSettings,
    cert_info,
    classify,
    diagnostic_handshake,
    explain,
    offer_of,
    pin_problems,
    tls_settings,
)

log = logging.getLogger(__name__)

USER_AGENT: Final = "qgate-etsi014/1"
"""HTTP User-Agent sent to the KME."""


class _Deadline:
    """A wall-clock deadline for one request: when it passes, the watched socket is shut down.

    ``shutdown(SHUT_RDWR)`` wakes a ``recv`` or ``send`` blocked on the socket in another thread
    (it then sees the end of the stream), whatever the per-read timeout; the request then checks
    :attr:`expired` and says so. A ``threading.Timer`` runs the deadline; :meth:`close` takes the
    socket back before closing it, so the timer never touches a closed (possibly reused) descriptor,
    and :meth:`settle` ends the deadline once the answer is in.

    Args:
        seconds: time from now until the deadline (> 0).
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._settled = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.settle()

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the deadline passes (at once if it has passed)."""
        with self._lock:
            self._sock = sock
            if self.expired:
                _shutdown(sock)

    def close(self, sock: socket.socket | None) -> None:
        """Stop watching ``sock`` and close it (None: nothing to close)."""
        with self._lock:
            if self._sock is sock:
                self._sock = None
        if sock is not None:
            sock.close()

    def settle(self) -> bool:
        """End the deadline; return True when it had passed (what was read then may be cut short)."""
        with self._lock:
            self._settled = True
            self._sock = None
        self._timer.cancel()
        return self.expired

    def _expire(self) -> None:
        with self._lock:
            if self._settled:
                return
            self.expired = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    """Shut both directions of ``sock`` down; for a TLS socket the descriptor only, as the TLS state
    may be in use by the thread this wakes (``SSLSocket.shutdown`` would drop it)."""
    with contextlib.suppress(OSError):  # already closed by the peer, or reset
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class MtlsHttps:
    """One HTTPS origin reached with mutual TLS, with the settings of :mod:`qgate.kms.tls`.

    The server certificate chain is always verified against ``ca``; its name is checked against
    ``tls.server_name`` (else the URL host) unless a pin (``server_cn``, ``server_sha256``)
    replaces that check. A TLS failure raises :class:`KmsTlsError` with its ``cause``;
    :meth:`diagnose` explains the current failure streak (one diagnostic handshake per streak).

    Args:
        base_url: ``https://host[:port][/prefix]``; host may be an IP literal (then it must be an
            IP SAN of the server certificate, unless pinned).
        ca: PEM file of the CA(s) trusted for the server certificate.
        cert: PEM client certificate (its subject CN is our identity toward the server).
        key: PEM private key of ``cert``.
        timeout: seconds (> 0) one request may take in all: connecting, the TLS handshake, sending
            and the whole answer, a wall-clock deadline (:class:`_Deadline`), so a KME trickling its
            answer a byte at a time is cut off too; name resolution is not bounded.
        server_cn: pin: the server certificate's subject CN (when ``tls`` pins no CN).
        tls: TLS settings: a ``KmePolicy`` or a :class:`~qgate.kms.tls.TlsSettings`; None: defaults.

    Attributes:
        settings: the checked TLS settings (``server_sha256`` normalized).
        expected_name: the name the server certificate must match (``server_name`` or URL host).
        offer: the versions and TLS 1.2 suites we offer.
        weak_ciphers_allowed: True when ``tls_ciphers`` lets in TLS 1.2 suites that are not AEAD
            or not forward-secret (a downgrade the policy chose; logged once as a warning here).

    Raises:
        ConfigError: the URL is not a plain https URL, a TLS setting is invalid, or a
            certificate/key file is unusable.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ca: Path,
        cert: Path,
        key: Path,
        timeout: float,
        server_cn: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        try:
            port = parts.port or 443
        except ValueError as exc:
            raise ConfigError(f"KME URL {base_url!r}: invalid port") from exc
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or parts.username:
            raise ConfigError(f"KME URL {base_url!r}: expected https://host[:port][/path]")
        if not timeout > 0:
            raise ConfigError(f"KME timeout must be > 0 seconds, got {timeout}")
        self.base_url = base_url
        self.host = parts.hostname
        self.port = port
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.settings = tls_settings(tls, server_cn=server_cn)
        self.server_cn = self.settings.server_cn
        self.expected_name = self.settings.server_name or self.host
        self._context = _tls.client_context(self.settings, ca=ca, cert=cert, key=key)
        self.offer = offer_of(self._context, self.settings)
        self.weak_ciphers_allowed = bool(self.offer.weak)
        self.negotiated: tuple[str, str] | None = None  # (version, suite) of the last handshake
        if self.weak_ciphers_allowed:
            log.warning(
                "%s: kme.tls_ciphers allows TLS 1.2 suites without AEAD or forward secrecy (%s): a downgrade"
                " accepted by policy",
                base_url, ", ".join(self.offer.weak[:8]) + (" ..." if len(self.offer.weak) > 8 else ""),
            )  # fmt: skip
        source = "kme.server_name" if self.settings.server_name else "the URL host"
        self._local = Local(self.offer, self.expected_name, source, ca, cert)
        self._lock = threading.Lock()
        self._diagnosing = threading.Lock()
        self._failure: TlsFailure | None = None  # the last TLS failure of the current streak
        self._diagnosis: tuple[str, TlsFailure] | None = None  # (cause it explains, explanation)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request on a fresh connection and return ``(status, body)``, within ``timeout``.

        Args:
            method: ``GET`` or ``POST``.
            path: absolute path below the URL's prefix, already percent-encoded.
            body: JSON request body (sent with ``Content-Type: application/json``), or None.

        Returns:
            HTTP status code and at most ``etsi014.MAX_BODY_SIZE + 1`` bytes of body.

        Raises:
            KmsUnavailableError: connection refused or reset (in the handshake too: a KME going
                down looks the same; :meth:`diagnose` still tells), name resolution failure, or
                no complete answer within ``timeout`` seconds of the start (the deadline shuts
                the connection down, whatever it was waiting for).
            KmsTlsError: the handshake failed, the certificate broke a pin, or the KME refused
                our certificate or closed the connection after the handshake (``cause`` set).
            KmsBadAnswerError: the server's answer is not valid HTTP (``status=None``).
        """
        with _Deadline(self.timeout) as deadline:
            answer = self._exchange(deadline, method, path, body)
        with self._lock:  # an HTTP answer ends a TLS failure streak
            self._failure = self._diagnosis = None
        return answer

    def _exchange(self, deadline: _Deadline, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        """Connect, send the request and read the answer (see :meth:`request`)."""
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._context, timeout=self.timeout)
        conn.sock = self._open(deadline)  # http.client connects only when sock is None
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            answer = response.status, response.read(etsi014.MAX_BODY_SIZE + 1)
            cut = deadline.settle()  # an answer read to its end once the deadline shut the socket
        except ssl.SSLError as exc:  # before OSError: SSLError is an OSError
            failed = self._late(deadline) or self._tls_failed(self._classify(exc, handshake_done=True))
            raise failed from exc
        except (TimeoutError, OSError) as exc:
            raise self._late(deadline) or self._unavailable(exc) from exc
        except http.client.HTTPException as exc:
            bad = KmsBadAnswerError(f"{self.base_url}: invalid HTTP answer: {exc!r}", status=None)
            raise self._late(deadline) or bad from exc
        finally:
            deadline.close(conn.sock)
            conn.close()
        if cut:
            raise self._late_error()
        return answer

    def inspect(self) -> Session:
        """Make one handshake as :meth:`request` would (within ``timeout``), send nothing, describe it.

        Raises:
            KmsUnavailableError, KmsTlsError: as for :meth:`request`.
        """
        with _Deadline(self.timeout) as deadline:
            tls = self._open(deadline)
            try:
                cipher, version = tls.cipher(), tls.version()
                der = tls.getpeercert(binary_form=True)
            finally:
                deadline.close(tls)
        if der is None:
            raise KmsTlsError(f"{self.base_url}: TLS failed: no server certificate", cause=TLS_OTHER)
        return Session(version or "?", cipher[0] if cipher else "?", cert_info(der))

    def diagnose(self) -> TlsFailure | None:
        """Explain the current TLS failure streak: its cause and what to change; None when there is none.

        The first call for a streak (and a cause) may make one diagnostic handshake (see
        :func:`qgate.kms.tls.diagnostic_handshake`, at most ``timeout`` seconds); later calls
        return the cached explanation, and later :class:`KmsTlsError` messages carry it, until a
        request gets an HTTP answer. Thread-safe; never raises.
        """
        with self._diagnosing:
            with self._lock:
                failure, known = self._failure, self._diagnosis
            if failure is None:
                return None
            if known is not None and known[0] == failure.cause:
                return known[1]
            seen = None
            if failure.cause not in (PIN_MISMATCH, CLIENT_CERT_REFUSED):
                seen = diagnostic_handshake(
                    self.host, self.port, server_name=self.expected_name, timeout=self.timeout
                )
            result = explain(failure, seen, self._local)
            with self._lock:
                if self._failure is not None:
                    self._diagnosis = (failure.cause, result)
            return result

    def _open(self, deadline: _Deadline) -> ssl.SSLSocket:
        """Connect, handshake and check the pins, the socket watched by ``deadline``; return it."""
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise self._late(deadline) or self._unavailable(exc) from exc
        try:
            tls = self._context.wrap_socket(
                raw, server_hostname=self.expected_name, do_handshake_on_connect=False
            )
        except OSError as exc:
            raw.close()
            raise self._unavailable(exc) from exc
        deadline.watch(tls)
        try:
            tls.do_handshake()
        except ssl.SSLError as exc:
            deadline.close(tls)
            raise self._late(deadline) or self._tls_failed(self._classify(exc, handshake_done=False)) from exc
        except (ConnectionResetError, BrokenPipeError) as exc:  # a KME going down looks the same: retry
            deadline.close(tls)
            if (late := self._late(deadline)) is not None:
                raise late from exc
            shown = self._record(self._classify(exc, handshake_done=False))
            why = f" ({shown.cause}: {shown.text})" if shown.cause != HANDSHAKE_CLOSED else ""
            text = f"{self.base_url}: {type(exc).__name__} in the TLS handshake: {exc}{why}"
            raise KmsUnavailableError(text) from exc
        except OSError as exc:
            deadline.close(tls)
            raise self._late(deadline) or self._unavailable(exc) from exc
        if self.settings.pinned:
            der = tls.getpeercert(binary_form=True)
            problems = pin_problems(cert_info(der), self.settings) if der else ["no server certificate"]
            if problems:
                deadline.close(tls)
                raise self._tls_failed(TlsFailure(PIN_MISMATCH, "; ".join(problems)))
        suite = tls.cipher()
        self.negotiated = (tls.version() or "?", suite[0] if suite else "?")
        return tls

    def _late(self, deadline: _Deadline) -> KmsUnavailableError | None:
        """Return the error to raise when ``deadline`` passed (whatever failed then), else None."""
        return self._late_error() if deadline.expired else None

    def _late_error(self) -> KmsUnavailableError:
        return KmsUnavailableError(
            f"{self.base_url}: timeout: no complete answer within {self.timeout:g} s (the limit for the whole"
            " request, from connecting to the answer's last byte)"
        )

    def _unavailable(self, exc: OSError) -> KmsUnavailableError:
        return KmsUnavailableError(f"{self.base_url}: {type(exc).__name__}: {exc}")

    def _classify(self, exc: BaseException, *, handshake_done: bool) -> TlsFailure:
        name, cert = self.expected_name, self._local.cert
        return classify(exc, expected_name=name, cert=cert, handshake_done=handshake_done)

    def _record(self, failure: TlsFailure) -> TlsFailure:
        """Record ``failure`` in the streak; return it, or its explanation when diagnosed already."""
        with self._lock:
            self._failure = failure
            known = self._diagnosis
        return known[1] if known is not None and known[0] == failure.cause else failure

    def _tls_failed(self, failure: TlsFailure) -> KmsTlsError:
        """Record ``failure`` in the streak; return the error to raise (explained when diagnosed)."""
        shown = self._record(failure)
        vague = shown is failure and failure.cause in AMBIGUOUS
        hint = "; `qgate kme probe POLICY` names the cause" if vague else ""
        text = f"{self.base_url}: TLS failed ({shown.cause}): {shown.text}{hint}"
        return KmsTlsError(text, cause=shown.cause)


class Etsi014Client:
    """ETSI GS QKD 014 v1.1.1 SAE-side client (section 5: Get status, Get key, Get key with key IDs).

    Args:
        base_url: the KME, ``https://host[:port]`` (the API lives under ``/api/v1/keys``).
        ca: PEM file of the CA that signed the KME's server certificate.
        cert: this SAE's PEM client certificate (subject CN = SAE ID).
        key: PEM private key of ``cert``.
        timeout: seconds one request may take in all, connect to the answer's last byte (see
            :class:`MtlsHttps`: a wall-clock deadline, the policy's ``kme.timeout``).
        tls: the TLS settings (pass the ``KmePolicy``: tls_min_version, tls_ciphers, server_name,
            server_cn, server_sha256), or None for the defaults.

    Attributes:
        https: the transport: ``weak_ciphers_allowed``, ``diagnose()`` after a KmsTlsError,
            ``inspect()`` (see :class:`MtlsHttps`).

    Raises:
        ConfigError: bad URL, timeout, TLS settings, or unusable certificate/key files.
    """

    def __init__(
        self, base_url: str, *, ca: Path, cert: Path, key: Path, timeout: float, tls: TlsOptions | None = None
    ) -> None:
        self.https = MtlsHttps(base_url, ca=ca, cert=cert, key=key, timeout=timeout, tls=tls)
        self._https = self.https
        self.base_url = base_url

    def status(self, slave_sae_id: str) -> Status:
        """Get status (section 5.1): ``GET /api/v1/keys/{slave_SAE_ID}/status``.

        Returns:
            The checked Status (its ``slave_SAE_ID`` equals ``slave_sae_id``); limits a KME sent
            as 0 mean "not stated" (``Status.per_request_limit()`` and friends say None).

        Raises:
            ConfigError: ``slave_sae_id`` is not a valid ID.
            KmsUnavailableError: no answer (connection, timeout), or 429/502/503/504
                (KmsExhaustedError when the KME says it has not enough key).
            KmsAuthError: TLS trust failure, 401/403, or an error about our certificate or SAE.
            KmsBadAnswerError: any other error status, or a Status failing the section 6.1 checks.
        """
        body = self._call("GET", _api_path(slave_sae_id, "status"), None, "status")
        return etsi014.parse_status(body, slave_sae_id=slave_sae_id)

    def enc_keys(
        self, slave_sae_id: str, number: int = 1, size_bits: int = QKD_KEY_BITS_DEFAULT
    ) -> list[QkdKey]:
        """Get key (section 5.2): ``POST /api/v1/keys/{slave_SAE_ID}/enc_keys`` as the master SAE.

        Args:
            slave_sae_id: the SAE that will fetch the same keys with their key_IDs.
            number: keys to get (>= 1).
            size_bits: size of each key in bits (> 0, multiple of 8).

        Returns:
            At least 1 and at most ``number`` keys of ``size_bits`` bits each, with distinct
            key_IDs: a KME short of keys may answer 200 with fewer than asked, and those are
            valid keys it has consumed (ask again for the rest).

        Raises:
            ConfigError: invalid argument.
            KmsExhaustedError: the KME has no key now (an error saying so, with 503 or 400/404/
                422/500, or a 200 answer without any key); retry later.
            KmsUnavailableError: no answer (connection, timeout), or 429/502/503/504.
            KmsAuthError: TLS trust failure, 401/403, or an error about our certificate or SAE.
            KmsBadAnswerError: any other error status, or a Key container failing the checks of
                :func:`etsi014.parse_enc_keys` (more keys than asked, wrong size, bad Base64).
        """
        if number < 1 or size_bits < 8 or size_bits % 8:
            raise ConfigError(
                f"enc_keys: need number >= 1 and size_bits a positive multiple of 8, "
                f"got {number}, {size_bits}"
            )
        request = etsi014.encode_key_request(number, size_bits)
        body = self._call("POST", _api_path(slave_sae_id, "enc_keys"), request, "enc_keys")
        keys = etsi014.parse_enc_keys(body, number=number, size_bits=size_bits)
        log.debug(
            "enc_keys for slave %s: %d of %d keys, key_IDs %s",
            slave_sae_id, len(keys), number, [k.key_id for k in keys],
        )  # fmt: skip
        return keys

    def dec_keys(
        self, master_sae_id: str, key_ids: Sequence[str], *, size_bits: int | None = None
    ) -> list[QkdKey]:
        """Get key with key IDs (section 5.3): ``POST /api/v1/keys/{master_SAE_ID}/dec_keys``.

        Args:
            master_sae_id: the SAE that got the keys with enc_keys (note: the master's ID).
            key_ids: the key_IDs the master SAE sent us; non-empty, distinct, each valid
                (``etsi014.valid_id``). Validate peer-supplied IDs before calling.
            size_bits: when given, every key must have this many bits.

        Returns:
            The keys in the order of ``key_ids``.

        Raises:
            ConfigError: invalid argument (empty, repeated or malformed key_IDs).
            KmsKeyRejectedError: the KME refuses these key_IDs (unknown, consumed, expired,
                superseded; 400/401/403/404/409/410/422 with such a message); ``key_ids`` set.
            KmsUnavailableError: no answer (connection, timeout), or 429/502/503/504.
            KmsAuthError: TLS trust failure, or an error about our certificate or SAE, or a
                401/403 that names no key.
            KmsBadAnswerError: any other error status, or a Key container other than asked for.
        """
        if not key_ids or len(set(key_ids)) != len(key_ids) or not all(map(etsi014.valid_id, key_ids)):
            raise ConfigError("dec_keys: key_IDs must be a non-empty list of distinct valid IDs")
        request = etsi014.encode_key_ids(key_ids)
        body = self._call("POST", _api_path(master_sae_id, "dec_keys"), request, "dec_keys", key_ids)
        keys = etsi014.parse_dec_keys(body, key_ids=key_ids, size_bits=size_bits)
        log.debug("dec_keys from master %s: key_IDs %s", master_sae_id, list(key_ids))
        return keys

    def _call(
        self, method: str, path: str, body: bytes | None, what: str, key_ids: Sequence[str] = ()
    ) -> bytes:
        """Send one request; return the body of a 200 answer, else raise what classify_error says."""
        status, data = self._https.request(method, path, body)
        if status == 200:
            return data
        verdict = etsi014.classify_error(what, status, data, None)  # the Content-Type is not passed up
        error = verdict.error(f"KME {self.base_url} {what}", key_ids=key_ids)
        log.debug("%s (%s)", error, verdict.kind.__name__)
        raise error


def client_context(*, ca: Path, cert: Path, key: Path, settings: TlsSettings | None = None) -> ssl.SSLContext:
    """Build a TLS client context (see :func:`qgate.kms.tls.client_context`); default settings:
    TLS >= 1.2, qgate's secure TLS 1.2 suites, server verified against ``ca`` with hostname check.

    Raises:
        ConfigError: a file is missing or not a usable PEM certificate/key, or the settings are bad.
    """
    return _tls.client_context(settings or TlsSettings(), ca=ca, cert=cert, key=key)


def server_context(*, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Build a TLS server context demanding a client certificate signed by ``ca`` (TLS >= 1.2).

    Raises:
        ConfigError: a file is missing or not a usable PEM certificate/key.
    """
    return _tls.server_context(ca=ca, cert=cert, key=key)


def peer_common_name(cert: object) -> str | None:
    """Return the single subject CN of a certificate from ``SSLSocket.getpeercert()``, else None.

    None when there is no certificate, no CN, or more than one CN.
    """
    if not isinstance(cert, dict):
        return None
    names = [
        value
        for rdn in cert.get("subject", ())
        for attr, value in rdn
        if attr == "commonName" and isinstance(value, str)
    ]
    return names[0] if len(names) == 1 else None


def _api_path(sae_id: str, endpoint: str) -> str:
    if not etsi014.valid_id(sae_id, etsi014.SAE_ID_MAX_LEN):
        raise ConfigError(f"invalid SAE ID {sae_id!r}")
    return f"{ETSI014_API_PREFIX}/{quote(sae_id, safe='')}/{endpoint}"
