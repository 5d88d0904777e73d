"""TSO/USO segmentation and TCP coalescing (qgate.dataplane.offload) against scapy-built packets."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.packet import Packet, raw

from qgate.dataplane import offload as off
from qgate.dataplane.coalesce import coalesce
from qgate.dataplane.offload import (
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    VNET_F_NEEDS_CSUM,
    ZERO_VNET_BYTES,
    VnetHeader,
    finish_checksum,
    parse_vnet_header,
    split_tso,
    transport_checksum_ok,
)
from qgate.errors import DataPlaneError

SEQ0 = 4_294_967_000  # wraps during the split


def _ip(version: int) -> Packet:
    if version == 4:
        return IP(src="10.1.0.2", dst="10.2.0.2", id=65530, flags="DF", tos=0x10, ttl=63)
    return IPv6(src="fd00::2", dst="fd00:2::2", hlim=63, tc=0x10)


def kernel_super_packet(
    version: int, payload: bytes, mss: int, flags: str = "PA", udp: bool = False
) -> tuple[VnetHeader, bytes]:
    """A super-packet as the TUN hands it over: whole payload, only the pseudo-header sum in the checksum."""
    if udp:
        l4: Packet = UDP(sport=5000, dport=6000)
    else:
        l4 = TCP(
            sport=40000, dport=5201, seq=SEQ0, ack=77, flags=flags, window=1000, options=[("NOP", None)] * 12
        )
    packet = bytearray(raw(_ip(version) / l4 / payload))
    ip_hlen = 20 if version == 4 else 40
    addr = packet[12:20] if version == 4 else packet[8:40]
    proto = 17 if udp else 6
    at = ip_hlen + (6 if udp else 16)
    packet[at : at + 2] = off.fold(off.sum16(addr) + proto + len(packet) - ip_hlen).to_bytes(2, "big")
    l4_hlen = 8 if udp else (packet[ip_hlen + 12] >> 4) * 4
    gso_type = GSO_UDP_L4 if udp else (GSO_TCPV4 if version == 4 else GSO_TCPV6)
    header = VnetHeader(VNET_F_NEEDS_CSUM, gso_type, ip_hlen + l4_hlen, mss, ip_hlen, 6 if udp else 16)
    return header, bytes(packet)


def _parse(packet: bytes) -> Packet:
    return IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)


def _ipv4_header_ok(packet: bytes) -> bool:
    """The IPv4 header checksum verifies over the header alone (True for IPv6, which has none)."""
    if packet[0] >> 4 != 4:
        return True
    return off.internet_checksum(packet[: (packet[0] & 0x0F) * 4]) == 0


def _scapy_checksums_match(packet: bytes) -> bool:
    """Let scapy recompute every checksum and compare with what split_tso wrote."""
    parsed = _parse(packet)
    layer = parsed[TCP] if TCP in parsed else parsed[UDP]
    wrote = layer.chksum
    del layer.chksum
    if IP in parsed:
        ip_sum = parsed[IP].chksum
        del parsed[IP].chksum
        again = IP(raw(parsed))
        return bool(ip_sum == again.chksum and wrote == (again[TCP] if TCP in again else again[UDP]).chksum)
    again6 = IPv6(raw(parsed))
    return bool(wrote == (again6[TCP] if TCP in again6 else again6[UDP]).chksum)


@pytest.mark.parametrize("version", [4, 6])
def test_split_tso_turns_64k_super_packet_into_valid_mss_segments(version: int) -> None:
    payload = os.urandom(65000 - 100)
    mss = 1388
    header, packet = kernel_super_packet(version, payload, mss)
    segments = split_tso(header, packet)
    assert len(segments) == -(-len(payload) // mss)
    data = b""
    for i, seg in enumerate(segments):
        parsed = _parse(seg)
        tcp = parsed[TCP]
        last = i == len(segments) - 1
        assert _scapy_checksums_match(seg)
        assert tcp.seq == (SEQ0 + i * mss) % 2**32
        assert tcp.ack == 77 and tcp.window == 1000
        assert str(tcp.flags) == ("PA" if last else "A")
        assert len(bytes(tcp.payload)) == (mss if not last else len(payload) - i * mss)
        if version == 4:
            assert parsed[IP].len == len(seg) and parsed[IP].id == (65530 + i) % 65536
        else:
            assert parsed[IPv6].plen == len(seg) - 40
        data += bytes(tcp.payload)
    assert data == payload


@pytest.mark.parametrize("version", [4, 6])
def test_split_segments_recoalesce_to_the_original_byte_stream(version: int) -> None:
    payload = os.urandom(60000)
    header, packet = kernel_super_packet(version, payload, 1400)
    merged = coalesce(split_tso(header, packet))
    assert len(merged) == 1
    vnet_bytes, super_packet = merged[0]
    vnet = parse_vnet_header(vnet_bytes)
    ip_hlen = 20 if version == 4 else 40
    assert vnet == VnetHeader(VNET_F_NEEDS_CSUM, header.gso_type, header.hdr_len, 1400, ip_hlen, 16)
    assert super_packet[header.hdr_len :] == payload
    assert str(_parse(super_packet)[TCP].flags) == "PA"
    assert _ipv4_header_ok(super_packet)  # the kernel drops a super-packet whose IP header sum is wrong
    # completing the partial checksum gives a valid (unsegmented) packet, as the kernel would
    assert transport_checksum_ok(finish_checksum(vnet, super_packet))


def test_split_tso_clears_cwr_after_first_and_fin_before_last() -> None:
    header, packet = kernel_super_packet(4, os.urandom(5000), 1000, flags="FPAC")
    flags = [str(_parse(s)[TCP].flags) for s in split_tso(header, packet)]
    assert flags == ["AC", "A", "A", "A", "FPA"]


@pytest.mark.parametrize("version", [4, 6])
def test_split_uso_udp_super_packet_gives_datagrams_with_valid_lengths_and_checksums(version: int) -> None:
    payload = os.urandom(10000)
    header, packet = kernel_super_packet(version, payload, 1200, udp=True)
    segments = split_tso(header, packet)
    assert len(segments) == 9
    assert b"".join(bytes(_parse(s)[UDP].payload) for s in segments) == payload
    for seg in segments:
        assert _scapy_checksums_match(seg)
        assert _parse(seg)[UDP].len == len(seg) - (20 if version == 4 else 40)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=65535 - 40 - 60),
    mss=st.integers(min_value=88, max_value=9000),
    version=st.sampled_from([4, 6]),
)
def test_split_and_coalesce_round_trip_for_any_payload_size_and_mss(
    size: int, mss: int, version: int
) -> None:
    payload = os.urandom(size)
    header, packet = kernel_super_packet(version, payload, mss)
    segments = split_tso(header, packet)
    assert len(segments) == max(1, -(-size // mss))
    assert all(transport_checksum_ok(s) for s in segments)
    hlen = header.hdr_len
    assert b"".join(s[hlen:] for s in segments) == payload
    assert all(_ipv4_header_ok(s) for s in segments)
    merged = coalesce(segments)
    assert len(merged) == 1 and merged[0][1][hlen:] == payload
    assert _ipv4_header_ok(merged[0][1])
    if len(segments) == 1:
        assert merged[0] == (ZERO_VNET_BYTES, segments[0])


@given(data=st.binary(max_size=300))
def test_sum16_equals_the_rfc1071_word_loop(data: bytes) -> None:
    padded = data + b"\0" * (len(data) & 1)
    total = sum(int.from_bytes(padded[i : i + 2], "big") for i in range(0, len(padded), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert off.sum16(data) % 0xFFFF == total % 0xFFFF
    assert (off.sum16(data) == 0) == (total == 0)


def test_finish_checksum_completes_a_single_partial_checksum_packet() -> None:
    header, packet = kernel_super_packet(4, b"hello world", 1400)
    single = header._replace(gso_type=off.GSO_NONE, gso_size=0)
    assert not transport_checksum_ok(packet)
    done = split_tso(single, packet)
    assert len(done) == 1 and _scapy_checksums_match(done[0])


def test_vnet_header_packs_little_endian_and_parses_back() -> None:
    header = VnetHeader(1, GSO_TCPV4, 52, 1448, 20, 16)
    assert header.pack() == bytes.fromhex("01013400a80514001000")
    assert parse_vnet_header(header.pack() + b"rest") == header
    with pytest.raises(DataPlaneError):
        parse_vnet_header(b"\0" * 9)


def test_split_tso_rejects_ufo_and_mismatched_ip_version() -> None:
    header, packet = kernel_super_packet(4, os.urandom(3000), 1000)
    with pytest.raises(DataPlaneError):
        split_tso(header._replace(gso_type=GSO_UDP), packet)
    with pytest.raises(DataPlaneError):
        split_tso(header._replace(gso_type=GSO_TCPV6), packet)
    with pytest.raises(DataPlaneError):
        split_tso(header._replace(gso_size=0), packet)
    with pytest.raises(DataPlaneError):
        split_tso(header, packet[:30])


def test_recompute_checksums_sums_the_ipv4_header_alone() -> None:
    packet = bytearray(raw(IP(src="10.1.0.2", dst="10.2.0.2") / TCP(sport=1, dport=2) / b"payload"))
    packet[10:12] = b"\xde\xad"
    fixed = off.recompute_checksums(bytes(packet))
    assert _ipv4_header_ok(fixed) and _scapy_checksums_match(fixed)


def test_tcp_and_udp_checksums_are_vouched_by_the_kernel_flags_or_verified_when_neither_is_set() -> None:
    good = raw(IP(src="10.1.0.2", dst="10.2.0.2") / TCP(sport=1, dport=2, flags="A") / b"data")
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    assert off.checksum_vouched(off.ZERO_VNET, good)
    assert not off.checksum_vouched(off.ZERO_VNET, bytes(bad))
    assert off.checksum_vouched(VnetHeader(flags=off.VNET_F_DATA_VALID), bytes(bad))  # kernel checked it
    assert off.checksum_vouched(VnetHeader(flags=VNET_F_NEEDS_CSUM), bytes(bad))  # computed in the split
    udp = bytearray(raw(IP(src="10.1.0.2", dst="10.2.0.2") / UDP(sport=1, dport=2) / b"data"))
    assert off.checksum_vouched(off.ZERO_VNET, bytes(udp))
    udp[-1] ^= 0xFF
    assert not off.checksum_vouched(off.ZERO_VNET, bytes(udp))
    udp[26:28] = b"\0\0"  # IPv4 UDP without a checksum (RFC 768)
    assert off.checksum_vouched(off.ZERO_VNET, bytes(udp))
    icmp = raw(IP(src="10.1.0.2", dst="10.2.0.2", proto=1) / b"\x08\x00\xff\xff")
    assert off.checksum_vouched(off.ZERO_VNET, icmp)  # not merged by the receiver: not checked


def test_split_tso_refuses_headers_that_lie_and_never_raises_anything_else() -> None:
    header, packet = kernel_super_packet(4, os.urandom(3000), 1000)
    lies = [
        (VnetHeader(0, 0x85, 0, 7, 20, 16), b"E"),  # shorter than an IP header
        (header._replace(flags=0), packet),  # GSO without NEEDS_CSUM
        (header._replace(gso_type=GSO_UDP_L4, csum_offset=6), packet),  # UDP GSO on a TCP packet
        (header._replace(csum_offset=6), packet),  # the checksum is not where TCP keeps it
        (header._replace(csum_start=0), packet),
        (header, packet[:-1]),  # IPv4 total length says one byte more
    ]
    udp_header, udp_packet = kernel_super_packet(4, os.urandom(3000), 1000, udp=True)
    lying_udp = bytearray(udp_packet)
    lying_udp[24:26] = (100).to_bytes(2, "big")
    lies.append((udp_header, bytes(lying_udp)))  # UDP length field lies
    for vnet, data in lies:
        with pytest.raises(DataPlaneError):
            split_tso(vnet, data)


def test_split_tso_keeps_ipv6_extension_headers_in_the_payload_length() -> None:
    payload = os.urandom(3000)
    tcp = TCP(sport=40000, dport=5201, seq=SEQ0, ack=77, flags="PA", window=1000)
    packet = bytearray(raw(IPv6(src="fd00::2", dst="fd00:2::2") / IPv6ExtHdrDestOpt() / tcp / payload))
    start = 48
    pseudo = off.fold(off.sum16(packet[8:40]) + 6 + len(packet) - start)  # what the kernel leaves there
    packet[start + 16 : start + 18] = pseudo.to_bytes(2, "big")
    vnet = VnetHeader(VNET_F_NEEDS_CSUM, GSO_TCPV6, 0, 1000, start, 16)
    segments = split_tso(vnet, bytes(packet))
    assert len(segments) == 3
    for seg in segments:
        assert int.from_bytes(seg[4:6], "big") == len(seg) - 40
        assert _scapy_checksums_match(seg)
    assert b"".join(bytes(_parse(s)[TCP].payload) for s in segments) == payload
