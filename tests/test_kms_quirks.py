"""KME product quirks (qgate.kms.quirks) over real HTTPS with mutual TLS on 127.0.0.1.

Every quirk gets its own KME pair (quirks are for good, both KMEs the same product), called with
http.client and ssl directly so each assertion is about the HTTP answer itself (status,
Content-Type, body), not about how a client classifies it. Also: quirk names are checked, the
quirks are logged at start, and the lab hands them to both KMEs (argv, PKI, policies).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.kmes import link_kmes, start_kme

from qgate import lab_setup
from qgate.cli.kms import kms_sim
from qgate.crypto.secret import Secret
from qgate.errors import ConfigError
from qgate.kms.quirks import (
    CBC_CIPHERS,
    QUIRK_NAMES,
    STALL_EVERY,
    STALL_SECONDS,
    Quirks,
)
from qgate.kms.sim_server import KmeService
from qgate.kms.simulator import DELIVERED_PATH, Kme, KmeConfig
from qgate.pki import make_pki

API = "/api/v1/keys"
TIMEOUT = 10.0
INITIAL = 600


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> dict[str, object]:
        assert self.content_type == "application/json", (self.content_type, self.body[:200])
        obj = json.loads(self.body)
        assert isinstance(obj, dict)
        return obj

    def key_ids(self) -> list[str]:
        keys = self.json()["keys"]
        assert isinstance(keys, list)
        return [str(k["key_ID"]) for k in keys]


def client_context(
    pki: Path, sae: str, *, ciphers: str | None = None, hostname: bool = True
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # Python's default list: AES-GCM/ChaCha20 only
    context.load_verify_locations(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / f"{sae}.pem"), str(pki / f"{sae}.key"))
    if ciphers is not None:
        context.set_ciphers(ciphers)
    context.check_hostname = hostname
    return context


def call(
    pki: Path,
    kme: KmeService,
    sae: str,
    method: str,
    path: str,
    body: object = None,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = TIMEOUT,
) -> Answer:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", kme.port, context=context or client_context(pki, sae), timeout=timeout
    )
    try:
        raw = None if body is None else json.dumps(body).encode()
        headers = {} if raw is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=raw, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, response.getheader("Content-Type", ""), response.read())
    finally:
        conn.close()


@dataclass
class Pair:
    pki: Path
    a: KmeService  # SAE_A, SAE_C
    b: KmeService  # SAE_B

    def status(self, sae: str = "SAE_A", slave: str = "SAE_B") -> Answer:
        return call(self.pki, self.a, sae, "GET", f"{API}/{slave}/status")

    def enc(self, number: int, size: int = 256, *, sae: str = "SAE_A") -> Answer:
        return call(self.pki, self.a, sae, "POST", f"{API}/SAE_B/enc_keys", {"number": number, "size": size})

    def dec(self, key_ids: list[str], *, master: str = "SAE_A") -> Answer:
        body = {"key_IDs": [{"key_ID": k} for k in key_ids]}
        return call(self.pki, self.b, "SAE_B", "POST", f"{API}/{master}/dec_keys", body)


def new_pki(where: Path, **options: object) -> Path:
    make_pki(where, kmes={"KME_A": [], "KME_B": []}, saes=["SAE_A", "SAE_B", "SAE_C"], **options)  # type: ignore[arg-type]
    return where


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_pki(tmp_path_factory.mktemp("pki"))


PairFactory = Callable[..., Pair]


@pytest.fixture
def make_pair(pki: Path) -> Iterator[PairFactory]:
    """``make_pair(*quirks, initial=600, pki=...)``: a linked KME pair, both with ``quirks``."""
    started: list[KmeService] = []

    def make(*quirks: str, initial: int = INITIAL, pki_dir: Path = pki) -> Pair:
        a = start_kme(pki_dir, "KME_A", quirks=quirks, initial=initial)
        started.append(a)
        b = start_kme(pki_dir, "KME_B", quirks=quirks, initial=initial)
        started.append(b)
        link_kmes(pki_dir, a, b)
        return Pair(pki_dir, a, b)

    try:
        yield make
    finally:
        for service in started:
            service.stop()


def stored(pair: Pair) -> int:
    return pair.a.kme.stored_key_count()


# --- replace-on-enc --------------------------------------------------------------------------------


def test_replace_on_enc_makes_the_pairs_unfetched_keys_unknown_at_the_slaves_kme(
    make_pair: PairFactory,
) -> None:
    pair = make_pair("replace-on-enc")
    other = pair.enc(1, sae="SAE_C").key_ids()  # another master SAE: another pair
    first = pair.enc(2).key_ids()
    second = pair.enc(1).key_ids()
    assert pair.b.kme.waiting_key_count() == 2  # SAE_C's key and the newest SAE_A key only
    gone = pair.dec([first[0]])
    assert (gone.status, gone.json()) == (
        400,
        {"message": "keys do not exist", "details": [{"key_ID": first[0]}]},
    )
    assert pair.dec([first[1], second[0]]).status == 400  # all or none
    assert pair.dec(second).status == 200
    assert pair.dec(other, master="SAE_C").status == 200


def test_replace_on_enc_key_fetched_before_the_next_enc_stays_good(make_pair: PairFactory) -> None:
    pair = make_pair("replace-on-enc")
    first = pair.enc(1).key_ids()
    fetched = pair.dec(first)
    pair.enc(1)
    assert fetched.status == 200 and fetched.key_ids() == first


class Recorder:
    """PeerLink keeping every report body instead of sending it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def report_delivered(self, body: bytes) -> None:
        self.bodies.append(body)

    def fetch_saes(self) -> tuple[str, ...]:
        return ("SAE_B",)


def memory_kme(kme_id: str, quirks: tuple[str, ...] = (), peer: Recorder | None = None) -> Kme:
    sae, peer_kme, peer_sae = (
        ("SAE_A", "KME_B", "SAE_B") if kme_id == "KME_A" else ("SAE_B", "KME_A", "SAE_A")
    )
    config = KmeConfig(kme_id=kme_id, peer_kme_id=peer_kme, saes=(sae,), peer_saes=(peer_sae,),
                       link_secret=Secret(bytes(32)), rate=0.0, initial_key_count=5,
                       quirks=quirks)  # fmt: skip
    return Kme(config, clock=lambda: 1000.0, peer=peer)


def test_replace_on_enc_report_asks_the_peer_to_replace_and_only_then() -> None:
    for quirks in ((), ("replace-on-enc",)):
        recorder = Recorder()
        status, _ = memory_kme("KME_A", quirks, recorder).handle(
            "POST", f"{API}/SAE_B/enc_keys", {}, b'{"number": 1}', "SAE_A"
        )
        assert status == 200
        (body,) = recorder.bodies
        report = json.loads(body)
        assert ("replace" in report) == bool(quirks)
        if quirks:
            assert report.pop("replace") is True
        assert list(report) == ["master_SAE_ID", "slave_SAE_ID", "keys"]


def test_replace_on_enc_refused_report_leaves_the_waiting_keys_alone() -> None:
    recorder = Recorder()
    master, slave = memory_kme("KME_A", ("replace-on-enc",), recorder), memory_kme("KME_B")
    for _ in range(2):
        master.handle("POST", f"{API}/SAE_B/enc_keys", {}, b'{"number": 1}', "SAE_A")
    first, second = recorder.bodies
    assert slave.handle("POST", DELIVERED_PATH, {}, first, "KME_A")[0] == 200
    assert slave.handle("POST", DELIVERED_PATH, {}, first, "KME_A")[0] == 400  # already delivered
    assert slave.waiting_key_count() == 1  # the refused report superseded nothing
    assert slave.handle("POST", DELIVERED_PATH, {}, second, "KME_A")[0] == 200
    assert slave.waiting_key_count() == 1  # the first key is gone, the second waits
    (old_id,) = [k["key_ID"] for k in json.loads(first)["keys"]]
    body = json.dumps({"key_IDs": [{"key_ID": old_id}]}).encode()
    assert slave.handle("POST", f"{API}/SAE_A/dec_keys", {}, body, "SAE_B")[0] == 400


# --- cbc-only --------------------------------------------------------------------------------------


def test_cbc_only_refuses_a_default_aead_only_client(make_pair: PairFactory) -> None:
    pair = make_pair("cbc-only")
    with pytest.raises(ssl.SSLError):
        pair.status()


def test_cbc_only_speaks_tls12_cbc_sha_to_a_client_allowing_it(make_pair: PairFactory) -> None:
    pair = make_pair("cbc-only")
    for ciphers, expected in (
        ("ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES256-SHA"),
        ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA"),
        (lab_setup.CBC_POLICY_CIPHERS, "ECDHE-ECDSA-AES256-SHA"),  # the lab policy's explicit choice
    ):
        context = client_context(pair.pki, "SAE_A", ciphers=ciphers)
        sock = socket.create_connection(("127.0.0.1", pair.a.port), timeout=TIMEOUT)
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"
            cipher = tls.cipher()
            assert cipher is not None and cipher[0] == expected
        answer = call(pair.pki, pair.a, "SAE_A", "GET", f"{API}/SAE_B/status", context=context)
        assert answer.status == 200


def test_cbc_only_pair_delivers_keys_over_its_cbc_peer_link(make_pair: PairFactory) -> None:
    pair = make_pair("cbc-only")
    cbc = client_context(pair.pki, "SAE_A", ciphers=CBC_CIPHERS)
    enc = call(pair.pki, pair.a, "SAE_A", "POST", f"{API}/SAE_B/enc_keys", {"number": 2}, context=cbc)
    assert enc.status == 200
    body = {"key_IDs": [{"key_ID": k} for k in enc.key_ids()]}
    slave = client_context(pair.pki, "SAE_B", ciphers=CBC_CIPHERS)
    dec = call(pair.pki, pair.b, "SAE_B", "POST", f"{API}/SAE_A/dec_keys", body, context=slave)
    assert dec.status == 200 and dec.json() == enc.json()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_cbc_only_answers_curl_with_an_explicit_cbc_cipher(make_pair: PairFactory) -> None:
    pair = make_pair("cbc-only")
    pki = pair.pki
    argv = ["curl", "-sS", "--max-time", "10", "--cacert", str(pki / "ca.pem"),
            "--cert", str(pki / "SAE_A.pem"), "--key", str(pki / "SAE_A.key"), "-w", "\n%{http_code}",
            "--ciphers", "ECDHE-ECDSA-AES256-SHA",
            f"https://127.0.0.1:{pair.a.port}{API}/SAE_B/status"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 0, done.stderr
    body, code = done.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["slave_SAE_ID"] == "SAE_B"
    aead_only = [*argv[:-3], "--tls13-ciphers", "TLS_AES_128_GCM_SHA256",
                 "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256", argv[-1]]  # fmt: skip
    refused = subprocess.run(aead_only, capture_output=True, text=True, timeout=20, check=False)
    assert refused.returncode != 0


# --- Status quirks ---------------------------------------------------------------------------------


def test_zero_count_reports_no_stored_key_while_serving_keys(make_pair: PairFactory) -> None:
    pair = make_pair("zero-count")
    status = pair.status().json()
    assert status["stored_key_count"] == 0 and status["max_key_count"] == 1000
    assert stored(pair) == INITIAL
    enc = pair.enc(2)
    assert enc.status == 200 and len(enc.key_ids()) == 2
    assert pair.status().json()["stored_key_count"] == 0


def test_zero_limits_reports_every_limit_as_zero_but_key_size_and_still_serves(
    make_pair: PairFactory,
) -> None:
    pair = make_pair("zero-limits")
    status = pair.status().json()
    assert status["key_size"] == 256
    for name in ("stored_key_count", "max_key_count", "max_key_per_request", "max_key_size", "min_key_size"):
        assert status[name] == 0, name
    enc = pair.enc(3, 512)
    assert enc.status == 200 and len(enc.key_ids()) == 3
    assert pair.dec(enc.key_ids()).status == 200
    assert pair.enc(17).status == 400  # the real limit (16) still holds


@pytest.mark.parametrize(("quirk", "limit"), [("per-request-4", 4), ("per-request-1", 1)])
def test_per_request_limit_is_in_status_and_enforced_with_an_etsi_error(
    make_pair: PairFactory, quirk: str, limit: int
) -> None:
    pair = make_pair(quirk)
    assert pair.status().json()["max_key_per_request"] == limit
    refused = pair.enc(limit + 1)
    assert (refused.status, refused.json()) == (
        400,
        {"message": f"number must be 1..{limit}", "details": [{"number": str(limit + 1)}]},
    )
    by_get = call(pair.pki, pair.a, "SAE_A", "GET", f"{API}/SAE_B/enc_keys?number={limit + 1}")
    assert by_get.status == 400 and f"1..{limit}" in str(by_get.json()["message"])
    assert stored(pair) == INITIAL  # nothing consumed
    served = pair.enc(limit)
    assert served.status == 200 and len(served.key_ids()) == limit
    if limit == 1:
        two = pair.enc(1).key_ids() + served.key_ids()
        assert pair.dec(two).json()["message"] == "at most 1 key_IDs per request"


# --- short -----------------------------------------------------------------------------------------


def test_short_answers_200_with_half_the_keys_and_only_those_exist(make_pair: PairFactory) -> None:
    pair = make_pair("short")
    enc = pair.enc(5)
    assert enc.status == 200 and len(enc.key_ids()) == 3  # ceil(5 / 2)
    assert stored(pair) == INITIAL - 3
    assert pair.b.kme.waiting_key_count() == 3
    assert pair.dec(enc.key_ids()).status == 200
    one = pair.enc(1)
    assert one.status == 200 and len(one.key_ids()) == 1


# --- error bodies ----------------------------------------------------------------------------------


def test_html_errors_send_every_error_as_an_html_page(make_pair: PairFactory) -> None:
    pair = make_pair("html-errors", initial=100)
    unknown = pair.dec([str(uuid.uuid4())])
    not_mine = call(pair.pki, pair.a, "SAE_B", "GET", f"{API}/SAE_B/status")  # SAE_B is not on KME_A
    wrong_method = call(pair.pki, pair.a, "SAE_A", "PUT", f"{API}/SAE_B/status")
    too_many = pair.enc(16, 8192)  # 16 x 32 blocks > 100 stored
    for answer, code in ((unknown, 400), (not_mine, 401), (wrong_method, 405), (too_many, 503)):
        assert answer.status == code
        assert answer.content_type.startswith("text/html"), answer.content_type
        assert answer.body.startswith(b"<!doctype html>") and f"HTTP Status {code}".encode() in answer.body
    assert b"unknown key_ID" in unknown.body
    assert pair.status().status == 200 and pair.status().json()["key_size"] == 256


def test_details_422_turns_400s_into_422_with_the_specifics_in_details(make_pair: PairFactory) -> None:
    pair = make_pair("details-422")
    key_id = str(uuid.uuid4())
    unknown = pair.dec([key_id])
    assert (unknown.status, unknown.json()) == (
        422,
        {"message": "invalid request", "details": [{"reason": "unknown key_ID"}, {"key_ID": key_id}]},
    )
    bad_size = pair.enc(1, 7)
    assert bad_size.status == 422
    details = bad_size.json()["details"]
    assert isinstance(details, list) and details[0]["reason"].startswith("size must be a multiple of 8")
    assert details[1] == {"size": "7"}
    not_mine = call(pair.pki, pair.a, "SAE_B", "GET", f"{API}/SAE_B/status")
    assert (
        not_mine.status == 401 and not_mine.json()["message"] == "caller is not an SAE attached to this KME"
    )


def test_consumed_401_answers_a_second_dec_keys_with_401(make_pair: PairFactory) -> None:
    pair = make_pair("consumed-401")
    key_ids = pair.enc(1).key_ids()
    assert pair.dec(key_ids).status == 200
    again = pair.dec(key_ids)
    assert (again.status, again.json()) == (
        401,
        {"message": "key_ID already retrieved", "details": [{"key_ID": key_ids[0]}]},
    )
    never = pair.dec([str(uuid.uuid4())])
    assert never.status == 400 and never.json()["message"] == "unknown key_ID"


def test_empty_400_answers_an_empty_store_with_400_not_503(make_pair: PairFactory) -> None:
    plain, quirky = make_pair(initial=0), make_pair("empty-400", initial=0)
    assert plain.enc(1).status == 503
    empty = quirky.enc(1)
    assert (empty.status, empty.json()) == (400, {"message": "not enough keys available", "details": []})


# --- no-san ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_san_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_pki(tmp_path_factory.mktemp("nosan"), no_san_kmes=["KME_A", "KME_B"])


def test_no_san_server_fails_hostname_checks_and_is_reached_by_cn_or_fingerprint_pin(
    make_pair: PairFactory, no_san_pki: Path
) -> None:
    pair = make_pair("no-san", pki_dir=no_san_pki)
    cert = x509.load_pem_x509_certificate((no_san_pki / "KME_A.pem").read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        pair.status()
    pinned = client_context(no_san_pki, "SAE_A", hostname=False)  # the chain is still verified
    sock = socket.create_connection(("127.0.0.1", pair.a.port), timeout=TIMEOUT)
    with pinned.wrap_socket(sock) as tls:
        seen = tls.getpeercert()
        der = tls.getpeercert(binary_form=True)
    assert seen is not None and seen["subject"] == ((("commonName", "KME_A"),),)
    assert der is not None
    assert (
        hashlib.sha256(der).digest() == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    )
    answer = call(no_san_pki, pair.a, "SAE_A", "POST", f"{API}/SAE_B/enc_keys", {"number": 1}, context=pinned)
    assert answer.status == 200  # the KME-to-KME link pins its peer by CN too
    slave = client_context(no_san_pki, "SAE_B", hostname=False)
    body = {"key_IDs": [{"key_ID": k} for k in answer.key_ids()]}
    assert (
        call(no_san_pki, pair.b, "SAE_B", "POST", f"{API}/SAE_A/dec_keys", body, context=slave).status == 200
    )


def test_no_san_refuses_a_certificate_with_a_subject_alt_name(pki: Path) -> None:
    with pytest.raises(ConfigError, match="quirk no-san needs a certificate without subjectAltName"):
        start_kme(pki, "KME_A", quirks=("no-san",), initial=0)


# --- stall -----------------------------------------------------------------------------------------


def test_stall_holds_every_fifth_key_request_and_never_status(make_pair: PairFactory) -> None:
    pair = make_pair("stall")
    took: list[float] = []
    for _ in range(STALL_EVERY):
        start = time.monotonic()
        assert pair.status().status == 200
        assert time.monotonic() - start < 1.0
        start = time.monotonic()
        assert pair.enc(1).status == 200
        took.append(time.monotonic() - start)
    assert all(t < 1.0 for t in took[:-1]), took
    assert STALL_SECONDS <= took[-1] < STALL_SECONDS + 2, took
    with pytest.raises(TimeoutError):  # a 2 s client gives up on the 10th
        for _ in range(STALL_EVERY):
            call(pair.pki, pair.a, "SAE_A", "POST", f"{API}/SAE_B/enc_keys", {"number": 1}, timeout=2.0)


# --- names, start-up log, CLI ------------------------------------------------------------------------


def test_quirk_names_are_checked_with_the_valid_ones_listed() -> None:
    with pytest.raises(ConfigError, match=r"unknown quirk 'no-such' \(valid: replace-on-enc, cbc-only"):
        Quirks(["zero-count", "no-such"])
    with pytest.raises(ConfigError, match="per-request-1 and per-request-4 exclude each other"):
        Quirks(["per-request-4", "per-request-1"])
    config = KmeConfig(kme_id="KME_A", peer_kme_id="KME_B", saes=("SAE_A",), link_secret=Secret(bytes(32)),
                       quirks=("bogus",))  # fmt: skip
    with pytest.raises(ConfigError, match="kms-sim KME_A: unknown quirk 'bogus'"):
        config.check()
    assert Quirks(["short", "short"]).names == ("short",)


def test_kms_sim_rejects_unknown_quirks_and_documents_all(pki: Path) -> None:
    args = ["--kme-id", "KME_A", "--peer-kme-id", "KME_B", "--sae", "SAE_A", "--ca", str(pki / "ca.pem"),
            "--cert", str(pki / "KME_A.pem"), "--key", str(pki / "KME_A.key"),
            "--link-secret-file", str(pki / "link.secret"),
            "--quirk", "short", "--quirk", "fancy"]  # fmt: skip
    result = CliRunner().invoke(kms_sim, args)
    assert result.exit_code == 2
    assert "unknown quirk 'fancy' (valid: " in result.output and "empty-400" in result.output
    helped = CliRunner().invoke(kms_sim, ["--help"])
    assert helped.exit_code == 0 and "--quirk NAME" in helped.output
    for name in QUIRK_NAMES:
        assert f"  {name} " in helped.output, name


def test_kme_logs_its_quirks_at_start(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qgate.kms.sim_server"):
        service = start_kme(pki, "KME_A", quirks=("zero-count", "stall"), initial=0)
    service.stop()
    assert "KME KME_A quirk zero-count: Status stored_key_count always 0" in caplog.text
    assert "KME KME_A quirk stall: every 5th" in caplog.text


# --- the lab -----------------------------------------------------------------------------------------


def test_lab_kms_sim_argv_carries_every_quirk(tmp_path: Path) -> None:
    argv = lab_setup.kms_sim_argv("python3", tmp_path, "b", quirks=("cbc-only", "no-san"))
    assert argv[argv.index("--quirk") :] == ["--quirk", "cbc-only", "--quirk", "no-san"]
    assert "--quirk" not in lab_setup.kms_sim_argv("python3", tmp_path, "a")


def test_lab_policies_pin_the_kme_and_allow_cbc_only_when_the_quirks_ask(tmp_path: Path) -> None:
    for site, kme_id in (("a", "KME_A"), ("b", "KME_B")):
        kme = lab_setup.render_policy(site, kme_quirks=("no-san", "cbc-only"))["kme"]
        assert isinstance(kme, dict)
        assert kme["server_cn"] == kme_id and kme["tls_ciphers"] == lab_setup.CBC_POLICY_CIPHERS
        plain = lab_setup.render_policy(site, kme_quirks=("short", "stall"))["kme"]
        assert isinstance(plain, dict) and not {"server_cn", "tls_ciphers"} & set(plain)
    forced = lab_setup.render_policy(
        "a", kme_quirks=("no-san",), overrides=lab_setup.SiteOverrides(kme={"server_cn": "OTHER"})
    )["kme"]
    assert isinstance(forced, dict) and forced["server_cn"] == "OTHER"  # a test may override
    lab_setup.make_pki_and_identities(tmp_path, kme_quirks=("no-san",))
    for kme_id in ("KME_A", "KME_B"):
        cert = x509.load_pem_x509_certificate((tmp_path / "pki" / f"{kme_id}.pem").read_bytes())
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    paths = lab_setup.write_policies(tmp_path, kme_quirks=("no-san", "cbc-only"))  # load_policy checks them
    assert yaml.safe_load(paths["b"].read_text())["kme"]["server_cn"] == "KME_B"


def test_lab_run_passes_kme_quirks_to_the_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import qgate.lab

    lab_cli = importlib.import_module("qgate.cli.lab")
    seen: list[qgate.lab.LabOptions] = []

    def fake_run_lab(opts: qgate.lab.LabOptions) -> dict[str, object]:
        seen.append(opts)
        return {"ok": True, "run_id": "abc123", "mode": "qgate"}

    monkeypatch.setattr(lab_cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(qgate.lab, "run_lab", fake_run_lab)
    result = CliRunner().invoke(lab_cli.lab, ["run", "--kme-quirk", "no-san", "--kme-quirk", "short"])
    assert result.exit_code == 0, result.output
    assert seen[0].kme_quirks == ("no-san", "short")
    bad = CliRunner().invoke(lab_cli.lab, ["run", "--kme-quirk", "nope"])
    assert bad.exit_code == 2 and "unknown quirk 'nope'" in bad.output
