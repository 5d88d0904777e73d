"""Batched UDP I/O: UDP GSO (``UDP_SEGMENT``) sends and UDP GRO receives, with a plain fallback.

UDP GSO (Linux 4.18+, ``udp(7)``): one ``sendmsg`` carrying a ``UDP_SEGMENT`` control message
(level ``SOL_UDP``, a ``u16`` segment size) sends a buffer that the kernel cuts into datagrams of
that size; only the last may be shorter; at most 64 segments (``UDP_MAX_SEGMENTS``) and one IP
datagram's worth (64 KB) per call. UDP GRO (Linux 5.0+): with the socket option ``UDP_GRO`` set,
one ``recvmsg`` may return several datagrams of one flow glued together, the segment size in a
``UDP_GRO`` control message (an ``int``). The datagrams on the wire are the same either way, so a
peer without GSO/GRO interoperates. When the kernel refuses (``ENOPROTOOPT``, ``EINVAL``, ``EIO``
on a device without checksum offload) the helper falls back to ``sendto``/``recvfrom`` for good
and logs it once.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Sequence
from typing import Final

log = logging.getLogger(__name__)

SOL_UDP: Final = 17
"""Socket option level of UDP (= IPPROTO_UDP)."""
UDP_SEGMENT: Final = 103
"""Socket option / cmsg type: GSO segment size (``linux/udp.h``)."""
UDP_GRO: Final = 104
"""Socket option / cmsg type: receive coalesced datagrams (``linux/udp.h``)."""
UDP_MAX_SEGMENTS: Final = 64
"""Segments per GSO send accepted by the kernel."""
GSO_MAX_PAYLOAD: Final = 65507
"""Bytes of UDP payload per GSO send: 65535 - 20 (IPv4 header) - 8 (UDP header)."""
RECV_BUFFER: Final = 65535
"""Bytes asked for per ``recvmsg``: the largest GRO aggregate (or datagram)."""
IP_MTU_DISCOVER: Final = 10
"""Socket option (``linux/in.h``): path-MTU discovery mode of an IPv4 socket."""
IPV6_MTU_DISCOVER: Final = 23
"""Socket option (``linux/in6.h``): path-MTU discovery mode of an IPv6 socket."""
PMTUDISC_DO: Final = 2
"""``IP_PMTUDISC_DO`` / ``IPV6_PMTUDISC_DO``: always set DF; a datagram over the path MTU fails
with EMSGSIZE instead of leaving as IP fragments."""
_REFUSED: Final = frozenset({errno.ENOPROTOOPT, errno.EIO, errno.EOPNOTSUPP})
"""errno values meaning "this kernel/device cannot do UDP GSO": fall back for good."""
EINVAL_LIMIT: Final = 8
"""Consecutive EINVAL answers (also given for a segment larger than the path MTU) before GSO is off."""
_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
_INT: Final = struct.Struct("=i")
"""A C int in host order: the IP_TOS / IPV6_TCLASS ancillary value."""
_U16: Final = struct.Struct("=H")
_I32: Final = struct.Struct("=i")

Address = tuple[str, int] | tuple[str, int, int, int]


def group_equal_runs(
    datagrams: Sequence[bytes], max_segments: int = UDP_MAX_SEGMENTS, max_bytes: int = GSO_MAX_PAYLOAD
) -> list[tuple[int, int]]:
    """Cut ``datagrams`` into GSO groups: runs of equal size, the last of a run may be shorter.

    Args:
        datagrams: payloads in send order.
        max_segments: datagrams per group.
        max_bytes: total payload bytes per group.

    Returns:
        ``[(start, stop), ...]`` index ranges covering ``datagrams`` in order.
    """
    groups: list[tuple[int, int]] = []
    start, n = 0, len(datagrams)
    while start < n:
        size = len(datagrams[start])
        stop, total = start + 1, size
        while stop < n and stop - start < max_segments and size > 0:
            nxt = len(datagrams[stop])
            if nxt > size or total + nxt > max_bytes:
                break
            total += nxt
            stop += 1
            if nxt < size:
                break
        groups.append((start, stop))
        start = stop
    return groups


class UdpBatchIO:
    """GSO/GRO batching over one non-blocking UDP socket (the caller keeps owning the socket).

    Attributes:
        sock: the socket.
        gso: whether sends still use ``UDP_SEGMENT`` (turns False after the kernel refused).
        gro: whether ``UDP_GRO`` is enabled on the socket.
    """

    def __init__(self, sock: socket.socket, *, gso: bool = True, gro: bool = True) -> None:
        self.sock = sock
        self.gso = gso
        self.gro = False
        self._einval = 0
        self._too_big_logged = False
        never_fragment(sock)
        if gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError as exc:
                log.info("UDP GRO not available (%s); receiving one datagram per call", exc.strerror)

    def send_batch(self, datagrams: Sequence[bytes], address: Address, tos: int = 0) -> int:
        """Send ``datagrams`` to ``address`` in order, as few ``sendmsg`` calls as GSO allows.

        Args:
            datagrams: UDP payloads (each at most the path MTU minus headers, bytes).
            address: destination ``(host, port)`` (or the IPv6 4-tuple).
            tos: outer IPv4 TOS / IPv6 traffic class byte (DSCP << 2) for all of them; 0 = default.

        Returns:
            How many datagrams were not sent (EAGAIN on a full buffer, unreachable, ...);
            the caller counts them as drops. Never raises for send errors.
        """
        failed = 0
        sock = self.sock
        marks = self._tos_cmsg(tos)
        for start, stop in group_equal_runs(datagrams):
            if stop - start == 1 or not self.gso:
                failed += self._send_plain(datagrams[start:stop], address, marks)
                continue
            cmsg = [(SOL_UDP, UDP_SEGMENT, _U16.pack(len(datagrams[start]))), *marks]
            try:
                sock.sendmsg([b"".join(datagrams[start:stop])], cmsg, 0, address)
                self._einval = 0
            except OSError as exc:
                if exc.errno in _REFUSED or exc.errno == errno.EINVAL:
                    self._refused(exc)
                    failed += self._send_plain(datagrams[start:stop], address, marks)
                else:
                    self._failed(exc, len(datagrams[start]), address)
                    failed += stop - start
        return failed

    def _refused(self, exc: OSError) -> None:
        if exc.errno == errno.EINVAL:
            self._einval += 1
            if self._einval < EINVAL_LIMIT:
                return
        self.gso = False
        log.warning("UDP GSO refused by the kernel (%s); sending one datagram per call", exc.strerror)

    def _tos_cmsg(self, tos: int) -> list[tuple[int, int, bytes]]:
        """The ancillary data that sets the outer DSCP (RFC 2474) of one sendmsg, or none."""
        if not tos:
            return []
        if self.sock.family == socket.AF_INET6:
            return [(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _INT.pack(tos))]
        return [(socket.IPPROTO_IP, socket.IP_TOS, _INT.pack(tos))]

    def _send_plain(
        self, datagrams: Sequence[bytes], address: Address, marks: list[tuple[int, int, bytes]]
    ) -> int:
        failed = 0
        for datagram in datagrams:
            try:
                if marks:
                    self.sock.sendmsg([datagram], marks, 0, address)
                else:
                    self.sock.sendto(datagram, address)
            except OSError as exc:
                self._failed(exc, len(datagram), address)
                failed += 1
        return failed

    def _failed(self, exc: OSError, size: int, address: Address) -> None:
        """Log a failed send: at debug, except the first datagram too big for the path (warning)."""
        if exc.errno == errno.EMSGSIZE and not self._too_big_logged:
            self._too_big_logged = True
            log.warning(
                "a %d-byte record does not fit the path MTU towards %s and is dropped, never fragmented: "
                "lower tun.mtu (the WAN must carry tun.mtu + 60 bytes over IPv4, + 80 over IPv6)",
                size,
                address[0],
            )
            return
        log.debug("UDP send failed: %s", exc)

    def recv_batch(self, max_calls: int = 64, max_datagrams: int = 1 << 30) -> list[tuple[bytes, Address]]:
        """Receive what is waiting (up to ``max_calls`` ``recvmsg`` calls), GRO aggregates split.

        Args:
            max_calls: receive calls before returning.
            max_datagrams: stop calling once this many datagrams are in hand (one GRO aggregate
                may overshoot it by up to 63).

        Returns:
            ``[(datagram, source address), ...]`` in arrival order; empty when nothing waits.
            Receive errors other than EAGAIN (e.g. ICMP port unreachable) are logged at debug
            and skipped.
        """
        out: list[tuple[bytes, Address]] = []
        sock = self.sock
        for _ in range(max_calls):
            if len(out) >= max_datagrams:
                break
            try:
                data, ancdata, _flags, address = sock.recvmsg(RECV_BUFFER, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("UDP receive error: %s", exc)
                continue
            size = _gro_size(ancdata)
            if size and len(data) > size:
                view = memoryview(data)
                out.extend((bytes(view[i : i + size]), address) for i in range(0, len(data), size))
            else:
                out.append((data, address))
        return out


def never_fragment(sock: socket.socket) -> None:
    """Set DF on every datagram of ``sock`` (``IP_PMTUDISC_DO``): records are never IP-fragmented.

    A record larger than the path MTU then fails with EMSGSIZE (counted as a send error) instead
    of crossing the WAN in fragments (issue 5; docs/protocol.md section 2.1). Not available: logged.
    """
    v6 = sock.family == socket.AF_INET6
    level, option = (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER) if v6 else (socket.IPPROTO_IP, IP_MTU_DISCOVER)
    try:
        sock.setsockopt(level, option, PMTUDISC_DO)
    except OSError as exc:
        log.warning("cannot forbid IP fragmentation on the UDP socket (%s)", exc.strerror)


def _gro_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int(_I32.unpack_from(value)[0])
    return 0
