"""Flow queuing with CoDel for the TUN read path (RFC 8290 FQ-CoDel, RFC 8289 CoDel); sans-I/O.

A TUN device has no back-pressure: the kernel puts packets in the device's ring until it is full
and drops the rest, so a qdisc on the TUN never holds a queue and a bulk flow that outruns the
gateway builds a long FIFO in the ring, in front of every other flow (grid protection traffic,
pings). The gateway therefore drains the ring into this queue each time the TUN is readable and
serves it by deficit round robin over flows, new (sparse) flows first, under a byte budget per
wake-up; CoDel on each flow's queue drops (or ECN-marks, RFC 3168) at the head when packets have
waited more than ``target`` for longer than ``interval``, so TCP keeps the standing queue short.
Items are whole TUN reads (one packet or one TSO super-packet); a drop or mark takes the whole
read, as Linux's fq_codel does with a GSO packet. Time is passed in (seconds, monotonic).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from qgate.dataplane.offload import VnetHeader, flow_key, ipv4_header_checksum

FLOWS: Final = 1024
"""Hash buckets (RFC 8290 section 5.1 and Linux fq_codel default)."""
QUANTUM: Final = 1514
"""Bytes of credit a flow gets per round (RFC 8290 section 4.1: one MTU-sized frame)."""
TARGET: Final = 0.005
"""Seconds of acceptable standing queue delay (RFC 8289 section 4.4)."""
INTERVAL: Final = 0.100
"""Seconds a queue may stay above TARGET before CoDel drops (RFC 8289 section 4.3)."""
LIMIT_BYTES: Final = 8 * 1024 * 1024
"""Bytes held at most; above it the fattest flow loses reads from its head (RFC 8290 4.1.1)."""
LIMIT_ITEMS: Final = 10240
"""Reads held at most (Linux fq_codel's default ``limit``), so small packets cannot pile up."""
DROP_BATCH: Final = 64
"""Reads dropped at most per overflow, half the fattest flow's backlog at most (as Linux does):
one scan for the fattest flow per batch, not per read."""

ECN_MASK: Final = 0x03
ECN_NOT_ECT: Final = 0x00
ECN_CE: Final = 0x03

Item = tuple[VnetHeader, bytes]
"""One TUN read: its virtio-net header and the (super-)packet."""


@dataclass
class FqStats:
    """Counters: reads dropped by CoDel or the byte limit, and reads ECN-marked instead of dropped."""

    drops_codel: int = 0
    drops_overlimit: int = 0
    ecn_marks: int = 0


@dataclass(slots=True)
class _Flow:
    """One bucket: its FIFO of ``(enqueue time, item)``, DRR credit and CoDel state."""

    queue: deque[tuple[float, Item]] = field(default_factory=deque)
    backlog: int = 0
    deficit: int = 0
    active: bool = False
    first_above: float = 0.0
    dropping: bool = False
    drop_next: float = 0.0
    count: int = 0
    last_count: int = 0


def flow_hash(packet: bytes) -> int:
    """Bucket of an IPv4/IPv6 packet: protocol and addresses, plus the ports of TCP and UDP.

    Ports count only where they are (:func:`~qgate.dataplane.offload.flow_key`): not for other
    protocols (an ICMP echo's checksum would scatter one ping over many buckets) nor for IPv4
    fragments past the first, as Linux does. Anything unparseable goes to bucket 0.
    """
    version = packet[0] >> 4 if len(packet) >= 20 else 0
    if version == 4:
        proto, addresses = packet[9:10], packet[12:20]
    elif version == 6 and len(packet) >= 40:
        proto, addresses = packet[6:7], packet[8:40]
    else:
        return 0
    return hash(proto + (flow_key(packet) or addresses)) % FLOWS


def mark_ce(packet: bytes) -> bytes | None:
    """Return ``packet`` with ECN set to CE (RFC 3168 section 5), or None if it is not ECN-capable."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and 20 <= (packet[0] & 0x0F) * 4 <= len(packet):
        if packet[1] & ECN_MASK == ECN_NOT_ECT:
            return None
        out = bytearray(packet)
        out[1] |= ECN_CE
        ipv4_header_checksum(out, (out[0] & 0x0F) * 4)
        return bytes(out)
    if version == 6 and len(packet) >= 40:
        if (packet[1] >> 4) & ECN_MASK == ECN_NOT_ECT:
            return None
        out = bytearray(packet)
        out[1] |= ECN_CE << 4
        return bytes(out)
    return None


class FairQueue:
    """FQ-CoDel over TUN reads: ``enqueue`` as they are read, ``dequeue`` up to a byte budget.

    Args:
        target: CoDel target delay, seconds.
        interval: CoDel interval, seconds.
        limit_bytes: bytes held at most.
        ecn: mark ECN-capable packets CE instead of dropping them (RFC 8290 section 5.1.4).
    """

    def __init__(
        self,
        *,
        target: float = TARGET,
        interval: float = INTERVAL,
        limit_bytes: int = LIMIT_BYTES,
        ecn: bool = True,
    ) -> None:
        self.target, self.interval, self.limit_bytes, self.ecn = target, interval, limit_bytes, ecn
        self.stats = FqStats()
        self.backlog = 0
        self.items = 0
        self.max_packet = QUANTUM
        self._flows: dict[int, _Flow] = {}
        self._new: deque[_Flow] = deque()
        self._old: deque[_Flow] = deque()

    def __len__(self) -> int:
        return self.items

    def enqueue(self, item: Item, now: float) -> None:
        """Queue one TUN read (timestamped ``now``); over the byte limit, drop from the fattest flow."""
        packet = item[1]
        flow = self._flows.get(bucket := flow_hash(packet))
        if flow is None:
            flow = self._flows[bucket] = _Flow()
        flow.queue.append((now, item))
        flow.backlog += len(packet)
        self.backlog += len(packet)
        self.items += 1
        self.max_packet = max(self.max_packet, len(packet))
        if not flow.active:
            flow.active = True
            flow.deficit = QUANTUM
            self._new.append(flow)
        while self.backlog > self.limit_bytes or self.items > LIMIT_ITEMS:
            self._drop_from_fattest()

    def _drop_from_fattest(self) -> None:
        """Drop up to ``DROP_BATCH`` reads, and up to half its bytes, from the head of the fattest flow."""
        fattest = max(self._flows.values(), key=lambda f: f.backlog)
        goal = fattest.backlog // 2
        for _ in range(DROP_BATCH):
            if self._pop(fattest) is None:
                break
            self.stats.drops_overlimit += 1
            if fattest.backlog <= goal:
                break

    def dequeue(self, budget: int, now: float) -> list[Item]:
        """Return queued reads in service order until ``budget`` bytes are out or the queue is empty.

        At least one read is returned when any is queued (a budget smaller than a packet still
        makes progress).
        """
        out: list[Item] = []
        while budget > 0 or not out:
            item = self._dequeue_one(now)
            if item is None:
                break
            out.append(item)
            budget -= len(item[1])
        return out

    def _dequeue_one(self, now: float) -> Item | None:
        while True:
            lists = self._new if self._new else self._old
            if not lists:
                return None
            flow = lists[0]
            if flow.deficit <= 0:
                flow.deficit += QUANTUM
                lists.popleft()
                self._old.append(flow)
                continue
            item = self._codel_dequeue(flow, now)
            if item is None:
                lists.popleft()
                if lists is self._new and self._old:
                    self._old.append(flow)  # RFC 8290 4.2: one pass through the old list against starvation
                else:
                    flow.active = False
                continue
            flow.deficit -= len(item[1])
            return item

    def _pop(self, flow: _Flow) -> tuple[float, Item] | None:
        if not flow.queue:
            return None
        entry = flow.queue.popleft()
        size = len(entry[1][1])
        flow.backlog -= size
        self.backlog -= size
        self.items -= 1
        return entry

    def _codel_dequeue(self, flow: _Flow, now: float) -> Item | None:
        """RFC 8289 section 5 dequeue (as Linux ``codel_dequeue``): drop or mark at the head."""
        entry = self._pop(flow)
        if entry is None:
            flow.first_above = 0.0
            flow.dropping = False
            return None
        ok_to_drop = self._ok_to_drop(flow, entry[0], now)
        if flow.dropping:
            if not ok_to_drop:
                flow.dropping = False
            while flow.dropping and now >= flow.drop_next:
                flow.count += 1
                marked = self._mark_or_drop(entry)
                if marked is not None:
                    entry = marked
                    flow.drop_next = self._control_law(flow.drop_next, flow.count)
                    break
                following = self._pop(flow)
                if following is None:
                    flow.first_above = 0.0
                    flow.dropping = False
                    return None
                entry = following
                if self._ok_to_drop(flow, entry[0], now):
                    flow.drop_next = self._control_law(flow.drop_next, flow.count)
                else:
                    flow.dropping = False
        elif ok_to_drop:
            marked = self._mark_or_drop(entry)
            following = marked if marked is not None else self._pop(flow)
            if marked is None and following is not None:
                self._ok_to_drop(flow, following[0], now)  # updates first_above for the new head
            flow.dropping = True
            delta = flow.count - flow.last_count
            flow.count = delta if delta > 1 and now - flow.drop_next < 16 * self.interval else 1
            flow.drop_next = self._control_law(now, flow.count)
            flow.last_count = flow.count
            if following is None:
                flow.first_above = 0.0
                return None
            entry = following
        return entry[1]

    def _ok_to_drop(self, flow: _Flow, enqueued: float, now: float) -> bool:
        if now - enqueued < self.target or flow.backlog <= self.max_packet:
            flow.first_above = 0.0
            return False
        if flow.first_above == 0.0:
            flow.first_above = now + self.interval
            return False
        return now >= flow.first_above

    def _mark_or_drop(self, entry: tuple[float, Item]) -> tuple[float, Item] | None:
        """CE-mark an ECN-capable read and return it, or count a drop and return None."""
        if self.ecn:
            marked = mark_ce(entry[1][1])
            if marked is not None:
                self.stats.ecn_marks += 1
                return entry[0], (entry[1][0], marked)
        self.stats.drops_codel += 1
        return None

    def _control_law(self, t: float, count: int) -> float:
        return t + self.interval / math.sqrt(count)
