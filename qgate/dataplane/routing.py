"""Inner-packet routing: which peer a packet goes to, and which sources a peer may use.

Pure functions over IPv4/IPv6 packets as read from a TUN device (no packet-information
header). Like WireGuard's cryptokey routing, the peer's ``subnets`` are both its routes and
the only source addresses accepted from it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

IPV4_HEADER_MIN = 20
"""Bytes: IPv4 header without options (RFC 791)."""
IPV6_HEADER = 40
"""Bytes: IPv6 fixed header (RFC 8200)."""


def _addr(packet: bytes, source: bool) -> tuple[int, int] | None:
    """Return ``(ip_version, address as int)`` of the packet's source or destination."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= IPV4_HEADER_MIN:
        start = 12 if source else 16
        return 4, int.from_bytes(packet[start : start + 4], "big")
    if version == 6 and len(packet) >= IPV6_HEADER:
        start = 8 if source else 24
        return 6, int.from_bytes(packet[start : start + 16], "big")
    return None


class RouteTable(Generic[T]):
    """Longest-prefix match from IP networks to values (peers); a few dozen routes at most."""

    def __init__(
        self, routes: Iterable[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, T]] = ()
    ) -> None:
        self._routes: list[tuple[int, int, int, int, T]] = []
        for network, value in routes:
            self.add(network, value)

    def add(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, value: T) -> None:
        """Route ``network`` to ``value``."""
        entry = (
            network.version,
            int(network.network_address),
            int(network.netmask),
            network.prefixlen,
            value,
        )
        self._routes.append(entry)
        self._routes.sort(key=lambda r: -r[3])

    def _match(self, found: tuple[int, int] | None) -> T | None:
        if found is None:
            return None
        version, address = found
        for r_version, net, mask, _, value in self._routes:
            if r_version == version and address & mask == net:
                return value
        return None

    def for_destination(self, packet: bytes) -> T | None:
        """Return the value routed to the packet's destination address, or None."""
        return self._match(_addr(packet, source=False))

    def for_source(self, packet: bytes) -> T | None:
        """Return the value whose network holds the packet's source address, or None."""
        return self._match(_addr(packet, source=True))
