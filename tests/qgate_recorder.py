"""Record qgate's own protocol vectors (version 2): challenges, handshake, one QKD ratchet step and data.

Two production protocol engines (``qgate.protocol.peer.Peer``, master and slave) run against each
other with everything that is normally random or variable fixed:

- randomness: SHAKE-256 streams of fixed labels (``testproviders.ShakeRng``), one per use; every
  value an engine draws (indexes, message ids, randoms, challenges, Retry nonces) is recorded;
- ML-KEM: ``testproviders.KyberPyMlKem`` (kyber-py; seed ``d || z`` and ``m`` from the rng);
- ML-DSA-65 identities: ``testproviders.DilithiumPySigner`` (dilithium-py, deterministic signing),
  verified by the production ``PeerPublicKey``;
- X25519: production keys from fixed private bytes (the Peer's ``x25519_keys`` argument);
- QKD: fixed keys and key_IDs instead of a KME (ETSI GS QKD 014 enc_keys / dec_keys);
- clock: fixed monotonic times; at each of them the harness runs every engine whose
  ``next_timer()`` is due, as the gateway does. Version 2 reads no wall clock.

The run: both engines start at ``handshake_at``. The master fetches a QKD key and sends M1, the
slave (no session yet) sends a Kick; neither knows the other's challenge, so both carry a zero
mac2 and are answered by Retries (docs/protocol.md section 2.3, ``qgate.protocol.guard``). The
engines resend with the challenge and the handshake completes (M1, M2, M3, the master's
keepalive). Then 3 data packets each way on epoch 1, RK-0..RK-4 (R1, R2, R3, a keepalive), 3 data
packets each way on epoch 2. Every datagram is recorded in order (direction + hex), together with
the inputs, the values drawn from the rng streams, each side's mac1 and Retry keys and
challenges, and the keys derived by the production code (KS-HS, KS-AN, KS-RA, KS-RS). The file is
a test fixture: it holds keys on purpose; none of it is logged.

Write the file with ``.venv/bin/python tests/qgate_recorder.py --write`` (``--check`` compares
instead). Re-record only for an intentional change of the wire format, key schedule or engine
behaviour, documented in docs/protocol.md; tests/test_vectors_qgate.py fails on any other change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from testproviders import DilithiumPySigner, KyberPyMlKem, ShakeRng

from qgate.constants import CHALLENGE_SIZE
from qgate.crypto.kem import CryptographyMlKem
from qgate.crypto.secret import Secret
from qgate.crypto.x25519 import X25519KeyPair
from qgate.protocol import guard
from qgate.protocol import keyschedule as ks
from qgate.protocol.messages import (
    RANDOM_SIZE,
    InitHello,
    Kick,
    Message,
    RatchetRequest,
    RatchetResponse,
    RespHello,
    parse_message,
)
from qgate.protocol.peer import (
    FetchDecKeys,
    FetchEncKeys,
    Peer,
    PeerConfig,
    PeerEvent,
    SendDatagram,
)
from qgate.protocol.wire import Reassembler, classify_datagram, parse_data_header, parse_fragment

VECTOR_FILE: Final = Path(__file__).resolve().parent / "vectors_qgate" / "handshake_ratchet_v2.json"
FORMAT: Final = "qgate recorded protocol vectors, version 2"
RERECORD_HINT: Final = (
    "Re-record with `.venv/bin/python tests/qgate_recorder.py --write` ONLY for an intentional change "
    "of the wire format, key schedule or engine behaviour that is documented in docs/protocol.md (and "
    "note it in the commit); otherwise this is a regression: qgate no longer interoperates with a peer "
    "running the old code."
)
MESSAGE_NAMES: Final = {1: "M1", 2: "M2", 3: "M3", 4: "R1", 5: "R2", 6: "R3", 7: "Kick"}
MASTER_TO_SLAVE: Final = "m2s"
SLAVE_TO_MASTER: Final = "s2m"
ROLES: Final = ("master", "slave")
MAX_ROUNDS: Final = 100
"""Rounds of actions (or of due timers) after which the engines count as not going quiet."""


def _label(name: str) -> str:
    return f"qgate vectors v2: {name}"


def _payload(name: str, size: int) -> bytes:
    return hashlib.shake_256(_label(name).encode()).digest(size)


def sender_of(direction: str) -> Literal["master", "slave"]:
    """Return the role that sends in ``direction`` (``m2s`` or ``s2m``)."""
    return "master" if direction == MASTER_TO_SLAVE else "slave"


def receiver_of(direction: str) -> Literal["master", "slave"]:
    """Return the role that receives in ``direction`` (``m2s`` or ``s2m``)."""
    return "slave" if direction == MASTER_TO_SLAVE else "master"


@dataclass(frozen=True)
class Inputs:
    """Everything a run depends on (JSON section ``inputs``)."""

    kem: str = "ml-kem-768"
    identity_alg: str = "ml-dsa-65"
    x25519: bool = True
    qkd_bits: int = 256
    master_sae: str = "SAE_A"
    slave_sae: str = "SAE_B"
    interval: float = 1.0
    kem_interval: float = 4.0
    max_key_age: float = 3.0
    handshake_at: float = 0.0
    data_1_at: float = 0.25
    ratchet_at: float = 1.0
    data_2_at: float = 1.25
    rng_labels: dict[str, str] = field(
        default_factory=lambda: {
            name: _label(name)
            for name in (
                "master engine",
                "slave engine",
                "master ml-kem",
                "slave ml-kem",
                "master x25519",
                "slave x25519",
                "master ml-dsa seed",
                "slave ml-dsa seed",
            )
        }
    )
    qkd_keys: tuple[tuple[str, bytes], ...] = (
        ("3f2b8c1e-0d4a-4e6f-9a57-000000000001", _payload("qkd key 1", 32)),
        ("3f2b8c1e-0d4a-4e6f-9a57-000000000002", _payload("qkd key 2", 32)),
    )
    payloads: tuple[tuple[int, str, bytes], ...] = tuple(
        (epoch, direction, _payload(f"payload e{epoch} {direction} {i}", size))
        for epoch in (1, 2)
        for direction in (MASTER_TO_SLAVE, SLAVE_TO_MASTER)
        for i, size in enumerate((1, 84, 1420))
    )

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form (bytes as lowercase hex)."""
        out: dict[str, Any] = {
            k: v for k, v in self.__dict__.items() if k not in ("rng_labels", "qkd_keys", "payloads")
        }
        out["rng_labels"] = dict(self.rng_labels)
        out["qkd_keys"] = [{"key_ID": k, "key": v.hex()} for k, v in self.qkd_keys]
        out["payloads"] = [{"epoch": e, "dir": d, "hex": p.hex()} for e, d, p in self.payloads]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Inputs:
        """Load the JSON form written by :meth:`to_json`."""
        plain = {k: v for k, v in data.items() if k not in ("rng_labels", "qkd_keys", "payloads")}
        return replace(
            cls(**plain),
            rng_labels={str(k): str(v) for k, v in data["rng_labels"].items()},
            qkd_keys=tuple((str(q["key_ID"]), bytes.fromhex(q["key"])) for q in data["qkd_keys"]),
            payloads=tuple(
                (int(p["epoch"]), str(p["dir"]), bytes.fromhex(p["hex"])) for p in data["payloads"]
            ),
        )

    def rng(self, name: str) -> ShakeRng:
        """Return a fresh SHAKE-256 stream for the use ``name``."""
        return ShakeRng(self.rng_labels[name].encode())


@dataclass(frozen=True)
class Datagram:
    """One UDP payload on the in-memory wire."""

    direction: str
    what: str
    data: bytes

    def to_json(self) -> dict[str, str]:
        """Return ``{"dir", "what", "hex"}``."""
        return {"dir": self.direction, "what": self.what, "hex": self.data.hex()}

    @classmethod
    def from_json(cls, item: dict[str, str]) -> Datagram:
        """Load the JSON form written by :meth:`to_json`."""
        return cls(item["dir"], item["what"], bytes.fromhex(item["hex"]))


Observer = Callable[[Datagram], None]


class _X25519Source:
    """Makes X25519 key pairs from 32-byte private values drawn from an rng (RFC 7748)."""

    def __init__(self, rng: ShakeRng) -> None:
        self._rng = rng
        self.drawn: list[bytes] = []

    def __call__(self) -> X25519KeyPair:
        private = self._rng(32)
        self.drawn.append(private)
        return X25519KeyPair.from_private_bytes(private)


class LoggedRng:
    """An engine's rng: a SHAKE-256 stream that keeps every value it hands out, in order."""

    def __init__(self, rng: ShakeRng) -> None:
        self._rng = rng
        self.drawn: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        value = self._rng(n)
        self.drawn.append(value)
        return value


def describe(data: bytes) -> str:
    """Name a datagram for humans: ``M1 fragment 2/5``, ``Retry``, ``data``, ``keepalive``."""
    kind = classify_datagram(data)
    if kind == "handshake":
        frag = parse_fragment(data)
        return f"{MESSAGE_NAMES[frag.msg_type]} fragment {frag.index + 1}/{frag.count}"
    if kind == "retry":
        return "Retry"
    return "keepalive" if len(data) == 32 else "data"


def fragment_key(data: bytes) -> tuple[int, int]:
    """Return ``(message_id, index)`` of a fragment or of the fragment a Retry answers."""
    if classify_datagram(data) == "retry":
        head = guard.parse_retry_head(data)
        assert head is not None
        return head
    frag = parse_fragment(data)
    return frag.message_id, frag.index


class Harness:
    """A master and a slave engine wired together in memory, with fixed inputs.

    Args:
        inputs: the fixed inputs of the run.
        observer: called with every datagram, in order, before it is delivered.
    """

    def __init__(self, inputs: Inputs, observer: Observer) -> None:
        self.inputs = inputs
        self._observer = observer
        self.master_kem = KyberPyMlKem(inputs.kem, inputs.rng("master ml-kem"))
        self.slave_kem = KyberPyMlKem(inputs.kem, inputs.rng("slave ml-kem"))
        self.master_x25519 = _X25519Source(inputs.rng("master x25519"))
        self.slave_x25519 = _X25519Source(inputs.rng("slave x25519"))
        self.master_signer = DilithiumPySigner(inputs.identity_alg, inputs.rng("master ml-dsa seed")(32))
        self.slave_signer = DilithiumPySigner(inputs.identity_alg, inputs.rng("slave ml-dsa seed")(32))
        self.engine_rngs = {role: LoggedRng(inputs.rng(f"{role} engine")) for role in ROLES}
        self.events: list[PeerEvent] = []
        self._enc_keys = list(inputs.qkd_keys)
        self._kme_store = dict(inputs.qkd_keys)
        self._sent: dict[tuple[str, int, int], str] = {}
        self.master = self._engine("master", self.master_kem, self.master_signer, self.slave_signer)
        self.slave = self._engine("slave", self.slave_kem, self.slave_signer, self.master_signer)

    def _engine(
        self,
        role: Literal["master", "slave"],
        kem: KyberPyMlKem,
        me: DilithiumPySigner,
        peer: DilithiumPySigner,
    ) -> Peer:
        """Build one production engine with this side's fixed providers."""
        inputs = self.inputs
        master = role == "master"
        config = PeerConfig(
            name="site-b" if master else "site-a",
            role=role,
            my_sae=inputs.master_sae if master else inputs.slave_sae,
            peer_sae=inputs.slave_sae if master else inputs.master_sae,
            kem=kem,
            x25519=inputs.x25519,
            qkd_bits=inputs.qkd_bits,
            interval=inputs.interval,
            kem_interval=inputs.kem_interval,
            max_key_age=inputs.max_key_age,
        )
        return Peer(
            config,
            identity=me,
            peer_key=peer.public_key(),  # production ML-DSA verifies dilithium-py signatures
            rng=self.engine_rngs[role],
            now=inputs.handshake_at,
            x25519_keys=self.master_x25519 if master else self.slave_x25519,
        )

    def signer(self, role: str) -> DilithiumPySigner:
        """Return the identity of ``role`` (``master`` or ``slave``)."""
        return self.master_signer if role == "master" else self.slave_signer

    def run(self) -> None:
        """Start, handshake, data on epoch 1, ratchet step, data on epoch 2 (fails loudly on any hitch)."""
        inp = self.inputs
        self._tick(inp.handshake_at)  # HS-0 at the master, a Kick from the slave, Retries, HS-1..HS-4
        self._check_epoch(1)
        self._tick(inp.data_1_at)
        self._data(1, inp.data_1_at)
        assert self.master.next_timer() == inp.ratchet_at, "the ratchet timer is not due at ratchet_at"
        self._tick(inp.ratchet_at)  # RK-0..RK-4
        self._check_epoch(2)
        self._tick(inp.data_2_at)
        self._data(2, inp.data_2_at)
        for peer in (self.master, self.slave):
            stats = peer.stats
            assert (stats.handshakes, stats.rekeys_qkd, stats.rekeys_kem) == (1, 1, 0), stats
            assert stats.auth_failures == stats.malformed_messages == stats.qkd_failures == 0, stats
        assert not self._enc_keys, "not every QKD key was used"

    def draws(self) -> dict[str, str]:
        """Return the values the crypto providers drew from their rng streams (hex), one each."""
        singles = {
            "master_ml_kem_seed": [v for k, v in self.master_kem.drawn if k == "ml_kem_seed"],
            "slave_ml_kem_m": [v for k, v in self.slave_kem.drawn if k == "ml_kem_m"],
            "master_x25519_private": self.master_x25519.drawn,
            "slave_x25519_private": self.slave_x25519.drawn,
        }
        assert len(self.master_kem.drawn) + len(self.slave_kem.drawn) == 2, "unexpected ML-KEM draws"
        out = {}
        for name, values in singles.items():
            assert len(values) == 1, f"{name} drawn {len(values)} times"
            out[name] = values[0].hex()
        out["master_ml_dsa_seed"] = self.inputs.rng("master ml-dsa seed")(32).hex()
        out["slave_ml_dsa_seed"] = self.inputs.rng("slave ml-dsa seed")(32).hex()
        out["master_ml_dsa_public_key"] = self.master_signer.public_bytes().hex()
        out["slave_ml_dsa_public_key"] = self.slave_signer.public_bytes().hex()
        return out

    def _check_epoch(self, number: int) -> None:
        for peer in (self.master, self.slave):
            current = peer.epochs.current
            assert current is not None and current.number == number, (peer.config.role, current)
            assert peer.epochs.next is None

    def _emit(self, direction: str, data: bytes) -> None:
        what = describe(data)
        kind = classify_datagram(data)
        if kind == "handshake":
            self._sent[(direction, *fragment_key(data))] = what
        elif kind == "retry":  # name the fragment it answers (sent the other way)
            other = SLAVE_TO_MASTER if direction == MASTER_TO_SLAVE else MASTER_TO_SLAVE
            what = f"Retry for {self._sent.get((other, *fragment_key(data)), 'an unknown fragment')}"
        self._observer(Datagram(direction, what, data))

    def _data(self, epoch: int, now: float) -> None:
        for number, direction, payload in self.inputs.payloads:
            if number != epoch:
                continue
            sender, receiver = (
                (self.master, self.slave) if direction == MASTER_TO_SLAVE else (self.slave, self.master)
            )
            datagram = sender.seal(payload, now)
            assert datagram is not None, f"{sender.config.role} could not seal on epoch {epoch}"
            self._emit(direction, datagram)
            assert receiver.open(datagram, now) == payload, f"{receiver.config.role} did not open data"
        self._pump(now)

    def _tick(self, now: float) -> None:
        """Run every engine whose timer is due at ``now`` (master first) and carry out the actions."""
        for _ in range(MAX_ROUNDS):
            due = [p for p in (self.master, self.slave) if (t := p.next_timer()) is not None and t <= now]
            if not due:
                return
            for peer in due:
                peer.handle_timer(now)
            self._pump(now)
        raise AssertionError(f"timers are still due at {now} after {MAX_ROUNDS} rounds")

    def _pump(self, now: float) -> None:
        """Carry out both engines' actions until both are quiet."""
        pairs = (
            (self.master, self.slave, MASTER_TO_SLAVE),
            (self.slave, self.master, SLAVE_TO_MASTER),
        )
        for _ in range(MAX_ROUNDS):
            moved = False
            for me, other, direction in pairs:
                for action in me.take_actions():
                    moved = True
                    self._act(me, other, direction, action, now)
            if not moved:
                return
        raise AssertionError("the engines did not go quiet")

    def _act(self, me: Peer, other: Peer, direction: str, action: object, now: float) -> None:
        if isinstance(action, SendDatagram):
            self._emit(direction, action.data)
            if classify_datagram(action.data) == "data":
                assert other.open(action.data, now) is not None, "a keepalive did not open"
            else:
                other.receive_fragment(action.data, now)
        elif isinstance(action, FetchEncKeys):
            assert (action.number, action.size_bits) == (1, self.inputs.qkd_bits)
            key_id, key = self._enc_keys.pop(0)
            me.keys_fetched(action.request_id, [(key_id, Secret(key))], now)
        elif isinstance(action, FetchDecKeys):
            keys = [(k, Secret(self._kme_store.pop(k))) for k in action.key_ids]
            me.keys_fetched(action.request_id, keys, now)
        elif isinstance(action, PeerEvent):
            self.events.append(action)
        else:
            raise AssertionError(f"unexpected action {action!r}")


def run_scenario(inputs: Inputs, observer: Observer) -> Harness:
    """Run the whole recorded scenario once; return the harness (engines, draws, events)."""
    harness = Harness(inputs, observer)
    harness.run()
    return harness


# ----- reading a recording back -------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One handshake message of a recording, reassembled from its fragments.

    Attributes:
        name: M1, M2, M3, R1, R2, R3 or Kick.
        direction: ``m2s`` or ``s2m``.
        message_id: the fragments' message_id (a resent message gets a new one).
        msg, body: the parsed and the encoded message.
        positions: where its fragments are in the datagram list, in fragment order.
    """

    name: str
    direction: str
    message_id: int
    msg: Message
    body: bytes
    positions: tuple[int, ...]


def messages(datagrams: list[Datagram]) -> list[Sent]:
    """Reassemble every handshake message of a recording, in the order they completed."""
    out: list[Sent] = []
    for direction in (MASTER_TO_SLAVE, SLAVE_TO_MASTER):
        reassembler = Reassembler()
        positions: dict[int, dict[int, int]] = {}
        for at, d in enumerate(datagrams):
            if d.direction != direction or classify_datagram(d.data) != "handshake":
                continue
            frag = parse_fragment(d.data)
            positions.setdefault(frag.message_id, {})[frag.index] = at
            done = reassembler.add(frag, 0.0)
            if done is not None:
                msg_type, body = done
                where = positions.pop(frag.message_id)
                out.append(
                    Sent(
                        MESSAGE_NAMES[msg_type],
                        direction,
                        frag.message_id,
                        parse_message(msg_type, body),
                        body,
                        tuple(where[i] for i in range(frag.count)),
                    )
                )
    return sorted(out, key=lambda s: s.positions[-1])


def last(sent: list[Sent], name: str) -> Sent:
    """Return the last message called ``name``: the one that took effect (resends come later)."""
    found = [s for s in sent if s.name == name]
    assert found, f"no {name} in the recording"
    return found[-1]


def retries(datagrams: list[Datagram]) -> list[tuple[int, int]]:
    """Return ``(position of a Retry, position of the fragment it answers)`` for every Retry.

    The answered fragment is the latest one before the Retry, sent the other way, with the
    Retry's message_id and index.
    """
    out = []
    for at, d in enumerate(datagrams):
        if classify_datagram(d.data) != "retry":
            continue
        key = fragment_key(d.data)
        answered = [
            i
            for i in range(at)
            if datagrams[i].direction != d.direction
            and classify_datagram(datagrams[i].data) == "handshake"
            and fragment_key(datagrams[i].data) == key
        ]
        assert answered, f"Retry #{at} answers no fragment of the recording"
        out.append((at, answered[-1]))
    return out


@dataclass(frozen=True)
class DerivedKeys:
    """Key schedule values recomputed from a recording with production code only."""

    values: dict[str, dict[str, bytes]]

    def to_json(self) -> dict[str, dict[str, str]]:
        """Return the JSON form (bytes as hex)."""
        return {section: {k: v.hex() for k, v in part.items()} for section, part in self.values.items()}

    def epoch(self, number: int) -> dict[str, bytes]:
        """Return the keys of epoch 1 (handshake) or 2 (ratchet)."""
        return self.values["handshake" if number == 1 else "ratchet"]


PUBLIC_DERIVED: Final = frozenset({"th", "r1_hash", "anchor_id"})
"""Derived values that are not secret (transcript hashes, KS-AN names)."""


def _epoch_keys(e: ks.EpochKeys) -> dict[str, bytes]:
    parts = (e.k_m2s, e.k_s2m, e.chaining_key, e.kc_master, e.kc_slave)
    keys = dict(zip(("k_m2s", "k_s2m", "ck", "kc_m", "kc_s"), (p.reveal() for p in parts), strict=True))
    return {**keys, "anchor_id": ks.anchor_id(e.chaining_key)}


def derive_keys(inputs: Inputs, draws: dict[str, str], datagrams: list[Datagram]) -> DerivedKeys:
    """Recompute KS-HS, KS-AN, KS-RA and KS-RS (docs/protocol.md section 5) from a recording.

    Uses only production code: ``cryptography`` ML-KEM from the recorded seed, production
    X25519 from the recorded private value, and ``qgate.protocol.keyschedule``. The handshake is
    hybrid (mode byte MODE_HYBRID: the QKD key is the second secret) without a PPK.
    """
    sent = messages(datagrams)
    m1_sent, m2_sent, r1_sent = last(sent, "M1"), last(sent, "M2"), last(sent, "R1")
    m1, m2, r1 = m1_sent.msg, m2_sent.msg, r1_sent.msg
    assert isinstance(m1, InitHello) and isinstance(m2, RespHello) and isinstance(r1, RatchetRequest)
    kem = CryptographyMlKem(inputs.kem)
    ss_kem = kem.from_seed(bytes.fromhex(draws["master_ml_kem_seed"])).decapsulate(m2.ct)
    x25519 = X25519KeyPair.from_private_bytes(bytes.fromhex(draws["master_x25519_private"]))
    ss_x = x25519.exchange(m2.x25519_pub)
    qkd_1, qkd_2 = (Secret(key) for _, key in inputs.qkd_keys)
    th = ks.transcript_hash(m1_sent.body, m2.confirmed_part())
    hs = ks.handshake_keys(
        [ss_kem, qkd_1, ss_x],
        transcript=th,
        master_sae=inputs.master_sae,
        slave_sae=inputs.slave_sae,
        msg_master=m1.ek + m1.x25519_pub,
        msg_slave=m2.ct + m2.x25519_pub,
        mode=ks.MODE_HYBRID,
        ppk=None,
    )
    r1_hash = ks.transcript_hash(r1.mac_part())
    rk = ks.ratchet_keys(hs.chaining_key, qkd_2, epoch=r1.epoch, request_hash=r1_hash)

    return DerivedKeys(
        {
            "handshake": {"ss_kem": ss_kem.reveal(), "ss_x25519": ss_x.reveal(), "th": th, **_epoch_keys(hs)},
            "ratchet": {
                "k_auth": ks.ratchet_auth_key(hs.chaining_key).reveal(),
                "r1_hash": r1_hash,
                **_epoch_keys(rk),
            },
        }
    )


def data_indexes(datagrams: list[Datagram]) -> dict[int, tuple[int, str]]:
    """Map each receiver_index of the recording to ``(epoch, direction it receives)``."""
    sent = messages(datagrams)
    index: dict[int, tuple[int, str]] = {}
    for name, epoch, direction in (("M1", 1, SLAVE_TO_MASTER), ("M2", 1, MASTER_TO_SLAVE)):
        msg = last(sent, name).msg
        assert isinstance(msg, InitHello | RespHello)
        index[msg.sender_index] = (epoch, direction)
    for name, direction in (("R1", SLAVE_TO_MASTER), ("R2", MASTER_TO_SLAVE)):
        step = last(sent, name).msg
        assert isinstance(step, RatchetRequest | RatchetResponse)
        index[step.sender_index] = (2, direction)
    return index


def wire_randoms(datagrams: list[Datagram]) -> set[bytes]:
    """Return the ``random`` fields of every M1 and M2 of a recording."""
    return {s.msg.random for s in messages(datagrams) if isinstance(s.msg, InitHello | RespHello)}


def challenges_of(engine_draws: list[bytes], datagrams: list[Datagram]) -> list[bytes]:
    """Return the challenges among one engine's draws, in drawing order.

    An engine draws 32 bytes only for a challenge (``guard.ChallengeBook``) or for the random of
    an M1/M2 (which the recording shows), so the challenges are the other 32-byte draws.
    """
    randoms = wire_randoms(datagrams)
    assert RANDOM_SIZE == CHALLENGE_SIZE
    return [d for d in engine_draws if len(d) == CHALLENGE_SIZE and d not in randoms]


def wire_challenges(datagrams: list[Datagram], retry_keys: dict[str, bytes]) -> list[tuple[int, str, bytes]]:
    """Return ``(position, role, challenge)`` for every challenge handed out on the wire, in order.

    ``position`` is that of the Retry or of the message's last fragment; ``role`` the sender's.

    Challenges travel in the ``challenge`` field of M1, M2, R1 and Kick, and inside Retries
    (opened with ``guard.open_retry`` under ``retry_keys[sender role]`` and the answered mac1).
    """
    found: list[tuple[int, str, bytes]] = []
    for s in messages(datagrams):
        if isinstance(s.msg, InitHello | RespHello | RatchetRequest | Kick):
            found.append((s.positions[-1], sender_of(s.direction), s.msg.challenge))
    for at, answered in retries(datagrams):
        role = sender_of(datagrams[at].direction)
        challenge = guard.open_retry(
            datagrams[at].data,
            sent_mac1=guard.fragment_mac1(datagrams[answered].data),
            peer_retry_key=retry_keys[role],
        )
        found.append((at, role, challenge))
    return sorted(found, key=lambda f: f[0])


# ----- recording -----------------------------------------------------------------------------


def guard_values(harness: Harness, datagrams: list[Datagram]) -> dict[str, dict[str, Any]]:
    """Return each side's K_mac1, K_retry (``qgate.protocol.guard``) and the challenges it drew."""
    out: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        public = harness.signer(role).public_bytes()
        drawn = harness.engine_rngs[role].drawn
        out[role] = {
            "k_mac1": guard.mac1_key(public).hex(),
            "k_retry": guard.retry_key(public).hex(),
            "challenges": [c.hex() for c in challenges_of(drawn, datagrams)],
        }
    return out


def _check_guard(guards: dict[str, dict[str, Any]], wire: list[Datagram]) -> None:
    """Every fragment's mac1 is the receiver's; every challenge on the wire was drawn by its sender."""
    for d in wire:
        if classify_datagram(d.data) == "handshake":
            key = bytes.fromhex(guards[receiver_of(d.direction)]["k_mac1"])
            assert guard.mac1_ok(d.data, key), f"{d.what}: mac1 is not the receiver's"
    retry_keys = {role: bytes.fromhex(guards[role]["k_retry"]) for role in ROLES}
    for _, role, challenge in wire_challenges(wire, retry_keys):
        assert challenge.hex() in guards[role]["challenges"], f"a {role} challenge was not drawn by it"


def record(inputs: Inputs) -> dict[str, Any]:
    """Run the scenario and return the full recording (the JSON document)."""
    wire: list[Datagram] = []
    harness = run_scenario(inputs, wire.append)
    draws = harness.draws()
    derived = derive_keys(inputs, draws, wire)
    for peer in (harness.master, harness.slave):  # the engines used the keys derived above
        current = peer.epochs.current
        assert current is not None and current.chaining_key == Secret(derived.epoch(2)["ck"])
    index = data_indexes(wire)
    for d in wire:  # every data record names an epoch index of its receiver
        if classify_datagram(d.data) == "data":
            assert index[parse_data_header(d.data)[0]][1] == d.direction
    guards = guard_values(harness, wire)
    _check_guard(guards, wire)
    return {
        "format": FORMAT,
        "description": __doc__.split("\n\n")[0] if __doc__ else "",
        "rerecord": RERECORD_HINT,
        "inputs": inputs.to_json(),
        "draws": draws,
        "engine_draws": {role: [v.hex() for v in harness.engine_rngs[role].drawn] for role in ROLES},
        "guard": guards,
        "derived": derived.to_json(),
        "datagrams": [d.to_json() for d in wire],
    }


def dumps(document: dict[str, Any]) -> str:
    """Serialise a recording the way the vector file stores it."""
    return json.dumps(document, indent=1) + "\n"


def load(path: Path = VECTOR_FILE) -> dict[str, Any]:
    """Load a recording."""
    with path.open(encoding="utf-8") as handle:
        document: dict[str, Any] = json.load(handle)
    if document.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT!r} file")
    return document


def summary(document: dict[str, Any]) -> str:
    """Return the recording's datagrams, one line each (``#n dir what``), for humans."""
    return "\n".join(
        f"#{n:<3} {d['dir']} {d['what']} ({len(d['hex']) // 2} bytes)"
        for n, d in enumerate(document["datagrams"])
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--write`` records the vector file, ``--check`` compares with it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"(re)write {VECTOR_FILE.name}")
    action.add_argument("--check", action="store_true", help="compare a fresh recording with the file")
    action.add_argument("--show", action="store_true", help="list a fresh recording's datagrams")
    args = parser.parse_args(argv)
    document = record(Inputs())
    text = dumps(document)
    if args.show:
        print(summary(document))
        return 0
    if args.write:
        VECTOR_FILE.parent.mkdir(exist_ok=True)
        VECTOR_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {VECTOR_FILE} ({len(text)} bytes)", file=sys.stderr)
        return 0
    same = VECTOR_FILE.exists() and VECTOR_FILE.read_text(encoding="utf-8") == text
    print(f"{VECTOR_FILE}: {'matches' if same else 'DIFFERS from a fresh recording'}", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
