"""The per-peer protocol state machine, version 2: handshake, QKD ratchet, kicks and timers (sans-I/O).

Roles are fixed by the policy: the QKD *master* SAE (ETSI GS QKD 014 section 2) starts every
handshake (M1 -> M2 -> M3) and every ratchet step (R1 -> R2 -> R3); the *slave* answers and,
when it has no usable epoch, asks for a handshake with a signed Kick. Only the master starts,
so two exchanges never collide. Step labels (HS-*, RK-*, G-*) match docs/protocol.md.

Freshness comes from the responder, never from a clock: M1 echoes the slave's challenge and a
Kick echoes the master's (``guard.ChallengeBook``); each echo is accepted once. Every fragment
carries mac1 (keyed by the receiver's public identity) and M1, M2 and Kick fragments carry mac2
(keyed by the receiver's challenge), so junk and off-path spoofing are dropped before
reassembly; signature checks and KEM operations also draw on a per-peer budget.

The adapter feeds in fragments, fetched QKD keys, KME observations and the monotonic clock,
and carries out the actions from ``take_actions()``. Data records go through ``seal``/``open``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from qgate.constants import (
    AEAD_PACKET_SOFT_LIMIT,
    ANCHORS_KEPT,
    EXPENSIVE_BURST,
    EXPENSIVE_RATE,
    HANDSHAKE_RETRY,
    HANDSHAKE_TIMEOUT,
    KICK_HANDSHAKE_MIN_INTERVAL,
    KICK_INTERVAL,
    LOCAL_EVIDENCE_TTL,
    MSG_RETRY,
    RETRY_NONCE_SIZE,
    RETRY_RATE,
)
from qgate.crypto.identity import PeerPublicKey
from qgate.crypto.kem import KemDecapsulationKey
from qgate.crypto.secret import Secret
from qgate.crypto.x25519 import X25519KeyPair
from qgate.errors import AuthenticationError, CryptoError, ProtocolError, RemoteProtocolError
from qgate.protocol import guard
from qgate.protocol import keyschedule as ks
from qgate.protocol.actions import (
    Action,
    ControlStats,
    FetchDecKeys,
    FetchEncKeys,
    PeerConfig,
    PeerEvent,
    ProbeKme,
    SendDatagram,
)
from qgate.protocol.epoch import Epoch, EpochSet
from qgate.protocol.messages import (
    KEM_IDS,
    KICK_NO_SESSION,
    KICK_QKD_UNAVAILABLE,
    NO_ANCHOR,
    NO_CHALLENGE,
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
from qgate.protocol.wire import (
    MULTI_FRAGMENT_TYPES,
    Fragment,
    Reassembler,
    fragment_message,
    new_message_id,
    parse_fragment,
)

__all__ = [
    "Action",
    "ControlStats",
    "FetchDecKeys",
    "FetchEncKeys",
    "Peer",
    "PeerConfig",
    "PeerEvent",
    "ProbeKme",
    "SendDatagram",
    "Signer",
]

log = logging.getLogger(__name__)

Rng = Callable[[int], bytes]


class Signer(Protocol):
    """Signs handshake transcripts with this gateway's identity (FIPS 204 ML-DSA.Sign)."""

    def sign(self, message: bytes) -> bytes:
        """Return the signature over ``message``."""
        ...

    def public_key(self) -> PeerPublicKey:
        """Return this identity's public key (mac1 and Retry keys derive from it)."""
        ...


FETCH_BACKOFF_MAX = 8.0
"""Seconds: the longest wait between failed ETSI 014 key requests."""
DEAD_KEY_IDS = 64
"""key_IDs whose dec_keys failed, remembered so the slave never asks for them again."""
RESPONSE_CACHE = 4
"""Answers (M2/R2, M3/R3) kept to resend when the same request arrives again."""
RATCHET_TIMEOUT = 3.0
"""Seconds an unanswered ratchet step waits before the master falls back to a full handshake."""
SENT_BODIES = 8
"""Multi-fragment messages kept by message_id so a Retry can have them resent with a fresh mac2."""
PROBE_INTERVAL = 1.0
"""Seconds between on-demand KME status probes at most."""
FORCED_KICK_GAP = 0.2
"""Seconds between Kicks resent at once because a Retry brought the master's challenge."""
STALE_REPORT_INTERVAL = 5.0
"""Seconds between events about requests refused for want of local evidence (counted always)."""


@dataclass
class _Pending:
    """A master's outstanding handshake (kind "hs") or ratchet step (kind "rk")."""

    kind: Literal["hs", "rk"]
    request_id: int
    started: float
    fragments: list[bytes] = field(default_factory=list)
    message_id: int = 0
    last_sent: float = 0.0
    my_index: int = 0
    epoch: int = 0
    key_ids: tuple[str, ...] = ()
    m1: bytes = b""
    dk: KemDecapsulationKey | None = None
    x25519: X25519KeyPair | None = None
    qkd_key: Secret | None = None
    anchor: Secret | None = None
    base: Epoch | None = None
    r1_hash: bytes = b""
    keys: ks.EpochKeys | None = None
    degraded: bool = False


@dataclass(frozen=True)
class _Inflight:
    """A slave's request waiting for dec_keys."""

    kind: Literal["hs", "rk"]
    msg: InitHello | RatchetRequest
    body: bytes
    base: Epoch | None


class Peer:
    """One peer's protocol engine. Not thread-safe; all times are monotonic seconds."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        identity: Signer,
        peer_key: PeerPublicKey,
        rng: Rng,
        now: float,
        x25519_keys: Callable[[], X25519KeyPair] = X25519KeyPair.generate,
        index_taken: Callable[[int], bool] = lambda index: False,
    ) -> None:
        """Create the engine; a master starts its first handshake at once.

        Args:
            config: the peer's settings.
            identity: this gateway's ML-DSA signing key (FIPS 204), e.g. ``IdentityKey``.
            peer_key: the peer's pinned ML-DSA public key.
            rng: returns n random bytes (indexes, message ids, randoms, challenges, nonces).
            now: the current monotonic time (seconds).
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
        mine, theirs = identity.public_key().public_bytes(), peer_key.public_bytes()
        self._my_mac1, self._peer_mac1 = guard.mac1_key(mine), guard.mac1_key(theirs)
        self._my_retry, self._peer_retry = guard.retry_key(mine), guard.retry_key(theirs)
        self._challenges = guard.ChallengeBook(rng)
        self._peer_challenge: bytes | None = None
        self._expensive = guard.TokenBucket(EXPENSIVE_RATE, EXPENSIVE_BURST, now)
        self._retry_budget = guard.TokenBucket(RETRY_RATE, RETRY_RATE, now)
        self._sent_macs = guard.SentMacs()
        self._retried = guard.AnsweredIds()
        self._sent_bodies: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self._kick_ids: deque[int] = deque(maxlen=4)
        self.epochs = EpochSet(max_key_age=config.max_key_age)
        self.stats = ControlStats()
        self._actions: list[Action] = []
        self._reassembler = Reassembler()
        self._request_ids = 0
        self._pending: _Pending | None = None
        self._fetch_backoff = 0.0
        self._kem_backoff = 0.0
        self._next_ratchet_at: float | None = None
        self._next_kem_at: float | None = None
        self._next_attempt_at: float | None = now if config.role == "master" else None
        self._next_kick_at = now
        self._kick_handshake_at: float | None = None
        self._kick_reason = KICK_NO_SESSION
        self._next_forced_kick = now
        self._kick_owed: int | None = None
        self._limit_flagged: Epoch | None = None
        self._inflight: dict[int, _Inflight] = {}
        self._kme_bad_at: float | None = None
        self._next_probe_at = now
        self._next_stale_report = now
        self._anchors: deque[tuple[bytes, Secret]] = deque(maxlen=ANCHORS_KEPT)
        self._last_fragment: tuple[Fragment, bytes] | None = None
        self.mode: Literal["hybrid", "degraded", "closed"] | None = None
        self.interval = config.interval
        self.last_problem = ""
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

    def _transmit(self, fragments: Sequence[bytes]) -> None:
        """Step G-1: append mac1 (peer's identity) and mac2 (peer's challenge) and send."""
        for raw in fragments:
            datagram = guard.add_macs(raw, peer_mac1_key=self._peer_mac1, peer_challenge=self._peer_challenge)
            self._sent_macs.note(datagram)
            self._actions.append(SendDatagram(datagram))

    def _send_message(self, msg_type: int, body: bytes) -> tuple[int, list[bytes]]:
        """Fragment and send one message; return its message_id and raw fragments (for resends)."""
        message_id = new_message_id(self._rng)
        frags = fragment_message(msg_type, body, message_id)
        if msg_type in MULTI_FRAGMENT_TYPES:
            self._sent_bodies[message_id] = (msg_type, body)
            while len(self._sent_bodies) > SENT_BODIES:
                self._sent_bodies.popitem(last=False)
        self._transmit(frags)
        return message_id, frags

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
        current = self.epochs.current
        if current is not None and self.mode not in (None, "closed"):  # report the stop when it comes
            times.append(current.created_at + self.epochs.max_key_age + 1e-6)
        if self.config.role == "slave":  # a Kick once no epoch is usable (at the latest one's end)
            ends = [
                e.created_at + self.epochs.max_key_age for e in (self.epochs.current, self.epochs.next) if e
            ]
            times.append(max([*ends, self._next_kick_at]))
            if self._kick_owed is not None:
                times.append(self._next_kick_at)
        return min((t for t in times if t is not None), default=None)

    def _has_usable_epoch(self, now: float) -> bool:
        """Whether current or next can still carry traffic at ``now``."""
        return any(
            e is not None and self.epochs.usable(e, now) for e in (self.epochs.current, self.epochs.next)
        )

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: retransmits, timeouts, rekeys, kicks, epoch expiry."""
        self.epochs.expire(now)
        self._note_closed(now)
        if self.config.role == "slave":
            if now >= self._next_kick_at and self._kick_owed is not None:
                self.send_kick(now, self._kick_owed)
            elif not self._has_usable_epoch(now) and now >= self._next_kick_at:
                self.send_kick(now)
            return
        pending, current = self._pending, self.epochs.current
        key_good = current is not None and self.epochs.usable(current, now)
        if pending is not None and self._pending_due(pending, now, key_good):
            return
        if self._pending is not None:
            return
        ratchet_due = (self._next_ratchet_at is not None and now >= self._next_ratchet_at) or (
            current is not None and self._counters_near_limit(current)
        )
        if not key_good:  # never ratchet from an expired key
            if self._next_attempt_at is None or now >= self._next_attempt_at:  # backoff after failures
                self._begin(now, "hs")
        elif ratchet_due and self._kem_backoff > 0:
            self._begin(now, "rk")  # a failing full handshake never blocks ratchet steps
        elif self._next_kem_at is not None and now >= self._next_kem_at:
            self._begin(now, "hs")
        elif ratchet_due:
            self._begin(now, "rk")

    def _pending_due(self, p: _Pending, now: float, key_good: bool) -> bool:
        """Handle the pending exchange's timers (RK-X, HS-P, timeout, HS-RT); True if it acted."""
        if p.kind == "rk" and not key_good:
            # RK-X: the key this ratchet steps from passed max_key_age; the slave has dropped it.
            self._event("ratchet_abandoned", reason="the key it ratchets from passed max_key_age")
            self.stats.handshake_failures += 1
            self._pending = None
            self._begin(now, "hs")
            return True
        if p.kind == "rk" and p.fragments and now - p.started >= RATCHET_TIMEOUT:
            self._abandon(p, now, "no answer to the ratchet request")
            return True
        ratchet_due = self._next_ratchet_at is not None and now >= self._next_ratchet_at
        if p.kind == "hs" and key_good and ratchet_due and now - p.started >= 2 * HANDSHAKE_RETRY:
            # HS-P: a struggling full handshake yields to the due ratchet while the key is good.
            self._abandon(p, now, "superseded by a due ratchet step")
            return True
        if now >= self._exchange_deadline(p):
            self._abandon(p, now, "timeout")
            return True
        if p.fragments and now - p.last_sent >= HANDSHAKE_RETRY:
            self._transmit(p.fragments)  # step HS-RT / RK-RT (fresh mac2 if a challenge came meanwhile)
            p.last_sent = now
        return False

    def _counters_near_limit(self, current: Epoch) -> bool:
        """Whether either direction of ``current`` reached the soft packet limit (RFC 9001 s6.6).

        The slave's sending counter is read from the records the master opens (the replay
        window's top), so only the master decides and the slave never needs to Kick for it.
        """
        return max(current.send_counter, current.replay.highest + 1) >= AEAD_PACKET_SOFT_LIMIT

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
        """Drop a failed exchange and schedule the next try (docs/protocol.md 4.3, abandonment)."""
        self.stats.handshake_failures += 1
        self._event("handshake_abandoned" if pending.kind == "hs" else "ratchet_abandoned", reason=why)
        self._pending = None
        if self.config.may_degrade and not pending.degraded and why.startswith("qkd:"):
            self._begin_degraded(now, why)  # only this side's own KME failure, never the peer's word
            return
        retry_at = now + max(self._fetch_backoff, HANDSHAKE_RETRY / 2)
        current = self.epochs.current
        if pending.kind == "hs" and current is not None and self.epochs.usable(current, now):
            # The key is good: ratchets go on; the next full handshake backs off (0.5 s doubling).
            self._kem_backoff = min(max(2 * self._kem_backoff, HANDSHAKE_RETRY / 2), self.config.kem_interval)
            self._next_kem_at = now + self._kem_backoff
            self._next_attempt_at = retry_at
            return
        if pending.kind == "rk":
            self._next_kem_at = now  # any doubt: a full handshake next
        self._next_attempt_at = self._next_ratchet_at = retry_at
        if pending.kind == "hs":
            self._next_kem_at = retry_at

    def _begin_degraded(self, now: float, why: str) -> None:
        """Step HS-D: this side's KME failed; handshake without a QKD key (the policy allows it)."""
        pending = _Pending("hs", self._new_request(), now, degraded=True)
        if self._anchors:
            pending.anchor = self._anchors[-1][1]
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
        """Master: start a full handshake now unless one is under way (it replaces a ratchet)."""
        if self.config.role == "master" and (self._pending is None or self._pending.kind == "rk"):
            self._begin(now, "hs")

    def keys_failed(self, request_id: int, reason: str, now: float) -> None:
        """Report that an ETSI 014 request failed (reason: a short text, no secrets)."""
        self.stats.qkd_failures += 1
        self._kme_bad_at = now
        # Backoff doubles from 0.5 s, capped at one rekey interval (so the tunnel is back within about
        # two intervals of the KME recovering) and at FETCH_BACKOFF_MAX.
        ceiling = min(FETCH_BACKOFF_MAX, max(self.interval, 0.5))
        self._fetch_backoff = min(max(2 * self._fetch_backoff, 0.5), ceiling)
        context = self._inflight.pop(request_id, None)
        if context is not None:  # slave: those key_IDs are dead (maybe consumed); never ask for them again
            self._event("qkd_request_failed", reason=reason)
            self._dead_key_ids.extend(context.msg.key_ids)
            self.send_kick(now, KICK_QKD_UNAVAILABLE)  # signed: the master takes a fresh key
            return
        self._event("qkd_request_failed", reason=reason, retry_in=self._fetch_backoff)
        pending = self._pending
        if pending is not None and pending.request_id == request_id:
            self._abandon(pending, now, "qkd: " + reason)

    def kme_observed(self, ok: bool, now: float, *, empty: bool = False) -> None:
        """Report what this side's own KME answered outside a key request (status polls, probes).

        Args:
            ok: the KME answered.
            empty: it answered but holds no key for this peer (``stored_key_count`` 0).
        """
        self._kme_bad_at = now if (not ok or empty) else None

    def _local_evidence(self, now: float) -> bool:
        """Whether this side's KME failed (or was empty) within LOCAL_EVIDENCE_TTL, with no success since."""
        return self._kme_bad_at is not None and now - self._kme_bad_at <= LOCAL_EVIDENCE_TTL

    def keys_fetched(self, request_id: int, keys: Sequence[tuple[str, Secret]], now: float) -> None:
        """Hand over the QKD keys of a Fetch*Keys action: ``(key_ID, key)`` in request order."""
        self._fetch_backoff = 0.0
        self._kme_bad_at = None
        key_ids = tuple(k for k, _ in keys)
        qkd_key = Secret(b"".join(v.reveal() for _, v in keys))
        context = self._inflight.pop(request_id, None)
        if context is not None:
            self._slave_keys(context, qkd_key, now)
            return
        pending = self._pending
        if pending is None or pending.request_id != request_id:
            self._event("qkd_keys_unused", key_ids=",".join(key_ids))
            return
        pending.key_ids, pending.qkd_key = key_ids, qkd_key
        current = self.epochs.current
        if pending.kind == "hs":
            self._send_m1(pending, now)
        elif current is None or not self.epochs.usable(current, now):
            self._abandon(pending, now, "no session to ratchet")
        else:
            self._send_r1(pending, current, now)

    def _send_m1(self, p: _Pending, now: float) -> None:
        """Step HS-1: M1 = ephemeral ek, X25519 value, QKD key_IDs, the slave's challenge; signed.

        Called again when a Retry brings a newer challenge: same keys and key_IDs, new echo.
        """
        cfg = self.config
        if p.dk is None:
            p.dk = cfg.kem.generate()
            p.x25519 = self._x25519_keys() if cfg.x25519 else None
            p.my_index = self._new_index()
            p.epoch = (self.epochs.current.number + 1) & 0xFFFFFFFF if self.epochs.current else 1
        m1 = InitHello(
            kem_id=KEM_IDS[cfg.kem.name],
            x25519=cfg.x25519,
            qkd_bits=cfg.qkd_bits,
            sender_index=p.my_index,
            epoch=p.epoch,
            random=self._rng(RANDOM_SIZE),
            echo=self._peer_challenge or NO_CHALLENGE,
            challenge=self._challenges.current,
            anchor_id=ks.anchor_id(p.anchor) if p.anchor is not None else NO_ANCHOR,
            ppk_id=cfg.ppk_id if cfg.ppk is not None else "",
            master_sae=cfg.my_sae,
            slave_sae=cfg.peer_sae,
            ek=p.dk.encapsulation_key(),
            x25519_pub=p.x25519.public_bytes() if p.x25519 else b"",
            key_ids=p.key_ids,
        )
        signed = replace(m1, signature=self._identity.sign(ks.SIG_M1 + m1.signed_part()))
        p.m1 = signed.encode()
        p.message_id, p.fragments = self._send_message(InitHello.TYPE, p.m1)
        p.last_sent = now
        self._event("handshake_sent", epoch=p.epoch, key_ids=",".join(p.key_ids))

    def _send_r1(self, p: _Pending, base: Epoch, now: float) -> None:
        """Step RK-1: R1 = fresh QKD key_IDs and this side's challenge, MAC under k_auth(ck_n)."""
        assert p.qkd_key is not None
        p.base, p.my_index, p.epoch = base, self._new_index(), (base.number + 1) & 0xFFFFFFFF
        r1 = RatchetRequest(base.peer_index, p.my_index, p.epoch, self._challenges.current, p.key_ids)
        r1 = replace(r1, mac=ks.mac(ks.ratchet_auth_key(base.chaining_key), ks.MAC_R1, r1.mac_part()))
        p.r1_hash = ks.transcript_hash(r1.encode())
        p.keys = ks.ratchet_keys(
            base.chaining_key, p.qkd_key, epoch=p.epoch, request_hash=ks.transcript_hash(r1.mac_part())
        )
        p.message_id, p.fragments = self._send_message(RatchetRequest.TYPE, r1.encode())
        p.last_sent = now

    # ----- input: handshake-class datagrams -------------------------------------------
    def receive_fragment(self, datagram: bytes, now: float) -> None:
        """Take one handshake fragment or Retry datagram from the peer's endpoint; never raises.

        Order (G-2): framing, mac1, mac2 (M1/M2/Kick; a Retry answers a failure), reassembly,
        parsing, then the message's own checks. Failures are counted; unauthenticated ones are
        reported as ``unauth_*`` events, which the adapter aggregates.
        """
        try:
            if datagram[:1] == bytes([MSG_RETRY]):
                self._on_retry(datagram, now)
                return
            frag = parse_fragment(datagram)
            if not guard.mac1_ok(datagram, self._my_mac1):
                self.stats.drops_mac1 += 1
                return
            if frag.msg_type in MULTI_FRAGMENT_TYPES and not guard.mac2_ok(datagram, self._challenges.all()):
                self.stats.drops_mac2 += 1
                self._send_retry(frag, datagram, now)
                return
            done = self._reassembler.add(frag, now)
            if done is None:
                return
            self._last_fragment = (frag, datagram)
            msg_type, body = done
            self._dispatch(parse_message(msg_type, body), body, now)
        except AuthenticationError as exc:
            self.stats.auth_failures += 1
            self._event("authentication_failed", reason=str(exc))
        except (ProtocolError, CryptoError) as exc:
            self.stats.malformed_messages += 1
            self._event("bad_handshake_message", reason=str(exc))

    def _send_retry(self, frag: Fragment, datagram: bytes, now: float) -> None:
        """Step G-3: hand the current challenge to the sender of ``frag`` (rate-limited)."""
        if not self._retried.first(frag.message_id) or not self._retry_budget.take(now):
            return  # one Retry per message, and a rate limit
        self.stats.retries_sent += 1
        retry = guard.seal_retry(
            message_id=frag.message_id,
            index=frag.index,
            answered_mac1=guard.fragment_mac1(datagram),
            challenge=self._challenges.current,
            my_retry_key=self._my_retry,
            nonce=self._rng(RETRY_NONCE_SIZE),
        )
        self._actions.append(SendDatagram(retry))

    def _retry_last(self, now: float) -> None:
        """Answer the message just reassembled with a Retry (its echo was stale)."""
        self.stats.stale_challenges += 1
        if self._last_fragment is not None:
            self._send_retry(*self._last_fragment, now)

    def _on_retry(self, datagram: bytes, now: float) -> None:
        """Step G-4: a Retry for a fragment this side sent: take the challenge, resend the message."""
        head = guard.parse_retry_head(datagram)
        if head is None:
            raise RemoteProtocolError("malformed Retry")
        message_id, index = head
        sent = self._sent_macs.take(message_id, index)
        if sent is None:
            self.stats.retries_unmatched += 1
            return
        challenge = guard.open_retry(datagram, sent_mac1=sent, peer_retry_key=self._peer_retry)
        self.stats.retries_received += 1
        fresh = challenge != self._peer_challenge
        self._peer_challenge = challenge
        body = self._sent_bodies.pop(message_id, None)
        p = self._pending
        if p is not None and p.kind == "hs" and p.message_id == message_id:
            if fresh:
                self._send_m1(p, now)  # re-signed with the new echo, same keys and key_IDs
        elif message_id in self._kick_ids and now >= self._next_forced_kick:
            self._kick_ids.remove(message_id)
            self._next_forced_kick = now + FORCED_KICK_GAP
            self.send_kick(now, self._kick_reason, force=True)
        elif body is not None:
            self._send_message(*body)  # an answer (M2) whose mac2 the peer could not check

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

    def _spend(self, what: str, now: float) -> bool:
        """Take one unit of the expensive-work budget (G-5); False (counted) when it is spent."""
        if self._expensive.take(now):
            return True
        self.stats.drops_budget += 1
        self._actions.append(PeerEvent("unauth_over_budget", {"peer": self.config.name, "message": what}))
        return False

    # ----- master: answers -----------------------------------------------------------
    def _on_m2(self, m2: RespHello, now: float) -> None:
        """Step HS-3: check M2's signature and confirmation, install the epoch, send M3."""
        p = self._pending
        if p is None or p.kind != "hs" or p.dk is None or m2.receiver_index != p.my_index:
            self._resend_answer(ks.transcript_hash(m2.encode()))
            return
        if m2.epoch != p.epoch:
            raise RemoteProtocolError("M2 names another epoch")
        if len(m2.ct) != self.config.kem.ciphertext_size:
            raise RemoteProtocolError("M2: ciphertext of the wrong size")
        if len(m2.x25519_pub) != (32 if p.x25519 is not None else 0):
            raise RemoteProtocolError("M2: X25519 value of the wrong size")
        if not self._spend("M2", now):
            return
        self._verify("M2", m2.signature, ks.SIG_M2 + ks.transcript_hash(p.m1) + m2.signed_part())
        self._peer_challenge = m2.challenge
        components = [p.dk.decapsulate(m2.ct)]
        mode = ks.MODE_HYBRID
        if p.qkd_key is not None:
            components.append(p.qkd_key)
        elif p.anchor is not None:
            components.append(p.anchor)
            mode = ks.MODE_ANCHORED
        else:
            mode = ks.MODE_BARE
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
            mode=mode,
            ppk=self.config.ppk,
        )
        if not ks.mac_ok(keys.kc_slave, ks.CONFIRM_M2, m2.confirm, th):
            raise AuthenticationError("M2 key confirmation failed")
        # Age counts from the start of the exchange: the slave cannot have made its keys earlier, so
        # this side stops using them no later than the slave does.
        epoch = self._make_epoch(
            p.epoch, p.my_index, m2.sender_index, keys, p.started, "handshake", p.key_ids
        )
        self._keep_anchor(epoch, qkd_backed=mode != ks.MODE_BARE)
        m3 = InitConfirm(m2.sender_index, p.epoch, ks.mac(keys.kc_master, ks.CONFIRM_M3, th))
        self._finish_master(epoch, ks.transcript_hash(m2.encode()), InitConfirm.TYPE, m3.encode(), now)
        first = self.stats.handshakes == 0
        self.stats.handshakes += 1
        if not first:
            self.stats.rekeys_kem += 1
        self._kem_backoff = 0.0
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
        self._keep_anchor(epoch, qkd_backed=True)
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
        self._send_message(msg_type, body)
        keepalive = self.epochs.seal(b"", now)  # a second, independent signal to switch (as WireGuard)
        if keepalive is not None:
            self._actions.append(SendDatagram(keepalive))

    def _on_kick(self, kick: Kick, now: float) -> None:
        """Step HS-K: a fresh, verified Kick from the slave asks for a fresh exchange.

        A Kick never degrades anything (only this side's own KME can): reason 1 only replaces
        the pending exchange's QKD key with a fresh one. Kick-driven handshakes are limited to
        one per KICK_HANDSHAKE_MIN_INTERVAL.
        """
        if kick.master_sae != self.config.my_sae or kick.slave_sae != self.config.peer_sae:
            raise AuthenticationError("Kick names other SAE IDs")
        if not self._challenges.fresh(kick.echo):
            self._retry_last(now)  # replayed, or the slave had no challenge of ours yet
            return
        if not self._spend("Kick", now):
            return
        self._verify("Kick", kick.signature, ks.SIG_KICK + kick.signed_part())
        self._challenges.consume(kick.echo)
        self._peer_challenge = kick.challenge
        self._event("kick_received", reason_code=kick.reason)
        if (
            self._kick_handshake_at is not None
            and now - self._kick_handshake_at < KICK_HANDSHAKE_MIN_INTERVAL
        ):
            self.stats.kicks_ignored += 1
            return
        pending = self._pending
        if kick.reason == KICK_QKD_UNAVAILABLE and pending is not None and pending.key_ids:
            self._kick_handshake_at = now
            self._pending = None  # its key_ID is dead at the slave: a fresh key, never the dead one again
            self.stats.handshake_failures += 1
            self._event("qkd_keys_unused", key_ids=",".join(pending.key_ids))
            self._begin(now, pending.kind if self.epochs.current is not None else "hs")
            return
        if kick.reason == KICK_NO_SESSION and (pending is None or pending.kind == "rk"):
            self._kick_handshake_at = now
            self.start_handshake(now)
            return
        if (
            kick.reason == KICK_NO_SESSION
            and pending is not None
            and now - pending.started >= 2 * HANDSHAKE_RETRY
        ):
            # The slave still has no session although our M1 went out more than once: it cannot take
            # that M1 (e.g. its dec_keys failed for those key_IDs). A fresh handshake, fresh key.
            self._kick_handshake_at = now
            self._pending = None
            self.stats.handshake_failures += 1
            self._event("handshake_abandoned", reason="the slave still asks for a session")
            self._begin(now, "hs")
            return
        self.stats.kicks_ignored += 1

    # ----- slave ---------------------------------------------------------------------
    def send_kick(self, now: float, reason: int = KICK_NO_SESSION, *, force: bool = False) -> None:
        """Slave: ask the master for a handshake (at most one per KICK_INTERVAL unless ``force``).

        ``force`` is used once a Retry brought the master's challenge for a Kick just sent.
        """
        if self.config.role != "slave":
            return
        if now < self._next_kick_at and not force:
            if reason == KICK_QKD_UNAVAILABLE or self._kick_owed is None:
                self._kick_owed = reason  # sent when the rate limit allows (a dead key_ID outranks)
            return
        self._kick_owed = None
        self._next_kick_at = now + KICK_INTERVAL
        self._kick_reason = reason
        kick = Kick(
            self.config.peer_sae,
            self.config.my_sae,
            reason,
            self._peer_challenge or NO_CHALLENGE,
            self._challenges.current,
        )
        kick = replace(kick, signature=self._identity.sign(ks.SIG_KICK + kick.signed_part()))
        self.stats.kicks_sent += 1
        message_id, _ = self._send_message(Kick.TYPE, kick.encode())
        self._kick_ids.append(message_id)

    def _on_m1(self, m1: InitHello, body: bytes, now: float) -> None:
        """Step HS-2a: cheap checks, fresh echo, budget, signature, PPK, fail mode; fetch the QKD key."""
        cfg = self.config
        if self._resend_answer(ks.transcript_hash(body)) or self._is_inflight(body):
            return
        if m1.master_sae != cfg.peer_sae or m1.slave_sae != cfg.my_sae:
            raise AuthenticationError("M1 names other SAE IDs")
        if m1.kem_id != KEM_IDS[cfg.kem.name] or m1.x25519 != cfg.x25519 or m1.qkd_bits != cfg.qkd_bits:
            raise RemoteProtocolError("M1 algorithms differ from this side's policy")
        if len(m1.ek) != cfg.kem.encapsulation_key_size:
            raise RemoteProtocolError("M1: encapsulation key of the wrong size")
        if len(m1.x25519_pub) != (32 if cfg.x25519 else 0):
            raise RemoteProtocolError("M1: X25519 value of the wrong size")
        if not self._challenges.fresh(m1.echo):
            self._retry_last(now)  # a replayed M1, or the master had no challenge of ours yet
            return
        if not self._spend("M1", now):
            return
        self._verify("M1", m1.signature, ks.SIG_M1 + m1.signed_part())
        self._peer_challenge = m1.challenge
        self._check_ppk(m1)
        if not m1.key_ids:
            self._on_degraded_m1(m1, body, now)
            return
        if self._dead(m1.key_ids, now):
            return
        request_id = self._new_request()
        self._inflight[request_id] = _Inflight("hs", m1, body, None)
        self._actions.append(FetchDecKeys(request_id, m1.key_ids))

    def _check_ppk(self, m1: InitHello) -> None:
        """The PPK rule (RFC 8784 style): both use the same PPK, or neither, unless one requires it."""
        cfg = self.config
        if m1.ppk_id:
            if cfg.ppk is None or m1.ppk_id != cfg.ppk_id:
                raise AuthenticationError("M1 names a PPK this side does not hold")
        elif cfg.ppk is not None and cfg.ppk_mandatory:
            raise AuthenticationError("M1 uses no PPK; this side's policy makes its PPK mandatory")

    def _on_degraded_m1(self, m1: InitHello, body: bytes, now: float) -> None:
        """Step HS-D at the slave: only on this side's own evidence, with the anchor it holds."""
        cfg = self.config
        if not cfg.may_degrade:
            raise AuthenticationError("M1 carries no QKD key; this side's fail_mode qkd_and_pqc refuses it")
        if not self._local_evidence(now):
            self.stats.degrade_refused += 1
            if now >= self._next_probe_at:  # ask the own KME; the master's resend may then pass
                self._next_probe_at = now + PROBE_INTERVAL
                self._actions.append(ProbeKme())
            if now >= self._next_stale_report:
                self._next_stale_report = now + STALE_REPORT_INTERVAL
                self._event("degrade_refused", reason="this side's KME works: no degraded handshake")
            return
        anchor: Secret | None = None
        if m1.anchor_id != NO_ANCHOR:
            anchor = next((ck for aid, ck in self._anchors if aid == m1.anchor_id), None)
            if anchor is None:
                raise AuthenticationError("degraded M1 names an anchor key this side does not hold")
        elif self._anchors:
            raise AuthenticationError("degraded M1 without the anchor key this side holds")
        self._challenges.consume(m1.echo)
        self._send_m2(m1, body, None, anchor, now)

    def _on_r1(self, r1: RatchetRequest, body: bytes, now: float) -> None:
        """Step RK-2a: check R1's MAC under the epoch it names, fetch the QKD key."""
        if self._resend_answer(ks.transcript_hash(body)) or self._is_inflight(body):
            return
        base = self.epochs.by_index.get(r1.receiver_index)
        if base is None or not self.epochs.usable(base, now):  # any live epoch (after a lost R2 the
            raise RemoteProtocolError("R1 names no live epoch")  # slave may have moved past it)
        if not ks.mac_ok(ks.ratchet_auth_key(base.chaining_key), ks.MAC_R1, r1.mac, r1.mac_part()):
            raise AuthenticationError("R1 MAC failed")
        self._peer_challenge = r1.challenge
        if base is self.epochs.next:
            self._promote(now)  # the master ratchets from it, so it has switched
        if self._dead(r1.key_ids, now):
            return
        request_id = self._new_request()
        self._inflight[request_id] = _Inflight("rk", r1, body, base)
        self._actions.append(FetchDecKeys(request_id, r1.key_ids))

    def _dead(self, key_ids: tuple[str, ...], now: float) -> bool:
        """Whether a request names a key_ID whose delivery already failed here; Kick for a fresh one."""
        if any(key_id in self._dead_key_ids for key_id in key_ids):
            self.send_kick(now, KICK_QKD_UNAVAILABLE)
            return True
        return False

    def _is_inflight(self, body: bytes) -> bool:
        return any(ctx.body == body for ctx in self._inflight.values())

    def _slave_keys(self, ctx: _Inflight, qkd: Secret, now: float) -> None:
        try:
            if isinstance(ctx.msg, InitHello):
                if not self._challenges.fresh(ctx.msg.echo):
                    return  # another M1 answered this challenge meanwhile
                self._challenges.consume(ctx.msg.echo)  # only now: a failed dec_keys must not block resends
                self._send_m2(ctx.msg, ctx.body, qkd, None, now)
            elif ctx.base is not None:
                self._send_r2(ctx.msg, ctx.body, ctx.base, qkd, now)
        except CryptoError as exc:
            self.stats.malformed_messages += 1
            self._event("bad_handshake_message", reason=str(exc))

    def _send_m2(
        self, m1: InitHello, m1_bytes: bytes, qkd: Secret | None, anchor: Secret | None, now: float
    ) -> None:
        """Step HS-2b: encapsulate, sign, derive, confirm; install the epoch for receiving.

        ``qkd`` is None only in a degraded handshake (HS-D): then ``anchor`` (if any) takes its place.
        """
        cfg = self.config
        ss, ct = cfg.kem.encapsulate(m1.ek)
        mine = self._x25519_keys() if cfg.x25519 else None
        second = qkd if qkd is not None else anchor
        mode = ks.MODE_HYBRID if qkd is not None else ks.MODE_ANCHORED if anchor is not None else ks.MODE_BARE
        components = [ss] + ([second] if second is not None else [])
        if mine is not None:
            components.append(mine.exchange(m1.x25519_pub))
        my_index = self._new_index()
        m2 = RespHello(
            my_index,
            m1.sender_index,
            m1.epoch,
            self._rng(RANDOM_SIZE),
            self._challenges.current,
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
            mode=mode,
            ppk=cfg.ppk if m1.ppk_id else None,
        )
        m2 = replace(m2, confirm=ks.mac(keys.kc_slave, ks.CONFIRM_M2, th))
        epoch = self._make_epoch(m1.epoch, my_index, m1.sender_index, keys, now, "handshake", m1.key_ids)
        epoch.confirm_key, epoch.confirm_context = keys.kc_master, th
        self._keep_anchor(epoch, qkd_backed=mode != ks.MODE_BARE)
        self._install_slave(epoch, ks.transcript_hash(m1_bytes), RespHello.TYPE, m2.encode())
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
        self._keep_anchor(epoch, qkd_backed=True)
        self._install_slave(epoch, r1_hash, RatchetResponse.TYPE, r2.encode())

    def _install_slave(self, epoch: Epoch, answer_to: bytes, msg_type: int, body: bytes) -> None:
        self.epochs.install_next(epoch)
        self._remember_answer(answer_to, msg_type, body)
        self._send_message(msg_type, body)

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
    def _keep_anchor(self, epoch: Epoch, *, qkd_backed: bool) -> None:
        """Remember the chaining key of a QKD-backed epoch for degraded handshakes (KS-AN)."""
        if qkd_backed:
            self._anchors.append((ks.anchor_id(epoch.chaining_key), epoch.chaining_key))

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
        self._send_message(*cached)
        return True

    # ----- data ----------------------------------------------------------------------
    def seal(self, packet: bytes, now: float) -> bytes | None:
        """Seal one inner packet for the peer; None (counted) if no key may be used (see ``seal_batch``)."""
        out = self.seal_batch((packet,), now)
        return out[0] if out else None

    def seal_batch(self, packets: Sequence[bytes], now: float) -> list[bytes]:
        """Seal inner packets for the peer, in order; those no key may seal are dropped and counted.

        A master reaching the AES-GCM soft packet limit (RFC 9001 section 6.6) makes its ratchet
        timer due at once, since ``handle_timer`` runs only when ``next_timer`` says so. (The
        master also watches the slave's counters in ``open``: the slave never needs to ask.)

        A slave whose sending epoch is gone or past its age switches to its receive-only epoch
        (its M3/R3 and keepalive were lost): better than dropping, and the master holds it.

        Returns:
            The data datagrams (16-byte header, ciphertext, 16-byte tag), a prefix of the batch.
        """
        epochs = self.epochs
        current = epochs.current
        if epochs.next is not None and (current is None or not epochs.usable(current, now)):
            self._promote(now)
        elif (
            self.config.role == "master"
            and current is not None
            and current.send_counter + len(packets) > AEAD_PACKET_SOFT_LIMIT >= current.send_counter
        ):
            self._next_ratchet_at = now  # due at once (step RK-0); later seals keep any backoff
        return epochs.seal_batch(packets, now)

    def open(self, datagram: bytes, now: float) -> bytes | None:
        """Open one data datagram; None (counted) if it fails any check.

        A verified record on the slave's receive-only epoch proves the master switched: the
        slave switches too (make-before-break). A record that does not open makes a slave Kick
        only when it has no usable epoch (it Kicks then anyway): unauthenticated data never
        costs a handshake.
        """
        opened = self.epochs.open(datagram, now)
        if opened is None:
            if self.config.role == "slave" and not self._has_usable_epoch(now):
                self.send_kick(now)  # rate-limited to one per KICK_INTERVAL
            return None
        plaintext, epoch = opened
        if epoch is self.epochs.next:
            self._promote(now)
        elif (
            self.config.role == "master"
            and epoch is self.epochs.current
            and epoch is not self._limit_flagged
            and epoch.replay.highest + 1 >= AEAD_PACKET_SOFT_LIMIT
        ):
            self._limit_flagged = epoch
            self._next_ratchet_at = now  # the slave's key nears the packet limit: rekey (RK-0), once
        return plaintext

    def state(self, now: float) -> tuple[str, str]:
        """Return ``(state, why)``: state is up, rekeying, degraded or down; why explains down/degraded."""
        current = self.epochs.current
        if current is None or not self.epochs.usable(current, now):
            why = self.last_problem or ("no session yet" if current is None else "key past max_key_age")
            return "down", why
        if self.mode == "degraded":
            return "degraded", "no QKD key at this side's KME (fail_mode pqc_only_if_qkd_down)"
        if self._pending is not None or self.epochs.next is not None:
            return "rekeying", ""
        return "up", ""

    @property
    def established(self) -> bool:
        """Whether a sending epoch exists."""
        return self.epochs.current is not None
