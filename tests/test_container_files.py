"""The container image, compose lab and systemd unit files, checked without a container engine.

No image is built and no compose project started here: the Containerfile and compose.yaml are parsed
and cross-checked (stages, pins, user, entrypoint, services, networks, addresses against the policies
the lab's init script writes), the entrypoint and lab-init scripts really run on this machine (dry-run
mode prints the command the entrypoint would exec), and the systemd files go through
``systemd-analyze verify``/``security --offline``, ``systemd-sysusers`` and ``systemd-tmpfiles``
into a throw-away root when those tools exist.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import click
import pytest
import yaml
from cryptography import x509

from qgate.cli import main as qgate_main

REPO = Path(__file__).resolve().parent.parent
CONTAINER = REPO / "container"
EXAMPLES = REPO / "examples"
ENTRYPOINT = CONTAINER / "entrypoint.sh"
LAB_INIT = CONTAINER / "lab-init.sh"
VENV_BIN = Path(sys.executable).parent
QGATE = VENV_BIN / "qgate"
COMPILERS = {"gcc", "g++", "cc", "clang", "build-essential", "cmake", "ninja-build", "make", "libc6-dev"}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# --- helpers --------------------------------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    """Return the Containerfile's ``(INSTRUCTION, arguments)`` with continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (CONTAINER / "Containerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "Containerfile ends inside a continuation line"
    return instructions


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def expand(text: str, values: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Split into build stages by ``FROM image AS name``; ``{"name": [instructions after FROM]}``."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in instructions:
        if word == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", rest, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = result.setdefault(match.group(2), [("FROM", match.group(1))])
        elif current is not None:
            current.append((word, rest))
    return result


def run_entrypoint(
    *args: str, env: Mapping[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    full_env = {
        "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
        "QGATE_DRY_RUN": "1",
        "QGATE_NETADMIN_PYTHON": "/nonexistent/python-netadmin",
        **(env or {}),
    }
    return subprocess.run(
        [*prefix, "bash", str(ENTRYPOINT), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def compose() -> dict[str, object]:
    loaded = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def services() -> dict[str, dict[str, object]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """Parse a systemd unit file into ``(section, key, value)`` in order (keys may repeat)."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


@pytest.fixture(scope="module")
def lab_dir() -> Iterator[Path]:
    """A directory the container lab's init script has set up (PKI, identities, both policies)."""
    base = Path(tempfile.mkdtemp(prefix="qgate-container-"))
    base.chmod(0o755)
    lab = base / "lab"
    try:
        result = subprocess.run(
            ["bash", str(LAB_INIT)],
            env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "QGATE_LAB_DIR": str(lab)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        yield lab
    finally:
        shutil.rmtree(base, ignore_errors=True)


def san_ips(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def service_ip(service: Mapping[str, object], network: str) -> str:
    networks = service["networks"]
    assert isinstance(networks, dict)
    return str(networks[network]["ipv4_address"])


def option(argv: list[str], name: str) -> str:
    for arg in argv:
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
    raise AssertionError(f"{name} not in {argv}")


def host_of(url_or_endpoint: str) -> str:
    return url_or_endpoint.removeprefix("https://").rpartition(":")[0]


# --- Containerfile --------------------------------------------------------------------------


def test_containerfile_has_liboqs_venv_and_slim_runtime_stages() -> None:
    instructions = containerfile_instructions()
    defaults = arg_defaults(instructions)
    found = stages(instructions)
    assert list(found) == ["liboqs", "venv", "runtime"]
    runtime_image = expand(found["runtime"][0][1], defaults)
    assert re.fullmatch(r"docker\.io/library/python:3\.11\.\d+-slim-bookworm", runtime_image)
    assert instructions[-2:] == [("ENTRYPOINT", '["/usr/local/bin/qgate-entrypoint"]'), ("CMD", "[]")]


def test_containerfile_pins_every_base_image_and_liboqs_release() -> None:
    instructions = containerfile_instructions()
    defaults = arg_defaults(instructions)
    for stage in stages(instructions).values():
        image = expand(stage[0][1], defaults)
        assert ":" in image, f"untagged base image {image}"
        tag = image.rpartition(":")[2]
        assert "latest" not in tag
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"base image not pinned to a patch release: {image}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", defaults["LIBOQS_VERSION"])
    # liboqs-python X.Y.Z[.N] goes with liboqs X.Y.Z (it warns on another major.minor)
    assert defaults["LIBOQS_PYTHON_VERSION"].startswith(defaults["LIBOQS_VERSION"])
    text = (CONTAINER / "Containerfile").read_text()
    assert "liboqs/archive/refs/tags/${LIBOQS_VERSION}.tar.gz" in text
    assert '"liboqs-python==${LIBOQS_PYTHON_VERSION}"' in text
    assert "latest" not in text.lower()


def test_containerfile_builds_shared_liboqs_with_cmake_ninja_into_the_linker_cache() -> None:
    found = stages(containerfile_instructions())
    build = " ".join(rest for word, rest in found["liboqs"] if word == "RUN")
    assert "cmake ninja-build" in build
    assert "-G Ninja" in build
    assert "-DBUILD_SHARED_LIBS=ON" in build
    assert "-DOQS_DIST_BUILD=ON" in build  # portable: CPU features chosen at run time
    runtime = " ".join(rest for word, rest in found["runtime"] if word == "RUN")
    copies = [rest for word, rest in found["runtime"] if word == "COPY"]
    assert "--from=liboqs /opt/liboqs-runtime/ /usr/local/lib/" in copies
    assert "ldconfig;" in runtime
    assert 'find_library("oqs")' in runtime
    assert '"liboqs" in a()' in runtime  # the image build fails if qgate cannot use liboqs


def test_runtime_stage_has_iproute2_no_compilers_and_runs_as_qgate() -> None:
    runtime = stages(containerfile_instructions())["runtime"]
    installs = " ".join(rest for word, rest in runtime if word == "RUN" and "apt-get install" in rest)
    packages = set(installs.split("--no-install-recommends", 1)[1].split("&&", 1)[0].split())
    assert "iproute2" in packages
    assert not packages & COMPILERS
    users = [rest for word, rest in runtime if word == "USER"]
    assert users == ["qgate"]
    setup = " ".join(rest for word, rest in runtime if word == "RUN")
    assert "useradd --system" in setup
    assert "setcap cap_net_admin+ep /opt/qgate/venv/bin/python-netadmin" in setup
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    health = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    assert len(health) == 1
    assert '["qgate-entrypoint", "healthcheck"]' in health[0]


def test_containerfile_copies_only_files_that_exist_and_pass_the_ignore_file() -> None:
    kept = {
        line[1:].strip()
        for line in (CONTAINER / "Containerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for word, rest in containerfile_instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        sources = [part for part in rest.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), source
            assert source in kept, f"{source} is excluded from the build context"


# --- entrypoint -----------------------------------------------------------------------------


def test_entrypoint_and_lab_init_scripts_parse_with_bash_n() -> None:
    for script in (ENTRYPOINT, LAB_INIT):
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr


def test_entrypoint_checks_policy_then_would_exec_qgate_up_with_extra_args(lab_dir: Path) -> None:
    policy = lab_dir / "site-a.yaml"
    result = run_entrypoint("--audit-log", "/var/lib/qgate/audit.jsonl", env={"QGATE_POLICY": str(policy)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"qgate up {policy} --audit-log /var/lib/qgate/audit.jsonl"
    assert "policy is valid" in result.stderr  # qgate check ran first


def test_entrypoint_refuses_an_invalid_policy_without_starting_the_gateway(lab_dir: Path) -> None:
    broken = lab_dir / "broken.yaml"
    broken.write_text((lab_dir / "site-a.yaml").read_text() + "bogus_key: 1\n")
    try:
        result = run_entrypoint(env={"QGATE_POLICY": str(broken)})
    finally:
        broken.unlink()
    assert result.returncode != 0
    assert "qgate up" not in result.stdout
    assert "bogus_key" in result.stderr


def test_entrypoint_names_the_missing_policy_file(tmp_path: Path) -> None:
    missing = tmp_path / "policy.yaml"
    result = run_entrypoint(env={"QGATE_POLICY": str(missing)})
    assert result.returncode == 2
    assert f"no readable policy at {missing}" in result.stderr
    assert result.stdout == ""


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_entrypoint_asks_for_cap_add_net_admin_when_the_capability_is_missing(lab_dir: Path) -> None:
    result = run_entrypoint(
        env={"QGATE_POLICY": str(lab_dir / "site-a.yaml")},
        prefix=("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"),
    )
    assert result.returncode == 2
    assert "--cap-add NET_ADMIN" in result.stderr
    assert result.stdout == ""


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_entrypoint_asks_for_the_tun_device_when_dev_net_tun_is_missing(lab_dir: Path) -> None:
    policy = lab_dir / "site-a.yaml"
    script = f"mount -t tmpfs none /dev/net && exec bash {ENTRYPOINT}"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("cannot make a mount namespace here")
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "QGATE_DRY_RUN": "1", "QGATE_POLICY": str(policy)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--device /dev/net/tun" in result.stderr


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_entrypoint_runs_qgate_up_through_the_capability_interpreter_when_net_admin_is_not_effective(
    lab_dir: Path, tmp_path: Path
) -> None:
    # Like user qgate in the image: CAP_NET_ADMIN in the bounding set (--cap-add) but not effective.
    # The noroot securebit keeps root from gaining capabilities at exec, so files stay readable here.
    netadmin = tmp_path / "python-netadmin"
    netadmin.write_text("#!/bin/sh\n")
    netadmin.chmod(0o755)
    policy = lab_dir / "site-a.yaml"
    result = run_entrypoint(
        env={"QGATE_POLICY": str(policy), "QGATE_NETADMIN_PYTHON": str(netadmin)},
        prefix=("setpriv", "--securebits=+noroot,+noroot_locked", "--inh-caps=-all", "--"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{netadmin} -I -m qgate up {policy}"


@needs_root
def test_entrypoint_runs_plain_qgate_up_when_it_already_has_net_admin(lab_dir: Path) -> None:
    policy = lab_dir / "site-b.yaml"
    result = run_entrypoint("up", str(policy), "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"qgate up {policy} --log-level debug"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["kms-sim", "--kme-id", "KME_A"], "qgate kms-sim --kme-id KME_A"),
        (["status", "--json"], "qgate status --json"),
        (["--version"], "qgate --version"),
        (["qgate-lab-init"], "qgate-lab-init"),
        (["bash", "-c", "echo hi"], "bash -c echo\\ hi"),
    ],
)
def test_entrypoint_passes_subcommands_and_programs_through(args: list[str], expected: str) -> None:
    result = run_entrypoint(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def fake_status(tmp_path: Path, answer: object, code: int = 0) -> dict[str, str]:
    """A stub ``qgate`` on PATH whose ``status --json`` prints ``answer`` and exits ``code``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "answer.json").write_text(json.dumps(answer))
    stub = bin_dir / "qgate"
    stub.write_text(
        f'#!/bin/sh\n[ "$1 $2" = "status --json" ] || exit 99\ncat {bin_dir}/answer.json\nexit {code}\n'
    )
    stub.chmod(0o755)
    return {"PATH": f"{bin_dir}:{VENV_BIN}:/usr/bin:/bin"}


@pytest.mark.parametrize(
    ("states", "healthy"),
    [(["up"], True), (["rekeying", "degraded"], True), (["up", "down"], False), ([], False)],
)
def test_healthcheck_passes_only_when_the_daemon_answers_and_no_peer_is_down(
    tmp_path: Path, states: list[str], healthy: bool
) -> None:
    peers = [{"name": f"p{i}", "state": state, "why": ""} for i, state in enumerate(states)]
    env = fake_status(tmp_path, {"ok": True, "gateway": "site-a", "peers": peers})
    result = run_entrypoint("healthcheck", env=env)
    assert (result.returncode == 0) is healthy, result.stdout + result.stderr
    assert result.stdout.startswith("healthy:" if healthy else "unhealthy:")


def test_healthcheck_fails_when_the_control_socket_does_not_answer(tmp_path: Path) -> None:
    env = fake_status(tmp_path, {"ok": False, "error": "no control socket in /run/qgate"}, code=1)
    result = run_entrypoint("healthcheck", env=env)
    assert result.returncode == 1


# --- lab init ------------------------------------------------------------------------------


def test_lab_init_writes_pki_identities_and_policies_qgate_check_accepts(lab_dir: Path) -> None:
    for name in ("ca.pem", "KME_A.pem", "KME_B.key", "SAE_A.pem", "SAE_B.key", "link.secret"):
        assert (lab_dir / "pki" / name).is_file(), name
    for site in ("a", "b"):
        assert stat.S_IMODE((lab_dir / "keys" / f"site-{site}.key").stat().st_mode) == 0o600
        result = subprocess.run(
            [str(QGATE), "check", "--no-connect", str(lab_dir / f"site-{site}.yaml")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_lab_init_run_again_keeps_the_existing_keys(lab_dir: Path) -> None:
    before = (lab_dir / "keys" / "site-a.key").read_bytes()
    result = subprocess.run(
        ["bash", str(LAB_INIT)],
        env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "QGATE_LAB_DIR": str(lab_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "already set up" in result.stderr
    assert (lab_dir / "keys" / "site-a.key").read_bytes() == before


# --- compose ---------------------------------------------------------------------------------


def test_compose_has_the_two_site_services_networks_and_volumes() -> None:
    doc = compose()
    assert set(services()) == {"lab-init", "kme-a", "kme-b", "gw-a", "gw-b", "host-a", "host-b"}
    assert set(doc["networks"]) == {"site-a-lan", "wan", "site-b-lan"}  # type: ignore[arg-type]
    assert {"lab", "audit-a", "audit-b"} <= set(doc["volumes"])  # type: ignore[arg-type]
    init = services()["lab-init"]
    assert init["command"] == ["qgate-lab-init"]
    assert init["restart"] == "no"
    assert "lab:/etc/qgate" in init["volumes"]  # type: ignore[operator]


def test_compose_gateways_get_only_net_admin_and_the_tun_device() -> None:
    for name, site in (("gw-a", "a"), ("gw-b", "b")):
        gw = services()[name]
        assert gw["cap_add"] == ["NET_ADMIN"]
        assert gw["devices"] == ["/dev/net/tun:/dev/net/tun"]
        assert "privileged" not in gw
        assert gw["sysctls"]["net.ipv4.ip_forward"] == "1"  # type: ignore[index]
        assert gw["environment"] == {"QGATE_POLICY": f"/etc/qgate/site-{site}.yaml"}
        assert "lab:/etc/qgate:ro" in gw["volumes"]  # type: ignore[operator]
        assert gw["healthcheck"]["test"] == ["CMD", "qgate-entrypoint", "healthcheck"]  # type: ignore[index]
    assert "qgate status --json" in ENTRYPOINT.read_text()


def test_compose_orders_start_up_init_then_kmes_then_gateways() -> None:
    svc = services()
    for kme in ("kme-a", "kme-b"):
        assert svc[kme]["depends_on"] == {"lab-init": {"condition": "service_completed_successfully"}}
        assert "healthcheck" in svc[kme]
    assert svc["gw-a"]["depends_on"] == {"kme-a": {"condition": "service_healthy"}}
    assert svc["gw-b"]["depends_on"] == {"kme-b": {"condition": "service_healthy"}}


def test_compose_images_are_pinned_and_never_latest() -> None:
    for name, service in services().items():
        image = str(service["image"])
        assert ":" in image, f"{name}: untagged image {image}"
        assert not image.endswith(":latest"), name
        assert re.search(r":\d+\.\d+\.\d+$", image), f"{name}: {image}"


def test_compose_subnets_hold_the_fixed_addresses_and_leave_dot_one_to_the_gateways() -> None:
    doc = compose()
    subnets = {
        name: ipaddress.ip_network(net["ipam"]["config"][0]["subnet"])
        for name, net in doc["networks"].items()  # type: ignore[union-attr]
    }
    assert subnets == {
        "site-a-lan": ipaddress.ip_network("10.1.0.0/24"),
        "wan": ipaddress.ip_network("10.99.0.0/24"),
        "site-b-lan": ipaddress.ip_network("10.2.0.0/24"),
    }
    used: list[str] = []
    for service in services().values():
        for net, conf in service.get("networks", {}).items():  # type: ignore[attr-defined]
            address = ipaddress.ip_address(conf["ipv4_address"])
            assert address in subnets[net]
            used.append(str(address))
    assert len(used) == len(set(used)), "an address is used twice"
    for net in doc["networks"].values():  # type: ignore[union-attr]
        assert str(net["ipam"]["config"][0]["gateway"]) not in used


def test_compose_addresses_match_the_policies_and_certificates_lab_init_writes(lab_dir: Path) -> None:
    svc = services()
    for site, peer in (("a", "b"), ("b", "a")):
        policy = yaml.safe_load((lab_dir / f"site-{site}.yaml").read_text())
        gw_wan = service_ip(svc[f"gw-{site}"], "wan")
        assert host_of(policy["gateway"]["listen"]) == gw_wan
        assert host_of(policy["peers"][0]["endpoint"]) == service_ip(svc[f"gw-{peer}"], "wan")
        assert policy["peers"][0]["subnets"] == [
            compose()["networks"][f"site-{peer}-lan"]["ipam"]["config"][0]["subnet"]
        ]  # type: ignore[index]
        kme_lan = service_ip(svc[f"kme-{site}"], f"site-{site}-lan")
        assert host_of(policy["kme"]["url"]) == kme_lan
        kme_id = f"KME_{site.upper()}"
        assert kme_lan in san_ips(lab_dir / "pki" / f"{kme_id}.pem")
        argv = [str(arg) for arg in svc[f"kme-{site}"]["command"]]  # type: ignore[attr-defined]
        peer_kme_wan = service_ip(svc[f"kme-{peer}"], "wan")
        assert host_of(option(argv, "--peer-url")) == peer_kme_wan
        assert peer_kme_wan in san_ips(lab_dir / "pki" / f"KME_{peer.upper()}.pem")
        assert option(argv, "--sae") == policy["kme"]["sae_id"]
        assert option(argv, "--peer-sae") == policy["peers"][0]["sae_id"]


def test_compose_commands_parse_with_the_qgate_cli(lab_dir: Path) -> None:
    svc = services()

    def parse(argv: list[str]) -> None:
        real = [arg.replace("/etc/qgate", str(lab_dir)) for arg in argv]
        with click.Context(qgate_main) as ctx:
            command = qgate_main.get_command(ctx, real[0])
            assert command is not None, real[0]
            command.make_context(real[0], real[1:], parent=ctx)  # checks options and that files exist

    for kme in ("kme-a", "kme-b"):
        parse([str(arg) for arg in svc[kme]["command"]])  # type: ignore[attr-defined]
    for gw in ("gw-a", "gw-b"):
        env = svc[gw]["environment"]
        parse(["up", env["QGATE_POLICY"], *svc[gw]["command"]])  # type: ignore[index,misc]


def test_compose_hosts_route_the_other_lan_through_their_gateway() -> None:
    svc = services()
    for site, peer in (("a", "b"), ("b", "a")):
        host = svc[f"host-{site}"]
        script = host["command"][-1]  # type: ignore[index]
        gw_lan = service_ip(svc[f"gw-{site}"], f"site-{site}-lan")
        assert f"ip route add 10.{2 if peer == 'b' else 1}.0.0/24 via {gw_lan}" in script
        assert "$$!" in script  # compose would otherwise interpolate $!
        assert host["cap_add"] == ["NET_ADMIN"]
    assert svc["host-a"]["healthcheck"]["test"][-1] == service_ip(svc["host-b"], "site-b-lan")  # type: ignore[index]


# --- systemd --------------------------------------------------------------------------------


def test_systemd_unit_runs_check_up_and_reload_with_only_net_admin() -> None:
    entries = unit_entries(EXAMPLES / "qgate.service")
    service: dict[str, list[str]] = {}
    for section, key, value in entries:
        if section == "Service":
            service.setdefault(key, []).append(value)
    assert {section for section, _, _ in entries} == {"Unit", "Service", "Install"}
    assert service["Type"] == ["simple"]
    assert service["ExecStartPre"] == ["/opt/qgate/venv/bin/qgate check --no-connect ${QGATE_POLICY}"]
    assert service["ExecStart"][0].startswith(
        "/opt/qgate/venv/bin/qgate up ${QGATE_POLICY} --audit-log /var/lib/"
    )
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert service["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert service["DeviceAllow"] == ["/dev/net/tun rw"]
    assert service["DevicePolicy"] == ["closed"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["RuntimeDirectory"] == ["qgate"]
    assert service["RuntimeDirectoryMode"] == ["0700"]
    assert service["StateDirectory"] == ["qgate"]
    assert service["User"] == ["qgate"]
    assert service["NoNewPrivileges"] == ["yes"]


def venv_unit(tmp_path: Path) -> Path:
    """The unit with its commands pointed at this venv's qgate (verify wants executables that exist)."""
    unit = tmp_path / "qgate.service"
    unit.write_text((EXAMPLES / "qgate.service").read_text().replace("/opt/qgate/venv/bin/qgate", str(QGATE)))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_passes_systemd_analyze_verify_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(venv_unit(tmp_path))], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_exposure_level_is_ok(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(venv_unit(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for qgate\.service: (\d+\.\d+)", result.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline not supported: {result.stderr.strip()}")
    assert float(match.group(1)) < 3.0, result.stdout


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="needs systemd-sysusers")
def test_sysusers_and_tmpfiles_make_the_qgate_user_and_its_config_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(EXAMPLES / "qgate.sysusers")],
        capture_output=True,
        check=True,
    )
    passwd = {
        line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    assert passwd["qgate"][5:] == ["/var/lib/qgate", "/usr/sbin/nologin"]
    assert int(passwd["qgate"][2]) < 1000  # a system user
    if shutil.which("systemd-tmpfiles") is None or os.geteuid() != 0:
        return
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(EXAMPLES / "qgate.tmpfiles")],
        capture_output=True,
        check=True,
    )
    info = (tmp_path / "etc/qgate").stat()
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == int(passwd["qgate"][2])
