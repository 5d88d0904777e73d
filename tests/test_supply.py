"""The KME adapter of one peer (qgate.supply): stalled requests never hold a rekey back.

The KME is a small scripted client (each call sleeps as told, in the executor thread, then
answers or raises) and the engine a recorder of what the adapter hands it: what is under test
is the adapter's timing rules, not the KME or the protocol.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from ipaddress import ip_network
from pathlib import Path

from qgate.crypto.secret import Secret
from qgate.errors import KmsKeyRejectedError, KmsUnavailableError
from qgate.kms.etsi014 import QkdKey, Status
from qgate.policy import Endpoint, PeerPolicy
from qgate.protocol.actions import FetchDecKeys, FetchEncKeys
from qgate.supply import PeerSupply


class ScriptedKme:
    """Answers key requests after the delays in ``delays`` (seconds, one per call, in order) and
    raises the errors in ``fail`` (same order); status answers at once."""

    def __init__(self, *delays: float, fail: Sequence[Exception | None] = ()) -> None:
        self.delays = list(delays)
        self.fail = list(fail)
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def _next(self, what: str) -> None:
        if what == "status":
            return
        with self._lock:
            self.calls.append(what)
            delay = self.delays.pop(0) if self.delays else 0.0
            error = self.fail.pop(0) if self.fail else None
        time.sleep(delay)
        if error is not None:
            raise error

    def status(self, slave_sae_id: str) -> Status:
        self._next("status")
        return Status("KME_A", "KME_B", "SAE_A", slave_sae_id, 256, 100, 1000, 128, 8192, 64, 0)

    def enc_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QkdKey]:
        self._next("enc_keys")
        return [QkdKey(str(uuid.uuid4()), Secret(bytes(size_bits // 8))) for _ in range(number)]

    def dec_keys(
        self, master_sae_id: str, key_ids: Sequence[str], *, size_bits: int | None = None
    ) -> list[QkdKey]:
        self._next("dec_keys")
        return [QkdKey(k, Secret(bytes(32))) for k in key_ids]


class Recorder:
    """Stands in for the peer's engine: records what the adapter hands over."""

    def __init__(self) -> None:
        self.fetched: list[tuple[int, tuple[str, ...], float]] = []
        self.failed: list[tuple[int, str, bool]] = []

    def keys_fetched(self, request_id: int, keys: Sequence[tuple[str, Secret]], now: float) -> None:
        self.fetched.append((request_id, tuple(k for k, _ in keys), now))

    def keys_failed(self, request_id: int, reason: str, now: float, *, rejected: bool = False) -> None:
        self.failed.append((request_id, reason, rejected))

    def kme_observed(self, ok: bool, now: float, *, empty: bool = False) -> None:
        pass

    def set_interval(self, seconds: float) -> None:
        pass


def _policy(role: str, prefetch: int = 4) -> PeerPolicy:
    return PeerPolicy(
        name="site-b", public_key=Path("peer.pub"), endpoint=Endpoint("192.0.2.2", 51820), sae_id="SAE_B",
        qkd_role=role, subnets=(ip_network("10.2.0.0/24"),), qkd_prefetch=prefetch,  # type: ignore[arg-type]
    )  # fmt: skip


def _supply(kme: ScriptedKme, role: str, prefetch: int = 4) -> tuple[PeerSupply, Recorder]:
    engine = Recorder()
    supply = PeerSupply(_policy(role, prefetch), engine, kme, "https://kme", lambda: None)  # type: ignore[arg-type]
    supply.loop = asyncio.get_running_loop()
    return supply, engine


def test_a_stalled_dec_keys_is_asked_again_and_the_first_answer_wins() -> None:
    async def run() -> tuple[Recorder, PeerSupply, ScriptedKme]:
        kme = ScriptedKme(1.0, 0.01)  # the first answer stalls 1 s, its twin answers at once
        supply, engine = _supply(kme, "slave")
        started = time.monotonic()
        supply.fetch(FetchDecKeys(7, ("id-1",)), started)
        while not engine.fetched:
            await asyncio.sleep(0.02)
        assert engine.fetched[0][2] - started < 0.9
        await asyncio.sleep(0.6)  # the stalled one answers too: ignored
        return engine, supply, kme

    engine, supply, kme = asyncio.run(run())
    assert [f[:2] for f in engine.fetched] == [(7, ("id-1",))] and engine.failed == []
    assert kme.calls == ["dec_keys", "dec_keys"] and supply.hedged == 1
    assert any("stalled 1 times" in note for note in supply.view.behaviours(256))


def test_a_dec_keys_that_fails_quickly_is_reported_once_and_not_asked_again() -> None:
    async def run() -> tuple[Recorder, ScriptedKme]:
        kme = ScriptedKme(0.01, fail=[KmsUnavailableError("KME down")])
        supply, engine = _supply(kme, "slave")
        supply.fetch(FetchDecKeys(3, ("id-1",)), time.monotonic())
        await asyncio.sleep(0.8)
        return engine, kme

    engine, kme = asyncio.run(run())
    assert engine.failed == [(3, "KME down", False)] and engine.fetched == [] and kme.calls == ["dec_keys"]


def test_when_both_twins_fail_the_original_error_is_reported_not_the_twins_refusal() -> None:
    async def run() -> Recorder:
        # The stalled original consumed the key and then timed out; its twin is told "already retrieved".
        refused = KmsKeyRejectedError("HTTP 401: key_ID already retrieved", key_ids=("id-1",), status=401)
        kme = ScriptedKme(0.9, 0.01, fail=[KmsUnavailableError("timed out"), refused])
        supply, engine = _supply(kme, "slave")
        supply.fetch(FetchDecKeys(5, ("id-1",)), time.monotonic())
        await asyncio.sleep(1.2)
        return engine

    engine = asyncio.run(run())
    assert engine.failed == [(5, "timed out", False)]  # not "rejected": the master's stock is not to blame


def test_a_rekey_behind_a_stalled_refill_asks_the_kme_itself() -> None:
    async def run() -> tuple[Recorder, PeerSupply, float, ScriptedKme]:
        kme = ScriptedKme(1.2, 0.01)  # the refill stalls 1.2 s, the rekey's own ask is quick
        supply, engine = _supply(kme, "master")
        supply.tick(time.monotonic())  # the status poll: the first refill waits for its limits
        await asyncio.sleep(0.1)
        supply.tick(time.monotonic())  # the first refill
        await asyncio.sleep(0.05)
        started = time.monotonic()
        supply.fetch(FetchEncKeys(9, 1, 256), started)
        while not engine.fetched:
            await asyncio.sleep(0.02)
        waited = engine.fetched[0][2] - started
        await asyncio.sleep(1.3)
        return engine, supply, waited, kme

    engine, supply, waited, kme = asyncio.run(run())
    assert waited < 0.9 and len(engine.fetched) == 1 and engine.failed == []
    assert kme.calls == ["enc_keys", "enc_keys"]
    assert len(supply.stock) == 4  # the stalled refill still lands in the stock afterwards
    assert supply.stock.stats.served_from_stock == 0


def test_the_first_refill_waits_for_the_kmes_stated_limits() -> None:
    class Limited(ScriptedKme):
        def status(self, slave_sae_id: str) -> Status:
            return Status("KME_A", "KME_B", "SAE_A", slave_sae_id, 256, 100, 1000, 4, 8192, 64, 0)

    async def run() -> PeerSupply:
        supply, _ = _supply(Limited(), "master", prefetch=16)
        supply.tick(time.monotonic())
        await asyncio.sleep(0.1)
        supply.tick(time.monotonic())
        await asyncio.sleep(0.1)
        return supply

    supply = asyncio.run(run())
    assert len(supply.stock) == 4 and supply.stock.stats.refill_failures == 0
