"""Layer-3 TUN device (Linux ``/dev/net/tun``): one IP packet per read or write.

The device is opened with ``IFF_TUN | IFF_NO_PI`` (no 4-byte packet-information prefix), so a
read returns exactly one IPv4 or IPv6 packet and a write takes exactly one. The file descriptor
is non-blocking: the forwarding loop polls it (``selectors``/``asyncio``) and reads until
:meth:`TunDevice.read` returns ``None``. Linux documentation: ``Documentation/networking/tuntap.rst``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from typing import Final

from qgate.errors import DataPlaneError

log = logging.getLogger(__name__)

TUN_CLONE_DEVICE: Final = "/dev/net/tun"
"""The TUN/TAP clone device."""
TUNSETIFF: Final = 0x400454CA
"""ioctl number: _IOW('T', 202, int) from <linux/if_tun.h>."""
IFF_TUN: Final = 0x0001
"""Flag: layer-3 device (IP packets), <linux/if_tun.h>."""
IFF_NO_PI: Final = 0x1000
"""Flag: no packet-information header before each packet, <linux/if_tun.h>."""
IFF_TUN_EXCL: Final = 0x8000
"""Flag: fail with EBUSY instead of attaching to an existing device, <linux/if_tun.h>."""
SYS_CLASS_NET: Final = "/sys/class/net"
"""sysfs directory listing the network devices of the current network namespace."""
IFNAMSIZ: Final = 16
"""Bytes in a Linux interface name including the terminating NUL (<linux/if.h>)."""
READ_SIZE: Final = 65535
"""Bytes asked for per read: the largest IPv4/IPv6 (non-jumbo) packet."""


def _exists_message(name: str) -> str:
    return f"a network device named {name} already exists; qgate will not attach to it (remove it first)"


class TunDevice:
    """An open TUN device; closing it (or the process exiting) deletes the interface.

    Attributes:
        fd: the non-blocking file descriptor (for selectors / ``loop.add_reader``).
        name: the interface name the kernel gave the device (1-15 characters).
    """

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"<TunDevice {self.name} {state}>"

    @classmethod
    def open(cls, name: str) -> TunDevice:
        """Create the TUN interface ``name`` and return it, non-blocking; never attach to an existing one.

        A device of that name already in the namespace (a leftover persistent TUN, another
        gateway's device, any other link) is refused: it is checked in ``/sys/class/net`` first
        and ``IFF_TUN_EXCL`` makes the kernel refuse it too (closing the race).

        Args:
            name: interface name, 1-15 ASCII characters; the kernel replaces a ``%d`` with a number.

        Returns:
            The open device; ``name`` is the name the kernel actually used.

        Raises:
            DataPlaneError: the name is invalid, ``/dev/net/tun`` cannot be opened (no module,
                no permission: CAP_NET_ADMIN is needed), a network device named ``name``
                already exists, or the TUNSETIFF ioctl fails.
        """
        raw = name.encode("ascii", "replace")
        if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b" " in raw:
            raise DataPlaneError(f"invalid TUN device name {name!r} (1-{IFNAMSIZ - 1} ASCII characters)")
        if os.path.lexists(os.path.join(SYS_CLASS_NET, name)):
            raise DataPlaneError(_exists_message(name))
        try:
            fd = os.open(TUN_CLONE_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise DataPlaneError(f"cannot open {TUN_CLONE_DEVICE}: {exc.strerror}") from exc
        ifreq = struct.pack(f"{IFNAMSIZ}sH22x", raw, IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL)
        try:
            answer = fcntl.ioctl(fd, TUNSETIFF, ifreq)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EBUSY:
                raise DataPlaneError(_exists_message(name)) from exc
            raise DataPlaneError(f"TUNSETIFF for TUN device {name!r} failed: {exc.strerror}") from exc
        actual = answer[:IFNAMSIZ].split(b"\0", 1)[0].decode("ascii")
        log.info("opened TUN device %s", actual)
        return cls(fd, actual)

    def read(self) -> bytes | None:
        """Read one IP packet from the kernel (a packet routed into the device).

        Returns:
            The packet (IPv4 or IPv6 header first, up to 65535 bytes), or ``None`` when none is
            waiting (EAGAIN).

        Raises:
            DataPlaneError: the device is closed or the read failed for another reason.
        """
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise DataPlaneError(f"read from TUN device {self.name} failed: {exc.strerror}") from exc

    def write(self, packet: bytes) -> None:
        """Hand one IP packet to the kernel as if it arrived on the device.

        Args:
            packet: a whole IPv4 or IPv6 packet (no packet-information prefix).

        Raises:
            DataPlaneError: the kernel refused the packet (malformed, EAGAIN on a full queue,
                device down or closed). Callers count this as a drop.
        """
        try:
            written = os.write(self.fd, packet)
        except OSError as exc:
            reason = "queue full" if exc.errno == errno.EAGAIN else exc.strerror
            raise DataPlaneError(f"write to TUN device {self.name} failed: {reason}") from exc
        if written != len(packet):
            raise DataPlaneError(f"short write to TUN device {self.name}: {written} of {len(packet)} bytes")

    def close(self) -> None:
        """Close the descriptor; the kernel deletes the (non-persistent) interface. Idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)
            log.info("closed TUN device %s", self.name)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
