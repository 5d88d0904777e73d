"""Mutation fuzzer: every qgate parser of outside input must raise only its documented error.

Each parser gets ``--cases`` inputs (default 100,000): mostly mutations of valid samples (bit flips,
byte insert/delete, truncation, splicing, length-field tweaks; for ETSI GS QKD 014 JSON also structural
mutations: type swaps, missing/extra fields, huge numbers, bad Base64; for the YAML policy token-level
mutations of ``policies/site-a.yaml``), plus some purely random inputs. Valid samples are built with the
real encoders (``qgate.protocol.messages`` version 2, ``fragment_message`` + ``guard.add_macs``,
``guard.seal_retry``, ``EpochSet.seal`` with fixed keys). The engines (``Peer``) get mutations of the
recorded run's datagrams, and fragments, whole messages and Retries made with the right mac1, mac2 and
Retry keys, so that input reaches reassembly, parsing, the challenge checks and ML-DSA.Verify.

Documented errors: ``RemoteProtocolError`` (wire, fragments, messages, reassembly); none for
``classify_datagram``, ``EpochSet.open`` (counted drops), ``parse_error_body``, routing,
``guard.parse_retry_head`` (None), ``guard.mac1_ok`` / ``mac2_ok`` (a bool) and the engines'
``receive_fragment`` / ``open`` (never raise); ``AuthenticationError`` for the Retry path
(``parse_retry_head``, then ``open_retry``); ``KmsBadAnswerError`` for the other ETSI 014 parsers;
``PolicyError`` for ``parse_policy``. Anything else, a case running longer than ``--case-timeout``
seconds, or a broken invariant (accepted message that does not re-encode to the same bytes, a drop not
counted exactly once, a forged mac or Retry accepted, an engine answering a datagram that fails mac1)
is *undocumented*.

Reproducible: every parser draws from ``random.Random(f"{seed}:{name}")``; the first failures of each
kind are printed with the input hex and traceback. Summary on stderr; ``--json`` prints one JSON line
last on stdout: ``{"parsers": {name: {"cases", "documented_errors", "accepted", "undocumented"}},
"ok": bool, "seed": int, "seconds": float}``. Exit status 1 if anything undocumented happened.

Usage: ``.venv/bin/python bench/fuzz.py [--cases N] [--seed S] [--only NAME] [--json]``
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repo's ``tests/fuzz_corpus.py`` importable
    sys.path.insert(0, str(REPO))
if str(REPO / "tests") not in sys.path:  # and the test providers the recorded engines use
    sys.path.insert(1, str(REPO / "tests"))

from qgate.constants import (  # noqa: E402
    CHALLENGE_SIZE,
    FRAGMENT_COUNT_MAX,
    FRAGMENT_MAC_SIZE,
    FRAGMENT_PAYLOAD_MAX,
    FRAGMENT_TRAILER_SIZE,
    MSG_DATA,
    MSG_RETRY,
    RETRY_NONCE_SIZE,
    RETRY_SIZE,
)
from qgate.dataplane.coalesce import coalesce  # noqa: E402
from qgate.dataplane.offload import GSO_ECN, GSO_NONE, parse_vnet_header, split_tso, transport_checksum_ok  # noqa: E402
from qgate.dataplane.routing import RouteTable  # noqa: E402
from qgate.errors import (  # noqa: E402
    AuthenticationError,
    DataPlaneError,
    KmsBadAnswerError,
    KmsExhaustedError,
    PolicyError,
    RemoteProtocolError,
)
from qgate.kms import etsi014  # noqa: E402
from qgate.policy import parse_policy  # noqa: E402
from qgate.protocol import guard  # noqa: E402
from qgate.protocol import messages as m  # noqa: E402
from qgate.protocol.peer import Peer, SendDatagram  # noqa: E402
from qgate.protocol.wire import (  # noqa: E402
    Reassembler,
    classify_datagram,
    fragment_message,
    parse_data_header,
    parse_fragment,
)
from tests.fuzz_corpus import (  # noqa: E402
    CORPUS_CHALLENGES,
    CORPUS_RECEIVER_PK,
    DATA_FIELDS,
    ID1,
    ID2,
    RETRY_FIELDS,
    SLAVE_SAE,
    EpochPair,
    RetryCorpus,
    Sample,
    build_messages,
    coalesce_samples,
    etsi_objects,
    fragment_samples,
    ip_samples,
    message_fields,
    offload_samples,
    policy_texts,
    route_table,
)

DEFAULT_CASES: Final = 100_000
REPORTS_PER_PARSER: Final = 6


class InvariantError(Exception):
    """A parser accepted or dropped an input but broke a documented property (counted as undocumented)."""


class CaseTimeout(Exception):
    """One case ran longer than the per-case time limit (a hang is a bug too)."""


# --- byte-level mutations -------------------------------------------------------------------------

_INTERESTING: Final = (0, 1, 0x7F, 0x80, 0xFF)


def _tweak_field(rng: random.Random, buf: bytearray, sample: Sample) -> None:
    """Set one integer field (a length prefix, count or header value) to a boundary or nearby value."""
    if not sample.fields:
        offset, width = rng.randrange(max(1, len(buf))), rng.choice((1, 2, 4, 8))
    else:
        offset, width = rng.choice(sample.fields)
    if offset >= len(buf):
        return
    width = min(width, len(buf) - offset)
    top = (1 << (8 * width)) - 1
    value = int.from_bytes(buf[offset : offset + width], "big")
    value = rng.choice(
        (value + 1, value - 1, value + rng.randint(2, 64), value - rng.randint(2, 64), 0, 1, top, top - 1,
         top >> 1, len(buf), rng.getrandbits(8 * width), value * 2)
    )  # fmt: skip
    buf[offset : offset + width] = (value & top).to_bytes(width, "big")


def _mutate_once(rng: random.Random, buf: bytearray, sample: Sample, pool: Sequence[Sample]) -> bytearray:
    size = len(buf)
    op = rng.randrange(10)
    pos = rng.randrange(size + 1)
    if op == 0 and size:  # bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(size)
            buf[i] ^= 1 << rng.randrange(8)
    elif op == 1 and size:  # interesting byte
        buf[rng.randrange(size)] = rng.choice(_INTERESTING)
    elif op == 2:  # insert random bytes
        buf[pos:pos] = rng.randbytes(rng.choice((1, 1, 2, 4, rng.randint(1, 300))))
    elif op == 3 and size:  # delete a range
        del buf[pos : pos + rng.choice((1, 1, 2, 4, rng.randint(1, 300)))]
    elif op == 4:  # truncate
        del buf[rng.randrange(size + 1) :]
    elif op == 5 and size:  # duplicate a chunk
        start = rng.randrange(size)
        buf[pos:pos] = buf[start : start + rng.randint(1, 64)]
    elif op == 6:  # splice with another sample
        other = rng.choice(pool).data
        cut = rng.randrange(len(other) + 1)
        buf = buf[:pos] + other[cut:]
    elif op in (7, 8):  # length-field / header-field tweak
        _tweak_field(rng, buf, sample)
    elif size:  # overwrite a run with one byte
        run = rng.randint(1, 32)
        buf[pos : pos + run] = bytes([rng.choice(_INTERESTING)]) * len(buf[pos : pos + run])
    return buf


def mutate_bytes(rng: random.Random, pool: Sequence[Sample], *, keep: float = 0.03) -> bytes:
    """Return a mutation of a random sample of ``pool`` (sometimes the sample itself, or random bytes)."""
    roll = rng.random()
    sample = rng.choice(pool)
    if roll < keep:
        return sample.data
    if roll < keep + 0.05:
        return rng.randbytes(rng.choice((rng.randrange(64), rng.randrange(2 * len(sample.data) + 1))))
    buf = bytearray(sample.data)
    for _ in range(1 + min(int(rng.expovariate(0.7)), 7)):
        buf = _mutate_once(rng, buf, sample, pool)
    return bytes(buf)


_JSON_VALUES: Final[tuple[object, ...]] = (
    None, True, False, 0, -1, 1, 255, 256, 2**31, 2**63, 2**64 + 1, -(2**70), 1.5, 1e308, -0.0,
    "", " ", "x" * 129, "AAAA", "AA==", "AB==", "A===", "QUJD\n", "QUJD!", "-_-_", "\u00e9", "\ud800",
    "\x00", [], [None], {}, {"key_ID": ID1}, {"key_ID": ID1, "key": "AAAA"}, ID1, ID2, SLAVE_SAE,
)  # fmt: skip
_JSON_NAMES: Final = ("keys", "key", "key_ID", "message", "details", "key_size", "slave_SAE_ID",
                      "min_key_size", "status_extension", "key_extension", "x", "")  # fmt: skip


def _json_value(rng: random.Random) -> object:
    """A fresh copy of an interesting JSON value (the table itself is never mutated)."""
    return json.loads(json.dumps(rng.choice(_JSON_VALUES)))


def _slots(value: object) -> Iterator[tuple[dict[str, object] | list[object], str | int]]:
    """Yield ``(container, key)`` for every value position inside ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield value, key
            yield from _slots(item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield value, index
            yield from _slots(item)


def _mutate_string(rng: random.Random, text: str) -> str:
    """Bad Base64 and bad IDs: drop or add padding, odd characters, flipped last char, huge length."""
    ops: list[Callable[[], str]] = [
        lambda: text.rstrip("="), lambda: text + "=", lambda: text[:-1] + rng.choice("ABQRgw+/-_=!"),
        lambda: text.replace("+", "-").replace("/", "_"), lambda: text[: rng.randrange(len(text) + 1)],
        lambda: text + rng.choice((" ", "\n", "\t", "\u00e9", "\x7f")), lambda: text * rng.randint(2, 200),
        lambda: text[:2] + "\n" + text[2:], lambda: " " + text,
    ]  # fmt: skip
    return rng.choice(ops)()


def mutate_json_tree(rng: random.Random, root: object) -> object:
    """Apply 1-3 structural mutations (type swap, missing/extra field, list dup/drop, bad strings)."""
    root = json.loads(json.dumps(root))
    for _ in range(rng.randint(1, 3)):
        slots = list(_slots(root))
        if not slots or rng.random() < 0.05:
            root = _json_value(rng) if rng.random() < 0.8 else [root]
            continue
        holder, key = rng.choice(slots)
        current = holder[key]  # type: ignore[index]
        op = rng.randrange(6)
        if op == 0 and isinstance(current, str):
            holder[key] = _mutate_string(rng, current)  # type: ignore[index]
        elif op == 1 and isinstance(holder, dict):
            del holder[key]  # type: ignore[arg-type]
        elif op == 2 and isinstance(holder, dict):
            holder[rng.choice(_JSON_NAMES)] = _json_value(rng)
        elif op == 3 and isinstance(holder, list):
            holder.insert(rng.randrange(len(holder) + 1), json.loads(json.dumps(current)))
        elif op == 4 and isinstance(holder, list):
            del holder[key]  # type: ignore[arg-type]
        elif isinstance(current, int) and not isinstance(current, bool) and rng.random() < 0.5:
            holder[key] = rng.choice((current + 1, current - 1, current * 8, -current, current // 8))  # type: ignore[index]
        else:
            holder[key] = _json_value(rng)  # type: ignore[index]
    return root


_NUMBER: Final = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _mutate_json_text(rng: random.Random, text: str) -> str:
    """Text-level JSON abuse: duplicate names, huge numbers, NaN, deep nesting, BOM, trailing data."""
    op = rng.randrange(7)
    if op == 0 and text.startswith("{"):
        name = rng.choice(_JSON_NAMES)
        return '{"' + name + '":' + json.dumps(_json_value(rng)) + "," + text[1:]
    if op == 1:
        big = rng.choice(("9" * 30, "9" * 400, "1" * 5000, "1e400", "-1e400", "NaN", "Infinity", "1.0e-400"))
        return _NUMBER.sub(lambda _: big, text, count=rng.randint(1, 3))
    if op == 2:
        depth = rng.choice((10, 900, 5000, 100_000))
        return "[" * depth + text + "]" * rng.choice((depth, 0))
    if op == 3:
        return "\ufeff" + text
    if op == 4:
        return text + rng.choice((" ", "x", "{}", ",", "\x00"))
    if op == 5:
        return text.replace(",", rng.choice((",,", ", ", ",\n")), 1)
    return text.replace('"', "'", rng.randint(1, 4))


def json_generator(objects: Sequence[object]) -> Callable[[random.Random], bytes]:
    """Return a generator of mutated JSON bodies from valid ``objects``."""
    pool = [Sample(json.dumps(obj).encode()) for obj in objects]

    def generate(rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.25:
            return mutate_bytes(rng, pool)
        obj = mutate_json_tree(rng, rng.choice(objects)) if roll < 0.9 else rng.choice(objects)
        text = json.dumps(
            obj, ensure_ascii=rng.random() < 0.7, separators=rng.choice(((",", ":"), (", ", ": ")))
        )
        if rng.random() < 0.3:
            text = _mutate_json_text(rng, text)
        data = text.encode("utf-8", "surrogatepass")
        return mutate_bytes(rng, [Sample(data)], keep=0.0) if rng.random() < 0.15 else data

    return generate


# --- YAML policy --------------------------------------------------------------------------------------

_TOKEN: Final = re.compile(r"\s+|[A-Za-z0-9_./-]+|.", re.DOTALL)
_YAML_VALUES: Final = (
    "~", "null", "true", "yes", "no", "on", "0x1F", "0o17", "0b101", "1_000", "1:30", ".inf", "-.inf", ".nan",
    "1e999", "-0", "99999999999999999999999999", "[]", "{}", "[a, b]", "{a: 1}", '"a: b"', "''",
    "!!binary AAAA",
    "!!str 1", "!!int x", "!!int", "!!int ''", "!!float", "!!float abc", "!!bool maybe", "!!null x",
    "!!timestamp 2001-12-14", "!!set {a}", "!!omap [a: 1]", "!!python/object:os.system x", "!foo x", "&a x",
    "*a", "*undefined", "|", ">", "? x", "- x", '"\\x00"', '"\\u2028"', "%YAML 1.1", "---", "...", "::1",
    '"[::1]:51820"', "[::1]:51820", '"[::1]:0"', "10.2.0.0/33", "10.2.0.1/24", "::/0", "0.0.0.0:0",
    "255.255.255.255:1", "224.0.0.1:5", "https://[::1]:99999", "https://a@b", "https://x/api/v1/keys",
    "https://" + "a" * 40, "1.2.3.4:065535", "\t", "<<: *a", "\x00", "\u00e9", "\ud800", "#", "'", '"', "%",
)  # fmt: skip


def _mutate_lines(rng: random.Random, lines: list[str]) -> None:
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    op = rng.randrange(5)
    if op == 0:
        del lines[i]
    elif op == 1:
        lines.insert(j, lines[i])
    elif op == 2:
        lines[i], lines[j] = lines[j], lines[i]
    elif op == 3:
        lines[i] = rng.choice(("", " ", "  ", "\t", "   ")) + lines[i][rng.choice((0, 0, 1, 2)) :]
    else:
        key = rng.choice(("extra", "name", "<<", "peers", "rekey", "interval", "subnets", "? x"))
        lines.insert(j, " " * rng.choice((0, 2, 4, 6)) + f"{key}: {rng.choice(_YAML_VALUES)}")


def _mutate_tokens(rng: random.Random, tokens: list[str]) -> None:
    i, j = rng.randrange(len(tokens)), rng.randrange(len(tokens))
    values = [k for k in range(2, len(tokens)) if tokens[k - 2] == ":" and tokens[k - 1] == " "]
    if values and rng.random() < 0.5:  # half the time hit a value (``key: VALUE``), where types matter
        i = rng.choice(values)
    op = rng.randrange(6)
    if op == 0:
        del tokens[i]
    elif op == 1:
        tokens.insert(j, tokens[i])
    elif op == 2:
        tokens[i], tokens[j] = tokens[j], tokens[i]
    elif op == 3:
        tokens[i] = tokens[j]
    elif op == 4:
        tokens[i] = rng.choice(_YAML_VALUES)
    else:  # stretch: repeat a slice of the token (long names, hosts, numbers)
        word = tokens[i]
        start = rng.randrange(len(word))
        piece = word[start : start + rng.randint(1, 3)]
        tokens[i] = (
            word[:start] + piece * rng.randint(2, 40) + word[start:] + rng.choice(("", "_", "-", "!", "."))
        )


def policy_generator(texts: Sequence[str]) -> Callable[[random.Random], bytes]:
    """Return a generator of mutated policy YAML (token and line level), as UTF-8 bytes."""
    pool = [Sample(text.encode()) for text in texts]

    def generate(rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.02:
            return rng.choice(pool).data
        if roll < 0.15:
            return mutate_bytes(rng, pool, keep=0.0)
        text = rng.choice(texts)
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.3:
                lines = text.split("\n")
                _mutate_lines(rng, lines)
                text = "\n".join(lines)
            else:
                tokens = _TOKEN.findall(text)
                _mutate_tokens(rng, tokens)
                text = "".join(tokens)
        return text.encode("utf-8", "surrogatepass")

    return generate


# --- targets ------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One parser under test: an input generator, the call, and the exceptions its docs allow."""

    name: str
    documented: tuple[type[BaseException], ...]
    generate: Callable[[random.Random], bytes]
    call: Callable[[bytes], object]
    none_rejects: bool = False
    """True when a None result is the parser's documented rejection (a counted drop)."""
    coverage: Callable[[], dict[str, int]] | None = None
    """For engine targets: the engine's counters (``ControlStats``), to check how deep inputs reach."""


def _check_round_trip(msg: m.Message, data: bytes) -> None:
    if msg.encode() != data:
        raise InvariantError(f"{type(msg).__name__} accepted but does not re-encode to the same bytes")


def _message_call(cls: type[m.Message]) -> Callable[[bytes], object]:
    def call(data: bytes) -> object:
        msg = cls.parse(data)
        _check_round_trip(msg, data)
        return msg

    return call


def _parse_message_call(data: bytes) -> object:
    msg = m.parse_message(data[0] if data else 0, data[1:])
    _check_round_trip(msg, data[1:])
    return msg


def _classify_call(data: bytes) -> object:
    kind = classify_datagram(data)
    if kind not in ("data", "handshake", "retry", None):
        raise InvariantError(f"classify_datagram returned {kind!r}")
    return kind


def _reassembler_call() -> Callable[[bytes], object]:
    """Fragments of one source into one Reassembler (a new fragment every 10 ms), then parse_message."""
    reassembler = Reassembler()
    clock = [0.0]

    def call(data: bytes) -> object:
        clock[0] += 0.01
        done = reassembler.add(parse_fragment(data), clock[0])
        if len(reassembler) > 8:
            raise InvariantError(f"reassembler holds {len(reassembler)} partial messages")
        return None if done is None else m.parse_message(*done)

    return call


def _epoch_call(pair: EpochPair) -> Callable[[bytes], object]:
    """EpochSet.open never raises and counts every drop exactly once (docs/protocol.md section 6)."""
    stats = pair.receiver.stats

    def total() -> int:
        drops = sum(int(value) for name, value in vars(stats).items() if name.startswith("drops_"))
        return drops + stats.rx_packets

    def call(data: bytes) -> object:
        before = total()
        result = pair.receiver.open(data, 1.0)
        if total() != before + 1:
            raise InvariantError(f"open() moved the drop/receive counters by {total() - before}, not 1")
        return result

    return call


def _route_call(table: RouteTable[str], source: bool) -> Callable[[bytes], object]:
    def call(data: bytes) -> object:
        return table.for_source(data) if source else table.for_destination(data)

    return call


def _epoch_generator(pair: EpochPair, pool: list[Sample]) -> Callable[[random.Random], bytes]:
    def generate(rng: random.Random) -> bytes:
        if rng.random() < 0.4:
            fresh = Sample(pair.seal(rng), DATA_FIELDS)
            return fresh.data if rng.random() < 0.15 else mutate_bytes(rng, [fresh, *pool], keep=0.0)
        return mutate_bytes(rng, pool, keep=0.1)

    return generate


def _split_call(data: bytes) -> object:
    """``split_tso`` of ``virtio_net_hdr || packet``; every segment of a GSO read must checksum right."""
    vnet = parse_vnet_header(data[:10])
    segments = split_tso(vnet, data[10:])
    if vnet.gso_type & ~GSO_ECN != GSO_NONE and not all(transport_checksum_ok(s) for s in segments):
        raise InvariantError("split_tso accepted a GSO read and produced a segment with a bad checksum")
    return segments


def _coalesce_call(data: bytes) -> object:
    """``coalesce`` of length-prefixed packets; every merged packet must split back with good checksums."""
    packets, at = [], 0
    while at + 2 <= len(data):
        size = int.from_bytes(data[at : at + 2], "big")
        packets.append(data[at + 2 : at + 2 + size])
        at += 2 + size
    out = coalesce(packets, udp=True)
    if sum(1 for h, _ in out if h[1] == GSO_NONE) > len(packets):
        raise InvariantError("coalesce returned more packets than it was given")
    for header, packet in out:
        if header[1] == GSO_NONE:
            continue
        if not all(transport_checksum_ok(s) for s in split_tso(parse_vnet_header(header), packet)):
            raise InvariantError("a merged packet does not split back into packets with good checksums")
    return out


def _policy_call(data: bytes) -> object:
    return parse_policy(data.decode("utf-8", "surrogateescape"), source=Path("/etc/qgate/site-a.yaml"))


def build_targets() -> list[Target]:
    """Build every target with its seed samples (deterministic: fixed corpus seed)."""
    rng = random.Random("qgate-fuzz-corpus")
    msgs = build_messages(rng)
    pair = EpochPair.build()
    data_pool = [Sample(pair.seal(rng), DATA_FIELDS) for _ in range(12)]
    frags = fragment_samples(msgs, rng)
    wire = frags + data_pool
    by_type = {cls.TYPE: [Sample(x.encode(), message_fields(cls.TYPE, x.encode())) for x in msgs
                          if isinstance(x, cls)] for cls in m.MESSAGE_TYPES.values()}  # fmt: skip
    typed = [
        Sample(bytes([x.TYPE]) + x.encode(), ((0, 1), *message_fields(x.TYPE, x.encode(), 1))) for x in msgs
    ]
    ip, table = ip_samples(rng), route_table()
    json_objs = etsi_objects(rng)

    def gen(pool: list[Sample], keep: float = 0.03) -> Callable[[random.Random], bytes]:
        return lambda r: mutate_bytes(r, pool, keep=keep)

    proto = (RemoteProtocolError,)
    kms = (KmsBadAnswerError, KmsExhaustedError)  # a 200 with no key: "none now" (issue 11)
    targets = [
        Target("wire.parse_data_header", proto, gen(wire), parse_data_header),
        Target("wire.parse_fragment", proto, gen(wire), parse_fragment),
        Target("wire.classify_datagram", (), gen(wire), _classify_call, none_rejects=True),
        Target("wire.Reassembler", proto, gen(frags, keep=0.3), _reassembler_call()),
        Target("messages.parse_message", proto, gen(typed), _parse_message_call),
    ]
    for msg_type, cls in m.MESSAGE_TYPES.items():
        targets.append(
            Target(f"messages.{cls.__name__}.parse", proto, gen(by_type[msg_type]), _message_call(cls))
        )
    targets += [
        Target("epoch.EpochSet.open", (), _epoch_generator(pair, data_pool + frags[:4]), _epoch_call(pair),
               none_rejects=True),
        Target("etsi014.parse_status", kms, json_generator(json_objs["status"]),
               lambda d: etsi014.parse_status(d, slave_sae_id=SLAVE_SAE)),
        Target("etsi014.parse_enc_keys", kms, json_generator(json_objs["keys"]),
               lambda d: etsi014.parse_enc_keys(d, number=2, size_bits=256)),
        Target("etsi014.parse_dec_keys", kms, json_generator(json_objs["keys"]),
               lambda d: etsi014.parse_dec_keys(d, key_ids=(ID1, ID2), size_bits=256)),
        Target("etsi014.parse_key_container", kms, json_generator(json_objs["keys"]),
               etsi014.parse_key_container),
        Target("etsi014.parse_error_body", (), json_generator(json_objs["error"] + json_objs["status"]),
               etsi014.parse_error_body),
        Target("policy.parse_policy", (PolicyError,), policy_generator(policy_texts()), _policy_call),
        Target("routing.RouteTable.for_destination", (), gen(ip), _route_call(table, source=False)),
        Target("routing.RouteTable.for_source", (), gen(ip), _route_call(table, source=True)),
        Target("offload.split_tso", (DataPlaneError,), gen(offload_samples(rng), keep=0.1), _split_call),
        Target("coalesce.coalesce", (), gen(coalesce_samples(rng), keep=0.1), _coalesce_call),
    ]  # fmt: skip
    targets += _guard_targets(frags, rng)
    targets += _peer_targets(gen)
    return targets


def _batch(datagrams: Sequence[bytes]) -> bytes:
    """Join datagrams into one fuzz input: ``u16 length || datagram`` each (what one case delivers)."""
    return b"".join(len(d).to_bytes(2, "big") + d for d in datagrams)


def _unbatch(data: bytes) -> list[bytes]:
    out, at = [], 0
    while at + 2 <= len(data):
        size = int.from_bytes(data[at : at + 2], "big")
        out.append(data[at + 2 : at + 2 + size])
        at += 2 + size
    return out


@dataclass
class _EngineView:
    """What a sender knowing both public keys knows of one recorded engine (to make inputs it checks).

    Attributes:
        mac1_key: this engine's K_mac1 (fragments for it carry mac1 under this key).
        challenges: this engine's challenges, oldest first (the last is current).
        peer_challenges: the other side's challenges (what a Retry for this engine may bring).
        peer_retry_key: the other side's K_retry (Retries this engine can open).
        sent: the fragments this engine sent (Retries answer them).
        inbound: the messages this engine received in the recording.
    """

    mac1_key: bytes
    challenges: list[bytes]
    peer_challenges: list[bytes]
    peer_retry_key: bytes
    sent: list[bytes]
    inbound: list[m.Message]


def _engine_view(harness: Any, wire: list[Any], role: str) -> _EngineView:
    from tests.qgate_recorder import challenges_of, messages, receiver_of, sender_of

    other = "slave" if role == "master" else "master"

    def drawn(side: str) -> list[bytes]:
        return challenges_of(harness.engine_rngs[side].drawn, wire)

    return _EngineView(
        mac1_key=guard.mac1_key(harness.signer(role).public_bytes()),
        challenges=drawn(role),
        peer_challenges=drawn(other),
        peer_retry_key=guard.retry_key(harness.signer(other).public_bytes()),
        sent=[
            d.data
            for d in wire
            if sender_of(d.direction) == role and classify_datagram(d.data) == "handshake"
        ],
        inbound=[s.msg for s in messages(wire) if receiver_of(s.direction) == role],
    )


def _challenge(rng: random.Random, pool: Sequence[bytes]) -> bytes | None:
    """Mostly the current challenge, sometimes an older one, none, or a wrong one."""
    roll = rng.random()
    if roll < 0.6:
        return pool[-1]
    if roll < 0.75:
        return rng.choice(pool)
    return None if roll < 0.9 else rng.randbytes(CHALLENGE_SIZE)


def _remac(rng: random.Random, view: _EngineView, datagram: bytes) -> bytes:
    """Give a (mutated) fragment a valid mac1 and usually a valid mac2 for the engine, as a key holder can."""
    if len(datagram) <= FRAGMENT_TRAILER_SIZE:
        return datagram
    body = datagram[:-FRAGMENT_TRAILER_SIZE]
    return guard.add_macs(body, peer_mac1_key=view.mac1_key, peer_challenge=_challenge(rng, view.challenges))


def _vary_message(rng: random.Random, view: _EngineView, msg: m.Message) -> bytes:
    """A recorded message as is (a replay), with a fresh echo and a broken signature, or byte-mutated."""
    roll = rng.random()
    if roll < 0.3:
        return msg.encode()
    if roll < 0.7 and isinstance(msg, m.InitHello | m.Kick):  # reaches the budget and ML-DSA.Verify
        return replace(
            msg, echo=rng.choice(view.challenges), challenge=rng.randbytes(CHALLENGE_SIZE)
        ).encode()
    if roll < 0.7 and isinstance(msg, m.RatchetRequest | m.RespHello):
        return replace(msg, challenge=rng.randbytes(CHALLENGE_SIZE)).encode()
    encoded = msg.encode()
    return mutate_bytes(rng, [Sample(encoded, message_fields(msg.TYPE, encoded))], keep=0.0)


def _fragment_generator(view: _EngineView, raw: list[Sample]) -> Callable[[random.Random], bytes]:
    """Batches of datagrams for ``Peer.receive_fragment``: raw mutations, re-MACed fragments and
    messages (so they pass mac1/mac2 and reach reassembly, parsing and the state machine), and
    Retries sealed with the peer's key for fragments the engine sent (some then mutated)."""
    fragments = [s for s in raw if classify_datagram(s.data) == "handshake"]

    def generate(rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.25:
            return _batch([mutate_bytes(rng, raw, keep=0.1)])
        if roll < 0.55:
            return _batch([_remac(rng, view, mutate_bytes(rng, fragments, keep=0.1))])
        if roll < 0.85:
            msg = rng.choice(view.inbound)
            body = _vary_message(rng, view, msg)
            if not body or len(body) > FRAGMENT_COUNT_MAX * FRAGMENT_PAYLOAD_MAX:
                return _batch([body])
            datagrams = [_remac(rng, view, f + bytes(FRAGMENT_TRAILER_SIZE))
                         for f in fragment_message(msg.TYPE, body, rng.getrandbits(32))]  # fmt: skip
            if rng.random() < 0.2:  # reordered, duplicated or lost fragments
                datagrams = [rng.choice(datagrams) for _ in range(rng.randint(1, len(datagrams) + 1))]
            return _batch(datagrams)
        answered = rng.choice(view.sent)
        frag = parse_fragment(answered)
        challenge = _challenge(rng, view.peer_challenges) or rng.randbytes(CHALLENGE_SIZE)
        nonce = rng.randbytes(RETRY_NONCE_SIZE)
        retry = guard.seal_retry(message_id=frag.message_id, index=frag.index,
                                 answered_mac1=guard.fragment_mac1(answered), challenge=challenge,
                                 my_retry_key=view.peer_retry_key, nonce=nonce)  # fmt: skip
        if rng.random() < 0.3:
            retry = mutate_bytes(rng, [Sample(retry, RETRY_FIELDS)], keep=0.0)
        return _batch([retry])

    return generate


def _peer_targets(gen: Callable[..., Callable[[random.Random], bytes]]) -> list[Target]:
    """The protocol engines' entry points for outside datagrams: they never raise (docs/protocol.md s4).

    Inputs are mutations of the real datagrams of the recorded in-memory run (challenge exchange with
    Retries, handshake, ratchet, data; tests/qgate_recorder.py). Each target drives its own pair of
    engines, built at its first case, so ``--only`` reproduces a failure alone. Invariant: a datagram
    that is not a Retry and fails mac1 never makes the engine send anything.
    """
    from tests.qgate_recorder import Inputs, run_scenario  # deterministic engines (recorded vectors)

    wire: list[Any] = []
    inputs = Inputs()
    harness = run_scenario(inputs, wire.append)
    pool = [Sample(d.data) for d in wire]
    views = {role: _engine_view(harness, wire, role) for role in ("master", "slave")}
    now = inputs.data_2_at  # both engines hold live epochs at this time

    def engine(role: str) -> Callable[[], Peer]:
        built: list[Peer] = []

        def get() -> Peer:
            if not built:
                fresh = run_scenario(inputs, lambda datagram: None)
                built.append(fresh.master if role == "master" else fresh.slave)
            return built[0]

        return get

    def feed(peer_of: Callable[[], Peer]) -> Callable[[bytes], object]:
        def call(data: bytes) -> object:
            peer = peer_of()
            if data[:1] == bytes([MSG_DATA]):
                peer.open(data, now)
            else:
                peer.receive_fragment(data, now)
            peer.take_actions()
            return None

        return call

    def feed_fragments(role: str, peer_of: Callable[[], Peer]) -> Callable[[bytes], object]:
        view = views[role]

        def call(data: bytes) -> object:
            peer = peer_of()
            for datagram in _unbatch(data):
                peer.receive_fragment(datagram, now)
                sent = any(isinstance(a, SendDatagram) for a in peer.take_actions())
                if (
                    sent
                    and classify_datagram(datagram) != "retry"
                    and not guard.mac1_ok(datagram, view.mac1_key)
                ):
                    raise InvariantError("a datagram without a valid mac1 made the engine send")
            return None

        return call

    master_engine, slave_engine = engine("master"), engine("slave")
    return [
        Target("peer.master.receive", (), gen(pool, keep=0.1), feed(engine("master"))),
        Target("peer.slave.receive", (), gen(pool, keep=0.1), feed(engine("slave"))),
        Target("peer.master.receive_fragment", (), _fragment_generator(views["master"], pool),
               feed_fragments("master", master_engine), coverage=lambda: vars(master_engine().stats)),
        Target("peer.slave.receive_fragment", (), _fragment_generator(views["slave"], pool),
               feed_fragments("slave", slave_engine), coverage=lambda: vars(slave_engine().stats)),
    ]  # fmt: skip


def _retry_call(corpus: RetryCorpus) -> Callable[[bytes], object]:
    """The Retry path as ``Peer`` takes it: ``parse_retry_head`` (None: dropped), then ``open_retry``.

    Invariant: only a Retry the corpus sender sealed opens (AES-GCM over head, nonce and mac1).
    """
    genuine = {s.data for s in corpus.samples}
    fallback = next(iter(corpus.answered.values()))

    def call(data: bytes) -> object:
        head = guard.parse_retry_head(data)
        if head is None:
            return None
        sent = corpus.answered.get(head, fallback)  # unmatched: still try AES-GCM with some mac1
        challenge = guard.open_retry(data, sent_mac1=sent, peer_retry_key=corpus.retry_key)
        if data not in genuine or len(challenge) != CHALLENGE_SIZE:
            raise InvariantError("open_retry accepted a Retry the peer never sealed")
        return challenge

    return call


def _retry_head_call(data: bytes) -> object:
    head = guard.parse_retry_head(data)
    if head is not None and (len(data) != RETRY_SIZE or data[0] != MSG_RETRY or
                             head != (int.from_bytes(data[8:12], "big"), data[12])):  # fmt: skip
        raise InvariantError(f"parse_retry_head returned {head} for a datagram that does not say so")
    return head


def _mac_call(genuine: Sequence[Sample], which: int) -> Callable[[bytes], object]:
    """``guard.mac1_ok`` (which=1) or ``mac2_ok`` (which=2): a bool, never an exception.

    Invariant: mac1 passes only if everything before mac2 is a genuine fragment's, mac2 only for a
    genuine datagram (HMAC-SHA-384 forgeries do not happen by mutation).
    """
    whole = {s.data for s in genuine}
    prefixes = {s.data[:-FRAGMENT_MAC_SIZE] for s in genuine}
    mac1_key = guard.mac1_key(CORPUS_RECEIVER_PK)

    def call(data: bytes) -> object:
        ok = guard.mac1_ok(data, mac1_key) if which == 1 else guard.mac2_ok(data, list(CORPUS_CHALLENGES))
        if not isinstance(ok, bool):
            raise InvariantError(f"mac{which}_ok returned {ok!r}")
        if ok and (data[:-FRAGMENT_MAC_SIZE] not in prefixes if which == 1 else data not in whole):
            raise InvariantError(f"mac{which}_ok accepted a forged fragment")
        return True if ok else None

    return call


def _guard_targets(frags: list[Sample], rng: random.Random) -> list[Target]:
    """``qgate.protocol.guard``: the Retry path, the Retry header parser, mac1 and mac2 checks."""
    retries = RetryCorpus.build(frags, rng)
    pool = retries.samples + frags
    auth = (AuthenticationError,)
    return [
        Target("guard.parse_retry_head", (), _gen(pool, 0.1), _retry_head_call, none_rejects=True),
        Target("guard.open_retry", auth, _gen(retries.samples + frags[:8], 0.1), _retry_call(retries),
               none_rejects=True),
        Target("guard.mac1_ok", (), _gen(frags, 0.1), _mac_call(frags, 1), none_rejects=True),
        Target("guard.mac2_ok", (), _gen(frags, 0.1), _mac_call(frags, 2), none_rejects=True),
    ]  # fmt: skip


def _gen(pool: list[Sample], keep: float) -> Callable[[random.Random], bytes]:
    return lambda r: mutate_bytes(r, pool, keep=keep)


# --- runner -------------------------------------------------------------------------------------------


@dataclass
class Failure:
    """The first inputs that raised an undocumented exception of one kind."""

    case: int
    data: bytes
    trace: str


@dataclass
class Result:
    """Per-parser counts."""

    name: str
    cases: int = 0
    documented_errors: int = 0
    accepted: int = 0
    undocumented: int = 0
    seconds: float = 0.0
    by_type: Counter[str] = field(default_factory=Counter)
    failures: dict[str, Failure] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """The four counts of the ``--json`` line."""
        return {"cases": self.cases, "documented_errors": self.documented_errors,
                "accepted": self.accepted, "undocumented": self.undocumented}  # fmt: skip


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise CaseTimeout("case exceeded the time limit")


def _failure_key(exc: BaseException) -> str:
    """Exception type plus the innermost frame, so distinct bugs of one type are reported apart."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}"


def run_target(target: Target, cases: int, seed: int, case_timeout: float = 2.0) -> Result:
    """Feed ``cases`` generated inputs to one target; classify each outcome."""
    rng = random.Random(f"{seed}:{target.name}")
    result = Result(target.name)
    use_alarm = case_timeout > 0 and hasattr(signal, "setitimer")
    old = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    start = time.perf_counter()
    try:
        for case in range(cases):
            data = target.generate(rng)
            result.cases += 1
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, case_timeout)
                try:
                    value = target.call(data)
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            except target.documented as exc:
                result.documented_errors += 1
                result.by_type[type(exc).__name__] += 1
            except Exception as exc:  # anything else escaping a parser is what we hunt
                result.undocumented += 1
                result.by_type[type(exc).__name__ + " (UNDOCUMENTED)"] += 1
                key = _failure_key(exc)
                if key not in result.failures and len(result.failures) < REPORTS_PER_PARSER:
                    result.failures[key] = Failure(case, data, "".join(traceback.format_exception(exc)))
            else:
                if value is None and target.none_rejects:
                    result.documented_errors += 1
                    result.by_type["None (rejected)"] += 1
                else:
                    result.accepted += 1
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, old)
    result.seconds = time.perf_counter() - start
    return result


def report(result: Result, seed: int, out: Callable[[str], None]) -> None:
    """Print one parser's line and its first failures (hex input, traceback, reproduce command)."""
    rate = result.cases / result.seconds if result.seconds else 0.0
    kinds = ", ".join(f"{name} {n}" for name, n in sorted(result.by_type.items())) or "-"
    out(f"{result.name:38} cases {result.cases:7} accepted {result.accepted:7} "
        f"documented {result.documented_errors:7} UNDOCUMENTED {result.undocumented:5} "
        f"{rate:9.0f} cases/s  [{kinds}]")  # fmt: skip
    for key, failure in result.failures.items():
        out(f"  !! {result.name}: {key} (case {failure.case}; reproduce: bench/fuzz.py --only "
            f"{result.name} --seed {seed} --cases {failure.case + 1})")  # fmt: skip
        out(f"  input ({len(failure.data)} bytes) hex: {failure.data.hex()}")
        out("  " + failure.trace.rstrip().replace("\n", "\n  "))


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer; return 1 if any parser raised an undocumented exception, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES, help="cases per parser (default 100000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--only", action="append", help="run only this parser (repeatable; substring match)")
    parser.add_argument(
        "--case-timeout", type=float, default=2.0, help="seconds per case before it is a hang"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary line last on stdout")
    args = parser.parse_args(argv)
    targets = [t for t in build_targets() if not args.only or any(o in t.name for o in args.only)]
    if not targets:
        parser.error(f"no parser matches {args.only}")

    def err(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = []
    for target in targets:
        results.append(run_target(target, args.cases, args.seed, args.case_timeout))
        report(results[-1], args.seed, err)
    seconds = time.perf_counter() - start
    ok = all(r.undocumented == 0 for r in results)
    total = sum(r.cases for r in results)
    verdict = "OK" if ok else "UNDOCUMENTED EXCEPTIONS"
    err(f"{len(results)} parsers, {total} cases in {seconds:.1f} s; {verdict}")
    if args.json:
        summary = {"parsers": {r.name: r.counts() for r in results}, "ok": ok, "seed": args.seed,
                   "seconds": round(seconds, 1)}  # fmt: skip
        print(json.dumps(summary, separators=(",", ":")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
