"""The master's QKD key stock: prefetch, hand-out once in order, backoff on KME failure."""

from __future__ import annotations

import uuid

from qgate.crypto.secret import Secret
from qgate.keysupply import KeyStock, paced_interval
from qgate.kms.etsi014 import QkdKey


def _keys(n: int) -> list[QkdKey]:
    return [QkdKey(str(uuid.uuid4()), Secret(bytes(32))) for _ in range(n)]


def test_stock_refills_in_batches_once_below_half_its_target_one_request_at_a_time() -> None:
    stock = KeyStock(target=20, max_per_request=8)
    assert stock.refill_request(0.0) == 8
    assert stock.refill_request(0.0) == 0  # one request in flight
    stock.refill_done(_keys(8))
    assert stock.refill_request(0.0) == 8
    stock.refill_done(_keys(8))
    assert stock.refill_request(0.0) == 0  # 16 of 20: above half, no request
    stock.take(7)
    assert stock.refill_request(0.0) == 8  # 9 of 20: below half
    stock.refill_done(_keys(8))
    assert len(stock) == 17


def test_keys_are_handed_out_once_in_arrival_order() -> None:
    stock = KeyStock(target=4)
    stock.refill_request(0.0)
    keys = _keys(4)
    stock.refill_done(keys)
    assert stock.take(1) == keys[:1]
    assert stock.take(2) == keys[1:3]
    assert stock.take(2) is None
    assert stock.stats.stock_misses == 1
    assert stock.take(1) == keys[3:]


def test_failed_refills_back_off_and_recover() -> None:
    stock = KeyStock(target=2)
    assert stock.refill_request(0.0) == 2
    stock.refill_failed(0.0)
    assert stock.refill_request(0.1) == 0
    assert stock.refill_request(0.6) == 2
    stock.refill_failed(0.6)
    assert stock.refill_request(1.5) == 0
    assert stock.refill_request(1.7) == 2
    stock.refill_done(_keys(2))
    assert stock.stats.refill_failures == 2 and len(stock) == 2


def test_prefetch_off_never_requests_and_counts_no_misses() -> None:
    stock = KeyStock(target=0)
    assert stock.refill_request(0.0) == 0
    assert stock.take(1) is None
    assert stock.stats.stock_misses == 0


def test_interval_stays_at_base_while_stock_covers_the_horizon() -> None:
    assert paced_interval(60, base=1.0, ceiling=2.0, horizon=60.0) == (1.0, False)


def test_interval_stretches_in_proportion_when_stock_runs_low_and_alarms() -> None:
    assert paced_interval(40, base=1.0, ceiling=2.0, horizon=60.0) == (1.5, True)


def test_stretched_interval_never_exceeds_the_policy_ceiling() -> None:
    assert paced_interval(0, base=1.0, ceiling=2.0, horizon=60.0) == (2.0, True)
    assert paced_interval(5, base=0.1, ceiling=0.25, horizon=60.0) == (0.25, True)
