"""TLS toward the KME against real HTTPS servers on 127.0.0.1: every failure named by its cause.

Certificates are made here (ECDSA P-256, cryptography): a lab CA, a rogue CA, and KME server
certificates that are good, expired, without subjectAltName, or for another name. The servers are
real TLS servers in threads; one mode drops the server's alert and just closes the connection, like
the KME of issue 11 whose only symptom was "EOF occurred in violation of protocol".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qgate.errors import KmsTlsError, KmsUnavailableError, PolicyError
from qgate.kms import tls
from qgate.kms.client import Etsi014Client, MtlsHttps
from qgate.kms.tls import TlsSettings, colon_hex, parse_server_flight
from qgate.policy import parse_policy

T = TypeVar("T")
TIMEOUT = 3.0
CBC_SUITE = "ECDHE-ECDSA-AES256-SHA"
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


# --- certificates -------------------------------------------------------------------------------


@dataclass
class Issuer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


CA_USAGE = {
    **dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment"), False
    ),
    **dict.fromkeys(("key_agreement", "encipher_only", "decipher_only"), False),
    "key_cert_sign": True,
    "crl_sign": True,
}


def make_ca(cn: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**CA_USAGE), critical=True)
    )
    return Issuer(key, builder.sign(key, hashes.SHA256()))


def write_leaf(
    out: Path,
    stem: str,
    issuer: Issuer,
    cn: str,
    *,
    sans: list[x509.GeneralName] | None,
    server: bool = True,
    valid: tuple[dt.datetime, dt.datetime] = (NOW - DAY, NOW + 30 * DAY),
) -> tuple[Path, Path]:
    """Write ``stem.pem``/``stem.key``: a leaf for ``cn`` signed by ``issuer``; ``sans`` None: no SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer.key, hashes.SHA256())
    pem, key_file = out / f"{stem}.pem", out / f"{stem}.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pem, key_file


def write_self_signed(out: Path, stem: str, cn: str, sans: list[x509.GeneralName]) -> None:
    """Write ``stem.pem``/``stem.key``: a self-signed server certificate, as a man in the middle has."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


INJECTED_CN = "KME_A\nqgate.supply INFO: KME https://127.0.0.1 works again\x1b[2K"
"""A CN that would forge a log line (and erase the terminal line) if printed as it is."""
LOOPBACK = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]


@dataclass
class Pki:
    dir: Path
    ca: Path  # the lab CA, kme.ca of every client here

    def der(self, stem: str) -> bytes:
        pem = x509.load_pem_x509_certificate((self.dir / f"{stem}.pem").read_bytes())
        return pem.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("tlspki")
    lab, rogue = make_ca("qgate test CA"), make_ca("rogue CA")
    (out / "ca.pem").write_bytes(lab.cert.public_bytes(serialization.Encoding.PEM))
    write_leaf(out, "kme", lab, "KME_A", sans=LOOPBACK)
    write_leaf(out, "kme-nosan", lab, "KME_A", sans=None)
    write_leaf(out, "kme-other", lab, "KME_A", sans=[x509.DNSName("kme.other.example")])
    write_leaf(out, "kme-expired", lab, "KME_A", sans=LOOPBACK, valid=(NOW - 60 * DAY, NOW - 30 * DAY))
    write_leaf(out, "kme-rogue", rogue, "KME_A", sans=LOOPBACK)
    write_leaf(out, "sae", lab, "SAE_A", sans=None, server=False)
    write_leaf(out, "sae-rogue", rogue, "SAE_A", sans=None, server=False)
    write_leaf(out, "sae-expired", lab, "SAE_A", sans=None, server=False, valid=(NOW - 60 * DAY, NOW - DAY))
    write_leaf(out, "sae-future", lab, "SAE_A", sans=None, server=False, valid=(NOW + DAY, NOW + 60 * DAY))
    write_self_signed(out, "kme-impostor", INJECTED_CN, [*LOOPBACK, x509.DNSName("x\nINFO: ok")])  # a MITM
    return Pki(out, out / "ca.pem")


# --- a real TLS server ----------------------------------------------------------------------------


class Server:
    """An HTTPS server on 127.0.0.1 answering every request ``200 ok``.

    ``silent``: on a failed handshake close the connection without sending the server's alert.
    ``connections`` counts TCP connections accepted.
    """

    def __init__(self, context: ssl.SSLContext, *, silent: bool = False) -> None:
        self.context, self.silent, self.connections = context, silent, 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"https://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        with conn:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            session = self.context.wrap_bio(incoming, outgoing, server_side=True)
            try:
                self._run(conn, session, incoming, outgoing)
            except ssl.SSLError:
                if not self.silent:
                    with contextlib.suppress(OSError):
                        conn.sendall(outgoing.read())  # the alert
            except OSError:
                pass

    @staticmethod
    def _run(
        conn: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> None:
        def pump(step: Callable[[], T]) -> T:
            while True:
                try:
                    result = step()
                    conn.sendall(outgoing.read())
                    return result
                except ssl.SSLWantReadError:
                    conn.sendall(outgoing.read())
                    data = conn.recv(65536)
                    if not data:
                        raise OSError("closed") from None
                    incoming.write(data)

        pump(tls.do_handshake)
        request = b""
        while b"\r\n\r\n" not in request:
            request += pump(lambda: tls.read(65536))
        tls.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        conn.sendall(outgoing.read())

    def close(self) -> None:
        self._listener.close()


def server_context(pki: Pki, stem: str, *, tls12_ciphers: str | None = None) -> ssl.SSLContext:
    """A KME-like server context: client certificate required (lab CA), ``stem``'s certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.dir / f"{stem}.pem"), str(pki.dir / f"{stem}.key"))
    if tls12_ciphers is not None:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(tls12_ciphers)
    return context


@pytest.fixture
def serve(pki: Pki) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(stem: str = "kme", *, tls12_ciphers: str | None = None, silent: bool = False) -> Server:
        server = Server(server_context(pki, stem, tls12_ciphers=tls12_ciphers), silent=silent)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def https(pki: Pki, server: Server, settings: TlsSettings | None = None, *, sae: str = "sae") -> MtlsHttps:
    cert, key = pki.dir / f"{sae}.pem", pki.dir / f"{sae}.key"
    return MtlsHttps(server.url, ca=pki.ca, cert=cert, key=key, timeout=TIMEOUT, tls=settings)


def tls_error(client: MtlsHttps) -> KmsTlsError:
    with pytest.raises(KmsTlsError) as info:
        client.request("GET", "/api/v1/keys/SAE_B/status")
    assert info.value.status is None
    return info.value


# --- cipher and version ---------------------------------------------------------------------------


def test_tls12_cbc_only_kme_is_named_and_works_once_tls_ciphers_allows_it(
    pki: Pki, serve: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    kme = serve(tls12_ciphers=CBC_SUITE)
    client = https(pki, kme)
    assert not client.weak_ciphers_allowed
    assert tls_error(client).cause == "no_shared_cipher"  # the KME sent handshake_failure
    cause = client.diagnose()
    assert cause is not None and cause.cause == "no_shared_cipher"
    assert f"the KME offers only TLSv1.2 {CBC_SUITE}" in cause.text
    assert "allow it explicitly with kme.tls_ciphers" in cause.text and "CBC suites" in cause.text
    with caplog.at_level(logging.WARNING, logger="qgate.kms.client"):
        allowed = https(pki, kme, TlsSettings(tls_ciphers=CBC_SUITE))
    assert allowed.weak_ciphers_allowed and allowed.offer.weak == (CBC_SUITE,)
    assert "downgrade" in caplog.text and CBC_SUITE in caplog.text
    assert allowed.request("GET", "/x") == (200, b"ok")
    session = allowed.inspect()
    assert (session.version, session.cipher) == ("TLSv1.2", CBC_SUITE)


def test_kme_that_just_closes_gets_one_diagnostic_handshake_per_failure_streak(
    pki: Pki, serve: Callable[..., Server]
) -> None:
    kme = serve(tls12_ciphers=CBC_SUITE, silent=True)
    client = https(pki, kme)
    first = tls_error(client)
    assert first.cause == "handshake_closed" and "EOF occurred in violation of protocol" in str(first)
    assert "qgate kme probe" in str(first)
    assert client.diagnose() is not None and kme.connections == 2  # the request, one diagnostic
    cause = client.diagnose()  # cached: no new handshake
    assert kme.connections == 2 and cause is not None and cause.cause == "no_shared_cipher"
    assert CBC_SUITE in cause.text
    again = tls_error(client)  # the rest of the streak carries the explanation
    assert again.cause == "no_shared_cipher" and CBC_SUITE in str(again)
    kme.context = server_context(pki, "kme")  # the KME is fixed: an answer ends the streak
    assert client.request("GET", "/x")[0] == 200
    assert client.diagnose() is None


def test_tls12_only_kme_against_tls_min_version_13(pki: Pki, serve: Callable[..., Server]) -> None:
    kme = serve(tls12_ciphers="ECDHE+AESGCM")
    client = https(pki, kme, TlsSettings(tls_min_version="1.3"))
    assert tls_error(client).cause == "protocol_version"
    cause = client.diagnose()
    assert cause is not None and cause.cause == "protocol_version"
    assert "TLSv1.2" in cause.text and 'kme.tls_min_version is "1.3"' in cause.text
    assert https(pki, kme).request("GET", "/x")[0] == 200


# --- the server certificate -----------------------------------------------------------------------


def test_server_certificate_from_another_ca_is_unknown_ca(pki: Pki, serve: Callable[..., Server]) -> None:
    client = https(pki, serve("kme-rogue"))
    assert tls_error(client).cause == "unknown_ca"
    cause = client.diagnose()
    assert cause is not None and cause.cause == "unknown_ca"
    assert "issued by CN=rogue CA" in cause.text and "CN=qgate test CA" in cause.text


def test_an_impostor_certificate_is_never_advised_to_be_trusted_or_pinned(
    pki: Pki, serve: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    client = https(pki, serve("kme-impostor"))
    assert tls_error(client).cause == "unknown_ca"
    cause = client.diagnose()
    assert cause is not None and cause.cause == "unknown_ca"
    fingerprint = colon_hex(tls.cert_info(pki.der("kme-impostor")).sha256)
    assert fingerprint in cause.text and "check it with the KME's operator out of band" in cause.text
    assert "authenticates nothing (a man in the middle can answer it)" in cause.text
    for advice in ("put it in kme.ca", "to trust it", "kme.server_sha256:", f'"{fingerprint}"'):
        assert advice not in cause.text
    assert cause.text.isprintable() and "\n" not in cause.text and "\x1b" not in cause.text
    assert "KME_A\\nqgate.supply INFO" in cause.text and "(self-signed)" in cause.text  # escaped, one line
    again = tls_error(client)  # the streak's errors carry the explanation: printable too
    assert str(again).isprintable() and fingerprint in str(again)


def test_certificate_fields_are_printable(pki: Pki) -> None:
    info = tls.cert_info(pki.der("kme-impostor"))
    for text in (info.subject, info.issuer, *info.dns_names, info.names_shown(), *info.as_dict().values()):
        assert isinstance(text, (str, list)) and str(text).isprintable(), text
    assert info.common_name == INJECTED_CN  # raw, for pin checks only
    assert tls.printable("a\u202eb\x00" + "c" * 400, 20) == "a\\u202eb\\x00ccccc..."


def test_expired_server_certificate_shows_its_dates(pki: Pki, serve: Callable[..., Server]) -> None:
    client = https(pki, serve("kme-expired"))
    error = tls_error(client)
    assert error.cause == "cert_expired" and "expired" in str(error)
    cause = client.diagnose()
    assert cause is not None and cause.cause == "cert_expired"
    assert tls.stamp(NOW - 30 * DAY) in cause.text and tls.stamp(NOW - 60 * DAY) in cause.text


def test_name_mismatch_lists_the_certificates_names_and_server_name_fixes_it(
    pki: Pki, serve: Callable[..., Server]
) -> None:
    kme = serve("kme-other")
    client = https(pki, kme)
    assert tls_error(client).cause == "name_mismatch"
    cause = client.diagnose()
    assert cause is not None and "DNS:kme.other.example" in cause.text
    assert "not 127.0.0.1 (the URL host)" in cause.text and "kme.server_name" in cause.text
    assert https(pki, kme, TlsSettings(server_name="kme.other.example")).request("GET", "/x")[0] == 200


def test_certificate_without_san_needs_a_pin(pki: Pki, serve: Callable[..., Server]) -> None:
    kme = serve("kme-nosan")
    client = https(pki, kme)
    assert tls_error(client).cause == "name_mismatch"
    cause = client.diagnose()
    fingerprint = colon_hex(tls.cert_info(pki.der("kme-nosan")).sha256)
    assert cause is not None and "has no subjectAltName" in cause.text
    assert 'kme.server_cn (its CN reads "KME_A")' in cause.text and fingerprint in cause.text
    assert f'kme.server_sha256: "{fingerprint}"' not in cause.text  # never a pin to copy: it is unverified
    assert "authenticates nothing" in cause.text and "out of band" in cause.text
    assert https(pki, kme, TlsSettings(server_cn="KME_A")).request("GET", "/x")[0] == 200
    lower = fingerprint.replace(":", "").lower()
    for pin in (fingerprint, lower):
        assert https(pki, kme, TlsSettings(server_sha256=pin)).request("GET", "/x")[0] == 200


def test_policy_pins_reach_the_client(pki: Pki, serve: Callable[..., Server]) -> None:
    kme = serve("kme-nosan")
    fingerprint = colon_hex(tls.cert_info(pki.der("kme-nosan")).sha256).lower()
    policy = parse_policy(
        POLICY.format(url=kme.url, dir=pki.dir, extra=f'  server_sha256: "{fingerprint}"\n'), source=None
    )
    client = Etsi014Client(
        kme.url, ca=pki.ca, cert=policy.kme.cert, key=policy.kme.key, timeout=TIMEOUT, tls=policy.kme
    )
    assert client.https.settings.server_sha256 == fingerprint.replace(":", "")
    assert client.https.request("GET", "/x")[0] == 200


def test_wrong_pins_show_seen_and_expected(pki: Pki, serve: Callable[..., Server]) -> None:
    kme = serve("kme")
    real = tls.cert_info(pki.der("kme")).sha256
    wrong = "ab" * 32
    client = https(pki, kme, TlsSettings(server_cn="KME_X", server_sha256=wrong))
    error = tls_error(client)
    assert error.cause == "pin_mismatch"
    for text in ("'KME_A'", "'KME_X'", colon_hex(real), colon_hex(wrong)):
        assert text in str(error)
    cause = client.diagnose()
    assert cause is not None and cause.cause == "pin_mismatch" and kme.connections == 1  # no extra handshake


# --- our certificate, and no TLS at all ------------------------------------------------------------


@pytest.mark.parametrize("tls12", [False, True])
def test_client_certificate_refused_by_the_kme(pki: Pki, serve: Callable[..., Server], tls12: bool) -> None:
    client = https(pki, serve(tls12_ciphers="ECDHE+AESGCM" if tls12 else None), sae="sae-rogue")
    error = tls_error(client)
    assert error.cause == "client_cert_refused" and "unknown_ca" in str(error)
    cause = client.diagnose()
    assert cause is not None and "issued by CN=rogue CA" in cause.text


@pytest.mark.parametrize(
    ("sae", "words"), [("sae-expired", "has expired"), ("sae-future", "is not valid yet")]
)
def test_our_certificate_out_of_its_dates_is_named_so(
    pki: Pki, serve: Callable[..., Server], sae: str, words: str
) -> None:
    client = https(pki, serve(), sae=sae)
    assert tls_error(client).cause == "client_cert_refused"
    cause = client.diagnose()
    assert cause is not None and words in cause.text and "clock" in cause.text
    assert "must trust its issuer" not in cause.text


def test_refused_connection_is_unavailable_not_tls(pki: Pki) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = MtlsHttps(
        f"https://127.0.0.1:{port}", ca=pki.ca, cert=pki.dir / "sae.pem", key=pki.dir / "sae.key", timeout=1
    )
    with pytest.raises(KmsUnavailableError):
        client.request("GET", "/x")
    assert client.diagnose() is None


def test_server_flight_parser_never_raises_on_truncated_or_mangled_input(pki: Pki) -> None:
    record = _tls12_server_flight(pki)
    flight = parse_server_flight(record)
    assert flight.version == "TLSv1.2" and flight.suite == 0xC00A and flight.certificate == pki.der("kme")
    for cut in range(len(record)):
        parse_server_flight(record[:cut])
    for index in range(0, len(record), 7):
        mangled = bytearray(record)
        mangled[index] ^= 0xFF
        parse_server_flight(bytes(mangled))


def _tls12_server_flight(pki: Pki) -> bytes:
    """ServerHello(TLS 1.2, suite 0xC00A) + Certificate(kme leaf) as one handshake record each."""
    hello = b"\x03\x03" + bytes(32) + b"\x00" + b"\xc0\x0a" + b"\x00" + b"\x00\x00"
    leaf = pki.der("kme")
    chain = len(leaf).to_bytes(3, "big") + leaf
    cert = len(chain).to_bytes(3, "big") + chain

    def handshake(kind: int, body: bytes) -> bytes:
        message = bytes([kind]) + len(body).to_bytes(3, "big") + body
        return b"\x16\x03\x03" + len(message).to_bytes(2, "big") + message

    return handshake(2, hello) + handshake(11, cert)


# --- policy fields ------------------------------------------------------------------------------------

POLICY = """\
gateway:
  name: site-a
  identity: keys/site-a.key
  listen: 10.99.0.1:51820
kme:
  url: {url}
  sae_id: SAE_A
  ca: {dir}/ca.pem
  cert: {dir}/sae.pem
  key: {dir}/sae.key
{extra}peers:
  - name: site-b
    public_key: keys/site-b.pub
    endpoint: 10.99.0.2:51820
    sae_id: SAE_B
    qkd_role: master
    subnets: [10.2.0.0/24]
"""


def _policy(extra: str) -> str:
    return POLICY.format(url="https://127.0.0.1:8443", dir="pki", extra=extra)


def test_tls_policy_fields_load_with_defaults_and_normalized_pins() -> None:
    kme = parse_policy(_policy(""), source=None).kme
    assert (kme.tls_min_version, kme.tls_ciphers, kme.server_name, kme.server_cn) == ("1.2", None, None, None)
    assert kme.server_sha256 is None and kme.client_ca is None
    colons = ":".join(["AB"] * 31 + ["0F"])
    extra = (
        f"  tls_min_version: 1.3\n  server_name: kme.example\n  server_cn: KME A\n"
        f"  server_sha256: {colons}\n  client_ca: pki/sae-ca.pem\n"
    )
    kme = parse_policy(_policy(extra), source=Path("/etc/qgate/a.yaml")).kme
    assert kme.tls_min_version == "1.3" and kme.server_name == "kme.example" and kme.server_cn == "KME A"
    assert kme.server_sha256 == "ab" * 31 + "0f" and kme.client_ca == Path("/etc/qgate/pki/sae-ca.pem")
    assert parse_policy(_policy(f"  tls_ciphers: {CBC_SUITE}\n"), source=None).kme.tls_ciphers == CBC_SUITE


@pytest.mark.parametrize(
    ("extra", "path", "fragment"),
    [
        ("  server_sha256: abcd\n", "kme.server_sha256", "SHA-256"),
        ("  server_sha256: " + "g" * 64 + "\n", "kme.server_sha256", "64 hex digits"),
        ('  tls_min_version: "1.1"\n', "kme.tls_min_version", "RFC 8996"),
        ("  tls_min_version: 2\n", "kme.tls_min_version", "must be one of: 1.2, 1.3"),
        ("  tls_ciphers: NOPE\n", "kme.tls_ciphers", "'NOPE' names no cipher or rule OpenSSL knows"),
        ("  tls_ciphers: ECDHE+AESGCM:BOGUS\n", "kme.tls_ciphers", "'BOGUS' names no cipher"),
        ("  tls_ciphers: ALL\n", "kme.tls_ciphers", "without encryption or authentication"),
        ("  tls_ciphers: 'ECDHE+AESGCM; rm'\n", "kme.tls_ciphers", "must be 1-1024 characters"),
        ("  tls_min_version: '1.3'\n  tls_ciphers: ECDHE+AESGCM\n", "kme.tls_ciphers", "has no effect"),
        ("  server_name: 'not a name'\n", "kme.server_name", "DNS name or literal IP address"),
        ("  server_cn: ''\n", "kme.server_cn", "1-64 characters"),
    ],
)
def test_bad_tls_policy_fields_name_field_and_line(extra: str, path: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(_policy(extra), source=Path("/etc/qgate/a.yaml"))
    err = info.value
    line = 11 + extra.count("\n") - 1  # the last extra line
    assert (err.line, err.path) == (line, path), err.problems
    assert fragment in str(err) and f"/etc/qgate/a.yaml:{line}: {path}:" in str(err)


def test_tls_settings_refuse_a_bad_pin_outside_the_policy() -> None:
    with pytest.raises(Exception, match="not a SHA-256 fingerprint"):
        tls.tls_settings(replace(TlsSettings(), server_sha256="12"))
