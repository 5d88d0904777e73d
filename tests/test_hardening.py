"""`qgate up` hardening: no core dumps or same-uid ptrace from the start; secrets others can read refused.

The ``qgate up`` runs here stop before any network set-up (the policy or a key file is refused), so
they need neither root nor namespaces.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qgate import lab_setup as setup
from qgate.errors import ConfigError
from qgate.gateway import Gateway
from qgate.policy import load_policy

UP_TIMEOUT = 60.0


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The lab's site-a policy with its PKI and identities (private keys 0600) in ``tmp_path``."""
    setup.make_pki_and_identities(tmp_path)
    return setup.write_policies(tmp_path)["a"]


def qgate_up(policy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qgate", "up", str(policy), "--socket", str(policy.parent / "ctl.sock")],
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT,
        check=False,
    )


def with_ppk(policy: Path, ppk: Path) -> Path:
    """Append a ``ppk`` section to the single peer of ``policy`` (in place)."""
    text = policy.read_text().replace("peers:\n- ", f"peers:\n- ppk: {{file: {ppk}, id: ppk-1}}\n  ", 1)
    policy.write_text(text)
    assert load_policy(policy).peers[0].ppk is not None
    return policy


# ----- secret files: refuse ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("relative", "where", "mode"),
    [("keys/site-a.key", "gateway.identity", 0o644), ("pki/SAE_A.key", "kme.key", 0o640)],
)
def test_qgate_up_refuses_a_secret_key_others_can_read_with_field_mode_and_fix(
    site: Path, relative: str, where: str, mode: int
) -> None:
    key = site.parent / relative
    key.chmod(mode)
    result = qgate_up(site)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [row for row in result.stderr.splitlines() if row.startswith("qgate: error:")]
    assert "refusing to start" in line and f"{key} ({where})" in line
    assert f"mode {mode:04o}" in line and line.endswith(f"chmod 600 {key}")


def test_every_unsafe_secret_is_named_at_once_and_a_world_writable_one_too(site: Path) -> None:
    identity, sae_key = site.parent / "keys" / "site-a.key", site.parent / "pki" / "SAE_A.key"
    identity.chmod(0o602)
    sae_key.chmod(0o604)
    with pytest.raises(ConfigError) as info:
        Gateway(load_policy(site), control_socket=site.parent / "ctl.sock")
    message = str(info.value)
    assert "(gateway.identity)" in message and "mode 0602" in message and f"chmod 600 {identity}" in message
    assert "(kme.key)" in message and "mode 0604" in message and f"chmod 600 {sae_key}" in message


def test_a_ppk_others_can_read_is_refused_like_a_key(site: Path) -> None:
    ppk = site.parent / "keys" / "ppk.bin"
    ppk.write_bytes(bytes(range(32)))
    ppk.chmod(0o644)
    with pytest.raises(ConfigError, match=r"\(peers\[0\]\.ppk\.file\) is readable or usable by group/others"):
        Gateway(load_policy(with_ppk(site, ppk)), control_socket=site.parent / "ctl.sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_secret_owned_by_another_user_is_refused_as_qgate_check_reports_it(site: Path) -> None:
    identity = site.parent / "keys" / "site-a.key"
    os.chown(identity, 54321, 54321)  # mode 0600, but that user can read and replace it
    with pytest.raises(ConfigError) as info:
        Gateway(load_policy(site), control_socket=site.parent / "ctl.sock")
    message = str(info.value)
    assert f"{identity} (gateway.identity) is owned by uid 54321" in message and "chown" in message


# ----- files others could replace: warn only ----------------------------------------------------
def test_private_keys_0600_start_and_a_writable_certificate_only_warns(
    site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert = site.parent / "pki" / "SAE_A.pem"
    cert.chmod(0o666)
    with caplog.at_level(logging.WARNING, logger="qgate.gateway"):
        gateway = Gateway(load_policy(site), control_socket=site.parent / "ctl.sock")
    assert gateway.policy.name == "site-a"
    assert f"{cert}: writable by group/others (mode 0666)" in caplog.text


# ----- no core dumps, no ptrace by the same uid ---------------------------------------------------
_PROBE = """
import ctypes, json, resource, sys
import qgate.policy
from qgate.cli import main
from qgate.errors import PolicyError

def load_policy(path):
    libc = ctypes.CDLL(None, use_errno=True)
    seen = {"core": resource.getrlimit(resource.RLIMIT_CORE), "dumpable": libc.prctl(3, 0, 0, 0, 0)}
    print(json.dumps(seen), flush=True)
    raise PolicyError("stop here", file=path)

qgate.policy.load_policy = load_policy
main(["up", sys.argv[1]])
"""


def test_qgate_up_disables_core_dumps_and_dumpable_before_reading_the_policy(tmp_path: Path) -> None:
    # The probe replaces load_policy, the first thing that reads a file named by the operator:
    # what it sees is the process state before any key is loaded.
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "policy.yaml")],
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT,
        check=False,
    )
    assert result.returncode == 1 and "stop here" in result.stderr, result.stderr
    assert json.loads(result.stdout) == {"core": [0, 0], "dumpable": 0}


def test_qgate_up_running_process_shows_a_zero_core_limit_in_proc(tmp_path: Path) -> None:
    # Seen from outside: /proc/<pid>/limits of a `qgate up` parked before it reads the policy.
    fifo = tmp_path / "policy.yaml"
    subprocess.run(["mkfifo", str(fifo)], check=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qgate", "up", str(fifo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        with fifo.open("w") as writer:  # opens once qgate up opens the policy for reading
            limits = Path(f"/proc/{proc.pid}/limits").read_text()
            writer.write("{}\n")
        (core,) = [row.split() for row in limits.splitlines() if row.startswith("Max core file size")]
        assert core[4:6] == ["0", "0"], limits
    finally:
        proc.communicate(timeout=UP_TIMEOUT)
    assert proc.returncode == 1
