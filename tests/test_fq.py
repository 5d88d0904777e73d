"""FQ-CoDel over TUN reads (qgate.dataplane.fq): flow isolation, fairness, CoDel drops and ECN marks."""

from __future__ import annotations

import os
import struct

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw

from qgate.dataplane.fq import INTERVAL, TARGET, FairQueue, flow_hash, mark_ce
from qgate.dataplane.offload import ZERO_VNET, internet_checksum

BULK = raw(IP(src="10.1.0.2", dst="10.2.0.2") / TCP(sport=40000, dport=5201) / (b"b" * 1400))
OTHER_BULK = raw(IP(src="10.1.0.3", dst="10.2.0.2") / TCP(sport=40001, dport=5201) / (b"o" * 1400))
PING = raw(IP(src="10.1.0.2", dst="10.2.0.2", proto=1) / b"\x08\x00\xf7\xff\x00\x00\x00\x00")
ECT_BULK = raw(IP(src="10.1.0.4", dst="10.2.0.2", tos=0x02) / TCP(sport=40002, dport=5201) / (b"e" * 1400))


def _drain(fq: FairQueue, now: float, budget: int = 1 << 30) -> list[bytes]:
    return [packet for _, packet in fq.dequeue(budget, now)]


def test_a_sparse_flow_is_served_before_a_bulk_flows_backlog() -> None:
    fq = FairQueue()
    for _ in range(200):
        fq.enqueue((ZERO_VNET, BULK), 0.0)
    fq.dequeue(3000, 0.0)  # the bulk flow has used its first quantum: it is an old flow now
    fq.enqueue((ZERO_VNET, PING), 0.001)
    assert _drain(fq, 0.001, budget=1)[0] == PING


def test_two_bulk_flows_share_the_budget_equally() -> None:
    fq = FairQueue()
    for _ in range(300):
        fq.enqueue((ZERO_VNET, BULK), 0.0)
        fq.enqueue((ZERO_VNET, OTHER_BULK), 0.0)
    served = _drain(fq, 0.001, budget=200 * 1440)
    share = served.count(BULK) / len(served)
    assert 0.45 <= share <= 0.55


def test_dequeue_returns_at_least_one_read_and_stops_at_the_budget() -> None:
    fq = FairQueue()
    for _ in range(10):
        fq.enqueue((ZERO_VNET, BULK), 0.0)
    assert len(fq.dequeue(1, 0.0)) == 1
    assert len(fq.dequeue(3 * len(BULK), 0.0)) == 3
    assert len(_drain(fq, 0.0)) == 6 and fq.backlog == 0 and len(fq) == 0
    assert fq.dequeue(1000, 0.0) == []


def _stamped(now: float) -> bytes:
    """A bulk-flow packet that carries its enqueue time (so the sojourn is known after drops)."""
    return raw(IP(src="10.1.0.2", dst="10.2.0.2") / TCP(sport=40000, dport=5201) / struct.pack("!d", now))


def test_codel_drops_only_after_a_standing_queue_lasted_an_interval_and_stops_once_drained() -> None:
    fq = FairQueue(ecn=False)
    first_drop, now = None, 0.0
    while now < 1.0:  # offered: 2 reads per ms; served: 1 per ms (a standing queue builds)
        fq.enqueue((ZERO_VNET, _stamped(now)), now)
        fq.enqueue((ZERO_VNET, _stamped(now)), now)
        fq.dequeue(1, now)
        if first_drop is None and fq.stats.drops_codel:
            first_drop = now
        now += 0.001
    assert first_drop is not None and first_drop >= TARGET + INTERVAL
    dropped = fq.stats.drops_codel
    assert dropped > 10  # the drop rate rises while the queue stands (RFC 8289 control law)
    while fq.backlog:  # the overload ends: serve everything, 1 per ms
        fq.dequeue(1, now)
        now += 0.001
    after = fq.stats.drops_codel
    for _ in range(50):  # a light load afterwards is served without drops
        fq.enqueue((ZERO_VNET, _stamped(now)), now)
        assert len(fq.dequeue(1, now + 0.0005)) == 1
        now += 0.001
    assert fq.stats.drops_codel == after


def test_codel_marks_ecn_capable_reads_instead_of_dropping_them() -> None:
    fq = FairQueue()
    marked: list[bytes] = []
    now = 0.0
    for _ in range(1500):
        fq.enqueue((ZERO_VNET, ECT_BULK), now)
        fq.enqueue((ZERO_VNET, ECT_BULK), now)
        marked.extend(p for _, p in fq.dequeue(1, now) if p[1] & 0x03 == 0x03)
        now += 0.001
    assert fq.stats.ecn_marks > 0 and fq.stats.drops_codel == 0
    assert marked and all(internet_checksum(p[:20]) == 0 for p in marked)  # header sum still right


def test_the_byte_limit_drops_from_the_fattest_flow_not_from_a_sparse_one() -> None:
    fq = FairQueue(limit_bytes=50 * len(BULK))
    fq.enqueue((ZERO_VNET, PING), 0.0)
    for _ in range(100):
        fq.enqueue((ZERO_VNET, BULK), 0.0)
    assert fq.stats.drops_overlimit >= 50 and fq.backlog <= 50 * len(BULK)
    assert PING in _drain(fq, 0.0)


def test_overflow_drops_in_batches_of_at_most_half_the_fattest_flow() -> None:
    fq = FairQueue(limit_bytes=100 * len(BULK))
    for _ in range(100):
        fq.enqueue((ZERO_VNET, BULK), 0.0)
    fq.enqueue((ZERO_VNET, BULK), 0.0)  # one over: half the flow goes at once, not one read per enqueue
    assert fq.stats.drops_overlimit == 51 and len(fq) == 50  # down to half its bytes


def test_mark_ce_only_touches_ecn_capable_ipv4_and_ipv6() -> None:
    assert mark_ce(BULK) is None
    v6 = raw(IPv6(src="fd00::1", dst="fd00::2", tc=0x01) / UDP(sport=1, dport=2) / b"x")
    marked = mark_ce(v6)
    assert marked is not None and IPv6(marked).tc & 0x03 == 0x03
    assert mark_ce(b"") is None


def test_one_ping_session_is_one_flow_and_fragments_hash_without_ports() -> None:
    echoes = [raw(IP(src="10.1.0.2", dst="10.2.0.2") / ICMP(id=7, seq=n) / b"x") for n in range(50)]
    assert len({flow_hash(e) for e in echoes}) == 1  # the changing ICMP checksum is no port
    later = [raw(IP(src="10.1.0.2", dst="10.2.0.2", frag=f, proto=17) / os.urandom(64)) for f in range(9, 40)]
    assert len({flow_hash(f) for f in later}) == 1  # payload bytes where ports would be are not ports


def test_flows_hash_by_addresses_protocol_and_ports() -> None:
    assert flow_hash(BULK) == flow_hash(BULK) and flow_hash(b"\x45") == 0
    ports = {flow_hash(raw(IP(src="10.1.0.2", dst="10.2.0.2") / UDP(sport=p, dport=9))) for p in range(64)}
    assert len(ports) > 32
