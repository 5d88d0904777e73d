"""The master's steps (HS-0, HS-1, HS-3, HS-D, HS-K, RK-0, RK-1, RK-3): it starts every exchange.

The QKD *master* SAE (ETSI GS QKD 014 section 2) fetches keys with enc_keys and sends their key_IDs
in M1 or R1; it answers M2, R2 and Kicks. Step labels match docs/protocol.md section 4.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from qgate.constants import (
    AEAD_PACKET_SOFT_LIMIT,
    HANDSHAKE_RETRY,
    HANDSHAKE_TIMEOUT,
    KICK_HANDSHAKE_MAX_INTERVAL,
    KICK_HANDSHAKE_MIN_INTERVAL,
    KICK_INTERVAL,
)
from qgate.errors import AuthenticationError, RemoteProtocolError
from qgate.protocol import keyschedule as ks
from qgate.protocol.actions import (
    FetchEncKeys,
    SendDatagram,
)
from qgate.protocol.core import FORCED_KICK_GAP, PeerCore, Pending
from qgate.protocol.epoch import Epoch
from qgate.protocol.messages import (
    KEM_IDS,
    KICK_KEY_REJECTED,
    KICK_NO_SESSION,
    KICK_QKD_UNAVAILABLE,
    NO_ANCHOR,
    NO_CHALLENGE,
    RANDOM_SIZE,
    InitConfirm,
    InitHello,
    Kick,
    RatchetConfirm,
    RatchetRequest,
    RatchetResponse,
    RespHello,
)

M1_VARIANTS = 3
"""Signed M1 variants of one pending handshake kept, so an M2 answering an earlier one still verifies."""


class MasterSteps(PeerCore):
    """Steps only the master takes."""

    def _begin(self, now: float, kind: Literal["hs", "rk"]) -> None:
        """Step HS-0 / RK-0: ask the KME for a fresh QKD key (ETSI 014 enc_keys)."""
        request_id = self._new_request()
        self._pending = Pending(kind, request_id, now)
        self._next_attempt_at = None
        self._actions.append(FetchEncKeys(request_id, 1, self.config.qkd_bits))

    def _exchange_deadline(self, pending: Pending) -> float:
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

    def _abandon(self, pending: Pending, now: float, why: str) -> None:
        """Drop a failed exchange and schedule the next try (docs/protocol.md 4.3, abandonment)."""
        self.stats.handshake_failures += 1
        self._event(
            "handshake_abandoned" if pending.kind == "hs" else "ratchet_abandoned",
            reason=why,
            key_ids=",".join(pending.key_ids),
        )
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
        pending = Pending("hs", self._new_request(), now, degraded=True)
        if self._anchors:
            pending.anchor = self._anchors[-1][1]
        self._pending = pending
        self.stats.degraded_handshakes += 1
        self._event("degraded_handshake", reason=why)
        self._send_m1(pending, now)

    def start_handshake(self, now: float) -> None:
        """Master: start a full handshake now unless one is under way (it replaces a ratchet)."""
        if self.config.role == "master" and (self._pending is None or self._pending.kind == "rk"):
            self._begin(now, "hs")

    def _send_m1(self, p: Pending, now: float, *, session: bool = True) -> None:
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
        p.m1, p.m1_echo = signed.encode(), m1.echo
        p.m1_sent = [*p.m1_sent[-(M1_VARIANTS - 1) :], p.m1]
        p.message_id, p.fragments = self._send_message(InitHello.TYPE, p.m1, session=session)
        p.last_sent = now
        self._event("handshake_sent", epoch=p.epoch, key_ids=",".join(p.key_ids))

    def _send_r1(self, p: Pending, base: Epoch, now: float) -> None:
        """Step RK-1: R1 = fresh QKD key_IDs and this side's challenge, MAC under k_auth(ck_n)."""
        assert p.qkd_key is not None
        p.base, p.my_index, p.epoch = base, self._new_index(), (base.number + 1) & 0xFFFFFFFF
        r1 = RatchetRequest(base.peer_index, p.my_index, p.epoch, self._challenges.current, p.key_ids)
        r1 = replace(r1, mac=ks.mac(ks.ratchet_auth_key(base.chaining_key), ks.MAC_R1, r1.mac_part()))
        p.r1_hash = ks.transcript_hash(r1.encode())
        p.keys = ks.ratchet_keys(
            base.chaining_key, p.qkd_key, epoch=p.epoch, request_hash=ks.transcript_hash(r1.mac_part())
        )
        p.message_id, p.fragments = self._send_message(RatchetRequest.TYPE, r1.encode(), base.peer_index)
        p.last_sent = now

    def _on_m2(self, m2: RespHello, now: float) -> None:
        """Step HS-3: check M2's signature and confirmation, install the epoch, send M3."""
        p = self._pending
        if p is None or p.kind != "hs" or p.dk is None or m2.receiver_index != p.my_index:
            self._resend_answer(ks.transcript_hash(m2.encode()), now)
            return
        if m2.epoch != p.epoch:
            raise RemoteProtocolError("M2 names another epoch")
        if len(m2.ct) != self.config.kem.ciphertext_size:
            raise RemoteProtocolError("M2: ciphertext of the wrong size")
        if len(m2.x25519_pub) != (32 if p.x25519 is not None else 0):
            raise RemoteProtocolError("M2: X25519 value of the wrong size")
        if not self._spend("M2", now):
            return
        # The slave may answer any variant this side sent (an on-path forged Retry makes a new one):
        # M2 is signed over SHA-384 of the one it answers, so take the variant whose signature holds.
        p.m1 = self._answered_variant(p, m2)
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
            raise AuthenticationError(
                "M2 key confirmation failed: the two sides derived different keys (a PPK that differs,"
                " or KMEs that delivered different QKD keys for the same key_ID)"
            )
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

    def _answered_variant(self, p: Pending, m2: RespHello) -> bytes:
        """Return the sent M1 variant M2's signature covers (FIPS 204 Verify, newest first).

        Raises:
            AuthenticationError: it covers none of them.
        """
        variants = list(reversed(p.m1_sent or [p.m1]))
        for m1 in variants[:-1]:
            try:
                self._peer_key.verify(m2.signature, ks.SIG_M2 + ks.transcript_hash(m1) + m2.signed_part())
            except AuthenticationError:
                continue
            return m1
        self._verify("M2", m2.signature, ks.SIG_M2 + ks.transcript_hash(variants[-1]) + m2.signed_part())
        return variants[-1]

    def _on_r2(self, r2: RatchetResponse, now: float) -> None:
        """Step RK-3: check R2's confirmation, switch to the new epoch, send R3."""
        p = self._pending
        if p is None or p.kind != "rk" or p.keys is None or r2.receiver_index != p.my_index:
            self._resend_answer(ks.transcript_hash(r2.encode()), now)
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
        self._remember_answer(answer_to, msg_type, body, epoch.peer_index, now)
        self._send_message(msg_type, body, epoch.peer_index)  # M3/R3 name the slave's new index
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
        pending = self._pending
        if (
            kick.reason == KICK_NO_SESSION
            and pending is not None
            and pending.kind == "hs"
            and pending.m1
            and pending.m1_echo != kick.challenge
            and now >= self._next_rebuild_at
        ):
            # HS-K1: our M1 echoes no challenge the slave holds (it left before the slave ran, or before
            # this challenge): re-signed with this echo, same keys and key_IDs; the slave never took them.
            self._next_rebuild_at = now + FORCED_KICK_GAP
            self._send_m1(pending, now, session=False)
            return
        if self._kick_handshake_at is not None and now - self._kick_handshake_at < self._kick_gap:
            self.stats.kicks_ignored += 1
            return
        if kick.reason == KICK_NO_SESSION and self._slave_evidently_has_a_session(now):
            # A stolen slave key must not buy a KEM handshake and a QKD key every few seconds.
            self.stats.kicks_ignored += 1
            return
        if (
            kick.reason in (KICK_QKD_UNAVAILABLE, KICK_KEY_REJECTED)
            and pending is not None
            and pending.key_ids
        ):
            # A refused key_ID (reason 2) grows the gap: a slave that keeps saying so (lying, with a
            # stolen slave key) cannot drain the KME; an unreachable slave KME (reason 1) keeps it,
            # so the tunnel is back as soon as that KME is.
            self._kick_driven(now, grow=kick.reason == KICK_KEY_REJECTED)
            self._pending = None  # its key_ID is dead at the slave: a fresh key, never the dead one again
            self.stats.handshake_failures += 1
            cause = "rejected" if kick.reason == KICK_KEY_REJECTED else "unavailable"
            self._event("qkd_keys_unused", key_ids=",".join(pending.key_ids), cause=cause)
            self._begin(now, pending.kind if self.epochs.current is not None else "hs")
            return
        if kick.reason == KICK_NO_SESSION and (pending is None or pending.kind == "rk"):
            self._kick_driven(now)
            self.start_handshake(now)
            return
        if (
            kick.reason == KICK_NO_SESSION
            and pending is not None
            and now - pending.started >= 2 * HANDSHAKE_RETRY
        ):
            # The slave still has no session although our M1 went out more than once: it cannot take
            # that M1 (e.g. its dec_keys failed for those key_IDs). A fresh handshake, fresh key.
            self._kick_driven(now)
            self._pending = None
            self.stats.handshake_failures += 1
            self._event("handshake_abandoned", reason="the slave still asks for a session")
            self._begin(now, "hs")
            return
        self.stats.kicks_ignored += 1

    def _slave_evidently_has_a_session(self, now: float) -> bool:
        """Whether a record from the slave opened within KICK_INTERVAL (it Kicks at most that often).

        Then a "no session" Kick is not the slave's word: the slave's records show its session.
        """
        return self._last_record_at is not None and now - self._last_record_at < KICK_INTERVAL

    def _kick_driven(self, now: float, *, grow: bool = True) -> None:
        """Note a Kick-driven exchange: the next waits ``_kick_gap`` (doubling while Kicks keep coming).

        The gap starts at KICK_HANDSHAKE_MIN_INTERVAL and doubles, up to KICK_HANDSHAKE_MAX_INTERVAL,
        for each Kick-driven exchange within two gaps of the previous one (a slave that keeps
        asking although each handshake completes, or keeps reporting refused key_IDs: an
        impostor with a stolen slave key); a quiet spell resets it. So such a slave costs at
        most one QKD key per KICK_HANDSHAKE_MAX_INTERVAL. ``grow`` False (reason 1: the slave's
        KME is unreachable) keeps the gap, so the tunnel is back as soon as that KME is.
        """
        last = self._kick_handshake_at
        if grow and last is not None and now - last < 2 * self._kick_gap:
            self._kick_gap = min(2 * self._kick_gap, KICK_HANDSHAKE_MAX_INTERVAL)
        elif grow:
            self._kick_gap = KICK_HANDSHAKE_MIN_INTERVAL
        self._kick_handshake_at = now

    def _counters_near_limit(self, current: Epoch) -> bool:
        """Whether either direction of ``current`` reached the soft packet limit (RFC 9001 s6.6).

        The slave's sending counter is read from the records the master opens (the replay
        window's top), so only the master decides and the slave never needs to Kick for it.
        """
        return max(current.send_counter, current.replay.highest + 1) >= AEAD_PACKET_SOFT_LIMIT
