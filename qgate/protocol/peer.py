"""The per-peer protocol state machine: handshake, QKD ratchet, kicks and timers (sans-I/O).

Roles are fixed by the policy: the QKD *master* SAE (ETSI GS QKD 014 section 2) starts every
handshake (M1 -> M2 -> M3) and every ratchet step (R1 -> R2 -> R3); the *slave* answers and,
when it has no session, asks for one with a signed Kick. Only the master starts, so two
handshakes never collide. Step labels (HS-*, RK-*) match docs/protocol.md.

The adapter feeds in handshake fragments, fetched QKD keys and the clock, and carries out the
actions it takes from ``take_actions()``: datagrams to send, ETSI 014 key requests to make, and
events to log. Data records go through ``seal`` / ``open``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from qgate.constants import AEAD_PACKET_SOFT_LIMIT, HANDSHAKE_RETRY, HANDSHAKE_TIMEOUT, KICK_INTERVAL
from qgate.crypto.identity import PeerPublicKey
from qgate.crypto.kem import KemAlgorithm, KemDecapsulationKey
from qgate.crypto.secret import Secret
from qgate.crypto.x25519 import X25519KeyPair
from qgate.errors import AuthenticationError, CryptoError, ProtocolError, RemoteProtocolError
from qgate.protocol import keyschedule as ks
from qgate.protocol.epoch import Epoch, EpochSet
from qgate.protocol.messages import (
    KEM_IDS,
    KICK_NO_SESSION,
    KICK_PACKET_LIMIT,
    KICK_QKD_UNAVAILABLE,
    RANDOM_SIZE,
    InitConfirm,
    InitHello,
    Kick,
    Message,
    RatchetConfirm,
    RatchetRequest,
    RatchetResponse,
    RespHello,
    parse_message,
)
from qgate.protocol.wire import Reassembler, fragment_message, new_message_id, parse_fragment

log = logging.getLogger(__name__)

Rng = Callable[[int], bytes]


class Signer(Protocol):
    """Signs handshake transcripts with this gateway's identity (FIPS 204 ML-DSA.Sign)."""

    def sign(self, message: bytes) -> bytes:
        """Return the signature over ``message``."""
        ...


FETCH_BACKOFF_MAX = 8.0
"""Seconds: the longest wait between failed ETSI 014 key requests."""
DEAD_KEY_IDS = 64
"""key_IDs whose dec_keys failed, remembered so the slave never asks for them again."""
RESPONSE_CACHE = 4
"""Answers (M2/R2) kept to resend when the same request arrives again."""


@dataclass(frozen=True)
class PeerConfig:
    """What the state machine needs from the policy (``qgate.policy.PeerPolicy``)."""

    name: str
    role: Literal["master", "slave"]
    my_sae: str
    peer_sae: str
    kem: KemAlgorithm
    x25519: bool
    qkd_bits: int
    interval: float
    kem_interval: float
    max_key_age: float
    fail_mode: Literal["qkd_and_pqc", "pqc_only_if_qkd_down"] = "qkd_and_pqc"

    @property
    def may_degrade(self) -> bool:
        """Whether the policy allows a handshake on ML-KEM (+ X25519) alone when QKD keys stop."""
        return self.fail_mode == "pqc_only_if_qkd_down"


@dataclass(frozen=True)
class SendDatagram:
    """Send ``data`` to the peer's endpoint."""

    data: bytes


@dataclass(frozen=True)
class FetchEncKeys:
    """Master: call ETSI 014 enc_keys for ``number`` keys of ``size_bits``; answer with keys_fetched."""

    request_id: int
    number: int
    size_bits: int


@dataclass(frozen=True)
class FetchDecKeys:
    """Slave: call ETSI 014 dec_keys for ``key_ids``; answer with keys_fetched."""

    request_id: int
    key_ids: tuple[str, ...]


@dataclass(frozen=True)
class PeerEvent:
    """Something worth a log line or audit record (never key bytes)."""

    kind: str
    detail: dict[str, str | int | float] = field(default_factory=dict)


Action = SendDatagram | FetchEncKeys | FetchDecKeys | PeerEvent


@dataclass
class ControlStats:
    """Key-management counters of one peer."""

    handshakes: int = 0
    rekeys_qkd: int = 0
    rekeys_kem: int = 0
    handshake_failures: int = 0
    auth_failures: int = 0
    malformed_messages: int = 0
    qkd_failures: int = 0
    kicks_sent: int = 0
    degraded_handshakes: int = 0
    mode_changes: int = 0


@dataclass
class _Pending:
    """A master's outstanding handshake (kind "hs") or ratchet step (kind "rk")."""

    kind: Literal["hs", "rk"]
    request_id: int
    started: float
    fragments: list[bytes] = field(default_factory=list)
    last_sent: float = 0.0
    my_index: int = 0
    epoch: int = 0
    key_ids: tuple[str, ...] = ()
    m1: bytes = b""
    dk: KemDecapsulationKey | None = None
    x25519: X25519KeyPair | None = None
    qkd_key: Secret | None = None
    base: Epoch | None = None
    r1: RatchetRequest | None = None
    r1_hash: bytes = b""
    keys: ks.EpochKeys | None = None
    degraded: bool = False


class Peer:
    """One peer's protocol engine. Not thread-safe; all times are monotonic seconds."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        identity: Signer,
        peer_key: PeerPublicKey,
        rng: Rng,
        wall_ns: Callable[[], int],
        now: float,
        x25519_keys: Callable[[], X25519KeyPair] = X25519KeyPair.generate,
        index_taken: Callable[[int], bool] = lambda index: False,
    ) -> None:
        """Create the engine; a master starts its first handshake at once.

        Args:
            config: the peer's settings.
            identity: this gateway's ML-DSA signing key (FIPS 204), e.g. ``IdentityKey``.
            peer_key: the peer's pinned ML-DSA public key.
            rng: returns n random bytes (indexes, message ids, handshake randoms).
            wall_ns: wall-clock nanoseconds, used only for M1/Kick timestamps (replay guard).
            now: the current monotonic time.
            x25519_keys: makes ephemeral X25519 key pairs (RFC 7748); tests inject fixed ones to
                record vectors.
            index_taken: tells whether a receiver index is in use by another peer of this gateway.
        """
        self.config = config
        self._identity = identity
        self._x25519_keys = x25519_keys
        self._index_taken = index_taken
        self._peer_key = peer_key
        self._rng = rng
        self._wall_ns = wall_ns
        self.epochs = EpochSet(max_key_age=config.max_key_age)
        self.stats = ControlStats()
        self._actions: list[Action] = []
        self._reassembler = Reassembler()
        self._request_ids = 0
        self._pending: _Pending | None = None
        self._fetch_backoff = 0.0
        self._next_ratchet_at: float | None = None
        self._next_kem_at: float | None = None
        self._next_attempt_at: float | None = now if config.role == "master" else None
        self._next_kick_at = now
        self._last_peer_ts = 0
        self._inflight: dict[int, tuple[str, Message, bytes, Epoch | None]] = {}
        self.mode: Literal["hybrid", "degraded", "closed"] | None = None
        self.interval = config.interval
        self.last_problem = ""
        self._unknown_seen = 0
        self._dead_key_ids: deque[str] = deque(maxlen=DEAD_KEY_IDS)
        self.last_handshake_at: float | None = None
        self._answered: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()

    # ----- outputs -------------------------------------------------------------------
    def take_actions(self) -> list[Action]:
        """Return and clear the actions produced so far, in order."""
        actions, self._actions = self._actions, []
        return actions

    def _event(self, kind: str, **detail: str | int | float) -> None:
        if "reason" in detail:
            self.last_problem = f"{kind}: {detail['reason']}"
        self._actions.append(PeerEvent(kind, {"peer": self.config.name, **detail}))

    def _send_message(self, msg_type: int, body: bytes, now: float) -> list[bytes]:
        frags = fragment_message(msg_type, body, new_message_id(self._rng))
        self._actions.extend(SendDatagram(f) for f in frags)
        return frags

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "big")
            if index and index not in self.epochs.by_index and not self._index_taken(index):
                return index

    def _new_request(self) -> int:
        self._request_ids += 1
        return self._request_ids

    # ----- timers --------------------------------------------------------------------
    def next_timer(self) -> float | None:
        """Return the monotonic time of the next timer to handle, or None."""
        times = [self._next_attempt_at, self._next_ratchet_at, self._next_kem_at]
        times.extend(e.expires_at for e in self.epochs.previous)  # drop old keys when their grace ends
        if self._pending is not None:
            times.append(self._exchange_deadline(self._pending))
            if self._pending.fragments:
                times.append(self._pending.last_sent + HANDSHAKE_RETRY)
        if self.config.role == "slave" and self.epochs.current is None and self.epochs.next is None:
            times.append(self._next_kick_at)
        return min((t for t in times if t is not None), default=None)

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: retransmits, timeouts, rekeys, kicks, epoch expiry."""
        self.epochs.expire(now)
        self._note_closed(now)
        if self.config.role == "slave":
            self._slave_timer(now)
            return
        pending = self._pending
        current = self.epochs.current
        base_gone = current is None or not self.epochs.usable(current, now)
        if pending is not None and pending.kind == "rk" and base_gone:
            # The key this ratchet steps from is past max_key_age: the slave has dropped it and can
            # never accept the ratchet. A full handshake now, not retransmissions until the timeout.
            self._event("ratchet_abandoned", reason="the key it ratchets from passed max_key_age")
            self.stats.handshake_failures += 1
            self._pending = None
            self._begin(now, "hs")
            return
        if pending is not None:
            if now >= self._exchange_deadline(pending):
                self._abandon(pending, now, "timeout")
            elif pending.fragments and now - pending.last_sent >= HANDSHAKE_RETRY:
                self._actions.extend(SendDatagram(f) for f in pending.fragments)  # step HS-RT / RK-RT
                pending.last_sent = now
            return
        if current is None or base_gone:  # never ratchet from an expired key
            if self._next_attempt_at is None or now >= self._next_attempt_at:  # backoff after failures
                self._begin(now, "hs")
        elif self._next_kem_at is not None and now >= self._next_kem_at:
            self._begin(now, "hs")
        elif (self._next_ratchet_at is not None and now >= self._next_ratchet_at) or (
            current.send_counter >= AEAD_PACKET_SOFT_LIMIT
        ):
            self._begin(now, "rk")

    def _slave_timer(self, now: float) -> None:
        if self.epochs.current is None and self.epochs.next is None and now >= self._next_kick_at:
            self.send_kick(now)

    # ----- master: starting ----------------------------------------------------------
    def _begin(self, now: float, kind: Literal["hs", "rk"]) -> None:
        """Step HS-0 / RK-0: ask the KME for a fresh QKD key (ETSI 014 enc_keys)."""
        request_id = self._new_request()
        self._pending = _Pending(kind, request_id, now)
        self._next_attempt_at = None
        self._actions.append(FetchEncKeys(request_id, 1, self.config.qkd_bits))

    def _exchange_deadline(self, pending: _Pending) -> float:
        """Monotonic time at which an unanswered exchange is abandoned.

        Fail closed waits HANDSHAKE_TIMEOUT; a peer that may degrade gives up early enough to
        finish a degraded handshake before the current key reaches max_key_age.
        """
        deadline = pending.started + HANDSHAKE_TIMEOUT
        current = self.epochs.current
        if self.config.may_degrade and current is not None and not pending.degraded:
            margin = min(HANDSHAKE_RETRY, self.config.max_key_age / 4)
            deadline = min(deadline, current.created_at + self.config.max_key_age - margin)
        return deadline

    def _abandon(self, pending: _Pending, now: float, why: str) -> None:
        """Drop a failed exchange; the next try is a full handshake after the backoff (any doubt)."""
        self.stats.handshake_failures += 1
        self._event("handshake_abandoned" if pending.kind == "hs" else "ratchet_abandoned", reason=why)
        self._pending = None
        if self.config.may_degrade and not pending.degraded and why.startswith("qkd:"):
            self._begin_degraded(now, why)  # only this side's own KME failure, never a lost datagram
            return
        retry_at = now + max(self._fetch_backoff, HANDSHAKE_RETRY / 2)
        self._next_attempt_at = self._next_ratchet_at = self._next_kem_at = retry_at

    def _begin_degraded(self, now: float, why: str) -> None:
        """Step HS-D: QKD keys are not to be had; handshake on ML-KEM and X25519 alone (policy allows it)."""
        pending = _Pending("hs", self._new_request(), now, degraded=True)
        self._pending = pending
        self.stats.degraded_handshakes += 1
        self._event("degraded_handshake", reason=why)
        self._send_m1(pending, now)

    def set_interval(self, seconds: float) -> None:
        """Change the ratchet period (seconds) from the next step on; the hard max_key_age does not change.

        The adapter stretches it when QKD key stock runs low (DESIGN.md, Rekeying).
        """
        self.interval = seconds

    def start_handshake(self, now: float) -> None:
        """Master: start a full handshake now unless one is under way (also used on a Kick)."""
        if self.config.role == "master" and (self._pending is None or self._pending.kind == "rk"):
            self._begin(now, "hs")

    def keys_failed(self, request_id: int, reason: str, now: float) -> None:
        """Report that an ETSI 014 request failed (reason: a short text, no secrets)."""
        self.stats.qkd_failures += 1
        # Backoff doubles from 0.5 s, capped at one rekey interval (so the tunnel is back within about
        # two intervals of the KME recovering) and at FETCH_BACKOFF_MAX.
        ceiling = min(FETCH_BACKOFF_MAX, max(self.interval, 0.5))
        self._fetch_backoff = min(max(2 * self._fetch_backoff, 0.5), ceiling)
        context = self._inflight.pop(request_id, None)
        if context is not None:  # slave: those key_IDs are dead (maybe consumed); never ask for them again
            self._event("qkd_request_failed", reason=reason)
            msg = context[1]
            if isinstance(msg, InitHello | RatchetRequest):
                self._dead_key_ids.extend(msg.key_ids)
            self.send_kick(now, KICK_QKD_UNAVAILABLE)  # signed: the master takes a fresh key (or degrades)
            return
        self._event("qkd_request_failed", reason=reason, retry_in=self._fetch_backoff)
        pending = self._pending
        if pending is not None and pending.request_id == request_id:
            self._abandon(pending, now, "qkd: " + reason)

    def keys_fetched(self, request_id: int, keys: Sequence[tuple[str, Secret]], now: float) -> None:
        """Hand over the QKD keys of a Fetch*Keys action: ``(key_ID, key)`` in request order."""
        self._fetch_backoff = 0.0
        key_ids = tuple(k for k, _ in keys)
        qkd_key = Secret(b"".join(v.reveal() for _, v in keys))
        context = self._inflight.pop(request_id, None)
        if context is not None:
            self._slave_keys(context, key_ids, qkd_key, now)
            return
        pending = self._pending
        if pending is None or pending.request_id != request_id:
            self._event("qkd_keys_unused", key_ids=",".join(key_ids))
            return
        pending.key_ids, pending.qkd_key = key_ids, qkd_key
        if pending.kind == "hs":
            self._send_m1(pending, now)
        elif self.epochs.current is None:
            self._abandon(pending, now, "no session to ratchet")
        else:
            self._send_r1(pending, self.epochs.current, now)

    def _send_m1(self, p: _Pending, now: float) -> None:
        """Step HS-1: M1 = ephemeral ek, X25519 value, QKD key_IDs; signed (FIPS 204)."""
        cfg = self.config
        p.dk = cfg.kem.generate()
        p.x25519 = self._x25519_keys() if cfg.x25519 else None
        p.my_index = self._new_index()
        p.epoch = (self.epochs.current.number + 1) & 0xFFFFFFFF if self.epochs.current else 1
        m1 = InitHello(
            kem_id=KEM_IDS[cfg.kem.name],
            x25519=cfg.x25519,
            qkd_bits=cfg.qkd_bits,
            timestamp=self._wall_ns(),
            sender_index=p.my_index,
            epoch=p.epoch,
            random=self._rng(RANDOM_SIZE),
            master_sae=cfg.my_sae,
            slave_sae=cfg.peer_sae,
            ek=p.dk.encapsulation_key(),
            x25519_pub=p.x25519.public_bytes() if p.x25519 else b"",
            key_ids=p.key_ids,
        )
        signed = replace(m1, signature=self._identity.sign(ks.SIG_M1 + m1.signed_part()))
        p.m1 = signed.encode()
        p.fragments = self._send_message(InitHello.TYPE, p.m1, now)
        p.last_sent = now
        self._event("handshake_sent", epoch=p.epoch, key_ids=",".join(p.key_ids))

    def _send_r1(self, p: _Pending, base: Epoch, now: float) -> None:
        """Step RK-1: R1 = fresh QKD key_IDs, MAC under k_auth(ck_n)."""
        assert p.qkd_key is not None
        p.base, p.my_index, p.epoch = base, self._new_index(), (base.number + 1) & 0xFFFFFFFF
        r1 = RatchetRequest(base.peer_index, p.my_index, p.epoch, p.key_ids)
        r1 = replace(r1, mac=ks.mac(ks.ratchet_auth_key(base.chaining_key), ks.MAC_R1, r1.mac_part()))
        p.r1 = r1
        p.r1_hash = ks.transcript_hash(r1.encode())
        p.keys = ks.ratchet_keys(
            base.chaining_key, p.qkd_key, epoch=p.epoch, request_hash=ks.transcript_hash(r1.mac_part())
        )
        p.fragments = self._send_message(RatchetRequest.TYPE, r1.encode(), now)
        p.last_sent = now

    # ----- input: handshake-class datagrams -------------------------------------------
    def receive_fragment(self, datagram: bytes, now: float) -> None:
        """Take one handshake fragment datagram from the peer's endpoint; never raises."""
        try:
            done = self._reassembler.add(parse_fragment(datagram), now)
            if done is None:
                return
            msg_type, body = done
            self._dispatch(parse_message(msg_type, body), body, now)
        except AuthenticationError as exc:
            self.stats.auth_failures += 1
            self._event("authentication_failed", reason=str(exc))
        except (ProtocolError, CryptoError) as exc:
            self.stats.malformed_messages += 1
            self._event("bad_handshake_message", reason=str(exc))

    def _dispatch(self, msg: Message, body: bytes, now: float) -> None:
        master = self.config.role == "master"
        if master and isinstance(msg, RespHello):
            self._on_m2(msg, now)
        elif master and isinstance(msg, RatchetResponse):
            self._on_r2(msg, now)
        elif master and isinstance(msg, Kick):
            self._on_kick(msg, now)
        elif not master and isinstance(msg, InitHello):
            self._on_m1(msg, body, now)
        elif not master and isinstance(msg, RatchetRequest):
            self._on_r1(msg, body, now)
        elif not master and isinstance(msg, InitConfirm | RatchetConfirm):
            self._on_confirm(msg, now)
        else:
            raise RemoteProtocolError(f"{type(msg).__name__} is not expected by a {self.config.role}")

    # ----- master: answers -----------------------------------------------------------
    def _on_m2(self, m2: RespHello, now: float) -> None:
        """Step HS-3: check M2's signature and confirmation, install the epoch, send M3."""
        p = self._pending
        if p is None or p.kind != "hs" or p.dk is None or m2.receiver_index != p.my_index:
            self._resend_answer(ks.transcript_hash(m2.encode()))
            return
        self._verify("M2", m2.signature, ks.SIG_M2 + ks.transcript_hash(p.m1) + m2.signed_part())
        if len(m2.ct) != self.config.kem.ciphertext_size:
            raise RemoteProtocolError("M2: ciphertext of the wrong size")
        components = [p.dk.decapsulate(m2.ct)]
        if p.qkd_key is not None:  # None only in a degraded handshake (HS-D)
            components.append(p.qkd_key)
        if p.x25519 is not None:
            components.append(p.x25519.exchange(m2.x25519_pub))
        th = ks.transcript_hash(p.m1, m2.confirmed_part())
        m1 = InitHello.parse(p.m1)
        keys = ks.handshake_keys(
            components,
            transcript=th,
            master_sae=self.config.my_sae,
            slave_sae=self.config.peer_sae,
            msg_master=m1.ek + m1.x25519_pub,
            msg_slave=m2.ct + m2.x25519_pub,
        )
        if not ks.mac_ok(keys.kc_slave, ks.CONFIRM_M2, m2.confirm, th):
            raise AuthenticationError("M2 key confirmation failed")
        # Age counts from the start of the exchange: the slave cannot have made its keys earlier, so
        # this side stops using them no later than the slave does.
        epoch = self._make_epoch(
            p.epoch, p.my_index, m2.sender_index, keys, p.started, "handshake", p.key_ids
        )
        m3 = InitConfirm(m2.sender_index, p.epoch, ks.mac(keys.kc_master, ks.CONFIRM_M3, th))
        self._finish_master(epoch, ks.transcript_hash(m2.encode()), InitConfirm.TYPE, m3.encode(), now)
        first = self.stats.handshakes == 0
        self.stats.handshakes += 1
        if not first:
            self.stats.rekeys_kem += 1
        self._next_kem_at = now + self.config.kem_interval
        self._event("handshake_complete", epoch=epoch.number, key_ids=",".join(p.key_ids))

    def _on_r2(self, r2: RatchetResponse, now: float) -> None:
        """Step RK-3: check R2's confirmation, switch to the new epoch, send R3."""
        p = self._pending
        if p is None or p.kind != "rk" or p.keys is None or r2.receiver_index != p.my_index:
            self._resend_answer(ks.transcript_hash(r2.encode()))
            return
        if r2.epoch != p.epoch or not ks.mac_ok(
            p.keys.kc_slave, ks.CONFIRM_R2, r2.confirm, p.r1_hash, r2.confirmed_part()
        ):
            raise AuthenticationError("R2 key confirmation failed")
        epoch = self._make_epoch(
            p.epoch, p.my_index, r2.sender_index, p.keys, p.started, "ratchet", p.key_ids
        )
        r3 = RatchetConfirm(r2.sender_index, p.epoch)
        r3 = replace(r3, confirm=ks.mac(p.keys.kc_master, ks.CONFIRM_R3, p.r1_hash, r3.confirmed_part()))
        self._finish_master(epoch, ks.transcript_hash(r2.encode()), RatchetConfirm.TYPE, r3.encode(), now)
        self.stats.rekeys_qkd += 1
        self._event("ratchet_complete", epoch=epoch.number, key_ids=",".join(p.key_ids))

    def _finish_master(self, epoch: Epoch, answer_to: bytes, msg_type: int, body: bytes, now: float) -> None:
        self.epochs.install_current(epoch, now)
        self._note_mode(epoch)
        self._pending = None
        self._next_ratchet_at = now + self.interval
        self._remember_answer(answer_to, msg_type, body)
        self._send_message(msg_type, body, now)
        keepalive = self.epochs.seal(b"", now)  # a second, independent signal to switch (as WireGuard)
        if keepalive is not None:
            self._actions.append(SendDatagram(keepalive))

    def _on_kick(self, kick: Kick, now: float) -> None:
        """Step HS-K: a verified Kick from the slave starts a fresh handshake.

        Only a signed Kick saying the slave's KME failed lets a degradable master fall back to
        HS-D; lost datagrams never do (an attacker who drops packets cannot force a downgrade).
        """
        if kick.master_sae != self.config.my_sae or kick.slave_sae != self.config.peer_sae:
            raise AuthenticationError("Kick names other SAEs")
        self._verify("Kick", kick.signature, ks.SIG_KICK + kick.signed_part())
        if kick.timestamp <= self._last_peer_ts:
            raise RemoteProtocolError("Kick replayed (timestamp not newer)")
        self._last_peer_ts = kick.timestamp
        self._event("kick_received", reason_code=kick.reason)
        pending = self._pending
        if kick.reason == KICK_QKD_UNAVAILABLE and self.config.may_degrade:
            if pending is None or not pending.degraded:
                self._pending = None
                self._begin_degraded(now, "the peer's KME could not deliver the QKD key")
            return
        if kick.reason == KICK_QKD_UNAVAILABLE and pending is not None and pending.key_ids:
            self._pending = None  # its key_ID is dead at the slave: a fresh key, never the dead one again
            self.stats.handshake_failures += 1
            self._begin(now, pending.kind if self.epochs.current is not None else "hs")
            return
        self.start_handshake(now)

    # ----- slave ---------------------------------------------------------------------
    def send_kick(self, now: float, reason: int = KICK_NO_SESSION) -> None:
        """Slave: ask the master for a handshake (rate-limited to one per KICK_INTERVAL)."""
        if self.config.role != "slave" or now < self._next_kick_at:
            return
        self._next_kick_at = now + KICK_INTERVAL
        kick = Kick(self._wall_ns(), self.config.peer_sae, self.config.my_sae, reason)
        kick = replace(kick, signature=self._identity.sign(ks.SIG_KICK + kick.signed_part()))
        self.stats.kicks_sent += 1
        self._send_message(Kick.TYPE, kick.encode(), now)

    def _on_m1(self, m1: InitHello, body: bytes, now: float) -> None:
        """Step HS-2a: check M1 (SAE IDs, algorithms, signature, freshness), fetch the QKD key."""
        cfg = self.config
        if self._resend_answer(ks.transcript_hash(body)) or self._is_inflight(body):
            return
        if m1.master_sae != cfg.peer_sae or m1.slave_sae != cfg.my_sae:
            raise AuthenticationError(f"M1 names SAEs {m1.master_sae!r} -> {m1.slave_sae!r}")
        self._verify("M1", m1.signature, ks.SIG_M1 + m1.signed_part())
        if m1.kem_id != KEM_IDS[cfg.kem.name] or m1.x25519 != cfg.x25519 or m1.qkd_bits != cfg.qkd_bits:
            raise RemoteProtocolError("M1 algorithms differ from this side's policy")
        if len(m1.ek) != cfg.kem.encapsulation_key_size:
            raise RemoteProtocolError("M1: encapsulation key of the wrong size")
        if m1.timestamp <= self._last_peer_ts:
            raise RemoteProtocolError("M1 replayed (timestamp not newer)")
        if not m1.key_ids:  # HS-D: the master has no QKD key
            if not cfg.may_degrade:
                raise AuthenticationError(
                    "M1 carries no QKD key; this side's fail_mode qkd_and_pqc refuses it"
                )
            self._last_peer_ts = m1.timestamp
            self._send_m2(m1, body, None, now)
            return
        if self._dead(m1.key_ids, now):
            return
        request_id = self._new_request()
        self._inflight[request_id] = ("hs", m1, body, None)
        self._actions.append(FetchDecKeys(request_id, m1.key_ids))

    def _on_r1(self, r1: RatchetRequest, body: bytes, now: float) -> None:
        """Step RK-2a: check R1's MAC under the epoch it names, fetch the QKD key."""
        if self._resend_answer(ks.transcript_hash(body)) or self._is_inflight(body):
            return
        base = self.epochs.by_index.get(r1.receiver_index)
        if base is None or not self.epochs.usable(base, now):  # any live epoch (after a lost R2 the
            raise RemoteProtocolError("R1 names no live epoch")  # slave may have moved past it)
        if not ks.mac_ok(ks.ratchet_auth_key(base.chaining_key), ks.MAC_R1, r1.mac, r1.mac_part()):
            raise AuthenticationError("R1 MAC failed")
        if base is self.epochs.next:
            self.epochs.promote_next(now)  # the master ratchets from it, so it has switched
        if self._dead(r1.key_ids, now):
            return
        request_id = self._new_request()
        self._inflight[request_id] = ("rk", r1, body, base)
        self._actions.append(FetchDecKeys(request_id, r1.key_ids))

    def _dead(self, key_ids: tuple[str, ...], now: float) -> bool:
        """Whether a request names a key_ID whose delivery already failed here; Kick for a fresh one."""
        if any(key_id in self._dead_key_ids for key_id in key_ids):
            self.send_kick(now, KICK_QKD_UNAVAILABLE)
            return True
        return False

    def _is_inflight(self, body: bytes) -> bool:
        return any(ctx[2] == body for ctx in self._inflight.values())

    def _slave_keys(
        self, ctx: tuple[str, Message, bytes, Epoch | None], key_ids: tuple[str, ...], qkd: Secret, now: float
    ) -> None:
        kind, msg, body, base = ctx
        try:
            if kind == "hs" and isinstance(msg, InitHello):
                if msg.timestamp <= self._last_peer_ts:
                    return  # a newer M1 was answered meanwhile
                self._last_peer_ts = msg.timestamp  # only now: a failed dec_keys must not block resends
                self._send_m2(msg, body, qkd, now)
            elif isinstance(msg, RatchetRequest) and base is not None:
                self._send_r2(msg, body, base, qkd, now)
        except CryptoError as exc:
            self.stats.malformed_messages += 1
            self._event("bad_handshake_message", reason=str(exc))

    def _send_m2(self, m1: InitHello, m1_bytes: bytes, qkd: Secret | None, now: float) -> None:
        """Step HS-2b: encapsulate, sign, derive, confirm; install the epoch for receiving.

        ``qkd`` is None only in a degraded handshake (HS-D), which the policy allowed.
        """
        cfg = self.config
        ss, ct = cfg.kem.encapsulate(m1.ek)
        mine = self._x25519_keys() if cfg.x25519 else None
        components = (
            [ss] + ([qkd] if qkd is not None else []) + ([mine.exchange(m1.x25519_pub)] if mine else [])
        )
        my_index = self._new_index()
        m2 = RespHello(
            my_index,
            m1.sender_index,
            m1.epoch,
            self._rng(RANDOM_SIZE),
            ct,
            mine.public_bytes() if mine else b"",
        )
        sig = self._identity.sign(ks.SIG_M2 + ks.transcript_hash(m1_bytes) + m2.signed_part())
        m2 = replace(m2, signature=sig)
        th = ks.transcript_hash(m1_bytes, m2.confirmed_part())
        keys = ks.handshake_keys(
            components,
            transcript=th,
            master_sae=cfg.peer_sae,
            slave_sae=cfg.my_sae,
            msg_master=m1.ek + m1.x25519_pub,
            msg_slave=ct + m2.x25519_pub,
        )
        m2 = replace(m2, confirm=ks.mac(keys.kc_slave, ks.CONFIRM_M2, th))
        epoch = self._make_epoch(m1.epoch, my_index, m1.sender_index, keys, now, "handshake", m1.key_ids)
        epoch.confirm_key, epoch.confirm_context = keys.kc_master, th
        self._install_slave(epoch, ks.transcript_hash(m1_bytes), RespHello.TYPE, m2.encode(), now)
        self._event("handshake_answered", epoch=epoch.number, key_ids=",".join(m1.key_ids))

    def _send_r2(self, r1: RatchetRequest, r1_bytes: bytes, base: Epoch, qkd: Secret, now: float) -> None:
        """Step RK-2b: derive the next epoch from ck_n and the QKD key, install it for receiving."""
        keys = ks.ratchet_keys(
            base.chaining_key, qkd, epoch=r1.epoch, request_hash=ks.transcript_hash(r1.mac_part())
        )
        r1_hash = ks.transcript_hash(r1_bytes)
        my_index = self._new_index()
        r2 = RatchetResponse(r1.sender_index, my_index, r1.epoch)
        r2 = replace(r2, confirm=ks.mac(keys.kc_slave, ks.CONFIRM_R2, r1_hash, r2.confirmed_part()))
        epoch = self._make_epoch(r1.epoch, my_index, r1.sender_index, keys, now, "ratchet", r1.key_ids)
        epoch.confirm_key, epoch.confirm_context = keys.kc_master, r1_hash
        self._install_slave(epoch, r1_hash, RatchetResponse.TYPE, r2.encode(), now)

    def _install_slave(self, epoch: Epoch, answer_to: bytes, msg_type: int, body: bytes, now: float) -> None:
        self.epochs.install_next(epoch)
        self._remember_answer(answer_to, msg_type, body)
        self._send_message(msg_type, body, now)

    def _on_confirm(self, msg: InitConfirm | RatchetConfirm, now: float) -> None:
        """Steps HS-4 / RK-4: the master's confirmation; start sending on the new epoch."""
        epoch = self.epochs.next
        if epoch is None or msg.receiver_index != epoch.my_index or epoch.confirm_key is None:
            return  # late duplicate: the epoch was already promoted by data or an earlier confirm
        if isinstance(msg, InitConfirm):
            ok = ks.mac_ok(epoch.confirm_key, ks.CONFIRM_M3, msg.confirm, epoch.confirm_context)
        else:
            ok = ks.mac_ok(
                epoch.confirm_key, ks.CONFIRM_R3, msg.confirm, epoch.confirm_context, msg.confirmed_part()
            )
        if not ok:
            raise AuthenticationError(f"{type(msg).__name__} confirmation failed")
        self._promote(now)

    def _promote(self, now: float) -> None:
        epoch = self.epochs.promote_next(now)
        if epoch is None:
            return
        self._note_mode(epoch)
        if epoch.kind == "handshake":
            first = self.stats.handshakes == 0
            self.stats.handshakes += 1
            self.stats.rekeys_kem += 0 if first else 1
            self._event("handshake_complete", epoch=epoch.number, key_ids=",".join(epoch.key_ids))
        else:
            self.stats.rekeys_qkd += 1
            self._event("ratchet_complete", epoch=epoch.number, key_ids=",".join(epoch.key_ids))

    # ----- shared helpers ------------------------------------------------------------
    def _note_closed(self, now: float) -> None:
        """Report (an audit event) that traffic stopped: the key passed max_key_age with no successor."""
        current = self.epochs.current
        if current is None or self.mode in (None, "closed") or self.epochs.usable(current, now):
            return
        if self.epochs.next is not None and self.epochs.usable(self.epochs.next, now):
            return  # a successor waits: the slave switches on its next seal
        key_ids = ",".join(current.key_ids) or "-"
        why = "key past max_key_age, no fresh key"
        self._event(
            "mode_change", old=self.mode, new="closed", epoch=current.number, key_ids=key_ids, reason=why
        )
        self.mode = "closed"

    def _note_mode(self, epoch: Epoch) -> None:
        """Record and report (an audit event) a change between hybrid and degraded protection."""
        if epoch.kind == "handshake":
            self.last_handshake_at = epoch.created_at
        mode: Literal["hybrid", "degraded", "closed"] = "degraded" if epoch.degraded else "hybrid"
        if mode != self.mode:
            if self.mode is not None:
                self.stats.mode_changes += 1
            self._event(
                "mode_change",
                old=self.mode or "none",
                new=mode,
                epoch=epoch.number,
                key_ids=",".join(epoch.key_ids) or "-",
            )
            self.mode = mode

    def _verify(self, what: str, signature: bytes, message: bytes) -> None:
        """Check a peer signature against the pinned key (FIPS 204 ML-DSA.Verify)."""
        try:
            self._peer_key.verify(signature, message)
        except AuthenticationError as exc:
            raise AuthenticationError(
                f"{what} signature does not verify with the pinned public key of peer {self.config.name} "
                f"(fingerprint {self._peer_key.fingerprint()}): the peer holds another identity key"
            ) from exc

    def _make_epoch(
        self,
        number: int,
        my_index: int,
        peer_index: int,
        keys: ks.EpochKeys,
        now: float,
        kind: str,
        key_ids: tuple[str, ...],
    ) -> Epoch:
        master = self.config.role == "master"
        return Epoch(
            number=number,
            my_index=my_index,
            peer_index=peer_index,
            send_key=keys.k_m2s if master else keys.k_s2m,
            recv_key=keys.k_s2m if master else keys.k_m2s,
            chaining_key=keys.chaining_key,
            created_at=now,
            kind=kind,
            key_ids=key_ids,
        )

    def _remember_answer(self, request_hash: bytes, msg_type: int, body: bytes) -> None:
        self._answered[request_hash] = (msg_type, body)
        while len(self._answered) > RESPONSE_CACHE:
            self._answered.popitem(last=False)

    def _resend_answer(self, request_hash: bytes) -> bool:
        """Resend the cached answer to a request seen before (its answer was lost); True if found."""
        cached = self._answered.get(request_hash)
        if cached is None:
            return False
        msg_type, body = cached
        self._actions.extend(
            SendDatagram(f) for f in fragment_message(msg_type, body, new_message_id(self._rng))
        )
        return True

    # ----- data ----------------------------------------------------------------------
    def seal(self, packet: bytes, now: float) -> bytes | None:
        """Seal one inner packet for the peer; None (counted) if no key may be used (see ``seal_batch``)."""
        out = self.seal_batch((packet,), now)
        return out[0] if out else None

    def seal_batch(self, packets: Sequence[bytes], now: float) -> list[bytes]:
        """Seal inner packets for the peer, in order; those no key may seal are dropped and counted.

        A slave nearing the AES-GCM packet limit (RFC 9001 section 6.6) asks the master for a
        fresh handshake with a Kick (rate-limited); a master reaching it makes its ratchet timer
        due at once, since ``handle_timer`` runs only when ``next_timer`` says so.

        A slave whose sending epoch is gone or past its age switches to its receive-only epoch
        (its M3/R3 and keepalive were lost): better than dropping, and the master holds it.

        Returns:
            The data datagrams (16-byte header, ciphertext, 16-byte tag), a prefix of the batch.
        """
        epochs = self.epochs
        current = epochs.current
        if epochs.next is not None and (current is None or not epochs.usable(current, now)):
            self._promote(now)
        elif current is not None and current.send_counter + len(packets) > AEAD_PACKET_SOFT_LIMIT:
            if self.config.role == "slave":
                self.send_kick(now, KICK_PACKET_LIMIT)  # only the master rekeys: ask it for a fresh handshake
            elif current.send_counter <= AEAD_PACKET_SOFT_LIMIT:
                self._next_ratchet_at = now  # due at once (step RK-0); later seals keep any backoff
        return epochs.seal_batch(packets, now)

    def open(self, datagram: bytes, now: float) -> bytes | None:
        """Open one data datagram; None (counted) if it fails any check.

        A verified record on the slave's receive-only epoch proves the master switched: the
        slave switches too (make-before-break).
        """
        opened = self.epochs.open(datagram, now)
        if opened is None:
            if self.config.role == "slave" and (
                (self.epochs.current is None and self.epochs.next is None)
                or self.epochs.stats.drops_unknown_index > self._unknown_seen
            ):
                self._unknown_seen = self.epochs.stats.drops_unknown_index
                self.send_kick(now)  # the master sends on an epoch this side lacks: resync (rate-limited)
            return None
        plaintext, epoch = opened
        if epoch is self.epochs.next:
            self._promote(now)
        return plaintext

    def state(self, now: float) -> tuple[str, str]:
        """Return ``(state, why)``: state is up, rekeying, degraded or down; why explains down/degraded."""
        current = self.epochs.current
        if current is None or not self.epochs.usable(current, now):
            why = self.last_problem or ("no session yet" if current is None else "key past max_key_age")
            return "down", why
        if self.mode == "degraded":
            return "degraded", "no QKD key: ML-KEM and X25519 only (fail_mode pqc_only_if_qkd_down)"
        if self._pending is not None or self.epochs.next is not None:
            return "rekeying", ""
        return "up", ""

    @property
    def established(self) -> bool:
        """Whether a sending epoch exists."""
        return self.epochs.current is not None
