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

from collections.abc import Sequence

from qgate.constants import (
    AEAD_PACKET_SOFT_LIMIT,
    HANDSHAKE_RETRY,
    KICK_INTERVAL,
    MSG_RETRY,
)
from qgate.crypto.secret import Secret
from qgate.errors import AuthenticationError, CryptoError, ProtocolError, RemoteProtocolError
from qgate.protocol import guard
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
from qgate.protocol.core import (
    FETCH_BACKOFF_MAX,
    FORCED_KICK_GAP,
    RATCHET_TIMEOUT,
    STALE_REPORT_INTERVAL,
    Pending,
    Signer,
)
from qgate.protocol.master import MasterSteps
from qgate.protocol.messages import (
    KICK_KEY_REJECTED,
    KICK_NO_SESSION,
    KICK_QKD_UNAVAILABLE,
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
from qgate.protocol.slave import SlaveSteps
from qgate.protocol.wire import (
    MULTI_FRAGMENT_TYPES,
    parse_fragment,
    steering_index,
    with_steering_index,
)

MAC1_HINT = (
    "handshake fragments from the peer's address fail mac1: junk, or the peer pins another public key"
    " for this gateway (compare fingerprints with qgate check)"
)

MAC2_HINT = (
    "handshake messages from the peer's address fail mac2 (no valid challenge echo or session key):"
    " a spoofed flood, or a peer that lost its challenge (each one is answered by a Retry)"
)
"""Reason of ``unauth_mac2`` events (one per STALE_REPORT_INTERVAL with the drop count)."""
MAC2_REPORT_MIN = 4
"""mac2 drops not yet reported that make an ``unauth_mac2`` event. A clean start costs one or two
(the master's first M1 carries no challenge yet and draws a Retry): that is no attack to report."""

V1_HINT = (
    "the peer speaks qgate wire protocol version 1, this gateway version 2: upgrade both gateways of a"
    " link together"
)


def _looks_like_v1(datagram: bytes) -> bool:
    """Whether a datagram is the first fragment of a version-1 message (version byte 1 at offset 8).

    Only a diagnosis for the operator: such a datagram fails v2 framing or mac1 anyway.
    """
    return len(datagram) > 8 and datagram[0] == 1 and datagram[2] == 0 and datagram[8] == 1


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


class Peer(MasterSteps, SlaveSteps):
    """One peer's protocol engine: inputs, timers and data. Not thread-safe; times are monotonic seconds."""

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

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: retransmits, timeouts, rekeys, kicks, epoch expiry."""
        self.epochs.expire(now)
        self._note_closed(now)
        if self.config.role == "slave":
            owed = self._kick_owed
            if owed == KICK_NO_SESSION and self.has_session(now):
                self._kick_owed = owed = None  # a session arrived meanwhile
            if now >= self._next_kick_at and owed is not None:
                self.send_kick(now, owed)
            elif not self.has_session(now) and now >= self._next_kick_at:
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

    def _pending_due(self, p: Pending, now: float, key_good: bool) -> bool:
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
        current = self.epochs.current
        yield_at = p.started + 2 * HANDSHAKE_RETRY
        if current is not None:  # early enough that the ratchet still lands before the key expires
            yield_at = min(yield_at, current.created_at + self.config.max_key_age - self.interval)
        if (
            p.kind == "hs"
            and key_good
            and ratchet_due
            and now >= max(yield_at, p.started + HANDSHAKE_RETRY / 4)
        ):
            # HS-P: a struggling full handshake yields to the due ratchet while the key is good.
            self._abandon(p, now, "superseded by a due ratchet step")
            return True
        if now >= self._exchange_deadline(p):
            self._abandon(p, now, "timeout")
            return True
        if p.fragments and now - p.last_sent >= HANDSHAKE_RETRY:
            hint = self._steer_index()
            if p.kind == "hs" and hint and steering_index(p.fragments[0]) != hint:  # a rendezvous learnt
                p.fragments = [with_steering_index(f, hint) for f in p.fragments]
            self._transmit(p.fragments)  # step HS-RT / RK-RT (fresh mac2 if a challenge came meanwhile)
            p.last_sent = now
        return False

    def keys_failed(self, request_id: int, reason: str, now: float, *, rejected: bool = False) -> None:
        """Report that an ETSI 014 request failed (reason: a short text, no secrets).

        ``rejected``: the KME answered and refused the key_IDs themselves (unknown, consumed or
        expired there; ``KmsKeyRejectedError``), not a KME that could not serve; a slave then
        Kicks with reason KICK_KEY_REJECTED instead of KICK_QKD_UNAVAILABLE.
        """
        self.stats.qkd_failures += 1
        if request_id not in self._inflight:  # the master's own enc_keys; a slave's dec_keys failure is
            self._kme_bad_at = now  # no evidence: the key_IDs came from the peer (maybe bogus ones)
        # Backoff doubles from 0.5 s, capped at one rekey interval (so the tunnel is back within about
        # two intervals of the KME recovering) and at FETCH_BACKOFF_MAX.
        ceiling = min(FETCH_BACKOFF_MAX, max(self.interval, 0.5))
        self._fetch_backoff = min(max(2 * self._fetch_backoff, 0.5), ceiling)
        context = self._inflight.pop(request_id, None)
        if context is not None:  # slave: those key_IDs are dead (maybe consumed); never ask for them again
            self._event("qkd_request_failed", reason=reason)
            kick = KICK_KEY_REJECTED if rejected else KICK_QKD_UNAVAILABLE
            self._dead_key_ids.extend((key_id, kick) for key_id in context.msg.key_ids)
            self.send_kick(now, kick)  # signed: the master takes a fresh key
            return
        self._event("qkd_request_failed", reason=reason, retry_in=self._fetch_backoff)
        pending = self._pending
        if pending is not None and pending.request_id == request_id:
            self._abandon(pending, now, "qkd: " + reason)

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
            if _looks_like_v1(datagram) and not guard.mac1_ok(datagram, self._my_mac1):
                self.stats.malformed_messages += 1  # (a v2 fragment passes mac1: never taken for v1)
                if now >= self._next_mac1_report:
                    self._next_mac1_report = now + STALE_REPORT_INTERVAL
                    self._event("unauth_protocol_v1", reason=V1_HINT)
                return
            frag = parse_fragment(datagram)
            if not guard.mac1_ok(datagram, self._my_mac1):
                self.stats.drops_mac1 += 1
                if now >= self._next_mac1_report:  # one event per interval: junk, or a key mismatch
                    self._next_mac1_report = now + STALE_REPORT_INTERVAL
                    count = self.stats.drops_mac1 - self._mac1_reported
                    self._mac1_reported = self.stats.drops_mac1
                    self._event("unauth_mac1", reason=MAC1_HINT, count=count)
                return
            session = False
            if frag.msg_type in MULTI_FRAGMENT_TYPES:
                session = guard.session_mac2_ok(datagram, self._receiving_session_keys(now))
                if not session and not guard.mac2_ok(datagram, self._challenges.all()):
                    self.stats.drops_mac2 += 1
                    count = self.stats.drops_mac2 - self._mac2_reported
                    if now >= self._next_mac2_report and count >= MAC2_REPORT_MIN:
                        self._next_mac2_report = now + STALE_REPORT_INTERVAL  # one per interval
                        self._mac2_reported = self.stats.drops_mac2
                        self._event("unauth_mac2", reason=MAC2_HINT, count=count)
                    self._send_retry(frag, datagram, now)
                    return
            # Fragments under a session mac2 are reassembled apart, so no fragment an on-path attacker
            # injects under the challenge's mac2 can join (or corrupt) a session request.
            done = (self._session_reassembler if session else self._reassembler).add(frag, now)
            if done is None:
                return
            self._last_fragment = (frag, datagram)
            msg_type, body = done
            self._session_request = session
            try:
                self._dispatch(parse_message(msg_type, body), body, now)
            finally:
                self._session_request = False
        except AuthenticationError as exc:
            self.stats.auth_failures += 1
            self._event("authentication_failed", reason=str(exc))
        except (ProtocolError, CryptoError) as exc:
            self.stats.malformed_messages += 1
            self._event("bad_handshake_message", reason=str(exc))

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
        self._peer_challenge = challenge
        body = self._sent_bodies.pop(message_id, None)
        p = self._pending
        if p is not None and p.kind == "hs" and p.message_id == message_id:
            fresh = challenge != p.m1_echo  # (not "new to us": a Kick may have brought it already)
            if now >= self._next_rebuild_at:  # on-path forgeries cannot make us sign in a loop
                self._next_rebuild_at = now + FORCED_KICK_GAP
                if fresh:
                    self._send_m1(p, now, session=False)  # re-signed with the new echo, same keys
                else:  # the same echo, under the challenge's mac2 (the peer may lack our session)
                    self._transmit(p.fragments, session=False)
        elif self._kick_ids and message_id == self._kick_ids[-1] and self._kick_still_wanted(now):
            self._kick_ids.clear()
            self._next_forced_kick = now + FORCED_KICK_GAP
            self.send_kick(now, self._kick_reason, force=True)
        elif self._may_resend_answer(body):
            assert body is not None
            self._resent_answers.append(body[1])
            self._send_message(*body, session=False)  # our current M2, whose mac2 the master could not check

    def _may_resend_answer(self, body: tuple[int, bytes, int | None] | None) -> bool:
        """Whether a Retry may have ``body`` resent: our current M2, once (forged Retries cannot amplify)."""
        return (
            body is not None
            and body[0] == RespHello.TYPE
            and body in self._answered.values()
            and body[1] not in self._resent_answers
        )

    def _kick_still_wanted(self, now: float) -> bool:
        """Whether the Kick a Retry answers is the latest, recent, and its reason still holds.

        A Retry for an old Kick (replayed by an attacker) never makes a healthy slave Kick.
        """
        recent = now - (self._next_kick_at - KICK_INTERVAL) <= 2 * KICK_INTERVAL
        reason_holds = self._kick_reason != KICK_NO_SESSION or not self.has_session(now)
        return recent and reason_holds and now >= self._next_forced_kick

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
            if self.epochs.current is None:
                self._note_unknown_record(datagram)
            if self.config.role == "slave" and not self.has_session(now):
                self.send_kick(now)  # rate-limited to one per KICK_INTERVAL
            return None
        plaintext, epoch = opened
        self._last_record_at = now
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

    def seal(self, packet: bytes, now: float) -> bytes | None:
        """Seal one inner packet for the peer; None (counted) if no key may be used (see ``seal_batch``)."""
        out = self.seal_batch((packet,), now)
        return out[0] if out else None
