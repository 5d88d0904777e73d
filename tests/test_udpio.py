"""Batched UDP I/O (qgate.dataplane.udpio): GSO sends and GRO receives on loopback, and the fallback."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from qgate.dataplane.udpio import UdpBatchIO, group_equal_runs


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.setblocking(False)
        yield rx, tx
    finally:
        rx.close()
        tx.close()


def _drain(io: UdpBatchIO, want: int) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got) < want and time.monotonic() < deadline:
        got += [d for d, _ in io.recv_batch()]
        if len(got) < want:
            time.sleep(0.01)
    return got


def _datagrams() -> list[bytes]:
    return [os.urandom(1400) for _ in range(39)] + [os.urandom(700)]


@pytest.mark.parametrize(("gso", "gro"), [(True, True), (True, False), (False, True), (False, False)])
def test_batch_of_40_datagrams_arrives_as_40_datagrams_with_their_contents(
    pair: tuple[socket.socket, socket.socket], gso: bool, gro: bool
) -> None:
    rx, tx = pair
    receiver = UdpBatchIO(rx, gro=gro)
    sender = UdpBatchIO(tx, gso=gso, gro=False)
    sent = _datagrams()
    assert sender.send_batch(sent, rx.getsockname()) == 0
    assert _drain(receiver, 40) == sent


def test_gso_refused_by_the_kernel_falls_back_to_plain_sends_once(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    rx, tx = pair

    class Refusing(socket.socket):
        def sendmsg(self, *args: object, **kwargs: object) -> int:
            raise OSError(errno.EIO, "Input/output error")

    refusing = Refusing(socket.AF_INET, socket.SOCK_DGRAM, fileno=os.dup(tx.fileno()))
    try:
        sender = UdpBatchIO(refusing, gro=False)
        sent = _datagrams()
        assert sender.send_batch(sent, rx.getsockname()) == 0
        assert sender.send_batch(sent, rx.getsockname()) == 0
        assert not sender.gso
        assert sum("UDP GSO refused" in r.message for r in caplog.records) == 1
        assert _drain(UdpBatchIO(rx), 80) == sent + sent
    finally:
        refusing.close()


def test_group_equal_runs_ends_a_group_after_a_shorter_datagram_and_at_64_segments() -> None:
    sizes = [100] * 70 + [50, 100, 100, 200, 200, 10]
    groups = group_equal_runs([b"x" * n for n in sizes])
    assert groups == [(0, 64), (64, 71), (71, 73), (73, 76)]
    assert group_equal_runs([b"x" * 1400] * 50, max_bytes=14000) == [
        (0, 10),
        (10, 20),
        (20, 30),
        (30, 40),
        (40, 50),
    ]


def test_recv_batch_returns_empty_when_nothing_waits(pair: tuple[socket.socket, socket.socket]) -> None:
    assert UdpBatchIO(pair[0]).recv_batch() == []


def test_recv_batch_without_gro_stops_at_max_datagrams_and_leaves_the_rest_queued(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # The forwarder's bound on the control socket (issue 10): one wake takes 64, the rest waits.
    rx, tx = pair
    control = UdpBatchIO(rx, gso=False, gro=False)
    sent = [bytes([i]) * 40 for i in range(100)]
    for datagram in sent:
        tx.sendto(datagram, rx.getsockname())
    time.sleep(0.05)
    assert [d for d, _ in control.recv_batch(64, 64)] == sent[:64]
    assert _drain(control, 36) == sent[64:]


FRAGMENT_SCRIPT = r"""
import json, logging, socket, subprocess, io
from qgate.dataplane.udpio import UdpBatchIO
log = io.StringIO()
logging.basicConfig(stream=log, level=logging.WARNING)
for cmd in (["ip", "link", "add", "qgf0", "type", "veth", "peer", "name", "qgf1"],
            ["ip", "link", "set", "qgf0", "mtu", "1400", "up"], ["ip", "link", "set", "qgf1", "up"],
            ["ip", "addr", "add", "10.79.0.1/24", "dev", "qgf0"]):
    subprocess.run(cmd, check=True)
def frag_creates():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Ip:")]
    return int(lines[1][lines[0].index("FragCreates")])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
before = frag_creates()
out = {}
for gso in (True, False):
    udp = UdpBatchIO(sock, gso=gso, gro=False)
    out[f"fits_{gso}"] = udp.send_batch([b"x" * 1372] * 3, ("10.79.0.2", 9))   # 1400-byte IP packets
    out[f"too_big_{gso}"] = udp.send_batch([b"x" * 1373] * 3, ("10.79.0.2", 9))  # 1401: needs fragments
out["fragments"] = frag_creates() - before
out["warnings"] = log.getvalue().count("does not fit the path MTU")
print(json.dumps(out))
"""


@pytest.mark.netns
def test_records_over_the_path_mtu_are_dropped_and_never_ip_fragmented(
    netns: Callable[[str], str], ns_python: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    result = ns_python(netns("f"), FRAGMENT_SCRIPT)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["fits_True"] == out["fits_False"] == 0
    assert out["too_big_True"] == out["too_big_False"] == 3  # counted as send errors by the caller
    assert out["fragments"] == 0
    assert out["warnings"] == 2  # once per UdpBatchIO (one per gateway socket), not once per datagram
