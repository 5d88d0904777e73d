"""Shared state and helpers of one peer's protocol engine (sans-I/O); see ``qgate.protocol.peer``.

``PeerCore`` holds every field of the engine and the steps both roles use: sending fragments
through the guard (G-1), Retries (G-3), the expensive-work budget (G-5), signature checks, epochs,
anchors (KS-AN), the answer cache and mode reporting. ``master.MasterSteps`` and
``slave.SlaveSteps`` add each role's steps; ``peer.Peer`` combines them with the inputs and timers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from qgate.constants import (
    ANCHORS_KEPT,
    EXPENSIVE_BURST,
    EXPENSIVE_RATE,
    KICK_HANDSHAKE_MIN_INTERVAL,
    LOCAL_EVIDENCE_TTL,
    PROTOCOL_VERSION,
    RETRY_BURST,
    RETRY_NONCE_SIZE,
    RETRY_RATE,
)
from qgate.crypto.aead import RecordKey
from qgate.crypto.identity import PeerPublicKey
from qgate.crypto.kem import KemDecapsulationKey
from qgate.crypto.secret import Secret
from qgate.crypto.x25519 import X25519KeyPair
from qgate.errors import AuthenticationError
from qgate.protocol import guard
from qgate.protocol import keyschedule as ks
from qgate.protocol.actions import (
    Action,
    ControlStats,
    PeerConfig,
    PeerEvent,
    SendDatagram,
)
from qgate.protocol.epoch import Epoch, EpochSet
from qgate.protocol.messages import (
    KICK_NO_SESSION,
    InitHello,
    RatchetRequest,
    RespHello,
)
from qgate.protocol.wire import (
    MULTI_FRAGMENT_TYPES,
    Fragment,
    Reassembler,
    fragment_message,
    new_message_id,
)

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
UNAUTHENTICATED_KINDS: Final = frozenset({"authentication_failed", "bad_handshake_message"})
"""Event kinds (besides ``unauth_*``) that report input anyone can send: never the state's first why."""
ANSWER_RESEND_GAP = 0.5
"""Seconds between resends of one cached answer (M2, R2, M3, R3) at least: half HANDSHAKE_RETRY."""
STALE_REPORT_INTERVAL = 5.0
"""Seconds between events about requests refused for want of local evidence (counted always)."""


SENDER_INDEX_OFFSETS: Final = {InitHello.TYPE: 5, RespHello.TYPE: 1}
"""Byte offset of ``sender_index`` (u32) in the body of M1 (version, kem_id, x25519, qkd_bits) and of
M2 (version), which a first fragment's payload starts with (messages.py)."""


def sender_index_hint(frag: Fragment) -> int:
    """The sender_index an M1's or M2's first fragment names, unauthenticated (a steering hint only), or 0."""
    offset = SENDER_INDEX_OFFSETS.get(frag.msg_type)
    payload = frag.payload
    if offset is None or frag.index != 0 or len(payload) < offset + 4 or payload[0] != PROTOCOL_VERSION:
        return 0
    return int.from_bytes(payload[offset : offset + 4], "big")


@dataclass
class Pending:
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
    m1_sent: list[bytes] = field(default_factory=list)  # every signed variant (a Retry re-signs)
    m1_echo: bytes = b""  # the slave's challenge the newest M1 echoes
    dk: KemDecapsulationKey | None = None
    x25519: X25519KeyPair | None = None
    qkd_key: Secret | None = None
    anchor: Secret | None = None
    base: Epoch | None = None
    r1_hash: bytes = b""
    keys: ks.EpochKeys | None = None
    degraded: bool = False


@dataclass(frozen=True)
class Inflight:
    """A slave's request waiting for dec_keys."""

    kind: Literal["hs", "rk"]
    msg: InitHello | RatchetRequest
    body: bytes
    base: Epoch | None


class PeerCore:
    """The fields and shared steps of one peer's engine. Not thread-safe; times are monotonic seconds."""

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
        self._my_retry = RecordKey(Secret(guard.retry_key(mine)))  # AES-GCM context built once
        self._peer_retry = guard.retry_key(theirs)
        self._challenges = guard.ChallengeBook(rng)
        self._peer_challenge: bytes | None = None
        self._expensive = guard.TokenBucket(EXPENSIVE_RATE, EXPENSIVE_BURST, now)
        self._retry_budget = guard.TokenBucket(RETRY_RATE, RETRY_BURST, now)
        self._sent_macs = guard.SentMacs()
        self._retried = guard.AnsweredIds()
        self._sent_bodies: OrderedDict[int, tuple[int, bytes, int | None]] = OrderedDict()
        self._kick_ids: deque[int] = deque(maxlen=4)
        self.epochs = EpochSet(max_key_age=config.max_key_age)
        self.stats = ControlStats()
        self._actions: list[Action] = []
        self._reassembler = Reassembler()
        self._session_reassembler = Reassembler()  # fragments under a session mac2 only
        self._request_ids = 0
        self._pending: Pending | None = None
        self._fetch_backoff = 0.0
        self._kem_backoff = 0.0
        self._next_ratchet_at: float | None = None
        self._next_kem_at: float | None = None
        self._next_attempt_at: float | None = now if config.role == "master" else None
        self._next_kick_at = now
        self._kick_handshake_at: float | None = None
        self._kick_gap = KICK_HANDSHAKE_MIN_INTERVAL
        self._kick_reason = KICK_NO_SESSION
        self._next_forced_kick = now
        self._kick_owed: int | None = None
        self._next_rebuild_at = now
        self._resent_answers: deque[bytes] = deque(maxlen=RESPONSE_CACHE)
        self._limit_flagged: Epoch | None = None
        self._inflight: dict[int, Inflight] = {}
        self._kme_bad_at: float | None = None
        self._next_probe_at = now
        self._next_stale_report = now
        self._next_mac1_report = now
        self._next_mac2_report = now
        self._rendezvous = 0  # steering hint while this side holds no epoch (_note_unknown_record)
        self._last_unknown_index = 0
        self._mac1_reported = 0  # drops_mac1 / drops_mac2 already counted in an unauth_* event
        self._mac2_reported = 0
        self._anchors: deque[tuple[bytes, Secret]] = deque(maxlen=ANCHORS_KEPT)
        self._last_fragment: tuple[Fragment, bytes] | None = None
        self.mode: Literal["hybrid", "degraded", "closed"] | None = None
        self.interval = config.interval
        self.last_problem = ""  # the last local or authenticated problem (``_event``)
        self.last_unauthenticated_problem = ""
        self._dead_key_ids: deque[tuple[str, int]] = deque(maxlen=DEAD_KEY_IDS)  # (key_ID, Kick reason)
        self.last_handshake_at: float | None = None
        self._answered: OrderedDict[bytes, tuple[int, bytes, int | None]] = OrderedDict()
        self._answered_at: dict[bytes, float] = {}  # request hash -> when its answer was last sent
        self._sm2_keys: dict[tuple[int, int], bytes] = {}  # (my_index, number) -> K_sm
        self._session_request = False  # the message being handled came under a session mac2
        self._last_record_at: float | None = None  # a record from the peer last opened

    def take_actions(self) -> list[Action]:
        """Return and clear the actions produced so far, in order."""
        actions, self._actions = self._actions, []
        return actions

    def _event(self, kind: str, **detail: str | int | float) -> None:
        """Queue a ``PeerEvent``; one with a reason becomes the ``why`` that ``state`` reports.

        Reasons of input anyone can send (``UNAUTHENTICATED_KINDS``) are kept apart and shown only
        while no local or authenticated problem explains the state, so a spoofed datagram cannot
        hide the real cause (a KME outage, say) from the operator.
        """
        if "reason" in detail:
            problem = f"{kind}: {detail['reason']}"
            if kind in UNAUTHENTICATED_KINDS or kind.startswith("unauth_"):
                self.last_unauthenticated_problem = problem
            else:
                self.last_problem = problem
        self._actions.append(PeerEvent(kind, {"peer": self.config.name, **detail}))

    def _steer_index(self) -> int:
        """The steering hint for messages to the peer (wire.py).

        The peer's index of our current epoch; with no epoch (a restart), the index the peer's records
        still name (``_note_unknown_record``: the index this side had before it lost its state, which
        the peer steers as its epoch's peer index); else 0.
        """
        current = self.epochs.current
        return current.peer_index if current is not None else self._rendezvous

    def _note_unknown_record(self, datagram: bytes) -> None:
        """A record that opened on no epoch while this side has none: learn its receiver index.

        Adopted as the rendezvous hint when none is held yet, or when two such records in a row name
        it (the peer's records all do; random junk does not repeat). Only a steering hint: nothing is
        trusted on it, and a wrong one only leaves the message on the peer's control socket.
        """
        if len(datagram) < 8:
            return
        index = int.from_bytes(datagram[4:8], "big")
        if index and (index == self._last_unknown_index or not self._rendezvous):
            self._rendezvous = index
        self._last_unknown_index = index

    def _session_key(self, epoch: Epoch) -> bytes:
        """Return ``K_sm`` of ``epoch`` (keyschedule KS-SM), derived once per epoch.

        Keys of epochs this side no longer holds are forgotten (no reference to an old epoch stays).
        """
        cache = self._sm2_keys
        tag = (epoch.my_index, epoch.number)
        key = cache.get(tag)
        if key is None:
            for old in [t for t in cache if self.epochs.by_index.get(t[0]) is None]:
                del cache[old]
            key = cache[tag] = ks.session_mac2_key(epoch.chaining_key)
        return key

    def _sending_session_key(self) -> bytes | None:
        """The key of a session mac2 on what this side sends (G-1), or None for the challenge's mac2.

        The current epoch's, unless it is closed (past max_key_age).
        """
        current = self.epochs.current
        if current is None or self.mode == "closed":
            return None
        return self._session_key(current)

    def _receiving_session_keys(self, now: float) -> list[bytes]:
        """Keys a session mac2 from the peer may be made under: those of every usable epoch (G-2)."""
        return [self._session_key(e) for e in self.epochs.by_index.values() if self.epochs.usable(e, now)]

    def _transmit(self, fragments: Sequence[bytes], *, session: bool = True) -> None:
        """Step G-1: append mac1 (peer's identity) and mac2 (session or peer's challenge) and send.

        ``session`` False: the challenge's mac2 even with a usable epoch (a resend a Retry asked for:
        the peer may lack the epoch; an on-path forged Retry changes only that one transmission).
        """
        session_key = self._sending_session_key() if session else None
        for raw in fragments:
            datagram = guard.add_macs(
                raw,
                peer_mac1_key=self._peer_mac1,
                peer_challenge=self._peer_challenge,
                session_key=session_key,
            )
            self._sent_macs.note(datagram)
            self._actions.append(SendDatagram(datagram))

    def _send_message(
        self, msg_type: int, body: bytes, receiver_index: int | None = None, *, session: bool = True
    ) -> tuple[int, list[bytes]]:
        """Fragment and send one message; return its message_id and raw fragments (for resends).

        ``receiver_index`` is the steering hint (wire.py): the index the message names, or None for
        :meth:`_steer_index`.
        """
        message_id = new_message_id(self._rng)
        hint = self._steer_index() if receiver_index is None else receiver_index
        frags = fragment_message(msg_type, body, message_id, hint)
        if msg_type in MULTI_FRAGMENT_TYPES:
            self._sent_bodies[message_id] = (msg_type, body, receiver_index)
            while len(self._sent_bodies) > SENT_BODIES:
                self._sent_bodies.popitem(last=False)
        self._transmit(frags, session=session)
        return message_id, frags

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "big")
            if index and index not in self.epochs.by_index and not self._index_taken(index):
                return index

    def _new_request(self) -> int:
        self._request_ids += 1
        return self._request_ids

    def has_session(self, now: float) -> bool:
        """Whether current or next can still carry traffic at ``now`` (monotonic s)."""
        return any(
            e is not None and self.epochs.usable(e, now) for e in (self.epochs.current, self.epochs.next)
        )

    def set_interval(self, seconds: float) -> None:
        """Change the ratchet period (seconds) from the next step on; the hard max_key_age does not change.

        The adapter stretches it when QKD key stock runs low (DESIGN.md, Rekeying).
        """
        self.interval = seconds

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

    def _send_retry(
        self, frag: Fragment, datagram: bytes, now: float, *, whole_message: bool = False, hint: int = 0
    ) -> None:
        """Step G-3: hand the current challenge to the sender of ``frag`` (rate-limited).

        Only a full-size first fragment is answered, so a Retry (76 bytes) is always much smaller
        than what draws it, and a message_id at most once per half second (``guard.AnsweredIds``):
        the sender's retransmission (HS-RT) draws a lost one again. ``whole_message``: ``frag``
        completed a message that passed mac2 but echoed a stale challenge; any fragment then.

        The Retry's steering hint is the index the answered message names for its sender (``hint``,
        else read from an M1's or M2's first fragment, ``sender_index_hint``), which is live at the
        sender (its pending M1, its next epoch): so the Retry reaches the sender's data socket even
        when it holds no session with us (a restart) and its control socket is flooded. Else our
        current epoch's peer index, or 0.
        """
        if not whole_message and (frag.index != 0 or frag.count < 2):
            return
        if self._retried.recent(frag.message_id, now) or not self._retry_budget.take(now):
            return  # one Retry per message, and a rate limit (a message is marked only once answered)
        self._retried.add(frag.message_id, now)
        self.stats.retries_sent += 1
        retry = guard.seal_retry(
            message_id=frag.message_id,
            index=frag.index,
            answered_mac1=guard.fragment_mac1(datagram),
            challenge=self._challenges.current,
            my_retry_key=self._my_retry,
            nonce=self._rng(RETRY_NONCE_SIZE),
            receiver_index=hint or sender_index_hint(frag) or self._steer_index(),
        )
        self._actions.append(SendDatagram(retry))

    def _retry_last(self, now: float, hint: int = 0) -> None:
        """Answer the message just reassembled with a Retry (its echo was stale).

        ``hint``: the index the message names for its sender (an M1's sender_index), or 0.
        """
        self.stats.stale_challenges += 1
        if self._last_fragment is not None:
            self._send_retry(*self._last_fragment, now, whole_message=True, hint=hint)

    def _spend(self, what: str, now: float) -> bool:
        """Take one unit of the expensive-work budget (G-5); False (counted) when it is spent.

        A request that came under a session mac2 is the session key holder's: it costs no budget.
        """
        if self._session_request:
            self.stats.session_requests += 1
            return True
        if self._expensive.take(now):
            return True
        self.stats.drops_budget += 1
        self._actions.append(PeerEvent("unauth_over_budget", {"peer": self.config.name, "message": what}))
        return False

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

    def _remember_answer(
        self, request_hash: bytes, msg_type: int, body: bytes, receiver_index: int, now: float
    ) -> None:
        self._answered[request_hash] = (msg_type, body, receiver_index)
        self._answered_at[request_hash] = now
        while len(self._answered) > RESPONSE_CACHE:
            old, _ = self._answered.popitem(last=False)
            self._answered_at.pop(old, None)

    def _resend_answer(self, request_hash: bytes, now: float) -> bool:
        """Resend the cached answer to a request seen before (its answer was lost); True if found.

        At most once per ANSWER_RESEND_GAP per request: the master retransmits every HANDSHAKE_RETRY
        (1 s), so a lost answer is still resent at its first retransmission, but a replayed request
        (an on-path attacker's, to the data socket, where no control pacing applies) costs a hash
        lookup, not a message each time.
        """
        cached = self._answered.get(request_hash)
        if cached is None:
            return False
        if now - self._answered_at.get(request_hash, -ANSWER_RESEND_GAP) >= ANSWER_RESEND_GAP:
            self._answered_at[request_hash] = now
            self._send_message(*cached)
        return True

    def live_indexes(self) -> set[int]:
        """Receiver indexes the peer may name now (the kernel steers them, sockfilter.py).

        Every live epoch's own and peer index, and the pending exchange's (the peer's M2 or R2 names it).
        """
        live = set(self.epochs.by_index)
        # And our epochs' peer indexes: a peer that restarted names them in its messages as
        # rendezvous hints (_steer_index), so its Kicks and M1s reach the data socket too.
        live.update(e.peer_index for e in self.epochs.by_index.values() if e.peer_index)
        if self._pending is not None and self._pending.my_index:
            live.add(self._pending.my_index)
        return live

    def state(self, now: float) -> tuple[str, str]:
        """Return ``(state, why)``: state is up, rekeying, degraded or down; why explains down/degraded."""
        current = self.epochs.current
        if current is None or not self.epochs.usable(current, now):
            why = self.last_problem or self.last_unauthenticated_problem
            why = why or ("no session yet" if current is None else "key past max_key_age")
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
