"""The forwarding engine: TUN <-> sealed records <-> UDP, in batches, with offloads where the kernel has them.

Outbound: drain the TUN's (possibly TSO) super-packets into the flow queue (``fq.FairQueue``,
FQ-CoDel), then take one budget of it, split each read into real MTU-sized IP packets
(``offload.split_tso``), seal each as its own record (so one lost WAN datagram costs one inner
packet), and send each peer's records with one UDP GSO ``sendmsg`` per run of equal sizes.
Inbound: receive a GRO batch, open and replay-check each record on its own, then coalesce in-order
TCP segments (and equal-sized UDP datagrams) of a flow and write them to the TUN as few
super-packets. TCP and UDP checksums are checked once, by the sender (computed in the split, taken
from the kernel's ``DATA_VALID``, or verified in user space; a bad one is dropped and counted
there), so the receiver merges packets without summing them again (protocol.md section 2.1).
Without offloads (old kernel, or ``tun.offload: false``) the same wire format goes through plain
reads, writes, ``sendto`` and ``recvfrom``, logged once at start.
With the kernel's steering (``sockfilter``), records of a live epoch come on the data socket and
everything else on the control socket, which the gateway reads at most
:data:`CONTROL_DATAGRAMS_PER_WAKE` at a time under a rate budget, so a flood of handshake-shaped
junk costs a bounded share of the CPU and never delays a record behind it (issue 10).
Per-packet failures are counted, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from qgate.constants import MSG_DATA, MSG_HANDSHAKE_FRAGMENT, MSG_RETRY
from qgate.dataplane.fq import FairQueue
from qgate.dataplane.offload import checksum_vouched, split_tso
from qgate.dataplane.routing import RouteTable
from qgate.dataplane.tunio import VnetTun
from qgate.dataplane.udpio import Address, UdpBatchIO
from qgate.errors import DataPlaneError
from qgate.protocol.peer import Peer

log = logging.getLogger(__name__)

TUN_READS_PER_WAKE: Final = 64
"""TUN reads per wake-up at most, into the flow queue (small packets come one per read; reading
is about ten times cheaper than sealing, so this keeps the kernel's FIFO ring nearly empty)."""
TUN_BYTES_PER_WAKE: Final = 64 * 1024
"""Bytes taken from the flow queue and sealed per wake-up (one 64 KB super-packet, about 0.3 ms
here): bounds how long the other direction, the timers and a newly arrived sparse flow wait."""
UDP_CALLS_PER_WAKE: Final = 64
"""recvmsg calls per wake-up at most (each up to 64 GRO'd datagrams, or one without GRO)."""
UDP_DATAGRAMS_PER_WAKE: Final = 64
"""Datagrams opened per wake-up (about one 64 KB batch, 0.3 ms here): the rest waits in the
socket while the TUN direction and the timers get their turn."""
CONTROL_DATAGRAMS_PER_WAKE: Final = 16
"""Datagrams read from the control socket per wake-up at most, after the data socket (the rest waits,
or is dropped by the kernel when the control socket's small buffer is full)."""


def dscp_of(packet: bytes) -> int:
    """Return the inner packet's DSCP as a TOS byte (ECN bits cleared; RFC 2474, RFC 3168), 0 if none."""
    if len(packet) < 2:
        return 0
    version = packet[0] >> 4
    if version == 4:
        return packet[1] & 0xFC
    if version == 6:
        return (((packet[0] & 0x0F) << 4) | (packet[1] >> 4)) & 0xFC
    return 0


class Link(Protocol):
    """What the forwarder needs of a peer: its engine, UDP address and a too-big counter."""

    engine: Peer
    address: tuple[str, int]
    too_big: int


@dataclass
class ForwarderStats:
    """Counters that belong to no single peer."""

    rx_not_qgate: int = 0
    rx_unknown_source: int = 0
    rx_unknown_index: int = 0
    drops_bad_inner_source: int = 0
    drops_no_route: int = 0
    drops_send_error: int = 0
    drops_bad_offload: int = 0
    drops_bad_checksum: int = 0
    drops_aqm: int = 0
    ecn_marks: int = 0
    tun_write_errors: int = 0


class Forwarder:
    """Moves packets for a set of peers; the gateway calls the two ``on_*_readable`` hooks.

    Args:
        tun: the TUN device (with or without a virtio-net header).
        udp: the batching wrapper of the gateway's UDP socket.
        routes: inner destination/source -> link.
        links: every peer link (to find a data record's peer by receiver index).
        mtu: the inner MTU in bytes; longer inner packets are counted as too big.
        on_handshake: takes a handshake fragment from a known peer address.
        after_peer: runs after a link's engine may have queued actions (the gateway flushes them).
        control: the control socket's wrapper (no GRO), or None when the gateway runs on one socket.
    """

    def __init__(
        self,
        tun: VnetTun,
        udp: UdpBatchIO,
        routes: RouteTable[Link],
        links: list[Link],
        mtu: int,
        by_address: dict[tuple[str, int], Link],
        on_handshake: Callable[[Link, bytes, float], None],
        after_peer: Callable[[Link, float], None],
        control: UdpBatchIO | None = None,
    ) -> None:
        self.tun, self.udp, self.routes, self.links, self.mtu = tun, udp, routes, links, mtu
        self.control = control
        self.by_address = by_address
        self.on_handshake, self.after_peer = on_handshake, after_peer
        self.stats = ForwarderStats()
        self.fq = FairQueue()
        log.info(
            "data path: TUN %s (offloads %#x), UDP GSO %s, GRO %s",
            "with virtio-net header" if tun.vnet else "plain",
            tun.offloads,
            "on" if udp.gso else "off",
            "on" if udp.gro else "off",
        )

    # ----- outbound ------------------------------------------------------------------
    def on_tun_readable(self, now: float) -> bool:
        """Drain the TUN into the flow queue, then split, seal and send one budget of it.

        Reads go through :class:`~qgate.dataplane.fq.FairQueue` (FQ-CoDel), so a sparse flow
        (a ping, a protection message) waits for at most one budget of a bulk flow's packets,
        not for the bulk flow's whole queue. Sealed packets are grouped per peer and outer DSCP
        in service order, each group sealed as one batch (``Peer.seal_batch``) and sent with as
        few GSO ``sendmsg`` calls as sizes allow.

        Returns:
            Whether reads are still queued: the caller runs this again soon even if the TUN is
            not readable.
        """
        fq = self.fq
        for _ in range(TUN_READS_PER_WAKE):
            got = self.tun.read()
            if got is None:
                break
            fq.enqueue(got, now)
        groups: dict[tuple[int, int], tuple[Link, int, list[bytes]]] = {}
        route = self.routes.for_destination
        mtu = self.mtu
        for vnet, data in fq.dequeue(TUN_BYTES_PER_WAKE, now):
            try:
                packets = split_tso(vnet, data)
            except DataPlaneError:
                self.stats.drops_bad_offload += 1
                continue
            if not checksum_vouched(vnet, data):  # the peer merges TCP/UDP packets unverified
                self.stats.drops_bad_checksum += 1
                continue
            link = route(packets[0])  # the segments of one super-packet share its addresses
            if link is None:
                self.stats.drops_no_route += len(packets)
                continue
            if len(packets[0]) > mtu:
                link.too_big += len(packets)
                continue
            tos = dscp_of(data)  # the inner packet's class goes to the outer header (grid priority traffic)
            key = (id(link), tos)
            group = groups.get(key)
            if group is None:
                groups[key] = (link, tos, packets)
            else:
                group[2].extend(packets)
        self.stats.drops_aqm = fq.stats.drops_codel + fq.stats.drops_overlimit
        self.stats.ecn_marks = fq.stats.ecn_marks
        idle: list[Link] = []
        for link, tos, packets in groups.values():
            datagrams = link.engine.seal_batch(packets, now)
            if datagrams:
                self.stats.drops_send_error += self.udp.send_batch(datagrams, link.address, tos)
            if len(datagrams) < len(packets) and link not in idle:
                idle.append(link)
        for link in idle:
            if not link.engine.established:
                link.engine.handle_timer(now)  # no session yet: start or hurry the handshake
            self.after_peer(link, now)
        return fq.backlog > 0

    # ----- inbound -------------------------------------------------------------------
    def on_udp_readable(self, now: float) -> None:
        """Receive a batch from the data socket, open each record, write the inner packets to the TUN."""
        self._receive(self.udp.recv_batch(UDP_CALLS_PER_WAKE, UDP_DATAGRAMS_PER_WAKE), now)

    def on_control_readable(self, now: float, limit: int = CONTROL_DATAGRAMS_PER_WAKE) -> int:
        """Receive at most ``limit`` datagrams from the control socket and handle them; return how many.

        The gateway calls it with a rate budget (``qgate.gateway``), so a flood there costs a bounded
        share of the CPU; a datagram of any kind is handled the same on either socket.
        """
        if self.control is None or limit <= 0:
            return 0
        batch = self.control.recv_batch(limit, limit)
        self._receive(batch, now)
        return len(batch)

    def _receive(self, batch: list[tuple[bytes, Address]], now: float) -> None:
        pending: list[bytes] = []
        touched: dict[int, Link] = {}
        for datagram, address in batch:
            link = self._dispatch(datagram, (address[0], address[1]), now, pending)
            if link is not None:
                touched[id(link)] = link
        if pending:  # the sender vouched for every TCP/UDP checksum (split_tso, checksum_vouched)
            self.stats.tun_write_errors += self.tun.write_packets(pending)
        for link in touched.values():
            self.after_peer(link, now)

    def _dispatch(
        self, datagram: bytes, address: tuple[str, int], now: float, pending: list[bytes]
    ) -> Link | None:
        kind = datagram[0] if datagram else -1
        if kind == MSG_DATA:
            link = self._link_for_index(datagram) or self.by_address.get(address)
            if link is None:
                self.stats.rx_unknown_index += 1
                return None
            plaintext = link.engine.open(datagram, now)
            if plaintext:  # an empty record is a keepalive
                if self.routes.for_source(plaintext) is link:
                    pending.append(plaintext)
                else:
                    self.stats.drops_bad_inner_source += 1
            return link
        if kind in (MSG_HANDSHAKE_FRAGMENT, MSG_RETRY):
            link = self.by_address.get(address)
            if link is None:
                self.stats.rx_unknown_source += 1
                return None
            self.on_handshake(link, datagram, now)
            return link
        self.stats.rx_not_qgate += 1
        return None

    def _link_for_index(self, datagram: bytes) -> Link | None:
        index = int.from_bytes(datagram[4:8], "big")
        for link in self.links:
            if index in link.engine.epochs.by_index:
                return link
        return None
