"""KME simulator faults (qgate.kms.faults) over real HTTPS with mutual TLS on 127.0.0.1.

For each fault a simulated KME can be told to commit, the ETSI 014 client raises the typed
error the gateway relies on, and the KME serves normally again once the fault is cleared, used
up, or (``down``) over. Faults are set through the admin API with an admin certificate.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.kmes import link_kmes, start_kme

from qgate.crypto.secret import Secret
from qgate.errors import ConfigError, KmsAuthError, KmsBadAnswerError, KmsUnavailableError
from qgate.kms import etsi014
from qgate.kms.client import Etsi014Client, MtlsHttps
from qgate.kms.faults import (
    ADMIN_PATH,
    FaultAdminClient,
    FaultTable,
    fault_from_mapping,
    mangle_keys,
    parse_fault_option,
)
from qgate.kms.sim_server import KmeService
from qgate.pki import make_pki

TIMEOUT = 5.0


@dataclass
class Lab:
    pki: Path
    a: KmeService  # admins: ADMIN, KME_B
    b: KmeService  # admins: none

    def client(self, kme: KmeService, sae: str, timeout: float = TIMEOUT) -> Etsi014Client:
        return Etsi014Client(
            f"https://127.0.0.1:{kme.port}",
            ca=self.pki / "ca.pem",
            cert=self.pki / f"{sae}.pem",
            key=self.pki / f"{sae}.key",
            timeout=timeout,
        )

    def admin(self, kme: KmeService, cn: str = "ADMIN") -> FaultAdminClient:
        return FaultAdminClient(
            f"https://127.0.0.1:{kme.port}",
            ca=self.pki / "ca.pem",
            cert=self.pki / f"{cn}.pem",
            key=self.pki / f"{cn}.key",
        )

    @property
    def master(self) -> Etsi014Client:
        return self.client(self.a, "SAE_A")

    @property
    def slave(self) -> Etsi014Client:
        return self.client(self.b, "SAE_B")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    pki = tmp_path_factory.mktemp("pki")
    make_pki(pki, kmes={"KME_A": [], "KME_B": []}, saes=["SAE_A", "SAE_B", "ADMIN"])
    a = start_kme(pki, "KME_A", saes=("SAE_A",), peer_saes=("SAE_B",), admins=("ADMIN", "KME_B"))
    b = start_kme(pki, "KME_B", saes=("SAE_B",), peer_saes=("SAE_A",))
    try:
        link_kmes(pki, a, b, timeout=1.0)
        yield Lab(pki, a, b)
    finally:
        a.stop()
        b.stop()


@pytest.fixture(autouse=True)
def no_fault_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "lab" in request.fixturenames:
        lab: Lab = request.getfixturevalue("lab")
        lab.a.faults.table.clear()
        lab.b.faults.table.clear()


def assert_key_flow_works(lab: Lab, number: int = 2) -> None:
    """The pair serves normally: the slave gets the master's keys."""
    keys = lab.master.enc_keys("SAE_B", number=number)
    assert lab.slave.dec_keys("SAE_A", [k.key_id for k in keys], size_bits=256) == keys


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def status_fails(client: Etsi014Client) -> bool:
    try:
        client.status("SAE_B")
    except KmsUnavailableError:
        return True
    return False


# --- fault specs and the fault table (no I/O) ---------------------------------------------------


def test_fault_option_parses_kind_parameters_endpoint_and_count() -> None:
    fault = parse_fault_option("error:code=500,body=html,endpoint=enc_keys,count=3")
    assert (fault.kind, fault.code, fault.body, fault.endpoints, fault.count) == (
        "error",
        500,
        "html",
        ("enc_keys",),
        3,
    )
    assert parse_fault_option("repeat_id").endpoints == ("enc_keys", "dec_keys")
    assert parse_fault_option("forget").endpoints == ("dec_keys",)
    assert parse_fault_option("delay:seconds=0.5").seconds == 0.5
    down = parse_fault_option("down:seconds=2,after=1")
    assert (down.seconds, down.after, down.endpoints, down.count) == (2.0, 1.0, (), None)
    assert fault_from_mapping({"kind": "wrong_size", "bits": 128}).bits == 128


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("explode", "kind must be one of"),
        ("error", "code is required"),
        ("error:code=200", "400..599"),
        ("error:code=500,body=xml", "body must be one of"),
        ("delay", "seconds is required"),
        ("delay:seconds=-1", "seconds must be a number"),
        ("delay:seconds=nan", "seconds must be a number"),
        ("forget:endpoint=enc_keys", "endpoint must be one of dec_keys"),
        ("short:endpoint=status", "endpoint must be one of enc_keys, dec_keys"),
        ("close:count=0", "count must be an integer"),
        ("down:seconds=1,endpoint=status", "unknown parameter endpoint"),
        ("wrong_size:bits=100", "multiple of 8"),
        ("close:count", "expected KIND[:NAME=VALUE"),
        ("close:count=1,count=2", "each NAME once"),
    ],
)
def test_fault_option_rejects_bad_specs_in_words(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_fault_option(text)


def test_fault_table_counts_requests_per_endpoint_and_clears() -> None:
    table = FaultTable()
    first = table.add(parse_fault_option("error:code=500,endpoint=enc_keys,count=2"))
    table.add(parse_fault_option("close"))
    assert table.take("status") is not None and table.take("status").kind == "close"  # type: ignore[union-attr]
    assert table.take("enc_keys").kind == "error"  # type: ignore[union-attr]
    assert [f["remaining"] for f in table.snapshot()] == [1, None]
    assert table.take("enc_keys").kind == "error"  # type: ignore[union-attr]
    assert table.take("enc_keys").kind == "close"  # type: ignore[union-attr]  # error used up
    assert table.clear(first) == 0 and table.clear() == 1
    assert table.take("enc_keys") is None and table.take(None) is None


def test_mangled_key_containers_fail_the_client_checks() -> None:
    keys = [etsi014.QkdKey(f"id-{i}", Secret(bytes([i]) * 32)) for i in range(2)]
    answer = etsi014.encode_key_container(keys)
    short = mangle_keys(parse_fault_option("short"), answer, 256)
    assert len(etsi014.parse_enc_keys(short, number=2, size_bits=256)) == 1  # kept (issue 11)
    for spec, message in (
        ("repeat_id", "duplicate key_ID"),
        ("wrong_size", "has 2048 bits, asked for 256"),
        ("wrong_size:bits=128", "has 128 bits, asked for 256"),
    ):
        spoiled = mangle_keys(parse_fault_option(spec), answer, 256)
        with pytest.raises(KmsBadAnswerError, match=message):
            etsi014.parse_enc_keys(spoiled, number=2, size_bits=256)
    one = etsi014.encode_key_container(keys[:1])
    with pytest.raises(KmsBadAnswerError, match="duplicate key_ID"):
        etsi014.parse_enc_keys(
            mangle_keys(parse_fault_option("repeat_id"), one, 256), number=1, size_bits=256
        )


# --- the admin API ---------------------------------------------------------------------------------


def test_admin_api_lists_adds_and_clears_faults(lab: Lab) -> None:
    admin = lab.admin(lab.a)
    added = admin.inject("error", code=500, body="html", endpoint="enc_keys", count=2)
    assert added["remaining"] == 2 and added["endpoint"] == ["enc_keys"]
    other = admin.inject("delay", seconds=0.1)
    assert [f["id"] for f in admin.faults()] == [added["id"], other["id"]]
    assert admin.clear(int(str(other["id"]))) == 1
    with pytest.raises(KmsBadAnswerError) as info:
        admin.clear(int(str(other["id"])))
    assert info.value.status == 404
    assert admin.clear() == 1 and admin.faults() == []


def test_admin_api_accepts_the_admin_and_peer_kme_certificates_only(lab: Lab) -> None:
    assert lab.admin(lab.a, "KME_B").faults() == []
    for cn in ("SAE_A", "SAE_B", "KME_A"):
        with pytest.raises(KmsBadAnswerError) as info:
            lab.admin(lab.a, cn).inject("close")
        assert info.value.status == 401
    with pytest.raises(KmsBadAnswerError, match="no admin configured") as info:
        lab.admin(lab.b).faults()  # KME_B has no --admin
    assert info.value.status == 401 and lab.a.faults.table.snapshot() == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", ADMIN_PATH, b"{not json", 400),
        ("POST", ADMIN_PATH, b"[]", 400),
        ("POST", ADMIN_PATH, b'{"kind": "error", "code": 99}', 400),
        ("POST", ADMIN_PATH, b'{"kind": "forget", "endpoint": "status"}', 400),
        ("PUT", ADMIN_PATH, b"{}", 405),
        ("GET", ADMIN_PATH + "/1", None, 405),
        ("DELETE", ADMIN_PATH + "/x", None, 404),
    ],
)
def test_admin_api_refuses_bad_requests(
    lab: Lab, method: str, path: str, body: bytes | None, status: int
) -> None:
    https = MtlsHttps(
        f"https://127.0.0.1:{lab.a.port}",
        ca=lab.pki / "ca.pem",
        cert=lab.pki / "ADMIN.pem",
        key=lab.pki / "ADMIN.key",
        timeout=TIMEOUT,
    )
    got, answer = https.request(method, path, body)
    assert got == status and "message" in json.loads(answer)
    assert lab.a.faults.table.snapshot() == []


def test_delete_on_etsi_endpoints_is_still_405(lab: Lab) -> None:
    https = MtlsHttps(
        f"https://127.0.0.1:{lab.a.port}",
        ca=lab.pki / "ca.pem",
        cert=lab.pki / "SAE_A.pem",
        key=lab.pki / "SAE_A.key",
        timeout=TIMEOUT,
    )
    assert https.request("DELETE", "/api/v1/keys/SAE_B/enc_keys")[0] == 405


# --- each fault against the ETSI 014 client ---------------------------------------------------------


def test_slow_answer_beyond_the_timeout_is_unavailable(lab: Lab) -> None:
    lab.admin(lab.a).inject("delay", seconds=1.0, endpoint="status", count=1)
    impatient = lab.client(lab.a, "SAE_A", timeout=0.3)
    started = time.monotonic()
    with pytest.raises(KmsUnavailableError, match=r"[Tt]imeout|timed out"):
        impatient.status("SAE_B")
    assert time.monotonic() - started < 0.9
    assert impatient.status("SAE_B").stored_key_count > 0  # the one slow answer is used up


def test_slow_answer_within_the_timeout_is_just_slow(lab: Lab) -> None:
    lab.admin(lab.a).inject("delay", seconds=0.2, endpoint="enc_keys")
    started = time.monotonic()
    assert_key_flow_works(lab)
    assert time.monotonic() - started >= 0.2


def test_503_is_unavailable_until_cleared_and_scoped_to_its_endpoint(lab: Lab) -> None:
    lab.admin(lab.a).inject("error", code=503, endpoint="enc_keys")
    for _ in range(2):
        with pytest.raises(KmsUnavailableError, match="HTTP 503"):
            lab.master.enc_keys("SAE_B")
    assert lab.master.status("SAE_B").stored_key_count > 0  # status is not hit
    lab.admin(lab.a).clear()
    assert_key_flow_works(lab)


@pytest.mark.parametrize("body", ["json", "html", "empty"])
@pytest.mark.parametrize("code", [400, 404, 422, 500])
def test_error_status_is_a_bad_answer_with_that_status_whatever_the_body(
    lab: Lab, code: int, body: str
) -> None:
    lab.admin(lab.a).inject("error", code=code, body=body, count=1)
    with pytest.raises(KmsBadAnswerError) as info:
        lab.master.enc_keys("SAE_B")
    assert info.value.status == code and not isinstance(info.value, KmsAuthError)
    assert (info.value.kme_message is not None) == (body == "json")
    assert_key_flow_works(lab)


def test_error_on_dec_keys_leaves_the_key_for_a_retry(lab: Lab) -> None:
    (key,) = lab.master.enc_keys("SAE_B")
    # the slave's KME B has no admin: its faults are set directly
    lab.b.faults.inject(parse_fault_option("error:code=500,body=empty,endpoint=dec_keys,count=1"))
    with pytest.raises(KmsBadAnswerError) as info:
        lab.slave.dec_keys("SAE_A", [key.key_id])
    assert info.value.status == 500
    assert lab.slave.dec_keys("SAE_A", [key.key_id]) == [key]


def test_short_enc_keys_answer_keeps_its_keys_and_short_dec_keys_is_a_bad_answer(lab: Lab) -> None:
    lab.admin(lab.a).inject("short", endpoint="enc_keys", count=1)
    short = lab.master.enc_keys("SAE_B", number=3)
    assert len(short) == 2  # the KME consumed two keys: kept, not thrown away (issue 11)
    ids = [k.key_id for k in short]
    assert [k.key_id for k in lab.slave.dec_keys("SAE_A", ids)] == ids
    keys = lab.master.enc_keys("SAE_B", number=2)
    lab.b.faults.inject(parse_fault_option("short:count=1"))
    with pytest.raises(KmsBadAnswerError, match="do not match"):
        lab.slave.dec_keys("SAE_A", [k.key_id for k in keys])
    assert_key_flow_works(lab)


def test_repeated_key_id_is_a_bad_answer(lab: Lab) -> None:
    lab.admin(lab.a).inject("repeat_id", count=2)
    for number in (1, 3):
        with pytest.raises(KmsBadAnswerError, match="duplicate key_ID"):
            lab.master.enc_keys("SAE_B", number=number)
    assert_key_flow_works(lab)


def test_key_of_the_wrong_length_is_a_bad_answer(lab: Lab) -> None:
    lab.admin(lab.a).inject("wrong_size", endpoint="enc_keys", count=1)
    with pytest.raises(KmsBadAnswerError, match="has 2048 bits, asked for 256"):
        lab.master.enc_keys("SAE_B", size_bits=256)  # size read as bytes
    (key,) = lab.master.enc_keys("SAE_B", size_bits=256)
    lab.b.faults.inject(parse_fault_option("wrong_size:bits=128,count=1"))
    with pytest.raises(KmsBadAnswerError, match="has 128 bits, asked for 256"):
        lab.slave.dec_keys("SAE_A", [key.key_id], size_bits=256)
    assert_key_flow_works(lab)


def test_forgotten_key_id_is_a_bad_answer_400_for_good(lab: Lab) -> None:
    lost, kept = lab.master.enc_keys("SAE_B", number=2)
    lab.b.faults.inject(parse_fault_option("forget:count=1"))
    with pytest.raises(KmsBadAnswerError) as info:
        lab.slave.dec_keys("SAE_A", [lost.key_id])
    assert info.value.status == 400 and info.value.kme_message == "unknown key_ID"
    with pytest.raises(KmsBadAnswerError) as again:  # forgotten, not just refused once
        lab.slave.dec_keys("SAE_A", [lost.key_id])
    assert again.value.status == 400
    assert lab.slave.dec_keys("SAE_A", [kept.key_id]) == [kept]
    assert_key_flow_works(lab)


def test_connection_closed_after_enc_keys_is_unavailable_and_the_key_is_spent(lab: Lab) -> None:
    before = lab.master.status("SAE_B").stored_key_count
    waiting = lab.b.kme.waiting_key_count()
    lab.admin(lab.a).inject("close", endpoint="enc_keys", count=1)
    with pytest.raises(KmsUnavailableError):
        lab.master.enc_keys("SAE_B")
    assert lab.master.status("SAE_B").stored_key_count == before - 1
    assert lab.b.kme.waiting_key_count() == waiting + 1  # reported to the slave's KME, never used
    assert_key_flow_works(lab)


def test_dec_keys_lost_in_transit_is_unavailable_and_the_key_is_gone(lab: Lab) -> None:
    (key,) = lab.master.enc_keys("SAE_B")
    lab.b.faults.inject(parse_fault_option("close:endpoint=dec_keys"))
    with pytest.raises(KmsUnavailableError):
        lab.slave.dec_keys("SAE_A", [key.key_id])
    lab.b.faults.table.clear()
    with pytest.raises(KmsBadAnswerError) as info:  # one-shot: consumed before the socket closed
        lab.slave.dec_keys("SAE_A", [key.key_id])
    assert info.value.status == 400 and info.value.kme_message == "unknown key_ID"
    assert_key_flow_works(lab)


def test_kme_down_refuses_connections_then_comes_back_on_the_same_port(lab: Lab) -> None:
    port = lab.a.port
    assert lab.admin(lab.a).inject("down", seconds=1.0)["kind"] == "down"
    assert wait_for(lambda: status_fails(lab.master), timeout=2.0)
    with pytest.raises(KmsUnavailableError, match="Refused"):
        lab.master.status("SAE_B")
    with pytest.raises(KmsUnavailableError, match="503: peer KME unreachable"):
        lab.client(lab.b, "SAE_B").enc_keys("SAE_A")  # B cannot report to A
    assert wait_for(lambda: not status_fails(lab.master), timeout=5.0)
    assert lab.a.port == port
    assert_key_flow_works(lab)
    keys = lab.client(lab.b, "SAE_B").enc_keys("SAE_A")
    assert lab.client(lab.a, "SAE_A").dec_keys("SAE_B", [k.key_id for k in keys]) == keys


def test_kme_stopped_while_down_stays_down(lab: Lab) -> None:
    service = start_kme(lab.pki, "KME_A", saes=("SAE_A",), peer_saes=("SAE_B",), admins=("ADMIN",))
    client = lab.client(service, "SAE_A")
    try:
        service.faults.inject(parse_fault_option("down:seconds=0.3"))
        assert wait_for(lambda: status_fails(client), timeout=2.0)
    finally:
        service.stop()
    time.sleep(0.5)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", service.port)) != 0
