"""Privilege drop (qgate.privileges): run user, capability sets read back from /proc, file permission checks.

Every call of ``drop_privileges`` runs in a forked child so that the test process itself keeps
root; the child reports through a pipe as JSON. The drop tests need root and are skipped otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import json
import os
import pwd
import resource
import secrets
import select
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qgate.errors import ConfigError
from qgate.privileges import (
    check_file_safety,
    drop_privileges,
    harden_process,
    parse_proc_status,
    read_capabilities,
    unsafe_secret_mode,
)

CHILD_TIMEOUT = 30.0
CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

STATUS_SAMPLE = """Name:\tqgate
Uid:\t998\t998\t998\t998
Gid:\t997\t997\t997\t997
Groups:\t
NoNewPrivs:\t1
CapInh:\t0000000000000000
CapPrm:\t0000000000001000
CapEff:\t0000000000001000
CapBnd:\t0000000000001400
CapAmb:\t0000000000000000
"""


def run_in_child(fn: Callable[[], object]) -> dict[str, object]:
    """Run ``fn`` in a forked child; return ``{"value": ...}`` or ``{"error": type, "message": ...}``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(read_fd)
            try:
                out: dict[str, object] = {"value": fn()}
            except BaseException as exc:
                out = {"error": type(exc).__name__, "message": str(exc)}
            os.write(write_fd, json.dumps(out, default=sorted).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    try:
        while select.select([read_fd], [], [], CHILD_TIMEOUT)[0]:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    assert chunks, "child reported nothing"
    result: dict[str, object] = json.loads(b"".join(chunks))
    return result


@pytest.fixture(scope="module")
def run_user() -> Iterator[str]:
    """An unprivileged user to drop to: ``nobody`` or a temporary ``qgtest<hex>`` system user."""
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pass
    else:
        yield "nobody"
        return
    if shutil.which("useradd") is None:
        pytest.skip("no nobody user and no useradd")
    name = "qgtest" + secrets.token_hex(3)
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
            check=True,
            capture_output=True,
        )
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare failed")


def _errno_of(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def _netlink_errno(action: Callable[[], object]) -> str:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        action()
    except NetlinkError as exc:
        return errno.errorcode.get(exc.code, str(exc.code))
    return "ok"


def _configure_lo_and_route() -> None:
    """CAP_NET_ADMIN actions in the child's own namespace: lo up, an address, a route added and deleted."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        ipr.addr("add", index=lo, address="10.77.0.1", prefixlen=24)
        ipr.route("add", dst="10.78.0.0/24", gateway="10.77.0.2")
        ipr.route("del", dst="10.78.0.0/24", gateway="10.77.0.2")


def _status_of(kind: str) -> dict[str, object]:
    creds = read_capabilities(kind)
    return {key: sorted(v) if isinstance(v, frozenset) else v for key, v in creds.items()}


def _drop_in_fresh_namespace(user: str, keep: tuple[str, ...]) -> dict[str, object]:
    """Child body: new net+UTS namespace as root, drop, then try privileged actions."""
    from pyroute2 import IPRoute

    _unshare(CLONE_NEWNET | CLONE_NEWUTS)
    with IPRoute() as ipr:  # import pyroute2's lazy modules while files are still readable
        ipr.get_links()
    before = _status_of("self")
    result = drop_privileges(user, keep=keep)
    seen_in_thread: list[dict[str, object]] = []
    thread = threading.Thread(target=lambda: seen_in_thread.append(_status_of("thread-self")))
    thread.start()
    thread.join()
    return {
        "before": before,
        "result": result.as_dict(),
        "after": _status_of("self"),
        "thread": seen_in_thread[0],
        "net_admin": _netlink_errno(_configure_lo_and_route),
        "sethostname": _errno_of(lambda: socket.sethostname("qgate-should-fail")),
        "raw_socket": _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
        "setuid_root": _errno_of(lambda: os.setuid(0)),
        "read_shadow": _errno_of(lambda: Path("/etc/shadow").read_bytes()),
    }


# ----- /proc parsing ---------------------------------------------------------------------
def test_parse_proc_status_names_capability_bits_and_ids() -> None:
    creds = parse_proc_status(STATUS_SAMPLE)

    assert creds["CapEff"] == creds["CapPrm"] == {"CAP_NET_ADMIN"}
    assert creds["CapBnd"] == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert creds["CapInh"] == creds["CapAmb"] == frozenset()
    assert (creds["Uid"], creds["Gid"], creds["Groups"], creds["NoNewPrivs"]) == (
        (998, 998),
        (997, 997),
        (),
        1,
    )


def test_parse_proc_status_names_unknown_high_bits_by_number() -> None:
    creds = parse_proc_status(STATUS_SAMPLE.replace("CapBnd:\t0000000000001400", "CapBnd:\t8000000000000000"))

    assert creds["CapBnd"] == {"CAP_63"}


def test_parse_proc_status_rejects_text_without_capability_lines() -> None:
    with pytest.raises(ConfigError, match="unexpected /proc status format"):
        parse_proc_status("Name:\tx\nUid:\t0\t0\t0\t0\n")


def test_read_capabilities_reports_own_real_and_effective_ids() -> None:
    creds = read_capabilities()

    assert creds["Uid"] == (os.getuid(), os.geteuid())
    assert creds["Gid"] == (os.getgid(), os.getegid())


def test_read_capabilities_names_a_missing_process_in_the_error() -> None:
    with pytest.raises(ConfigError, match="/proc/999999999/status"):
        read_capabilities(999999999)


# ----- refusals (before anything changes) ------------------------------------------------
def test_drop_privileges_names_missing_user_and_how_to_create_it() -> None:
    name = "qgnouser" + secrets.token_hex(3)

    out = run_in_child(lambda: drop_privileges(name).as_dict())

    assert out["error"] == "ConfigError"
    message = str(out["message"])
    assert repr(name) in message
    assert f"useradd --system --no-create-home --shell /usr/sbin/nologin {name}" in message


@needs_root
def test_drop_privileges_refuses_unknown_capability_name_and_stays_root(run_user: str) -> None:
    out = run_in_child(lambda: _attempt_then_report(lambda: drop_privileges(run_user, keep=("CAP_FLY",))))

    value = out["value"]
    assert isinstance(value, dict)
    assert value["error"] == "unknown capability 'CAP_FLY' (expected a name such as CAP_NET_ADMIN)"
    assert value["uid"] == 0 and "CAP_SYS_ADMIN" in value["eff"]


@needs_root
def test_drop_privileges_refuses_root_as_run_user() -> None:
    out = run_in_child(lambda: _attempt_then_report(lambda: drop_privileges("root")))

    assert "uid/gid 0" in str(out["value"]["error"])  # type: ignore[index]


@needs_root
def test_drop_privileges_refuses_while_other_threads_run_and_changes_nothing(run_user: str) -> None:
    def body() -> dict[str, object]:
        stop = threading.Event()
        waiter = threading.Thread(target=stop.wait)
        waiter.start()
        try:
            return _attempt_then_report(lambda: drop_privileges(run_user))
        finally:
            stop.set()
            waiter.join()

    out = run_in_child(body)

    value = out["value"]
    assert isinstance(value, dict)
    assert "2 threads run" in value["error"]
    assert value["uid"] == 0
    assert "CAP_SYS_ADMIN" in value["eff"]


@needs_root
def test_drop_privileges_accepts_a_thread_that_was_just_joined(run_user: str) -> None:
    def body() -> object:
        worker = threading.Thread(target=lambda: None)  # like netconfig's qgate-netlink thread
        worker.start()
        worker.join()
        return drop_privileges(run_user).uid

    out = run_in_child(body)

    assert out.get("value") == pwd.getpwnam(run_user).pw_uid, out


def test_drop_privileges_refuses_when_not_root() -> None:
    if os.geteuid() == 0:
        pytest.skip("meaningful only without root")
    out = run_in_child(lambda: drop_privileges("nobody").as_dict())

    assert out["error"] == "ConfigError"
    assert "needs root" in str(out["message"])


def _attempt_then_report(action: Callable[[], object]) -> dict[str, object]:
    try:
        action()
    except ConfigError as exc:
        creds = read_capabilities("thread-self")
        return {"error": str(exc), "uid": creds["Uid"][1], "eff": sorted(creds["CapEff"])}
    raise AssertionError("drop_privileges did not refuse")


# ----- the drop itself -------------------------------------------------------------------
@needs_root
def test_dropped_child_keeps_only_net_admin_and_cannot_regain_root(run_user: str) -> None:
    pw = pwd.getpwnam(run_user)

    out = run_in_child(lambda: _drop_in_fresh_namespace(run_user, ("CAP_NET_ADMIN",)))

    assert "error" not in out, out
    report = out["value"]
    assert isinstance(report, dict)
    assert report["before"]["Uid"] == [0, 0] and "CAP_SYS_ADMIN" in report["before"]["CapEff"]
    after = report["after"]
    assert after["Uid"] == [pw.pw_uid, pw.pw_uid]
    assert after["Gid"] == [pw.pw_gid, pw.pw_gid]
    assert after["Groups"] == []
    assert after["CapEff"] == after["CapPrm"] == after["CapBnd"] == ["CAP_NET_ADMIN"]
    assert after["CapInh"] == after["CapAmb"] == []
    assert after["NoNewPrivs"] == 1
    assert report["result"]["effective"] == ["CAP_NET_ADMIN"] and report["result"]["no_new_privs"] is True
    assert report["thread"] == after  # threads started after the drop inherit it
    assert report["net_admin"] == "ok"
    assert report["sethostname"] == "EPERM"  # CAP_SYS_ADMIN gone
    assert report["raw_socket"] == "EPERM"  # CAP_NET_RAW gone
    assert report["setuid_root"] == "EPERM"  # CAP_SETUID gone
    assert report["read_shadow"] in ("EACCES", "ENOENT")  # CAP_DAC_OVERRIDE gone


@needs_root
def test_drop_with_nothing_kept_leaves_no_capabilities_and_no_net_admin(run_user: str) -> None:
    out = run_in_child(lambda: _drop_in_fresh_namespace(run_user, ()))

    report = out["value"]
    assert isinstance(report, dict), out
    after = report["after"]
    assert after["CapEff"] == after["CapPrm"] == after["CapBnd"] == []
    assert report["net_admin"] == "EPERM"


def _gateway_like_start_and_exit(user: str) -> dict[str, object]:
    """Child body: as the gateway does, open the TUN and add routes as root, drop, then remove them."""
    from pyroute2 import IPRoute

    from qgate.dataplane.tunio import VnetTun
    from qgate.netconfig import configure_tun

    _unshare(CLONE_NEWNET)
    tun = VnetTun.open("qgprivtun0")
    net = configure_tun(tun.name, mtu=1420, address=None, routes=[ipaddress.ip_network("10.79.0.0/24")])
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=tun.name)[0]
    drop_privileges(user)
    net.remove()
    with IPRoute() as ipr:
        left = [r.get("dst") for r in ipr.get_routes(family=socket.AF_INET, oif=index)]
    tun.close()
    return {"routes_left": left, "uid": os.geteuid()}


@needs_root
def test_routes_added_as_root_are_removed_after_the_drop(run_user: str) -> None:
    out = run_in_child(lambda: _gateway_like_start_and_exit(run_user))

    assert out.get("value") == {"routes_left": [], "uid": pwd.getpwnam(run_user).pw_uid}, out


# ----- hardening: no core dumps, not dumpable ------------------------------------------------
PR_GET_DUMPABLE = 3


def _core_limit_and_dumpable() -> dict[str, object]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return {
        "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
        "dumpable": libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0),
    }


def _harden_then(after: Callable[[], object]) -> dict[str, object]:
    before = _core_limit_and_dumpable()
    harden_process()
    after()
    return {"before": before, "after": _core_limit_and_dumpable()}


def test_harden_process_sets_the_core_limit_and_dumpable_to_zero() -> None:
    out = run_in_child(lambda: _harden_then(lambda: None))

    value = out.get("value")
    assert isinstance(value, dict), out
    assert value["before"]["dumpable"] == 1, "the test process should start dumpable"
    assert value["after"] == {"core": [0, 0], "dumpable": 0}


@needs_root
def test_drop_after_hardening_ends_not_dumpable_and_without_core_dumps(run_user: str) -> None:
    # A uid change resets dumpable to fs.suid_dumpable; the drop clears it again and checks it.
    out = run_in_child(lambda: _harden_then(lambda: drop_privileges(run_user)))

    assert out.get("value", {}).get("after") == {"core": [0, 0], "dumpable": 0}, out  # type: ignore[union-attr]


# ----- file permission checks ------------------------------------------------------------
def _file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a real key")
    path.chmod(mode)
    tmp_path.chmod(0o700)
    return path


def test_check_file_safety_accepts_private_key_with_mode_0600(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o600)

    assert check_file_safety(path, secret=True, run_user=os.getuid()) == []


def test_check_file_safety_warns_about_secret_readable_by_group(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o640)

    (warning,) = check_file_safety(path, secret=True, run_user=os.getuid())

    assert "readable or usable by group/others (mode 0640)" in warning and str(path) in warning


def test_check_file_safety_accepts_public_key_readable_by_all(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o644)

    assert check_file_safety(path, secret=False, run_user=os.getuid()) == []


def test_check_file_safety_warns_about_public_key_writable_by_others(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o646)

    (warning,) = check_file_safety(path, secret=False, run_user=os.getuid())

    assert "writable by group/others" in warning


def test_check_file_safety_warns_about_directory_where_others_can_swap_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o600)
    tmp_path.chmod(0o777)

    (warning,) = check_file_safety(path, secret=True, run_user=os.getuid())

    assert "can be replaced" in warning


@needs_root
def test_check_file_safety_warns_about_owner_other_than_root_or_run_user(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o600)
    os.chown(path, 54321, 54321)

    assert check_file_safety(path, secret=True, run_user=54321) == []
    (warning,) = check_file_safety(path, secret=True, run_user="root")
    assert "owned by uid 54321" in warning


@pytest.mark.parametrize(("mode", "unsafe"), [(0o600, None), (0o400, None), (0o640, 0o640), (0o602, 0o602)])
def test_unsafe_secret_mode_is_the_mode_when_group_or_others_have_any_bit(
    tmp_path: Path, mode: int, unsafe: int | None
) -> None:
    assert unsafe_secret_mode(_file(tmp_path, mode)) == unsafe
    assert unsafe_secret_mode(tmp_path / "absent.key") is None


def test_check_file_safety_reports_missing_file(tmp_path: Path) -> None:
    (warning,) = check_file_safety(tmp_path / "absent.key", secret=True)

    assert "cannot check permissions" in warning
