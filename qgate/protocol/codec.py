"""Big-endian field reader and writer for qgate's handshake messages (docs/protocol.md, Encoding).

Every length-prefixed field states its prefix width: ``str8``/``bytes8`` (1-byte length),
``bytes16`` (2-byte length). A reader that runs out of input, or finds bytes left over,
raises ``RemoteProtocolError`` naming the field.
"""

from __future__ import annotations

from qgate.errors import LocalProtocolError, RemoteProtocolError


class Writer:
    """Append fields to a growing byte string."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        """Append one unsigned byte (0-255)."""
        return self._put(value.to_bytes(1, "big"))

    def u16(self, value: int) -> Writer:
        """Append an unsigned 16-bit integer, big-endian."""
        return self._put(value.to_bytes(2, "big"))

    def u32(self, value: int) -> Writer:
        """Append an unsigned 32-bit integer, big-endian."""
        return self._put(value.to_bytes(4, "big"))

    def u64(self, value: int) -> Writer:
        """Append an unsigned 64-bit integer, big-endian."""
        return self._put(value.to_bytes(8, "big"))

    def fixed(self, data: bytes, size: int) -> Writer:
        """Append exactly ``size`` bytes.

        Raises:
            LocalProtocolError: ``data`` is not ``size`` bytes long.
        """
        if len(data) != size:
            raise LocalProtocolError(f"fixed field needs {size} bytes, got {len(data)}")
        return self._put(data)

    def bytes8(self, data: bytes) -> Writer:
        """Append a 1-byte length then ``data`` (0-255 bytes)."""
        return self.u8(_checked_len(data, 0xFF))._put(data)

    def bytes16(self, data: bytes) -> Writer:
        """Append a 2-byte length then ``data`` (0-65535 bytes)."""
        return self.u16(_checked_len(data, 0xFFFF))._put(data)

    def str8(self, text: str) -> Writer:
        """Append an ASCII string with a 1-byte length."""
        return self.bytes8(text.encode("ascii"))

    def getvalue(self) -> bytes:
        """Return everything written so far."""
        return b"".join(self._parts)

    def _put(self, data: bytes) -> Writer:
        self._parts.append(data)
        return self


def _checked_len(data: bytes, limit: int) -> int:
    if len(data) > limit:
        raise LocalProtocolError(f"field of {len(data)} bytes exceeds its {limit}-byte limit")
    return len(data)


class Reader:
    """Consume fields from a received message; every short read is the peer's fault."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        """Read ``data``; ``what`` names the message in error texts."""
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, size: int, field: str) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise RemoteProtocolError(f"{self._what}: truncated at field {field}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self, field: str) -> int:
        """Read one unsigned byte."""
        return self._take(1, field)[0]

    def u16(self, field: str) -> int:
        """Read an unsigned 16-bit big-endian integer."""
        return int.from_bytes(self._take(2, field), "big")

    def u32(self, field: str) -> int:
        """Read an unsigned 32-bit big-endian integer."""
        return int.from_bytes(self._take(4, field), "big")

    def u64(self, field: str) -> int:
        """Read an unsigned 64-bit big-endian integer."""
        return int.from_bytes(self._take(8, field), "big")

    def fixed(self, size: int, field: str) -> bytes:
        """Read exactly ``size`` bytes."""
        return self._take(size, field)

    def bytes8(self, field: str) -> bytes:
        """Read a field with a 1-byte length prefix."""
        return self._take(self.u8(field), field)

    def bytes16(self, field: str) -> bytes:
        """Read a field with a 2-byte length prefix."""
        return self._take(self.u16(field), field)

    def str8(self, field: str) -> str:
        """Read a printable-ASCII string with a 1-byte length prefix."""
        raw = self.bytes8(field)
        if not all(0x20 <= b < 0x7F for b in raw):
            raise RemoteProtocolError(f"{self._what}: field {field} is not printable ASCII")
        return raw.decode("ascii")

    def end(self) -> None:
        """Check that the whole message was consumed."""
        if self._pos != len(self._data):
            raise RemoteProtocolError(f"{self._what}: {len(self._data) - self._pos} trailing bytes")
