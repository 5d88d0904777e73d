"""TUN offload helpers: ``virtio_net_hdr``, checksums and TSO/USO segmentation (pure, no I/O).

A TUN opened with ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` prefixes every packet with a 10-byte
``struct virtio_net_hdr`` (``include/uapi/linux/virtio_net.h``; Virtio 1.2 section 5.1.6) and may
hand over one TCP (or UDP, with USO) *super-packet* of up to 64 KB that the kernel did not
segment, often with only a partial transport checksum (``VIRTIO_NET_HDR_F_NEEDS_CSUM``). qgate
seals every inner IP packet as its own record, so the read path splits super-packets back into
real MTU-sized packets with complete checksums (:func:`split_tso`); the write path's merging of
packets into super-packets is :mod:`qgate.dataplane.coalesce`. The rules follow the kernel's
``tcp_gso_segment``/``__udp_gso_segment`` and wireguard-go's ``tun/offload_linux.go``.

Checksums are the Internet checksum (RFC 1071) with the pseudo-headers of RFC 9293 section 3.1
(TCP), RFC 768 (UDP) and RFC 8200 section 8.1 (IPv6). The 16-bit ones' complement sum of a buffer
is computed as ``int.from_bytes(buffer) mod 0xFFFF`` (2**16 = 1 mod 0xFFFF), one C-level pass.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from qgate.errors import DataPlaneError

VNET_HDR_SIZE: Final = 10
"""Bytes in ``struct virtio_net_hdr`` (without ``num_buffers``)."""
VNET_F_NEEDS_CSUM: Final = 0x01
"""``flags``: the checksum at ``csum_start + csum_offset`` holds only the pseudo-header sum."""
VNET_F_DATA_VALID: Final = 0x02
"""``flags``: the checksum was already verified (receive side)."""
GSO_NONE: Final = 0
"""``gso_type``: an ordinary packet."""
GSO_TCPV4: Final = 1
"""``gso_type``: TCP over IPv4 super-packet (TSO)."""
GSO_UDP: Final = 3
"""``gso_type``: UDP fragmentation offload (UFO, obsolete; refused here)."""
GSO_TCPV6: Final = 4
"""``gso_type``: TCP over IPv6 super-packet (TSO)."""
GSO_UDP_L4: Final = 5
"""``gso_type``: UDP segmentation offload (USO), IPv4 or IPv6."""
GSO_ECN: Final = 0x80
"""``gso_type`` bit: the TCP super-packet has CWR set (only the first segment keeps it)."""

PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10
TCP_CWR: Final = 0x80
MAX_IP_PACKET: Final = 65535
"""Bytes: the largest IPv4 packet / IPv6 payload (no jumbograms)."""
TCP_CSUM_OFFSET: Final = 16
"""Byte offset of the checksum in the TCP header (RFC 9293)."""
UDP_CSUM_OFFSET: Final = 6
"""Byte offset of the checksum in the UDP header (RFC 768)."""

_VNET: Final = struct.Struct("<BBHHHH")


class VnetHeader(NamedTuple):
    """``struct virtio_net_hdr`` (all fields little-endian on the wire, as the TUN uses them).

    Attributes:
        flags: ``VNET_F_*`` bits.
        gso_type: ``GSO_*`` value, possibly or-ed with ``GSO_ECN``.
        hdr_len: bytes of IP + transport headers (not trusted on read; recomputed).
        gso_size: payload bytes per segment (the MSS for TCP); 0 when ``GSO_NONE``.
        csum_start: byte offset where checksumming starts (the transport header).
        csum_offset: offset of the checksum field from ``csum_start`` (16 TCP, 6 UDP).
    """

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        """Return the 10-byte wire form (little-endian, ``<BBHHHH``)."""
        return _VNET.pack(*self)


ZERO_VNET: Final = VnetHeader()
"""The header of an ordinary, fully checksummed packet."""
ZERO_VNET_BYTES: Final = ZERO_VNET.pack()


def parse_vnet_header(data: bytes | memoryview) -> VnetHeader:
    """Parse the first 10 bytes of ``data`` as ``struct virtio_net_hdr``.

    Raises:
        DataPlaneError: fewer than 10 bytes.
    """
    if len(data) < VNET_HDR_SIZE:
        raise DataPlaneError(f"virtio_net_hdr needs {VNET_HDR_SIZE} bytes, got {len(data)}")
    return VnetHeader._make(_VNET.unpack_from(data))


# ----- checksum arithmetic (RFC 1071) --------------------------------------------------------


def sum16(data: bytes | bytearray | memoryview) -> int:
    """Return the 16-bit ones' complement sum of ``data`` (big-endian words, odd tail zero-padded).

    The result is in 0..0xFFFF and is not complemented; 0 only for all-zero input.
    """
    n = int.from_bytes(data, "big")
    if not n:
        return 0
    if len(data) & 1:
        n <<= 8
    return n % 0xFFFF or 0xFFFF


def fold(value: int) -> int:
    """Fold a sum of 16-bit ones' complement partial sums into 0..0xFFFF (end-around carry)."""
    if not value:
        return 0
    return value % 0xFFFF or 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Return the RFC 1071 checksum (complement of the folded sum) of ``data`` plus ``initial``."""
    return ~fold(sum16(data) + initial) & 0xFFFF


def _ip_layout(packet: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """Return ``(version, ip header length, l4 protocol, address sum)`` of a packet (no v6 ext headers)."""
    if len(packet) < 20:
        raise DataPlaneError(f"IP packet too short ({len(packet)} bytes)")
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or len(packet) < ihl:
            raise DataPlaneError("bad IPv4 header length")
        return 4, ihl, packet[9], sum16(packet[12:20])
    if version == 6:
        if len(packet) < 40:
            raise DataPlaneError(f"IPv6 packet too short ({len(packet)} bytes)")
        return 6, 40, packet[6], sum16(packet[8:40])
    raise DataPlaneError(f"not an IP packet (version {version})")


def ipv4_header_checksum(header: bytearray, ihl: int = 0) -> None:
    """Set the IPv4 header checksum over the first ``ihl`` bytes (all of ``header`` when 0)."""
    header[10:12] = b"\0\0"
    header[10:12] = internet_checksum(memoryview(header)[: ihl or len(header)]).to_bytes(2, "big")


def _set_ip_length(header: bytearray, version: int, ip_hlen: int, total: int) -> None:
    if version == 4:
        header[2:4] = total.to_bytes(2, "big")
    else:
        header[4:6] = (total - 40).to_bytes(2, "big")


def recompute_checksums(packet: bytes | bytearray | memoryview) -> bytes:
    """Return ``packet`` with its IPv4 header checksum and TCP/UDP checksum recomputed from scratch.

    Other protocols (ICMP, ...) get only the IPv4 header checksum. IPv6 extension headers are not
    walked (the transport must follow the fixed header).

    Raises:
        DataPlaneError: not an IPv4/IPv6 packet or truncated headers.
    """
    version, ihl, proto, _ = _ip_layout(packet)
    out = bytearray(packet)
    if version == 4:
        ipv4_header_checksum(out, ihl)
    if proto not in (PROTO_TCP, PROTO_UDP):
        return bytes(out)
    if len(out) < ihl + (TCP_CSUM_OFFSET if proto == PROTO_TCP else UDP_CSUM_OFFSET) + 2:
        raise DataPlaneError("transport header truncated")
    return _transport_checksum(out, version, ihl, proto)


def transport_checksum_ok(packet: bytes | bytearray | memoryview) -> bool:
    """Return whether the TCP or UDP checksum of an IPv4/IPv6 packet verifies (False for others).

    A UDP checksum of zero over IPv4 (none sent, RFC 768) counts as valid.
    """
    try:
        version, ihl, proto, addr_sum = _ip_layout(packet)
    except DataPlaneError:
        return False
    if proto not in (PROTO_TCP, PROTO_UDP) or len(packet) < ihl + 8:
        return False
    if proto == PROTO_UDP and version == 4 and packet[ihl + 6] == 0 and packet[ihl + 7] == 0:
        return True
    l4len = len(packet) - ihl
    return fold(sum16(memoryview(packet)[ihl:]) + addr_sum + proto + l4len) == 0xFFFF


def finish_checksum(vnet: VnetHeader, packet: bytes) -> bytes:
    """Complete the partial checksum of a non-GSO packet marked ``VNET_F_NEEDS_CSUM``.

    The 16 bits at ``csum_start + csum_offset`` hold the pseudo-header sum; the result is the
    complement of the sum from ``csum_start`` to the end seeded with it (virtio 1.2 5.1.6.2).
    A packet without the flag is returned unchanged.

    Raises:
        DataPlaneError: the checksum position lies outside the packet.
    """
    if not vnet.flags & VNET_F_NEEDS_CSUM:
        return packet
    start, at = vnet.csum_start, vnet.csum_start + vnet.csum_offset
    if at + 2 > len(packet) or start >= len(packet):
        raise DataPlaneError(f"checksum position {at} outside a {len(packet)}-byte packet")
    out = bytearray(packet)
    initial = int.from_bytes(out[at : at + 2], "big")
    out[at : at + 2] = b"\0\0"
    csum = internet_checksum(memoryview(out)[start:], initial)
    if csum == 0 and vnet.csum_offset == UDP_CSUM_OFFSET:  # UDP sends 0 as 0xFFFF (RFC 768)
        csum = 0xFFFF
    out[at : at + 2] = csum.to_bytes(2, "big")
    return bytes(out)


def checksum_vouched(vnet: VnetHeader, packet: bytes) -> bool:
    """Whether a TUN read may be sealed as a packet whose TCP/UDP checksum is right (protocol.md 2.1).

    The kernel vouches for packets it marks ``VNET_F_NEEDS_CSUM`` (the checksum is computed in
    :func:`split_tso`) or ``VNET_F_DATA_VALID`` (already verified); any other TCP or UDP packet
    (plain TUN, checksum neither offloaded nor verified) is verified here (RFC 9293 section 3.1,
    RFC 768; an IPv4 UDP checksum of zero means none and passes). Other protocols always pass:
    the receiver writes them as they are and never merges them.
    """
    if vnet.flags & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID) or len(packet) < 20:
        return True
    if _l4_proto(packet) not in (PROTO_TCP, PROTO_UDP):
        return True
    return transport_checksum_ok(packet)


def _l4_proto(packet: bytes | bytearray) -> int:
    version = packet[0] >> 4
    if version == 4:
        return packet[9]
    return packet[6] if len(packet) > 6 else -1


_IPV6_UPPER_NO_PORTS: Final = frozenset({58, 59})
"""IPv6 next headers that end the chain without ports: ICMPv6, No Next Header."""


def flow_key(packet: bytes) -> bytes | None:
    """Addresses + ports of a TCP/UDP packet: the key of its flow (RFC 8290 section 4.1.1).

    Returns:
        ``src || dst || sport || dport`` for TCP/UDP over IPv4 (any header length, first or
        only fragment) or IPv6 (no extension headers); ``b""`` for a packet of no TCP/UDP flow
        (ICMP, another protocol, not IP); None when the packet may belong to a TCP/UDP flow whose
        ports it does not show (a later IPv4 fragment, IPv6 extension headers, cut short).
    """
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        if packet[9] not in (PROTO_TCP, PROTO_UDP):
            return b""
        ihl = (packet[0] & 0x0F) * 4
        if int.from_bytes(packet[6:8], "big") & 0x1FFF or ihl < 20 or len(packet) < ihl + 4:
            return None
        return packet[12:20] + packet[ihl : ihl + 4]
    if version == 6 and len(packet) >= 40:
        if packet[6] in _IPV6_UPPER_NO_PORTS:
            return b""
        if packet[6] in (PROTO_TCP, PROTO_UDP) and len(packet) >= 44:
            return packet[8:44]
        return None
    return b"" if version not in (4, 6) else None


# ----- segmentation (read path: TUN -> records) ----------------------------------------------


_IPV6_EXTENSIONS: Final = frozenset({0, 43, 60})
"""Hop-by-hop, Routing and Destination Options: length in 8-byte units after 8 (RFC 8200 4.3-4.6)."""


def _ipv6_transport(packet: bytes) -> tuple[int, int]:
    """``(offset, protocol)`` of the upper-layer header after IPv6 extension headers (-1, -1 if unknown).

    Fragment headers and unknown extensions end the walk with (-1, -1): a GSO packet never has them.
    """
    offset, next_header = 40, packet[6]
    while next_header in _IPV6_EXTENSIONS:
        if len(packet) < offset + 8:
            return -1, -1
        next_header, offset = packet[offset], offset + (packet[offset + 1] + 1) * 8
    return (offset, next_header) if next_header in (PROTO_TCP, PROTO_UDP) else (-1, -1)


def _gso_layout(vnet: VnetHeader, packet: bytes) -> tuple[int, int, int, int]:
    """Return ``(version, ip header length, l4 header length, protocol)`` for a GSO packet.

    The header is not trusted: the GSO type must match the IP version and (without IPv6
    extension headers) the IP protocol, ``csum_start`` must be where the transport header
    starts and ``csum_offset`` where its checksum is, and the IP length field must match the
    bytes read. Any mismatch raises :class:`DataPlaneError`.
    """
    kind = vnet.gso_type & ~GSO_ECN
    if len(packet) < 20:
        raise DataPlaneError(f"GSO packet of {len(packet)} bytes is shorter than an IP header")
    if not vnet.flags & VNET_F_NEEDS_CSUM:
        raise DataPlaneError("GSO packet without VIRTIO_NET_HDR_F_NEEDS_CSUM")
    version = packet[0] >> 4
    start = vnet.csum_start
    proto = PROTO_UDP if kind == GSO_UDP_L4 else PROTO_TCP
    if (kind == GSO_TCPV4 and version != 4) or (kind == GSO_TCPV6 and version != 6):
        raise DataPlaneError(f"GSO type {kind} does not match IP version {version}")
    if version == 4:
        if start != (packet[0] & 0x0F) * 4 or start < 20 or packet[6] & 0x3F or packet[7]:
            raise DataPlaneError("IPv4 GSO packet with csum_start != header length or fragmented")
        if packet[9] != proto or int.from_bytes(packet[2:4], "big") != len(packet):
            raise DataPlaneError("IPv4 GSO packet whose protocol or total length does not match")
    elif version != 6 or start < 40 or len(packet) < 40:
        raise DataPlaneError("GSO packet is not IPv4/IPv6 or csum_start is inside the IP header")
    elif int.from_bytes(packet[4:6], "big") != len(packet) - 40 or _ipv6_transport(packet) != (start, proto):
        raise DataPlaneError("IPv6 GSO packet whose payload length or header chain does not match")
    if vnet.csum_offset != (TCP_CSUM_OFFSET if proto == PROTO_TCP else UDP_CSUM_OFFSET):
        raise DataPlaneError(f"GSO csum_offset {vnet.csum_offset} is not the transport checksum")
    if len(packet) < start + (20 if proto == PROTO_TCP else 8):
        raise DataPlaneError("GSO packet shorter than its headers")
    if proto == PROTO_TCP:
        l4_hlen = (packet[start + 12] >> 4) * 4
        if l4_hlen < 20 or len(packet) < start + l4_hlen:
            raise DataPlaneError("bad TCP header length in GSO packet")
        return version, start, l4_hlen, proto
    if int.from_bytes(packet[start + 4 : start + 6], "big") != len(packet) - start:
        raise DataPlaneError("UDP GSO packet whose UDP length does not match")
    return version, start, 8, proto


def split_tso(vnet: VnetHeader, packet: bytes, mss: int | None = None) -> list[bytes]:
    """Split a TUN read into real IP packets with complete checksums.

    A ``GSO_TCPV4``/``GSO_TCPV6``/``GSO_UDP_L4`` super-packet becomes segments of ``gso_size``
    payload bytes (or ``mss`` when given and smaller): IP total/payload length, IPv4 ID
    (+1 per segment) and header checksum, TCP sequence numbers, flags (FIN/PSH only on the last,
    CWR only on the first) or UDP length, and the full TCP/UDP checksum are rewritten, as the
    kernel's ``tcp_gso_segment``/``__udp_gso_segment`` would. A ``GSO_NONE`` packet is returned
    alone, its checksum completed if ``VNET_F_NEEDS_CSUM`` is set. ``hdr_len`` is not trusted.

    Args:
        vnet: the header read with the packet.
        packet: the IP packet (up to 65535 bytes).
        mss: optional upper bound on payload bytes per segment.

    Returns:
        The packets, in order; each at most ``ip+l4 headers + segment`` bytes.

    Raises:
        DataPlaneError: unsupported ``gso_type`` (UFO), inconsistent or truncated headers,
            ``gso_size`` of zero.
    """
    kind = vnet.gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        return [finish_checksum(vnet, packet)]
    if kind not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4):
        raise DataPlaneError(f"unsupported GSO type {vnet.gso_type}")
    seg_size = vnet.gso_size if mss is None else min(mss, vnet.gso_size or mss)
    if seg_size <= 0:
        raise DataPlaneError("GSO packet with gso_size 0")
    version, ip_hlen, l4_hlen, proto = _gso_layout(vnet, packet)
    hlen = ip_hlen + l4_hlen
    if len(packet) <= hlen + seg_size:  # one segment: the kernel's headers stand; sum it from scratch
        return [_transport_checksum(packet, version, ip_hlen, proto)]
    return _segment(packet, version, ip_hlen, l4_hlen, proto, seg_size)


def _transport_checksum(packet: bytes | bytearray, version: int, start: int, proto: int) -> bytes:
    """Return ``packet`` with its TCP/UDP checksum (transport header at ``start``) computed anew.

    The pseudo-header is built from the addresses, so whatever the checksum field held (the
    kernel's partial sum, or garbage) does not matter; IPv6 extension headers before ``start``
    are skipped, not summed (RFC 8200 section 8.1).
    """
    out = bytearray(packet)
    at = start + (TCP_CSUM_OFFSET if proto == PROTO_TCP else UDP_CSUM_OFFSET)
    out[at : at + 2] = b"\0\0"
    addr_sum = sum16(out[12:20] if version == 4 else out[8:40])
    csum = ~fold(addr_sum + proto + len(out) - start + sum16(memoryview(out)[start:])) & 0xFFFF
    if proto == PROTO_UDP and csum == 0:
        csum = 0xFFFF
    out[at : at + 2] = csum.to_bytes(2, "big")
    return bytes(out)


def _segment(packet: bytes, version: int, ip_hlen: int, l4_hlen: int, proto: int, seg: int) -> list[bytes]:
    """Cut ``packet`` into segments; headers come from one template, checksums by RFC 1624 arithmetic.

    Only the IPv4 total length, ID and header checksum, the IPv6 payload length, the TCP sequence
    number, flags and checksum (or the UDP length and checksum) differ between segments, so each
    header is the template with those fields packed in, and each checksum is a precomputed sum
    of the fixed words plus the changed fields plus the segment's payload sum.
    """
    hlen = ip_hlen + l4_hlen
    view = memoryview(packet)
    template = bytearray(packet[:hlen])
    tcp = proto == PROTO_TCP
    csum_at = ip_hlen + (TCP_CSUM_OFFSET if tcp else UDP_CSUM_OFFSET)
    template[csum_at : csum_at + 2] = b"\0\0"
    addr_sum = sum16(view[12:20] if version == 4 else view[8:40])
    seq0 = int.from_bytes(template[ip_hlen + 4 : ip_hlen + 8], "big") if tcp else 0
    flags0 = template[ip_hlen + 13] if tcp else 0
    ip_id0 = int.from_bytes(template[4:6], "big") if version == 4 else 0
    if version == 4:  # fixed words of the IPv4 header: length, ID and checksum zeroed
        template[2:6] = b"\0\0\0\0"
        template[10:12] = b"\0\0"
        ip_fixed = sum16(memoryview(template)[:ip_hlen])
    else:
        template[4:6] = b"\0\0"
        ip_fixed = 0
    if tcp:  # fixed words of the TCP header: sequence number and flags zeroed (added per segment)
        template[ip_hlen + 4 : ip_hlen + 8] = b"\0\0\0\0"
        template[ip_hlen + 13] = 0
        l4_fixed = sum16(memoryview(template)[ip_hlen:hlen])
    else:
        template[ip_hlen + 4 : ip_hlen + 6] = b"\0\0"
        l4_fixed = sum16(memoryview(template)[ip_hlen:hlen])
    base = addr_sum + proto + l4_hlen + l4_fixed  # pseudo-header (without the length) + fixed words
    total = len(packet)
    starts = range(hlen, total, seg)
    last_index = len(starts) - 1
    pack_into = struct.pack_into
    out: list[bytes] = []
    for i, off in enumerate(starts):
        data = view[off : off + seg]
        n = len(data)
        head = bytearray(template)
        if version == 4:
            ip_id = (ip_id0 + i) & 0xFFFF
            pack_into("!HH", head, 2, hlen + n, ip_id)
            pack_into("!H", head, 10, ~fold(ip_fixed + hlen + n + ip_id) & 0xFFFF)
        else:  # the payload length counts any extension headers between IPv6 and transport
            pack_into("!H", head, 4, ip_hlen - 40 + l4_hlen + n)
        if tcp:
            seq = (seq0 + i * seg) & 0xFFFFFFFF
            flags = flags0 if i == last_index else flags0 & ~(TCP_FIN | TCP_PSH)
            if i:
                flags &= ~TCP_CWR
            pack_into("!I", head, ip_hlen + 4, seq)
            head[ip_hlen + 13] = flags
            csum = ~fold(base + n + (seq >> 16) + (seq & 0xFFFF) + flags + sum16(data)) & 0xFFFF
        else:
            length = l4_hlen + n
            pack_into("!H", head, ip_hlen + 4, length)
            csum = ~fold(base + n + length + sum16(data)) & 0xFFFF or 0xFFFF
        pack_into("!H", head, csum_at, csum)
        out.append(b"".join((head, data)))
    return out
