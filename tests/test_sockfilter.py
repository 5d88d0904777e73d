"""Kernel steering of UDP traffic (qgate.dataplane.sockfilter): the BPF programs, then loopback sockets.

The programs are checked twice: by a small classic-BPF interpreter here (what each verdict should
be), and by the kernel (two SO_REUSEPORT sockets on 127.0.0.1: where each datagram really lands).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from qgate.dataplane import sockfilter
from qgate.dataplane.forwarder import CONTROL_DATAGRAMS_PER_WAKE, Forwarder
from qgate.dataplane.sockfilter import (
    BPF_MAXINSNS,
    CONTROL_SOCKET,
    DATA_SOCKET,
    DROP,
    JA,
    JEQ_K,
    JGE_K,
    KEEP_ALL,
    LD_B_ABS,
    LD_H_ABS,
    LD_W_ABS,
    LD_W_LEN,
    MAX_LIVE_INDEXES,
    RET_K,
    Insn,
    UdpSockets,
    assemble,
    control_filter,
    kernel_drops,
    open_udp_sockets,
    steering_program,
)
from qgate.dataplane.udpio import SOL_UDP, UDP_SEGMENT, UdpBatchIO
from qgate.errors import DataPlaneError
from qgate.protocol import guard
from qgate.protocol.messages import InitConfirm, RatchetConfirm, RatchetRequest, RatchetResponse
from qgate.protocol.wire import fragment_message

LIVE = 0x0A0B0C0D
OTHER = 0x0A0B0C0E
UDP_HEADER = b"\x00" * 8


def record(index: int, size: int = 64) -> bytes:
    """A data record's shape: 04 00 00 00 || receiver_index || counter || ciphertext and tag."""
    return struct.pack(">II", 0x04000000, index) + b"\x00" * 8 + b"\xaa" * (size - 16)


FRAGMENT = bytes([0x01, 1, 0, 1]) + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x07" + b"\xbb" * 100


def message(msg_type: int, hint: int, *, index: int = 0, count: int = 1) -> bytes:
    """A handshake fragment: type || msg_type || index || count || steering hint || message_id || ..."""
    head = bytes([0x01, msg_type, index, count]) + hint.to_bytes(4, "big") + b"\x00\x00\x00\x09"
    return head + b"\x00" * 41 + b"\xdd" * 32


M1, M2, M3, R1, R2, R3, KICK = 1, 2, 3, 4, 5, 6, 7
RETRY = bytes([0x02]) + b"\xcc" * 75


def retry(hint: int) -> bytes:
    """A Retry's shape: 02 00 00 00 || steering hint || message_id || index || ... (76 bytes)."""
    return bytes([0x02, 0, 0, 0]) + hint.to_bytes(4, "big") + b"\xcc" * 68


def run_cbpf(program: list[Insn], packet: bytes) -> int:
    """Run a classic BPF program (sockfilter's opcodes); a load out of range returns 0, as in the kernel."""
    a, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == LD_W_ABS:
            if k + 4 > len(packet):
                return 0
            a = int.from_bytes(packet[k : k + 4], "big")
        elif code == LD_H_ABS:
            if k + 2 > len(packet):
                return 0
            a = int.from_bytes(packet[k : k + 2], "big")
        elif code == LD_B_ABS:
            if k >= len(packet):
                return 0
            a = packet[k]
        elif code == LD_W_LEN:
            a = len(packet)
        elif code in (JEQ_K, JGE_K):
            pc += jt if (a == k if code == JEQ_K else a >= k) else jf
        elif code == JA:
            pc += k
        elif code == RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


# ----- the programs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "socket_index"),
    [
        (record(LIVE), DATA_SOCKET),
        (record(LIVE, 32), DATA_SOCKET),  # an empty keepalive
        (record(OTHER), CONTROL_SOCKET),
        (record(LIVE)[:31], CONTROL_SOCKET),  # shorter than header + tag
        (b"\x04\x00\x01\x00" + record(LIVE)[4:], CONTROL_SOCKET),  # reserved bytes not zero
        (FRAGMENT, CONTROL_SOCKET),
        (RETRY, CONTROL_SOCKET),
        (b"\x03" * 40, CONTROL_SOCKET),
        (b"", CONTROL_SOCKET),  # never by a failed load (which returns 0, the data socket)
        (b"\x01", CONTROL_SOCKET),
        (message(R1, LIVE), DATA_SOCKET),  # the QKD ratchet keeps its own queue: it names our epoch
        (message(M3, LIVE), DATA_SOCKET),
        (message(R3, LIVE), DATA_SOCKET),
        (message(R1, OTHER), CONTROL_SOCKET),
        (message(R2, LIVE), DATA_SOCKET),  # the master's pending index
        (message(M1, LIVE, index=2, count=4), DATA_SOCKET),  # every fragment of a session's M1
        (message(M2, LIVE, index=1, count=3), DATA_SOCKET),
        (message(KICK, LIVE), DATA_SOCKET),
        (message(M1, 0, count=4), CONTROL_SOCKET),  # no session yet: hint 0 (never a live index)
        (message(R1, LIVE)[:31], CONTROL_SOCKET),
        (retry(LIVE), DATA_SOCKET),
        (retry(OTHER), CONTROL_SOCKET),
        (bytes([0x05, 0, 0, 0]) + LIVE.to_bytes(4, "big") + bytes(40), CONTROL_SOCKET),  # unknown type
    ],
)
def test_steering_program_sends_only_datagrams_naming_a_live_index_to_the_data_socket(
    payload: bytes, socket_index: int
) -> None:
    assert run_cbpf(steering_program({LIVE, 7}), payload) == socket_index  # offset 0 = first payload byte


@pytest.mark.parametrize(
    ("payload", "verdict"),
    [
        (FRAGMENT, KEEP_ALL),
        (RETRY, KEEP_ALL),
        (record(LIVE), KEEP_ALL),  # a real record that rode behind a spoofed head of a GRO train
        (record(OTHER), DROP),
        (record(LIVE)[:31], DROP),
        (b"\x03" * 40, DROP),
        (b"", DROP),  # an empty datagram: the load fails, the program returns 0
    ],
)
def test_control_filter_keeps_handshakes_and_live_records_and_drops_the_rest(
    payload: bytes, verdict: int
) -> None:
    assert run_cbpf(control_filter({LIVE}), UDP_HEADER + payload) == verdict  # the filter sees the UDP header


def test_steering_reads_the_hint_where_the_real_wire_encoding_puts_it() -> None:
    key_ids = ("0123456789abcdef0123456789abcdef0123",)
    encoded = {
        RatchetRequest.TYPE: RatchetRequest(LIVE, 77, 5, bytes(32), key_ids).encode(),
        InitConfirm.TYPE: InitConfirm(LIVE, 5, bytes(32)).encode(),
        RatchetResponse.TYPE: RatchetResponse(LIVE, 78, 6, bytes(32)).encode(),
        RatchetConfirm.TYPE: RatchetConfirm(LIVE, 6, bytes(32)).encode(),
        M1: bytes(4000),
    }
    for msg_type, body in encoded.items():
        for fragment in fragment_message(msg_type, body, 0x1234, LIVE):
            assert run_cbpf(steering_program({LIVE}), fragment + bytes(32)) == DATA_SOCKET, msg_type
            assert run_cbpf(steering_program({OTHER}), fragment + bytes(32)) == CONTROL_SOCKET, msg_type
    sealed = guard.seal_retry(
        message_id=9,
        index=0,
        answered_mac1=bytes(16),
        challenge=bytes(32),
        my_retry_key=bytes(32),
        nonce=bytes(12),
        receiver_index=LIVE,
    )
    assert run_cbpf(steering_program({LIVE}), sealed) == DATA_SOCKET


def test_with_no_live_index_no_data_record_passes_either_program() -> None:
    assert run_cbpf(steering_program(()), record(LIVE)) == CONTROL_SOCKET
    assert run_cbpf(control_filter(()), UDP_HEADER + record(LIVE)) == DROP
    assert run_cbpf(control_filter(()), UDP_HEADER + FRAGMENT) == KEEP_ALL


def test_programs_assemble_as_struct_sock_filter_and_fit_the_kernel_limit() -> None:
    assert assemble([(RET_K, 0, 0, 1), (JEQ_K, 2, 3, 0x04000000)]) == struct.pack(
        "=HBBIHBBI", 0x06, 0, 0, 1, 0x15, 2, 3, 0x04000000
    )
    many = set(range(1, MAX_LIVE_INDEXES + 1))
    assert len(control_filter(many)) <= BPF_MAXINSNS
    assert len(steering_program(many)) <= BPF_MAXINSNS
    assert all(jt <= 255 and jf <= 255 for _, jt, jf, _ in control_filter(many))
    assert run_cbpf(steering_program(many), record(MAX_LIVE_INDEXES)) == DATA_SOCKET


# ----- real sockets on loopback ---------------------------------------------------------


@pytest.fixture
def split() -> Iterator[UdpSockets]:
    udp = open_udp_sockets("127.0.0.1", 0, buffer=1 << 20)
    try:
        yield udp
    finally:
        udp.close()


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        yield tx
    finally:
        tx.close()


def _drain(sock: socket.socket) -> list[bytes]:
    io = UdpBatchIO(sock, gso=False, gro=False)
    time.sleep(0.05)  # loopback delivers in the sender's context; this is margin
    return [d for d, _ in io.recv_batch()]


def test_two_sockets_share_the_port_and_the_kernel_steers_by_type_and_live_index(
    split: UdpSockets, sender: socket.socket
) -> None:
    assert split.control is not None and split.status()["kernel_filter"] == "index"
    split.set_live(frozenset({LIVE}))
    address = split.data.getsockname()
    assert split.control.getsockname() == address
    sent = (record(LIVE), FRAGMENT, record(OTHER), RETRY, b"\x03" * 40, record(LIVE, 32), message(R1, LIVE))
    for payload in (*sent, message(R1, OTHER), message(M1, LIVE, count=3), retry(LIVE)):
        sender.sendto(payload, address)
    assert _drain(split.data) == [
        record(LIVE),
        record(LIVE, 32),
        message(R1, LIVE),
        message(M1, LIVE, count=3),
        retry(LIVE),
    ]
    assert _drain(split.control) == [FRAGMENT, RETRY, message(R1, OTHER)]
    status = split.status()
    assert status["kernel_drops_control"] == 2  # dropped by the filter, before the queue
    assert status["kernel_drops_data"] == 0


def test_reattach_follows_the_live_set_and_an_empty_set_lets_no_record_through(
    split: UdpSockets, sender: socket.socket
) -> None:
    address = split.data.getsockname()
    assert split.control is not None
    sender.sendto(record(LIVE), address)  # no session yet
    assert _drain(split.data) == [] and _drain(split.control) == []
    split.set_live(frozenset({LIVE}))
    split.set_live(frozenset({LIVE}))  # unchanged: no re-attach
    assert split.updates == 1
    split.set_live(frozenset({OTHER}))  # LIVE's epoch expired, OTHER's began
    sender.sendto(record(LIVE), address)
    sender.sendto(record(OTHER), address)
    assert _drain(split.data) == [record(OTHER)]
    assert _drain(split.control) == []
    assert split.updates == 2 and split.status()["live_indexes"] == 1


def _send_train(sender: socket.socket, payloads: list[bytes], address: tuple[str, int]) -> None:
    """Send equal-sized payloads as one GSO super-packet (arrives whole over loopback)."""
    sender.sendmsg(
        [b"".join(payloads)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(payloads[0])))], 0, address
    )


def test_a_gso_train_is_steered_by_its_head_and_the_control_filter_judges_each_datagram(
    split: UdpSockets, sender: socket.socket
) -> None:
    # The kernel fact behind the design: a UDP_GRO socket queues a super-packet whole (a filter
    # there would judge all of it by the first datagram); the control socket (no GRO) has it cut
    # into datagrams before its filter, so a spoofed head cannot take real records down with it.
    data = UdpBatchIO(split.data, gro=True)
    assert data.gro and split.control is not None
    split.set_live(frozenset({LIVE}))
    address = split.data.getsockname()
    _send_train(sender, [record(OTHER, 100), record(LIVE, 100), record(LIVE, 100)], address)
    assert _drain(split.control) == [record(LIVE, 100), record(LIVE, 100)]
    _send_train(sender, [record(LIVE, 100), record(OTHER, 100), record(LIVE, 100)], address)
    time.sleep(0.05)
    assert [d for d, _ in data.recv_batch()] == [record(LIVE, 100), record(OTHER, 100), record(LIVE, 100)]
    assert _drain(split.control) == []  # the spoofed tail reaches user space: one index lookup there


def test_too_many_live_indexes_fall_back_to_steering_by_type_without_dropping_real_records(
    split: UdpSockets,
    sender: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(sockfilter, "MAX_LIVE_INDEXES", 1)
    split.set_live(frozenset({LIVE, OTHER}))
    split.set_live(frozenset({LIVE, OTHER, 9}))
    assert split.status()["kernel_filter"] == "type" and split.update_failures == 2
    assert sum("steering by type byte only" in r.message for r in caplog.records) == 1
    address = split.data.getsockname()
    for payload in (record(LIVE), record(12345), FRAGMENT):
        sender.sendto(payload, address)
    assert _drain(split.data) == [record(LIVE), record(12345)]
    assert split.control is not None and _drain(split.control) == [FRAGMENT]


def test_a_kernel_that_refuses_the_programs_gets_one_socket_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, sender: socket.socket
) -> None:
    def refuse(sock: socket.socket, option: int, program: list[Insn]) -> None:
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    monkeypatch.setattr(sockfilter, "attach", refuse)
    with caplog.at_level(logging.WARNING):
        udp = open_udp_sockets("127.0.0.1", 0, buffer=1 << 20)
    try:
        assert udp.control is None and len(udp.sockets()) == 1
        assert udp.status() == {
            "sockets": 1,
            "kernel_filter": "off",
            "live_indexes": 0,
            "filter_updates": 0,
            "filter_failures": 0,
            "kernel_drops_data": 0,
            "single_reason": "Protocol not available",
        }
        assert sum("one socket" in r.message for r in caplog.records) == 1
        udp.set_live(frozenset({LIVE}))  # nothing to attach to
        assert udp.updates == 0
        sender.sendto(record(OTHER), udp.data.getsockname())
        assert _drain(udp.data) == [record(OTHER)]  # as before issue 10: user space drops it
        assert not udp.data.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)  # no group to join
    finally:
        udp.close()


def test_a_port_already_in_use_is_refused_rather_than_shared() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even one that would let us join
    holder.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(DataPlaneError, match="cannot bind UDP"):
            open_udp_sockets("127.0.0.1", holder.getsockname()[1], buffer=1 << 20)
    finally:
        holder.close()


def test_control_socket_has_the_small_buffer_and_no_gro(split: UdpSockets) -> None:
    assert split.control is not None
    assert split.control.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 2 * sockfilter.CONTROL_BUFFER
    assert split.data.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > 2 * sockfilter.CONTROL_BUFFER
    assert kernel_drops(split.control) == 0


# ----- the forwarder's order ------------------------------------------------------------


class _FakeUdp:
    def __init__(self, name: str, log: list[tuple[str, int]], datagrams: list[bytes]) -> None:
        self.name, self.log, self.datagrams = name, log, datagrams
        self.gso = self.gro = False

    def recv_batch(
        self, max_calls: int = 64, max_datagrams: int = 1 << 30
    ) -> list[tuple[bytes, tuple[str, int]]]:
        self.log.append((self.name, max_datagrams))
        taken, self.datagrams = self.datagrams[:max_datagrams], self.datagrams[max_datagrams:]
        return [(d, ("192.0.2.1", 1)) for d in taken]


class _FakeTun:
    vnet, offloads = False, 0

    def write_packets(self, packets: list[bytes]) -> int:
        return 0


def test_forwarder_reads_the_control_socket_only_as_far_as_the_limit_it_is_given() -> None:
    calls: list[tuple[str, int]] = []
    junk = [b"\x03" * 10] * 1000
    fwd = Forwarder(
        _FakeTun(),  # type: ignore[arg-type]
        _FakeUdp("data", calls, [record(OTHER)]),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        [],
        1420,
        {},
        lambda link, datagram, now: None,
        lambda link, now: None,
        control=_FakeUdp("control", calls, junk),  # type: ignore[arg-type]
    )
    fwd.on_udp_readable(0.0)
    assert [name for name, _ in calls] == ["data"] and fwd.stats.rx_unknown_index == 1
    assert fwd.on_control_readable(0.0) == CONTROL_DATAGRAMS_PER_WAKE
    assert fwd.on_control_readable(0.0, 3) == 3 and fwd.on_control_readable(0.0, 0) == 0
    assert calls[1:] == [("control", CONTROL_DATAGRAMS_PER_WAKE), ("control", 3)]
    assert fwd.stats.rx_not_qgate == CONTROL_DATAGRAMS_PER_WAKE + 3
