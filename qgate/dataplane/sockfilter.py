"""Sort the gateway's UDP datagrams in the kernel: a data socket, a control socket, classic BPF.

Two UDP sockets share the listen address (``SO_REUSEPORT``, ``socket(7)``): the **data** socket
(bound first, so index 0 of the reuseport group; GRO/GSO, 4 MiB buffers, DF) and the **control**
socket (index 1; no GRO, a small receive buffer). A flood of spoofed datagrams then fills only the
control socket's small queue, where the kernel drops it, while records from a live epoch keep their
own queue (issue 10). Two classic BPF programs (``filter(2)`` opcodes, assembled here) do the sorting:

* the **steering** program, attached to the group with ``SO_ATTACH_REUSEPORT_CBPF``, runs once per
  received skb with the data pulled past the UDP header (``net/core/sock_reuseport.c``,
  ``reuseport_select_sock``: "BPF filter expects skb data pointer at payload data"; UDP passes
  ``hdr_len = sizeof(struct udphdr)``), so offset 0 is the first payload byte; its return value is
  the socket's index in the group. It returns 0 for a datagram of at least 32 bytes whose bytes 4..7
  name a live index: a data record (first word ``04 00 00 00``, its ``receiver_index``), or a
  handshake fragment (0x01) or Retry (0x02), whose steering hint sits at the same offset
  (docs/protocol.md 2.2): the index of a live epoch, or of the exchange the receiver has pending
  (``Peer.live_indexes``). So every message of an established session, the QKD ratchet and the
  periodic ML-KEM handshake alike, keeps its own queue under a flood. It returns 1 for everything
  else: junk, and the handshakes of a peer with no session yet.
* the **control filter**, attached to the control socket with ``SO_ATTACH_FILTER``, runs with the
  data at the UDP header (``udp_queue_rcv_one_skb`` -> ``sk_filter_trim_cap``), so the payload
  starts at offset 8. It keeps handshake fragments (0x01) and Retries (0x02), keeps data records of
  a live epoch and drops every other datagram before it is queued (counted in the socket's
  ``sk_drops``, read with ``SO_MEMINFO``).

Why the index check is in the steering program and not in a filter on the data socket: on a socket
with ``UDP_GRO`` the kernel queues a GRO or GSO super-packet whole, and a socket filter sees it once,
judged by its first datagram; a spoofed record of the right size at the head of a GRO train would
take the real records behind it down with it. The control socket has no GRO, so the kernel cuts
such a train into datagrams before its filter (``udp_queue_rcv_skb``: ``udp_unexpected_gso`` ->
``udp_rcv_segment``) and the filter judges each one: a real record that rode behind a spoofed head
is kept (on the control socket); a spoofed record behind a real head reaches the data socket and is
dropped in user space (an index lookup). NAPI GRO picks the socket whose GRO setting it follows by
hash, without the BPF program (``udp4_gro_lookup_skb`` passes no skb), so it aggregates a flow only
when the hash picks the data socket; GSO trains from the peer (one ``sendmsg``) arrive whole either way.

The programs hold the live indexes as constants: :meth:`UdpSockets.set_live` re-attaches both
(each ``setsockopt`` replaces its program atomically) whenever the set changes; the gateway calls it
before it sends anything the peer could answer on a new epoch. With no live index, no data record
reaches user space (there is no key to open one with). If the kernel refuses any of it (old kernel,
``EPERM``), one warning, and the gateway runs on one socket as before (status ``udp_sockets``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from qgate.constants import (
    AEAD_TAG_SIZE,
    DATA_HEADER_SIZE,
    MSG_DATA,
    MSG_HANDSHAKE_FRAGMENT,
    MSG_RETRY,
)
from qgate.errors import DataPlaneError

log = logging.getLogger(__name__)

SO_ATTACH_FILTER: Final = 26
"""Socket option (``asm-generic/socket.h``): attach a classic BPF socket filter (replaces the old one)."""
SO_ATTACH_REUSEPORT_CBPF: Final = 51
"""Socket option: attach a classic BPF program choosing the socket of a reuseport group (Linux 4.5+)."""
SO_MEMINFO: Final = 55
"""Socket option: ``u32[SK_MEMINFO_VARS]`` of the socket's memory counters (Linux 4.6+)."""
SK_MEMINFO_DROPS: Final = 8
"""Index of ``sk_drops`` in ``SO_MEMINFO``: datagrams dropped by the filter or a full receive buffer."""
UDP_HEADER_SIZE: Final = 8
"""Bytes: where a UDP socket filter finds the payload (its data starts at the UDP header)."""
DATA_SOCKET: Final = 0
"""Reuseport group index of the data socket (bound first)."""
CONTROL_SOCKET: Final = 1
"""Reuseport group index of the control socket (bound second)."""
CONTROL_BUFFER: Final = 256 << 10
"""Bytes of receive buffer asked for the control socket: a flood there is dropped by the kernel early."""
BPF_MAXINSNS: Final = 4096
"""Instructions per classic BPF program at most (``linux/bpf_common.h``)."""
MAX_LIVE_INDEXES: Final = (BPF_MAXINSNS - 64) // 2
"""Live receiver indexes one program can hold (two instructions each); above it, steering by type only."""
KEEP_ALL: Final = 0xFFFFFFFF
"""Socket-filter verdict: keep the whole datagram (the filter returns the bytes to keep)."""
DROP: Final = 0
"""Socket-filter verdict: drop."""
DATA_WORD0: Final = MSG_DATA << 24
"""First 32-bit word (big-endian) of a data record: type 0x04, three zero reserved bytes."""
DATA_RECORD_MIN: Final = DATA_HEADER_SIZE + AEAD_TAG_SIZE
"""Bytes: the shortest data record (an empty keepalive)."""
STEERING_INDEX_OFFSET: Final = 4
"""Byte where every qgate datagram's receiver_index (data) or steering hint (fragment, Retry) starts."""

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h): class | size | mode.
LD_W_ABS: Final = 0x20
"""``ld [k]``: A = the big-endian 32-bit word at offset k (out of range: the program returns 0)."""
LD_H_ABS: Final = 0x28
"""``ldh [k]``: A = the big-endian 16-bit half-word at offset k."""
LD_B_ABS: Final = 0x30
"""``ldb [k]``: A = the byte at offset k."""
LD_W_LEN: Final = 0x80
"""``ld len``: A = the skb's length in bytes (from where the program's offset 0 is)."""
JEQ_K: Final = 0x15
"""``jeq #k, jt, jf``: skip jt instructions if A == k, else jf."""
JGE_K: Final = 0x35
"""``jge #k, jt, jf``: skip jt instructions if A >= k, else jf."""
JA: Final = 0x05
"""``ja k``: skip k instructions (32-bit offset)."""
RET_K: Final = 0x06
"""``ret #k``: return k."""

Insn = tuple[int, int, int, int]
"""One classic BPF instruction: ``(code, jt, jf, k)`` (``struct sock_filter``)."""
_INSN: Final = struct.Struct("=HBBI")
_MEMINFO: Final = struct.Struct("=9I")


def _live_data(base: int, indexes: Iterable[int], yes: int, no: int) -> list[Insn]:
    """Build the tail that returns ``yes`` for a live data record at offset ``base``, else ``no``.

    Live: length >= 32, first word ``04 00 00 00``, receiver_index (bytes 4..7) in ``indexes``.
    """
    program: list[Insn] = [
        (LD_W_LEN, 0, 0, 0),
        (JGE_K, 1, 0, base + DATA_RECORD_MIN),
        (RET_K, 0, 0, no),
        (LD_W_ABS, 0, 0, base),
        (JEQ_K, 1, 0, DATA_WORD0),
        (RET_K, 0, 0, no),
        (LD_W_ABS, 0, 0, base + 4),
    ]
    return program + _index_list(indexes, yes, no)


def steering_program(indexes: Iterable[int]) -> list[Insn]:
    """Build the reuseport program: data socket (0) for datagrams naming a live index, else control (1).

    Args:
        indexes: live receiver indexes (u32), at most :data:`MAX_LIVE_INDEXES`.

    Returns:
        The program; it sees the UDP payload at offset 0 (``reuseport_select_sock``). Every load
        comes after the length check, so no datagram reaches the data socket by a failed load
        (which makes a classic BPF program return 0).
    """
    head: list[Insn] = [
        (LD_W_LEN, 0, 0, 0),
        (JGE_K, 1, 0, DATA_RECORD_MIN),  # 32: covers every load below
        (RET_K, 0, 0, CONTROL_SOCKET),
        (LD_B_ABS, 0, 0, 0),
        (JEQ_K, 4, 0, MSG_HANDSHAKE_FRAGMENT),  # to the index load
        (JEQ_K, 3, 0, MSG_RETRY),
        (LD_W_ABS, 0, 0, 0),
        (JEQ_K, 1, 0, DATA_WORD0),
        (RET_K, 0, 0, CONTROL_SOCKET),
        (LD_W_ABS, 0, 0, STEERING_INDEX_OFFSET),  # receiver_index, or a fragment's steering hint
    ]
    return head + _index_list(indexes, DATA_SOCKET, CONTROL_SOCKET)


def _index_list(indexes: Iterable[int], yes: int, no: int) -> list[Insn]:
    """Return ``yes`` if A is in ``indexes``, else ``no`` (a ``jeq``/``ret`` pair per index: short jumps)."""
    program: list[Insn] = []
    for index in sorted(indexes):
        program += [(JEQ_K, 0, 1, index), (RET_K, 0, 0, yes)]
    program.append((RET_K, 0, 0, no))
    return program


def type_steering_program() -> list[Insn]:
    """Build the reuseport program that steers by the first payload byte only (0x04 -> data socket)."""
    return [
        (LD_W_LEN, 0, 0, 0),
        (JGE_K, 1, 0, 1),
        (RET_K, 0, 0, CONTROL_SOCKET),
        (LD_B_ABS, 0, 0, 0),
        (JEQ_K, 0, 1, MSG_DATA),
        (RET_K, 0, 0, DATA_SOCKET),
        (RET_K, 0, 0, CONTROL_SOCKET),
    ]


def control_filter(indexes: Iterable[int]) -> list[Insn]:
    """Build the control socket's filter: keep 0x01 and 0x02 datagrams and live data records, drop the rest.

    Args:
        indexes: live receiver indexes (u32), at most :data:`MAX_LIVE_INDEXES`.

    Returns:
        The program; it sees the UDP header at offset 0, the payload at :data:`UDP_HEADER_SIZE`.
    """
    head: list[Insn] = [
        (LD_B_ABS, 0, 0, UDP_HEADER_SIZE),
        (JEQ_K, 0, 1, MSG_HANDSHAKE_FRAGMENT),
        (RET_K, 0, 0, KEEP_ALL),
        (JEQ_K, 0, 1, MSG_RETRY),
        (RET_K, 0, 0, KEEP_ALL),
        (JEQ_K, 1, 0, MSG_DATA),
        (RET_K, 0, 0, DROP),
    ]
    return head + _live_data(UDP_HEADER_SIZE, indexes, KEEP_ALL, DROP)


def assemble(program: list[Insn]) -> bytes:
    """Encode ``program`` as ``struct sock_filter[]`` (8 bytes per instruction, host byte order)."""
    return b"".join(_INSN.pack(*insn) for insn in program)


def attach(sock: socket.socket, option: int, program: list[Insn]) -> None:
    """Attach ``program`` with ``setsockopt(SOL_SOCKET, option, struct sock_fprog)``.

    Args:
        sock: the socket.
        option: :data:`SO_ATTACH_FILTER` or :data:`SO_ATTACH_REUSEPORT_CBPF`.
        program: 1 to :data:`BPF_MAXINSNS` instructions.

    Raises:
        OSError: the kernel refused it (EINVAL: a bad program; ENOMEM: over ``optmem_max``; ...).
    """
    code = assemble(program)
    buffer = ctypes.create_string_buffer(code, len(code))  # alive until setsockopt returns
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, option, fprog)


def kernel_drops(sock: socket.socket) -> int | None:
    """Return the socket's ``sk_drops`` (filter drops and receive-buffer overflows), None if unknown."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return None
    if len(raw) < _MEMINFO.size:
        return None
    return int(_MEMINFO.unpack(raw)[SK_MEMINFO_DROPS])


@dataclass
class UdpSockets:
    """The gateway's UDP sockets: data and control (split), or one socket (fallback).

    Attributes:
        data: the data socket (GRO, large buffers); the only one when ``control`` is None. Sends go here.
        control: the control socket, or None when running on one socket.
        why_single: why there is one socket ("" when split).
        live: the receiver indexes the programs hold.
        indexed: whether the programs check indexes (False after the kernel refused a re-attach).
        updates: programs re-attached for a changed index set.
        update_failures: re-attaches the kernel refused.
    """

    data: socket.socket
    control: socket.socket | None = None
    why_single: str = ""
    live: frozenset[int] = field(default_factory=frozenset)
    indexed: bool = True
    updates: int = 0
    update_failures: int = 0

    def sockets(self) -> list[socket.socket]:
        """Return the open sockets, data first."""
        return [self.data] if self.control is None else [self.data, self.control]

    def set_live(self, indexes: frozenset[int]) -> None:
        """Let exactly ``indexes`` through as data records (re-attach both programs if the set changed).

        A refused re-attach (or more than :data:`MAX_LIVE_INDEXES`) leaves the sockets steering by
        the type byte only, with no index check (warned once): nothing real is dropped, junk data
        records reach user space again.
        """
        if self.control is None or indexes == self.live:
            return
        self.live = indexes
        self.updates += 1
        try:
            if len(indexes) > MAX_LIVE_INDEXES:
                raise OSError(errno.E2BIG, f"{len(indexes)} live indexes, at most {MAX_LIVE_INDEXES}")
            attach(self.control, SO_ATTACH_FILTER, control_filter(indexes))
            attach(self.data, SO_ATTACH_REUSEPORT_CBPF, steering_program(indexes))
            self.indexed = True
        except OSError as exc:
            self._index_refused(exc)

    def _index_refused(self, exc: OSError) -> None:
        self.update_failures += 1
        if self.indexed:
            log.warning("kernel refused the live-index filter (%s): steering by type byte only", exc.strerror)
        self.indexed = False
        assert self.control is not None
        try:
            attach(self.control, SO_ATTACH_FILTER, [(RET_K, 0, 0, KEEP_ALL)])
            attach(self.data, SO_ATTACH_REUSEPORT_CBPF, type_steering_program())
        except OSError as again:
            log.error("cannot relax the UDP socket filters (%s): data records may be dropped", again.strerror)

    def status(self) -> dict[str, object]:
        """Return the status fields of the UDP sockets (``udp_sockets`` in the gateway's status).

        ``sockets`` (2 split, 1 fallback), ``kernel_filter`` (``index``: steering and filter check
        live indexes; ``type``: steering by type byte only; ``off``: one socket), ``live_indexes``,
        ``filter_updates``, ``filter_failures``, ``kernel_drops_data`` and ``kernel_drops_control``
        (``sk_drops`` now: filter drops and full-buffer drops; None if unknown), ``single_reason``.
        """
        out: dict[str, object] = {
            "sockets": len(self.sockets()),
            "kernel_filter": "off" if self.control is None else "index" if self.indexed else "type",
            "live_indexes": len(self.live),
            "filter_updates": self.updates,
            "filter_failures": self.update_failures,
            "kernel_drops_data": kernel_drops(self.data),
        }
        if self.control is None:
            out["single_reason"] = self.why_single
        else:
            out["kernel_drops_control"] = kernel_drops(self.control)
        return out

    def close(self) -> None:
        """Close every socket."""
        for sock in self.sockets():
            sock.close()


def open_udp_sockets(
    host: str, port: int, *, buffer: int, control_buffer: int = CONTROL_BUFFER, split: bool = True
) -> UdpSockets:
    """Bind the gateway's UDP sockets on ``host:port``: data + control, or one socket if the kernel says no.

    Args:
        host: listen address (IPv4 or IPv6 literal).
        port: UDP port (0: any).
        buffer: bytes of send and receive buffer of the data socket.
        control_buffer: bytes of receive buffer of the control socket.
        split: False: one socket, as before issue 10.

    Returns:
        The sockets, non-blocking, programs attached (no live index yet).

    Raises:
        DataPlaneError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not split:
        return UdpSockets(_bound(family, (host, port), buffer), why_single="split off")
    _check_free(family, (host, port))
    try:
        data = _bound(family, (host, port), buffer, reuseport=True)
    except OSError as exc:  # SO_REUSEPORT itself refused
        return _single(family, (host, port), buffer, exc)
    try:
        control = _control_socket(family, data, control_buffer)
    except OSError as exc:
        data.close()
        return _single(family, (host, port), buffer, exc)
    log.info("UDP %s:%d: data and control sockets, steered in the kernel (classic BPF)", host, port)
    return UdpSockets(data, control)


def _single(family: int, address: tuple[str, int], buffer: int, exc: OSError) -> UdpSockets:
    why = f"{exc.strerror or exc}"
    log.warning(
        "kernel cannot split UDP traffic into data and control sockets (%s): one socket, "
        "so a flood of spoofed datagrams shares the real records' queue",
        why,
    )
    return UdpSockets(_bound(family, address, buffer), why_single=why)


def _check_free(family: int, address: tuple[str, int]) -> None:
    """Refuse a port some socket holds already (with SO_REUSEPORT we would join its group silently)."""
    if address[1] == 0:
        return
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind(address)
    except OSError as exc:
        raise DataPlaneError(f"cannot bind UDP {address[0]}:{address[1]}: {exc.strerror or exc}") from exc
    finally:
        probe.close()


def _bound(family: int, address: tuple[str, int], buffer: int, *, reuseport: bool = False) -> socket.socket:
    """Return a non-blocking UDP socket bound to ``address`` with ``buffer`` bytes each way.

    Raises:
        OSError: ``SO_REUSEPORT`` refused (only with ``reuseport``).
        DataPlaneError: the bind failed.
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        sock.close()
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise DataPlaneError(f"cannot bind UDP {address[0]}:{address[1]}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _control_socket(family: int, data: socket.socket, buffer: int) -> socket.socket:
    """Bind the control socket beside ``data`` and attach both programs (no live index yet).

    Raises:
        OSError: the kernel refused an option, the bind or a program.
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        attach(sock, SO_ATTACH_FILTER, control_filter(()))  # before bind: nothing unfiltered is queued
        sock.bind(data.getsockname())
        attach(data, SO_ATTACH_REUSEPORT_CBPF, steering_program(()))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
