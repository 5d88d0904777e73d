"""Links, addresses, routes and MTU over netlink (pyroute2): qgate's only netlink user.

The gateway opens its TUN device (``qgate.dataplane.tun``) and then calls
:func:`configure_tun` to give it an MTU, an optional address, the link state ``up`` and one
route per peer subnet through it. The returned :class:`NetHandle` removes exactly what was
added (routes, address); the TUN interface itself disappears when its descriptor closes.
Everything acts on the network namespace of the calling process.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from qgate.errors import DataPlaneError

log = logging.getLogger(__name__)

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

MTU_MIN = 576
"""Bytes: the smallest inner MTU accepted (IPv4 minimum datagram size, RFC 791)."""
MTU_MAX = 65535
"""Bytes: the largest MTU accepted."""


def _off_loop(fn: Callable[[], T]) -> T:
    """Call ``fn``; in a thread of its own when this thread runs an asyncio loop.

    pyroute2's synchronous ``IPRoute`` drives a private event loop and cannot start inside a
    running one (the gateway calls netconfig from its asyncio task).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    box: dict[str, T] = {}
    error: list[BaseException] = []

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    worker = threading.Thread(target=target, name="qgate-netlink")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return box["value"]


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


@dataclass
class NetHandle:
    """What :func:`configure_tun` added to one interface, so it can be removed again.

    Attributes:
        ifname: the interface name.
        index: the kernel interface index.
        address: the address added by us, or None (none asked, or it was already there).
        routes: the routes added by us, through ``index``.
    """

    ifname: str
    index: int
    address: IPInterface | None = None
    routes: list[IPNetwork] = field(default_factory=list)

    def remove(self) -> None:
        """Delete the routes and the address that were added; idempotent, best effort.

        Items already gone (the interface closed, someone else deleted them) are skipped.

        Raises:
            DataPlaneError: netlink refused a deletion for another reason (listed in the message);
                the remaining items are still attempted first.
        """
        _off_loop(self._remove)
        log.info("removed routes and address of %s", self.ifname)

    def _remove(self) -> None:
        failures: list[str] = []
        try:
            with IPRoute() as ipr:
                while self.routes:
                    net = self.routes.pop()
                    _ignore_gone(
                        failures, f"route {net}", functools.partial(_del_route, ipr, net, self.index)
                    )
                if self.address is not None:
                    addr, self.address = self.address, None
                    _ignore_gone(
                        failures, f"address {addr}", functools.partial(_del_addr, ipr, addr, self.index)
                    )
        except OSError as exc:
            raise DataPlaneError(f"netlink socket for removing {self.ifname} config failed: {exc}") from exc
        if failures:
            raise DataPlaneError(f"removing config of {self.ifname} failed: " + "; ".join(failures))


def _ignore_gone(failures: list[str], what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except NetlinkError as exc:
        if exc.code not in (errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENOENT):
            failures.append(f"{what}: {_reason(exc)}")


def _reason(exc: NetlinkError) -> str:
    return f"{errno.errorcode.get(exc.code, str(exc.code))} ({exc})"


def _del_route(ipr: IPRoute, net: IPNetwork, index: int) -> None:
    ipr.route("del", family=_family(net.version), dst=str(net), oif=index)


def _del_addr(ipr: IPRoute, addr: IPInterface, index: int) -> None:
    ipr.addr("del", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)


TUN_TX_QUEUE: Final = 4096
"""Packets the kernel queues toward the TUN reader (the default is 500: 30 ms at 16 kpps)."""


def configure_tun(
    name: str, *, mtu: int, address: IPInterface | None, routes: Sequence[IPNetwork]
) -> NetHandle:
    """Set MTU, add an address, bring the link up and route ``routes`` through interface ``name``.

    Applies, in this order: MTU, address (if any), state up, one route per network (scope
    link, ``dev name``). On any failure, what was already added is removed again.

    Args:
        name: an existing interface (normally the TUN device just opened), 1-15 characters.
        mtu: inner MTU in bytes (576-65535).
        address: address with prefix length for the interface, or None for none.
        routes: destination networks (IPv4 or IPv6) to route via the interface.

    Returns:
        A handle whose :meth:`NetHandle.remove` undoes the address and routes.

    Raises:
        DataPlaneError: the interface does not exist, the MTU is out of range, or netlink
            refused a step (the message names the step and the errno, e.g. a route that
            already exists: EEXIST).
    """
    if not MTU_MIN <= mtu <= MTU_MAX:
        raise DataPlaneError(f"MTU {mtu} for {name} out of range {MTU_MIN}-{MTU_MAX} bytes")
    handle = _off_loop(functools.partial(_configure, name, mtu=mtu, address=address, routes=routes))
    log.info("configured %s: mtu %d, address %s, routes %s", name, mtu, address, [str(r) for r in routes])
    return handle


def _configure(name: str, *, mtu: int, address: IPInterface | None, routes: Sequence[IPNetwork]) -> NetHandle:
    try:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=name)
            if not indexes:
                raise DataPlaneError(f"interface {name} not found")
            handle = NetHandle(ifname=name, index=int(indexes[0]))
            try:
                _apply(ipr, handle, mtu=mtu, address=address, routes=routes)
            except BaseException:
                _rollback(handle)
                raise
    except OSError as exc:
        raise DataPlaneError(f"netlink socket for configuring {name} failed: {exc}") from exc
    return handle


def _apply(
    ipr: IPRoute, handle: NetHandle, *, mtu: int, address: IPInterface | None, routes: Sequence[IPNetwork]
) -> None:
    name, index = handle.ifname, handle.index
    _step(f"set MTU {mtu} on {name}", lambda: ipr.link("set", index=index, mtu=mtu))
    # A longer queue in front of the TUN rides out short pauses of the reader (GC, a busy core).
    _step(f"set txqueuelen on {name}", lambda: ipr.link("set", index=index, txqlen=TUN_TX_QUEUE))
    # fq_codel keeps small flows (grid protection, pings) out of a bulk flow's queue (RFC 8290).
    try:
        ipr.tc("add", "fq_codel", index=index, handle="1:")
    except NetlinkError as exc:
        log.warning("fq_codel on %s not available (%s): the TUN keeps its default qdisc", name, _reason(exc))
    if address is not None:
        try:
            ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
            handle.address = address
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DataPlaneError(f"add address {address} to {name} failed: {_reason(exc)}") from exc
            log.info("address %s already on %s; leaving it in place", address, name)
    _step(f"bring {name} up", lambda: ipr.link("set", index=index, state="up"))
    for net in routes:
        _step(
            f"add route {net} via {name}",
            functools.partial(ipr.route, "add", family=_family(net.version), dst=str(net), oif=index),
        )
        handle.routes.append(net)


def _step(what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except NetlinkError as exc:
        raise DataPlaneError(f"{what} failed: {_reason(exc)}") from exc


def _rollback(handle: NetHandle) -> None:
    try:
        handle._remove()
    except DataPlaneError as exc:
        log.warning("rollback after failed configuration incomplete: %s", exc)
