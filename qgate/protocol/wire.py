"""Datagram framing: data-packet header and handshake fragments (docs/protocol.md, Datagrams).

Every qgate UDP datagram starts with a type byte:

* ``0x04`` data: ``type(1) || reserved(3)=0 || receiver_index(4) || counter(8)`` (16 bytes, the
  AES-GCM associated data) followed by ``ciphertext || tag(16)``. An empty plaintext is a keepalive.
* ``0x01`` handshake fragment: ``type(1) || msg_type(1) || index(1) || count(1) ||
  receiver_index(4) || message_id(4)`` followed by at most 1152 bytes of the message and
  ``mac1(16) || mac2(16)`` (``guard.py``), so no fragment needs IP fragmentation (1196 bytes: it
  fits the IPv6 minimum MTU of 1280 bytes with IPv6 and UDP headers, RFC 8200 section 5).
  ``receiver_index`` is a *steering hint* at the same offset as a data record's: the index of a
  live epoch (or of the pending exchange) the receiver holds, or 0. The kernel filter sends
  fragments naming a live index to the data socket (``qgate.dataplane.sockfilter``), so an
  established session's handshakes never queue behind a flood; nothing else trusts it.
* ``0x02`` Retry: 76 bytes handing out the responder's challenge, with the same steering hint
  (``guard.py``).

Sans-I/O: bytes and ``now`` in, bytes out.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from qgate.constants import (
    AEAD_TAG_SIZE,
    DATA_HEADER_SIZE,
    FRAGMENT_COUNT_MAX,
    FRAGMENT_HEADER_SIZE,
    FRAGMENT_PAYLOAD_MAX,
    FRAGMENT_TRAILER_SIZE,
    MSG_DATA,
    MSG_HANDSHAKE_FRAGMENT,
    MSG_RETRY,
    REASSEMBLY_SLOTS,
    REASSEMBLY_TIMEOUT,
    RETRY_SIZE,
)
from qgate.errors import LocalProtocolError, RemoteProtocolError

_DATA_HEADER: Final = struct.Struct("!IIQ")
"""The data header as ``(type << 24 | reserved, receiver_index, counter)`` (protocol.md 2.1)."""
_DATA_WORD0: Final = MSG_DATA << 24
"""First 32-bit word of every valid data header: type 0x04, reserved bytes zero."""
_FRAGMENT_HEADER: Final = struct.Struct("!BBBBII")
"""type, msg_type, index, count, receiver_index (steering hint), message_id (12 bytes)."""
_MESSAGE_TYPES: Final = range(1, 8)
SINGLE_FRAGMENT_TYPES: Final = frozenset({3, 4, 5, 6})
"""Message types that always fit one fragment (M3, R1, R2, R3): they never use a reassembly slot."""
MULTI_FRAGMENT_TYPES: Final = frozenset({1, 2, 7})
"""Message types that may span fragments (M1, M2, Kick); their fragments need a valid mac2."""


def pack_data_header(receiver_index: int, counter: int) -> bytes:
    """Return the 16-byte data header for ``receiver_index`` (u32) and ``counter`` (u64)."""
    return _DATA_HEADER.pack(_DATA_WORD0, receiver_index, counter)


def data_header_fields(datagram: bytes | memoryview) -> tuple[int, int] | None:
    """Return ``(receiver_index, counter)`` of a data datagram, or None if it is not one.

    The per-packet form of :func:`parse_data_header` (no exception): None for a datagram shorter
    than header + tag, of another type, or with non-zero reserved bytes.
    """
    if len(datagram) < DATA_HEADER_SIZE + AEAD_TAG_SIZE:
        return None
    word0, index, counter = _DATA_HEADER.unpack_from(datagram)
    return (index, counter) if word0 == _DATA_WORD0 else None


def parse_data_header(datagram: bytes) -> tuple[int, int]:
    """Return ``(receiver_index, counter)`` of a data datagram.

    Raises:
        RemoteProtocolError: shorter than header + tag, wrong type, or non-zero reserved bytes.
    """
    if len(datagram) < DATA_HEADER_SIZE + AEAD_TAG_SIZE:
        raise RemoteProtocolError("data datagram shorter than header and tag")
    fields = data_header_fields(datagram)
    if fields is None:
        raise RemoteProtocolError("not a data datagram")
    return fields


def fragment_message(msg_type: int, message: bytes, message_id: int, receiver_index: int = 0) -> list[bytes]:
    """Split one handshake message into fragments (header || payload, without the mac trailer).

    ``guard.add_macs`` appends ``mac1 || mac2`` to each before it is sent.

    Args:
        msg_type: message type (1-7, ``qgate.protocol.messages``).
        message: the encoded message, 1 .. 16 x 1152 bytes.
        message_id: u32 chosen by the sender, the same for every fragment of this message.
        receiver_index: u32 steering hint (a live index of the receiver's, or 0), in every fragment.

    Raises:
        LocalProtocolError: the message is empty or needs more than 16 fragments.
    """
    chunks = [message[i : i + FRAGMENT_PAYLOAD_MAX] for i in range(0, len(message), FRAGMENT_PAYLOAD_MAX)]
    if not chunks or len(chunks) > FRAGMENT_COUNT_MAX:
        raise LocalProtocolError(f"handshake message of {len(message)} bytes cannot be fragmented")
    count = len(chunks)
    return [
        _FRAGMENT_HEADER.pack(MSG_HANDSHAKE_FRAGMENT, msg_type, i, count, receiver_index, message_id) + chunk
        for i, chunk in enumerate(chunks)
    ]


@dataclass(frozen=True)
class Fragment:
    """One parsed handshake fragment."""

    msg_type: int
    index: int
    count: int
    message_id: int
    payload: bytes
    receiver_index: int = 0


def parse_fragment(datagram: bytes) -> Fragment:
    """Parse a handshake fragment datagram (header, payload, then the 32-byte mac trailer).

    Checks framing only; ``guard.mac1_ok`` / ``mac2_ok`` check the trailer.

    Raises:
        RemoteProtocolError: short, wrong type, unknown message type, bad index/count (M3, R1,
            R2 and R3 must be one fragment), or an empty or oversized payload.
    """
    if len(datagram) <= FRAGMENT_HEADER_SIZE + FRAGMENT_TRAILER_SIZE or datagram[0] != MSG_HANDSHAKE_FRAGMENT:
        raise RemoteProtocolError("not a handshake fragment")
    _, msg_type, index, count, receiver_index, message_id = _FRAGMENT_HEADER.unpack_from(datagram)
    payload = datagram[FRAGMENT_HEADER_SIZE:-FRAGMENT_TRAILER_SIZE]
    if msg_type not in _MESSAGE_TYPES:
        raise RemoteProtocolError(f"unknown handshake message type {msg_type}")
    if not 1 <= count <= FRAGMENT_COUNT_MAX or index >= count:
        raise RemoteProtocolError(f"fragment {index} of {count} out of range")
    if count > 1 and msg_type in SINGLE_FRAGMENT_TYPES:
        raise RemoteProtocolError(f"message type {msg_type} is always a single fragment")
    if len(payload) > FRAGMENT_PAYLOAD_MAX or (index < count - 1 and len(payload) != FRAGMENT_PAYLOAD_MAX):
        raise RemoteProtocolError("fragment payload of the wrong size")
    return Fragment(msg_type, index, count, message_id, payload, receiver_index)


def classify_datagram(datagram: bytes) -> str | None:
    """Return ``"data"``, ``"handshake"`` or ``"retry"`` for well-formed qgate framing, else None.

    Checks framing only (type byte, header fields, sizes); it cannot check authenticity.
    """
    try:
        if datagram[:1] == bytes([MSG_DATA]):
            parse_data_header(datagram)
            return "data"
        if datagram[:1] == bytes([MSG_HANDSHAKE_FRAGMENT]):
            parse_fragment(datagram)
            return "handshake"
        if datagram[:1] == bytes([MSG_RETRY]) and len(datagram) == RETRY_SIZE:
            return "retry"
    except RemoteProtocolError:
        return None
    return None


@dataclass
class _Partial:
    msg_type: int
    count: int
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Rebuild handshake messages from fragments of one source (bounded memory and time).

    At most ``REASSEMBLY_SLOTS`` partial messages are kept (the oldest is dropped past that),
    each for ``REASSEMBLY_TIMEOUT`` seconds. Fragments may arrive in any order and more than once.
    """

    def __init__(self, slots: int = REASSEMBLY_SLOTS, timeout: float = REASSEMBLY_TIMEOUT) -> None:
        self._slots = slots
        self._timeout = timeout
        self._partials: OrderedDict[int, _Partial] = OrderedDict()

    def add(self, fragment: Fragment, now: float) -> tuple[int, bytes] | None:
        """Add one fragment; return ``(msg_type, message)`` once the message is complete.

        Raises:
            RemoteProtocolError: the fragment contradicts earlier fragments of the same message.
        """
        self._expire(now)
        if fragment.count == 1:
            return fragment.msg_type, fragment.payload
        partial = self._partials.get(fragment.message_id)
        if partial is None:
            partial = _Partial(fragment.msg_type, fragment.count, now)
            self._partials[fragment.message_id] = partial
            while len(self._partials) > self._slots:
                self._partials.popitem(last=False)
        if partial.msg_type != fragment.msg_type or partial.count != fragment.count:
            del self._partials[fragment.message_id]
            raise RemoteProtocolError("fragment does not match the message it claims to belong to")
        partial.pieces[fragment.index] = fragment.payload
        if len(partial.pieces) < partial.count:
            return None
        del self._partials[fragment.message_id]
        return partial.msg_type, b"".join(partial.pieces[i] for i in range(partial.count))

    def _expire(self, now: float) -> None:
        stale = [mid for mid, p in self._partials.items() if now - p.started > self._timeout]
        for mid in stale:
            del self._partials[mid]

    def __len__(self) -> int:
        return len(self._partials)


def new_message_id(rng: Callable[[int], bytes]) -> int:
    """Return a random u32 message id for ``fragment_message``."""
    return int.from_bytes(rng(4), "big")


def steering_index(datagram: bytes | memoryview) -> int:
    """Return the u32 at bytes 4..7: a data record's receiver_index, a fragment's or Retry's steering hint."""
    return int.from_bytes(datagram[4:8], "big") if len(datagram) >= 8 else 0


def with_steering_index(fragment: bytes, index: int) -> bytes:
    """Return a fragment (header and payload, before its macs) with steering hint ``index`` (u32).

    Raises:
        LocalProtocolError: ``fragment`` is shorter than the 12-byte header, or ``index`` is not a u32.
    """
    if len(fragment) < 12 or not 0 <= index <= 0xFFFFFFFF:
        raise LocalProtocolError("no fragment header to carry a steering hint")
    return fragment[:4] + index.to_bytes(4, "big") + fragment[8:]
