"""Handshake-class messages of the qgate protocol (version 2): layouts, encoding and parsing.

Layouts (docs/protocol.md section 3); integers big-endian; ``bytes16`` = 2-byte length
prefix, ``str8`` = 1-byte length + ASCII. Every message starts with ``version(1)`` = 2.
``echo`` is the receiver's challenge being answered, ``challenge`` the sender's own for the
receiver's next request (32 bytes each; ``qgate.protocol.guard``).

* M1 InitHello (master -> slave, type 1): version, kem_id(1), x25519(1), qkd_bits(2),
  sender_index(4), epoch(4), random(32), echo(32), challenge(32), anchor_id(16), ppk_id str8,
  master_sae str8, slave_sae str8, ek bytes16, x25519_pub bytes8, key_ids (count(1), str8 each),
  signature bytes16. A key_ID count of 0 is a degraded handshake without a QKD key (HS-D).
* M2 RespHello (slave -> master, type 2): version, sender_index(4), receiver_index(4), epoch(4),
  random(32), challenge(32), ct bytes16, x25519_pub bytes8, signature bytes16, confirm(32).
* M3 InitConfirm (type 3): version, receiver_index(4), epoch(4), confirm(32).
* R1 RatchetRequest (master -> slave, type 4): version, receiver_index(4), sender_index(4),
  epoch(4), challenge(32), key_ids, mac(32).
* R2 RatchetResponse (type 5): version, receiver_index(4), sender_index(4), epoch(4), confirm(32).
* R3 RatchetConfirm (type 6): version, receiver_index(4), epoch(4), confirm(32).
* Kick (slave -> master, type 7): version, master_sae str8, slave_sae str8, reason(1), echo(32),
  challenge(32), signature bytes16. Asks the master for a fresh handshake: 0 no usable session,
  1 the slave's KME could not deliver a QKD key an M1/R1 named.

Parsers raise only ``RemoteProtocolError`` (malformed input); authentication is the state
machine's job (``qgate.protocol.peer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final, Self

from qgate.constants import CHALLENGE_SIZE, CONFIRM_SIZE, PROTOCOL_VERSION
from qgate.errors import RemoteProtocolError
from qgate.protocol.codec import Reader, Writer

KICK_NO_SESSION: Final = 0
"""Kick reason: the slave has no usable epoch (start, restart, or its keys expired)."""
KICK_QKD_UNAVAILABLE: Final = 1
"""Kick reason: the slave's KME could not deliver the QKD key a handshake or ratchet named."""
KICK_KEY_REJECTED: Final = 2
"""Kick reason: the slave's KME answered and refused the key_IDs an M1 or R1 named (unknown,
consumed or expired there), so the master's other keys from that ``enc_keys`` may be dead too."""
KICK_REASONS: Final = frozenset({KICK_NO_SESSION, KICK_QKD_UNAVAILABLE, KICK_KEY_REJECTED})
ANCHOR_ID_SIZE: Final = 16
"""Bytes naming the QKD-backed chaining key a degraded handshake mixes in (zeros: none)."""
NO_ANCHOR: Final = bytes(ANCHOR_ID_SIZE)
NO_CHALLENGE: Final = bytes(CHALLENGE_SIZE)
"""An echo of all zeros: the sender knew no challenge of the receiver (answered with a Retry)."""

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
    sender_index: int
    epoch: int
    random: bytes
    echo: bytes
    challenge: bytes
    anchor_id: bytes
    ppk_id: str
    master_sae: str
    slave_sae: str
    ek: bytes
    x25519_pub: bytes
    key_ids: tuple[str, ...]
    signature: bytes = b""

    def signed_part(self) -> bytes:
        """Return the encoding of every field before ``signature``."""
        w = Writer().u8(PROTOCOL_VERSION).u8(self.kem_id).u8(int(self.x25519)).u16(self.qkd_bits)
        w.u32(self.sender_index).u32(self.epoch).fixed(self.random, RANDOM_SIZE)
        w.fixed(self.echo, CHALLENGE_SIZE).fixed(self.challenge, CHALLENGE_SIZE)
        w.fixed(self.anchor_id, ANCHOR_ID_SIZE).str8(self.ppk_id)
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
            sender_index=r.u32("sender_index"),
            epoch=r.u32("epoch"),
            random=r.fixed(RANDOM_SIZE, "random"),
            echo=r.fixed(CHALLENGE_SIZE, "echo"),
            challenge=r.fixed(CHALLENGE_SIZE, "challenge"),
            anchor_id=r.fixed(ANCHOR_ID_SIZE, "anchor_id"),
            ppk_id=r.str8("ppk_id"),
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
    challenge: bytes
    ct: bytes
    x25519_pub: bytes
    signature: bytes = b""
    confirm: bytes = bytes(CONFIRM_SIZE)

    def signed_part(self) -> bytes:
        """Return the encoding of every field before ``signature``."""
        w = Writer().u8(PROTOCOL_VERSION).u32(self.sender_index).u32(self.receiver_index)
        w.u32(self.epoch).fixed(self.random, RANDOM_SIZE).fixed(self.challenge, CHALLENGE_SIZE)
        w.bytes16(self.ct).bytes8(self.x25519_pub)
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
            challenge=r.fixed(CHALLENGE_SIZE, "challenge"),
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
    challenge: bytes
    key_ids: tuple[str, ...]
    mac: bytes = bytes(CONFIRM_SIZE)

    def mac_part(self) -> bytes:
        """Return the encoding of every field before ``mac``."""
        w = Writer().u8(PROTOCOL_VERSION).u32(self.receiver_index).u32(self.sender_index).u32(self.epoch)
        w.fixed(self.challenge, CHALLENGE_SIZE)
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
            challenge=r.fixed(CHALLENGE_SIZE, "challenge"),
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
    master_sae: str
    slave_sae: str
    reason: int
    echo: bytes
    challenge: bytes
    signature: bytes = b""

    def signed_part(self) -> bytes:
        """Return the encoding of every field before ``signature``."""
        w = Writer().u8(PROTOCOL_VERSION).str8(self.master_sae).str8(self.slave_sae).u8(self.reason)
        return w.fixed(self.echo, CHALLENGE_SIZE).fixed(self.challenge, CHALLENGE_SIZE).getvalue()

    def encode(self) -> bytes:
        """Return the full message."""
        return self.signed_part() + Writer().bytes16(self.signature).getvalue()

    @classmethod
    def parse(cls, data: bytes) -> Kick:
        """Parse a Kick; raise ``RemoteProtocolError`` if malformed."""
        r = Reader(data, "Kick")
        _version(r)
        msg = cls(
            r.str8("master_sae"),
            r.str8("slave_sae"),
            r.u8("reason"),
            r.fixed(CHALLENGE_SIZE, "echo"),
            r.fixed(CHALLENGE_SIZE, "challenge"),
            r.bytes16("signature"),
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
