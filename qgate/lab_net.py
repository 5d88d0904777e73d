"""The two-site lab topology in network namespaces: build it, address it, tear it down.

```
hostA (10.1.0.2/24) -- gwA lan 10.1.0.1/24 | gwA wan 10.99.0.1/24 -- WAN --
    gwB wan 10.99.0.2/24 | gwB lan 10.2.0.1/24 -- hostB (10.2.0.2/24)
```

Namespaces are ``qg<run><role>`` with run = 6 hex characters and role ``ha``, ``ga``, ``gb``,
``hb``; veth ends are ``qg<run><end>`` (10 characters, below the 15-character limit). IPv6 is
off in every namespace and IPv4 forwarding is on in the gateway namespaces. Without a tunnel
(``routed=True``, the bare-veth baseline) the gateways route the peer LAN over the WAN link;
with qgate the gateways add those routes through their TUN devices themselves. Uses the ``ip``
command (iproute2). The flood bench adds a spoofing attacker, ``qg<run>sp``, with a tap into each
gateway's WAN side (:func:`add_spoofer`); :func:`destroy_topology` removes it too.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import subprocess
from dataclasses import dataclass
from typing import Final

from qgate.errors import DataPlaneError

log = logging.getLogger(__name__)

HOST_A: Final = "10.1.0.2"
GW_A_LAN: Final = "10.1.0.1"
GW_A_WAN: Final = "10.99.0.1"
GW_B_WAN: Final = "10.99.0.2"
GW_B_LAN: Final = "10.2.0.1"
HOST_B: Final = "10.2.0.2"
LAN_A: Final = "10.1.0.0/24"
LAN_B: Final = "10.2.0.0/24"
ROLES: Final = ("ha", "ga", "gb", "hb")
"""Namespace role suffixes: host A, gateway A, gateway B, host B."""
RUN_ID_RE: Final = re.compile(r"^[0-9a-f]{6}$")
IP_TIMEOUT: Final = 10.0
"""Seconds one ``ip``/``sysctl`` command may take."""


def new_run_id() -> str:
    """Return a fresh run identifier: 6 random lowercase hex characters."""
    return secrets.token_hex(3)


@dataclass(frozen=True)
class Topology:
    """Names of one lab run's namespaces and links.

    Attributes:
        run_id: 6 hex characters shared by every name of the run.
    """

    run_id: str

    def ns(self, role: str) -> str:
        """Return the namespace name for ``role`` (``ha``, ``ga``, ``gb`` or ``hb``)."""
        if role not in ROLES:
            raise ValueError(f"unknown lab role {role!r}")
        return f"qg{self.run_id}{role}"

    def link(self, end: str) -> str:
        """Return the interface name of veth end ``end`` (``ha``, ``al``, ``aw``, ``bw``, ``bl``, ``hb``)."""
        return f"qg{self.run_id}{end}"

    @property
    def namespaces(self) -> list[str]:
        """All four namespace names, hosts and gateways."""
        return [self.ns(r) for r in ROLES]

    @property
    def wan_a(self) -> str:
        """Gateway A's WAN interface (where the lab captures)."""
        return self.link("aw")


def ns_argv(ns: str, argv: list[str]) -> list[str]:
    """Return ``argv`` wrapped to run inside namespace ``ns`` (``ip netns exec``, which execs)."""
    return ["ip", "netns", "exec", ns, *argv]


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataPlaneError(f"lab command {' '.join(argv)!r} failed: {exc}") from exc
    if proc.returncode != 0:
        raise DataPlaneError(f"lab command {' '.join(argv)!r} failed: {proc.stderr.strip()}")


def _veth(topo: Topology, a_ns: str, a_end: str, b_ns: str, b_end: str) -> None:
    _run(
        [
            "ip", "link", "add", topo.link(a_end), "netns", topo.ns(a_ns), "type", "veth",
            "peer", "name", topo.link(b_end), "netns", topo.ns(b_ns),
        ]
    )  # fmt: skip


def _addr(topo: Topology, role: str, end: str, cidr: str) -> None:
    ns, dev = topo.ns(role), topo.link(end)
    _run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
    _run(["ip", "-n", ns, "link", "set", dev, "up"])


def _sysctls(ns: str, forward: bool) -> None:
    settings = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
    if forward:
        settings.append("net.ipv4.ip_forward=1")
    _run(ns_argv(ns, ["sysctl", "-q", "-w", *settings]))
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])


def create_topology(topo: Topology, *, routed: bool) -> None:
    """Create the namespaces, veth pairs, addresses and host routes of one lab run.

    Args:
        topo: the run's names (nothing with these names may exist yet).
        routed: also route each LAN to the other over the WAN (bare-veth baseline, no tunnel).

    Raises:
        DataPlaneError: an ``ip``/``sysctl`` command failed; what was created stays (call
            :func:`destroy_topology`, which callers do in a ``finally``).
    """
    for role in ROLES:
        _run(["ip", "netns", "add", topo.ns(role)])
        _sysctls(topo.ns(role), forward=role in ("ga", "gb"))
    _veth(topo, "ha", "ha", "ga", "al")
    _veth(topo, "ga", "aw", "gb", "bw")
    _veth(topo, "gb", "bl", "hb", "hb")
    _addr(topo, "ha", "ha", f"{HOST_A}/24")
    _addr(topo, "ga", "al", f"{GW_A_LAN}/24")
    _addr(topo, "ga", "aw", f"{GW_A_WAN}/24")
    _addr(topo, "gb", "bw", f"{GW_B_WAN}/24")
    _addr(topo, "gb", "bl", f"{GW_B_LAN}/24")
    _addr(topo, "hb", "hb", f"{HOST_B}/24")
    _run(["ip", "-n", topo.ns("ha"), "route", "add", "default", "via", GW_A_LAN])
    _run(["ip", "-n", topo.ns("hb"), "route", "add", "default", "via", GW_B_LAN])
    if routed:
        _run(["ip", "-n", topo.ns("ga"), "route", "add", LAN_B, "via", GW_B_WAN])
        _run(["ip", "-n", topo.ns("gb"), "route", "add", LAN_A, "via", GW_A_WAN])
    log.info("lab topology %s created (routed=%s)", topo.run_id, routed)


def namespace_exists(ns: str) -> bool:
    """Return whether network namespace ``ns`` exists (``/run/netns/<ns>``)."""
    return os.path.exists(f"/run/netns/{ns}")


def kill_namespace_processes(ns: str) -> int:
    """SIGKILL every process still running in namespace ``ns``; return how many were signalled."""
    try:
        proc = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    count = 0
    for word in proc.stdout.split():
        if word.isdigit() and int(word) != os.getpid():
            try:
                os.kill(int(word), signal.SIGKILL)
                count += 1
            except ProcessLookupError:
                pass
    return count


def destroy_topology(topo: Topology) -> list[str]:
    """Kill leftover processes in, and delete, every namespace of the run; never raises.

    Deleting a namespace deletes the veth ends in it (and so their peers).

    Returns:
        Problems met (empty when everything is gone), for the caller to report.
    """
    problems: list[str] = []
    for ns in [*topo.namespaces, spoofer_ns(topo)]:  # the flood bench's attacker, if one was added
        if not namespace_exists(ns):
            continue
        killed = kill_namespace_processes(ns)
        if killed:
            log.warning("killed %d leftover process(es) in %s", killed, ns)
        try:
            _run(["ip", "netns", "del", ns])
        except DataPlaneError as exc:
            problems.append(str(exc))
    log.info("lab topology %s destroyed", topo.run_id)
    return problems


SPOOF_ROLE: Final = "sp"
"""Namespace role suffix of the flood bench's spoofing attacker (not in ROLES: only that bench adds it)."""
SPOOF_MACS: Final = {
    "a": ("02:71:67:00:0a:01", "02:71:67:00:0a:02"),
    "b": ("02:71:67:00:0b:01", "02:71:67:00:0b:02"),
}
"""Per site: MAC addresses of the attacker's tap end and of the end in that gateway's namespace."""


@dataclass(frozen=True)
class SpoofTap:
    """One attacker link into a gateway's WAN side (a veth pair: a tap in front of its WAN port).

    Attributes:
        site: ``a`` or ``b``, the gateway the tap reaches.
        attacker_if: the end in the attacker namespace (``qg<run>sa`` / ``qg<run>sb``).
        gateway_if: the end in the gateway namespace (``qg<run>xa`` / ``qg<run>xb``), no address.
        attacker_mac: MAC of ``attacker_if`` (frame source).
        gateway_mac: MAC of ``gateway_if`` (frame destination).
    """

    site: str
    attacker_if: str
    gateway_if: str
    attacker_mac: str
    gateway_mac: str


def spoofer_ns(topo: Topology) -> str:
    """Return the name of the run's spoofing-attacker namespace, ``qg<run>sp``."""
    return f"qg{topo.run_id}{SPOOF_ROLE}"


def add_spoofer(topo: Topology) -> dict[str, SpoofTap]:
    """Create the attacker namespace with one tap into each gateway's WAN side; return them by site.

    Frames sent on a tap arrive at the gateway's kernel as if from its WAN link, so datagrams
    carrying the peer's source address and port reach the gateway's UDP socket, while every
    answer goes over the real WAN to the real peer: an off-path spoofer. The gateway ends carry
    no address (nothing is routed through them; ``rp_filter`` is off on them so the peer's
    source address is accepted there). :func:`destroy_topology` removes the namespace too.

    Raises:
        DataPlaneError: an ``ip``/``sysctl`` command failed (call :func:`remove_spoofer`).
    """
    ns = spoofer_ns(topo)
    _run(["ip", "netns", "add", ns])
    _sysctls(ns, forward=False)
    taps: dict[str, SpoofTap] = {}
    for site in ("a", "b"):
        tap = SpoofTap(site, topo.link(f"s{site}"), topo.link(f"x{site}"), *SPOOF_MACS[site])
        gw_ns = topo.ns(f"g{site}")
        _run(
            [
                "ip", "link", "add", tap.attacker_if, "netns", ns, "address", tap.attacker_mac,
                "type", "veth", "peer", "name", tap.gateway_if, "netns", gw_ns, "address", tap.gateway_mac,
            ]
        )  # fmt: skip
        _run(ns_argv(gw_ns, ["sysctl", "-q", "-w", f"net.ipv4.conf.{tap.gateway_if}.rp_filter=0"]))
        _run(["ip", "-n", gw_ns, "link", "set", tap.gateway_if, "up"])
        _run(["ip", "-n", ns, "link", "set", tap.attacker_if, "up"])
        taps[site] = tap
    log.info("spoofer namespace %s attached to both gateways' WAN side", ns)
    return taps


def remove_spoofer(topo: Topology) -> list[str]:
    """Kill what runs in the attacker namespace and delete it (its taps go with it); never raises.

    Returns:
        Problems met (empty when it is gone or never existed).
    """
    ns = spoofer_ns(topo)
    if not namespace_exists(ns):
        return []
    kill_namespace_processes(ns)
    try:
        _run(["ip", "netns", "del", ns])
    except DataPlaneError as exc:
        return [str(exc)]
    return []


def lab_namespaces() -> list[str]:
    """Return the names of all existing namespaces that look like lab namespaces (``qg`` + 6 hex + role)."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    pattern = re.compile(r"^qg[0-9a-f]{6}(" + "|".join(ROLES) + r")$")
    return sorted(n for n in names if pattern.match(n))
