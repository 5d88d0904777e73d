"""Dropping root after set-up: switch to an unprivileged user and keep only the capabilities needed.

``qgate up`` needs root only to open the TUN device, configure its address and routes and bind
its sockets. Afterwards :func:`drop_privileges` switches the process to a system user and keeps
only ``CAP_NET_ADMIN`` (to remove the routes again at exit), following capabilities(7):

1. every capability not kept is removed from the bounding set (``prctl(PR_CAPBSET_DROP)``) and
   the ambient set is cleared;
2. ``prctl(PR_SET_KEEPCAPS, 1)`` so that the permitted set survives the uid change;
3. ``setgroups([])``, ``setresgid``, ``setresuid`` (real, effective and saved ids all change);
4. ``capset`` (``_LINUX_CAPABILITY_VERSION_3``): permitted = effective = kept, inheritable empty;
5. ``prctl(PR_SET_KEEPCAPS, 0)``, ``prctl(PR_SET_NO_NEW_PRIVS, 1)``, ``prctl(PR_SET_DUMPABLE, 0)``
   (no core dumps of key material, no ptrace by the run user);
6. the result is read back from ``/proc/thread-self/status`` and checked.

Capabilities are per thread on Linux, so the drop refuses to run while other threads exist:
threads started afterwards inherit the reduced credentials. Any failure raises ``ConfigError``
after a best-effort removal of every capability; the caller must then stop.

Independently of any drop, :func:`harden_process` runs first thing in ``qgate up``, before a key
is loaded: ``RLIMIT_CORE`` 0 and ``PR_SET_DUMPABLE`` 0, so key memory never lands in a core file
and processes of the same uid cannot ptrace the gateway or read its ``/proc/<pid>/mem``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import grp
import logging
import os
import pwd
import resource
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypedDict

from qgate.errors import ConfigError

log = logging.getLogger(__name__)

CAPABILITIES: Final = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip
"""Capability names indexed by number (linux/capability.h); unknown higher bits read as ``CAP_<n>``."""
USERADD_HINT: Final = "useradd --system --no-create-home --shell /usr/sbin/nologin {user}"
"""The command suggested when the run user does not exist."""
THREAD_EXIT_WAIT: Final = 0.5
"""Seconds to wait for threads already joined (a Python join returns just before the OS thread exits)."""

_PR_GET_DUMPABLE: Final = 3
_PR_SET_DUMPABLE: Final = 4
_PR_SET_KEEPCAPS: Final = 8
_PR_CAPBSET_DROP: Final = 24
_PR_SET_NO_NEW_PRIVS: Final = 38
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
_CAP_VERSION_3: Final = 0x20080522
_SYS_CAPSET: Final = {"x86_64": 126, "aarch64": 91, "riscv64": 91, "i686": 185, "armv7l": 185}


class ProcCredentials(TypedDict):
    """Credentials of one process as ``/proc/<pid>/status`` shows them.

    Capability sets are sets of ``CAP_*`` names; ``Uid``/``Gid`` are ``(real, effective)``.
    """

    CapInh: frozenset[str]
    CapPrm: frozenset[str]
    CapEff: frozenset[str]
    CapBnd: frozenset[str]
    CapAmb: frozenset[str]
    Uid: tuple[int, int]
    Gid: tuple[int, int]
    Groups: tuple[int, ...]
    NoNewPrivs: int


@dataclass(frozen=True)
class DropResult:
    """The process's credentials after :func:`drop_privileges`, as read back from ``/proc``.

    Attributes:
        user: the run user's name; ``uid``/``gid`` its ids (real = effective = saved).
        kept: the capabilities asked to be kept.
        effective, permitted, bounding, inheritable, ambient: the capability sets (``CAP_*`` names).
        groups: supplementary groups (empty after the drop).
        no_new_privs: ``NoNewPrivs`` is set (execve can never grant privileges again).
    """

    user: str
    uid: int
    gid: int
    kept: frozenset[str]
    effective: frozenset[str]
    permitted: frozenset[str]
    bounding: frozenset[str]
    inheritable: frozenset[str]
    ambient: frozenset[str]
    groups: tuple[int, ...]
    no_new_privs: bool

    def as_dict(self) -> dict[str, object]:
        """Return the result as JSON-able data (sets as sorted lists), e.g. for ``qgate status``."""
        return {
            "user": self.user,
            "uid": self.uid,
            "gid": self.gid,
            "kept": sorted(self.kept),
            "effective": sorted(self.effective),
            "permitted": sorted(self.permitted),
            "bounding": sorted(self.bounding),
            "inheritable": sorted(self.inheritable),
            "ambient": sorted(self.ambient),
            "groups": list(self.groups),
            "no_new_privs": self.no_new_privs,
        }


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


# ----- capability names ------------------------------------------------------------------
def capability_number(name: str) -> int:
    """Return the number of capability ``name`` (``CAP_NET_ADMIN``, ``net_admin``: case-insensitive).

    Raises:
        ConfigError: not a capability name this module knows.
    """
    upper = name.strip().upper()
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full in CAPABILITIES:
        return CAPABILITIES.index(full)
    raise ConfigError(f"unknown capability {name!r} (expected a name such as CAP_NET_ADMIN)")


def capability_names(mask: int) -> frozenset[str]:
    """Return the ``CAP_*`` names of the bits set in ``mask`` (a /proc ``Cap*`` value)."""
    names = set()
    for bit in range(mask.bit_length()):
        if mask >> bit & 1:
            names.add(CAPABILITIES[bit] if bit < len(CAPABILITIES) else f"CAP_{bit}")
    return frozenset(names)


_CAP_KEYS: Final = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def parse_proc_status(text: str) -> ProcCredentials:
    """Parse the credential lines of a ``/proc/<pid>/status`` text.

    Raises:
        ConfigError: a ``Cap*``, ``Uid`` or ``Gid`` line is missing or garbled.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        caps = {key: capability_names(int(fields[key], 16)) for key in _CAP_KEYS}
        uid = [int(v) for v in fields["Uid"].split()]
        gid = [int(v) for v in fields["Gid"].split()]
        groups = tuple(int(v) for v in fields.get("Groups", "").split())
        no_new_privs = int(fields.get("NoNewPrivs", "0"))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"unexpected /proc status format: {exc}") from exc
    return ProcCredentials(
        CapInh=caps["CapInh"], CapPrm=caps["CapPrm"], CapEff=caps["CapEff"], CapBnd=caps["CapBnd"],
        CapAmb=caps["CapAmb"], Uid=(uid[0], uid[1]), Gid=(gid[0], gid[1]), Groups=groups,
        NoNewPrivs=no_new_privs,
    )  # fmt: skip


def read_capabilities(pid: int | str = "self") -> ProcCredentials:
    """Read the capabilities and ids of process ``pid`` (or ``"self"``, ``"thread-self"``) from /proc.

    Raises:
        ConfigError: the status file cannot be read (no such process) or parsed.
    """
    path = Path("/proc") / str(pid) / "status"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_proc_status(text)


# ----- hardening -------------------------------------------------------------------------
def harden_process() -> None:
    """Forbid core dumps of this process and ptrace of it by the same uid (call before loading keys).

    Sets ``RLIMIT_CORE`` to 0, soft and hard (setrlimit(2): without ``CAP_SYS_RESOURCE`` it can
    never be raised again), and ``prctl(PR_SET_DUMPABLE, 0)`` (prctl(2): no core dump, no ptrace
    attach and no ``/proc/<pid>/mem`` for processes without ``CAP_SYS_PTRACE``; the ``/proc/<pid>``
    files become root's). Children inherit the core limit, not the dumpable flag. A later uid
    change resets dumpable to ``fs.suid_dumpable``: :func:`drop_privileges` clears it again and
    checks it. Both settings are read back.

    Raises:
        ConfigError: setrlimit or prctl failed, or the read-back is not 0.
    """
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot disable core dumps (RLIMIT_CORE 0): {exc}") from exc
    _prctl(_PR_SET_DUMPABLE, 0, what="clear dumpable")
    core = resource.getrlimit(resource.RLIMIT_CORE)
    dumpable = _prctl(_PR_GET_DUMPABLE, 0, what="read dumpable")
    if core != (0, 0) or dumpable != 0:
        raise ConfigError(f"process hardening did not take effect: RLIMIT_CORE {core}, dumpable {dumpable}")
    log.debug("core dumps disabled (RLIMIT_CORE 0) and process not dumpable (no ptrace by the same uid)")


# ----- the drop --------------------------------------------------------------------------
def drop_privileges(user: str, *, keep: Sequence[str] = ("CAP_NET_ADMIN",)) -> DropResult:
    """Switch this (root, single-threaded) process to ``user``, keeping only the ``keep`` capabilities.

    Order as in the module description (capabilities(7), prctl(2), capset(2)). Call it after the
    privileged set-up and before any thread is started; threads started later inherit the result.

    Args:
        user: name of the run user (its primary group becomes the gid; no supplementary groups).
        keep: capability names to keep in the bounding, permitted and effective sets.

    Returns:
        The credentials read back from ``/proc/thread-self/status``.

    Raises:
        ConfigError: the user does not exist (the message gives the ``useradd`` command), is root,
            a name in ``keep`` is unknown or not held now, the process is not root or runs other
            threads, or any step fails or the read-back differs. After a failure the process may be
            partly dropped (every capability is removed on a best-effort basis): stop it.
    """
    pw = _resolve(user)
    kept = frozenset(CAPABILITIES[capability_number(name)] for name in keep)
    _check_can_drop(user, kept)
    try:
        _apply(pw, kept)
        result = _verify(pw, kept)
    except ConfigError:
        _fail_closed()
        raise
    log.info(
        "privileges dropped to %s (uid %d, gid %d); capabilities kept: %s",
        pw.pw_name, pw.pw_uid, pw.pw_gid, ", ".join(sorted(kept)) or "none",
    )  # fmt: skip
    return result


def _resolve(user: str) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        hint = USERADD_HINT.format(user=user)
        raise ConfigError(f"run user {user!r} does not exist; create it with: {hint}") from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise ConfigError(f"run user {user!r} has uid/gid 0: pick an unprivileged system user")
    try:
        grp.getgrgid(pw.pw_gid)
    except KeyError:
        raise ConfigError(f"run user {user!r}: primary group {pw.pw_gid} does not exist") from None
    return pw


def _check_can_drop(user: str, kept: frozenset[str]) -> None:
    if os.geteuid() != 0:
        raise ConfigError(f"dropping privileges to {user!r} needs root; running as uid {os.geteuid()}")
    threads = _thread_count()
    if threads != 1:
        raise ConfigError(
            f"cannot drop privileges while {threads} threads run (capabilities are per thread):"
            " drop before starting any thread"
        )
    missing = kept - read_capabilities("thread-self")["CapPrm"]
    if missing:
        raise ConfigError(f"cannot keep {', '.join(sorted(missing))}: not in this process's permitted set")


def _thread_count() -> int:
    """Threads of this process; waits up to THREAD_EXIT_WAIT for threads just joined to exit."""
    deadline = time.monotonic() + THREAD_EXIT_WAIT
    while True:
        threads = len(os.listdir("/proc/self/task"))
        if threads == 1 or time.monotonic() >= deadline:
            return threads
        time.sleep(0.01)


def _apply(pw: pwd.struct_passwd, kept: frozenset[str]) -> None:
    numbers = {CAPABILITIES.index(name) for name in kept}
    for cap in range(_last_cap() + 1):
        if cap not in numbers:
            _prctl(_PR_CAPBSET_DROP, cap, what=f"drop {_cap_name(cap)} from the bounding set")
    # EINVAL: kernels before 4.3 have no ambient set
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, what="clear the ambient set", ok_errno=errno.EINVAL)
    _prctl(_PR_SET_KEEPCAPS, 1, what="set keep-capabilities")
    try:
        os.setgroups([])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    except OSError as exc:
        raise ConfigError(f"cannot switch to user {pw.pw_name!r}: {exc.strerror or exc}") from exc
    mask = sum(1 << n for n in numbers)
    _capset(effective=mask, permitted=mask, inheritable=0)
    _prctl(_PR_SET_KEEPCAPS, 0, what="clear keep-capabilities")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, what="set no-new-privileges")
    _prctl(_PR_SET_DUMPABLE, 0, what="clear dumpable")


def _verify(pw: pwd.struct_passwd, kept: frozenset[str]) -> DropResult:
    now = read_capabilities("thread-self")
    bounded = frozenset(name for name in kept if CAPABILITIES.index(name) <= _last_cap())
    expected: dict[str, object] = {
        "CapEff": kept, "CapPrm": kept, "CapBnd": bounded, "CapInh": frozenset(), "CapAmb": frozenset(),
        "Uid": (pw.pw_uid, pw.pw_uid), "Gid": (pw.pw_gid, pw.pw_gid), "Groups": (), "NoNewPrivs": 1,
    }  # fmt: skip
    actual: dict[str, object] = dict(now)
    wrong = [
        f"{key} is {actual[key]!r}, expected {value!r}"
        for key, value in expected.items()
        if actual[key] != value
    ]
    dumpable = _prctl(_PR_GET_DUMPABLE, 0, what="read dumpable")
    if dumpable != 0:
        wrong.append(f"dumpable is {dumpable}, expected 0")
    if wrong:
        raise ConfigError("privilege drop did not take effect: " + "; ".join(wrong))
    return DropResult(
        user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, kept=kept, effective=now["CapEff"],
        permitted=now["CapPrm"], bounding=now["CapBnd"], inheritable=now["CapInh"], ambient=now["CapAmb"],
        groups=now["Groups"], no_new_privs=now["NoNewPrivs"] == 1,
    )  # fmt: skip


def _fail_closed() -> None:
    """Best effort after a failed drop: remove every capability so nothing privileged can go on."""
    try:
        _capset(effective=0, permitted=0, inheritable=0)
    except ConfigError as exc:
        log.error("could not clear capabilities after a failed drop: %s", exc)


# ----- libc glue -------------------------------------------------------------------------
_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def _prctl(option: int, arg: int, *, what: str, ok_errno: int | None = None) -> int:
    """Call prctl(2); return its non-negative result (the flag, for the ``PR_GET_*`` options)."""
    prctl = _libc().prctl
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    prctl.restype = ctypes.c_int
    result = int(prctl(option, arg, 0, 0, 0))
    if result < 0:
        code = ctypes.get_errno()
        if code == ok_errno:
            return 0
        raise ConfigError(f"cannot {what}: prctl failed: {os.strerror(code)}")
    return result


def _capset(*, effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for word in range(2):
        shift = 32 * word
        data[word].effective = effective >> shift & 0xFFFFFFFF
        data[word].permitted = permitted >> shift & 0xFFFFFFFF
        data[word].inheritable = inheritable >> shift & 0xFFFFFFFF
    libc = _libc()
    if hasattr(libc, "capset"):
        rc = libc.capset(ctypes.byref(header), data)
    else:
        number = _SYS_CAPSET.get(os.uname().machine)
        if number is None:
            raise ConfigError(f"capset: no system call number known for {os.uname().machine}")
        rc = libc.syscall(number, ctypes.byref(header), data)
    if rc != 0:
        raise ConfigError(f"cannot set capabilities: capset failed: {os.strerror(ctypes.get_errno())}")


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


def _cap_name(cap: int) -> str:
    return CAPABILITIES[cap] if cap < len(CAPABILITIES) else f"CAP_{cap}"


# ----- file permissions ------------------------------------------------------------------
_SECRET_FORBIDDEN_BITS: Final = 0o077
"""Permission bits a secret file must not have: any access by group or others."""


def unsafe_secret_mode(path: Path) -> int | None:
    """Return the permission bits of secret ``path`` when group or others have any, else None.

    The rule :func:`check_file_safety` applies with ``secret=True``; ``qgate up`` refuses to start
    on it. None also when ``path`` cannot be stat'ed (``check_file_safety`` reports that).
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    return mode if mode & _SECRET_FORBIDDEN_BITS else None


def foreign_owner(path: Path, run_user: str | int | None) -> int | None:
    """Return the owner uid of ``path`` when it is neither root nor ``run_user``, else None.

    The ownership rule of :func:`check_file_safety`; ``qgate up`` refuses a secret that fails it
    (its owner could read or replace it). None also when ``path`` cannot be stat'ed.
    """
    try:
        uid = path.stat().st_uid
    except OSError:
        return None
    owners = {0, _uid_of(run_user)} if run_user is not None else {0}
    return None if uid in owners else uid


def check_file_safety(path: Path, *, secret: bool, run_user: str | int | None = None) -> list[str]:
    """Return warnings about who besides the owner could read, replace or own ``path``.

    Checks (issue 6: key files and the control socket at start): a secret (private key, control
    socket) must have no group/other permission bits; no file may be writable by group/others;
    the owner must be root or the run user; the file must be a regular file or a socket; its
    directory must not let group/others swap it (writable without the sticky bit).

    Args:
        path: the file (symlinks are followed, like the open that will read it).
        secret: True for private keys and the control socket, False for public keys/certificates.
        run_user: the user the gateway drops to (name or uid); None: only root may own the file.

    Returns:
        Human-readable warnings, each naming ``path``; empty when nothing was found.
    """
    try:
        info = path.stat()
        parent = path.parent.stat()
    except OSError as exc:
        return [f"{path}: cannot check permissions: {exc.strerror or exc}"]
    mode = stat.S_IMODE(info.st_mode)
    warnings = []
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISSOCK(info.st_mode)):
        warnings.append(f"{path}: not a regular file")
    if secret and mode & _SECRET_FORBIDDEN_BITS:
        warnings.append(f"{path}: secret readable or usable by group/others (mode {mode:04o}); chmod 600")
    elif mode & 0o022:
        warnings.append(f"{path}: writable by group/others (mode {mode:04o}); chmod go-w")
    owners = {0, _uid_of(run_user)} if run_user is not None else {0}
    if info.st_uid not in owners:
        warnings.append(f"{path}: owned by uid {info.st_uid}, expected root or the run user")
    if parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX:
        warnings.append(
            f"{path}: directory {path.parent} is writable by group/others; the file can be replaced"
        )
    return warnings


def _uid_of(user: str | int) -> int:
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ConfigError(f"run user {user!r} does not exist") from None
