"""KME fault drills in the lab: faults injected through the KMEs' admin API, gateway events read back.

The lab's KMEs listen on ``0.0.0.0:8443`` inside the gateway namespaces, which the lab process
(in the root namespace) cannot reach. :func:`run_in_netns` runs a call in a short-lived thread
that has joined a namespace (``setns(2)`` acts on the calling thread only), so
:class:`KmeFaults` drives each KME's admin API (:class:`qgate.kms.faults.FaultAdminClient`,
mutual TLS with the run's ``ADMIN`` certificate) in-process, in milliseconds, without a
helper process per call.

:func:`read_events` parses the protocol events the gateway logs (``qkd_request_failed``,
``ratchet_complete``, ``handshake_complete``, ``mode_change``, ``degraded_handshake``, ...)
with their ``key=value`` details, so a drill can check what the gateway saw and did.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, TypeVar

from qgate import lab_net as net
from qgate import lab_setup as setup
from qgate.kms.faults import FaultAdminClient
from qgate.lab_procs import LabError

CLONE_NEWNET: Final = 0x40000000
"""``setns(2)`` namespace type: network (<linux/sched.h>)."""
NETNS_DIR: Final = Path("/var/run/netns")
"""Where ``ip netns`` keeps its namespace handles."""
ADMIN_TIMEOUT: Final = 5.0
"""Seconds per admin API request."""
_DETAIL_KEYS: Final = ("peer", "reason", "retry_in", "epoch", "key_ids", "old", "new")
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+): (\w+)(?: (.*))?$")
_DETAIL = re.compile(r"(?:^| )(" + "|".join(_DETAIL_KEYS) + r")=")

T = TypeVar("T")


def run_in_netns(ns: str, call: Callable[[], T]) -> T:
    """Run ``call()`` in a fresh thread that has joined network namespace ``ns``; return its result.

    Sockets made inside ``call`` belong to ``ns``; the rest of the process is untouched (the
    thread ends afterwards). Needs CAP_SYS_ADMIN (root).

    Raises:
        LabError: ``ns`` does not exist or cannot be joined.
        Exception: whatever ``call`` raised, re-raised in the caller's thread.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            _join(ns)
            result.append(call())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _join(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
    except OSError as exc:
        raise LabError(f"network namespace {ns}: {exc.strerror}") from exc
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise LabError(f"setns({ns}): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


class KmeFaults:
    """The admin API of both lab KMEs (started with ``--admin ADMIN``), by site ``a`` / ``b``.

    Args:
        topo: the lab topology (KME ``a`` runs in ``ga``, ``b`` in ``gb``).
        run_dir: the run directory, with ``pki/ADMIN.{pem,key}`` (``make_pki_and_identities(admin=True)``).
        timeout: seconds per admin request.

    Raises:
        ConfigError: the PKI files are unusable.
    """

    def __init__(self, topo: net.Topology, run_dir: Path, *, timeout: float = ADMIN_TIMEOUT) -> None:
        pki = run_dir / "pki"
        url = f"https://127.0.0.1:{setup.KME_PORT}"
        self._ns = {"a": topo.ns("ga"), "b": topo.ns("gb")}
        self._clients = {
            site: FaultAdminClient(
                url,
                ca=pki / "ca.pem",
                cert=pki / f"{setup.ADMIN_CN}.pem",
                key=pki / f"{setup.ADMIN_CN}.key",
                timeout=timeout,
            )
            for site in self._ns
        }

    def inject(self, site: str, kind: str, **params: object) -> dict[str, object]:
        """Add a fault to ``site``'s KME (e.g. ``inject("a", "error", code=503, endpoint="enc_keys")``).

        Returns:
            The KME's answer: the fault with its ``id`` (``down``: the fault as given).

        Raises:
            KmsError: the KME refused the fault or is unreachable.
        """
        client = self._clients[site]
        return run_in_netns(self._ns[site], lambda: client.inject(kind, **params))

    def clear(self, site: str) -> int:
        """Clear every fault of ``site``'s KME; return how many were active. Raises KmsError."""
        client = self._clients[site]
        return run_in_netns(self._ns[site], client.clear)

    def active(self, site: str) -> list[dict[str, object]]:
        """Return the faults active at ``site``'s KME (with ``remaining`` counts). Raises KmsError."""
        client = self._clients[site]
        return run_in_netns(self._ns[site], client.faults)


@dataclass(frozen=True)
class LogEvent:
    """One protocol event from a gateway log.

    Attributes:
        wall: wall-clock time of the line, seconds since the epoch (millisecond resolution).
        level: ``INFO``, ``WARNING``, ...
        kind: the event, e.g. ``qkd_request_failed``.
        detail: its ``key=value`` fields (``reason`` keeps its spaces; others are one word).
        line: the raw line.
    """

    wall: float
    level: str
    kind: str
    detail: dict[str, str]
    line: str

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The event's QKD key_IDs (``key_ids=a,b``; ``-`` or absent: none)."""
        value = self.detail.get("key_ids", "")
        return tuple(k for k in value.split(",") if k and k != "-")


def parse_detail(text: str) -> dict[str, str]:
    """Split an event's ``key=value ...`` tail into a mapping (known keys only; see module doc)."""
    marks = list(_DETAIL.finditer(text))
    detail: dict[str, str] = {}
    ends = [m.start() for m in marks[1:]] + [len(text)] * bool(marks)
    for mark, end in zip(marks, ends, strict=True):
        value = text[mark.end() : end]
        if mark.group(1) != "reason":
            value = value.split(" ", 1)[0].rstrip(":") if value else value
        detail[mark.group(1)] = value
    return detail


def read_events(log_path: Path, *, since: float = 0.0, kinds: Collection[str] = ()) -> list[LogEvent]:
    """Return a gateway log's events logged at or after wall time ``since`` (of ``kinds``, if given).

    Lines that are no ``<asctime> <LEVEL> <logger>: <word> ...`` record are skipped; an event
    is any such record whose first word is a lowercase identifier (the gateway's event names).
    """
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        match = _LINE.match(line)
        if match is None:
            continue
        stamp, level, _logger, kind, tail = match.groups()
        if not kind.islower() or (kinds and kind not in kinds):
            continue
        wall = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if wall + 0.001 > since:  # asctime truncates to the millisecond
            events.append(LogEvent(wall, level, kind, parse_detail(tail or ""), line))
    return events


_KME_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+): (.*)$")
_KEY_IDS = re.compile(r"key_IDs \[([^\]]*)\]")
_DELAY = re.compile(r"^fault delay\(seconds=([0-9.]+)\)")
_SERVED = ("enc_keys ", "dec_keys ")
"""Starts of the KME's lines for a served key request (``enc_keys SAE_A -> SAE_B: ... key_IDs [...]``)."""


def kme_records(log_path: Path, *, since: float = 0.0) -> list[tuple[float, str]]:
    """Return a KME log's records at or after wall time ``since`` as ``(wall time s, message)``."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        match = _KME_LINE.match(line)
        if match is None:
            continue
        wall = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if wall + 0.001 > since:
            records.append((wall, match.group(4)))
    return records


def key_ids_in(text: str) -> set[str]:
    """Return the key_IDs of a KME log message's ``key_IDs ['a', 'b']`` list (empty when none)."""
    match = _KEY_IDS.search(text)
    if match is None:
        return set()
    return {part.strip().strip("'\"") for part in match.group(1).split(",") if part.strip()}


def keys_lost_to_faults(log_path: Path, *, since: float = 0.0) -> set[str]:
    """Return the key_IDs a KME consumed (or lost) while a fault kept them from their SAE.

    Read from the KME's log after ``since``: the keys of the request a key-consuming fault
    (``short``, ``repeat_id``, ``wrong_size``, ``close``, ``delay``) hit, the key_IDs a
    ``forget`` fault dropped, and the keys the peer KME never took (it was down). An ``error``
    fault touches no key. A ``delay`` fault's request is served ``seconds`` later, so its keys
    are the first served at or after that time.
    """
    lost: set[str] = set()
    due: list[float] = []  # times at which a hit request is served, oldest first
    for wall, message in kme_records(log_path, since=since):
        if message.startswith("fault ") and " hits " in message and not message.startswith("fault error("):
            delay = _DELAY.match(message)
            due.append(wall + (float(delay.group(1)) - 0.01 if delay else 0.0))
        elif message.startswith("fault: forgot delivered key_IDs"):
            lost |= key_ids_in(message)
            due = due[1:]
        elif "did not take key_IDs" in message:
            lost |= key_ids_in(message)
        elif message.startswith(_SERVED) and due and wall >= due[0]:
            lost |= key_ids_in(message)
            due = due[1:]
    return lost
