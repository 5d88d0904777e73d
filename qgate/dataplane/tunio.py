"""TUN device with virtio-net headers and offloads (TSO/USO super-packets in, GSO writes out).

Opened with ``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`` (optionally ``IFF_MULTI_QUEUE``), header size
``TUNSETVNETHDRSZ`` = 10 and ``TUNSETOFFLOAD`` = ``TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6``
(+ ``TUN_F_USO4 | TUN_F_USO6`` on Linux 6.2+), every read and write carries a 10-byte
``struct virtio_net_hdr`` before the IP packet (``Documentation/networking/tuntap.rst``,
``include/uapi/linux/if_tun.h``). The kernel may then hand over TCP super-packets of up to 64 KB
(split them with :func:`qgate.dataplane.offload.split_tso`) and accepts coalesced TCP (and, with
USO, UDP) super-packets on write (made by :func:`qgate.dataplane.coalesce.coalesce`). If the kernel
refuses the vnet header, the device falls back to a plain TUN (logged once): reads then return
a zero header and GSO writes are split in user space, so callers need no second code path.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Sequence
from typing import Final

from qgate.dataplane.coalesce import coalesce
from qgate.dataplane.offload import (
    GSO_UDP_L4,
    VNET_HDR_SIZE,
    ZERO_VNET,
    ZERO_VNET_BYTES,
    VnetHeader,
    parse_vnet_header,
    split_tso,
)
from qgate.dataplane.tun import (
    IFF_NO_PI,
    IFF_TUN,
    IFF_TUN_EXCL,
    IFNAMSIZ,
    SYS_CLASS_NET,
    TUN_CLONE_DEVICE,
    TUNSETIFF,
)
from qgate.errors import DataPlaneError

log = logging.getLogger(__name__)

IFF_MULTI_QUEUE: Final = 0x0100
"""Flag: one queue per open file descriptor (<linux/if_tun.h>)."""
IFF_VNET_HDR: Final = 0x4000
"""Flag: a ``struct virtio_net_hdr`` precedes every packet (<linux/if_tun.h>)."""
TUNSETOFFLOAD: Final = 0x400454D0
"""ioctl _IOW('T', 208, unsigned int): offloads the reader can take."""
TUNSETVNETHDRSZ: Final = 0x400454D8
"""ioctl _IOW('T', 216, int): size of the vnet header (10 or 12 bytes)."""
TUN_F_CSUM: Final = 0x01
"""Offload: the reader can take packets with a partial checksum."""
TUN_F_TSO4: Final = 0x02
"""Offload: TCP/IPv4 super-packets."""
TUN_F_TSO6: Final = 0x04
"""Offload: TCP/IPv6 super-packets."""
TUN_F_TSO_ECN: Final = 0x08
"""Offload: TSO with CWR set."""
TUN_F_USO4: Final = 0x20
"""Offload: UDP/IPv4 segmentation (Linux 6.2+)."""
TUN_F_USO6: Final = 0x40
"""Offload: UDP/IPv6 segmentation (Linux 6.2+)."""
OFFLOAD_CHOICES: Final = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    TUN_F_CSUM,
    0,
)
"""Offload sets tried in order; the first one the kernel accepts is kept."""
READ_SIZE: Final = VNET_HDR_SIZE + 65535
"""Bytes asked for per read: vnet header + the largest (super-)packet."""


def _exists_message(name: str) -> str:
    return f"a network device named {name} already exists; qgate will not attach to it (remove it first)"


class VnetTun:
    """An open TUN queue; closing every queue (or exiting) deletes the interface.

    Attributes:
        fd: the non-blocking file descriptor.
        name: the interface name the kernel used.
        vnet: whether packets carry a virtio-net header (False after the plain fallback).
        offloads: the ``TUN_F_*`` bits the kernel accepted (0 without vnet headers).
        multi_queue: whether the device was created with ``IFF_MULTI_QUEUE``.
    """

    def __init__(self, fd: int, name: str, *, vnet: bool, offloads: int, multi_queue: bool) -> None:
        self.fd = fd
        self.name = name
        self.vnet = vnet
        self.offloads = offloads
        self.multi_queue = multi_queue
        self._closed = False
        self._merge_udp = bool(offloads & (TUN_F_USO4 | TUN_F_USO6))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"<VnetTun {self.name} {state} vnet={self.vnet} offloads={self.offloads:#x}>"

    @classmethod
    def open(cls, name: str, *, offload: bool = True, multi_queue: bool = False) -> VnetTun:
        """Create the TUN interface ``name`` with vnet headers and offloads; never attach to an existing one.

        Args:
            name: interface name, 1-15 ASCII characters.
            offload: ask for vnet headers and TSO/USO; False opens a plain TUN.
            multi_queue: create with ``IFF_MULTI_QUEUE`` (more queues via :meth:`open_queue`).

        Returns:
            The first queue, non-blocking.

        Raises:
            DataPlaneError: invalid name, a device of that name exists (checked in sysfs and by
                ``IFF_TUN_EXCL``), ``/dev/net/tun`` cannot be opened, or TUNSETIFF fails even
                without the vnet header.
        """
        raw = name.encode("ascii", "replace")
        if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b" " in raw:
            raise DataPlaneError(f"invalid TUN device name {name!r} (1-{IFNAMSIZ - 1} ASCII characters)")
        if os.path.lexists(os.path.join(SYS_CLASS_NET, name)):
            raise DataPlaneError(_exists_message(name))
        mq = IFF_MULTI_QUEUE if multi_queue else 0
        if offload:
            tun = cls._create(raw, IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL | IFF_VNET_HDR | mq)
            if tun is not None:
                return tun
            log.warning("TUN vnet header refused by the kernel; using a plain TUN without offloads")
        tun = cls._create(raw, IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL | mq)
        assert tun is not None  # only a vnet-header request answers None
        return tun

    def open_queue(self) -> VnetTun:
        """Attach one more queue to this multi-queue device (same flags and offloads).

        Raises:
            DataPlaneError: the device is not multi-queue or the kernel refused the queue.
        """
        if not self.multi_queue:
            raise DataPlaneError(f"TUN device {self.name} is not multi-queue")
        flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (IFF_VNET_HDR if self.vnet else 0)
        tun = self._create(self.name.encode("ascii"), flags)
        if tun is None:
            raise DataPlaneError(f"cannot add a queue to {self.name}: vnet header refused")
        return tun

    @classmethod
    def _create(cls, raw: bytes, flags: int) -> VnetTun | None:
        """TUNSETIFF with ``flags``; None when the kernel refuses ``IFF_VNET_HDR`` (EINVAL)."""
        name = raw.decode("ascii")
        try:
            fd = os.open(TUN_CLONE_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise DataPlaneError(f"cannot open {TUN_CLONE_DEVICE}: {exc.strerror}") from exc
        try:
            answer = fcntl.ioctl(fd, TUNSETIFF, struct.pack(f"{IFNAMSIZ}sH22x", raw, flags))
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EBUSY:
                raise DataPlaneError(_exists_message(name)) from exc
            if flags & IFF_VNET_HDR and exc.errno == errno.EINVAL:
                return None
            raise DataPlaneError(f"TUNSETIFF for TUN device {name!r} failed: {exc.strerror}") from exc
        actual = answer[:IFNAMSIZ].split(b"\0", 1)[0].decode("ascii")
        vnet = bool(flags & IFF_VNET_HDR)
        offloads = _set_offloads(fd, actual) if vnet else 0
        log.info("opened TUN %s (vnet header %s, offloads %#x)", actual, vnet, offloads)
        return cls(fd, actual, vnet=vnet, offloads=offloads, multi_queue=bool(flags & IFF_MULTI_QUEUE))

    def read(self) -> tuple[VnetHeader, bytes] | None:
        """Read one (super-)packet.

        Returns:
            ``(vnet header, IP packet up to 65535 bytes)``, a zero header without vnet mode, or
            ``None`` when nothing waits (EAGAIN).

        Raises:
            DataPlaneError: the read failed (device gone) or returned less than a vnet header.
        """
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise DataPlaneError(f"read from TUN device {self.name} failed: {exc.strerror}") from exc
        if not self.vnet:
            return ZERO_VNET, data
        return parse_vnet_header(data), data[VNET_HDR_SIZE:]

    def read_packets(self, mss: int | None = None) -> list[bytes] | None:
        """Read one (super-)packet and return it as real IP packets with complete checksums.

        Returns:
            The packets (see :func:`~qgate.dataplane.offload.split_tso`), or ``None`` on EAGAIN.

        Raises:
            DataPlaneError: the read failed or the super-packet is malformed (count it as a drop).
        """
        got = self.read()
        if got is None:
            return None
        return split_tso(got[0], got[1], mss)

    def write(self, vnet_header: bytes, packet: bytes) -> None:
        """Hand one (super-)packet to the kernel as if it arrived on the device.

        Args:
            vnet_header: 10-byte ``virtio_net_hdr`` (``ZERO_VNET_BYTES`` for a plain packet).
            packet: the IP packet; a GSO super-packet is split in user space without vnet mode.

        Raises:
            DataPlaneError: the kernel refused it (malformed header, queue full, device down).
        """
        if not self.vnet:
            if vnet_header != ZERO_VNET_BYTES:
                for part in split_tso(parse_vnet_header(vnet_header), packet):
                    self._write_all([part], len(part))
                return
            self._write_all([packet], len(packet))
            return
        self._write_all([vnet_header, packet], VNET_HDR_SIZE + len(packet))

    def write_packets(self, packets: Sequence[bytes], *, verify: bool = False) -> int:
        """Coalesce ``packets`` (see :func:`~qgate.dataplane.coalesce.coalesce`) and write them.

        UDP datagrams are merged only when the kernel took USO (``TUN_F_USO4|TUN_F_USO6``, Linux
        6.2+). If it still refuses a UDP super-packet, that one is written datagram by datagram
        and UDP merging stays off (logged once): the same packets arrive either way.

        Args:
            packets: whole IP packets, in order.
            verify: merge only packets whose transport checksum verifies (for unvouched sources).

        Returns:
            The number of writes the kernel refused (each may hold many packets); logged at debug.
        """
        if not self.vnet:
            items = [(ZERO_VNET_BYTES, p) for p in packets]
        else:
            items = coalesce(packets, udp=self._merge_udp, verify=verify)
        errors = 0
        for header, packet in items:
            try:
                self.write(header, packet)
            except DataPlaneError as exc:
                if header[1] == GSO_UDP_L4:  # the kernel takes no USO writes: split this one, merge no more
                    if self._merge_udp:
                        self._merge_udp = False
                        log.warning("TUN %s refused UDP super-packets (%s); one write each", self.name, exc)
                    errors += self._write_split(header, packet)
                    continue
                log.debug("%s", exc)
                errors += 1
        return errors

    def _write_split(self, header: bytes, packet: bytes) -> int:
        """Write a refused super-packet as its real packets; return the writes refused."""
        errors = 0
        for part in split_tso(parse_vnet_header(header), packet):
            try:
                self._write_all([ZERO_VNET_BYTES, part], VNET_HDR_SIZE + len(part))
            except DataPlaneError as exc:
                log.debug("%s", exc)
                errors += 1
        return errors

    def _write_all(self, parts: list[bytes], size: int) -> None:
        try:
            written = os.writev(self.fd, parts)
        except OSError as exc:
            reason = "queue full" if exc.errno == errno.EAGAIN else exc.strerror
            raise DataPlaneError(f"write to TUN device {self.name} failed: {reason}") from exc
        if written != size:
            raise DataPlaneError(f"short write to TUN device {self.name}: {written} of {size} bytes")

    def close(self) -> None:
        """Close this queue's descriptor. Idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)
            log.info("closed TUN queue %s", self.name)

    def __enter__(self) -> VnetTun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _set_offloads(fd: int, name: str) -> int:
    """Set the vnet header size to 10 and the first offload set the kernel accepts; return it."""
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except OSError as exc:
        log.warning("TUNSETVNETHDRSZ on %s failed (%s); keeping the default size", name, exc.strerror)
    for choice in OFFLOAD_CHOICES:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, choice)
        except OSError as exc:
            log.debug("TUNSETOFFLOAD %#x on %s refused: %s", choice, name, exc.strerror)
            continue
        if choice != OFFLOAD_CHOICES[0]:
            log.warning("TUN %s: only offloads %#x accepted", name, choice)
        return choice
    return 0
