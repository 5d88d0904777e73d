"""DSCP of the inner packet is copied to the outer header, so grid priority traffic keeps its class."""

from __future__ import annotations

import socket

from qgate.dataplane.forwarder import dscp_of
from qgate.dataplane.udpio import UdpBatchIO

EF = 46 << 2  # Expedited Forwarding (RFC 3246) as a TOS byte


def test_dscp_of_ipv4_and_ipv6_packets_drops_the_ecn_bits() -> None:
    ipv4 = bytes([0x45, EF | 0x01]) + bytes(18)
    ipv6 = bytes([0x60 | (EF >> 4), ((EF & 0x0F) << 4) | 0x01]) + bytes(38)
    assert dscp_of(ipv4) == EF
    assert dscp_of(ipv6) == EF
    assert dscp_of(b"") == 0 and dscp_of(bytes([0x45, 0])) == 0


def test_udp_batches_carry_the_outer_tos_with_and_without_gso() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
    receiver.settimeout(2)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for gso in (True, False):
            io = UdpBatchIO(sender, gso=gso, gro=False)
            assert io.send_batch([b"x" * 100] * 3, receiver.getsockname(), EF) == 0
            for _ in range(3):
                _data, ancdata, _flags, _addr = receiver.recvmsg(2048, socket.CMSG_SPACE(4))
                tos = [c[2][0] for c in ancdata if c[0] == socket.IPPROTO_IP and c[1] == socket.IP_TOS]
                assert tos == [EF]
    finally:
        sender.close()
        receiver.close()
