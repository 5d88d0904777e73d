"""Minimal pcap reading and the lab's WAN analysis: is every datagram qgate, is anything plaintext?

Reads classic libpcap files (as ``tcpdump -w`` writes: magic ``a1b2c3d4`` in either byte
order, microsecond or nanosecond variant) with link types Ethernet (1), raw IP (101, 228),
Linux cooked v1 (113) and v2 (276); decodes IPv4 and UDP with ``struct`` only.

Plaintext search: a captured frame is a *hit* when it contains any 16-byte run of a known inner
payload (the TCP transfer's random bytes, the ping pattern). Every 16-byte run of a payload
contains one payload block of 8 bytes aligned at a multiple of 8, so the aligned blocks are
indexed (value -> offset) and each frame's 8-byte words at all 8 alignments are looked up,
then a candidate is confirmed by comparing 16 bytes around it.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

PCAP_MAGICS: Final = {
    b"\xd4\xc3\xb2\xa1": "<",
    b"\xa1\xb2\xc3\xd4": ">",
    b"\x4d\x3c\xb2\xa1": "<",
    b"\xa1\xb2\x3c\x4d": ">",
}
"""First 4 file bytes -> byte order (microsecond and nanosecond pcap)."""
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = (101, 228)
LINKTYPE_SLL: Final = 113
LINKTYPE_SLL2: Final = 276
ETHERTYPE_IPV4: Final = 0x0800
ETHERTYPE_VLAN: Final = (0x8100, 0x88A8)
IPPROTO_UDP: Final = 17
RUN: Final = 16
"""Bytes: the plaintext run length that counts as a hit."""
BLOCK: Final = 8
"""Bytes: the aligned block size indexed (RUN // 2)."""


class PcapFormatError(ValueError):
    """The file is not a pcap this reader understands."""


def read_pcap(path: Path) -> tuple[int, list[bytes]]:
    """Read a classic pcap file.

    Returns:
        ``(linktype, frames)``, each frame as captured (possibly truncated to the snap length).

    Raises:
        PcapFormatError: bad magic or a truncated record header (a truncated last record, as
            left by a killed capture, is dropped silently).
    """
    data = path.read_bytes()
    if len(data) < 24 or data[:4] not in PCAP_MAGICS:
        raise PcapFormatError(f"{path}: not a classic pcap file (pcapng is not supported)")
    order = PCAP_MAGICS[data[:4]]
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0x0FFFFFFF
    frames: list[bytes] = []
    offset = 24
    while offset + 16 <= len(data):
        incl_len = struct.unpack_from(order + "I", data, offset + 8)[0]
        start = offset + 16
        if start + incl_len > len(data):
            break
        frames.append(data[start : start + incl_len])
        offset = start + incl_len
    return linktype, frames


def ipv4_of(linktype: int, frame: bytes) -> bytes | None:
    """Return the IPv4 packet inside ``frame`` for ``linktype``, or None when it is not IPv4."""
    if linktype == LINKTYPE_ETHERNET:
        off, ethertype = 14, struct.unpack_from("!H", frame, 12)[0] if len(frame) >= 14 else 0
        while ethertype in ETHERTYPE_VLAN and len(frame) >= off + 4:
            ethertype = struct.unpack_from("!H", frame, off + 2)[0]
            off += 4
    elif linktype == LINKTYPE_SLL:
        off, ethertype = 16, struct.unpack_from("!H", frame, 14)[0] if len(frame) >= 16 else 0
    elif linktype == LINKTYPE_SLL2:
        off, ethertype = 20, struct.unpack_from("!H", frame, 0)[0] if len(frame) >= 20 else 0
    elif linktype in LINKTYPE_RAW:
        off, ethertype = 0, ETHERTYPE_IPV4 if frame[:1] and frame[0] >> 4 == 4 else 0
    else:
        raise PcapFormatError(f"unsupported pcap link type {linktype}")
    if ethertype != ETHERTYPE_IPV4 or len(frame) < off + 20:
        return None
    return frame[off:]


@dataclass(frozen=True)
class UdpDatagram:
    """One UDP datagram decoded from an IPv4 packet (addresses as dotted strings)."""

    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes


def udp_of(ip: bytes) -> UdpDatagram | None:
    """Decode UDP from an IPv4 packet; None for other protocols and non-first fragments.

    A first fragment (MF set) yields only the part of the payload it carries.
    """
    ihl = (ip[0] & 0x0F) * 4
    total_len = struct.unpack_from("!H", ip, 2)[0]
    frag = struct.unpack_from("!H", ip, 6)[0] & 0x1FFF
    if ip[9] != IPPROTO_UDP or frag != 0 or len(ip) < ihl + 8:
        return None
    src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
    sport, dport, udp_len = struct.unpack_from("!HHH", ip, ihl)
    end = min(len(ip), total_len, ihl + udp_len)
    return UdpDatagram(src, dst, sport, dport, ip[ihl + 8 : end])


def is_ip_fragment(ip: bytes) -> bool:
    """Return whether an IPv4 packet is a fragment (MF set or fragment offset non-zero)."""
    flags_offset: int = struct.unpack_from("!H", ip, 6)[0]
    return flags_offset & 0x3FFF != 0


class PayloadIndex:
    """Known plaintext to search for: aligned 8-byte blocks of long payloads, short periodic patterns."""

    def __init__(self) -> None:
        self._corpus: list[bytes] = []
        self._blocks: dict[int, tuple[int, int]] = {}
        self._rotations: list[bytes] = []

    def add_payload(self, data: bytes) -> None:
        """Index ``data`` (e.g. the 20 MB TCP transfer) so any 16-byte run of it is found."""
        src = len(self._corpus)
        self._corpus.append(data)
        n = len(data) // BLOCK
        words = memoryview(data)[: n * BLOCK].cast("Q").tolist()
        offsets = range(0, n * BLOCK, BLOCK)
        for word, offset in zip(reversed(words), reversed(offsets), strict=True):
            self._blocks[word] = (src, offset)

    def add_pattern(self, pattern: bytes) -> None:
        """Index a short pattern repeated in packets (``ping -p``): every 16-byte rotation of it."""
        reps = pattern * (RUN // len(pattern) + 2)
        self._rotations.extend({reps[r : r + RUN] for r in range(len(pattern))})

    def contains_plaintext(self, frame: bytes) -> bool:
        """Return whether ``frame`` holds any 16-byte run of an indexed payload or pattern."""
        if any(rot in frame for rot in self._rotations):
            return True
        view = memoryview(frame)
        keys = self._blocks.keys()
        for align in range(BLOCK):
            count = (len(frame) - align) // BLOCK
            if count <= 0:
                break
            words = view[align : align + count * BLOCK].cast("Q").tolist()
            if keys.isdisjoint(words):
                continue
            for j, word in enumerate(words):
                hit = self._blocks.get(word)
                if hit is not None and self._confirm(frame, align + j * BLOCK, hit):
                    return True
        return False

    def _confirm(self, frame: bytes, pos: int, hit: tuple[int, int]) -> bool:
        data = self._corpus[hit[0]]
        offset = hit[1]
        for back in range(BLOCK + 1):
            start, fstart = offset - back, pos - back
            if start < 0 or fstart < 0 or start + RUN > len(data) or fstart + RUN > len(frame):
                continue
            if frame[fstart : fstart + RUN] == data[start : start + RUN]:
                return True
        return False


@dataclass
class WanReport:
    """What crossed the WAN link, from the capture.

    Attributes:
        frames: captured frames.
        datagrams: UDP datagrams between the two WAN addresses (either direction).
        kinds: datagram count per qgate message kind (from the classifier).
        unparsed: datagrams the classifier rejected (not valid qgate framing).
        other_packets: IPv4 packets between the WAN addresses that are not UDP (e.g. KME-to-KME TLS).
        ip_fragments: IPv4 fragments seen (qgate never relies on IP fragmentation).
        plaintext_hits: frames (of any kind) holding a 16-byte run of known inner payload.
        gso_batches: captured UDP GSO super-datagrams (the capture point sees them before the
            kernel cuts them into wire datagrams; each segment is counted in ``datagrams``).
    """

    frames: int = 0
    datagrams: int = 0
    gso_batches: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    unparsed: int = 0
    other_packets: int = 0
    ip_fragments: int = 0
    plaintext_hits: int = 0


def _addresses(ip: bytes) -> set[str]:
    return {str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))}


def _ipv4_packets(linktype: int, frames: list[bytes]) -> Iterator[tuple[bytes, bytes | None]]:
    for frame in frames:
        yield frame, ipv4_of(linktype, frame)


def analyse_wan(
    pcap: Path,
    *,
    endpoints: tuple[str, str],
    classify: Callable[[bytes], str | None] | None,
    index: PayloadIndex,
) -> WanReport:
    """Check a WAN capture: classify each UDP datagram between ``endpoints``, count plaintext hits.

    Args:
        pcap: the capture file.
        endpoints: the two WAN IPv4 addresses.
        classify: ``qgate.protocol.wire.classify_datagram`` (kind or None); None to skip it
            (the bare-veth baseline has no qgate datagrams).
        index: the known plaintext.

    Raises:
        PcapFormatError: the capture is not readable.
    """
    linktype, frames = read_pcap(pcap)
    report = WanReport(frames=len(frames))
    pair = set(endpoints)
    for frame, ip in _ipv4_packets(linktype, frames):
        if index.contains_plaintext(frame):
            report.plaintext_hits += 1
        if (
            ip is None
            or {str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))} != pair
        ):
            continue
        if is_ip_fragment(ip):
            report.ip_fragments += 1
        udp = udp_of(ip)
        if udp is None:
            report.other_packets += 1
            continue
        segments = gso_segments(udp.payload) if classify is not None else [udp.payload]
        report.gso_batches += len(segments) > 1
        for segment in segments:
            report.datagrams += 1
            kind = classify(segment) if classify is not None else None
            if kind is None:
                report.unparsed += 1
            else:
                report.kinds[kind] += 1
    return report


_DATA_PREFIX = b"\x04\x00\x00\x00"  # qgate data record: type 0x04, three zero bytes


def gso_segments(payload: bytes) -> list[bytes]:
    """Cut a captured UDP GSO super-datagram back into the wire datagrams it stands for.

    The sender's capture point sees a GSO batch as one UDP payload of equal-size segments (the
    last may be shorter). Every qgate data record starts with ``04 00 00 00``; the segment size is
    the smallest that puts that prefix at every segment start. Anything else is one datagram.
    """
    if not payload.startswith(_DATA_PREFIX):
        return [payload]
    size = payload.find(_DATA_PREFIX, 32)
    while size > 0:
        starts = range(0, len(payload), size)
        if all(payload.startswith(_DATA_PREFIX, pos) for pos in starts) and len(payload) - starts[-1] >= 32:
            return [payload[pos : pos + size] for pos in starts]
        size = payload.find(_DATA_PREFIX, size + 1)
    return [payload]
