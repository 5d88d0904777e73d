"""The lab's pcap reader and plaintext finder, on synthetic captures (no root needed)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from qgate.lab_pcap import PayloadIndex, PcapFormatError, analyse_wan, read_pcap

A, B = "10.99.0.1", "10.99.0.2"


def _ipv4(src: str, dst: str, proto: int, body: bytes, *, frag: int = 0) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, frag, 64, proto, 0,
        bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))),
    )  # fmt: skip
    return hdr + body


def _udp(src: str, dst: str, payload: bytes, *, sport: int = 51820, dport: int = 51820) -> bytes:
    return _ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def _eth(ip: bytes) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip


def _pcap(
    path: Path, frames: list[bytes], *, linktype: int = 1, magic: int = 0xA1B2C3D4, order: str = "<"
) -> Path:
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for i, frame in enumerate(frames):
        out += struct.pack(order + "IIII", i, 0, len(frame), len(frame)) + frame
    path.write_bytes(out)
    return path


def _classify(data: bytes) -> str | None:
    return {1: "handshake", 4: "data"}.get(data[0]) if data else None


@pytest.fixture
def payload() -> bytes:
    return os.urandom(1 << 20)


def test_analyse_wan_counts_qgate_datagrams_and_unparsed(tmp_path: Path) -> None:
    frames = [_eth(_udp(A, B, b"\x04" + os.urandom(100))), _eth(_udp(B, A, b"\x01" + os.urandom(50))),
              _eth(_udp(A, B, b"\x09junk")), _eth(_ipv4(A, B, 6, os.urandom(40))),
              _eth(_udp("10.1.0.2", "10.2.0.2", b"\x09other"))]  # fmt: skip
    report = analyse_wan(_pcap(tmp_path / "c.pcap", frames), endpoints=(A, B), classify=_classify,
                         index=PayloadIndex())  # fmt: skip
    assert report.frames == 5
    assert report.datagrams == 3
    assert dict(report.kinds) == {"data": 1, "handshake": 1}
    assert report.unparsed == 1
    assert report.other_packets == 1
    assert report.plaintext_hits == 0


@pytest.mark.parametrize("offset", [0, 1, 3, 7, 8, 13, 100_003])
@pytest.mark.parametrize("shift", [0, 1, 5, 7])
def test_plaintext_run_of_16_bytes_found_at_any_alignment(payload: bytes, offset: int, shift: int) -> None:
    index = PayloadIndex()
    index.add_payload(payload)
    frame = os.urandom(20 + shift) + payload[offset : offset + 16] + os.urandom(30)
    assert index.contains_plaintext(frame)


def test_plaintext_run_of_15_bytes_is_not_a_hit(payload: bytes) -> None:
    index = PayloadIndex()
    index.add_payload(payload)
    assert not index.contains_plaintext(os.urandom(21) + payload[5:20] + os.urandom(30))


def test_random_frames_give_no_plaintext_hits(payload: bytes) -> None:
    index = PayloadIndex()
    index.add_payload(payload)
    index.add_pattern(os.urandom(16))
    assert not any(index.contains_plaintext(os.urandom(1500)) for _ in range(300))


def test_ping_pattern_found_in_echo_payload() -> None:
    pattern = os.urandom(16)
    index = PayloadIndex()
    index.add_pattern(pattern)
    data = bytearray((pattern * 4)[:56])
    data[:16] = os.urandom(16)  # ping's timestamp overwrites the start
    icmp = b"\x08\x00\x00\x00\x00\x01\x00\x01" + bytes(data)
    assert index.contains_plaintext(_eth(_ipv4("10.1.0.2", "10.2.0.2", 1, icmp)))


def test_plaintext_hits_counted_per_frame(tmp_path: Path, payload: bytes) -> None:
    index = PayloadIndex()
    index.add_payload(payload)
    frames = [_eth(_ipv4("10.1.0.2", "10.2.0.2", 6, os.urandom(20) + payload[1000:2400])),
              _eth(_udp(A, B, b"\x04" + os.urandom(200)))]  # fmt: skip
    report = analyse_wan(_pcap(tmp_path / "p.pcap", frames), endpoints=(A, B), classify=None, index=index)
    assert report.plaintext_hits == 1
    assert report.unparsed == 1  # no classifier: nothing counts as qgate


def test_ip_fragments_counted(tmp_path: Path) -> None:
    first = bytearray(_udp(A, B, b"\x04" + os.urandom(100)))
    first[6] = 0x20  # MF
    frames = [_eth(bytes(first))]
    report = analyse_wan(_pcap(tmp_path / "f.pcap", frames), endpoints=(A, B), classify=_classify,
                         index=PayloadIndex())  # fmt: skip
    assert report.ip_fragments == 1


@pytest.mark.parametrize(("magic", "order"), [(0xA1B2C3D4, "<"), (0xA1B2C3D4, ">"), (0xA1B23C4D, "<")])
def test_read_pcap_accepts_both_byte_orders_and_nanosecond_magic(
    tmp_path: Path, magic: int, order: str
) -> None:
    frames = [b"abc", b"defgh"]
    linktype, got = read_pcap(_pcap(tmp_path / "x.pcap", frames, magic=magic, order=order))
    assert linktype == 1 and got == frames


def test_read_pcap_linux_cooked_v2(tmp_path: Path) -> None:
    sll2 = struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\x00" * 8)
    pcap = _pcap(tmp_path / "s.pcap", [sll2 + _udp(A, B, b"\x04" + os.urandom(40))], linktype=276)
    report = analyse_wan(pcap, endpoints=(A, B), classify=_classify, index=PayloadIndex())
    assert report.datagrams == 1 and report.kinds["data"] == 1


def test_read_pcap_rejects_pcapng(tmp_path: Path) -> None:
    path = tmp_path / "n.pcapng"
    path.write_bytes(b"\x0a\x0d\x0d\x0a" + b"\x00" * 40)
    with pytest.raises(PcapFormatError):
        read_pcap(path)


def test_read_pcap_drops_truncated_last_record(tmp_path: Path) -> None:
    path = _pcap(tmp_path / "t.pcap", [b"one", b"two-two"])
    path.write_bytes(path.read_bytes()[:-3])
    assert read_pcap(path)[1] == [b"one"]


def test_a_captured_udp_gso_batch_is_cut_back_into_its_wire_datagrams() -> None:
    import os

    from qgate.lab_pcap import gso_segments
    from qgate.protocol.wire import classify_datagram, pack_data_header

    records = [pack_data_header(7, n) + os.urandom(1400) for n in range(5)]
    records.append(pack_data_header(7, 5) + os.urandom(300))
    segments = gso_segments(b"".join(records))
    assert segments == records
    assert all(classify_datagram(s) == "data" for s in segments)
    single = pack_data_header(7, 9) + os.urandom(80)
    assert gso_segments(single) == [single]
