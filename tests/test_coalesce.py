"""Coalescing opened packets into GSO super-packets for the TUN (qgate.dataplane.coalesce), against scapy."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw
from test_offload import _ipv4_header_ok, kernel_super_packet

from qgate.dataplane import offload as off
from qgate.dataplane.coalesce import UDP_MAX_SEGMENTS, coalesce
from qgate.dataplane.offload import (
    GSO_TCPV4,
    GSO_UDP_L4,
    VNET_F_NEEDS_CSUM,
    ZERO_VNET_BYTES,
    VnetHeader,
    finish_checksum,
    parse_vnet_header,
    split_tso,
    transport_checksum_ok,
)


def _segments(n: int, size: int = 1000, seq: int = 1, **tcp: object) -> list[bytes]:
    base = {"sport": 1111, "dport": 2222, "ack": 5, "flags": "A", "window": 64}
    base.update(tcp)
    return [
        raw(IP(src="10.1.0.2", dst="10.2.0.2") / TCP(seq=seq + i * size, **base) / (bytes([i]) * size))  # type: ignore[arg-type]
        for i in range(n)
    ]


def test_coalesce_leaves_non_tcp_and_other_flows_single_with_zero_header_in_order() -> None:
    udp = raw(IP(src="10.1.0.2", dst="10.2.0.2") / UDP(sport=1, dport=2) / b"x")
    flow_a = _segments(3)
    flow_b = _segments(2, sport=3333)
    out = coalesce([flow_a[0], udp, flow_b[0], flow_a[1], flow_b[1], flow_a[2]])
    assert [parse_vnet_header(h).gso_type for h, _ in out] == [GSO_TCPV4, 0, GSO_TCPV4]
    assert out[1] == (ZERO_VNET_BYTES, udp)
    assert len(out[0][1]) == 40 + 3000 and len(out[2][1]) == 40 + 2000


def test_coalesce_does_not_merge_across_a_sequence_gap_or_changed_ack() -> None:
    gap = _segments(2) + _segments(1, seq=5001)
    assert len(coalesce(gap)) == 2
    acks = _segments(2) + _segments(1, seq=2001, ack=6)
    assert len(coalesce(acks)) == 2


def test_coalesce_ends_a_group_at_psh_and_after_a_short_segment() -> None:
    psh = _segments(2, flags="PA") + _segments(1, seq=2001)
    assert [len(p) for _, p in coalesce(psh)] == [1040, 1040, 1040]
    short = [*_segments(2), *_segments(1, size=500, seq=2001), *_segments(1, seq=2501)]
    assert [len(p) for _, p in coalesce(short)] == [40 + 2500, 1040]


def test_coalesce_with_verify_never_merges_a_segment_with_a_bad_checksum() -> None:
    segs = _segments(3)
    bad = bytearray(segs[1])
    bad[-1] ^= 0xFF
    out = coalesce([segs[0], bytes(bad), segs[2]], verify=True)
    assert (ZERO_VNET_BYTES, bytes(bad)) in out
    assert all(len(p) == 1040 for _, p in out)


def test_coalesce_caps_super_packets_at_64k() -> None:
    out = coalesce(_segments(100, size=1400))
    assert [len(p) for _, p in out] == [40 + 46 * 1400, 40 + 46 * 1400, 40 + 8 * 1400]


def _datagrams(n: int, size: int = 64, sport: int = 5000, version: int = 4, **ip: object) -> list[bytes]:
    net = IP(src="10.1.0.2", dst="10.2.0.2", **ip) if version == 4 else IPv6(src="fd00::2", dst="fd00:2::2")
    return [raw(net / UDP(sport=sport, dport=6000) / (bytes([i]) * size)) for i in range(n)]  # type: ignore[operator]


@pytest.mark.parametrize("version", [4, 6])
def test_udp_datagrams_of_one_flow_merge_into_one_uso_packet_that_splits_back_to_them(version: int) -> None:
    datagrams = _datagrams(10, version=version)
    out = coalesce(datagrams, udp=True)
    assert len(out) == 1
    vnet = parse_vnet_header(out[0][0])
    ip_hlen = 20 if version == 4 else 40
    assert vnet == VnetHeader(VNET_F_NEEDS_CSUM, GSO_UDP_L4, ip_hlen + 8, 64, ip_hlen, 6)
    assert _ipv4_header_ok(out[0][1])
    assert transport_checksum_ok(finish_checksum(vnet, out[0][1]))  # as the kernel completes it
    again = split_tso(vnet, out[0][1])  # what the kernel's USO segmentation hands the receiver
    assert [p[ip_hlen:] for p in again] == [d[ip_hlen:] for d in datagrams]


def test_udp_is_merged_only_when_asked_and_a_shorter_datagram_ends_the_group() -> None:
    datagrams = _datagrams(3)
    assert coalesce(datagrams) == [(ZERO_VNET_BYTES, d) for d in datagrams]
    mixed = [*_datagrams(2), *_datagrams(1, size=20), *_datagrams(1)]
    assert [len(p) for _, p in coalesce(mixed, udp=True)] == [28 + 64 + 64 + 20, 28 + 64]


def test_udp_groups_hold_at_most_64_datagrams_and_never_mix_flows_or_tos() -> None:
    out = coalesce(_datagrams(UDP_MAX_SEGMENTS + 6), udp=True)
    assert [len(p) for _, p in out] == [28 + 64 * UDP_MAX_SEGMENTS, 28 + 64 * 6]
    a, b = _datagrams(2), _datagrams(2, sport=5001)
    out = coalesce([a[0], b[0], a[1], b[1]], udp=True)
    assert [(IP(p).sport, len(p)) for _, p in out] == [(5000, 28 + 128), (5001, 28 + 128)]
    ef = _datagrams(1, tos=0xB8)  # same flow, another DSCP: never merged into one packet
    assert [len(p) for _, p in coalesce([a[0], ef[0]], udp=True)] == [28 + 64, 28 + 64]


def test_udp_with_verify_never_merges_a_datagram_with_a_bad_checksum() -> None:
    datagrams = _datagrams(3)
    bad = bytearray(datagrams[1])
    bad[-1] ^= 0xFF
    out = coalesce([datagrams[0], bytes(bad), datagrams[2]], udp=True, verify=True)
    assert (ZERO_VNET_BYTES, bytes(bad)) in out and len(out) == 3


def test_tcp_and_udp_groups_of_different_flows_keep_their_order() -> None:
    tcp = _segments(2)
    udp = _datagrams(2)
    out = coalesce([tcp[0], udp[0], tcp[1], udp[1]], udp=True)
    assert [parse_vnet_header(h).gso_type for h, _ in out] == [GSO_TCPV4, GSO_UDP_L4]


def test_split_tso_output_recoalesces_for_a_64k_super_packet() -> None:
    header, packet = kernel_super_packet(4, bytes(range(256)) * 200, 1400)
    merged = coalesce(split_tso(header, packet))
    assert len(merged) == 1 and merged[0][1][header.hdr_len :] == packet[header.hdr_len :]
    assert off.fold(0) == 0


def test_a_tun_that_refuses_udp_super_packets_gets_every_datagram_one_by_one_and_merging_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from qgate.dataplane.tunio import VnetTun
    from qgate.errors import DataPlaneError

    read_fd, write_fd = os.pipe()
    tun = VnetTun(write_fd, "qgtest0", vnet=True, offloads=0x6F, multi_queue=False)
    written: list[bytes] = []

    def kernel(parts: list[bytes], size: int) -> None:  # an old kernel: GSO_UDP_L4 writes are refused
        if parse_vnet_header(parts[0]).gso_type == GSO_UDP_L4:
            raise DataPlaneError("write to TUN device qgtest0 failed: Invalid argument")
        written.append(parts[1])

    tun._write_all = kernel  # type: ignore[method-assign]
    datagrams = _datagrams(150)
    try:
        assert tun.write_packets(datagrams) == 0
        assert tun.write_packets(datagrams) == 0
    finally:
        tun.close()
        os.close(read_fd)
    assert [p[28:] for p in written] == [d[28:] for d in datagrams] * 2  # all of them, in order
    assert all(transport_checksum_ok(p) for p in written)
    assert sum("refused UDP super-packets" in r.getMessage() for r in caplog.records) == 1


def _flow_packets(kind: str, flow: int, size: int, seq: int) -> bytes:
    """One packet of a small test universe: TCP data/ACK, UDP (any size), ICMP, IP options."""
    ip = IP(src=f"10.1.0.{2 + flow % 2}", dst="10.2.0.2")
    if kind == "tcp":
        return raw(ip / TCP(sport=40000 + flow, dport=80, seq=seq, flags="A") / (b"t" * size))
    if kind == "ack_with_ip_options":
        ip.options = b"\x01\x01\x01\x00"
        return raw(ip / TCP(sport=40000 + flow, dport=80, seq=seq, flags="A"))
    if kind == "udp":
        return raw(ip / UDP(sport=50000 + flow, dport=53) / (bytes([seq % 256]) * size))
    if kind == "udp6":
        return raw(IPv6(src="fd00::2", dst="fd00::9") / UDP(sport=50000 + flow, dport=53) / (b"6" * size))
    ip.proto = 1
    return raw(ip / (b"\x08\x00\x00\x00" + bytes(size)))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["tcp", "ack_with_ip_options", "udp", "udp6", "icmp"]),
            st.integers(0, 2),
            st.sampled_from([0, 1, 40, 100, 100, 100]),
        ),
        max_size=40,
    ),
    st.booleans(),
)
def test_coalesce_then_split_gives_every_flow_its_packets_back_in_order(
    stream: list[tuple[str, int, int]], udp: bool
) -> None:
    seqs: dict[int, int] = {}
    packets = []
    for kind, flow, size in stream:
        seq = seqs.get(flow, 1000)
        packets.append(_flow_packets(kind, flow, size, seq))
        seqs[flow] = seq + (size if kind == "tcp" else 0)
    again = [p for h, packet in coalesce(packets, udp=udp) for p in split_tso(parse_vnet_header(h), packet)]

    def per_flow(items: list[bytes]) -> dict[bytes, list[bytes]]:
        flows: dict[bytes, list[bytes]] = {}
        for p in items:
            v4 = p[0] >> 4 == 4
            ihl = (p[0] & 0x0F) * 4 if v4 else 40
            key = (p[12:20] if v4 else p[8:40]) + bytes([p[9] if v4 else p[6]]) + p[ihl : ihl + 4]
            flows.setdefault(key, []).append(p[ihl + (8 if (p[9] if v4 else p[6]) == 17 else 0) :])
        return flows

    assert per_flow(again) == per_flow(packets)
