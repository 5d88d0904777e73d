"""Valid seed inputs for the parser fuzzer (bench/fuzz.py, tests/test_fuzz_short.py), from qgate's encoders.

* handshake messages of every type (``qgate.protocol.messages``, protocol version 2) at
  ML-KEM-768/ML-DSA-65 and ML-KEM-1024/ML-DSA-87 sizes, their fragments (``fragment_message``) with
  the mac1 || mac2 trailer (``guard.add_macs``), Retries answering them (``guard.seal_retry``), and
  the integer fields (length prefixes, counts, header fields) of each for length-field mutations;
* data packets sealed by an ``EpochSet`` with fixed keys, and a receiver with previous, current and
  next epochs (docs/protocol.md section 6);
* ETSI GS QKD 014 JSON answers (section 6.1 Status example, Key containers, Error bodies);
* IPv4/IPv6 inner packets and a route table; the lab policy ``policies/site-a.yaml``.

Everything is deterministic for a given ``random.Random``: field contents are fixed-seed bytes of
the right sizes (the parsers check form, not cryptography).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import random
import re
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qgate.constants import CHALLENGE_SIZE, RETRY_NONCE_SIZE
from qgate.crypto.secret import Secret
from qgate.dataplane.offload import VNET_F_NEEDS_CSUM, VnetHeader, fold, split_tso, sum16
from qgate.dataplane.routing import RouteTable
from qgate.protocol import guard
from qgate.protocol import messages as m
from qgate.protocol.epoch import Epoch, EpochSet
from qgate.protocol.wire import fragment_message, parse_fragment

REPO: Final = Path(__file__).resolve().parent.parent
Fields = tuple[tuple[int, int], ...]
"""Integer fields of a sample as ``(offset, width in bytes)``: length prefixes, counts, header fields."""


@dataclass(frozen=True)
class Sample:
    """A valid input and the offsets of its integer fields (for length-field tweaks)."""

    data: bytes
    fields: Fields = ()


# --- protocol samples -------------------------------------------------------------------------------

_LAYOUTS: Final[dict[int, tuple[str, ...]]] = {  # protocol version 2 (qgate.protocol.messages)
    1: ("u8", "u8", "u8", "u16", "u32", "u32", "f32", "f32", "f32", "f16", "s8", "s8", "s8", "b16", "b8",
        "ids", "b16"),
    2: ("u8", "u32", "u32", "u32", "f32", "f32", "b16", "b8", "b16", "f32"),
    3: ("u8", "u32", "u32", "f32"),
    4: ("u8", "u32", "u32", "u32", "f32", "ids", "f32"),
    5: ("u8", "u32", "u32", "u32", "f32"),
    6: ("u8", "u32", "u32", "f32"),
    7: ("u8", "s8", "s8", "u8", "f32", "f32", "b16"),
}  # fmt: skip
"""Field kinds per message type: ``uN`` integer, ``fN`` N fixed bytes, ``s8``/``b8``/``b16`` prefixed."""


def message_fields(msg_type: int, data: bytes, shift: int = 0) -> Fields:
    """Return the integer fields of an encoded message (docs/protocol.md section 3.2), offsets + ``shift``."""
    pos, out = 0, []
    for kind in _LAYOUTS[msg_type]:
        if kind[0] == "u":
            width = int(kind[1:]) // 8
            out.append((pos, width))
            pos += width
        elif kind[0] == "f":
            pos += int(kind[1:])
        elif kind in ("s8", "b8"):
            out.append((pos, 1))
            pos += 1 + data[pos]
        elif kind == "b16":
            out.append((pos, 2))
            pos += 2 + int.from_bytes(data[pos : pos + 2], "big")
        else:  # key_ids: count then str8 each
            out.append((pos, 1))
            count, pos = data[pos], pos + 1
            for _ in range(count):
                out.append((pos, 1))
                pos += 1 + data[pos]
    assert pos == len(data), f"layout of message type {msg_type} does not cover the encoding"
    return tuple((offset + shift, width) for offset, width in out)


def build_messages(rng: random.Random) -> list[m.Message]:
    """Return valid version-2 messages of every type: ML-KEM-768/ML-DSA-65 and ML-KEM-1024/ML-DSA-87 sizes.

    Field contents are deterministic bytes of the right sizes (the parsers check form, not crypto);
    the set includes a degraded M1 (no key_IDs, an anchor_id) and an M1 naming a PPK.
    """

    def ids(n: int) -> tuple[str, ...]:
        return tuple(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n))

    def u32() -> int:
        return rng.getrandbits(32) | 1

    out: list[m.Message] = []
    variants = ((2, 1184, 1088, 3309, True, 1, ""), (3, 1568, 1568, 4627, False, 3, "ppk-2026"))
    for kem_id, ek, ct, sig, x_on, n_ids, ppk_id in variants:
        xpub = rng.randbytes(32) if x_on else b""
        for key_ids, anchor in ((ids(n_ids), m.NO_ANCHOR), ((), rng.randbytes(m.ANCHOR_ID_SIZE))):
            out.append(
                m.InitHello(
                    kem_id=kem_id,
                    x25519=x_on,
                    qkd_bits=256,
                    sender_index=u32(),
                    epoch=7,
                    random=rng.randbytes(32),
                    echo=rng.choice((m.NO_CHALLENGE, rng.randbytes(CHALLENGE_SIZE))),
                    challenge=rng.randbytes(CHALLENGE_SIZE),
                    anchor_id=anchor,
                    ppk_id=ppk_id,
                    master_sae="SAE_A",
                    slave_sae="SAE_B",
                    ek=rng.randbytes(ek),
                    x25519_pub=xpub,
                    key_ids=key_ids,
                    signature=rng.randbytes(sig),
                )
            )
        out.append(m.RespHello(u32(), u32(), 7, rng.randbytes(32), rng.randbytes(CHALLENGE_SIZE),
                               rng.randbytes(ct), xpub, rng.randbytes(sig), rng.randbytes(32)))  # fmt: skip
        for reason in sorted(m.KICK_REASONS):
            echo = rng.choice((m.NO_CHALLENGE, rng.randbytes(CHALLENGE_SIZE)))
            out.append(
                m.Kick("SAE_A", "SAE_B", reason, echo, rng.randbytes(CHALLENGE_SIZE), rng.randbytes(sig))
            )
        out.append(
            m.RatchetRequest(u32(), u32(), 8, rng.randbytes(CHALLENGE_SIZE), ids(n_ids), rng.randbytes(32))
        )
    out += [m.InitConfirm(u32(), 7, rng.randbytes(32)), m.RatchetResponse(u32(), u32(), 8, rng.randbytes(32))]
    out += [
        m.RatchetConfirm(u32(), 8, rng.randbytes(32)),
        m.RatchetRequest(u32(), u32(), 1, bytes(CHALLENGE_SIZE), ("k",), bytes(32)),
    ]
    return out


# The corpus receiver's identity and challenges (docs/protocol.md 2.3): fragments carry its mac1 and a
# mac2 under one of its challenges (or none), Retries are sealed by the corpus sender.
CORPUS_RECEIVER_PK: Final = hashlib.shake_256(b"qgate fuzz corpus: receiver public key").digest(1952)
CORPUS_SENDER_PK: Final = hashlib.shake_256(b"qgate fuzz corpus: sender public key").digest(1952)
CORPUS_CHALLENGES: Final = tuple(
    hashlib.shake_256(b"qgate fuzz corpus: challenge %d" % i).digest(CHALLENGE_SIZE) for i in range(3)
)


def fragment_samples(msgs: Sequence[m.Message], rng: random.Random) -> list[Sample]:
    """Return every fragment of every message with its 32-byte mac1 || mac2 trailer (``guard.add_macs``).

    mac1 is for ``CORPUS_RECEIVER_PK``; mac2 under one of ``CORPUS_CHALLENGES`` or zero (no
    challenge known). Fields: the fragment header and, within the fragment, the message's fields.
    """
    header: Fields = ((0, 1), (1, 1), (2, 1), (3, 1), (4, 4), (8, 4))
    mac1_key = guard.mac1_key(CORPUS_RECEIVER_PK)
    out = []
    for msg in msgs:
        encoded = msg.encode()
        inner = message_fields(msg.TYPE, encoded, shift=12)
        challenge = rng.choice((None, *CORPUS_CHALLENGES))
        for frag in fragment_message(msg.TYPE, encoded, rng.getrandbits(32), rng.getrandbits(32)):
            datagram = guard.add_macs(frag, peer_mac1_key=mac1_key, peer_challenge=challenge)
            out.append(Sample(datagram, header + tuple(f for f in inner if f[0] < len(frag))))
    return out


RETRY_FIELDS: Final[Fields] = ((0, 1), (1, 3), (4, 4), (8, 4), (12, 1), (13, 3))
"""type, reserved, steering hint, message_id, index, reserved of the 76-byte Retry (guard.py)."""


@dataclass(frozen=True)
class RetryCorpus:
    """Retries the corpus sender sealed for fragments of the corpus, and how to open them.

    Attributes:
        samples: the Retry datagrams (72 bytes each).
        answered: mac1 of the fragment each ``(message_id, index)`` names (what the receiver sent).
        retry_key: ``guard.retry_key(CORPUS_SENDER_PK)``.
    """

    samples: list[Sample]
    answered: dict[tuple[int, int], bytes]
    retry_key: bytes

    @classmethod
    def build(cls, fragments: Sequence[Sample], rng: random.Random) -> RetryCorpus:
        key = guard.retry_key(CORPUS_SENDER_PK)
        samples, answered = [], {}
        for frag in fragments:
            parsed = parse_fragment(frag.data)
            mac1 = guard.fragment_mac1(frag.data)
            answered[(parsed.message_id, parsed.index)] = mac1
            retry = guard.seal_retry(message_id=parsed.message_id, index=parsed.index, answered_mac1=mac1,
                                     challenge=rng.choice(CORPUS_CHALLENGES), my_retry_key=key,
                                     nonce=rng.randbytes(RETRY_NONCE_SIZE))  # fmt: skip
            samples.append(Sample(retry, RETRY_FIELDS))
        return cls(samples, answered, key)


def _epoch(index: int, key: bytes, *, peer_index: int) -> Epoch:
    return Epoch(number=1, my_index=index, peer_index=peer_index, send_key=Secret(key), recv_key=Secret(key),
                 chaining_key=Secret(bytes(48)), created_at=0.0, kind="hs", key_ids=("k",))  # fmt: skip


@dataclass
class EpochPair:
    """Fixed-key senders and one receiver with previous, current and next epochs (docs/protocol.md 6)."""

    receiver: EpochSet
    senders: list[EpochSet]

    @classmethod
    def build(cls) -> EpochPair:
        specs = [(0x0C0C0C0C, bytes(range(32))), (0x0A0A0A0A, bytes(range(32, 64))), (0x0B0B0B0B, bytes(32))]
        receiver = EpochSet(max_key_age=1e9)
        receiver.install_current(_epoch(specs[0][0], specs[0][1], peer_index=1), 0.0)
        receiver.install_current(_epoch(specs[1][0], specs[1][1], peer_index=2), 0.0)  # first -> previous
        receiver.install_next(_epoch(specs[2][0], specs[2][1], peer_index=3))
        senders = []
        for index, key in specs:
            sender = EpochSet(max_key_age=1e9)
            sender.install_current(_epoch(0x77777777, key, peer_index=index), 0.0)
            senders.append(sender)
        return cls(receiver, senders)

    def seal(self, rng: random.Random) -> bytes:
        payload = rng.choice((b"", rng.randbytes(20), rng.randbytes(rng.randint(0, 1400))))
        packet = rng.choice(self.senders).seal(payload, 0.5)
        assert packet is not None
        return packet


DATA_FIELDS: Final[Fields] = ((0, 1), (1, 3), (4, 4), (8, 8))


def ip_samples(rng: random.Random) -> list[Sample]:
    """Return IPv4 (with and without options) and IPv6 packets with their header fields."""
    out = []
    for src, dst, extra in (("10.2.0.2", "10.1.0.2", b""), ("10.1.0.2", "10.2.0.9", b"\x01" * 4)):
        body = rng.randbytes(rng.randint(0, 80))
        ihl = 5 + len(extra) // 4
        head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(extra) + len(body), 1, 0, 64, 17, 0,
                           ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)  # fmt: skip
        out.append(Sample(head + extra + body, ((0, 1), (2, 2), (12, 4), (16, 4))))
    for src, dst in (("fd00::2", "fd00:1::9"), ("2001:db8::1", "fd00::1")):
        body = rng.randbytes(rng.randint(0, 80))
        head = struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, 64,
                           ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)  # fmt: skip
        out.append(Sample(head + body, ((0, 1), (4, 2), (8, 8), (16, 8), (24, 8), (32, 8))))
    return out


def route_table() -> RouteTable[str]:
    """A table like a gateway's: one peer's subnets (v4 and v6), nested prefixes, a default."""
    nets = [("10.2.0.0/24", "b"), ("10.0.0.0/8", "wide"), ("fd00::/64", "v6"), ("0.0.0.0/0", "default")]
    return RouteTable((ipaddress.ip_network(net), value) for net, value in nets)


# --- ETSI GS QKD 014 JSON ---------------------------------------------------------------------------

ID1: Final = "550e8400-e29b-41d4-a716-446655440000"
ID2: Final = "bc490419-7d60-487f-adc1-4ddcc177c139"
SLAVE_SAE: Final = "MMMMNNNNOOOOPPPP"
STATUS_EXAMPLE: Final[dict[str, object]] = {  # ETSI GS QKD 014 section 6.1 example values
    "source_KME_ID": "AAAABBBBCCCCDDDD", "target_KME_ID": "EEEEFFFFGGGGHHHH",
    "master_SAE_ID": "IIIIJJJJKKKKLLLL", "slave_SAE_ID": SLAVE_SAE, "key_size": 352,
    "stored_key_count": 25000, "max_key_count": 100000, "max_key_per_request": 128,
    "max_key_size": 1024, "min_key_size": 64, "max_SAE_ID_count": 0,
}  # fmt: skip


def _entries(entries: Sequence[tuple[str, bytes]]) -> list[dict[str, object]]:
    return [{"key_ID": key_id, "key": base64.b64encode(raw).decode()} for key_id, raw in entries]


def _container(entries: Sequence[tuple[str, bytes]], **extra: object) -> object:
    return {"keys": _entries(entries), **extra}


def etsi_objects(rng: random.Random) -> dict[str, list[object]]:
    """Return valid JSON answers per ETSI 014 parser (containers answer number=2, size=256 / ID1, ID2)."""
    two = [(ID1, rng.randbytes(32)), (ID2, rng.randbytes(32))]
    containers: list[object] = [
        _container(two),
        _container(two[::-1], key_container_extension={"v": 1}),
        {"keys": [{**entry, "key_ID_extension": {}, "key_extension": {"x": [1]}} for entry in _entries(two)]},
    ]
    status: list[object] = [dict(STATUS_EXAMPLE), {**STATUS_EXAMPLE, "status_extension": {"vendor": 1}}]
    errors: list[object] = [
        {"message": "key not found", "details": [{"message": "key_ID unknown"}]},
        {"message": "bad request format"},
    ]
    return {"status": status, "keys": containers, "error": errors}


def policy_texts() -> list[str]:
    """The lab's site-a policy, as written and without comments and blank lines."""
    text = (REPO / "policies" / "site-a.yaml").read_text()
    bare = [re.sub(r"\s+#.*$|^#.*$", "", line) for line in text.splitlines()]
    return [text, "\n".join(line for line in bare if line.strip()) + "\n"]


# --- data-plane samples ---------------------------------------------------------------------------

_VNET_FIELDS: Final[Fields] = ((0, 1), (1, 1), (2, 2), (4, 2), (6, 2), (8, 2))
"""flags, gso_type, hdr_len, gso_size, csum_start, csum_offset of the 10-byte virtio-net header."""


def super_packet(
    rng: random.Random, version: int, proto: int, payload: int, mss: int, tcp_options: bytes = b""
) -> bytes:
    """``virtio_net_hdr || packet`` as a TUN with TSO/USO hands it over (partial checksum).

    Args:
        version: 4 or 6; proto: 6 (TCP, ACK|PSH) or 17 (UDP); payload, mss: bytes.
        tcp_options: TCP options (a multiple of 4 bytes), e.g. a timestamp as Linux sends it.
    """
    ip_hlen, l4_hlen = (20, 20 + len(tcp_options)) if proto == 6 else (20, 8)
    if version == 6:
        ip_hlen = 40
    body = rng.randbytes(payload)
    l4_len = l4_hlen + payload
    if proto == 6:
        offset = (l4_hlen // 4) << 4
        l4 = struct.pack("!HHIIBBHHH", 40000, 5201, rng.getrandbits(32), 7, offset, 0x18, 500, 0, 0)
        l4 += tcp_options
    else:
        l4 = struct.pack("!HHHH", 5000, 6000, l4_len, 0)
    if version == 4:
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + l4_len, 9, 0x4000, 64, proto, 0,
                                   bytes((10, 1, 0, 2)), bytes((10, 2, 0, 2))))  # fmt: skip
        addr = sum16(ip[12:20])
    else:
        ip = bytearray(struct.pack("!IHBB16s16s", 0x60000000, l4_len, proto, 64, b"\xfd" + bytes(15),
                                   b"\xfd" + bytes(14) + b"\x02"))  # fmt: skip
        addr = sum16(ip[8:40])
    at = 16 if proto == 6 else 6
    l4b = bytearray(l4)
    l4b[at : at + 2] = fold(addr + proto + l4_len).to_bytes(2, "big")
    gso = (1 if version == 4 else 4) if proto == 6 else 5
    vnet = VnetHeader(VNET_F_NEEDS_CSUM, gso, ip_hlen + l4_hlen, mss, ip_hlen, at).pack()
    return vnet + bytes(ip) + bytes(l4b) + body


def offload_samples(rng: random.Random) -> list[Sample]:
    """TUN reads for ``split_tso``: TSO (IPv4, IPv6), USO, one-segment GSO and a plain packet."""
    ip_fields = tuple((10 + a, n) for a, n in ((0, 1), (2, 2), (6, 2), (9, 1), (20, 2), (24, 2), (32, 1)))
    out = [
        Sample(super_packet(rng, 4, 6, 3000, 1000), _VNET_FIELDS + ip_fields),
        Sample(super_packet(rng, 6, 6, 2500, 700), _VNET_FIELDS + ip_fields),
        Sample(super_packet(rng, 4, 17, 2400, 600), _VNET_FIELDS + ip_fields),
        Sample(super_packet(rng, 4, 6, 500, 1000), _VNET_FIELDS + ip_fields),
    ]
    out += [Sample(bytes(10) + s.data, s.fields) for s in ip_samples(rng)]
    return out


def coalesce_samples(rng: random.Random) -> list[Sample]:
    """Batches of opened packets for ``coalesce``, each packet behind a 2-byte length prefix."""
    out = []
    for version, proto in ((4, 6), (4, 17), (6, 6)):
        raw_read = super_packet(rng, version, proto, 4000, 1000)
        packets = split_tso(VnetHeader._make(struct.unpack("<BBHHHH", raw_read[:10])), raw_read[10:])
        packets += [s.data for s in ip_samples(rng)[:2]]
        if rng.random() < 0.3:
            rng.shuffle(packets)
        data, fields = b"", []
        for packet in packets:
            fields.append((len(data), 2))
            data += len(packet).to_bytes(2, "big") + packet
        out.append(Sample(data, tuple(fields)))
    return out
