"""TUN device and netconfig (pyroute2) in a throw-away network namespace."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

pytestmark = pytest.mark.netns

# Runs inside the namespace: open the TUN, configure it, check what the kernel shows, make the
# kernel route a packet into the TUN (read it back), write a packet out, then remove the config.
SCRIPT = r"""
import ipaddress, json, select, socket, subprocess
from qgate.dataplane.tun import TunDevice
from qgate.netconfig import configure_tun
from qgate.errors import DataPlaneError

def sh(*argv):
    return subprocess.run(list(argv), capture_output=True, text=True)

out = {}
tun = TunDevice.open("qgtun0")
out["empty_read"] = tun.read()
handle = configure_tun("qgtun0", mtu=1380, address=ipaddress.ip_interface("10.255.0.1/30"),
                       routes=[ipaddress.ip_network("10.2.0.0/24"), ipaddress.ip_network("10.3.0.0/16")])
out["link"] = sh("ip", "-o", "link", "show", "qgtun0").stdout
out["addr"] = sh("ip", "-o", "-4", "addr", "show", "qgtun0").stdout
out["routes"] = sh("ip", "route", "show", "dev", "qgtun0").stdout
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"hello-tun", ("10.2.0.7", 9999))
select.select([tun.fd], [], [], 2.0)
pkt = tun.read()
out["packet_version"] = pkt[0] >> 4
out["packet_dst"] = socket.inet_ntoa(pkt[16:20])
out["packet_tail"] = pkt[-9:].decode()
# A reply written into the TUN reaches a local socket (swap addresses and ports; checksum 0 is ok for UDP).
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("10.255.0.1", 7777)); r.settimeout(2)
import struct
payload = b"from-tun"
udp = struct.pack("!HHHH", 9999, 7777, 8 + len(payload), 0) + payload
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                  socket.inet_aton("10.2.0.7"), socket.inet_aton("10.255.0.1"))
csum = sum(struct.unpack("!10H", hdr)); csum = (csum & 0xFFFF) + (csum >> 16); csum = ~csum & 0xFFFF
hdr = hdr[:10] + struct.pack("!H", csum) + hdr[12:]
tun.write(hdr + udp)
out["written_received"] = r.recvfrom(100)[0].decode()
try:
    configure_tun("qgtun0", mtu=1380, address=None, routes=[ipaddress.ip_network("10.2.0.0/24")])
except DataPlaneError as exc:
    out["duplicate_route_error"] = str(exc)
handle.remove(); handle.remove()
out["routes_after"] = sh("ip", "route", "show", "dev", "qgtun0").stdout
out["addr_after"] = sh("ip", "-o", "-4", "addr", "show", "qgtun0").stdout
tun.close(); tun.close()
out["link_after_close"] = sh("ip", "link", "show", "qgtun0").returncode
try:
    configure_tun("qgnosuchdev", mtu=1400, address=None, routes=[])
except DataPlaneError as exc:
    out["missing_dev_error"] = str(exc)
try:
    configure_tun("lo", mtu=100, address=None, routes=[])
except DataPlaneError as exc:
    out["bad_mtu_error"] = str(exc)
import asyncio
async def in_loop():
    with TunDevice.open("qgtun1") as t1:
        h = configure_tun("qgtun1", mtu=1400, address=None, routes=[ipaddress.ip_network("10.9.0.0/24")])
        routes = sh("ip", "route", "show", "dev", "qgtun1").stdout
        h.remove()
        return routes
out["routes_from_asyncio"] = asyncio.run(in_loop())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tun_run(
    netns_module: Callable[[str], str], ns_python: Callable[..., subprocess.CompletedProcess[str]]
) -> dict[str, object]:
    ns = netns_module("tn")
    proc = ns_python(ns, SCRIPT)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_tun_read_returns_none_when_no_packet_waits(tun_run: dict[str, object]) -> None:
    assert tun_run["empty_read"] is None


def test_configure_tun_sets_mtu_address_up_and_routes(tun_run: dict[str, object]) -> None:
    assert "mtu 1380" in str(tun_run["link"])
    assert ",UP" in str(tun_run["link"])
    assert "10.255.0.1/30" in str(tun_run["addr"])
    routes = str(tun_run["routes"])
    assert "10.2.0.0/24" in routes and "10.3.0.0/16" in routes


def test_tun_delivers_routed_packet_without_packet_info_header(tun_run: dict[str, object]) -> None:
    assert tun_run["packet_version"] == 4
    assert tun_run["packet_dst"] == "10.2.0.7"
    assert tun_run["packet_tail"] == "hello-tun"


def test_tun_write_injects_packet_into_kernel(tun_run: dict[str, object]) -> None:
    assert tun_run["written_received"] == "from-tun"


def test_configure_tun_existing_route_raises_dataplane_error(tun_run: dict[str, object]) -> None:
    assert "add route 10.2.0.0/24 via qgtun0 failed" in str(tun_run["duplicate_route_error"])
    assert "EEXIST" in str(tun_run["duplicate_route_error"])


def test_nethandle_remove_deletes_routes_and_address_idempotently(tun_run: dict[str, object]) -> None:
    assert tun_run["routes_after"] == ""
    assert tun_run["addr_after"] == ""


def test_tun_close_deletes_interface(tun_run: dict[str, object]) -> None:
    assert tun_run["link_after_close"] != 0


def test_configure_tun_missing_interface_or_bad_mtu_raise_dataplane_error(tun_run: dict[str, object]) -> None:
    assert "qgnosuchdev not found" in str(tun_run["missing_dev_error"])
    assert "MTU 100" in str(tun_run["bad_mtu_error"])


def test_tun_open_invalid_name_raises_dataplane_error() -> None:
    from qgate.dataplane.tun import TunDevice
    from qgate.errors import DataPlaneError

    with pytest.raises(DataPlaneError, match="invalid TUN device name"):
        TunDevice.open("a-name-much-too-long-for-linux")


def test_netns_fixture_deletes_namespace(netns: Callable[[str], str]) -> None:
    name = netns("x")
    assert name.startswith("qg") and len(name) == 9
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert name in listed


def test_configure_tun_works_inside_running_asyncio_loop(tun_run: dict[str, object]) -> None:
    assert "10.9.0.0/24" in str(tun_run["routes_from_asyncio"])


# Inside a fresh namespace: a persistent TUN made with `ip tuntap` must not be attached to, both when
# sysfs shows it and when only the kernel (IFF_TUN_EXCL) can tell; the device must be left as it was.
EXISTING_SCRIPT = r"""
import json, subprocess
import qgate.dataplane.tun as tunmod
from qgate.errors import DataPlaneError

subprocess.run(["ip", "tuntap", "add", "dev", "qgtun0", "mode", "tun"], check=True)
out = {}
for key, sysfs in (("sysfs_error", tunmod.SYS_CLASS_NET), ("kernel_error", "/nonexistent-sysfs")):
    tunmod.SYS_CLASS_NET = sysfs
    try:
        tunmod.TunDevice.open("qgtun0").close()
        out[key] = None
    except DataPlaneError as exc:
        out[key] = str(exc)
out["still_there"] = subprocess.run(["ip", "link", "show", "qgtun0"], capture_output=True).returncode == 0
print(json.dumps(out))
"""


def test_tun_open_refuses_existing_device_of_same_name(
    netns: Callable[[str], str], ns_python: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    proc = ns_python(netns("te"), EXISTING_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "a network device named qgtun0 already exists" in str(out["sysfs_error"])
    assert "a network device named qgtun0 already exists" in str(out["kernel_error"])
    assert out["still_there"] is True
