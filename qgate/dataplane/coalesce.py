"""Coalescing for the TUN write path: opened records -> few GSO super-packets (pure, no I/O).

A TUN opened with ``IFF_VNET_HDR`` takes a TCP super-packet (``GSO_TCPV4``/``GSO_TCPV6``) or a
UDP one (``GSO_UDP_L4``, Linux 6.2+) with a ``struct virtio_net_hdr`` in one ``write``; the
kernel then forwards or delivers it as if a NIC had done GRO. :func:`coalesce` merges in-order
TCP segments and equal-sized UDP datagrams of one flow, by the rules of the kernel's
``tcp_gro_receive``/``udp_gro_receive`` and wireguard-go's ``tun/offload_linux.go``; every
merged packet carries only the pseudo-header sum in its transport checksum
(``VNET_F_NEEDS_CSUM``), so its payload is never summed here. The records were checked by the
sender (protocol.md section 2.1), so by default nothing is verified again.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from qgate.dataplane.offload import (
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    MAX_IP_PACKET,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_CSUM_OFFSET,
    TCP_PSH,
    UDP_CSUM_OFFSET,
    VNET_F_NEEDS_CSUM,
    ZERO_VNET_BYTES,
    VnetHeader,
    flow_key,
    fold,
    ipv4_header_checksum,
    sum16,
    transport_checksum_ok,
)

UDP_MAX_SEGMENTS: Final = 64
"""Datagrams per UDP super-packet at most (the kernel's ``UDP_MAX_SEGMENTS``, include/linux/udp.h)."""

_IPV4_FIXED: Final = struct.Struct("!BBHHHB")
"""version/IHL, TOS, total length, ID, flags/fragment offset, TTL."""
_TCP_FIXED: Final = struct.Struct("!4xIIBBH")
"""ports (skipped), sequence number, ACK number, data offset, flags, window."""
_U16: Final = struct.Struct("!H")

Item = tuple[bytes, bytes]
"""``(vnet header (10 bytes), IP packet)``: one ``write`` to the TUN."""


@dataclass(slots=True)
class _Run:
    """An open coalescing group: consecutive packets of one flow, in order.

    ``l4_hlen`` is the TCP header length, or 8 for UDP; ``next_seq`` is unused for UDP.
    """

    first: bytes
    proto: int
    ip_hlen: int
    l4_hlen: int
    gso_size: int
    next_seq: int
    match: tuple[object, ...]
    payloads: list[bytes | memoryview] = field(default_factory=list)
    size: int = 0
    psh: bool = False
    short: bool = False


def _ip(packet: bytes, proto: int) -> tuple[int, bytes, object] | None:
    """Return ``(ip header length, flow key (addresses + ports), IP fields that must match)``."""
    n = len(packet)
    version = packet[0] >> 4
    if version == 4:
        vihl, tos, total, _, frag, ttl = _IPV4_FIXED.unpack_from(packet)
        if vihl != 0x45 or packet[9] != proto or total != n or frag & 0x3FFF:
            return None
        return 20, packet[12:24], (tos, frag, ttl)
    if version == 6:
        if n < 48 or packet[6] != proto or int.from_bytes(packet[4:6], "big") != n - 40:
            return None
        return 40, packet[8:44], (packet[0:4], packet[7])
    return None


_Info = tuple[int, int, int, int, tuple[object, ...], bool, bytes]
"""``(protocol, ip header length, l4 header length, payload bytes, match fields, PSH, flow key)``
of a packet that may be merged; for TCP the sequence number follows as a separate value."""


def _tcp_info(packet: bytes, verify: bool) -> tuple[_Info, int] | None:
    """``(info, sequence number)`` of a coalescable TCP segment (data, ACK or ACK|PSH), else None."""
    ip = _ip(packet, PROTO_TCP)
    if ip is None or len(packet) < ip[0] + 20:
        return None
    ip_hlen, flow, ip_match = ip
    seq, ack, offset, flags, window = _TCP_FIXED.unpack_from(packet, ip_hlen)
    tcp_hlen = (offset >> 4) * 4
    payload = len(packet) - ip_hlen - tcp_hlen
    if tcp_hlen < 20 or payload < 1 or flags not in (TCP_ACK, TCP_ACK | TCP_PSH):
        return None
    if verify and not transport_checksum_ok(packet):
        return None
    # ack number, data offset, window and options must all be equal (kernel tcp_gro_receive).
    options = packet[ip_hlen + 20 : ip_hlen + tcp_hlen] if tcp_hlen > 20 else b""
    match = (ip_match, ack, offset, window, options)
    return (PROTO_TCP, ip_hlen, tcp_hlen, payload, match, flags == TCP_ACK | TCP_PSH, flow), seq


def _udp_info(packet: bytes, verify: bool) -> _Info | None:
    """The info of a UDP datagram with a payload and a consistent length, else None."""
    ip = _ip(packet, PROTO_UDP)
    if ip is None:
        return None
    ip_hlen, flow, ip_match = ip
    payload = len(packet) - ip_hlen - 8
    if payload < 1 or _U16.unpack_from(packet, ip_hlen + 4)[0] != payload + 8:
        return None
    if verify and not transport_checksum_ok(packet):
        return None
    return PROTO_UDP, ip_hlen, 8, payload, (ip_match,), False, flow


def _append(run: _Run, packet: bytes, info: _Info, seq: int, max_size: int) -> bool:
    """Add ``packet`` to ``run`` if the kernel's GRO would; return whether it did."""
    proto, ip_hlen, l4_hlen, payload, match, psh, _ = info
    if (
        run.proto != proto
        or run.psh
        or run.short
        or match != run.match
        or payload > run.gso_size
        or run.ip_hlen + run.l4_hlen + run.size + payload > max_size
    ):
        return False
    if proto == PROTO_TCP:
        if seq != run.next_seq:
            return False
        run.next_seq = (seq + payload) & 0xFFFFFFFF
        run.psh = psh
    elif len(run.payloads) >= UDP_MAX_SEGMENTS:
        return False
    run.payloads.append(memoryview(packet)[ip_hlen + l4_hlen :])
    run.size += payload
    run.short = payload < run.gso_size
    return True


def coalesce(
    packets: Sequence[bytes], *, udp: bool = False, max_size: int = MAX_IP_PACKET, verify: bool = False
) -> list[Item]:
    """Merge packets of one flow into GSO super-packets for one TUN write each.

    TCP (as the kernel's ``tcp_gro_receive``): a segment joins the open group of its flow (same
    addresses and ports) when it carries data, its flags are ACK or ACK|PSH, the group has no
    PSH yet and no short segment, its sequence number follows on, ACK number, window, TCP
    options, TOS/traffic class, TTL/hop limit and DF are equal, and its payload is at most the
    group's segment size. UDP (``udp=True``; as ``udp_gro_receive`` with ``UDP_GRO``): a datagram
    joins when the IP fields above are equal, the group has no shorter datagram yet, its payload
    is at most the group's datagram size and the group has fewer than 64. Merged packets stay
    within ``max_size`` and get a ``GSO_TCPV4``/``GSO_TCPV6``/``GSO_UDP_L4`` header with
    ``VNET_F_NEEDS_CSUM``; every other packet (and a group of one) is returned unchanged with a
    zero header. Any other packet of a flow closes its group. The order of flows and of packets
    within a flow is kept (a group sits at the position of its first packet).

    Args:
        packets: whole IPv4/IPv6 packets (opened records), in arrival order.
        udp: also merge UDP datagrams (only for a TUN that took ``TUN_F_USO4``/``TUN_F_USO6``,
            Linux 6.2+, whose writes accept ``GSO_UDP_L4``).
        max_size: largest merged IP packet, bytes (65535 at most).
        verify: merge only packets whose transport checksum verifies (as wireguard-go), for
            sources that do not vouch for them (qgate senders do: protocol.md section 2.1).

    Returns:
        ``[(vnet_header_bytes (10), packet), ...]`` ready for ``write(header + packet)``.
    """
    slots: list[Item | _Run] = []
    open_runs: dict[bytes, _Run] = {}
    for packet in packets:
        info: _Info | None = None
        seq = 0
        if len(packet) >= 28:
            proto = packet[9] if packet[0] >> 4 == 4 else packet[6]
            if proto == PROTO_TCP:
                found = _tcp_info(packet, verify)
                if found is not None:
                    info, seq = found
            elif proto == PROTO_UDP and udp:
                info = _udp_info(packet, verify)
        if info is None:
            if open_runs:  # it keeps its place: no later packet of its flow may join an earlier group
                key = flow_key(packet)
                if key is None:
                    open_runs.clear()
                elif key:
                    open_runs.pop(key, None)
            slots.append((ZERO_VNET_BYTES, packet))
            continue
        _, ip_hlen, l4_hlen, payload, match, psh, flow = info
        run = open_runs.get(flow)
        if run is not None and _append(run, packet, info, seq, max_size):
            continue
        run = _Run(packet, proto, ip_hlen, l4_hlen, payload, (seq + payload) & 0xFFFFFFFF, match)
        run.psh = psh
        run.payloads.append(memoryview(packet)[ip_hlen + l4_hlen :])
        run.size = payload
        open_runs[flow] = run
        slots.append(run)
    return [slot if isinstance(slot, tuple) else _emit(slot) for slot in slots]


def _emit(run: _Run) -> Item:
    if len(run.payloads) == 1:
        return ZERO_VNET_BYTES, run.first
    first, ip_hlen, hlen = run.first, run.ip_hlen, run.ip_hlen + run.l4_hlen
    head = bytearray(first[:hlen])
    version = head[0] >> 4
    total = hlen + run.size
    if version == 4:
        head[2:4] = total.to_bytes(2, "big")
        ipv4_header_checksum(head, ip_hlen)  # the IP header only, not the transport header behind it
        addr_sum = sum16(head[12:20])
    else:
        head[4:6] = (total - 40).to_bytes(2, "big")
        addr_sum = sum16(head[8:40])
    l4_len = total - ip_hlen
    if run.proto == PROTO_TCP:
        if run.psh:
            head[ip_hlen + 13] |= TCP_PSH
        gso_type, csum_offset = (GSO_TCPV4 if version == 4 else GSO_TCPV6), TCP_CSUM_OFFSET
    else:
        head[ip_hlen + 4 : ip_hlen + 6] = l4_len.to_bytes(2, "big")
        gso_type, csum_offset = GSO_UDP_L4, UDP_CSUM_OFFSET
    pseudo = fold(addr_sum + run.proto + l4_len)  # the partial checksum the kernel completes
    head[ip_hlen + csum_offset : ip_hlen + csum_offset + 2] = pseudo.to_bytes(2, "big")
    vnet = VnetHeader(VNET_F_NEEDS_CSUM, gso_type, hlen, run.gso_size, ip_hlen, csum_offset)
    return vnet.pack(), b"".join((head, *run.payloads))
