"""Blocking ETSI GS QKD 014 v1.1.1 client over HTTPS with mutual TLS (stdlib http.client + ssl).

One TLS connection per call, so an :class:`Etsi014Client` is safe to share between threads.
Failures map to three errors (``qgate.errors``):

* :class:`KmsUnavailableError`: connection refused or reset, timeout, DNS failure, HTTP 503.
* :class:`KmsAuthError`: HTTP 401, or the TLS handshake failed (untrusted server certificate,
  hostname mismatch, our certificate refused, TLS version or cipher mismatch).
* :class:`KmsBadAnswerError`: any other status, a malformed HTTP answer, or a body failing the
  checks of :mod:`qgate.kms.etsi014` (``status`` attribute set).

key_IDs are logged at debug level; key bytes never leave their ``Secret``.
"""

from __future__ import annotations

import http.client
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit

from qgate.constants import ETSI014_API_PREFIX, QKD_KEY_BITS_DEFAULT
from qgate.errors import ConfigError, KmsAuthError, KmsBadAnswerError, KmsUnavailableError
from qgate.kms import etsi014
from qgate.kms.etsi014 import QkdKey, Status

log = logging.getLogger(__name__)

USER_AGENT: Final = "qgate-etsi014/1"
"""HTTP User-Agent sent to the KME."""


class MtlsHttps:
    """One HTTPS origin reached with mutual TLS (TLS >= 1.2, server certificate and hostname checked).

    Args:
        base_url: ``https://host[:port][/prefix]``; host may be an IP literal (then it must be an
            IP SAN of the server certificate).
        ca: PEM file of the CA(s) trusted for the server certificate.
        cert: PEM client certificate (its subject CN is our identity toward the server).
        key: PEM private key of ``cert``.
        timeout: seconds for connecting and for each read (> 0).
        server_cn: when given, the server certificate's subject CN must equal it.

    Raises:
        ConfigError: the URL is not a plain https URL, or a certificate/key file is unusable.
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
        self.server_cn = server_cn
        self._context = client_context(ca=ca, cert=cert, key=key)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request on a fresh connection and return ``(status, body)``.

        Args:
            method: ``GET`` or ``POST``.
            path: absolute path below the URL's prefix, already percent-encoded.
            body: JSON request body (sent with ``Content-Type: application/json``), or None.

        Returns:
            HTTP status code and at most ``etsi014.MAX_BODY_SIZE + 1`` bytes of body.

        Raises:
            KmsUnavailableError: connection refused/reset, timeout, name resolution failure.
            KmsAuthError: TLS handshake failure (trust, hostname, our certificate refused) or
                a server certificate CN other than ``server_cn``.
            KmsBadAnswerError: the server's answer is not valid HTTP (``status=None``).
        """
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._context, timeout=self.timeout)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.connect()
            self._check_server_cn(conn)
            conn.request(method, self.prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(etsi014.MAX_BODY_SIZE + 1)
        except ssl.SSLError as exc:  # before OSError: SSLError is an OSError
            raise KmsAuthError(f"{self.base_url}: TLS failed: {exc}", status=None) from exc
        except (TimeoutError, OSError) as exc:
            raise KmsUnavailableError(f"{self.base_url}: {type(exc).__name__}: {exc}") from exc
        except http.client.HTTPException as exc:
            raise KmsBadAnswerError(f"{self.base_url}: invalid HTTP answer: {exc!r}", status=None) from exc
        finally:
            conn.close()

    def _check_server_cn(self, conn: http.client.HTTPSConnection) -> None:
        if self.server_cn is None:
            return
        sock = conn.sock
        cn = peer_common_name(sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None)
        if cn != self.server_cn:
            raise KmsAuthError(f"{self.base_url}: server certificate CN {cn!r}, expected {self.server_cn!r}")


class Etsi014Client:
    """ETSI GS QKD 014 v1.1.1 SAE-side client (section 5: Get status, Get key, Get key with key IDs).

    Args:
        base_url: the KME, ``https://host[:port]`` (the API lives under ``/api/v1/keys``).
        ca: PEM file of the CA that signed the KME's server certificate.
        cert: this SAE's PEM client certificate (subject CN = SAE ID).
        key: PEM private key of ``cert``.
        timeout: seconds for connecting and for each read.

    Raises:
        ConfigError: bad URL, timeout, or unusable certificate/key files.
    """

    def __init__(self, base_url: str, *, ca: Path, cert: Path, key: Path, timeout: float) -> None:
        self._https = MtlsHttps(base_url, ca=ca, cert=cert, key=key, timeout=timeout)
        self.base_url = base_url

    def status(self, slave_sae_id: str) -> Status:
        """Get status (section 5.1): ``GET /api/v1/keys/{slave_SAE_ID}/status``.

        Returns:
            The checked Status (its ``slave_SAE_ID`` equals ``slave_sae_id``).

        Raises:
            ConfigError: ``slave_sae_id`` is not a valid ID.
            KmsUnavailableError, KmsAuthError, KmsBadAnswerError: as described in the module doc.
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
            Exactly ``number`` keys of ``size_bits`` bits each, with distinct key_IDs.

        Raises:
            ConfigError: invalid argument.
            KmsUnavailableError, KmsAuthError, KmsBadAnswerError: as described in the module doc.
        """
        if number < 1 or size_bits < 8 or size_bits % 8:
            raise ConfigError(
                f"enc_keys: need number >= 1 and size_bits a positive multiple of 8, "
                f"got {number}, {size_bits}"
            )
        request = etsi014.encode_key_request(number, size_bits)
        body = self._call("POST", _api_path(slave_sae_id, "enc_keys"), request, "enc_keys")
        keys = etsi014.parse_enc_keys(body, number=number, size_bits=size_bits)
        log.debug("enc_keys for slave %s: key_IDs %s", slave_sae_id, [k.key_id for k in keys])
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
            KmsUnavailableError, KmsAuthError, KmsBadAnswerError: as described in the module doc.
        """
        if not key_ids or len(set(key_ids)) != len(key_ids) or not all(map(etsi014.valid_id, key_ids)):
            raise ConfigError("dec_keys: key_IDs must be a non-empty list of distinct valid IDs")
        request = etsi014.encode_key_ids(key_ids)
        body = self._call("POST", _api_path(master_sae_id, "dec_keys"), request, "dec_keys")
        keys = etsi014.parse_dec_keys(body, key_ids=key_ids, size_bits=size_bits)
        log.debug("dec_keys from master %s: key_IDs %s", master_sae_id, list(key_ids))
        return keys

    def _call(self, method: str, path: str, body: bytes | None, what: str) -> bytes:
        status, data = self._https.request(method, path, body)
        if status == 200:
            return data
        error = etsi014.parse_error_body(data)
        text = f"KME {self.base_url} {what}: HTTP {status}" + (f": {error.message}" if error.message else "")
        log.debug("%s", text)
        if status == 401:
            raise KmsAuthError(text, status=status, kme_message=error.message)
        if status == 503:
            raise KmsUnavailableError(text)
        raise KmsBadAnswerError(text, status=status, kme_message=error.message)


def client_context(*, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Build a TLS client context: TLS >= 1.2, server verified against ``ca`` with hostname check,
    ``cert``/``key`` presented as client certificate.

    Raises:
        ConfigError: a file is missing or not a usable PEM certificate/key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, ca=ca, cert=cert, key=key)
    return context


def server_context(*, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Build a TLS server context demanding a client certificate signed by ``ca`` (TLS >= 1.2).

    Raises:
        ConfigError: a file is missing or not a usable PEM certificate/key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context, ca=ca, cert=cert, key=key)
    return context


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


def _load(context: ssl.SSLContext, *, ca: Path, cert: Path, key: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"CA file {ca}: {exc}") from exc
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"certificate {cert} / key {key}: {exc}") from exc


def _api_path(sae_id: str, endpoint: str) -> str:
    if not etsi014.valid_id(sae_id, etsi014.SAE_ID_MAX_LEN):
        raise ConfigError(f"invalid SAE ID {sae_id!r}")
    return f"{ETSI014_API_PREFIX}/{quote(sae_id, safe='')}/{endpoint}"
