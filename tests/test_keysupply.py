"""The master's QKD key stock and the KME view: correct whatever the KME does with outstanding keys."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from qgate.constants import QKD_OUT_MAX_AGE, QKD_PREFETCH_PROBATION
from qgate.crypto.secret import Secret
from qgate.keysupply import KeyStock, KmeView, paced_interval
from qgate.kms.etsi014 import QkdKey, Status


def _keys(n: int) -> list[QkdKey]:
    return [QkdKey(str(uuid.uuid4()), Secret(bytes(32))) for _ in range(n)]


def _ids(keys: list[QkdKey] | None) -> list[str]:
    assert keys is not None
    return [k.key_id for k in keys]


def _status(count: int = 100, per_request: int = 128, low: int = 64, high: int = 8192) -> Status:
    return Status("KME_A", "KME_B", "SAE_A", "SAE_B", 256, count, 1000, per_request, high, low, 0)


# ----- stock rules ----------------------------------------------------------------------------
def test_a_refill_is_asked_only_when_the_stock_is_empty_and_no_key_is_on_its_way() -> None:
    stock = KeyStock(target=3)
    assert stock.refill_request(0.0) == 3
    assert stock.refilling and stock.refill_request(0.0) == 0  # one request in flight
    stock.refill_done(_keys(3))
    first = stock.take(1, 1.0)
    assert stock.refill_request(1.0) == 0  # keys left
    rest = stock.take(2, 2.0)
    assert len(stock) == 0 and stock.refill_request(2.0) == 0  # two keys still out
    stock.settled(_ids(first) + _ids(rest)[:1])
    assert stock.refill_request(2.1) == 0
    stock.settled(_ids(rest)[1:])
    assert stock.refill_request(2.2) == 3


def test_keys_are_handed_out_once_in_arrival_order() -> None:
    stock = KeyStock(target=4)
    stock.refill_request(0.0)
    keys = _keys(4)
    stock.refill_done(keys)
    assert stock.take(1, 0.0) == keys[:1]
    assert stock.take(2, 0.0) == keys[1:3]
    assert stock.take(2, 0.0) is None
    assert stock.stats.stock_misses == 1
    assert stock.take(1, 0.0) == keys[3:]


def test_a_rekeys_own_enc_keys_drops_the_older_keys_left_in_stock() -> None:
    stock = KeyStock(target=2)
    stock.refill_request(0.0)
    stock.refill_done(_keys(2))
    assert stock.take(3, 0.0) is None  # short: the rekey asks the KME itself
    stock.on_demand()
    assert len(stock) == 0 and stock.stats.discarded == 2
    assert stock.refill_request(0.1) == 0  # never while the rekey's request is in flight
    own = _keys(3)
    stock.on_demand_done(_ids(own), 0.2)
    assert stock.refill_request(0.3) == 0  # nor while its keys are on their way to the slave
    stock.settled(_ids(own))
    assert stock.refill_request(0.4) == 2


def test_a_batch_never_exceeds_the_kmes_per_request_limit() -> None:
    stock = KeyStock(target=16)
    stock.set_per_request_limit(4)
    assert stock.refill_request(0.0) == 4
    stock.refill_done(_keys(4))
    stock.set_per_request_limit(None)  # a later status states no limit (0)
    assert stock.batch_size == 16


def test_a_refill_refused_as_too_large_halves_the_next_batch() -> None:
    stock = KeyStock(target=16)
    assert stock.refill_request(0.0) == 16
    stock.refill_failed(0.0, too_large=True)
    assert stock.refill_request(1.0) == 8
    stock.refill_failed(1.0, too_large=True)
    assert stock.refill_request(3.0) == 4


def test_a_short_answer_is_kept_and_counted() -> None:
    stock = KeyStock(target=8)
    stock.refill_request(0.0)
    stock.refill_done(_keys(3))
    assert len(stock) == 3 and stock.stats.short_answers == 1 and stock.stats.prefetched == 3


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


def test_a_key_whose_exchange_never_reports_back_stops_blocking_refills() -> None:
    stock = KeyStock(target=1)
    stock.refill_request(0.0)
    stock.refill_done(_keys(1))
    stock.take(1, 0.0)
    assert stock.refill_request(QKD_OUT_MAX_AGE - 1) == 0
    assert stock.refill_request(QKD_OUT_MAX_AGE + 1) == 1


def test_prefetch_off_never_requests_and_counts_no_misses() -> None:
    stock = KeyStock(target=0)
    assert stock.stats.mode == "off"
    assert stock.refill_request(0.0) == 0
    assert stock.take(1, 0.0) is None
    assert stock.stats.stock_misses == 0


def test_a_prefetched_key_refused_by_the_slaves_kme_switches_to_fetch_on_demand_for_a_probation() -> None:
    stock = KeyStock(target=4)
    stock.refill_request(0.0)
    stock.refill_done(_keys(4))
    dead = stock.take(1, 1.0)
    assert stock.rejected(_ids(dead), 1.5)
    assert stock.stats.mode == "on_demand" and "refused prefetched key_ID" in stock.stats.mode_reason
    assert len(stock) == 0 and stock.stats.discarded == 3 and stock.stats.rejected == 1
    assert stock.take(1, 2.0) is None and stock.stats.stock_misses == 0
    assert stock.refill_request(2.0) == 0
    back = 1.5 + QKD_PREFETCH_PROBATION
    assert stock.refill_request(back + 0.1) == 4 and stock.stats.mode == "prefetch"
    stock.refill_done(_keys(4))
    assert stock.rejected(_ids(stock.take(1, back + 1)), back + 2)  # dies again: a longer probation
    assert stock.refill_request(back + 2 + QKD_PREFETCH_PROBATION + 1) == 0
    assert stock.stats.mode_changes == 3


def test_a_refused_key_the_rekey_fetched_itself_leaves_the_stock_alone() -> None:
    stock = KeyStock(target=2)
    stock.on_demand()
    own = _keys(1)
    stock.on_demand_done(_ids(own), 0.0)
    assert not stock.rejected(_ids(own), 0.5)
    assert stock.stats.mode == "prefetch" and stock.refill_request(0.6) == 2


def test_a_refused_key_fetched_beside_a_stalled_refill_stops_prefetching() -> None:
    stock = KeyStock(target=4)
    assert stock.refill_request(0.0) == 4  # the refill stalls
    stock.on_demand()  # the rekey gave up waiting and asked itself
    own = _keys(1)
    stock.on_demand_done(_ids(own), 0.5)
    stock.refill_done(_keys(4))  # the stalled refill lands: on a replacing KME it killed `own`
    assert stock.rejected(_ids(own), 1.0)
    assert stock.stats.mode == "on_demand" and "while a refill was in flight" in stock.stats.mode_reason
    assert len(stock) == 0


# ----- the stock against KMEs that treat outstanding keys differently -------------------------
@dataclass
class _Kme:
    """A KME pair: ``keeps`` (most), ``replaces`` (each enc_keys supersedes the pair's
    outstanding keys) or ``expires`` (keys die ``ttl`` seconds after enc_keys)."""

    behaviour: str
    ttl: float = 3.0
    store: dict[str, float] = field(default_factory=dict)
    per_request: int = 1000

    def enc(self, number: int, now: float) -> list[QkdKey]:
        if self.behaviour == "replaces":
            self.store.clear()
        keys = _keys(min(number, self.per_request))
        self.store.update({k.key_id: now for k in keys})
        return keys

    def dec(self, key_ids: list[str], now: float) -> bool:
        alive = all(
            k in self.store and (self.behaviour != "expires" or now - self.store[k] < self.ttl)
            for k in key_ids
        )
        for k in key_ids:
            self.store.pop(k, None)
        return alive


def _run(kme: _Kme, rekeys: int, interval: float, target: int = 8) -> tuple[KeyStock, int, int]:
    """Rekey ``rekeys`` times the way the gateway drives the stock; return (stock, refused, done)."""
    stock, now, refused, done = KeyStock(target), 0.0, 0, 0
    for _ in range(rekeys):
        if number := stock.refill_request(now):
            stock.refill_done(kme.enc(number, now))
            now += 0.01
        keys = stock.take(1, now)
        if keys is None:
            stock.on_demand()
            keys = kme.enc(1, now)
            stock.on_demand_done(_ids(keys), now)
        now += 0.02
        if kme.dec(_ids(keys), now):
            stock.settled(_ids(keys))
            done += 1
        else:
            refused += 1
            stock.rejected(_ids(keys), now)
        now += interval
    return stock, refused, done


def test_no_key_is_ever_refused_on_a_kme_that_replaces_outstanding_keys_on_every_enc_keys() -> None:
    stock, refused, done = _run(_Kme("replaces"), rekeys=300, interval=1.0)
    assert refused == 0 and done == 300
    assert stock.stats.mode == "prefetch" and stock.stats.served_from_stock >= 250
    assert stock.stats.discarded == 0


def test_keys_that_expire_in_stock_cost_one_refusal_then_keys_come_on_demand() -> None:
    stock, refused, done = _run(_Kme("expires", ttl=3.0), rekeys=200, interval=1.0)
    assert refused == 1 and done == 199
    assert stock.stats.mode == "on_demand"


def test_a_kme_that_keeps_keys_serves_nearly_every_rekey_from_stock() -> None:
    stock, refused, done = _run(_Kme("keeps", per_request=4), rekeys=100, interval=0.5)
    assert refused == 0 and done == 100 and stock.stats.served_from_stock >= 75


@settings(max_examples=60, deadline=None)
@given(
    behaviour=st.sampled_from(["keeps", "replaces"]),
    interval=st.floats(0.05, 5.0),
    target=st.integers(1, 32),
    per_request=st.integers(1, 64),
)
def test_prefetching_never_costs_a_refused_key_on_keeping_or_replacing_kmes(
    behaviour: str, interval: float, target: int, per_request: int
) -> None:
    _, refused, _ = _run(
        _Kme(behaviour, per_request=per_request), rekeys=60, interval=interval, target=target
    )
    assert refused == 0


# ----- what the KME is believed to do ---------------------------------------------------------
def test_a_kme_that_always_reports_zero_is_never_evidence_of_an_empty_store() -> None:
    view = KmeView()
    for t in range(10):
        view.status_seen(_status(count=0), 5.0 * t)  # no delivery to contradict it (a slave, an impostor)
    assert view.count_trusted and not view.empty()


def test_a_zero_count_while_keys_are_delivered_twice_is_no_longer_believed() -> None:
    view = KmeView()
    view.status_seen(_status(count=3), 0.0)
    view.status_seen(_status(count=0), 0.0)
    assert view.empty()  # a KME that really ran dry says so
    view.keys_delivered(1.0, asked=4, got=4)
    assert view.count_trusted  # once could be a KME that refilled meanwhile
    view.status_seen(_status(count=0), 5.0)
    view.keys_delivered(6.0, asked=4, got=4)
    assert not view.count_trusted and view.stored_count() is None and not view.empty()
    assert any("stored_key_count 0 while it delivers" in n for n in view.behaviours(256))


def test_a_believable_count_is_used_and_an_exhausted_answer_is_evidence_of_shortage() -> None:
    view = KmeView()
    view.status_seen(_status(count=40), 0.0)
    assert view.stored_count() == 40 and not view.low_evidence(0.0)
    view.exhausted(1.0)
    assert view.low_evidence(2.0)
    view.keys_delivered(3.0, asked=1, got=1)
    assert not view.low_evidence(3.0)


def test_the_view_names_limits_sizes_short_and_slow_answers() -> None:
    view = KmeView()
    view.status_seen(Status("K1", "K2", "S1", "S2", 256, 10, 0, 0, 0, 0, 0), 0.0)
    assert any("states no limits" in n for n in view.behaviours(256))
    view.status_seen(_status(per_request=4, low=128, high=128), 1.0)
    notes = view.behaviours(256, prefetch=16)
    assert any(n.startswith("max_key_per_request 4: prefetch batches of 4") for n in notes)
    assert any("qkd_key_bits 256 is outside" in n for n in notes)
    view.keys_delivered(2.0, asked=4, got=2)
    view.answered(2.0, 3.2)
    notes = view.behaviours(128)
    assert any("fewer keys than asked 1 times" in n for n in notes)
    assert any("slowest 3.2 s" in n for n in notes)


def test_reachability_follows_every_answer_and_changes_are_reported_once() -> None:
    view = KmeView()
    assert view.reachable is None
    assert view.unreachable("TLS: no shared cipher")
    assert not view.unreachable("TLS: no shared cipher")
    view.answered(1.0, 0.01)
    assert view.reachable


# ----- pacing ---------------------------------------------------------------------------------
def test_interval_stays_at_base_while_stock_covers_the_horizon() -> None:
    assert paced_interval(60, base=1.0, ceiling=2.0, horizon=60.0) == (1.0, False)


def test_interval_stays_at_base_with_no_count_to_go_by() -> None:
    assert paced_interval(None, base=1.0, ceiling=2.0, horizon=60.0) == (1.0, False)


def test_interval_stretches_in_proportion_when_stock_runs_low_and_alarms() -> None:
    assert paced_interval(40, base=1.0, ceiling=2.0, horizon=60.0) == (1.5, True)


def test_stretched_interval_never_exceeds_the_policy_ceiling() -> None:
    assert paced_interval(0, base=1.0, ceiling=2.0, horizon=60.0) == (2.0, True)
    assert paced_interval(5, base=0.1, ceiling=0.25, horizon=60.0) == (0.25, True)
