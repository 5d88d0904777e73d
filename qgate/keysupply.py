"""QKD key supply for a master peer: keys fetched ahead of need, kept valid whatever the KME does.

The master SAE calls ETSI GS QKD 014 ``enc_keys`` (section 5.2) before a rekey needs the key,
so a slow KME does not stall a rekey. ETSI 014 leaves open what a KME does with keys it handed
to the master SAE that the slave SAE has not fetched yet when the master asks again: most keep
them, some replace them (each ``enc_keys`` supersedes the pair's outstanding keys), some expire
them. :class:`KeyStock` is correct for all three:

* it holds the keys of one ``enc_keys`` answer (a *batch*) at most: a newer batch drops what is
  left of older ones (counted in ``discarded``), so a key of an older batch is never used once a
  newer one exists, and a batch is at most the KME's ``max_key_per_request`` keys;
* a refill is asked for only when the stock is empty and no key handed out is still on its way
  to the slave (*out*: taken for an exchange that has not completed), so the refill cannot
  supersede a key the slave is about to fetch; in steady state the refill runs right after the
  exchange that took the last key completes, an interval before the next rekey needs one;
* a rekey that finds the stock empty while a refill is in flight waits for it
  (:attr:`KeyStock.refilling`) rather than racing it with its own ``enc_keys``;
* when the slave reports that its KME refused a key_ID from the stock (Kick reason 2), what is
  left of the stock is dropped and prefetching stops (mode ``on_demand``: keys die in stock on
  this KME); it is tried again after :data:`~qgate.constants.QKD_PREFETCH_PROBATION` seconds,
  doubling at each new failure.

:class:`KmeView` keeps what the gateway learned about the KME's behaviour (reachability from
every answer, not only status polls; whether ``stored_key_count`` can be believed; the limits
it states; short and slow answers) for pacing, local evidence and ``qgate status``.

Nothing here does I/O: the gateway runs the requests and reports back with ``now`` (monotonic
seconds).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final, Literal

from qgate.constants import (
    QKD_HEDGE_AFTER,
    QKD_HEDGE_MIN,
    QKD_OUT_MAX_AGE,
    QKD_PREFETCH_PROBATION,
    QKD_PREFETCH_PROBATION_MAX,
    QKD_PREFETCH_RETRY_MAX,
    QKD_SLOW_ANSWER,
    QKD_STOCK_HORIZON,
    STATUS_POLL_INTERVAL,
)
from qgate.kms.etsi014 import QkdKey, Status

SupplyMode = Literal["prefetch", "on_demand", "off"]
"""``prefetch``: keys fetched ahead; ``on_demand``: each rekey asks the KME itself (prefetched
keys died on this KME); ``off``: ``qkd_prefetch`` is 0, or this side is the slave SAE."""

ON_DEMAND: Final = -1
"""Batch number of keys the rekey fetched itself (not from the stock)."""
COUNT_CONTRADICTIONS: Final = 2
"""Status answers with ``stored_key_count`` 0 while ``enc_keys`` delivered within one poll period
after which the count is no longer believed (one could be a KME that really ran dry)."""
LATENCY_SAMPLES: Final = 32
"""KME answer times kept for the stall threshold (:meth:`KmeView.hedge_after`)."""
SERVED_MEMORY: Final = 256
"""key_IDs handed out whose batch is remembered, for a rejection that arrives late."""


@dataclass
class SupplyStats:
    """Counters and gauges of one peer's key supply (no key bytes)."""

    prefetched: int = 0
    served_from_stock: int = 0
    stock_misses: int = 0
    discarded: int = 0
    rejected: int = 0
    refill_failures: int = 0
    short_answers: int = 0
    kme_stored_key_count: int | None = None
    stock_alarms: int = 0
    stock_low: bool = False
    last_error: str = ""
    mode: SupplyMode = "prefetch"
    mode_reason: str = ""
    mode_changes: int = 0
    batch_limit: int = 0


class KeyStock:
    """The prefetched QKD keys of one peer (see the module doc for the rules).

    Args:
        target: keys to keep in stock (policy ``qkd_prefetch``, 0-1024; 0 disables prefetching).
        per_request: keys one ``enc_keys`` may ask for, until the KME states its own
            ``max_key_per_request`` (:meth:`set_per_request_limit`).
    """

    def __init__(self, target: int, per_request: int = 128) -> None:
        self.target = target
        self.stats = SupplyStats(mode="prefetch" if target else "off")
        self._kme_limit: int | None = None
        self._learnt_limit = max(1, per_request)  # halved when a refill is refused as too large
        self._keys: deque[tuple[int, QkdKey]] = deque()
        self._batch = 0
        self._in_flight = 0  # keys asked for by the refill in flight, 0: none
        self._on_demand = False  # a rekey's own enc_keys is in flight
        self._raced = False
        self._raced_ids: set[str] = set()  # on-demand keys asked for beside a refill in flight
        self._out: dict[str, tuple[int, float]] = {}  # key_ID -> (batch, handed out at)
        self._served: OrderedDict[str, int] = OrderedDict()
        self._retry_at = 0.0
        self._backoff = 0.0
        self._probation = QKD_PREFETCH_PROBATION
        self._prefetch_again_at: float | None = None
        self.stats.batch_limit = self.batch_size

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def batch_size(self) -> int:
        """Keys one refill asks for: ``target``, capped by the KME's per-request limit."""
        limit = min(self._learnt_limit, self._kme_limit or self._learnt_limit)
        return max(0, min(self.target, limit))

    @property
    def refilling(self) -> bool:
        """Whether a refill is in flight (a rekey short of keys waits for it)."""
        return self._in_flight > 0

    def set_target(self, target: int) -> None:
        """Change ``qkd_prefetch`` (on reload); 0 turns prefetching off and drops the stock."""
        self.target = target
        if not target:
            self.stats.discarded += len(self._keys)
            self._keys.clear()
            self._set_mode("off", "qkd_prefetch is 0")
        elif self.stats.mode == "off":
            self._set_mode("prefetch", "qkd_prefetch set")
        self.stats.batch_limit = self.batch_size

    def set_per_request_limit(self, limit: int | None) -> None:
        """Apply the KME's stated ``max_key_per_request`` (None or 0: not stated)."""
        self._kme_limit = limit if limit else None
        self.stats.batch_limit = self.batch_size

    def take(self, number: int, now: float) -> list[QkdKey] | None:
        """Hand out ``number`` keys of the newest batch for an exchange, or None when short.

        None (counted as a miss while prefetching) tells the caller to ask the KME itself, after
        calling :meth:`on_demand`; the keys handed out are *out* until :meth:`settled`.
        """
        if self.stats.mode != "prefetch" or number <= 0:
            return None
        if len(self._keys) < number:
            self.stats.stock_misses += 1
            return None
        self.stats.served_from_stock += number
        taken = [self._keys.popleft() for _ in range(number)]
        for batch, key in taken:
            self._hand_out(key.key_id, batch, now)
        return [key for _, key in taken]

    def on_demand(self) -> None:
        """The caller asks the KME for a rekey's keys itself: its answer is a newer batch.

        What is left in stock is dropped now (a KME that replaces outstanding keys kills it), and no
        refill starts until those keys are delivered and settled.
        """
        self._drop_stock()
        self._on_demand = True
        self._raced = self._in_flight > 0  # asked while a (stalled) refill is still in flight

    def on_demand_done(self, key_ids: list[str], now: float) -> None:
        """The rekey's own ``enc_keys`` answered (``key_ids``) or failed (empty list)."""
        self._on_demand = False
        self._batch += 1
        for key_id in key_ids:
            self._hand_out(key_id, ON_DEMAND, now)
            if self._raced:
                self._raced_ids.add(key_id)

    def settled(self, key_ids: list[str]) -> None:
        """An exchange holding ``key_ids`` completed, was abandoned or dropped them: no longer out."""
        for key_id in key_ids:
            self._out.pop(key_id, None)
            self._raced_ids.discard(key_id)

    def rejected(self, key_ids: list[str], now: float) -> bool:
        """The slave's KME refused ``key_ids`` (Kick reason 2). Return True if the mode changed.

        A key of the stock refused there means keys die in stock on this KME (it replaced or
        expired them): the stock is dropped and prefetching stops until the probation ends. A key
        the rekey fetched itself changes nothing here.
        """
        batches = {self._served.get(key_id) for key_id in key_ids} - {None}
        raced = any(key_id in self._raced_ids for key_id in key_ids)
        self.settled(key_ids)
        self.stats.rejected += len(key_ids)
        if not batches or self.stats.mode != "prefetch" or (batches == {ON_DEMAND} and not raced):
            return False
        self._drop_stock()
        self._prefetch_again_at = now + self._probation
        self._probation = min(2 * self._probation, QKD_PREFETCH_PROBATION_MAX)
        what = "a key_ID fetched while a refill was in flight" if raced else "prefetched key_ID"
        self._set_mode(
            "on_demand",
            f"the slave's KME refused {what} {key_ids[0]}: this KME does not keep keys "
            f"handed out earlier (it replaces or expires them); prefetch again in "
            f"{self._prefetch_again_at - now:.0f} s",
        )
        return True

    def refill_request(self, now: float) -> int:
        """Return how many keys to ask the KME for now (0: no refill now).

        Asks only while prefetching, with the stock empty, no refill or on-demand request in
        flight, no key out (younger than QKD_OUT_MAX_AGE) and no backoff running.
        """
        again = self._prefetch_again_at
        if self.stats.mode == "on_demand" and again is not None and now >= again:
            self._prefetch_again_at = None
            self._set_mode("prefetch", "probation over: prefetching again")
        if self.stats.mode != "prefetch" or self._keys or self._in_flight or self._on_demand:
            return 0
        if now < self._retry_at or self._any_out(now):
            return 0
        self._in_flight = self.batch_size
        return self._in_flight

    def refill_done(self, keys: list[QkdKey]) -> None:
        """Store a refill's keys as the newest batch (older keys, if any, are dropped)."""
        asked, self._in_flight = self._in_flight, 0
        self._backoff = 0.0
        if asked and len(keys) < asked:
            self.stats.short_answers += 1
        self._drop_stock()
        self._batch += 1
        if self.stats.mode != "prefetch":
            self.stats.discarded += len(keys)  # the mode changed while it was in flight
            return
        self._keys.extend((self._batch, key) for key in keys)
        self.stats.prefetched += len(keys)

    def refill_failed(self, now: float, *, too_large: bool = False) -> None:
        """Note a failed refill; the next waits 0.5 s, doubling up to QKD_PREFETCH_RETRY_MAX.

        ``too_large``: the KME refused the request itself (HTTP 400/422, not "no keys"), as a KME
        with an unstated per-request limit does: the next refill asks for half as many keys.
        """
        asked, self._in_flight = self._in_flight, 0
        self._backoff = min(max(2 * self._backoff, 0.5), QKD_PREFETCH_RETRY_MAX)
        self._retry_at = now + self._backoff
        self.stats.refill_failures += 1
        if too_large and asked > 1:
            self._learnt_limit = max(1, asked // 2)
            self.stats.batch_limit = self.batch_size

    def clear(self) -> None:
        """Drop every key in stock (at shutdown; not counted as discarded)."""
        self._keys.clear()

    def _drop_stock(self) -> None:
        self.stats.discarded += len(self._keys)
        self._keys.clear()

    def _hand_out(self, key_id: str, batch: int, now: float) -> None:
        self._out[key_id] = (batch, now)
        self._served[key_id] = batch
        while len(self._served) > SERVED_MEMORY:
            self._served.popitem(last=False)

    def _any_out(self, now: float) -> bool:
        for key_id, (_, since) in list(self._out.items()):
            if now - since > QKD_OUT_MAX_AGE:
                del self._out[key_id]  # its exchange ended long ago without telling us
        return bool(self._out)

    def _set_mode(self, mode: SupplyMode, reason: str) -> None:
        if mode != self.stats.mode:
            self.stats.mode_changes += 1
        self.stats.mode, self.stats.mode_reason = mode, reason


class KmeView:
    """What the gateway learned about its KME for one peer (SAE pair), from every answer.

    ``reachable`` follows every request (status polls and key requests): an HTTP answer of any
    kind means reachable, a connection/TLS failure means not. ``stored_key_count`` is believed
    only until the KME contradicts it: a count of 0 while ``enc_keys`` for the pair delivers
    keys, twice (some KMEs count "delivered, not consumed"), makes it untrusted for good; pacing
    then relies on measured delivery (an "exhausted" answer) instead.
    """

    def __init__(self) -> None:
        self.reachable: bool | None = None
        self.status: Status | None = None
        self.status_error = ""
        self.count_trusted = True
        self.count_seen_nonzero = False
        self.exhausted_at: float | None = None
        self.delivered_at: float | None = None
        self.short_answers = 0
        self.slow_answers = 0
        self.slowest_s = 0.0
        self.stalls = 0
        self.refused = 0
        self.exhaustions = 0
        self.last_error = ""
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._zero_count_at: float | None = None
        self._counted_zero: float | None = None
        self._contradictions = 0

    def answered(self, now: float, seconds: float) -> None:
        """The KME answered a request (any HTTP status) after ``seconds``."""
        self.reachable = True
        self.slowest_s = max(self.slowest_s, seconds)
        self._latencies.append(seconds)
        if seconds >= QKD_SLOW_ANSWER:
            self.slow_answers += 1

    def stalled(self) -> None:
        """A key request had no answer after :meth:`hedge_after` seconds (it was asked again)."""
        self.stalls += 1

    def hedge_after(self) -> float:
        """Seconds after which a key request counts as stalled: 4 x the median of the last
        LATENCY_SAMPLES answers, within [QKD_HEDGE_MIN, QKD_HEDGE_AFTER]."""
        if not self._latencies:
            return QKD_HEDGE_AFTER
        median = sorted(self._latencies)[len(self._latencies) // 2]
        return min(QKD_HEDGE_AFTER, max(QKD_HEDGE_MIN, 4 * median))

    def unreachable(self, error: str) -> bool:
        """No HTTP answer (connection, timeout, TLS). Return True if this changes the state."""
        changed = self.reachable is not False
        self.reachable, self.last_error = False, error
        return changed

    def status_seen(self, status: Status, now: float) -> None:
        """A status answer (ETSI 014 section 5.1) was parsed."""
        self.status, self.status_error = status, ""
        if status.stored_key_count > 0:
            self.count_seen_nonzero = True
        if status.stored_key_count == 0:
            self._zero_count_at = now
            self._contradicted(now)
        elif self.count_trusted:
            self._zero_count_at = None

    def keys_delivered(self, now: float, asked: int, got: int) -> None:
        """``enc_keys`` delivered ``got`` of ``asked`` keys."""
        self.delivered_at = now
        self.exhausted_at = None
        if got < asked:
            self.short_answers += 1
        self._contradicted(now)

    def exhausted(self, now: float) -> None:
        """The KME said it has no keys now (``KmsExhaustedError``)."""
        self.exhausted_at = now
        self.exhaustions += 1

    def stored_count(self) -> int | None:
        """The KME's ``stored_key_count`` if it can be believed, else None."""
        if self.status is None or not self.count_trusted:
            return None
        return self.status.stored_key_count

    def empty(self) -> bool:
        """Whether the KME credibly holds no key for the pair (local evidence, docs/protocol.md).

        Only a KME whose count was seen above 0 before, and is still believed, can say "empty":
        a KME that always reports 0 (its count means something else, or it states nothing)
        never makes this side accept a degraded handshake (with a stolen master identity key,
        a peer could otherwise run degraded while both KMEs are healthy).
        """
        return self.count_seen_nonzero and self.stored_count() == 0

    def low_evidence(self, now: float) -> bool:
        """Whether the KME said "no keys" within QKD_STOCK_HORIZON (pacing without a count)."""
        return self.exhausted_at is not None and now - self.exhausted_at <= QKD_STOCK_HORIZON

    def behaviours(self, qkd_key_bits: int, prefetch: int = 0) -> list[str]:
        """Plain-language notes on how this KME behaves (for ``qgate status`` and logs).

        ``prefetch``: the stock's target; a ``max_key_per_request`` below it is noted.
        """
        notes: list[str] = []
        status = self.status
        if not self.count_trusted:
            notes.append("reports stored_key_count 0 while it delivers keys: count not used for pacing")
        if status is not None:
            limits = (
                status.max_key_count,
                status.max_key_per_request,
                status.max_key_size,
                status.min_key_size,
            )
            if not any(limits):
                notes.append("states no limits (max_key_count, max_key_per_request, key sizes all 0)")
            if 0 < status.max_key_per_request < prefetch:
                notes.append(
                    f"max_key_per_request {status.max_key_per_request}: prefetch batches of "
                    f"{status.max_key_per_request}, not qkd_prefetch {prefetch}"
                )
            if status.max_key_size and not status.min_key_size <= qkd_key_bits <= status.max_key_size:
                notes.append(
                    f"serves keys of {status.min_key_size}-{status.max_key_size} bits, policy qkd_key_bits "
                    f"{qkd_key_bits} is outside: every key request will fail"
                )
        elif self.status_error:
            notes.append(f"status unreadable: {self.status_error}")
        if self.short_answers:
            notes.append(f"answered enc_keys with fewer keys than asked {self.short_answers} times (kept)")
        if self.exhaustions:
            notes.append(f"had no key to give {self.exhaustions} times (its store for this pair was empty)")
        if self.refused:
            notes.append(f"refused key_IDs {self.refused} times (unknown, consumed or expired there)")
        if self.stalls:
            notes.append(f"stalled {self.stalls} times (no answer in time; dec_keys asked again in parallel)")
        if self.slow_answers:
            notes.append(
                f"{self.slow_answers} answers slower than {QKD_SLOW_ANSWER:g} s"
                f" (slowest {self.slowest_s:.1f} s)"
            )
        return notes

    def _contradicted(self, now: float) -> None:
        """A zero count and a delivery within one status period of each other, twice: untrusted."""
        zero, delivered = self._zero_count_at, self.delivered_at
        if zero is None or delivered is None or zero == self._counted_zero:
            return
        if abs(zero - delivered) <= STATUS_POLL_INTERVAL:
            self._counted_zero = zero
            self._contradictions += 1
            self.count_trusted = self._contradictions < COUNT_CONTRADICTIONS


def paced_interval(
    available: int | None, base: float, ceiling: float, horizon: float = QKD_STOCK_HORIZON
) -> tuple[float, bool]:
    """Return the ratchet interval to use and whether the key stock is low.

    The stock is low when ``available`` keys (local stock plus a believable KME
    ``stored_key_count``) cover less than ``horizon`` seconds of ratchets at the ``base``
    interval; the interval then stretches in proportion, never beyond ``ceiling`` (policy
    ``rekey.max_interval``; the hard ``max_key_age`` never stretches). ``available`` None: no
    count to go by and no sign of shortage, so ``base``. Seconds in, seconds out.
    """
    needed = horizon / base
    if available is None or available >= needed:
        return base, False
    return min(ceiling, base * needed / max(available, 1)), True
