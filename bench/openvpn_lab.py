"""OpenVPN between the two lab gateways: the classical-VPN comparison path of ``bench/throughput.py``.

Same namespaces, addresses and routes as the qgate lab (:mod:`qgate.lab_net`): an OpenVPN
2.6 process in each gateway namespace, UDP port 1194 on the WAN addresses, a TUN device
``qgovpn0`` with the same inner MTU as qgate's TUN (1420 bytes, read from the lab policy
template), point-to-point addresses 10.255.1.1 <-> 10.255.1.2 and a route to the peer LAN
through the tunnel (``--route``), so host A reaches host B exactly as through qgate.

Data channel: AES-256-GCM. OpenVPN's static-key mode (``--secret``) cannot do it (2.6 says
"Cipher 'AES-256-GCM' mode not supported": static keys only allow CBC+HMAC ciphers), so this
uses OpenVPN's TLS mode in peer-to-peer form with a throw-away PKI (:func:`qgate.pki.make_pki`:
an ECDSA P-256 CA, gateway B's certificate with serverAuth, gateway A's with clientAuth, both
checked with ``--remote-cert-tls``): gateway B is ``--tls-server`` (``--dh none``: ECDHE),
gateway A ``--tls-client``, and ``--data-ciphers AES-256-GCM`` leaves only that cipher to
negotiate. The kernel data-channel offload (DCO) is disabled (``--disable-dco``) so that the
data channel runs in user space like qgate's (the lab kernel has no ovpn-dco module anyway).
:func:`data_cipher` reads the negotiated cipher back from the log.

OpenVPN is installed with ``apt-get install -y openvpn`` when missing (:func:`ensure_openvpn`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

from qgate import constants as C
from qgate import lab_net as net
from qgate.errors import QgateError
from qgate.lab import Lab
from qgate.lab_procs import Child, LabError, wait_until

log = logging.getLogger(__name__)

REPO: Final = Path(__file__).resolve().parent.parent
PORT: Final = 1194
DEVICE: Final = "qgovpn0"
CIPHER: Final = "AES-256-GCM"
P2P: Final = {"a": ("10.255.1.1", "10.255.1.2"), "b": ("10.255.1.2", "10.255.1.1")}
"""Tunnel point-to-point addresses (local, remote) per site."""
CERT_IDS: Final = {"a": "OVPN_A", "b": "OVPN_B"}
START_TIMEOUT: Final = 30.0
"""Seconds for both ends to finish the TLS handshake ("Initialization Sequence Completed")."""
INSTALL_TIMEOUT: Final = 300.0
_CIPHER_RE: Final = re.compile(r"Data Channel: [Cc]ipher '([^']+)'")


def ensure_openvpn() -> str | None:
    """Make sure the ``openvpn`` program exists, installing the Debian package if needed.

    Runs ``apt-get install -y openvpn`` (and, when that fails, ``apt-get update`` and the install
    again); their output goes to stderr.

    Returns:
        None when ``openvpn`` is available, else why it is not (for a skip message).
    """
    if shutil.which("openvpn") is not None:
        return None
    if shutil.which("apt-get") is None:
        return "openvpn is not installed and there is no apt-get to install it"
    sys.stderr.write("openvpn not found: apt-get install -y openvpn\n")
    for argv in (
        ["apt-get", "install", "-y", "openvpn"],
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "openvpn"],
    ):
        try:
            subprocess.run(argv, stdout=sys.stderr, stderr=sys.stderr, stdin=subprocess.DEVNULL,
                           timeout=INSTALL_TIMEOUT, check=False, env=_apt_env())  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"openvpn is not installed and {' '.join(argv)} failed: {exc}"
        if shutil.which("openvpn") is not None:
            return None
    return "openvpn is not installed and apt-get install -y openvpn did not install it"


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def qgate_tun_mtu() -> int:
    """Return the inner MTU of qgate's TUN in the lab (bytes): the lab policy template's, else the default."""
    from qgate.policy import load_policy

    try:
        return load_policy(REPO / "policies" / "site-a.yaml").tun.mtu
    except (QgateError, OSError) as exc:
        log.warning("cannot read the lab policy template (%s); using the default TUN MTU", exc)
        return C.DEFAULT_TUN_MTU


def write_pki(run_dir: Path) -> Path:
    """Write the throw-away OpenVPN PKI into ``<run_dir>/ovpn-pki`` and return that directory.

    Gateway B's certificate (``OVPN_B``) has serverAuth (+ clientAuth) and gateway B's WAN
    address as SAN; gateway A's (``OVPN_A``) has clientAuth.
    """
    from qgate.pki import make_pki

    pki = run_dir / "ovpn-pki"
    make_pki(pki, kmes={CERT_IDS["b"]: [net.GW_B_WAN]}, saes=[CERT_IDS["a"]])
    return pki


def openvpn_argv(site: str, pki: Path, mtu: int) -> list[str]:
    """Return the ``openvpn`` command line of gateway ``site`` (``a``: TLS client, ``b``: TLS server)."""
    local, remote = P2P[site]
    wan, peer_wan = (net.GW_A_WAN, net.GW_B_WAN) if site == "a" else (net.GW_B_WAN, net.GW_A_WAN)
    peer_lan = net.LAN_B if site == "a" else net.LAN_A
    cert = CERT_IDS[site]
    role = (["--tls-client", "--remote-cert-tls", "server"] if site == "a"
            else ["--tls-server", "--dh", "none", "--remote-cert-tls", "client"])  # fmt: skip
    return [
        "openvpn", "--dev", DEVICE, "--dev-type", "tun", "--tun-mtu", str(mtu),
        "--proto", "udp", "--local", wan, "--lport", str(PORT), "--remote", peer_wan, str(PORT),
        "--ifconfig", local, remote, "--route", *_net_and_mask(peer_lan),
        *role, "--ca", str(pki / "ca.pem"), "--cert", str(pki / f"{cert}.pem"),
        "--key", str(pki / f"{cert}.key"), "--data-ciphers", CIPHER, "--disable-dco",
        "--verb", "3", "--mute-replay-warnings",
    ]  # fmt: skip


def _net_and_mask(cidr: str) -> list[str]:
    network = ipaddress.IPv4Network(cidr)
    return [str(network.network_address), str(network.netmask)]


def start_openvpn(lab: Lab) -> list[Child]:
    """Start OpenVPN in both gateway namespaces and wait until both completed their handshake.

    The lab must have been built without routes between the LANs (``Lab(tunnel=True)``).

    Returns:
        The two OpenVPN children (gateway B first), for liveness checks.

    Raises:
        LabError: an OpenVPN process exited or the handshake did not finish in time.
    """
    pki = write_pki(lab.run_dir)
    mtu = qgate_tun_mtu()
    children = [lab.start(f"openvpn-{site}", role, openvpn_argv(site, pki, mtu))
                for site, role in (("b", "gb"), ("a", "ga"))]  # fmt: skip

    def ready() -> bool:
        for child in children:
            lab.kids.check_alive(child)
        return all("Initialization Sequence Completed" in child.tail(200) for child in children)

    wait_until("both OpenVPN ends to complete the TLS handshake", ready, timeout=START_TIMEOUT, interval=0.2)
    return children


def data_cipher(children: list[Child]) -> str | None:
    """Return the data-channel cipher both OpenVPN ends report in their logs (None when they differ)."""
    found = set()
    for child in children:
        match = _CIPHER_RE.search(child.tail(400))
        found.add(match.group(1) if match else None)
    return found.pop() if len(found) == 1 else None


def require_cipher(children: list[Child]) -> str:
    """Return the negotiated data cipher, raising LabError unless it is AES-256-GCM on both ends."""
    cipher = data_cipher(children)
    if cipher != CIPHER:
        raise LabError(f"OpenVPN data channel is {cipher!r}, not {CIPHER}")
    return cipher
