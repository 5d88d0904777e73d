"""`qgate check` and the start of `qgate up`: unusable files named by a policy are reported with its
file, line and field, all at once; warnings are listed but do not fail the check.

Certificates come from the local generator in ``test_certs.py``; the KME server certificate checks
run against a real TLS server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from test_certs import CLIENT_AUTH, DAY, SERVER_AUTH, Issued, issue, key_usage, sae

from qgate import lab_setup as setup
from qgate.certs import sha256_fingerprint
from qgate.checks import CheckFailed, check_kme_credentials, check_policy_file
from qgate.cli.gateway import check, up
from qgate.errors import PolicyError
from qgate.pki import make_pki
from qgate.policy import load_policy


@pytest.fixture
def site(tmp_path: Path) -> Path:
    setup.make_pki_and_identities(tmp_path)
    return setup.write_policies(tmp_path)["a"]


Serve = Callable[..., list[bool]]
"""``served(chain, **kme_fields)``: serve ``chain`` and point the policy at it; the handshakes seen."""


@pytest.fixture
def server_ca() -> Issued:
    """The CA of the KME's server certificate (``kme.ca``)."""
    return issue("KME server CA", ca=True)


def _problems(policy: Path, **options: object) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PolicyError) as info:
        check_policy_file(policy, **options)
    assert str(policy) in str(info.value)
    return info.value.problems


def _install(site: Path, *, ca: list[Issued], chain: list[Issued], key: Issued | None = None) -> None:
    """Write ``kme.ca`` (a bundle), ``kme.cert`` (leaf first) and ``kme.key`` of the site policy."""
    pki = site.parent / "pki"
    (pki / "ca.pem").write_bytes(b"".join(c.pem() for c in ca))
    (pki / "SAE_A.pem").write_bytes(b"".join(c.pem() for c in chain))
    (pki / "SAE_A.key").write_bytes((key or chain[0]).key_pem())
    (pki / "SAE_A.key").chmod(0o600)


def _set_kme(site: Path, **values: str) -> None:
    """Set ``kme.<name>`` fields in the policy file (new keys go after ``kme.timeout``)."""
    doc = yaml.safe_load(site.read_text())
    doc["kme"].update(values)
    site.write_text(yaml.safe_dump(doc, sort_keys=False))


# ----- the lab layout and the checks that were already there -------------------------------------


def test_lab_policy_with_its_files_passes_without_warnings(site: Path) -> None:
    summary = check_policy_file(site)
    assert any("pinned key" in item for item in summary.items)
    assert any("SAE certificate" in item and "verified against kme.ca" in item for item in summary.items)
    assert summary.warnings == []


def test_missing_files_are_all_reported_with_line_and_field(site: Path) -> None:
    (site.parent / "keys" / "site-a.key").unlink()
    (site.parent / "keys" / "site-b.pub").unlink()
    problems = _problems(site)
    fields = {path for _, path, _ in problems}
    assert {"gateway.identity", "peers[0].public_key"} <= fields
    assert all(line is not None for line, _, _ in problems)


def test_sae_key_that_does_not_match_the_certificate_is_reported(site: Path) -> None:
    shutil.copy(site.parent / "pki" / "SAE_B.key", site.parent / "pki" / "SAE_A.key")
    problems = _problems(site)
    assert [path for _, path, _ in problems] == ["kme.key"]
    assert "does not belong to the certificate" in problems[0][2]


def test_unreadable_sae_key_is_reported(site: Path) -> None:
    (site.parent / "pki" / "SAE_A.key").write_text("not a key\n")
    problems = _problems(site)
    assert [(path, "not an unencrypted PEM private key" in m) for _, path, m in problems] == [
        ("kme.key", True)
    ]


def test_pinning_the_gateways_own_key_as_the_peer_key_is_reported(site: Path) -> None:
    shutil.copy(site.parent / "keys" / "site-a.pub", site.parent / "keys" / "site-b.pub")
    problems = _problems(site)
    assert [path for _, path, _ in problems] == ["peers[0].public_key"]
    assert "own identity key" in problems[0][2]


def test_private_keys_readable_by_others_are_reported(site: Path) -> None:
    (site.parent / "pki" / "SAE_A.key").chmod(0o644)
    problems = _problems(site)
    assert [path for _, path, _ in problems] == ["kme.key"]


# ----- who issued the SAE certificate -------------------------------------------------------------


def test_sae_certificate_from_a_ca_we_do_not_hold_is_a_warning_naming_kme_client_ca(
    site: Path, tmp_path: Path
) -> None:
    make_pki(tmp_path / "rogue", kmes={"KME_X": []}, saes=["SAE_A"])
    for suffix in (".pem", ".key"):
        shutil.copy(tmp_path / "rogue" / f"SAE_A{suffix}", site.parent / "pki" / f"SAE_A{suffix}")
    summary = check_policy_file(site)
    (warning,) = summary.warnings
    assert warning.startswith(f"{site}:12: kme.cert: ")  # line 12: `cert: pki/SAE_A.pem`
    assert "cannot be verified locally" in warning and "set kme.client_ca" in warning


def test_sae_certificate_from_a_separate_client_ca_passes_when_kme_client_ca_names_it(
    site: Path, server_ca: Issued
) -> None:
    client_ca = issue("SAE client CA", ca=True)
    _install(site, ca=[server_ca], chain=[sae(client_ca)])
    (site.parent / "pki" / "client-ca.pem").write_bytes(client_ca.pem())
    _set_kme(site, client_ca="pki/client-ca.pem")
    summary = check_policy_file(site)
    assert summary.warnings == []
    assert any("verified against kme.client_ca" in item for item in summary.items)


def test_kme_client_ca_that_did_not_issue_the_sae_certificate_is_an_error(
    site: Path, server_ca: Issued
) -> None:
    _install(site, ca=[server_ca], chain=[sae(server_ca)])
    (site.parent / "pki" / "client-ca.pem").write_bytes(issue("another client CA", ca=True).pem())
    _set_kme(site, client_ca="pki/client-ca.pem")
    (problem,) = _problems(site)
    assert problem[1] == "kme.cert" and "is not a CA in kme.client_ca" in problem[2]


def test_sae_certificate_file_with_leaf_then_intermediate_passes(site: Path) -> None:
    root = issue("root CA", ca=True)
    intermediate = issue("SAE intermediate CA", root, ca=True)
    _install(site, ca=[root], chain=[sae(intermediate), intermediate])
    summary = check_policy_file(site)
    assert summary.warnings == []
    assert any("1 intermediate(s)" in item and "verified against kme.ca" in item for item in summary.items)


def test_sae_certificate_file_with_intermediate_first_is_reported(site: Path) -> None:
    root = issue("root CA", ca=True)
    intermediate = issue("SAE intermediate CA", root, ca=True)
    leaf = sae(intermediate)
    _install(site, ca=[root], chain=[intermediate, leaf], key=leaf)
    messages = [m for _, path, m in _problems(site) if path == "kme.cert"]
    assert any("list the leaf first" in m for m in messages)


def test_ca_bundle_with_two_cas_anchors_a_certificate_from_either(site: Path) -> None:
    first, second = issue("first CA", ca=True), issue("second CA", ca=True)
    _install(site, ca=[first, second], chain=[sae(second)])
    summary = check_policy_file(site)
    assert summary.warnings == []
    assert any("CN=first CA, CN=second CA" in item for item in summary.items)


def test_ca_bundle_holding_a_non_ca_certificate_is_reported(site: Path, server_ca: Issued) -> None:
    _install(site, ca=[server_ca, issue("just a leaf")], chain=[sae(server_ca)])
    (problem,) = _problems(site)
    assert problem[1] == "kme.ca" and "CA 2 of 2 (CN=just a leaf): not a CA certificate" in problem[2]


# ----- dates and usages ---------------------------------------------------------------------------


def test_expired_sae_certificate_is_an_error_naming_the_dates(site: Path, server_ca: Issued) -> None:
    _install(site, ca=[server_ca], chain=[sae(server_ca, start=-60 * DAY, lifetime=30 * DAY)])
    (problem,) = _problems(site)
    assert problem[:2] == (12, "kme.cert")
    assert "SAE certificate (CN=SAE_A): expired on" in problem[2] and "(valid from " in problem[2]


def test_not_yet_valid_sae_certificate_is_an_error(site: Path, server_ca: Issued) -> None:
    _install(site, ca=[server_ca], chain=[sae(server_ca, start=2 * DAY)])
    (problem,) = _problems(site)
    assert problem[1] == "kme.cert" and "not valid yet: valid from" in problem[2]


def test_sae_certificate_expiring_in_10_days_is_a_warning(site: Path, server_ca: Issued) -> None:
    _install(site, ca=[server_ca], chain=[sae(server_ca, start=-DAY, lifetime=11 * DAY)])
    (warning,) = check_policy_file(site).warnings
    assert f"{site}:12: kme.cert: " in warning and "SAE certificate (CN=SAE_A): expires in 10 days" in warning
    assert check_policy_file(site, warn_days=5).warnings == []


def test_expired_ca_is_an_error(site: Path) -> None:
    old_ca = issue("old CA", ca=True, start=-400 * DAY, lifetime=365 * DAY)
    _install(site, ca=[old_ca], chain=[sae(old_ca, start=-300 * DAY)])
    (problem,) = _problems(site)
    assert problem[1] == "kme.ca" and "CA (CN=old CA): expired on" in problem[2]


def test_key_usage_without_digital_signature_is_reported(site: Path, server_ca: Issued) -> None:
    _install(site, ca=[server_ca], chain=[sae(server_ca, usage=key_usage("key_encipherment"))])
    (problem,) = _problems(site)
    assert problem[1] == "kme.cert" and "keyUsage does not allow digitalSignature" in problem[2]


def test_extended_key_usage_with_server_auth_only_is_reported(site: Path, server_ca: Issued) -> None:
    _install(site, ca=[server_ca], chain=[sae(server_ca, eku=[SERVER_AUTH])])
    (problem,) = _problems(site)
    assert problem[1] == "kme.cert" and "does not include clientAuth" in problem[2]


def test_every_kme_file_problem_is_reported_in_one_run(site: Path, server_ca: Issued) -> None:
    expiring_ca = issue("KME server CA 2", ca=True, start=-DAY, lifetime=20 * DAY)
    leaf = sae(server_ca, cn="SAE_X", start=-60 * DAY, lifetime=30 * DAY, eku=[SERVER_AUTH])
    _install(site, ca=[server_ca, issue("not a CA"), expiring_ca], chain=[leaf], key=issue("other"))
    with pytest.raises(CheckFailed) as info:
        check_policy_file(site)
    problems = info.value.problems
    assert [(line, where) for line, where, _ in problems] == [
        (11, "kme.ca"),
        (12, "kme.cert"),
        (12, "kme.cert"),
        (12, "kme.cert"),
        (13, "kme.key"),
    ]
    text = str(info.value)
    for fragment in ("CA 2 of 3 (CN=not a CA): not a CA", "expired on", "does not include clientAuth"):
        assert fragment in text
    assert "subject CN 'SAE_X' is not kme.sae_id 'SAE_A'" in text and "does not belong" in text
    (warning,) = info.value.warnings
    assert warning.startswith(f"{site}:11: kme.ca: ") and "CA 3 of 3" in warning and "expires in" in warning


# ----- the CLI and qgate up -----------------------------------------------------------------------


def test_check_prints_warnings_on_stderr_and_in_json_and_exits_zero(site: Path, server_ca: Issued) -> None:
    _install(site, ca=[server_ca], chain=[sae(server_ca, start=-DAY, lifetime=11 * DAY)])
    text = CliRunner().invoke(check, [str(site), "--no-connect"])
    assert text.exit_code == 0, text.output
    (warning,) = [line for line in text.stderr.splitlines() if line.startswith("warning: ")]
    assert warning.startswith(f"warning: {site}:12: kme.cert: ") and "expires in 10 days" in warning
    assert "warning: " not in text.stdout and "policy is valid" in text.stdout
    result = CliRunner().invoke(check, [str(site), "--no-connect", "--json", "--warn-days", "30"])
    answer = json.loads(result.stdout)
    assert answer["ok"] is True and len(answer["warnings"]) == 1 and "expires in" in answer["warnings"][0]
    assert (
        CliRunner().invoke(check, [str(site), "--no-connect", "--warn-days", "5"]).stderr.count("warning")
        == 0
    )


def test_check_json_failure_lists_the_error_and_the_warnings(site: Path, server_ca: Issued) -> None:
    expiring = sae(server_ca, start=-DAY, lifetime=11 * DAY)
    _install(site, ca=[server_ca], chain=[expiring], key=issue("other"))
    result = CliRunner().invoke(check, [str(site), "--no-connect", "--json"])
    assert result.exit_code == 1
    answer = json.loads(result.stdout)
    assert answer["ok"] is False and "kme.key" in answer["error"] and len(answer["warnings"]) == 1
    assert "warning: " in result.stderr and "qgate: error: " in result.stderr


@pytest.fixture
def no_gateway(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """``qgate up`` in this process without hardening it or starting a gateway: the calls made."""
    started: list[object] = []
    monkeypatch.setattr("qgate.privileges.harden_process", lambda: None)
    monkeypatch.setattr("qgate.gateway.run_gateway", lambda policy, **_: started.append(policy))
    return started


def test_up_refuses_an_expired_sae_certificate_with_the_check_message(
    site: Path, server_ca: Issued, no_gateway: list[object]
) -> None:
    _install(site, ca=[server_ca], chain=[sae(server_ca, start=-60 * DAY, lifetime=30 * DAY)])
    result = CliRunner().invoke(up, [str(site)])
    assert result.exit_code == 1 and no_gateway == []
    assert f"qgate: error: {site}:12: kme.cert: " in result.stderr and "expired on" in result.stderr


def test_up_refuses_a_key_that_does_not_match(site: Path, no_gateway: list[object]) -> None:
    shutil.copy(site.parent / "pki" / "SAE_B.key", site.parent / "pki" / "SAE_A.key")
    result = CliRunner().invoke(up, [str(site)])
    assert result.exit_code == 1 and no_gateway == [] and "kme.key" in result.stderr


def test_up_logs_a_certificate_expiring_soon_and_starts(
    site: Path, server_ca: Issued, no_gateway: list[object], caplog: pytest.LogCaptureFixture
) -> None:
    _install(site, ca=[server_ca], chain=[sae(server_ca, start=-DAY, lifetime=11 * DAY)])
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(up, [str(site)])
    assert result.exit_code == 0, result.output
    assert len(no_gateway) == 1
    assert [r.getMessage() for r in caplog.records if "expires in" in r.getMessage()] != []


def test_start_checks_need_no_network_and_return_the_warnings(site: Path) -> None:
    policy = load_policy(site)
    policy = dataclasses.replace(policy, kme=dataclasses.replace(policy.kme, url="https://192.0.2.1:1"))
    assert check_kme_credentials(policy) == []


# ----- the KME server certificate, fetched from a real TLS server on loopback ------------------------


@contextlib.contextmanager
def _tls_server(
    tmp_path: Path, chain: list[Issued], client_ca: Path, handshakes: list[bool], ciphers: str | None = None
) -> Iterator[int]:
    """Serve TLS handshakes with ``chain`` (leaf first) on 127.0.0.1, asking for a client certificate.

    ``ciphers``: serve only TLS 1.2 with these suites (a KME with CBC-SHA suites only).
    """
    (tmp_path / "server.pem").write_bytes(b"".join(c.pem() for c in chain))
    (tmp_path / "server.key").write_bytes(chain[0].key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    context.load_verify_locations(cafile=client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    if ciphers is not None:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers + ":@SECLEVEL=1")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # closing a socket does not wake a thread blocked in accept()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    handshakes.append(bool(tls.getpeercert()))
                    tls.recv(1)  # until the client closes: no HTTP request ever comes
            except OSError:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture
def served(site: Path, tmp_path: Path, server_ca: Issued) -> Iterator[Serve]:
    """Start a TLS server with a given chain and point the site policy's kme.url (plus fields) at it."""
    _install(site, ca=[server_ca], chain=[sae(server_ca)])
    handshakes: list[bool] = []
    with contextlib.ExitStack() as stack:

        def serve(chain: list[Issued], ciphers: str | None = None, **kme: str) -> list[bool]:
            port = stack.enter_context(
                _tls_server(tmp_path, chain, site.parent / "pki" / "ca.pem", handshakes, ciphers)
            )
            _set_kme(site, url=f"https://127.0.0.1:{port}", **kme)
            return handshakes

        yield serve


def _handshakes(seen: list[bool]) -> list[bool]:
    """Wait (up to 5 s) for the server thread to record the handshake the check made."""
    for _ in range(100):
        if seen:
            break
        time.sleep(0.05)
    return seen


def _kme_cert(ca: Issued, **kwargs: object) -> Issued:
    options: dict[str, object] = {"eku": [SERVER_AUTH, CLIENT_AUTH], "sans": [LOOPBACK]}
    options.update(kwargs)
    return issue("KME_A", ca, **options)


LOOPBACK = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))


def test_kme_server_certificate_with_a_matching_ip_san_passes(
    site: Path, served: Serve, server_ca: Issued
) -> None:
    handshakes = served([_kme_cert(server_ca)])
    summary = check_policy_file(site, connect=True)
    assert summary.warnings == []
    assert any("KME server certificate" in i and "SAN matches 127.0.0.1" in i for i in summary.items)
    assert _handshakes(handshakes) == [True]  # the SAE certificate was presented


def test_kme_server_certificate_without_san_and_without_pin_is_an_error(
    site: Path, served: Serve, server_ca: Issued
) -> None:
    served([_kme_cert(server_ca, sans=None)])
    (problem,) = _problems(site, connect=True)
    assert problem[:2] == (9, "kme.url")
    assert problem[2].endswith(
        "no SAN matches 127.0.0.1 (no subjectAltName): hostname verification can never succeed;"
        " pin it with kme.server_cn or kme.server_sha256"
    )


def test_kme_server_certificate_whose_sans_name_another_host_is_an_error(
    site: Path, served: Serve, server_ca: Issued
) -> None:
    served([_kme_cert(server_ca, sans=[x509.DNSName("kme.example")])])
    (problem,) = _problems(site, connect=True)
    assert "no SAN matches 127.0.0.1 (it has DNS:kme.example)" in problem[2]


def test_kme_server_certificate_without_san_pinned_by_server_cn_passes(
    site: Path, served: Serve, server_ca: Issued
) -> None:
    served([_kme_cert(server_ca, sans=None)], server_cn="KME_A")
    summary = check_policy_file(site, connect=True)
    assert any("pinned by CN" in item for item in summary.items)


def test_wrong_server_cn_pin_is_an_error_showing_both_names(
    site: Path, served: Serve, server_ca: Issued
) -> None:
    served([_kme_cert(server_ca, sans=None)], server_cn="KME_B")
    (problem,) = _problems(site, connect=True)
    assert problem[1] == "kme.server_cn" and "CN is 'KME_A', expected kme.server_cn 'KME_B'" in problem[2]


def test_wrong_server_sha256_pin_is_an_error_showing_seen_and_expected(
    site: Path, served: Serve, server_ca: Issued
) -> None:
    server = _kme_cert(server_ca, sans=None)
    wrong = "ab" * 32
    served([server], server_sha256=wrong)
    (problem,) = _problems(site, connect=True)
    assert problem[1] == "kme.server_sha256" and problem[0] is not None  # the line of the pin
    assert f"SHA-256 is {sha256_fingerprint(server.cert)}, expected kme.server_sha256 {wrong}" in problem[2]


CBC_ONLY = "ECDHE-ECDSA-AES256-SHA"


def test_kme_offering_only_cbc_suites_is_an_error_naming_the_cause_with_the_default_ciphers(
    site: Path, served: Serve, server_ca: Issued
) -> None:
    served([_kme_cert(server_ca)], ciphers=CBC_ONLY)
    (problem,) = _problems(site, connect=True)
    assert problem[1] == "kme.url" and "TLS handshake with" in problem[2] and "kme probe" in problem[2]


def test_the_look_at_the_kme_uses_the_policys_ciphers_so_a_wrong_pin_is_still_found(
    site: Path, served: Serve, server_ca: Issued
) -> None:
    served([_kme_cert(server_ca, sans=None)], ciphers=CBC_ONLY, tls_ciphers=f"ECDHE+AESGCM:{CBC_ONLY}",
           server_sha256="ab" * 32)  # fmt: skip
    (problem,) = _problems(site, connect=True)
    assert problem[1] == "kme.server_sha256" and "expected kme.server_sha256" in problem[2]


def test_right_server_sha256_pin_in_colon_form_passes(site: Path, served: Serve, server_ca: Issued) -> None:
    server = _kme_cert(server_ca, sans=None)
    hexdigits = sha256_fingerprint(server.cert).upper()
    served([server], server_sha256=":".join(hexdigits[i : i + 2] for i in range(0, 64, 2)))
    assert any("pinned by SHA-256" in item for item in check_policy_file(site, connect=True).items)


def test_kme_server_certificate_from_another_ca_is_an_error_at_kme_ca(site: Path, served: Serve) -> None:
    served([_kme_cert(issue("someone else's CA", ca=True))])
    (problem,) = _problems(site, connect=True)
    assert problem[1] == "kme.ca" and "is not a CA in kme.ca" in problem[2]


def test_kme_server_sending_its_intermediate_verifies_against_the_root(
    site: Path, served: Serve, server_ca: Issued
) -> None:
    intermediate = issue("KME intermediate CA", server_ca, ca=True)
    served([_kme_cert(intermediate), intermediate])
    assert check_policy_file(site, connect=True).warnings == []


def test_expired_kme_server_certificate_is_an_error(site: Path, served: Serve, server_ca: Issued) -> None:
    served([_kme_cert(server_ca, start=-60 * DAY, lifetime=30 * DAY)])
    (problem,) = _problems(site, connect=True)
    assert problem[1] == "kme.url" and "KME server certificate" in problem[2] and "expired on" in problem[2]


def test_unreachable_kme_is_a_warning_not_an_error(site: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = int(probe.getsockname()[1])  # closed again: nothing listens there
    _set_kme(site, url=f"https://127.0.0.1:{port}")
    (warning,) = check_policy_file(site, connect=True).warnings
    assert f"{site}:9: kme.url: cannot fetch the KME server certificate" in warning
    result = CliRunner().invoke(check, [str(site)])  # connects by default
    assert result.exit_code == 0 and "warning: " in result.stderr and "cannot fetch" in result.stderr
    assert "cannot fetch" not in CliRunner().invoke(check, [str(site), "--no-connect"]).stderr
