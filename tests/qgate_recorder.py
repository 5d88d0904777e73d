"""Record qgate's own protocol vectors: a full handshake, one QKD ratchet step and data, in memory.

Two production protocol engines (``qgate.protocol.peer.Peer``, master and slave) run against each
other with everything that is normally random or variable fixed:

- randomness: SHAKE-256 streams of fixed labels (``testproviders.ShakeRng``), one per use;
- ML-KEM: ``testproviders.KyberPyMlKem`` (kyber-py; seed ``d || z`` and ``m`` from the rng);
- ML-DSA-65 identities: ``testproviders.DilithiumPySigner`` (dilithium-py, deterministic signing),
  verified by the production ``PeerPublicKey``;
- X25519: production keys from fixed private bytes (the Peer's ``x25519_keys`` argument);
- QKD: fixed keys and key_IDs instead of a KME (ETSI GS QKD 014 enc_keys / dec_keys);
- clock: fixed monotonic times and a fixed wall time (the M1 timestamp).

The run is: HS-0..HS-4 (M1, M2, M3 fragments and the master's keepalive), 3 data packets each way
on epoch 1, RK-0..RK-4 (R1, R2, R3 and a keepalive), 3 data packets each way on epoch 2. Every
datagram is recorded in order (direction + hex), together with the inputs, the values drawn from
the rng streams and the keys derived from them by the production code (KS-HS, KS-RA, KS-RS of
docs/protocol.md). The file is a test fixture: it holds keys on purpose; none of it is logged.

Write the file with ``python tests/qgate_recorder.py --write`` (``--check`` compares instead).
Re-record only for an intentional change of the wire format or key schedule, documented in
docs/protocol.md; tests/test_vectors_qgate.py fails on any other change.
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

from qgate.crypto.kem import CryptographyMlKem
from qgate.crypto.secret import Secret
from qgate.crypto.x25519 import X25519KeyPair
from qgate.protocol import keyschedule as ks
from qgate.protocol.messages import (
    InitHello,
    Message,
    RatchetRequest,
    RatchetResponse,
    RespHello,
    parse_message,
)
from qgate.protocol.peer import FetchDecKeys, FetchEncKeys, Peer, PeerConfig, PeerEvent, SendDatagram
from qgate.protocol.wire import Reassembler, classify_datagram, parse_data_header, parse_fragment

VECTOR_FILE: Final = Path(__file__).resolve().parent / "vectors_qgate" / "handshake_ratchet_v1.json"
FORMAT: Final = "qgate recorded protocol vectors, version 1"
RERECORD_HINT: Final = (
    "Re-record with `python tests/qgate_recorder.py --write` ONLY for an intentional change of the "
    "wire format or key schedule that is documented in docs/protocol.md (and note it in the commit); "
    "otherwise this is a regression: qgate no longer interoperates with a peer running the old code."
)
MESSAGE_NAMES: Final = {1: "M1", 2: "M2", 3: "M3", 4: "R1", 5: "R2", 6: "R3", 7: "Kick"}
MASTER_TO_SLAVE: Final = "m2s"
SLAVE_TO_MASTER: Final = "s2m"


def _label(name: str) -> str:
    return f"qgate vectors v1: {name}"


def _payload(name: str, size: int) -> bytes:
    return hashlib.shake_256(_label(name).encode()).digest(size)


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
    wall_ns: int = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
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


def describe(data: bytes) -> str:
    """Name a datagram for humans: ``M1 fragment 2/5``, ``data``, ``keepalive``."""
    if classify_datagram(data) == "handshake":
        frag = parse_fragment(data)
        return f"{MESSAGE_NAMES[frag.msg_type]} fragment {frag.index + 1}/{frag.count}"
    return "keepalive" if len(data) == 32 else "data"


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
        self.events: list[PeerEvent] = []
        self._enc_keys = list(inputs.qkd_keys)
        self._kme_store = dict(inputs.qkd_keys)
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
            rng=inputs.rng(f"{role} engine"),
            wall_ns=lambda: inputs.wall_ns,
            now=inputs.handshake_at,
            x25519_keys=self.master_x25519 if master else self.slave_x25519,
        )

    def run(self) -> None:
        """Handshake, data on epoch 1, ratchet step, data on epoch 2 (fails loudly on any hitch)."""
        inp = self.inputs
        self.master.handle_timer(inp.handshake_at)  # step HS-0
        self._pump(inp.handshake_at)
        self._check_epoch(1)
        self._data(1, inp.data_1_at)
        assert self.master.next_timer() == inp.handshake_at + inp.interval
        self.master.handle_timer(inp.ratchet_at)  # step RK-0
        self._pump(inp.ratchet_at)
        self._check_epoch(2)
        self._data(2, inp.data_2_at)
        for peer in (self.master, self.slave):
            stats = peer.stats
            assert (stats.handshakes, stats.rekeys_qkd, stats.rekeys_kem) == (1, 1, 0), stats
            assert stats.auth_failures == stats.malformed_messages == stats.qkd_failures == 0, stats
        assert not self._enc_keys, "not every QKD key was used"

    def draws(self) -> dict[str, str]:
        """Return the values the providers drew from their rng streams (hex), one each."""
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

    def _emit(self, direction: str, what: str, data: bytes) -> None:
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
            self._emit(direction, "data", datagram)
            assert receiver.open(datagram, now) == payload, f"{receiver.config.role} did not open data"
        self._pump(now)

    def _pump(self, now: float) -> None:
        """Carry out both engines' actions until both are quiet."""
        pairs = (
            (self.master, self.slave, MASTER_TO_SLAVE),
            (self.slave, self.master, SLAVE_TO_MASTER),
        )
        for _ in range(100):
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
            self._emit(direction, describe(action.data), action.data)
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


def run_scenario(inputs: Inputs, observer: Observer) -> Harness:
    """Run the whole recorded scenario once; return the harness (engines, draws, events)."""
    harness = Harness(inputs, observer)
    harness.run()
    return harness


# ----- reading a recording back -------------------------------------------------------------


def messages(datagrams: list[Datagram]) -> dict[str, tuple[Message, bytes]]:
    """Reassemble the handshake messages of a recording: ``{"M1": (message, encoded bytes), ...}``."""
    out: dict[str, tuple[Message, bytes]] = {}
    for direction in (MASTER_TO_SLAVE, SLAVE_TO_MASTER):
        reassembler = Reassembler()
        for d in datagrams:
            if d.direction != direction or classify_datagram(d.data) != "handshake":
                continue
            done = reassembler.add(parse_fragment(d.data), 0.0)
            if done is not None:
                msg_type, body = done
                name = MESSAGE_NAMES[msg_type]
                assert name not in out, f"{name} appears twice"
                out[name] = (parse_message(msg_type, body), body)
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


def _epoch_keys(e: ks.EpochKeys) -> dict[str, bytes]:
    parts = (e.k_m2s, e.k_s2m, e.chaining_key, e.kc_master, e.kc_slave)
    return dict(zip(("k_m2s", "k_s2m", "ck", "kc_m", "kc_s"), (p.reveal() for p in parts), strict=True))


def derive_keys(inputs: Inputs, draws: dict[str, str], datagrams: list[Datagram]) -> DerivedKeys:
    """Recompute KS-HS, KS-RA and KS-RS (docs/protocol.md section 5) from a recording.

    Uses only production code: ``cryptography`` ML-KEM from the recorded seed, production
    X25519 from the recorded private value, and ``qgate.protocol.keyschedule``.
    """
    msgs = messages(datagrams)
    m1, m1_bytes = msgs["M1"]
    m2, _ = msgs["M2"]
    r1, _ = msgs["R1"]
    assert isinstance(m1, InitHello) and isinstance(m2, RespHello) and isinstance(r1, RatchetRequest)
    kem = CryptographyMlKem(inputs.kem)
    ss_kem = kem.from_seed(bytes.fromhex(draws["master_ml_kem_seed"])).decapsulate(m2.ct)
    x25519 = X25519KeyPair.from_private_bytes(bytes.fromhex(draws["master_x25519_private"]))
    ss_x = x25519.exchange(m2.x25519_pub)
    qkd_1, qkd_2 = (Secret(key) for _, key in inputs.qkd_keys)
    th = ks.transcript_hash(m1_bytes, m2.confirmed_part())
    hs = ks.handshake_keys(
        [ss_kem, qkd_1, ss_x],
        transcript=th,
        master_sae=inputs.master_sae,
        slave_sae=inputs.slave_sae,
        msg_master=m1.ek + m1.x25519_pub,
        msg_slave=m2.ct + m2.x25519_pub,
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
    msgs = messages(datagrams)
    index: dict[int, tuple[int, str]] = {}
    for name, epoch, direction in (("M1", 1, SLAVE_TO_MASTER), ("M2", 1, MASTER_TO_SLAVE)):
        msg = msgs[name][0]
        assert isinstance(msg, InitHello | RespHello)
        index[msg.sender_index] = (epoch, direction)
    for name, direction in (("R1", SLAVE_TO_MASTER), ("R2", MASTER_TO_SLAVE)):
        step = msgs[name][0]
        assert isinstance(step, RatchetRequest | RatchetResponse)
        index[step.sender_index] = (2, direction)
    return index


# ----- recording -----------------------------------------------------------------------------


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
    return {
        "format": FORMAT,
        "description": __doc__.split("\n\n")[0] if __doc__ else "",
        "rerecord": RERECORD_HINT,
        "inputs": inputs.to_json(),
        "draws": draws,
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


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--write`` records the vector file, ``--check`` compares with it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"(re)write {VECTOR_FILE.name}")
    action.add_argument("--check", action="store_true", help="compare a fresh recording with the file")
    args = parser.parse_args(argv)
    text = dumps(record(Inputs()))
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
