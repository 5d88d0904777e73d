"""Handshake-class messages of the qgate protocol: layouts, encoding and parsing.

Layouts (docs/protocol.md, Messages); integers big-endian; ``bytes16`` = 2-byte length
prefix, ``str8`` = 1-byte length + ASCII. Every message starts with ``version(1)``.

* M1 InitHello (master -> slave, type 1): version, kem_id(1), x25519(1), qkd_bits(2),
  timestamp(8, ns), sender_index(4), epoch(4), random(32), master_sae str8, slave_sae str8,
  ek bytes16, x25519_pub bytes8, key_ids (count(1), str8 each), signature bytes16. A count of 0
  is a degraded handshake without a QKD key (fail mode ``pqc_only_if_qkd_down`` on both sides).
* M2 RespHello (slave -> master, type 2): version, sender_index(4), receiver_index(4), epoch(4),
  random(32), ct bytes16, x25519_pub bytes8, signature bytes16, confirm(32).
* M3 InitConfirm (type 3): version, receiver_index(4), epoch(4), confirm(32).
* R1 RatchetRequest (master -> slave, type 4): version, receiver_index(4), sender_index(4),
  epoch(4), key_ids, mac(32).
* R2 RatchetResponse (type 5): version, receiver_index(4), sender_index(4), epoch(4), confirm(32).
* R3 RatchetConfirm (type 6): version, receiver_index(4), epoch(4), confirm(32).
* Kick (slave -> master, type 7): version, timestamp(8, ns), master_sae str8, slave_sae str8,
  reason(1), signature bytes16. Asks the master for a fresh handshake: 0 no session, 1 the
  slave's KME could not deliver a QKD key, 2 the slave's key neared the packet limit.

Parsers raise only ``RemoteProtocolError`` (malformed input); authentication is the state
machine's job (``qgate.protocol.peer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final, Self

from qgate.constants import CONFIRM_SIZE, PROTOCOL_VERSION
from qgate.errors import RemoteProtocolError
from qgate.protocol.codec import Reader, Writer

KICK_NO_SESSION: Final = 0
"""Kick reason: the slave has no usable session (start, restart, or data on an unknown epoch)."""
KICK_QKD_UNAVAILABLE: Final = 1
"""Kick reason: the slave's KME could not deliver the QKD key a handshake or ratchet named."""
KICK_PACKET_LIMIT: Final = 2
"""Kick reason: the slave's sending key neared the AES-GCM packet limit."""
KICK_REASONS: Final = frozenset({KICK_NO_SESSION, KICK_QKD_UNAVAILABLE, KICK_PACKET_LIMIT})

RANDOM_SIZE: Final = 32
"""Bytes of fresh randomness in M1 and M2."""
KEY_IDS_MAX: Final = 16
"""QKD key_IDs per message at most."""

KEM_IDS: Final[dict[str, int]] = {"ml-kem-768": 2, "ml-kem-1024": 3}
"""Wire identifiers of the KEMs (FIPS 203 parameter sets)."""
KEM_NAMES: Final[dict[int, str]] = {v: k for k, v in KEM_IDS.items()}


def _version(r: Reader) -> None:
    if r.u8("version") != PROTOCOL_VERSION:
        raise RemoteProtocolError("unsupported protocol version")


def _write_key_ids(w: Writer, key_ids: tuple[str, ...]) -> None:
    w.u8(len(key_ids))
    for key_id in key_ids:
        w.str8(key_id)


def _read_key_ids(r: Reader, *, allow_none: bool = False) -> tuple[str, ...]:
    count = r.u8("key_id_count")
    if not (0 if allow_none else 1) <= count <= KEY_IDS_MAX:
        raise RemoteProtocolError(f"key_ID count {count} outside 1..{KEY_IDS_MAX}")
    ids = tuple(r.str8("key_id") for _ in range(count))
    if len(set(ids)) != len(ids) or not all(ids):
        raise RemoteProtocolError("empty or duplicate key_ID")
    return ids


@dataclass(frozen=True)
class InitHello:
    """M1: the master's ephemeral ML-KEM encapsulation key, X25519 value and QKD key_IDs."""

    TYPE: ClassVar[int] = 1
    kem_id: int
    x25519: bool
    qkd_bits: int
    timestamp: int
    sender_index: int
    epoch: int
    random: bytes
    master_sae: str
    slave_sae: str
    ek: bytes
    x25519_pub: bytes
    key_ids: tuple[str, ...]
    signature: bytes = b""

    def signed_part(self) -> bytes:
        """Return the encoding of every field before ``signature``."""
        w = Writer().u8(PROTOCOL_VERSION).u8(self.kem_id).u8(int(self.x25519)).u16(self.qkd_bits)
        w.u64(self.timestamp).u32(self.sender_index).u32(self.epoch).fixed(self.random, RANDOM_SIZE)
        w.str8(self.master_sae).str8(self.slave_sae).bytes16(self.ek).bytes8(self.x25519_pub)
        _write_key_ids(w, self.key_ids)
        return w.getvalue()

    def encode(self) -> bytes:
        """Return the full message."""
        return self.signed_part() + Writer().bytes16(self.signature).getvalue()

    @classmethod
    def parse(cls, data: bytes) -> InitHello:
        """Parse M1; raise ``RemoteProtocolError`` if malformed."""
        r = Reader(data, "M1")
        _version(r)
        kem_id, x_flag, qkd_bits = r.u8("kem_id"), r.u8("x25519"), r.u16("qkd_bits")
        if x_flag > 1:
            raise RemoteProtocolError("M1: x25519 flag must be 0 or 1")
        msg = cls(
            kem_id=kem_id,
            x25519=bool(x_flag),
            qkd_bits=qkd_bits,
            timestamp=r.u64("timestamp"),
            sender_index=r.u32("sender_index"),
            epoch=r.u32("epoch"),
            random=r.fixed(RANDOM_SIZE, "random"),
            master_sae=r.str8("master_sae"),
            slave_sae=r.str8("slave_sae"),
            ek=r.bytes16("ek"),
            x25519_pub=r.bytes8("x25519_pub"),
            key_ids=_read_key_ids(r, allow_none=True),
            signature=r.bytes16("signature"),
        )
        r.end()
        return msg


@dataclass(frozen=True)
class RespHello:
    """M2: the slave's ML-KEM ciphertext, X25519 value, signature and key confirmation."""

    TYPE: ClassVar[int] = 2
    sender_index: int
    receiver_index: int
    epoch: int
    random: bytes
    ct: bytes
    x25519_pub: bytes
    signature: bytes = b""
    confirm: bytes = bytes(CONFIRM_SIZE)

    def signed_part(self) -> bytes:
        """Return the encoding of every field before ``signature``."""
        w = Writer().u8(PROTOCOL_VERSION).u32(self.sender_index).u32(self.receiver_index)
        w.u32(self.epoch).fixed(self.random, RANDOM_SIZE).bytes16(self.ct).bytes8(self.x25519_pub)
        return w.getvalue()

    def confirmed_part(self) -> bytes:
        """Return the encoding of every field before ``confirm`` (the signature included)."""
        return self.signed_part() + Writer().bytes16(self.signature).getvalue()

    def encode(self) -> bytes:
        """Return the full message."""
        return self.confirmed_part() + Writer().fixed(self.confirm, CONFIRM_SIZE).getvalue()

    @classmethod
    def parse(cls, data: bytes) -> RespHello:
        """Parse M2; raise ``RemoteProtocolError`` if malformed."""
        r = Reader(data, "M2")
        _version(r)
        msg = cls(
            sender_index=r.u32("sender_index"),
            receiver_index=r.u32("receiver_index"),
            epoch=r.u32("epoch"),
            random=r.fixed(RANDOM_SIZE, "random"),
            ct=r.bytes16("ct"),
            x25519_pub=r.bytes8("x25519_pub"),
            signature=r.bytes16("signature"),
            confirm=r.fixed(CONFIRM_SIZE, "confirm"),
        )
        r.end()
        return msg


@dataclass(frozen=True)
class _Confirm:
    """Layout shared by M3 and R3: version, receiver_index(4), epoch(4), confirm(32)."""

    TYPE: ClassVar[int] = 0
    NAME: ClassVar[str] = ""
    receiver_index: int
    epoch: int
    confirm: bytes = bytes(CONFIRM_SIZE)

    def confirmed_part(self) -> bytes:
        """Return the encoding of every field before ``confirm``."""
        return Writer().u8(PROTOCOL_VERSION).u32(self.receiver_index).u32(self.epoch).getvalue()

    def encode(self) -> bytes:
        """Return the full message."""
        return self.confirmed_part() + self.confirm

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Parse the message; raise ``RemoteProtocolError`` if malformed."""
        r = Reader(data, cls.NAME)
        _version(r)
        msg = cls(r.u32("receiver_index"), r.u32("epoch"), r.fixed(CONFIRM_SIZE, "confirm"))
        r.end()
        return msg


@dataclass(frozen=True)
class InitConfirm(_Confirm):
    """M3: the master's key confirmation; the slave may send on the new epoch after it."""

    TYPE: ClassVar[int] = 3
    NAME: ClassVar[str] = "M3"


@dataclass(frozen=True)
class RatchetRequest:
    """R1: the master asks for a QKD ratchet step; MAC under the current chaining key."""

    TYPE: ClassVar[int] = 4
    receiver_index: int
    sender_index: int
    epoch: int
    key_ids: tuple[str, ...]
    mac: bytes = bytes(CONFIRM_SIZE)

    def mac_part(self) -> bytes:
        """Return the encoding of every field before ``mac``."""
        w = Writer().u8(PROTOCOL_VERSION).u32(self.receiver_index).u32(self.sender_index).u32(self.epoch)
        _write_key_ids(w, self.key_ids)
        return w.getvalue()

    def encode(self) -> bytes:
        """Return the full message."""
        return self.mac_part() + self.mac

    @classmethod
    def parse(cls, data: bytes) -> RatchetRequest:
        """Parse R1; raise ``RemoteProtocolError`` if malformed."""
        r = Reader(data, "R1")
        _version(r)
        msg = cls(
            receiver_index=r.u32("receiver_index"),
            sender_index=r.u32("sender_index"),
            epoch=r.u32("epoch"),
            key_ids=_read_key_ids(r),
            mac=r.fixed(CONFIRM_SIZE, "mac"),
        )
        r.end()
        return msg


@dataclass(frozen=True)
class RatchetResponse:
    """R2: the slave installed the next epoch; confirmation under the new keys."""

    TYPE: ClassVar[int] = 5
    receiver_index: int
    sender_index: int
    epoch: int
    confirm: bytes = bytes(CONFIRM_SIZE)

    def confirmed_part(self) -> bytes:
        """Return the encoding of every field before ``confirm``."""
        w = Writer().u8(PROTOCOL_VERSION).u32(self.receiver_index).u32(self.sender_index)
        return w.u32(self.epoch).getvalue()

    def encode(self) -> bytes:
        """Return the full message."""
        return self.confirmed_part() + self.confirm

    @classmethod
    def parse(cls, data: bytes) -> RatchetResponse:
        """Parse R2; raise ``RemoteProtocolError`` if malformed."""
        r = Reader(data, "R2")
        _version(r)
        msg = cls(r.u32("receiver_index"), r.u32("sender_index"), r.u32("epoch"), r.fixed(CONFIRM_SIZE, "c"))
        r.end()
        return msg


@dataclass(frozen=True)
class RatchetConfirm(_Confirm):
    """R3: the master switched to the new epoch; the slave may send on it."""

    TYPE: ClassVar[int] = 6
    NAME: ClassVar[str] = "R3"


@dataclass(frozen=True)
class Kick:
    """The slave's signed request for a fresh handshake, with the reason (KICK_* below)."""

    TYPE: ClassVar[int] = 7
    timestamp: int
    master_sae: str
    slave_sae: str
    reason: int = 0
    signature: bytes = b""

    def signed_part(self) -> bytes:
        """Return the encoding of every field before ``signature``."""
        w = Writer().u8(PROTOCOL_VERSION).u64(self.timestamp)
        return w.str8(self.master_sae).str8(self.slave_sae).u8(self.reason).getvalue()

    def encode(self) -> bytes:
        """Return the full message."""
        return self.signed_part() + Writer().bytes16(self.signature).getvalue()

    @classmethod
    def parse(cls, data: bytes) -> Kick:
        """Parse a Kick; raise ``RemoteProtocolError`` if malformed."""
        r = Reader(data, "Kick")
        _version(r)
        msg = cls(
            r.u64("timestamp"), r.str8("master_sae"), r.str8("slave_sae"), r.u8("reason"), r.bytes16("sig")
        )
        if msg.reason not in KICK_REASONS:
            raise RemoteProtocolError(f"Kick: unknown reason {msg.reason}")
        r.end()
        return msg


Message = InitHello | RespHello | InitConfirm | RatchetRequest | RatchetResponse | RatchetConfirm | Kick


MESSAGE_TYPES: Final[dict[int, type[Message]]] = {
    cls.TYPE: cls
    for cls in (InitHello, RespHello, InitConfirm, RatchetRequest, RatchetResponse, RatchetConfirm, Kick)
}


def parse_message(msg_type: int, data: bytes) -> Message:
    """Parse a reassembled handshake-class message of wire type ``msg_type``.

    Raises:
        RemoteProtocolError: unknown type or malformed body.
    """
    cls = MESSAGE_TYPES.get(msg_type)
    if cls is None:
        raise RemoteProtocolError(f"unknown handshake message type {msg_type}")
    return cls.parse(data)
