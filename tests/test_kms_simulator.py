"""KME simulator logic (qgate.kms.simulator, qgate.kms.sim_store) with two KMEs joined in memory.

Callers are given as certificate CNs directly; the real HTTPS/mTLS pair is in test_kms_pair.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest

from qgate.crypto.secret import Secret
from qgate.errors import ConfigError, KmsBadAnswerError, KmsUnavailableError
from qgate.kms import etsi014
from qgate.kms.sim_store import (
    DeliveredKey,
    IncomingStore,
    LinkKeys,
    OutgoingPool,
    Rejection,
    ReleaseSchedule,
)
from qgate.kms.simulator import DELIVERED_PATH, INFO_PATH, Kme, KmeConfig

API = "/api/v1/keys"
SECRET = Secret(bytes(range(32)))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryPeer:
    """PeerLink delivering to another in-process Kme, as KME ``caller``."""

    def __init__(self, caller: str) -> None:
        self.caller = caller
        self.target: Kme | None = None
        self.up = True

    def _call(self, method: str, path: str, body: bytes) -> bytes:
        if not self.up or self.target is None:
            raise KmsUnavailableError("peer down")
        status, answer = self.target.handle(method, path, {}, body, self.caller)
        if status != 200:
            raise KmsBadAnswerError(f"HTTP {status}", status=status)
        return answer

    def report_delivered(self, body: bytes) -> None:
        self._call("POST", DELIVERED_PATH, body)

    def fetch_saes(self) -> tuple[str, ...]:
        return tuple(json.loads(self._call("GET", INFO_PATH, b""))["SAE_IDs"])


@dataclass
class Pair:
    a: Kme
    b: Kme
    peer_a: MemoryPeer  # A's channel to B
    peer_b: MemoryPeer
    clock: Clock


def make_pair(**overrides: object) -> Pair:
    clock = Clock()
    base = KmeConfig(
        kme_id="KME_A",
        peer_kme_id="KME_B",
        saes=("SAE_A",),
        link_secret=SECRET,
        rate=2560.0,  # 10 keys of 256 bits per second
        max_key_count=20,
        initial_key_count=10,
        max_key_per_request=8,
    )
    cfg_a = replace(base, **overrides)  # type: ignore[arg-type]
    peer_saes = ("SAE_A",) if cfg_a.peer_saes else ()
    cfg_b = replace(cfg_a, kme_id="KME_B", peer_kme_id="KME_A", saes=("SAE_B", "SAE_C"), peer_saes=peer_saes)
    peer_a, peer_b = MemoryPeer("KME_A"), MemoryPeer("KME_B")
    a, b = Kme(cfg_a, clock=clock, peer=peer_a), Kme(cfg_b, clock=clock, peer=peer_b)
    peer_a.target, peer_b.target = b, a
    return Pair(a, b, peer_a, peer_b, clock)


@pytest.fixture
def pair() -> Iterator[Pair]:
    yield make_pair()


def call(
    kme: Kme, method: str, path: str, caller: str | None, body: object = None, **query: str
) -> tuple[int, object]:
    raw = b"" if body is None else json.dumps(body).encode()
    status, answer = kme.handle(method, path, {k: [v] for k, v in query.items()}, raw, caller)
    return status, json.loads(answer)


def enc(kme: Kme, caller: str, slave: str, body: object) -> tuple[int, dict[str, object]]:
    status, answer = call(kme, "POST", f"{API}/{slave}/enc_keys", caller, body)
    assert isinstance(answer, dict)
    return status, answer


def dec(kme: Kme, caller: str, master: str, key_ids: list[str]) -> tuple[int, dict[str, object]]:
    body = {"key_IDs": [{"key_ID": k} for k in key_ids]}
    status, answer = call(kme, "POST", f"{API}/{master}/dec_keys", caller, body)
    assert isinstance(answer, dict)
    return status, answer


def key_ids(container: dict[str, object]) -> list[str]:
    keys = container["keys"]
    assert isinstance(keys, list)
    return [k["key_ID"] for k in keys]


# --- release model ------------------------------------------------------------------------------


def test_pool_releases_keys_at_rate_up_to_max_key_count() -> None:
    pool = OutgoingPool(ReleaseSchedule(2560.0), key_size=256, max_key_count=20, start=0.0)
    assert pool.available(0.0) == 0
    assert pool.available(0.55) == 5
    assert pool.available(1.0) == 10
    assert pool.available(100.0) == 20  # bounded; the overflow is lost
    assert pool.take(15, 100.0) == 980 and pool.take(5, 100.0) == 995  # index = blocks since the epoch
    assert pool.available(100.0) == 0
    assert pool.available(100.5) == 5  # resumes from the schedule, not from a backlog


def test_pool_in_bursts_releases_only_during_each_pass() -> None:
    schedule = ReleaseSchedule(2560.0, burst_period=10.0, burst_duration=2.0)
    pool = OutgoingPool(schedule, key_size=256, max_key_count=1000, start=0.0)
    assert pool.available(2.0) == 20
    assert pool.available(9.9) == 20  # between passes: nothing new
    assert pool.available(11.0) == 30


def test_pool_in_passes_of_burst_bits_releases_each_pass_at_once() -> None:
    schedule = ReleaseSchedule(0.0, burst_period=10.0, burst_bits=256 * 30)  # 30 blocks per pass
    pool = OutgoingPool(schedule, key_size=256, max_key_count=1000, start=5.0)
    assert pool.available(5.0) == 0  # pass 0 came at t=0, before the KME started
    assert pool.available(9.99) == 0  # nothing between passes
    assert pool.available(10.0) == 30  # the whole pass at the start of the period
    assert pool.take(20, 15.0) == 30  # pass 1 (blocks 30..59) follows pass 0 (blocks 0..29)
    assert pool.available(20.0) == 40


def test_pool_in_passes_of_burst_bits_spreads_a_pass_over_its_duration() -> None:
    schedule = ReleaseSchedule(0.0, burst_period=10.0, burst_duration=4.0, burst_bits=256 * 40)
    pool = OutgoingPool(schedule, key_size=256, max_key_count=25, start=0.0)
    assert pool.available(1.0) == 10  # 10 blocks per second during the pass
    assert pool.available(4.0) == 25  # capped at max_key_count: the rest of the pass is lost
    assert pool.available(9.0) == 25


def test_steady_rate_and_old_style_passes_are_unchanged_by_burst_bits() -> None:
    assert ReleaseSchedule(100.0).bits_released(3.0) == 300.0
    old_style = ReleaseSchedule(100.0, burst_period=10.0, burst_duration=2.0)
    assert old_style.pass_bits == 200.0 and old_style.bits_released(25.0) == 600.0


def test_pool_take_refuses_more_than_stored_without_consuming() -> None:
    pool = OutgoingPool(ReleaseSchedule(0.0), key_size=256, max_key_count=10, start=0.0, initial=3)
    assert pool.take(4, 1.0) is None
    assert pool.available(1.0) == 3


def test_incoming_store_drops_oldest_past_capacity_and_refuses_replays() -> None:
    store = IncomingStore(capacity=2)
    keys = [DeliveredKey(f"id{i}", i, 256, "SAE_A", "SAE_B") for i in range(3)]
    dropped, rejection = store.add(keys)
    assert rejection is None and [k.key_id for k in dropped] == ["id0"]
    assert store.add([keys[1]])[1] is not None  # already waiting
    assert store.add([keys[0]])[1] is not None  # dropped counts as consumed
    taken = store.take("SAE_B", "SAE_A", ["id1"])
    assert isinstance(taken, list) and [k.key_id for k in taken] == ["id1"]
    assert isinstance(store.take("SAE_B", "SAE_A", ["id1"]), Rejection)
    assert isinstance(store.take("SAE_C", "SAE_A", ["id2"]), Rejection)  # not the named slave
    assert store.add([keys[1]])[1] is not None  # consumed: never again


def test_config_check_rejects_inconsistent_settings() -> None:
    base = KmeConfig(kme_id="KME_A", peer_kme_id="KME_B", saes=("SAE_A",), link_secret=SECRET)
    for bad in (
        replace(base, saes=()),
        replace(base, saes=("KME_B",)),
        replace(base, link_secret=Secret(b"short")),
        replace(base, key_size=100),
        replace(base, min_key_size=512),
        replace(base, max_key_size=1 << 20),
        replace(base, burst_period=1.0, burst_duration=2.0),
        replace(base, burst_bits=1000),  # passes need a period
        replace(base, burst_period=1.0, burst_bits=-1),
        replace(base, admins=("bad id",)),
    ):
        with pytest.raises(ConfigError):
            Kme(bad)


# --- ETSI 014 endpoints ----------------------------------------------------------------------------


def test_master_and_slave_get_the_same_key_bytes(pair: Pair) -> None:
    status, got = enc(pair.a, "SAE_A", "SAE_B", {"number": 2, "size": 256})
    assert status == 200
    master = etsi014.parse_enc_keys(json.dumps(got).encode(), number=2, size_bits=256)
    status, got_b = dec(pair.b, "SAE_B", "SAE_A", [k.key_id for k in master])
    assert status == 200
    slave = etsi014.parse_dec_keys(json.dumps(got_b).encode(), key_ids=[k.key_id for k in master])
    assert slave == master


def test_dec_keys_hands_out_each_key_once(pair: Pair) -> None:
    _, got = enc(pair.a, "SAE_A", "SAE_B", {})
    ids = key_ids(got)
    assert dec(pair.b, "SAE_B", "SAE_A", ids)[0] == 200
    status, error = dec(pair.b, "SAE_B", "SAE_A", ids)
    assert status == 400 and error["message"] == "unknown key_ID"


def test_dec_keys_is_all_or_nothing(pair: Pair) -> None:
    _, got = enc(pair.a, "SAE_A", "SAE_B", {"number": 2})
    ids = key_ids(got)
    assert dec(pair.b, "SAE_B", "SAE_A", [*ids, "00000000-0000-4000-8000-000000000000"])[0] == 400
    assert dec(pair.b, "SAE_B", "SAE_A", ids)[0] == 200


def test_dec_keys_by_another_slave_sae_is_unauthorized(pair: Pair) -> None:
    _, got = enc(pair.a, "SAE_A", "SAE_B", {})
    assert dec(pair.b, "SAE_C", "SAE_A", key_ids(got))[0] == 401
    assert dec(pair.b, "SAE_B", "SAE_X", key_ids(got))[0] == 400  # wrong master SAE in the path
    assert dec(pair.b, "SAE_B", "SAE_A", key_ids(got))[0] == 200


def test_get_forms_of_enc_keys_and_dec_keys(pair: Pair) -> None:
    status, got = call(pair.a, "GET", f"{API}/SAE_B/enc_keys", "SAE_A", number="2", size="512")
    assert status == 200 and isinstance(got, dict)
    keys = etsi014.parse_enc_keys(json.dumps(got).encode(), number=2, size_bits=512)
    status, got_b = call(pair.b, "GET", f"{API}/SAE_A/dec_keys", "SAE_B", key_ID=keys[1].key_id)
    assert status == 200
    assert etsi014.parse_dec_keys(json.dumps(got_b).encode(), key_ids=[keys[1].key_id]) == [keys[1]]


def test_status_reports_the_store_from_the_callers_side(pair: Pair) -> None:
    status, got = call(pair.a, "GET", f"{API}/SAE_B/status", "SAE_A")
    assert status == 200
    parsed = etsi014.parse_status(json.dumps(got).encode(), slave_sae_id="SAE_B")
    assert (parsed.source_KME_ID, parsed.target_KME_ID) == ("KME_A", "KME_B")
    assert (parsed.master_SAE_ID, parsed.stored_key_count, parsed.max_key_count) == ("SAE_A", 10, 20)
    assert (parsed.key_size, parsed.max_key_per_request, parsed.max_SAE_ID_count) == (256, 8, 0)
    enc(pair.a, "SAE_A", "SAE_B", {"number": 2, "size": 512})  # 512 bits = 2 blocks of key_size
    assert pair.a.stored_key_count() == 6
    pair.clock.now += 0.5
    assert pair.a.stored_key_count() == 11


def test_enc_keys_beyond_stock_is_503_and_consumes_nothing(pair: Pair) -> None:
    status, error = enc(pair.a, "SAE_A", "SAE_B", {"number": 6, "size": 512})
    assert status == 503 and "not enough key" in str(error["message"])
    assert pair.a.stored_key_count() == 10


@pytest.mark.parametrize(
    "body",
    [
        {"number": 0},
        {"number": -1},
        {"number": 9},  # > max_key_per_request
        {"number": True},
        {"size": 100},  # not a multiple of 8
        {"size": 56},  # < min_key_size
        {"size": 8200},  # > max_key_size
        {"size": "256"},
        {"additional_slave_SAE_IDs": ["SAE_C"]},
        {"extension_mandatory": [{"x": 1}]},
        {"extension_optional": "x"},
        {"colour": "blue"},
        [1],
    ],
)
def test_enc_keys_rejects_bad_parameters_with_400(pair: Pair, body: object) -> None:
    status, error = enc_any(pair.a, body)
    assert status == 400 and isinstance(error["message"], str) and isinstance(error["details"], list)
    assert pair.a.stored_key_count() == 10


def enc_any(kme: Kme, body: object) -> tuple[int, dict[str, object]]:
    status, answer = kme.handle("POST", f"{API}/SAE_B/enc_keys", {}, json.dumps(body).encode(), "SAE_A")
    return status, json.loads(answer)


def test_enc_keys_accepts_optional_extensions(pair: Pair) -> None:
    assert enc(pair.a, "SAE_A", "SAE_B", {"extension_optional": [{"x": 1}]})[0] == 200


def test_bad_json_and_bad_query_are_400(pair: Pair) -> None:
    assert pair.a.handle("POST", f"{API}/SAE_B/enc_keys", {}, b"{nope", "SAE_A")[0] == 400
    assert pair.a.handle("GET", f"{API}/SAE_B/enc_keys", {"number": ["x"]}, b"", "SAE_A")[0] == 400
    assert pair.a.handle("GET", f"{API}/SAE_B/enc_keys", {"colour": ["1"]}, b"", "SAE_A")[0] == 400
    assert pair.b.handle("GET", f"{API}/SAE_A/dec_keys", {}, b"", "SAE_B")[0] == 400
    assert dec(pair.b, "SAE_B", "SAE_A", ["a", "a"])[0] == 400
    assert dec(pair.b, "SAE_B", "SAE_A", [])[0] == 400


def test_unknown_slave_sae_is_400(pair: Pair) -> None:
    assert enc(pair.a, "SAE_A", "SAE_X", {})[0] == 400
    assert call(pair.a, "GET", f"{API}/SAE_X/status", "SAE_A")[0] == 400
    assert enc(pair.a, "SAE_A", "SAE_A", {})[0] == 400  # attached here, not to the peer


def test_caller_not_attached_to_this_kme_is_401(pair: Pair) -> None:
    assert enc(pair.a, "SAE_B", "SAE_B", {})[0] == 401
    assert enc(pair.a, None, "SAE_B", {})[0] == 401  # type: ignore[arg-type]
    assert enc(pair.a, "KME_B", "SAE_B", {})[0] == 401  # the peer KME is no SAE
    assert call(pair.a, "GET", f"{API}/SAE_B/status", "SAE_C")[0] == 401


def test_private_kme_endpoints_accept_only_the_peer_kme(pair: Pair) -> None:
    assert call(pair.a, "GET", INFO_PATH, "SAE_A")[0] == 401
    assert call(pair.b, "POST", DELIVERED_PATH, "SAE_B", {"keys": []})[0] == 401
    status, info = call(pair.a, "GET", INFO_PATH, "KME_B")
    assert status == 200 and info == {"KME_ID": "KME_A", "SAE_IDs": ["SAE_A"]}


def test_peer_report_with_forged_key_id_or_replay_is_refused(pair: Pair) -> None:
    _, got = enc(pair.a, "SAE_A", "SAE_B", {})
    report = {
        "master_SAE_ID": "SAE_A",
        "slave_SAE_ID": "SAE_B",
        "keys": [{"key_ID": key_ids(got)[0], "index": 0, "size": 256}],
    }
    assert call(pair.b, "POST", DELIVERED_PATH, "KME_A", report)[0] == 400  # replay
    forged = {**report, "keys": [{"key_ID": "00000000-0000-4000-8000-000000000000", "index": 7, "size": 256}]}
    assert call(pair.b, "POST", DELIVERED_PATH, "KME_A", forged)[0] == 400


def test_unknown_endpoint_and_method(pair: Pair) -> None:
    assert call(pair.a, "GET", "/api/v1/keys/SAE_B/other", "SAE_A")[0] == 404
    assert call(pair.a, "GET", "/", "SAE_A")[0] == 404
    assert call(pair.a, "POST", f"{API}/SAE_B/status", "SAE_A")[0] == 405


def test_peer_unreachable_is_503_and_the_taken_keys_are_lost(pair: Pair) -> None:
    assert enc(pair.a, "SAE_A", "SAE_B", {})[0] == 200  # A learns B's SAEs
    pair.peer_a.up = False
    assert enc(pair.a, "SAE_A", "SAE_B", {"number": 2})[0] == 503
    assert pair.a.stored_key_count() == 7


def test_peer_saes_are_learned_from_the_peer_when_not_configured(pair: Pair) -> None:
    assert enc(pair.a, "SAE_A", "SAE_C", {})[0] == 200  # SAE_C learned via /kme/v1/info
    pinned = make_pair(peer_saes=("SAE_B",))
    assert enc(pinned.a, "SAE_A", "SAE_C", {})[0] == 400


def test_both_kmes_as_master_never_share_a_key(pair: Pair) -> None:
    _, from_a = enc(pair.a, "SAE_A", "SAE_B", {"number": 5})
    _, from_b = enc(pair.b, "SAE_B", "SAE_A", {"number": 5})
    ids_a, ids_b = key_ids(from_a), key_ids(from_b)
    assert not set(ids_a) & set(ids_b)
    keys_a = {k.key.reveal() for k in etsi014.parse_key_container(json.dumps(from_a).encode())}
    keys_b = {k.key.reveal() for k in etsi014.parse_key_container(json.dumps(from_b).encode())}
    assert not keys_a & keys_b
    assert dec(pair.b, "SAE_B", "SAE_A", ids_a)[0] == 200
    assert dec(pair.a, "SAE_A", "SAE_B", ids_b)[0] == 200


def test_concurrent_enc_keys_deliver_each_block_once() -> None:
    pair = make_pair(rate=0.0, max_key_count=1000, initial_key_count=400, max_key_per_request=10)
    results: list[list[str]] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            status, got = enc(pair.a, "SAE_A", "SAE_B", {"number": 3})
            assert status == 200
            with lock:
                results.append(key_ids(got))

    run_threads(worker, 8)
    ids = [k for batch in results for k in batch]
    assert len(ids) == 240 == len(set(ids))
    assert pair.a.stored_key_count() == 160 and pair.b.waiting_key_count() == 240
    assert dec(pair.b, "SAE_B", "SAE_A", ids[:10])[0] == 200


def run_threads(target: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --- restarts: the key stream follows the wall clock ------------------------------------------------


def key_bytes(container: dict[str, object]) -> dict[str, bytes]:
    parsed = etsi014.parse_key_container(json.dumps(container).encode())
    return {k.key_id: k.key.reveal() for k in parsed}


def restart(pair: Pair, side: str) -> None:
    """Replace KME ``side`` ("a" or "b") by a fresh Kme with the same config, as after a restart."""
    if side == "a":
        pair.a = Kme(pair.a.config, clock=pair.clock, peer=pair.peer_a)
        pair.peer_b.target = pair.a
    else:
        pair.b = Kme(pair.b.config, clock=pair.clock, peer=pair.peer_b)
        pair.peer_a.target = pair.b


def test_restarted_kme_never_serves_a_key_id_or_key_served_before() -> None:
    pair = make_pair(initial_key_count=0)
    seen_ids: set[str] = set()
    seen_keys: set[bytes] = set()
    for round_number in range(4):
        pair.clock.now += 2.0  # the store refills to max_key_count
        for master, caller, slave in ((pair.a, "SAE_A", "SAE_B"), (pair.b, "SAE_B", "SAE_A")):
            status, got = enc(master, caller, slave, {"number": 8})
            assert status == 200
            got_keys = key_bytes(got)
            assert not seen_ids & set(got_keys) and not seen_keys & set(got_keys.values())
            seen_ids |= set(got_keys)
            seen_keys |= set(got_keys.values())
        restart(pair, "a")
        if round_number % 2:
            restart(pair, "b")
        pair.clock.now += 0.01  # restarted moments later: nothing served before comes back
        for master, caller, slave in ((pair.a, "SAE_A", "SAE_B"), (pair.b, "SAE_B", "SAE_A")):
            status, got = enc(master, caller, slave, {})
            assert status == 503 or not seen_ids & set(key_ids(got))


def test_one_sided_restart_recovers_by_itself() -> None:
    pair = make_pair(initial_key_count=0)
    pair.clock.now += 1.0
    _, first = enc(pair.a, "SAE_A", "SAE_B", {"number": 3})
    assert dec(pair.b, "SAE_B", "SAE_A", key_ids(first))[0] == 200
    for side in ("a", "b"):
        restart(pair, side)
        pair.clock.now += 1.0
        status, got = enc(pair.a, "SAE_A", "SAE_B", {"number": 3})
        assert status == 200, got
        status, fetched = dec(pair.b, "SAE_B", "SAE_A", key_ids(got))
        assert status == 200 and key_bytes(fetched) == key_bytes(got)


def test_clock_going_backwards_refuses_to_serve_keys(caplog: pytest.LogCaptureFixture) -> None:
    pair = make_pair()
    assert enc(pair.a, "SAE_A", "SAE_B", {})[0] == 200
    pair.clock.now -= 5.0
    status, answer = enc(pair.a, "SAE_A", "SAE_B", {})
    assert status == 503 and "clock went backwards" in str(answer["message"])
    assert "clock went backwards" in caplog.text
    pair.clock.now += 6.0
    assert enc(pair.a, "SAE_A", "SAE_B", {})[0] == 200


def test_slave_refuses_a_reported_key_index_far_from_now(pair: Pair) -> None:
    index = 10  # released around 1970, far outside the window around the clock's "now"
    report = {
        "master_SAE_ID": "SAE_A",
        "slave_SAE_ID": "SAE_B",
        "keys": [{"key_ID": LinkKeys(SECRET).key_id("KME_A>KME_B", index), "index": index, "size": 256}],
    }
    status, answer = call(pair.b, "POST", DELIVERED_PATH, "KME_A", report)
    assert status == 400 and "too far" in str(answer)


def test_kme_in_passes_serves_keys_only_after_a_pass() -> None:
    clock = Clock()
    clock.now = 1005.0
    config = KmeConfig(
        kme_id="KME_A",
        peer_kme_id="KME_B",
        saes=("SAE_A",),
        link_secret=SECRET,
        peer_saes=("SAE_B",),
        burst_period=10.0,
        burst_bits=256 * 8,
    )
    kme = Kme(config, clock=clock)
    assert kme.stored_key_count() == 0
    clock.now = 1010.0
    assert kme.stored_key_count() == 8


def test_forget_drops_the_waiting_keys_a_dec_keys_request_names(pair: Pair) -> None:
    status, answer = enc(pair.a, "SAE_A", "SAE_B", {"number": 2})
    assert status == 200
    lost, kept = key_ids(answer)
    body = json.dumps({"key_IDs": [{"key_ID": lost}, {"key_ID": "no-such-id"}]}).encode()
    assert pair.b.forget("POST", {}, body) == [lost]
    assert pair.b.forget("POST", {}, b"{not json") == []
    assert dec(pair.b, "SAE_B", "SAE_A", [lost])[0] == 400
    assert dec(pair.b, "SAE_B", "SAE_A", [kept])[0] == 200


def test_burst_mode_indexes_the_stream_by_burst_number() -> None:
    schedule = ReleaseSchedule(2560.0, burst_period=10.0, burst_duration=2.0)
    pool = OutgoingPool(schedule, key_size=256, max_key_count=1000, start=1005.0)
    assert pool.available(1005.0) == 0  # between passes
    assert pool.take(5, 1010.5) == 101 * 20  # burst 101 follows bursts 0..100 of 20 blocks each
    later = OutgoingPool(schedule, key_size=256, max_key_count=1000, start=1011.0)  # restarted
    assert (
        later.available(1011.0) == 0 and later.take(5, 1011.5) == 2030
    )  # resumes at the clock's index, past everything served
    assert later.available(1015.0) == 5  # burst 101 ended at 1012 with block 2039
