"""Gateways against misbehaving KMEs: each ``kms-sim`` fault kind, injected at run time into one shared lab.

One lab serves the whole module: both KMEs accept faults from the run's ``ADMIN`` certificate
(``--admin ADMIN``, driven through :class:`qgate.lab_faults.KmeFaults`), both gateways run
policies with a QKD ratchet every 1 s, an ML-KEM handshake every 4 s, keys at most 3 s old,
no QKD prefetch (every rekey calls the KME, so a fault hits the rekey path at once), fail
closed (``qkd_and_pqc``) and a 1 s KME timeout. Faults on the master's KME A hit ``enc_keys``,
faults on the slave's KME B hit ``dec_keys`` (``down`` hits the whole KME).

For each fault the tests read the gateways' logs and stats and check: the failure was seen
(``qkd_request_failed`` with the expected reason), failures are bounded (one per faulty answer;
within the 0.5-8 s backoff schedule for faults lasting seconds), key_IDs a fault consumed are
never asked for again nor used (the next completed ratchet/handshake uses fresh key_IDs), and
QKD keying (a completed ratchet or handshake at both gateways), ping and hybrid mode are back
within two rekey intervals (+ margin) of the KME answering normally again. Before each test
the faults are cleared and the tunnel must be healthy again, so a failed test does not spill.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qgate import lab_net as net
from qgate import lab_setup as setup
from qgate.lab import Lab, fresh_stats, listens, read_stats
from qgate.lab_faults import KmeFaults, LogEvent, keys_lost_to_faults, kme_records, read_events
from qgate.lab_procs import LabError, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

INTERVAL = 1.0
"""Seconds between QKD ratchet steps (policy rekey.interval)."""
REKEY = {"interval": INTERVAL, "kem_interval": 4.0, "max_key_age": 3.0}
KME_TIMEOUT = 1.0
"""Seconds per KME request (policy kme.timeout); a ``delay`` fault sleeps longer."""
MARGIN = 0.75
"""Seconds on top of two rekey intervals: timers tick, a ratchet round trip, log stamps."""
RECOVERY = 2 * INTERVAL + MARGIN
"""Seconds after the KME answers normally again within which keying must be back."""
HIT_TIMEOUT = 6.0
"""Seconds for the next rekey to run into a freshly injected fault (an interval, a retry, a handshake)."""
RESET_TIMEOUT = 25.0
"""Seconds the lab may take to be healthy again between tests (a broken exchange times out at 10 s)."""
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Seconds: the gateway's KME retry schedule (doubling from 0.5 s, capped at 8 s)."""
PEER = {"a": "site-b", "b": "site-a"}
"""Each gateway's peer name (the key of its stats row)."""
KEYED = ("ratchet_complete", "handshake_complete")


@dataclass
class Drill:
    """The shared lab and its fault controls."""

    lab: Lab
    faults: KmeFaults

    def log(self, kind: str, site: str) -> Path:
        return self.lab.run_dir / "logs" / f"{kind}-{site}.log"

    def events(self, site: str, since: float, *kinds: str) -> list[LogEvent]:
        return read_events(self.log("gateway", site), since=since, kinds=kinds)

    def failures(self, site: str, since: float, until: float = float("inf")) -> list[LogEvent]:
        return [e for e in self.events(site, since, "qkd_request_failed") if e.wall <= until]

    def keyed(self, site: str, since: float) -> list[LogEvent]:
        return self.events(site, since, *KEYED)

    def row(self, site: str, *, fresh: bool = True) -> dict[str, object]:
        """``site``'s gateway stats row of its peer; ``fresh``: wait for the next rewrite (<= 1 s)."""
        path = self.lab.run_dir / f"stats-{site}.json"
        peers = (fresh_stats(path) if fresh else read_stats(path)).get("peers")
        row = peers.get(PEER[site]) if isinstance(peers, dict) else None
        return row if isinstance(row, dict) else {}

    def mode(self, site: str, *, fresh: bool = True) -> object:
        return self.row(site, fresh=fresh).get("mode")

    def qkd_failures(self, site: str, *, fresh: bool = True) -> int:
        """``site``'s count of failed KME requests (the log shows at most 5 warnings a second).

        ``fresh``: wait for the next rewrite of the stats file (at most 1 s), else read it as is.
        """
        value = self.row(site, fresh=fresh).get("qkd_failures", 0)
        return value if isinstance(value, int) else 0

    def ping(self, count: int = 1) -> bool:
        argv = ["ping", "-c", str(count), "-i", "0.2", "-W", "1", net.HOST_B]
        return self.lab.run("ha", argv, timeout=5 + count).returncode == 0

    def check_alive(self) -> None:
        for child in self.lab.kids.items:
            if child.name.startswith(("gateway-", "kme-")):
                self.lab.kids.check_alive(child)


@dataclass
class Episode:
    """What the gateways did around one fault (wall-clock seconds).

    Attributes:
        since: when the fault was injected.
        recovered: when the KME answered normally again.
        failures: ``qkd_request_failed`` at the gateway facing the fault, from ``since`` to
            ``recovered`` + RECOVERY (or until keying was back, if later).
        failed: that gateway's ``qkd_failures`` counter growth over the same time (exact:
            the log limits warnings to 5 a second).
        keyed: the first completed ratchet/handshake after ``recovered`` at each gateway.
        lost: key_IDs the KMEs consumed or lost under the fault (from their logs).
        ping: a ping went through after keying was back.
        modes: both gateways' stats ``mode`` after keying was back.
    """

    since: float
    recovered: float
    failures: list[LogEvent]
    failed: int = 0
    keyed: dict[str, LogEvent] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)
    ping: bool = False
    modes: dict[str, object] = field(default_factory=dict)

    @property
    def back_after(self) -> float | None:
        """Seconds from ``recovered`` until both gateways completed a rekey, or None."""
        if len(self.keyed) < 2:
            return None
        return round(max(e.wall for e in self.keyed.values()) - self.recovered, 2)

    def report(self) -> str:
        lines = [f"fault at {self.since:.2f}, KME normal again +{self.recovered - self.since:.2f} s"]
        lines += [f"  fail +{e.wall - self.since:.2f} {e.detail.get('reason')} {e.detail.get('retry_in')}"
                  for e in self.failures]  # fmt: skip
        lines += [f"  keyed {s} +{e.wall - self.since:.2f} {e.kind} key_ids={e.detail.get('key_ids')}"
                  for s, e in sorted(self.keyed.items())]  # fmt: skip
        lines.append(
            f"  back_after={self.back_after} ping={self.ping} modes={self.modes} lost={sorted(self.lost)}"
        )
        return "\n".join(lines)


@pytest.fixture(scope="module")
def drill(request: pytest.FixtureRequest) -> Iterator[Drill]:
    overrides = setup.SiteOverrides(
        peer={"qkd_prefetch": 0, "fail_mode": "qkd_and_pqc"}, kme={"timeout": KME_TIMEOUT}
    )
    with Lab() as lab:
        setup.make_pki_and_identities(lab.run_dir, admin=True)
        setup.write_policies(lab.run_dir, rekey=REKEY, overrides={"a": overrides, "b": overrides})
        lab.start_kmes(admins=[setup.ADMIN_CN])
        lab.wait_path(lab.start_gateways())
        failed_before = request.session.testsfailed
        yield Drill(lab, KmeFaults(lab.topo, lab.run_dir))
        if request.session.testsfailed > failed_before:
            lab.mark_failed()  # keep the run dir (logs) and print the children's log tails


@pytest.fixture(autouse=True)
def healthy(drill: Drill) -> Iterator[None]:
    _restore(drill)
    yield
    for site in ("a", "b"):
        with contextlib.suppress(Exception):
            drill.faults.clear(site)


def _restore(drill: Drill) -> None:
    """Clear every fault and wait until both gateways rekey, ping works and both are hybrid."""
    for site, role in (("a", "ga"), ("b", "gb")):
        ns = drill.lab.topo.ns(role)
        wait_until(
            f"KME {site} to listen", functools.partial(listens, ns, setup.KME_PORT), timeout=RESET_TIMEOUT
        )
        drill.faults.clear(site)
    cleared = time.time()

    def healthy() -> bool:
        drill.check_alive()
        return (
            all(drill.keyed(s, cleared) for s in ("a", "b"))
            and drill.ping()
            and all(drill.mode(s) == "hybrid" for s in ("a", "b"))
        )

    try:
        wait_until("the tunnel to be healthy", healthy, timeout=RESET_TIMEOUT, interval=0.2)
    except LabError:
        pytest.fail(f"lab not healthy {RESET_TIMEOUT:.0f} s after clearing faults (earlier test broke it)")


def _wait_failures(drill: Drill, site: str, since: float, count: int) -> list[LogEvent]:
    """Wait until ``site``'s gateway logged ``count`` failed KME requests since ``since``."""
    timeout = HIT_TIMEOUT + sum(BACKOFF[: count - 1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failures = drill.failures(site, since)
        if len(failures) >= count:
            return failures
        time.sleep(0.05)
    recent = [e.line for e in drill.events(site, since - 2.0)][-12:]
    pytest.fail(f"gateway {site} logged {len(drill.failures(site, since))} of {count} expected "
                f"qkd_request_failed within {timeout:.1f} s of the fault; its last events:\n"
                + "\n".join(recent))  # fmt: skip


def _observe(
    drill: Drill, site: str, since: float, recovered: float, kme: str, failed_before: int
) -> Episode:
    """Watch keying come back after ``recovered``; gather failures and lost key_IDs for the verdict."""
    episode = Episode(since, recovered, [])
    deadline = time.monotonic() + max(0.0, recovered + RECOVERY - time.time()) + 1.0
    while time.monotonic() < deadline and len(episode.keyed) < 2:
        for gw in ("a", "b"):
            after = drill.keyed(gw, recovered)
            if after:
                episode.keyed[gw] = after[0]
        time.sleep(0.05)
    # failures count until keying is back at both (a consumed count-limited fault cannot fail a
    # request after that), or over the whole recovery window when it is not
    until = (
        max(e.wall for e in episode.keyed.values()) + 0.1 if len(episode.keyed) == 2 else recovered + RECOVERY
    )
    time.sleep(max(0.0, until - time.time()))
    episode.failures = drill.failures(site, since, until)
    episode.failed = drill.qkd_failures(site) - failed_before
    episode.lost = keys_lost_to_faults(drill.log("kme", kme), since=since)
    episode.ping = drill.ping(2)
    episode.modes = {s: drill.mode(s, fresh=False) for s in ("a", "b")} if len(episode.keyed) == 2 else {}
    return episode


def _count_limited(
    drill: Drill, kme: str, gateway: str, kind: str, count: int = 1, **spec: object
) -> Episode:
    """Inject a fault hitting the next ``count`` requests at ``kme``; observe ``gateway``."""
    before = drill.qkd_failures(gateway, fresh=False)  # healthy: no failure in the last second
    since = time.time()
    drill.faults.inject(kme, kind, count=count, **spec)
    failures = _wait_failures(drill, gateway, since, count)
    return _observe(drill, gateway, since, failures[count - 1].wall, kme, before)


def _assert_seen(episode: Episode, reason: str) -> None:
    assert episode.failures, f"no qkd_request_failed logged\n{episode.report()}"
    got = episode.failures[0].detail.get("reason", "")
    assert re.search(reason, got), f"reason {got!r} does not match {reason!r}\n{episode.report()}"


def _assert_recovered(episode: Episode) -> None:
    """Keying back at both gateways within RECOVERY, with key_IDs no fault consumed; ping; hybrid."""
    assert episode.back_after is not None and episode.back_after <= RECOVERY, (
        f"keying not back within {RECOVERY} s of the KME recovering\n{episode.report()}"
    )
    for gw, event in episode.keyed.items():
        assert event.key_ids, f"gateway {gw} rekeyed without QKD key_IDs\n{episode.report()}"
        assert not set(event.key_ids) & episode.lost, f"gateway {gw} used a lost key_ID\n{episode.report()}"
    assert episode.ping, f"no ping after keying came back\n{episode.report()}"
    assert episode.modes == {"a": "hybrid", "b": "hybrid"}, episode.report()


def _backoff_bound(window: float) -> int:
    """Failed requests allowed over ``window`` s of KME trouble: one per backoff step, x2.

    x2: the gateway runs a due ML-KEM handshake and a due ratchet as separate attempts (each
    one failed request), so a step may show two failures.
    """
    steps, total = 0, 0.0
    for i in range(64):
        total += BACKOFF[min(i, len(BACKOFF) - 1)]
        if total > window:
            break
        steps += 1
    return 2 * (1 + steps)


def _assert_bounded(episode: Episode, window: float) -> None:
    bound = _backoff_bound(window)
    assert episode.failed <= bound, (
        f"{episode.failed} failed KME requests over {window:.1f} s (at most {bound}: retry backoff)\n"
        f"{episode.report()}"
    )


# --- enc_keys answers the master cannot use (KME A) ----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("short", r"enc_keys: .*(0|fewer|number|asked)"),
        ("wrong_size", r"enc_keys: key \S+ has \d+ bits, asked for 256"),
        ("repeat_id", r"duplicate key_ID"),
        ("close", r"RemoteDisconnected|closed"),
    ],
)
def test_master_drops_a_bad_enc_keys_answer_and_rekeys_with_fresh_key_ids(
    drill: Drill, kind: str, reason: str
) -> None:
    episode = _count_limited(drill, "a", "a", kind, endpoint="enc_keys")
    _assert_seen(episode, reason)
    assert episode.failed == 1, f"the one bad answer was not failed exactly once\n{episode.report()}"
    assert episode.lost, f"KME A's log names no key_ID consumed by the {kind} fault\n{episode.report()}"
    _assert_recovered(episode)


# --- dec_keys answers the slave cannot use (KME B): the key_ID is gone ---------------------------


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("forget", r"dec_keys: HTTP 400: unknown key_ID"),
        ("close", r"RemoteDisconnected|closed"),
        ("short", r"dec_keys: key_IDs do not match the request"),
        ("wrong_size", r"dec_keys: key \S+ has \d+ bits"),
        ("repeat_id", r"duplicate key_ID|do not match"),
    ],
)
def test_slave_never_asks_again_for_a_key_id_its_kme_lost(drill: Drill, kind: str, reason: str) -> None:
    episode = _count_limited(drill, "b", "b", kind, endpoint="dec_keys")
    _assert_seen(episode, reason)
    assert episode.lost, f"KME B's log names no key_ID lost to the {kind} fault\n{episode.report()}"
    retried = [e for e in episode.failures[1:] if "unknown key_ID" in e.detail.get("reason", "")]
    assert not retried, (
        f"the slave asked KME B {len(retried)} more time(s) for a lost key_ID\n{episode.report()}"
    )
    assert episode.failed == 1, episode.report()
    _assert_recovered(episode)


# --- faults on both KMEs -------------------------------------------------------------------------

ENDPOINT = {"a": "enc_keys", "b": "dec_keys"}


def test_master_kme_slower_than_the_client_timeout_fails_the_request_and_keying_recovers(
    drill: Drill,
) -> None:
    """The KME answers after 2 s (timeout 1 s): it has consumed the key, so the key_ID is dead."""
    site = "a"
    episode = _count_limited(
        drill, site, site, kind="delay", seconds=2 * KME_TIMEOUT, endpoint=ENDPOINT[site]
    )
    time.sleep(max(0.0, episode.recovered + KME_TIMEOUT + 0.2 - time.time()))  # the KME serves it late
    episode.lost = keys_lost_to_faults(drill.log("kme", site), since=episode.since)
    _assert_seen(episode, r"timed out|no complete answer within")
    assert episode.failed == 1, f"the slow answer was not failed exactly once\n{episode.report()}"
    assert episode.lost, episode.report()
    _assert_recovered(episode)


def test_slave_kme_slower_than_the_client_timeout_is_asked_again_and_no_rekey_fails(drill: Drill) -> None:
    """dec_keys answered after 2 s is a stall: the same key_IDs are asked again at once, and win."""
    since = time.time()
    drill.faults.inject("b", "delay", seconds=2 * KME_TIMEOUT, endpoint="dec_keys", count=1)
    time.sleep(2 * KME_TIMEOUT + 2.0)  # the delayed request, its twin, and a few more rekeys
    assert drill.failures("b", since) == [], drill.events("b", since - 1.0)[-12:]
    done = drill.events("b", since, "ratchet_complete", "handshake_complete")
    assert len(done) >= 2, [e.line for e in drill.events("b", since - 1.0)][-12:]


@pytest.mark.parametrize("site", ["a", "b"])
def test_kme_answering_503_for_seconds_is_retried_with_backoff_and_keying_recovers(
    drill: Drill, site: str
) -> None:
    window = 4.0  # longer than max_key_age: the key runs out while the KME refuses
    before = drill.qkd_failures(site)
    since = time.time()
    drill.faults.inject(site, "error", code=503, body="json", endpoint=ENDPOINT[site])
    _wait_failures(drill, site, since, 1)
    time.sleep(max(0.0, since + window - time.time()))
    drill.faults.clear(site)
    episode = _observe(drill, site, since, time.time(), site, before)
    _assert_seen(episode, rf"{ENDPOINT[site]}: HTTP 503")
    _assert_bounded(episode, window)
    _assert_recovered(episode)


ERROR_CASES = {
    # every code and every body at each KME
    "a": [(400, "json"), (404, "html"), (422, "empty"), (500, "json")],
    "b": [(400, "html"), (404, "empty"), (422, "json"), (500, "html")],
}


@pytest.mark.parametrize("site", ["a", "b"])
def test_kme_error_answers_with_json_html_or_empty_bodies_fail_once_and_keying_recovers(
    drill: Drill, site: str
) -> None:
    """An error answer consumes no key: the next try (a fresh enc_keys, or dec_keys on R1's resend) works."""
    problems = []
    for code, body in ERROR_CASES[site]:
        episode = _count_limited(
            drill, site, site, kind="error", code=code, body=body, endpoint=ENDPOINT[site]
        )
        label = f"HTTP {code} with {body} body"
        try:
            _assert_seen(episode, rf"{ENDPOINT[site]}: HTTP {code}\b")
            assert episode.failed == 1, f"{episode.failed} failures for one faulty answer"
            assert not episode.lost, "an error answer consumed key_IDs"
            _assert_recovered(episode)
        except AssertionError as exc:
            problems.append(f"{label}: {exc}\n{episode.report()}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("site", ["a", "b"])
def test_kme_down_and_back_is_retried_with_backoff_and_keying_recovers(drill: Drill, site: str) -> None:
    """KME A down: the master's enc_keys are refused; KME B down: KME A cannot hand keys over (503)."""
    seconds = 4.0  # longer than max_key_age: the key runs out while the KME is away
    before = drill.qkd_failures("a")
    since = time.time()
    drill.faults.inject(site, "down", seconds=seconds)

    def back() -> list[float]:
        return [w for w, m in kme_records(drill.log("kme", site), since=since) if "listening again" in m]

    wait_until(f"KME {site} to come back", lambda: bool(back()), timeout=seconds + 5)
    episode = _observe(drill, "a", since, back()[0], "a", before)
    reason = r"Connection(Refused|Reset)Error" if site == "a" else r"enc_keys: HTTP 503: peer KME unreachable"
    _assert_seen(episode, reason)
    _assert_bounded(episode, seconds)
    _assert_recovered(episode)
