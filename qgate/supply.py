"""The KME side of one peer: ETSI GS QKD 014 requests run off the event loop, stock, pacing, state.

:class:`PeerSupply` is the thin adapter between a peer's protocol engine and the KME client. It
carries out the engine's ``FetchEncKeys`` / ``FetchDecKeys`` actions (from the prefetched
:class:`~qgate.keysupply.KeyStock` where it can), keeps the stock filled, polls the KME's
status (section 5.1), stretches the ratchet interval when keys run short, and records what the
KME does in a :class:`~qgate.keysupply.KmeView`. Requests run in the loop's default executor
(the client blocks); results come back on the loop.

A stalled KME (no answer after :meth:`~qgate.keysupply.KmeView.hedge_after`, 4 x its median
answer time within 0.1-0.5 s) does not hold a rekey
back: ``dec_keys`` is asked once more in parallel (the same key_IDs: the KME hands them out
once, so the first answer with keys wins and the other's error is ignored), and a rekey waiting
for a stalled refill asks ``enc_keys`` itself.

Logging: one line per change of the KME's state (reachable, failing with a given cause, working
again), never one per retry; the engine's retries back off by themselves (capped, see
``FETCH_BACKOFF_MAX`` and ``QKD_PREFETCH_RETRY_MAX``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Protocol

from qgate.constants import QKD_STOCK_HORIZON, STATUS_POLL_INTERVAL
from qgate.errors import (
    KmsAuthError,
    KmsBadAnswerError,
    KmsError,
    KmsExhaustedError,
    KmsKeyRejectedError,
    KmsTlsError,
    KmsUnavailableError,
    QgateError,
)
from qgate.keysupply import KeyStock, KmeView, paced_interval
from qgate.kms.etsi014 import QkdKey, Status
from qgate.policy import PeerPolicy
from qgate.protocol.peer import FetchDecKeys, FetchEncKeys, Peer, PeerEvent

log = logging.getLogger(__name__)

SETTLING_EVENTS = frozenset(
    {"handshake_complete", "ratchet_complete", "handshake_abandoned", "ratchet_abandoned", "qkd_keys_unused"}
)
"""Engine events after which the key_IDs they name are no longer on their way to the slave."""


class KmeClient(Protocol):
    """The ETSI 014 calls the supply makes (:class:`qgate.kms.client.Etsi014Client`)."""

    def status(self, slave_sae_id: str) -> Status: ...

    def enc_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QkdKey]: ...

    def dec_keys(
        self, master_sae_id: str, key_ids: Sequence[str], *, size_bits: int | None = None
    ) -> list[QkdKey]: ...


class TlsDiagnosis(Protocol):
    """Explains a TLS failure streak (:meth:`qgate.kms.client.MtlsHttps.diagnose`); blocks."""

    def __call__(self) -> object: ...


@dataclass
class _Attempts:
    """The requests made for one Fetch*Keys action (the original, and a hedged twin for dec_keys)."""

    pending: int = 1
    done: bool = False
    error: asyncio.Future[list[QkdKey]] | None = None


class PeerSupply:
    """QKD keys for one peer's engine (see the module doc).

    Args:
        policy: the peer's policy (role, ``qkd_prefetch``, ``qkd_key_bits``, rekey timing).
        engine: the peer's protocol engine.
        kms: the KME client.
        kme_url: the KME's URL, for log lines.
        flush: called after the engine was given a result, to carry out its new actions.
        diagnose: explains a TLS failure (one diagnostic handshake per streak, run in the
            executor); its answer is logged once per streak.
        executor: runs the blocking KME calls (the gateway's bounded KME pool, so a stalled KME
            cannot take the loop's default executor); None: the loop's default.
    """

    def __init__(
        self,
        policy: PeerPolicy,
        engine: Peer,
        kms: KmeClient,
        kme_url: str,
        flush: Callable[[], None],
        diagnose: TlsDiagnosis | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.policy = policy
        self.engine = engine
        self.kms = kms
        self.kme_url = kme_url
        self.flush = flush
        self.diagnose = diagnose
        self.executor = executor
        self._status_in_flight = False  # one status poll at a time: a stalled one is not stacked
        self.tls_diagnosis = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stock = KeyStock(policy.qkd_prefetch if policy.qkd_role == "master" else 0)
        self.view = KmeView()
        self.next_status_at = 0.0
        self._parked: list[FetchEncKeys] = []
        self._failing: dict[str, str] = {}  # request kind -> cause of its failure streak (logged once)
        self._status_tried = False  # the first refill waits for the KME's stated limits
        self._size_warned = False

    @property
    def hedged(self) -> int:
        """dec_keys asked a second time because the first was stalled."""
        return self.view.stalls

    # ----- the engine's requests --------------------------------------------------------
    def fetch(self, action: FetchEncKeys | FetchDecKeys, now: float, *, may_park: bool = True) -> None:
        """Carry out a Fetch*Keys action: from stock, after the refill in flight, or from the KME.

        ``may_park`` False: the action waited for a stalled refill long enough; ask the KME now.
        """
        loop = self._loop()
        if isinstance(action, FetchEncKeys):
            if action.size_bits == self.policy.qkd_key_bits:
                stocked = self.stock.take(action.number, now)
                if stocked is not None:  # prefetched: no KME round trip on the rekey path
                    loop.call_soon(self._deliver, action, stocked)
                    return
                if self.stock.refilling and may_park:
                    # Wait for the refill rather than race it with a second enc_keys; a stalled
                    # refill is waited for hedge_after() at most, then the rekey asks by itself.
                    self._parked.append(action)
                    loop.call_later(self.view.hedge_after(), self._park_expired, action)
                    return
                self.stock.on_demand()
            sae, number, bits = self.policy.sae_id, action.number, action.size_bits
            call: Callable[[], list[QkdKey]] = functools.partial(self.kms.enc_keys, sae, number, bits)
        else:
            # The KME's answer must have the size both sides expect.
            call = functools.partial(
                self.kms.dec_keys, self.policy.sae_id, action.key_ids, size_bits=self.policy.qkd_key_bits
            )
        started = time.monotonic()
        attempt = _Attempts()
        future = loop.run_in_executor(self.executor, call)
        future.add_done_callback(functools.partial(self._attempted, action, started, attempt, True))
        if isinstance(action, FetchDecKeys):  # asking twice for the same key_IDs is safe: one wins
            loop.call_later(self.view.hedge_after(), self._hedge, action, call, attempt)

    def _hedge(self, action: FetchDecKeys, call: Callable[[], list[QkdKey]], attempt: _Attempts) -> None:
        """The KME has not answered dec_keys within hedge_after(): ask once more in parallel."""
        if attempt.done:
            return
        attempt.pending += 1
        self.view.stalled()
        future = self._loop().run_in_executor(self.executor, call)
        future.add_done_callback(functools.partial(self._attempted, action, time.monotonic(), attempt, False))

    def _attempted(
        self,
        action: FetchEncKeys | FetchDecKeys,
        started: float,
        attempt: _Attempts,
        original: bool,
        future: asyncio.Future[list[QkdKey]],
    ) -> None:
        """One request of an exchange answered: the first success wins; else the original's error."""
        attempt.pending -= 1
        if attempt.done:
            return  # a hedged twin already delivered (this one lost the race: its error means nothing)
        if future.exception() is None or attempt.pending == 0:
            attempt.done = True
            if future.exception() is not None and attempt.error is not None:
                future = attempt.error  # report what the original request met
            self._fetched(action, started, future)
        elif original:
            attempt.error = future

    def _park_expired(self, action: FetchEncKeys) -> None:
        if action in self._parked:
            self._parked.remove(action)
            self.fetch(action, time.monotonic(), may_park=False)

    def _fetched(
        self, action: FetchEncKeys | FetchDecKeys, started: float, future: asyncio.Future[list[QkdKey]]
    ) -> None:
        now = time.monotonic()
        exc = future.exception()
        on_demand = isinstance(action, FetchEncKeys) and action.size_bits == self.policy.qkd_key_bits
        what = "enc_keys" if isinstance(action, FetchEncKeys) else "dec_keys"
        if exc is None:
            keys = future.result()
            self._answered(now, now - started, what)
            asked = action.number if isinstance(action, FetchEncKeys) else len(action.key_ids)
            self.view.keys_delivered(now, asked, len(keys))  # a zero count contradicted (either role)
            if isinstance(action, FetchEncKeys):
                if on_demand:
                    self.stock.on_demand_done([k.key_id for k in keys], now)
                if len(keys) != action.number:  # a short answer: never a shorter QKD key
                    self.stock.settled([k.key_id for k in keys])
                    reason = f"enc_keys answered {len(keys)} of {action.number} keys"
                    self.engine.keys_failed(action.request_id, reason, now)
                    self.flush()
                    return
            self._deliver(action, keys)
            return
        if on_demand:
            self.stock.on_demand_done([], now)
        if not isinstance(exc, QgateError):
            log.error("KME request failed unexpectedly", exc_info=exc)
            reason = f"internal error: {type(exc).__name__}"
        else:
            reason = str(exc)
            self._failed(exc, now, now - started, what=what)
        rejected = isinstance(exc, KmsKeyRejectedError)
        self.engine.keys_failed(action.request_id, reason, now, rejected=rejected)
        self.flush()

    def _deliver(self, action: FetchEncKeys | FetchDecKeys, keys: list[QkdKey]) -> None:
        self.engine.keys_fetched(action.request_id, [(k.key_id, k.key) for k in keys], time.monotonic())
        self.flush()

    def event(self, event: PeerEvent, now: float) -> None:
        """Follow the engine's events: settled key_IDs, and key_IDs the slave's KME refused."""
        if event.kind not in SETTLING_EVENTS:
            return
        key_ids = [k for k in str(event.detail.get("key_ids", "")).split(",") if k]
        if event.kind == "qkd_keys_unused" and event.detail.get("cause") == "rejected":
            if self.stock.rejected(key_ids, now):
                log.warning("QKD key supply for peer %s: %s", self.policy.name, self.stock.stats.mode_reason)
            return
        self.stock.settled(key_ids)

    # ----- the timer's work -------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Refill the stock and poll the KME's status when due; pace the ratchet (master)."""
        loop = self._loop()
        if self.policy.qkd_role == "master":
            self._pace(now)
            mode = self.stock.stats.mode
            number = self.stock.refill_request(now) if self._status_tried else 0
            if self.stock.stats.mode != mode:
                log.info("QKD key supply for peer %s: %s", self.policy.name, self.stock.stats.mode_reason)
            if number:
                size = self.policy.qkd_key_bits
                call = functools.partial(self.kms.enc_keys, self.policy.sae_id, number, size)
                future = loop.run_in_executor(self.executor, call)
                future.add_done_callback(functools.partial(self._refilled, number, time.monotonic()))
        if now >= self.next_status_at and not self._status_in_flight:
            self.next_status_at = now + STATUS_POLL_INTERVAL
            self._status_in_flight = True
            status = functools.partial(self.kms.status, self.policy.sae_id)
            future_status = loop.run_in_executor(self.executor, status)
            future_status.add_done_callback(functools.partial(self._polled, time.monotonic()))

    def poll_soon(self) -> None:
        """The engine wants local evidence now: poll the status on the next tick."""
        self.next_status_at = 0.0

    def _pace(self, now: float) -> None:
        """Stretch the ratchet interval when keys run short; alarm once per episode."""
        stats, rekey = self.stock.stats, self.policy.rekey
        if self.view.reachable is None:
            return  # no answer yet
        count = self.view.stored_count()
        if count is not None:
            available: int | None = len(self.stock) + count
        elif self.view.low_evidence(now):
            available = len(self.stock)  # the KME said "no keys" lately: go by what we hold
        else:
            available = None  # no believable count and keys keep coming: no reason to slow down
        interval, low = paced_interval(available, rekey.interval, rekey.max_interval)
        self.engine.set_interval(interval)
        if low and not stats.stock_low:
            stats.stock_alarms += 1
            log.warning(
                "QKD key stock low for peer %s: %s keys (local %d, KME %s) cover less than %.0f s of rekeys;"
                " ratchet interval stretched to %.2f s (max %.2f s)",
                self.policy.name, available, len(self.stock), count if count is not None else "unknown",
                QKD_STOCK_HORIZON, interval, rekey.max_interval,
            )  # fmt: skip
        elif stats.stock_low and not low:
            log.info("QKD key stock for peer %s recovered; interval %.2f s", self.policy.name, interval)
        stats.stock_low = low

    def _refilled(self, asked: int, started: float, future: asyncio.Future[list[QkdKey]]) -> None:
        now = time.monotonic()
        exc = future.exception()
        if exc is None:
            keys = future.result()
            self._answered(now, now - started, "prefetch")
            self.view.keys_delivered(now, asked, len(keys))
            self.stock.refill_done(keys)
        else:
            too_large = (
                isinstance(exc, KmsBadAnswerError)
                and not isinstance(exc, KmsAuthError)
                and exc.status in (400, 413, 422)
            )
            self.stock.refill_failed(now, too_large=too_large)
            self.stock.stats.last_error = str(exc)[:200]
            if isinstance(exc, QgateError):
                self._failed(exc, now, now - started, what="prefetch")
            else:
                log.error("KME prefetch failed unexpectedly", exc_info=exc)
        self._unpark(now)

    def _unpark(self, now: float) -> None:
        parked, self._parked = self._parked, []
        for action in parked:
            self.fetch(action, now)

    def _polled(self, started: float, future: asyncio.Future[Status]) -> None:
        self._status_in_flight, self._status_tried = False, True
        now = time.monotonic()
        exc = future.exception()
        if exc is None:
            status = future.result()
            self._answered(now, now - started, "status")
            self.view.status_seen(status, now)
            stated = [n for n in (status.max_key_per_request, status.max_key_count) if n > 0]
            self.stock.set_per_request_limit(min(stated) if stated else None)
            self._check_sizes(status)
        elif isinstance(exc, QgateError):
            self._failed(exc, now, now - started, what="status")
            if isinstance(exc, KmsBadAnswerError) and exc.status == 200:
                self.view.status_error = str(exc)[:200]
        else:
            log.error("KME status request failed unexpectedly", exc_info=exc)
        self.stock.stats.kme_stored_key_count = self.view.stored_count()
        self.engine.kme_observed(self.view.reachable is True, now, empty=self.view.empty())
        self.flush()

    def _check_sizes(self, status: Status) -> None:
        bits = self.policy.qkd_key_bits
        wrong = status.max_key_size and not status.min_key_size <= bits <= status.max_key_size
        if wrong and not self._size_warned:
            log.error(
                "KME %s serves keys of %d-%d bits; peer %s's qkd_key_bits %d is outside:"
                " key requests will fail",
                self.kme_url, status.min_key_size, status.max_key_size, self.policy.name, bits,
            )  # fmt: skip
        self._size_warned = bool(wrong)

    # ----- KME state --------------------------------------------------------------------
    def _answered(self, now: float, seconds: float, what: str) -> None:
        """A ``what`` request (status, prefetch, enc_keys, dec_keys) succeeded."""
        was = self.view.reachable
        self.view.answered(now, seconds)
        self.tls_diagnosis = ""
        if self._failing.pop(what, None) is not None:
            log.info("KME %s %s works again for peer %s", self.kme_url, what, self.policy.name)
            if not self._failing:
                self.view.last_error = self.stock.stats.last_error = ""
        elif was is not True:
            log.info("KME %s answers for peer %s", self.kme_url, self.policy.name)

    def _failed(self, exc: QgateError, now: float, seconds: float, *, what: str) -> None:
        """Record a failed request; log when the KME's state or the failure's cause changes."""
        if isinstance(exc, KmsUnavailableError) and not isinstance(exc, KmsExhaustedError):
            self.view.unreachable(str(exc)[:200])
        elif isinstance(exc, KmsAuthError) and exc.status is None:
            self.view.unreachable(str(exc)[:200])  # TLS: no HTTP answer
        else:
            self.view.answered(now, seconds)
            if isinstance(exc, KmsExhaustedError):
                self.view.exhausted(now)
        if isinstance(exc, KmsKeyRejectedError):
            self.view.refused += 1  # the peer's key_IDs (the slave's KME refused them), not a KME outage
        self.view.last_error = str(exc)[:300]
        cause = _cause(exc)
        if cause != self._failing.get(what):
            self._failing[what] = cause
            log.warning(
                "KME %s %s for peer %s failed: %s"
                " (retrying with backoff; logged again only when the cause changes)",
                self.kme_url, what, self.policy.name, exc,
            )  # fmt: skip
            in_handshake = isinstance(exc.__cause__, ConnectionResetError | BrokenPipeError)
            if (isinstance(exc, KmsTlsError) or in_handshake) and self.diagnose is not None:
                future = self._loop().run_in_executor(self.executor, self.diagnose)
                future.add_done_callback(self._diagnosed)

    def _diagnosed(self, future: asyncio.Future[object]) -> None:
        exc = future.exception()
        found = getattr(future.result(), "text", None) if exc is None else None
        if isinstance(found, str) and found != self.tls_diagnosis:
            self.tls_diagnosis = found
            log.error("KME %s TLS for peer %s: %s", self.kme_url, self.policy.name, found)

    def _loop(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            raise RuntimeError("PeerSupply used before the gateway's event loop started")
        return self.loop

    # ----- operator's view --------------------------------------------------------------
    def reconfigure(self, fresh: PeerPolicy) -> None:
        """Apply a reloaded peer policy (prefetch target, key size, timing are read from it)."""
        self.policy = fresh
        self.stock.set_target(fresh.qkd_prefetch if fresh.qkd_role == "master" else 0)

    def counters(self) -> dict[str, object]:
        """The stock's counters, ``qkd_``-prefixed, for the stats file and metrics."""
        return {"qkd_stock": len(self.stock), **{f"qkd_{k}": v for k, v in asdict(self.stock.stats).items()}}

    def status(self) -> dict[str, object]:
        """What ``qgate status`` shows about this peer's KME side (no key bytes)."""
        view, stats, kme = self.view, self.stock.stats, self.view.status
        return {
            "reachable": view.reachable,
            "supply_mode": stats.mode,
            "supply_reason": stats.mode_reason,
            "prefetch_stock": len(self.stock),
            "prefetch_batch": stats.batch_limit,
            "stored_key_count": view.stored_count(),
            "stored_key_count_trusted": view.count_trusted,
            "max_key_per_request": kme.max_key_per_request if kme is not None else None,
            "key_size_range": [kme.min_key_size, kme.max_key_size] if kme and kme.max_key_size else None,
            "keys_rejected_by_slave_kme": stats.rejected,
            "keys_discarded": stats.discarded,
            "short_answers": view.short_answers,
            "slow_answers": view.slow_answers,
            "hedged_requests": self.hedged,
            "last_error": view.last_error,
            "tls_diagnosis": self.tls_diagnosis if view.reachable is False else "",
            "behaviour": view.behaviours(self.policy.qkd_key_bits, self.stock.target),
        }


def _cause(exc: KmsError | QgateError) -> str:
    """A short key for "the same failure again": class and status, not the changing details."""
    status = exc.status if isinstance(exc, KmsError) else None
    return f"{type(exc).__name__}:{status}"
