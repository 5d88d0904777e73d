"""Two simulated KMEs over real HTTPS with mutual TLS on 127.0.0.1, and the ETSI 014 client against them.

Covers the master/slave key flow across the KME-to-KME channel, TLS refusals (no client
certificate, a certificate from another CA, an untrusted server, a hostname mismatch), 401/400/503
answers, and the client's mapping of every failure to KmsUnavailableError, KmsAuthError or
KmsBadAnswerError (against a canned HTTPS server).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.kmes import Canned, link_kmes, serve_canned, start_kme

from qgate.crypto.secret import Secret
from qgate.errors import ConfigError, KmsAuthError, KmsBadAnswerError, KmsUnavailableError
from qgate.kms.client import Etsi014Client, MtlsHttps, server_context
from qgate.kms.sim_server import KmeService
from qgate.kms.simulator import KmeConfig
from qgate.pki import make_pki

TIMEOUT = 5.0


@dataclass
class Lab:
    pki: Path
    rogue: Path  # a second, unrelated CA with the same IDs
    a: KmeService
    b: KmeService

    def client(
        self, kme: KmeService, sae: str, *, pki: Path | None = None, ca: Path | None = None
    ) -> Etsi014Client:
        files = pki or self.pki
        return Etsi014Client(
            f"https://127.0.0.1:{kme.port}",
            ca=ca or self.pki / "ca.pem",
            cert=files / f"{sae}.pem",
            key=files / f"{sae}.key",
            timeout=TIMEOUT,
        )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    pki, rogue = tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("rogue")
    ids = {"kmes": {"KME_A": ["127.0.0.1"], "KME_B": []}, "saes": ["SAE_A", "SAE_B", "SAE_C"]}
    make_pki(pki, **ids)  # type: ignore[arg-type]
    make_pki(rogue, **ids)  # type: ignore[arg-type]
    a = start_kme(pki, "KME_A", peer_saes=())  # SAE_A, SAE_C; asks KME_B for its SAEs
    b = start_kme(pki, "KME_B", peer_saes=())  # SAE_B
    try:
        link_kmes(pki, a, b)
        yield Lab(pki, rogue, a, b)
    finally:
        a.stop()
        b.stop()


# --- the key flow ---------------------------------------------------------------------------------


def test_slave_gets_the_masters_key_bytes_via_dec_keys(lab: Lab) -> None:
    master = lab.client(lab.a, "SAE_A").enc_keys("SAE_B", number=3, size_bits=256)
    assert len({k.key_id for k in master}) == 3 and all(k.size_bits == 256 for k in master)
    wanted = [master[2].key_id, master[0].key_id]
    slave = lab.client(lab.b, "SAE_B").dec_keys("SAE_A", wanted, size_bits=256)
    assert [k.key_id for k in slave] == wanted
    assert slave[0].key == master[2].key and slave[1].key == master[0].key
    assert slave[0].key != slave[1].key


def test_second_dec_keys_for_the_same_key_id_fails(lab: Lab) -> None:
    (key,) = lab.client(lab.a, "SAE_A").enc_keys("SAE_B")
    slave = lab.client(lab.b, "SAE_B")
    slave.dec_keys("SAE_A", [key.key_id])
    with pytest.raises(KmsBadAnswerError) as info:
        slave.dec_keys("SAE_A", [key.key_id])
    assert info.value.status == 400 and info.value.kme_message == "unknown key_ID"


def test_status_counts_follow_the_store(lab: Lab) -> None:
    client = lab.client(lab.a, "SAE_A")
    before = client.status("SAE_B")
    assert (before.source_KME_ID, before.target_KME_ID, before.master_SAE_ID) == ("KME_A", "KME_B", "SAE_A")
    assert (before.key_size, before.max_key_count, before.max_key_per_request) == (256, 1000, 16)
    client.enc_keys("SAE_B", number=2, size_bits=512)  # 2 keys x 2 blocks of 256 bits
    assert client.status("SAE_B").stored_key_count == before.stored_key_count - 4


def test_both_kmes_act_as_master_at_once(lab: Lab) -> None:
    from_a = lab.client(lab.a, "SAE_A").enc_keys("SAE_B", number=2)
    from_b = lab.client(lab.b, "SAE_B").enc_keys("SAE_A", number=2)
    assert not {k.key_id for k in from_a} & {k.key_id for k in from_b}
    assert lab.client(lab.b, "SAE_B").dec_keys("SAE_A", [k.key_id for k in from_a]) == from_a
    assert lab.client(lab.a, "SAE_A").dec_keys("SAE_B", [k.key_id for k in from_b]) == from_b


def test_concurrent_masters_get_distinct_keys_the_slave_can_fetch(lab: Lab) -> None:
    master = lab.client(lab.a, "SAE_A")
    got: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(4):
            ids = [k.key_id for k in master.enc_keys("SAE_B", number=2)]
            with lock:
                got.extend(ids)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 48 == len(set(got))
    slave = lab.client(lab.b, "SAE_B")
    for start in range(0, 48, 16):
        assert len(slave.dec_keys("SAE_A", got[start : start + 16])) == 16


def test_key_bytes_never_reach_the_logs(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        keys = lab.client(lab.a, "SAE_A").enc_keys("SAE_B", number=2)
        lab.client(lab.b, "SAE_B").dec_keys("SAE_A", [k.key_id for k in keys])
    assert keys[0].key_id in caplog.text
    for key in keys:
        raw = key.key.reveal()
        assert base64.b64encode(raw).decode() not in caplog.text and raw.hex() not in caplog.text


# --- refusals by the KME ----------------------------------------------------------------------------


def test_enc_keys_rejects_caller_without_client_cert(lab: Lab) -> None:
    context = ssl.create_default_context(cafile=str(lab.pki / "ca.pem"))
    with (
        pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)),
        socket.create_connection(("127.0.0.1", lab.a.port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"POST /api/v1/keys/SAE_B/enc_keys HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        assert tls.recv(1024) == b""  # never an HTTP answer


def test_client_cert_from_another_ca_fails_the_handshake(lab: Lab) -> None:
    with pytest.raises(KmsAuthError):
        lab.client(lab.a, "SAE_A", pki=lab.rogue).enc_keys("SAE_B")


def test_sae_not_attached_to_this_kme_gets_401(lab: Lab) -> None:
    with pytest.raises(KmsAuthError) as info:
        lab.client(lab.a, "SAE_B").enc_keys("SAE_A")
    assert info.value.status == 401
    with pytest.raises(KmsAuthError):
        lab.client(lab.a, "KME_B").status("SAE_B")  # a KME certificate is no SAE


def test_unknown_slave_sae_is_400(lab: Lab) -> None:
    with pytest.raises(KmsBadAnswerError) as info:
        lab.client(lab.a, "SAE_A").enc_keys("SAE_X")
    assert info.value.status == 400 and not isinstance(info.value, KmsAuthError)


def test_more_keys_than_stored_is_503_unavailable(lab: Lab) -> None:
    empty = start_kme(
        lab.pki, "KME_A", saes=("SAE_A",), peer_saes=("SAE_B",), initial=0
    )  # rate 0: never any key
    try:
        client = lab.client(empty, "SAE_A")
        assert client.status("SAE_B").stored_key_count == 0
        with pytest.raises(KmsUnavailableError, match="503: not enough key"):
            client.enc_keys("SAE_B")
    finally:
        empty.stop()


def test_client_refuses_untrusted_kme_certificate(lab: Lab) -> None:
    with pytest.raises(KmsAuthError, match="TLS"):
        lab.client(lab.a, "SAE_A", ca=lab.rogue / "ca.pem").status("SAE_B")


def test_client_refuses_kme_certificate_for_another_address(lab: Lab) -> None:
    other = start_kme(lab.pki, "KME_B", peer_saes=(), host="127.0.0.2")  # cert: 127.0.0.1 only
    try:
        client = Etsi014Client(
            f"https://127.0.0.2:{other.port}",
            ca=lab.pki / "ca.pem",
            cert=lab.pki / "SAE_B.pem",
            key=lab.pki / "SAE_B.key",
            timeout=TIMEOUT,
        )
        with pytest.raises(KmsAuthError, match="TLS"):
            client.status("SAE_A")
    finally:
        other.stop()


# --- client error mapping against a canned HTTPS server --------------------------------------------


@pytest.fixture(scope="module")
def canned(lab: Lab) -> Iterator[tuple[Canned, Etsi014Client]]:
    with serve_canned(lab.pki, timeout=TIMEOUT) as served:
        yield served


def keys_body(*entries: tuple[str, bytes]) -> bytes:
    return json.dumps(
        {"keys": [{"key_ID": i, "key": base64.b64encode(k).decode()} for i, k in entries]}
    ).encode()


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (503, b'{"message": "no key"}', KmsUnavailableError),
        (503, b"", KmsUnavailableError),
        (401, b'{"message": "who?"}', KmsAuthError),
        (400, b'{"message": "bad size", "details": []}', KmsBadAnswerError),
        (500, b"<html>oops</html>", KmsBadAnswerError),
        (404, b"", KmsBadAnswerError),
        (422, b'{"detail": "x"}', KmsBadAnswerError),
        (200, b"{not json", KmsBadAnswerError),
        (200, b"", KmsBadAnswerError),
        (200, keys_body(("id-1", bytes(32)), ("id-2", bytes(32)), ("id-3", bytes(32))), KmsBadAnswerError),
        (200, keys_body(("id-1", bytes(64)), ("id-2", bytes(64))), KmsBadAnswerError),  # size in bytes
        (200, keys_body(("id-1", bytes(32)), ("id-1", bytes(32))), KmsBadAnswerError),  # duplicate IDs
    ],
)
def test_client_maps_kme_answers_to_typed_errors(
    canned: tuple[Canned, Etsi014Client], status: int, body: bytes, error: type[Exception]
) -> None:
    fake, client = canned
    fake.answer = (status, body)
    with pytest.raises(error) as info:
        client.enc_keys("SAE_B", number=2, size_bits=256)
    if isinstance(info.value, KmsBadAnswerError):
        assert info.value.status == status


def test_client_keeps_the_keys_of_a_short_answer(canned: tuple[Canned, Etsi014Client]) -> None:
    fake, client = canned
    fake.answer = (200, keys_body(("id-1", bytes(32))))  # one key, two asked
    assert [k.key_id for k in client.enc_keys("SAE_B", number=2, size_bits=256)] == ["id-1"]


def test_client_reports_kme_message_and_status(canned: tuple[Canned, Etsi014Client]) -> None:
    fake, client = canned
    fake.answer = (400, b'{"message": "size must be a multiple of 8", "details": [{"size": "7"}]}')
    with pytest.raises(KmsBadAnswerError, match="HTTP 400: size must be") as info:
        client.status("SAE_B")
    assert info.value.kme_message == "size must be a multiple of 8"


def test_client_checks_dec_keys_answer_against_the_ids_asked(canned: tuple[Canned, Etsi014Client]) -> None:
    fake, client = canned
    fake.answer = (200, keys_body(("id-1", bytes(32)), ("id-3", bytes(32))))
    with pytest.raises(KmsBadAnswerError, match="do not match"):
        client.dec_keys("SAE_B", ["id-1", "id-2"])
    assert [k.key_id for k in client.dec_keys("SAE_B", ["id-3", "id-1"])] == ["id-3", "id-1"]


def test_client_maps_refused_connection_to_unavailable(lab: Lab) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = Etsi014Client(
        f"https://127.0.0.1:{port}",
        ca=lab.pki / "ca.pem",
        cert=lab.pki / "SAE_A.pem",
        key=lab.pki / "SAE_A.key",
        timeout=TIMEOUT,
    )
    with pytest.raises(KmsUnavailableError, match="Refused"):
        client.enc_keys("SAE_B")


def test_client_maps_silent_server_to_unavailable_after_timeout(lab: Lab) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never speaks TLS
        client = Etsi014Client(
            f"https://127.0.0.1:{silent.getsockname()[1]}",
            ca=lab.pki / "ca.pem",
            cert=lab.pki / "SAE_A.pem",
            key=lab.pki / "SAE_A.key",
            timeout=0.3,
        )
        with pytest.raises(KmsUnavailableError):
            client.status("SAE_B")


class Trickler:
    """A TLS server on 127.0.0.1 that sends ``head`` and then one byte every ``every`` seconds, for good.

    ``tls=False``: no TLS at all, the bytes go out raw from the first (a KME stuck in its handshake).
    """

    def __init__(self, pki: Path, head: bytes, *, every: float = 0.05, tls: bool = True) -> None:
        self.head, self.every, self.tls = head, every, tls
        self.context = server_context(ca=pki / "ca.pem", cert=pki / "KME_A.pem", key=pki / "KME_A.key")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        try:
            sock = self.context.wrap_socket(raw, server_side=True) if self.tls else raw
            request = b""
            while self.tls and b"\r\n\r\n" not in request:
                request += sock.recv(65536)
            sock.sendall(self.head)
            while not self.stop.wait(self.every):
                sock.sendall(b"a")
        except OSError:
            pass  # the client cut the connection
        finally:
            raw.close()


TRICKLED = [
    pytest.param(b"HTTP/1.1 200 OK\r\nX-Slow: ", True, id="header"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{", True, id="body"),
    pytest.param(b"\x16\x03\x03\x40\x00", False, id="handshake"),  # a 16 KiB TLS record, never complete
]


@pytest.mark.parametrize(("head", "tls"), TRICKLED)
def test_a_kme_trickling_its_answer_is_cut_off_at_the_timeout(lab: Lab, head: bytes, tls: bool) -> None:
    kme = Trickler(lab.pki, head, tls=tls)  # a byte every 0.05 s: no single read ever times out
    https = MtlsHttps(
        kme.url, ca=lab.pki / "ca.pem", cert=lab.pki / "SAE_A.pem", key=lab.pki / "SAE_A.key", timeout=0.5
    )
    started = time.monotonic()
    try:
        with pytest.raises(KmsUnavailableError, match=r"no complete answer within 0\.5 s"):
            https.request("GET", "/api/v1/keys/SAE_B/status")
    finally:
        kme.stop.set()
        kme.listener.close()
    assert 0.5 <= time.monotonic() - started < 2.0
    assert https.diagnose() is None  # a deadline is no TLS failure: no diagnosis, no streak


def test_the_deadline_leaves_quick_requests_alone(lab: Lab) -> None:
    client = lab.client(lab.a, "SAE_A")
    before = threading.active_count()
    for _ in range(20):
        assert client.status("SAE_B").slave_SAE_ID == "SAE_B"
    time.sleep(0.2)
    assert threading.active_count() <= before + 1  # every deadline's timer ended with its request


def test_client_rejects_bad_configuration(lab: Lab, tmp_path: Path) -> None:
    files = {"ca": lab.pki / "ca.pem", "cert": lab.pki / "SAE_A.pem", "key": lab.pki / "SAE_A.key"}
    with pytest.raises(ConfigError):
        Etsi014Client("http://127.0.0.1:1", timeout=1, **files)
    with pytest.raises(ConfigError):
        Etsi014Client("https://127.0.0.1:1", timeout=1, **{**files, "cert": tmp_path / "missing.pem"})
    with pytest.raises(ConfigError):
        Etsi014Client("https://127.0.0.1:1", timeout=1, **{**files, "key": lab.pki / "SAE_B.key"})
    client = Etsi014Client("https://127.0.0.1:1", timeout=1, **files)
    with pytest.raises(ConfigError):
        client.enc_keys("SAE_B", number=0)
    with pytest.raises(ConfigError):
        client.enc_keys("SAE_B", size_bits=100)
    with pytest.raises(ConfigError):
        client.dec_keys("SAE_B", ["a", "a"])
    with pytest.raises(ConfigError):
        client.status("bad/id with space")


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH", "OPTIONS"])
def test_other_http_methods_get_a_json_405(lab: Lab, method: str) -> None:
    https = MtlsHttps(
        f"https://127.0.0.1:{lab.a.port}",
        ca=lab.pki / "ca.pem",
        cert=lab.pki / "SAE_A.pem",
        key=lab.pki / "SAE_A.key",
        timeout=TIMEOUT,
    )
    status, body = https.request(method, "/api/v1/keys/SAE_B/enc_keys")
    answer = json.loads(body)
    assert status == 405 and method in answer["message"] and isinstance(answer["details"], list)


def test_kme_refuses_a_certificate_whose_cn_is_not_its_id(lab: Lab) -> None:
    config = KmeConfig(kme_id="KME_A", peer_kme_id="KME_B", saes=("SAE_A",), link_secret=Secret(bytes(32)))
    with pytest.raises(ConfigError, match="CN is KME_B, but --kme-id is KME_A"):
        KmeService.bind(
            config,
            listen=("127.0.0.1", 0),
            ca=lab.pki / "ca.pem",
            cert=lab.pki / "KME_B.pem",
            key=lab.pki / "KME_B.key",
        )


def test_kme_refuses_a_ca_file_that_is_not_a_ca(lab: Lab) -> None:
    config = KmeConfig(kme_id="KME_A", peer_kme_id="KME_B", saes=("SAE_A",), link_secret=Secret(bytes(32)))
    with pytest.raises(ConfigError, match="not a CA certificate"):
        KmeService.bind(
            config,
            listen=("127.0.0.1", 0),
            ca=lab.pki / "KME_B.pem",
            cert=lab.pki / "KME_A.pem",
            key=lab.pki / "KME_A.key",
        )


def test_busy_listen_port_error_names_the_address(lab: Lab) -> None:
    config = KmeConfig(kme_id="KME_A", peer_kme_id="KME_B", saes=("SAE_A",), link_secret=Secret(bytes(32)))
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{lab.a.port}"):
        KmeService.bind(
            config,
            listen=("127.0.0.1", lab.a.port),
            ca=lab.pki / "ca.pem",
            cert=lab.pki / "KME_A.pem",
            key=lab.pki / "KME_A.key",
        )
