"""VnetTun (qgate.dataplane.tunio) in a throw-away namespace: TSO reads, split, coalesced GSO writes.

A TCP flow is looped through the TUN by a user-space reflector: the client (10.77.0.1) connects
to 10.77.1.1, routed into the TUN; the reflector reads (super-)packets, splits them into real
segments, rewrites ``dst -> 10.77.0.1`` and ``src 10.77.1.1 <-> 10.77.1.2`` with fresh checksums,
coalesces them and writes them back, so the server on 10.77.0.1 sees a peer 10.77.1.2. The bytes
only arrive intact if every split, checksum and coalesced write is right.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

pytestmark = pytest.mark.netns

SCRIPT = r"""
import hashlib, json, os, select, socket, subprocess, threading
from qgate.dataplane import offload as off
from qgate.dataplane.tunio import VnetTun
from qgate.dataplane.coalesce import coalesce
from qgate.errors import DataPlaneError

OFFLOAD = {offload}
tun = VnetTun.open("qgvt0", offload=OFFLOAD)
try:
    VnetTun.open("qgvt0")
    refused = False
except DataPlaneError:
    refused = True
for cmd in (["ip", "link", "set", "qgvt0", "mtu", "1500", "up"],
            ["ip", "addr", "add", "10.77.0.1/32", "dev", "qgvt0"],
            ["ip", "route", "add", "10.77.1.0/24", "dev", "qgvt0"]):
    subprocess.run(cmd, check=True)
A, F1, F2 = bytes([10, 77, 0, 1]), bytes([10, 77, 1, 1]), bytes([10, 77, 1, 2])
st = dict(reads=0, gso_reads=0, max_read=0, segments=0, writes=0, gso_writes=0, errors=0)
stop = threading.Event()

def reflect():
    while not stop.is_set():
        if not select.select([tun.fd], [], [], 0.05)[0]:
            continue
        batch = []
        while (got := tun.read()) is not None:
            vnet, packet = got
            st["reads"] += 1
            st["gso_reads"] += vnet.gso_size > 0
            st["max_read"] = max(st["max_read"], len(packet))
            for seg in off.split_tso(vnet, packet):
                dst = seg[16:20]
                if seg[0] >> 4 != 4 or dst not in (F1, F2):
                    continue
                b = bytearray(seg)
                b[12:16], b[16:20] = (F2 if dst == F1 else F1), A
                batch.append(off.recompute_checksums(b))
        st["segments"] += len(batch)
        for h, p in coalesce(batch):
            try:
                tun.write(h, p)
            except DataPlaneError:
                st["errors"] += 1
            st["writes"] += 1
            st["gso_writes"] += h != off.ZERO_VNET_BYTES

data = os.urandom(8 << 20)
got = hashlib.sha256()
count = [0]
srv = socket.socket(); srv.bind(("10.77.0.1", 5201)); srv.listen(1); srv.settimeout(8)
def serve():
    conn, peer = srv.accept()
    st["peer"] = peer[0]
    conn.settimeout(20)
    while chunk := conn.recv(1 << 20):
        got.update(chunk); count[0] += len(chunk)
    conn.close()
threads = [threading.Thread(target=reflect), threading.Thread(target=serve)]
for t in threads: t.start()
cli = socket.create_connection(("10.77.1.1", 5201), timeout=8, source_address=("10.77.0.1", 0))
cli.sendall(data); cli.close()
threads[1].join(30); stop.set(); threads[0].join(5)
st.update(sha_ok=got.hexdigest() == hashlib.sha256(data).hexdigest(), received=count[0],
          vnet=tun.vnet, offloads=tun.offloads, refused_existing=refused)
tun.close()
print(json.dumps(st))
"""


@pytest.mark.parametrize("offload", [True, False])
def test_tcp_flow_through_vnet_tun_survives_split_and_coalesced_gso_writes(
    offload: bool,
    netns: Callable[[str], str],
    ns_python: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    ns = netns("v")
    result = ns_python(ns, SCRIPT.replace("{offload}", str(offload)), timeout=40)
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout.strip().splitlines()[-1])
    assert st["sha_ok"] and st["received"] == 8 << 20
    assert st["peer"] == "10.77.1.2" and st["refused_existing"]
    assert st["errors"] == 0
    if offload:
        assert st["vnet"] and st["offloads"] & 0x07 == 0x07
        assert st["gso_reads"] > 0 and st["max_read"] > 1500
        assert st["gso_writes"] > 0 and st["segments"] > st["writes"]
    else:
        assert not st["vnet"] and st["gso_reads"] == 0 and st["max_read"] <= 1500


UDP_SCRIPT = r"""
import json, socket, subprocess, struct
from qgate.dataplane import offload as off
from qgate.dataplane.tunio import VnetTun

tun = VnetTun.open("qgvu0", offload={offload})
for cmd in (["ip", "link", "set", "qgvu0", "up"],
            ["ip", "addr", "add", "10.78.0.1/32", "dev", "qgvu0"],
            ["ip", "route", "add", "10.78.1.0/24", "dev", "qgvu0"]):
    subprocess.run(cmd, check=True)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("10.78.0.1", 7000)); sock.settimeout(2)

def datagram(i, size):
    payload = bytes([i % 256]) * size
    udp = struct.pack("!HHHH", 5000, 7000, 8 + size, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + size, i, 0x4000, 64, 17, 0,
                     bytes([10, 78, 1, 2]), bytes([10, 78, 0, 1]))
    return off.recompute_checksums(ip + udp)

sent = [datagram(i, 100) for i in range(150)] + [datagram(150, 40)]
writes = []
plain_write = tun.write
tun.write = lambda header, packet: (writes.append(header), plain_write(header, packet))[1]
errors = tun.write_packets(sent)
got = []
try:
    while len(got) < len(sent):
        got.append(sock.recv(2048))
except socket.timeout:
    pass
print(json.dumps(dict(errors=errors, received=len(got), intact=got == [d[28:] for d in sent],
                      writes=len(writes), vnet=tun.vnet, offloads=tun.offloads)))
tun.close()
"""


@pytest.mark.parametrize("offload", [True, False])
def test_udp_datagrams_written_as_uso_super_packets_arrive_as_the_same_datagrams(
    offload: bool,
    netns: Callable[[str], str],
    ns_python: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    ns = netns("u")
    result = ns_python(ns, UDP_SCRIPT.replace("{offload}", str(offload)), timeout=30)
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout.strip().splitlines()[-1])
    assert st["errors"] == 0 and st["received"] == 151 and st["intact"], st
    if offload and st["offloads"] & 0x60:  # USO: 151 datagrams in 3 writes (64 + 64 + 23)
        assert st["writes"] == 3
    else:
        assert st["writes"] == 151
