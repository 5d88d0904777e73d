"""The slave's steps (HS-2a, HS-2b, HS-4, HS-D at the slave, RK-2a, RK-2b, RK-4, Kicks).

The QKD *slave* SAE answers M1 and R1 after fetching the named keys with dec_keys, and asks for a
handshake with a signed Kick when it has no usable epoch. Step labels match docs/protocol.md.
"""

from __future__ import annotations

from dataclasses import replace

from qgate.constants import (
    KICK_INTERVAL,
)
from qgate.crypto.secret import Secret
from qgate.errors import AuthenticationError, CryptoError, RemoteProtocolError
from qgate.protocol import keyschedule as ks
from qgate.protocol.actions import (
    FetchDecKeys,
    ProbeKme,
)
from qgate.protocol.core import PROBE_INTERVAL, STALE_REPORT_INTERVAL, Inflight, PeerCore
from qgate.protocol.epoch import Epoch
from qgate.protocol.messages import (
    KEM_IDS,
    KICK_NO_SESSION,
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


class SlaveSteps(PeerCore):
    """Steps only the slave takes."""

    def send_kick(self, now: float, reason: int = KICK_NO_SESSION, *, force: bool = False) -> None:
        """Slave: ask the master for a handshake (at most one per KICK_INTERVAL unless ``force``).

        ``force`` is used once a Retry brought the master's challenge for a Kick just sent.
        """
        if self.config.role != "slave":
            return
        if now < self._next_kick_at and not force:
            if reason != KICK_NO_SESSION or self._kick_owed is None:
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
        message_id, _ = self._send_message(Kick.TYPE, kick.encode(), session=not force)
        self._kick_ids.append(message_id)

    def _on_m1(self, m1: InitHello, body: bytes, now: float) -> None:
        """Step HS-2a: cheap checks, fresh echo, budget, signature, PPK, fail mode; fetch the QKD key."""
        cfg = self.config
        if self._resend_answer(ks.transcript_hash(body), now) or self._is_inflight(body):
            return
        if m1.master_sae != cfg.peer_sae or m1.slave_sae != cfg.my_sae:
            raise AuthenticationError("M1 names other SAE IDs")
        if m1.kem_id != KEM_IDS[cfg.kem.name] or m1.x25519 != cfg.x25519 or m1.qkd_bits != cfg.qkd_bits:
            raise RemoteProtocolError("M1 algorithms differ from the policy of this side")
        if len(m1.ek) != cfg.kem.encapsulation_key_size:
            raise RemoteProtocolError("M1: encapsulation key of the wrong size")
        if len(m1.x25519_pub) != (32 if cfg.x25519 else 0):
            raise RemoteProtocolError("M1: X25519 value of the wrong size")
        if not self._challenges.fresh(m1.echo):
            self._retry_last(now, m1.sender_index)  # a replayed M1, or the master had no challenge yet
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
        self._inflight[request_id] = Inflight("hs", m1, body, None)
        self._actions.append(FetchDecKeys(request_id, m1.key_ids))

    def _check_ppk(self, m1: InitHello) -> None:
        """The PPK rule (RFC 8784 style): both use the same PPK, or neither, unless one requires it."""
        cfg = self.config
        if m1.ppk_id:
            if cfg.ppk is None or m1.ppk_id != cfg.ppk_id:
                raise AuthenticationError(
                    "M1 names a PPK this side lacks (same peers[].ppk on both sides; slave first)"
                )
        elif cfg.ppk is not None and cfg.ppk_mandatory:
            raise AuthenticationError("M1 uses no PPK, and the policy of this side makes its PPK mandatory")

    def _on_degraded_m1(self, m1: InitHello, body: bytes, now: float) -> None:
        """Step HS-D at the slave: only on this side's own evidence, with the anchor it holds."""
        cfg = self.config
        if not cfg.may_degrade:
            raise AuthenticationError(
                "M1 carries no QKD key, and fail_mode qkd_and_pqc on this side refuses it"
            )
        if not self._local_evidence(now):
            self.stats.degrade_refused += 1
            if now >= self._next_probe_at:  # ask the own KME; the master's resend may then pass
                self._next_probe_at = now + PROBE_INTERVAL
                self._actions.append(ProbeKme())
            if now >= self._next_stale_report:
                self._next_stale_report = now + STALE_REPORT_INTERVAL
                self._event("degrade_refused", reason="the KME of this side works, so no degraded handshake")
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
        if self._resend_answer(ks.transcript_hash(body), now) or self._is_inflight(body):
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
        self._inflight[request_id] = Inflight("rk", r1, body, base)
        self._actions.append(FetchDecKeys(request_id, r1.key_ids))

    def _dead(self, key_ids: tuple[str, ...], now: float) -> bool:
        """Whether a request names a key_ID whose delivery already failed here; Kick for a fresh one."""
        reasons = [reason for dead, reason in self._dead_key_ids if dead in key_ids]
        if reasons:
            self.send_kick(now, reasons[-1])
            return True
        return False

    def _is_inflight(self, body: bytes) -> bool:
        return any(ctx.body == body for ctx in self._inflight.values())

    def _slave_keys(self, ctx: Inflight, qkd: Secret, now: float) -> None:
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
        self._keep_anchor(epoch, qkd_backed=True)
        self._install_slave(epoch, r1_hash, RatchetResponse.TYPE, r2.encode(), now)

    def _install_slave(self, epoch: Epoch, answer_to: bytes, msg_type: int, body: bytes, now: float) -> None:
        self.epochs.install_next(epoch)
        self._remember_answer(answer_to, msg_type, body, epoch.peer_index, now)
        self._send_message(msg_type, body, epoch.peer_index)  # M2/R2 name the master's pending index

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
