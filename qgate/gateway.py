"""The running gateway: wires policy -> KME client -> peer engines -> TUN and UDP (the asyncio adapter).

``qgate up`` calls ``run_gateway``. Everything here is I/O glue: the protocol decisions live in
``qgate.protocol.peer`` (sans-I/O); this module reads the TUN and the UDP socket, carries out
the engines' actions (send a datagram, call the KME in a worker thread, log an event), runs
their timers, writes the statistics file, and undoes its network changes on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import json
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Final, cast

from qgate import control
from qgate.audit import AuditLog
from qgate.control import default_socket
from qgate.crypto.kem import get_kem
from qgate.dataplane.forwarder import CONTROL_DATAGRAMS_PER_WAKE, Forwarder, ForwarderStats, Link
from qgate.dataplane.routing import RouteTable
from qgate.dataplane.sockfilter import UdpSockets, open_udp_sockets
from qgate.dataplane.tunio import VnetTun
from qgate.dataplane.udpio import UdpBatchIO
from qgate.errors import ConfigError, QgateError
from qgate.failagg import FailureAggregator, Summary, is_aggregated
from qgate.keyfiles import load_identity, load_peer_public_key, load_ppk
from qgate.kms.client import Etsi014Client
from qgate.kms.tls import TlsSettings
from qgate.metrics import MetricsServer, start_metrics_server, status_from_loop
from qgate.netconfig import NetHandle, configure_tun
from qgate.policy import GatewayPolicy, PeerPolicy, load_policy
from qgate.privileges import check_file_safety, drop_privileges, foreign_owner
from qgate.protocol.guard import TokenBucket
from qgate.protocol.peer import (
    Action,
    FetchDecKeys,
    FetchEncKeys,
    Peer,
    PeerConfig,
    PeerEvent,
    ProbeKme,
    SendDatagram,
)
from qgate.reload import plan_reload
from qgate.supply import PeerSupply

log = logging.getLogger(__name__)

AUDITED_EVENTS: Final = frozenset(
    {
        "handshake_sent",
        "handshake_answered",
        "handshake_complete",
        "ratchet_complete",
        "handshake_abandoned",
        "ratchet_abandoned",
        "degraded_handshake",
        "mode_change",
        "authentication_failed",
        "kick_received",
    }
)
"""Protocol events that go to the audit log (with their key_IDs, never keys)."""
LAZY_MODULES: Final = (
    "concurrent.futures.thread",  # asyncio's default executor (KME calls)
    "encodings.idna",  # ssl and http.client encode host names with it
    "multiprocessing",  # pyroute2 (route removal at exit)
    "email.parser",
    "http.client",
)
"""Modules imported lazily at run time, imported before privileges are dropped."""
TICK: Final = 0.02
"""Seconds between timer checks (rekey intervals go down to 0.1 s)."""
LOG_BURST: Final = 5
"""Warning lines per event kind per second at most (a flood of bad datagrams is counted, not logged)."""
STATS_PERIOD: Final = 1.0
"""Seconds between rewrites of the statistics file."""
GUARD_COUNTERS: Final = {
    "mac1_failed": "drops_mac1",
    "mac2_failed": "drops_mac2",
    "stale_challenge": "stale_challenges",
    "over_budget": "drops_budget",
    "retries_sent": "retries_sent",
    "retries_received": "retries_received",
    "retries_unmatched": "retries_unmatched",
    "kicks_ignored": "kicks_ignored",
    "degrade_refused": "degrade_refused",
    "session_requests": "session_requests",
}
"""Status names of the handshake guard's counters (docs/protocol.md 2.3) -> ``ControlStats`` fields."""
CONTROL_READ_RATE: Final = 500.0
"""Datagrams per second read from the control socket at most while some peer has a session (burst
CONTROL_READ_BURST). An established session's messages come on the data socket (sockfilter.py), so
this only paces junk and cold starts; a flood there is dropped by the kernel while qgate sleeps,
which keeps the data path's wake-up latency (issue 10). Measured in the flood lab: about 90 us of
gateway CPU per control datagram (receive, mac1, mac2, a Retry), so 500/s is under 5 % of a core;
at 4000/s ping p99 under a maximum-rate flood was 7-11 ms, at 500/s 3.5-4.4 ms."""
CONTROL_READ_BURST: Final = 32.0
"""Control-socket datagrams read at once before CONTROL_READ_RATE applies."""
SOCKET_BUFFER: Final = 4 << 20
"""Bytes of kernel socket buffer asked for in each direction."""
KME_REQUESTS_PER_PEER: Final = 5
"""KME calls one peer can have open at once: status, refill, rekey, hedged twin, TLS diagnosis."""
_WARN_EVENTS: Final = frozenset(
    {
        "authentication_failed",
        "bad_handshake_message",
        "unauth_mac1",
        "unauth_protocol_v1",
        "unauth_over_budget",
        "degrade_refused",
        "qkd_request_failed",
        "handshake_abandoned",
        "ratchet_abandoned",
    }
)


@dataclass
class GatewayStats:
    """Counters of the gateway itself (the forwarder keeps the data path's)."""

    audit_failures: int = 0
    audit_dropped: int = 0  # records the audit writer could not take (queue full, or after a failure)


@dataclass
class _PeerLink:
    policy: PeerPolicy
    engine: Peer
    address: tuple[str, int]
    supply: PeerSupply
    too_big: int = 0


def _server_identity(settings: TlsSettings, expected_name: str) -> str:
    """How the KME's server certificate is verified, for status: pins, else the hostname."""
    if settings.server_sha256:
        return f"pinned by SHA-256 {settings.server_sha256[:16]}..."
    if settings.server_cn:
        return f"pinned by CN {settings.server_cn}"
    return f"hostname {expected_name}"


def _kme_retry(event: PeerEvent) -> bool:
    """Whether an engine event is a retry's outcome, not news: a KME failure the supply logs once
    per streak, or a Kick (the slave asks once a second while it has no session)."""
    reason = str(event.detail.get("reason", ""))
    return event.kind in ("qkd_request_failed", "kick_received") or (
        event.kind in ("handshake_abandoned", "ratchet_abandoned") and reason.startswith("qkd:")
    )


def peer_config(p: PeerPolicy, my_sae: str) -> PeerConfig:
    """Return the protocol engine's settings for policy peer ``p``."""
    return PeerConfig(
        name=p.name,
        role=p.qkd_role,
        my_sae=my_sae,
        peer_sae=p.sae_id,
        kem=get_kem(p.kem),
        x25519=p.x25519,
        qkd_bits=p.qkd_key_bits,
        interval=p.rekey.interval,
        kem_interval=p.rekey.kem_interval,
        max_key_age=p.rekey.max_key_age,
        fail_mode=p.fail_mode,
        ppk=load_ppk(p.ppk.file) if p.ppk is not None else None,
        ppk_id=p.ppk.id if p.ppk is not None else "",
        ppk_mandatory=p.ppk.mandatory if p.ppk is not None else False,
    )


class Gateway:
    """One running gateway. Build it with the policy, then ``await run()``."""

    def __init__(
        self,
        policy: GatewayPolicy,
        *,
        stats_file: Path | None = None,
        audit_log: Path | None = None,
        control_socket: Path | None = None,
        run_user: str | None = None,
    ) -> None:
        """Load keys and set up the engines; touches no network yet.

        Raises:
            ConfigError: a key file is missing or unusable.
        """
        self.policy = policy
        self.stats = GatewayStats()
        self._stats_file = stats_file
        if stats_file is not None and not stats_file.parent.is_dir():
            raise ConfigError(f"--stats-file {stats_file}: directory {stats_file.parent} does not exist")
        self._log_budget: dict[str, tuple[float, int]] = {}
        self._control_path = control_socket or default_socket(policy.name)
        self._control: asyncio.AbstractServer | None = None
        self._started = time.monotonic()
        self._mtu = policy.tun.mtu
        self._run_user = run_user
        # Opened before the privilege drop; its writer thread starts in ``run`` after it (the drop
        # needs a single thread). ``append`` only queues: no disk I/O on the event loop.
        self._audit = AuditLog.open(audit_log, gateway=policy.name) if audit_log is not None else None
        self._failures = FailureAggregator()  # unauthenticated failures: one summary per interval
        self._metrics: MetricsServer | None = None
        self._check_files()
        identity = load_identity(policy.identity)
        kme = policy.kme
        self._kms = Etsi014Client(
            kme.url, ca=kme.ca, cert=kme.cert, key=kme.key, timeout=kme.timeout, tls=kme
        )
        # KME calls block: their own pool, sized for every request a peer can have open at once
        # (status, refill, rekey, its hedged twin, a TLS diagnosis), so no stalled KME answer can
        # take the loop's default executor or another peer's turn.
        self._kme_pool = ThreadPoolExecutor(
            max_workers=KME_REQUESTS_PER_PEER * max(1, len(policy.peers)), thread_name_prefix="qgate-kme"
        )
        now = time.monotonic()
        self._peers: list[_PeerLink] = []
        for p in policy.peers:
            engine = Peer(
                peer_config(p, kme.sae_id),
                identity=identity,
                peer_key=load_peer_public_key(p.public_key),
                rng=os.urandom,
                now=now,
                index_taken=self._index_taken,
            )
            link = _PeerLink(p, engine, (p.endpoint.host, p.endpoint.port), cast(PeerSupply, None))
            flush = functools.partial(self._flush, link)
            link.supply = PeerSupply(
                p, engine, self._kms, kme.url, flush, self._kms.https.diagnose, self._kme_pool
            )
            self._peers.append(link)
        self._by_address = {link.address: link for link in self._peers}
        self._routes: RouteTable[_PeerLink] = RouteTable(
            (net, link) for link in self._peers for net in link.policy.subnets
        )
        self._tun: VnetTun | None = None
        self._fwd: Forwarder | None = None
        self._tun_again = False
        self._control_budget = TokenBucket(CONTROL_READ_RATE, CONTROL_READ_BURST, time.monotonic())
        self._control_paused = False
        self.control_pauses = 0
        self._idle_stats = ForwarderStats()
        self._sock: socket.socket | None = None  # the data socket (sends), or the only one
        self._udp: UdpSockets | None = None
        self._net: NetHandle | None = None
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _check_files(self) -> None:
        """Refuse secret files others could use; warn about files others could replace (safe permissions).

        Raises:
            ConfigError: a secret file (``gateway.identity``, ``kme.key``, a peer's ``ppk.file``) gives
                group or others any access; the message names each such file, its field, mode and fix.
        """
        from qgate.privileges import unsafe_secret_mode

        pol = self.policy
        files = [("gateway.identity", pol.identity, True), ("kme.key", pol.kme.key, True)]
        files += [("kme.cert", pol.kme.cert, False), ("kme.ca", pol.kme.ca, False)]
        for i, p in enumerate(pol.peers):
            files.append((f"peers[{i}].public_key", p.public_key, False))
            if p.ppk is not None:
                files.append((f"peers[{i}].ppk.file", p.ppk.file, True))
        user: str | int | None = self._run_user or (os.geteuid() if os.geteuid() != 0 else None)
        refused = []
        for where, path, secret in files:
            mode = unsafe_secret_mode(path) if secret else None
            if mode is not None:
                refused.append(
                    f"{path} ({where}) is readable or usable by group/others (mode {mode:04o});"
                    f" chmod 600 {path}"
                )
                continue
            owner = foreign_owner(path, user) if secret else None
            if owner is not None:
                refused.append(
                    f"{path} ({where}) is owned by uid {owner}, not root or the run user;"
                    f" chown it to root (or the --user account)"
                )
                continue
            for warning in check_file_safety(path, secret=secret, run_user=user):
                log.warning("%s", warning)
        if refused:
            raise ConfigError("refusing to start: secret file not private: " + "; ".join(refused))

    def _index_taken(self, index: int) -> bool:
        """Whether a receiver index is in use by any peer (indexes route data to peers)."""
        return any(index in link.engine.epochs.by_index for link in self._peers)

    # ----- lifecycle -----------------------------------------------------------------
    async def run(self) -> None:
        """Bring the tunnel up and forward until SIGINT/SIGTERM; always undo the set-up.

        Raises:
            DataPlaneError: the TUN, routes or UDP socket could not be set up.
        """
        self._loop = asyncio.get_running_loop()
        for link in self._peers:
            link.supply.loop = self._loop
        opened = False
        try:
            self._open()
            opened = True
            self._control = await control.serve(self._control_path, self._on_control)
            if self._run_user is not None:
                for name in LAZY_MODULES:  # after the drop the interpreter's tree may be unreadable
                    importlib.import_module(name)
                result = drop_privileges(self._run_user)
                log.info(
                    "now running as %s with %s only", result.user, ", ".join(sorted(result.kept)) or "none"
                )
            if self._audit is not None:
                self._audit.start()  # after the drop: the writer thread has the reduced credentials
            if self.policy.metrics is not None:
                endpoint = self.policy.metrics
                status = status_from_loop(self._loop, lambda: self.status(time.monotonic()))
                self._metrics = start_metrics_server(endpoint.host, endpoint.port, status)
                log.info("Prometheus metrics on http://%s/metrics", endpoint)
            self._audit_event("gateway_start", listen=str(self.policy.listen), peers=len(self._peers))
            gc.collect()
            gc.freeze()  # long-lived start-up objects leave the GC's view: shorter pauses on the data path
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop.set)
            self._loop.add_signal_handler(signal.SIGHUP, self.reload)
            log.info(
                "gateway %s up: listening on %s, %d peer(s)",
                self.policy.name,
                self.policy.listen,
                len(self._peers),
            )
            await self._timer_loop()
        finally:
            if self._metrics is not None:
                await asyncio.to_thread(self._metrics.stop)
            if self._control is not None:
                self._control.close()
                with contextlib.suppress(OSError):
                    self._control_path.unlink()
            self._close()
            self._write_stats()
            if opened:
                log.info("gateway %s stopped; TUN and routes removed", self.policy.name)
            self._audit_event("gateway_stop")
            if self._audit is not None:
                self._audit.close()

    def stop(self) -> None:
        """Ask ``run`` to return (thread-safe only from the event loop)."""
        self._stop.set()

    def _open(self) -> None:
        pol = self.policy
        if not pol.tun.offload:
            log.warning("offloads off by policy (tun.offload: false): plain TUN, one UDP datagram per call")
        self._tun = VnetTun.open(pol.tun.name, offload=pol.tun.offload)
        routes = [net for link in self._peers for net in link.policy.subnets]
        self._net = configure_tun(self._tun.name, mtu=pol.tun.mtu, address=pol.tun.address, routes=routes)
        log.info("TUN %s up, MTU %d, routes %s", self._tun.name, pol.tun.mtu, ", ".join(map(str, routes)))
        # Data and control sockets, steered by classic BPF (qgate.dataplane.sockfilter; issue 10).
        self._udp = udp = open_udp_sockets(pol.listen.host, pol.listen.port, buffer=SOCKET_BUFFER)
        self._sock = udp.data
        links: list[Link] = list(self._peers)
        self._fwd = Forwarder(
            self._tun,
            UdpBatchIO(udp.data, gso=pol.tun.offload, gro=pol.tun.offload),
            cast("RouteTable[Link]", self._routes),
            links,
            self._mtu,
            cast("dict[tuple[str, int], Link]", self._by_address),
            self._on_handshake,
            self._after_peer,
            control=UdpBatchIO(udp.control, gso=False, gro=False) if udp.control is not None else None,
        )
        assert self._loop is not None
        self._loop.add_reader(self._tun.fd, self._on_tun_readable)
        self._loop.add_reader(udp.data.fileno(), self._on_udp_readable)
        if udp.control is not None:
            self._loop.add_reader(udp.control.fileno(), self._on_control_readable)

    def _close(self) -> None:
        loop = self._loop
        if self._udp is not None:
            for sock in self._udp.sockets():
                if loop is not None:
                    loop.remove_reader(sock.fileno())
            self._udp.close()
            self._udp = self._sock = None
        if self._net is not None:
            try:
                self._net.remove()
            except QgateError as exc:
                log.error("could not remove all network settings: %s", exc)
            self._net = None
        if self._tun is not None:
            if loop is not None:
                loop.remove_reader(self._tun.fd)
            self._tun.close()
            self._tun = None
        for link in self._peers:
            link.engine.epochs.clear()
            link.supply.stock.clear()
        self._kme_pool.shutdown(wait=False, cancel_futures=True)  # a stalled KME call ends by its deadline

    async def _timer_loop(self) -> None:
        next_stats = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            for link in self._peers:
                link.supply.tick(now)
                due = link.engine.next_timer()
                if due is None or due <= now:
                    link.engine.handle_timer(now)
                    self._flush(link, timers_ran=True)
            self._audit_summaries(self._failures.due(now))
            if now >= next_stats:
                self._write_stats()
                next_stats = now + STATS_PERIOD
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), TICK)
        self._audit_summaries(self._failures.flush(time.monotonic()))  # the open windows, before stop

    # ----- data plane (qgate.dataplane.forwarder) -------------------------------------
    def _on_tun_readable(self) -> None:
        if self._fwd is not None and self._fwd.on_tun_readable(time.monotonic()) and not self._tun_again:
            assert self._loop is not None
            self._tun_again = True  # reads wait in the flow queue: come back after the other events
            self._loop.call_soon(self._tun_continue)

    def _tun_continue(self) -> None:
        self._tun_again = False
        if self._tun is not None:  # not after _close: the queued reads go with the device
            self._on_tun_readable()

    def _on_udp_readable(self) -> None:
        if self._fwd is not None:
            self._fwd.on_udp_readable(time.monotonic())

    def _on_control_readable(self) -> None:
        """Read the control socket under CONTROL_READ_RATE while any peer has a session.

        With the budget spent the reader is removed until it refills, so a flood waits in (and is
        dropped by) the kernel instead of keeping the event loop busy.
        """
        fwd = self._fwd
        if fwd is None:
            return
        now = time.monotonic()
        limit = CONTROL_DATAGRAMS_PER_WAKE
        paced = any(link.engine.has_session(now) for link in self._peers)  # (not after a key expired)
        if paced:
            limit = min(limit, int(self._control_budget.available(now)))
            if limit <= 0:
                self._pause_control()
                return
        read = fwd.on_control_readable(now, limit)
        if paced:
            self._control_budget.take(now, read)

    def _pause_control(self) -> None:
        udp, loop = self._udp, self._loop
        if udp is None or udp.control is None or loop is None or self._control_paused:
            return
        self._control_paused = True
        self.control_pauses += 1
        loop.remove_reader(udp.control.fileno())
        loop.call_later(CONTROL_DATAGRAMS_PER_WAKE / CONTROL_READ_RATE, self._resume_control)

    def _resume_control(self) -> None:
        self._control_paused = False
        udp, loop = self._udp, self._loop
        if udp is not None and udp.control is not None and loop is not None:
            loop.add_reader(udp.control.fileno(), self._on_control_readable)

    def _sync_live_indexes(self) -> None:
        """Give the kernel's UDP filters the live receiver indexes (re-attached only when they changed).

        Called with an engine's actions before they are carried out, so a new epoch's index (and
        the pending index an outgoing M1 or R1 asks the peer's answer to name) is let through before
        any message that lets the peer use it leaves.
        """
        if self._udp is None:
            return
        self._udp.set_live(frozenset().union(*(p.engine.live_indexes() for p in self._peers)))

    def _on_handshake(self, link: Link, datagram: bytes, now: float) -> None:
        link.engine.receive_fragment(datagram, now)

    def _fwd_stats(self) -> ForwarderStats:
        return self._fwd.stats if self._fwd is not None else self._idle_stats

    def _after_peer(self, link: Link, now: float) -> None:
        assert isinstance(link, _PeerLink)
        self._flush(link)

    def _send(self, link: _PeerLink, datagram: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.sendto(datagram, link.address)
        except OSError:
            self._fwd_stats().drops_send_error += 1

    # ----- actions -------------------------------------------------------------------
    def _flush(self, link: _PeerLink, *, timers_ran: bool = False) -> None:
        """Carry out the engine's actions; the kernel filters follow its live indexes first.

        Indexes appear only with actions (the messages that install epochs) and go only when a
        timer expires an epoch, so the per-batch data path skips the index sync otherwise.
        """
        actions = link.engine.take_actions()
        if actions or timers_ran:
            self._sync_live_indexes()
        for action in actions:
            self._do(link, action)

    def _do(self, link: _PeerLink, action: Action) -> None:
        if isinstance(action, SendDatagram):
            self._send(link, action.data)
        elif isinstance(action, FetchEncKeys | FetchDecKeys):
            link.supply.fetch(action, time.monotonic())
        elif isinstance(action, ProbeKme):
            link.supply.poll_soon()  # the engine wants local evidence now
        elif isinstance(action, PeerEvent) and is_aggregated(action.kind):
            # Unauthenticated or malformed input: anyone can send it, so it is counted and summarised
            # (``_timer_loop``), never one audit record or one log line each.
            if action.kind in _WARN_EVENTS:
                self._log_event(action)  # rate-limited there
            peer = str(action.detail.get("peer", link.policy.name))
            reason = str(action.detail.get("reason", ""))
            count = action.detail.get("count", 1)
            self._failures.add(peer, action.kind, reason, time.monotonic(), int(count))
        elif isinstance(action, PeerEvent):
            link.supply.event(action, time.monotonic())
            self._log_event(action)
            if action.kind in AUDITED_EVENTS:
                self._audit_event(action.kind, **action.detail)

    def _audit_event(self, kind: str, /, **fields: str | int | float) -> None:
        """Queue an audit record; a failing or full log is logged and counted, never fatal to traffic."""
        if self._audit is None:
            return
        try:
            self._audit.append(kind, **fields)
        except QgateError as exc:
            self.stats.audit_failures += 1
            log.error("audit log: %s", exc)
        self.stats.audit_dropped = self._audit.dropped

    def _audit_summaries(self, summaries: list[Summary]) -> None:
        """Log and audit ``FailureAggregator`` summaries as ``unauthenticated_summary`` records."""
        for summary in summaries:
            log.warning(
                "unauthenticated %s from %s: %s in %s s (last reason: %s)",
                summary["kind"], summary["peer"], summary["count"], summary["interval_s"],
                summary["last_reason"],
            )  # fmt: skip
            self._audit_event("unauthenticated_summary", **summary)
        if self._audit is not None:
            self.stats.audit_dropped = self._audit.dropped

    def _log_event(self, event: PeerEvent) -> None:
        """Log a protocol event; warnings are limited to LOG_BURST per kind per second (counted anyway)."""
        detail = " ".join(f"{k}={v}" for k, v in event.detail.items())
        if _kme_retry(event):
            log.debug("%s %s", event.kind, detail)  # the supply logs the KME's state once per change
            return
        if event.kind == "mode_change" and event.detail.get("new") == "closed":
            log.warning(
                "%s %s: traffic stopped (fail_mode qkd_and_pqc) until fresh keys arrive", event.kind, detail
            )
            return
        if event.kind == "mode_change" and event.detail.get("new") == "degraded":
            log.warning(
                "%s %s: running on ML-KEM/X25519 only (policy fail_mode pqc_only_if_qkd_down)",
                event.kind,
                detail,
            )
            return
        if event.kind not in _WARN_EVENTS:
            log.info("%s %s", event.kind, detail)
            return
        now = time.monotonic()
        start, count = self._log_budget.get(event.kind, (now, 0))
        if now - start >= 1.0:
            if count > LOG_BURST:
                log.warning("%s: %d more suppressed in the last second", event.kind, count - LOG_BURST)
            start, count = now, 0
        self._log_budget[event.kind] = (start, count + 1)
        if count < LOG_BURST:
            log.warning("%s %s", event.kind, detail)

    # ----- statistics ----------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """Return every counter as plain JSON-able data (no key bytes)."""
        peers: dict[str, object] = {}
        totals: dict[str, int] = {}
        for link in self._peers:
            engine = link.engine
            current = engine.epochs.current
            row: dict[str, object] = {
                "role": link.policy.qkd_role,
                "established": engine.established,
                "epoch": current.number if current else None,
                "mode": engine.mode,
                "rekey_interval_s": engine.interval,
                "fail_mode": link.policy.fail_mode,
                **asdict(engine.stats),
                **asdict(engine.epochs.stats),
                **link.supply.counters(),
            }
            peers[link.policy.name] = row
            for key, value in row.items():
                if isinstance(value, int) and not isinstance(value, bool) and key != "epoch":
                    totals[key] = totals.get(key, 0) + value
        master_rekeys = {
            key: sum(
                link.engine.stats.__dict__[key] for link in self._peers if link.policy.qkd_role == "master"
            )
            for key in ("rekeys_qkd", "rekeys_kem")
        }
        return {
            "gateway": self.policy.name,
            **totals,
            **asdict(self.stats),
            **asdict(self._fwd_stats()),
            "udp_kernel_drops": self._udp_kernel_drops(),
            "master": master_rekeys,
            "peers": peers,
        }

    def _udp_kernel_drops(self) -> int:
        """Datagrams the kernel dropped at this gateway's UDP sockets (BPF filters, full buffers)."""
        if self._udp is None:
            return 0
        status = self._udp.status()
        return sum(v for k, v in status.items() if k.startswith("kernel_drops") and isinstance(v, int))

    def reload(self) -> list[str]:
        """Re-read the policy file (SIGHUP); apply what can change live, log and return what could not."""
        source = self.policy.source
        if source is None:
            return ["no policy file to reload"]
        try:
            new = load_policy(source)
        except QgateError as exc:
            log.error("reload of %s refused, the running policy stays: %s", source, exc)
            self._audit_event("policy_reload", result="refused", reason=str(exc)[:200])
            return [str(exc)]
        plan = plan_reload(self.policy, new)
        for link in self._peers:
            fresh = plan.peers.get(link.policy.name)
            if fresh is not None and fresh != link.policy:
                self._apply_peer(link, fresh)
        self.policy = replace(self.policy, peers=tuple(link.policy for link in self._peers))
        for line in plan.applied:
            log.info("reload: %s", line)
        for line in plan.refused:
            log.warning("reload: %s", line)
        log.info(
            "policy %s reloaded: %d change(s) applied, %d refused",
            source,
            len(plan.applied),
            len(plan.refused),
        )
        self._audit_event(
            "policy_reload",
            result="applied",
            applied="; ".join(plan.applied),
            refused="; ".join(plan.refused),
        )
        return plan.refused

    def _apply_peer(self, link: _PeerLink, fresh: PeerPolicy) -> None:
        """Give a running peer its new rekey timing, fail mode and prefetch target (keys stay)."""
        engine = link.engine
        engine.config = replace(
            engine.config,
            interval=fresh.rekey.interval,
            kem_interval=fresh.rekey.kem_interval,
            max_key_age=fresh.rekey.max_key_age,
            fail_mode=fresh.fail_mode,
        )
        engine.set_interval(fresh.rekey.interval)
        engine.epochs.max_key_age = fresh.rekey.max_key_age
        link.supply.reconfigure(fresh)
        link.policy = fresh

    def _on_control(self, request: dict[str, object]) -> dict[str, object]:
        """Answer a control-socket request (``status`` or ``down``)."""
        if request["cmd"] == "status":
            return {"ok": True, **self.status(time.monotonic())}
        if request["cmd"] == "down":
            log.info("stop requested through the control socket")
            self._stop.set()
            return {"ok": True, "gateway": self.policy.name, "stopping": True}
        return {"ok": False, "error": f"unknown command {request['cmd']!r}: use status or down"}

    def status(self, now: float) -> dict[str, object]:
        """Return the operator's view: per peer state, epoch, stock, rekeys, traffic and drops by reason."""
        return {
            "gateway": self.policy.name,
            "pid": os.getpid(),
            "uptime_s": round(now - self._started, 3),
            "peers": [self._peer_status(link, now) for link in self._peers],
            "counters": {**asdict(self.stats), **asdict(self._fwd_stats())},
            "data_path": self._data_path(),
            "kme_tls": self._kme_tls(),
            "udp_sockets": self._udp.status() if self._udp is not None else {},
        }

    def _kme_tls(self) -> dict[str, object]:
        """TLS toward the KME: what was negotiated last, what we offer, how the server is verified."""
        https = self._kms.https
        version, suite = https.negotiated or (None, None)
        return {
            "version": version,
            "cipher": suite,
            "offered": https.offer.describe(),
            "weak_ciphers_allowed": https.weak_ciphers_allowed,
            "server_identity": _server_identity(https.settings, https.expected_name),
        }

    def _data_path(self) -> dict[str, object]:
        """Which offloads the data path uses: TUN virtio-net header and offload bits, UDP GSO and GRO."""
        fwd = self._fwd
        if fwd is None:
            return {}
        return {
            "tun_vnet_header": fwd.tun.vnet,
            "tun_offloads": fwd.tun.offloads,
            "udp_gso": fwd.udp.gso,
            "udp_gro": fwd.udp.gro,
        }

    def _peer_status(self, link: _PeerLink, now: float) -> dict[str, object]:
        engine, data = link.engine, link.engine.epochs.stats
        current = engine.epochs.current
        state, why = engine.state(now)
        last_hs = engine.last_handshake_at
        return {
            "name": link.policy.name,
            "role": link.policy.qkd_role,
            "state": state,
            "why": why,
            "mode": engine.mode,
            "fail_mode": link.policy.fail_mode,
            "epoch": current.number if current else None,
            "epoch_age_s": round(now - current.created_at, 3) if current else None,
            "last_handshake_s": round(now - last_hs, 3) if last_hs is not None else None,
            "rekey_interval_s": engine.interval,
            "qkd_kme_stock": link.supply.view.stored_count(),
            "qkd_prefetch_stock": len(link.supply.stock),
            "qkd_prefetch_failures": link.supply.stock.stats.refill_failures,
            "kme_reachable": link.supply.view.reachable,
            "kme": link.supply.status(),
            "rekeys": engine.stats.rekeys_qkd + engine.stats.rekeys_kem,
            "rekeys_qkd": engine.stats.rekeys_qkd,
            "rekeys_kem": engine.stats.rekeys_kem,
            "rekeys_failed": engine.stats.handshake_failures,
            "tx_packets": data.tx_packets,
            "tx_bytes": data.tx_bytes,
            "rx_packets": data.rx_packets,
            "rx_bytes": data.rx_bytes,
            "drops": {
                "bad_tag": data.drops_auth,
                "replay": data.drops_replay,
                "unknown_epoch": data.drops_unknown_index,
                "key_expired": data.drops_key_expired,
                "key_exhausted": data.drops_key_exhausted,
                "no_session": data.drops_no_session,
                "malformed": data.drops_malformed,
                "too_big": link.too_big,
            },
            "guard": {name: getattr(engine.stats, field) for name, field in GUARD_COUNTERS.items()},
        }

    def _write_stats(self) -> None:
        if self._stats_file is None:
            return
        tmp = self._stats_file.with_name(self._stats_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot(), sort_keys=True))
            tmp.replace(self._stats_file)
        except OSError as exc:
            log.warning("cannot write statistics to %s: %s", self._stats_file, exc)


def run_gateway(
    policy: GatewayPolicy,
    *,
    stats_file: Path | None = None,
    audit_log: Path | None = None,
    control_socket: Path | None = None,
    run_user: str | None = None,
) -> None:
    """Run a gateway in the foreground until SIGINT/SIGTERM (``qgate up``).

    Raises:
        QgateError: set-up failed (keys, TUN, routes, socket); the message says what.
    """
    gateway = Gateway(
        policy, stats_file=stats_file, audit_log=audit_log, control_socket=control_socket, run_user=run_user
    )
    asyncio.run(gateway.run())
