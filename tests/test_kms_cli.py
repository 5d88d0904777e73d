"""``qgate pki`` and ``qgate kms-sim`` commands: a real KME pair as two processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from qgate.cli.kms import kms_sim, pki
from qgate.errors import KmsBadAnswerError, KmsUnavailableError
from qgate.kms.client import Etsi014Client
from qgate.kms.faults import FaultAdminClient

RUN_KMS_SIM = "from qgate.cli.kms import kms_sim; kms_sim()"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_pki_command_writes_the_lab_pki(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    args = [
        "--out",
        str(out),
        "--kme",
        "KME_A=10.99.0.1",
        "--kme",
        "KME_B=10.99.0.2,fd00::2",
        "--sae",
        "SAE_A",
    ]
    result = CliRunner().invoke(pki, [*args, "--sae", "SAE_B"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"ca.pem", "KME_B.pem", "SAE_B.key", "link.secret"}
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    again = CliRunner().invoke(pki, [*args])
    assert again.exit_code == 1 and "overwrite" in again.output
    assert CliRunner().invoke(pki, [*args, "--force"]).exit_code == 0


def test_pki_command_shapes_a_deployment_no_san_client_ca_intermediate(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    args = ["--out", str(out), "--kme", "KME_A", "--kme", "KME_B", "--sae", "SAE_A", "--no-san", "KME_B"]
    result = CliRunner().invoke(pki, [*args, "--client-ca", "--intermediate"])
    assert result.exit_code == 0, result.output
    assert "no SAN: KME_B" in result.output and "client-ca.pem" in result.output
    no_san, with_san = (
        x509.load_pem_x509_certificates((out / f"{k}.pem").read_bytes()) for k in ("KME_B", "KME_A")
    )
    with pytest.raises(x509.ExtensionNotFound):  # what kms-sim --quirk no-san serves
        no_san[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert with_san[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert len(no_san) == 2  # leaf + intermediate
    assert {"client-ca.pem", "ca-bundle.pem", "intermediate.pem"} <= {p.name for p in out.iterdir()}
    sae_issuer = x509.load_pem_x509_certificates((out / "SAE_A.pem").read_bytes())[0].issuer
    assert sae_issuer.rfc4514_string() == "CN=qgate lab client intermediate CA"
    wrong = CliRunner().invoke(
        pki, ["--out", str(tmp_path / "x"), "--kme", "KME_A", "--sae", "SAE_A", "--no-san", "SAE_A"]
    )
    assert wrong.exit_code == 2 and "SAE_A is no --kme" in wrong.output
    assert "--no-san KME_ID" in CliRunner().invoke(pki, ["--help"]).output


def test_pki_command_rejects_bad_address(tmp_path: Path) -> None:
    result = CliRunner().invoke(pki, ["--out", str(tmp_path), "--kme", "KME_A=300.1.1.1", "--sae", "SAE_A"])
    assert result.exit_code == 1 and "invalid IP address" in result.output


def test_kms_sim_command_rejects_bad_listen_address(tmp_path: Path) -> None:
    CliRunner().invoke(pki, ["--out", str(tmp_path), "--kme", "KME_A", "--sae", "SAE_A"])
    args = ["--kme-id", "KME_A", "--peer-kme-id", "KME_B", "--sae", "SAE_A", "--listen", "nowhere"]
    files = [
        "--ca",
        "ca.pem",
        "--cert",
        "KME_A.pem",
        "--key",
        "KME_A.key",
        "--link-secret-file",
        "link.secret",
    ]
    result = CliRunner().invoke(kms_sim, [*args, *[str(tmp_path / f) if "." in f else f for f in files]])
    assert result.exit_code == 2 and "IP:PORT" in result.output


def kms_sim_args(pki_dir: Path, *extra: str, kme_id: str = "KME_A", cert: str = "KME_A") -> list[str]:
    return [
        *("--kme-id", kme_id, "--peer-kme-id", "KME_B", "--sae", "SAE_A", "--listen", "127.0.0.1:0"),
        *("--ca", str(pki_dir / "ca.pem"), "--cert", str(pki_dir / f"{cert}.pem")),
        *("--key", str(pki_dir / f"{cert}.key"), "--link-secret-file", str(pki_dir / "link.secret")),
        *extra,
    ]


def test_kms_sim_command_explains_bad_settings_in_words(tmp_path: Path) -> None:
    made = CliRunner().invoke(
        pki, ["--out", str(tmp_path), "--kme", "KME_A", "--kme", "KME_B", "--sae", "SAE_A"]
    )
    assert made.exit_code == 0, made.output
    cases = [
        (kms_sim_args(tmp_path, cert="KME_B"), "certificate CN is KME_B, but --kme-id is KME_A"),
        (
            [*kms_sim_args(tmp_path)[:-8], "--ca", str(tmp_path / "KME_B.pem"), *kms_sim_args(tmp_path)[-6:]],
            "not a CA",
        ),
        (
            kms_sim_args(tmp_path, "--burst-period", "1", "--burst-duration", "5"),
            "burst duration (5.0 s) must be between 0 and the burst period (1.0 s)",
        ),
        (
            kms_sim_args(tmp_path, "--burst-bits", "1000"),
            "burst bits must be >= 0 and need a burst period > 0",
        ),
    ]
    for args, message in cases:
        result = CliRunner().invoke(kms_sim, args)
        assert result.exit_code == 1 and message in result.output, result.output
    usage_errors = [
        (kms_sim_args(tmp_path, "--fault", "explode"), "fault kind must be one of"),
        (kms_sim_args(tmp_path, "--fault", "error:code=200"), "code must be an integer in 400..599"),
        (
            kms_sim_args(tmp_path, "--rate", "10", "--burst-bits", "9", "--burst-period", "1"),
            "with --burst-bits give only --burst-period",
        ),
    ]
    for args, message in usage_errors:
        result = CliRunner().invoke(kms_sim, args)
        assert result.exit_code == 2 and message in result.output, result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = [a if a != "127.0.0.1:0" else f"127.0.0.1:{port}" for a in kms_sim_args(tmp_path)]
        result = CliRunner().invoke(kms_sim, args)
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output


class Proc:
    def __init__(self, argv: list[str]) -> None:
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    def stop(self) -> tuple[int, str, str]:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            out, err = self.popen.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, err = self.popen.communicate()
        return self.popen.returncode, out.decode(), err.decode()


@pytest.fixture
def kme_pair(tmp_path: Path) -> Iterator[tuple[Path, dict[str, int], list[Proc]]]:
    pki_dir = tmp_path / "pki"
    result = CliRunner().invoke(
        pki, ["--out", str(pki_dir), "--kme", "KME_A", "--kme", "KME_B", "--sae", "SAE_A", "--sae", "SAE_B"]
    )
    assert result.exit_code == 0, result.output
    ports = {"KME_A": free_port(), "KME_B": free_port()}
    procs: list[Proc] = []
    try:
        for me, peer, sae, peer_sae in (
            ("KME_A", "KME_B", "SAE_A", "SAE_B"),
            ("KME_B", "KME_A", "SAE_B", "SAE_A"),
        ):
            argv = [sys.executable, "-c", RUN_KMS_SIM, "--kme-id", me, "--listen", f"127.0.0.1:{ports[me]}"]
            argv += ["--ca", str(pki_dir / "ca.pem"), "--cert", str(pki_dir / f"{me}.pem")]
            argv += ["--key", str(pki_dir / f"{me}.key"), "--peer-kme-id", peer]
            argv += ["--peer-url", f"https://127.0.0.1:{ports[peer]}", "--sae", sae, "--peer-sae", peer_sae]
            argv += ["--link-secret-file", str(pki_dir / "link.secret"), "--rate", "256000"]
            argv += ["--max-key-count", "100", "--log-level", "debug"]
            procs.append(Proc(argv))
        yield pki_dir, ports, procs
    finally:
        for proc in procs:
            proc.stop()


def client(pki_dir: Path, port: int, sae: str) -> Etsi014Client:
    return Etsi014Client(
        f"https://127.0.0.1:{port}",
        ca=pki_dir / "ca.pem",
        cert=pki_dir / f"{sae}.pem",
        key=pki_dir / f"{sae}.key",
        timeout=5,
    )


def wait_until_up(kme: Etsi014Client, slave: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            kme.status(slave)
            return
        except KmsUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_kms_sim_processes_serve_a_key_pair_and_stop_on_sigterm(
    kme_pair: tuple[Path, dict[str, int], list[Proc]],
) -> None:
    pki_dir, ports, procs = kme_pair
    master, slave = client(pki_dir, ports["KME_A"], "SAE_A"), client(pki_dir, ports["KME_B"], "SAE_B")
    wait_until_up(master, "SAE_B")
    wait_until_up(slave, "SAE_A")
    time.sleep(0.2)  # 256000 bits/s: 200 keys/s, capped at max_key_count 100
    assert 0 < master.status("SAE_B").stored_key_count <= 100
    keys = master.enc_keys("SAE_B", number=4, size_bits=256)
    assert slave.dec_keys("SAE_A", [k.key_id for k in keys]) == keys
    secret = (pki_dir / "link.secret").read_bytes()
    for proc in procs:
        code, out, err = proc.stop()
        assert code == 0, err
        assert out == ""  # nothing on stdout
        assert "listening on 127.0.0.1" in err and "stopped" in err
        assert secret.hex() not in err
        for key in keys:
            assert key.key.reveal().hex() not in err


def test_kms_sim_help_documents_rates_faults_and_the_admin_api() -> None:
    result = CliRunner().invoke(kms_sim, ["--help"])
    assert result.exit_code == 0
    for text in (
        "--burst-bits",
        "--fault",
        "--admin",
        "wrong_size",
        "down:seconds=T",
        "/kme/v1/admin/faults",
    ):
        assert text in result.output


def test_kms_sim_process_starts_with_faults_and_takes_new_ones_from_the_admin(tmp_path: Path) -> None:
    made = CliRunner().invoke(
        pki, ["--out", str(tmp_path), "--kme", "KME_A", "--kme", "KME_B", "--sae", "SAE_A", "--sae", "ADMIN"]
    )
    assert made.exit_code == 0, made.output
    port = free_port()
    args = [a if a != "127.0.0.1:0" else f"127.0.0.1:{port}" for a in kms_sim_args(tmp_path)]
    args += ["--peer-sae", "SAE_B", "--initial-key-count", "5", "--rate", "0", "--admin", "ADMIN"]
    args += ["--fault", "error:code=422,body=html,endpoint=status,count=1"]
    proc = Proc([sys.executable, "-c", RUN_KMS_SIM, *args])
    try:
        deadline = time.monotonic() + 15
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and proc.popen.poll() is None
            time.sleep(0.05)
        master = client(tmp_path, port, "SAE_A")
        with pytest.raises(KmsBadAnswerError) as info:
            master.status("SAE_B")
        assert info.value.status == 422
        assert master.status("SAE_B").stored_key_count == 5
        admin = FaultAdminClient(
            f"https://127.0.0.1:{port}",
            ca=tmp_path / "ca.pem",
            cert=tmp_path / "ADMIN.pem",
            key=tmp_path / "ADMIN.key",
        )
        assert admin.faults() == []
        admin.inject("error", code=503, endpoint="status")
        with pytest.raises(KmsUnavailableError):
            master.status("SAE_B")
        assert admin.clear() == 1
        assert master.status("SAE_B").stored_key_count == 5
    finally:
        code, _out, err = proc.stop()
    assert code == 0, err
    assert "admins ['ADMIN']" in err and "fault 1 on: error(code=422, body=html) on status" in err
