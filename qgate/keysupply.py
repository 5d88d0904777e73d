"""QKD key supply for a master peer: keys fetched ahead of need, and the KME's published stock.

The master SAE calls ETSI GS QKD 014 ``enc_keys`` (section 5.2) before a rekey needs the key, so
a slow KME never stalls a rekey. Keys wait here in arrival order (their key_IDs are already
known to the slave's KME); each is handed out once. This module holds no I/O: the gateway
runs the requests ``refill_request`` asks for and reports back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from qgate.constants import QKD_PREFETCH_RETRY_MAX, QKD_STOCK_HORIZON
from qgate.kms.etsi014 import QkdKey


@dataclass
class SupplyStats:
    """Counters and gauges of one peer's key supply (no key bytes)."""

    prefetched: int = 0
    served_from_stock: int = 0
    stock_misses: int = 0
    refill_failures: int = 0
    kme_stored_key_count: int | None = None
    stock_alarms: int = 0
    stock_low: bool = False
    last_error: str = ""


class KeyStock:
    """A bounded FIFO of prefetched QKD keys for one peer.

    Args:
        target: keys to keep in stock (policy ``qkd_prefetch``, 0-1024; 0 disables prefetching).
        max_per_request: keys per ``enc_keys`` call at most (the KME's ``max_key_per_request``).
    """

    def __init__(self, target: int, max_per_request: int = 16) -> None:
        self.target = target
        self.max_per_request = max(1, max_per_request)
        self.stats = SupplyStats()
        self._keys: deque[QkdKey] = deque()
        self._in_flight = False
        self._retry_at = 0.0
        self._backoff = 0.0

    def __len__(self) -> int:
        return len(self._keys)

    def take(self, number: int) -> list[QkdKey] | None:
        """Return ``number`` keys in arrival order, or None (counted) when the stock is short."""
        if len(self._keys) < number or number <= 0:
            if self.target:
                self.stats.stock_misses += 1
            return None
        self.stats.served_from_stock += number
        return [self._keys.popleft() for _ in range(number)]

    def refill_request(self, now: float) -> int:
        """Return how many keys to ask the KME for now.

        0 while the stock is above half its target, while a request is in flight, or while backing off.
        """
        missing = self.target - len(self._keys)
        low_water = max(1, self.target // 2)  # refill in batches: one KME round trip per several rekeys
        if missing < low_water or self._in_flight or now < self._retry_at:
            return 0
        self._in_flight = True
        return min(missing, self.max_per_request)

    def refill_done(self, keys: list[QkdKey]) -> None:
        """Store the keys a refill request returned."""
        self._in_flight = False
        self._backoff = 0.0
        self._keys.extend(keys)
        self.stats.prefetched += len(keys)

    def refill_failed(self, now: float) -> None:
        """Note a failed refill; the next one waits 0.5 s, doubling up to QKD_PREFETCH_RETRY_MAX."""
        self._in_flight = False
        self._backoff = min(max(2 * self._backoff, 0.5), QKD_PREFETCH_RETRY_MAX)
        self._retry_at = now + self._backoff
        self.stats.refill_failures += 1

    def clear(self) -> None:
        """Drop every key in stock (at shutdown)."""
        self._keys.clear()


def paced_interval(
    available: int, base: float, ceiling: float, horizon: float = QKD_STOCK_HORIZON
) -> tuple[float, bool]:
    """Return the ratchet interval to use and whether the key stock is low.

    The stock is low when ``available`` keys (local stock plus the KME's ``stored_key_count``)
    cover less than ``horizon`` seconds of ratchets at the ``base`` interval; the interval then
    stretches in proportion, never beyond ``ceiling`` (policy ``rekey.max_interval``; the hard
    ``max_key_age`` never stretches). Seconds in, seconds out.
    """
    needed = horizon / base
    if available >= needed:
        return base, False
    return min(ceiling, base * needed / max(available, 1)), True
