"""``qgate lab run``: two qgate sites in network namespaces, real traffic, a WAN capture, a verdict.

A :class:`Lab` owns one run: the topology (:mod:`qgate.lab_net`), the run directory
(:mod:`qgate.lab_setup`) and every child process (:mod:`qgate.lab_procs`). Leaving its ``with``
block (normally, on an exception, on Ctrl-C or SIGTERM) stops all children and deletes the
namespaces, unless ``keep`` is set: then the namespaces, the KMEs and the gateways stay up
(detached from the lab process) until ``qgate lab down <run id>``. :func:`run_lab` is the
acceptance run: KMEs, gateways, tunnel wait, ping + paced TCP transfer with SHA-256 on both
ends, gateway stats, and the WAN pcap analysis (:mod:`qgate.lab_pcap`). ``tunnel=False`` runs
the same traffic over plain IP forwarding (the bare-veth baseline), where the analysis must
find the plaintext.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Final

from qgate import lab_net as net
from qgate import lab_setup as setup
from qgate.lab_pcap import PayloadIndex, WanReport, analyse_wan
from qgate.lab_procs import Child, Children, LabError, wait_until
from qgate.lab_traffic import PingResult, parse_ping
from qgate.status import format_status

log = logging.getLogger(__name__)

RUN_DIR_ROOT: Final = Path(tempfile.gettempdir())
"""Where run directories go (``<tmp>/qgate-lab-<run id>``, mode 0700, never reused)."""
TRAFFIC_PORT: Final = 5001
TUNNEL_TIMEOUT: Final = 25.0
"""Seconds to wait for the first ping through the tunnel."""
KME_TIMEOUT: Final = 15.0
"""Seconds to wait for both KMEs to listen."""
REKEY_RATE_MIN_WINDOW: Final = 30.0
"""Seconds of traffic from which a run checks the rekey rate (shorter: one rekey more or less is 10 %)."""
REKEY_RATE_TOLERANCE: Final = 0.1
"""Rekeys per configured interval may differ from 1 by this much (issue 11: within 10 %)."""
PING_PATTERN_SIZE: Final = 16
"""Bytes of random ``ping -p`` pattern, so ping payload is recognisable in the capture."""
KEPT_PREFIXES: Final = ("kme-", "gateway-")
"""Children (by name prefix) that ``--keep`` leaves running; the others are stopped as usual."""
KEPT_PIDS_FILE: Final = "kept-pids"
"""File in the run dir listing ``<pid> <name>`` of the children left running by ``--keep``."""


def run_dir_of(run_id: str) -> Path:
    """Return the run directory of ``run_id``: ``/tmp/qgate-lab-<run_id>``."""
    return RUN_DIR_ROOT / f"qgate-lab-{run_id}"


_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


class LabInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived during a lab run (handled like Ctrl-C: tear down, exit)."""


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise LabInterrupted(f"signal {signal.Signals(signum).name}")


def _ignore(signum: int, _frame: FrameType | None) -> None:
    log.warning("signal %s during teardown ignored; teardown continues", signal.Signals(signum).name)


class Lab:
    """One lab run: topology, run dir and children; a context manager that always cleans up.

    Attributes:
        topo: namespace and link names.
        run_dir: the run directory.
        tunnel: whether qgate carries the traffic (else plain IP forwarding).
        keep: leave namespaces, run dir, KMEs and gateways running at exit (children are
            detached: no parent-death signal); other children are still stopped.
        keep_run_dir_on_failure: keep the run dir (logs, pcap) when the run failed or raised
            (not on Ctrl-C/SIGTERM); tests that expect failures may set it False.
        children: every started child process.
    """

    def __init__(
        self,
        *,
        tunnel: bool = True,
        keep: bool = False,
        run_id: str | None = None,
        keep_run_dir_on_failure: bool = True,
    ) -> None:
        self.topo = net.Topology(run_id or net.new_run_id())
        self.run_dir = run_dir_of(self.topo.run_id)
        self.tunnel = tunnel
        self.keep = keep
        self.keep_run_dir_on_failure = keep_run_dir_on_failure
        self.children: Children | None = None  # made in __enter__, with the run dir
        self._signals: dict[int, _Handler] = {}
        self._failed = False

    def __enter__(self) -> Lab:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._signals[sig] = signal.signal(sig, _raise_interrupted)
        try:
            self.run_dir.mkdir(mode=0o700)
            self.children = Children(self.run_dir / "logs", detach=self.keep)
            net.create_topology(self.topo, routed=not self.tunnel)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        previous = {
            sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
            self._teardown(failed=(exc_type is not None and not interrupted) or self._failed)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for signum, old in self._signals.items():
                signal.signal(signum, old)

    def _teardown(self, *, failed: bool) -> None:
        if self.children is not None:
            if failed:
                self.children.dump_logs()
            if self.keep:
                self._stop_transient()
            else:
                self.children.stop_all()
        if self.keep:
            sys.stderr.write(self.keep_message())
            return
        for problem in net.destroy_topology(self.topo):
            log.error("teardown: %s", problem)
        if failed and self.keep_run_dir_on_failure:
            sys.stderr.write(f"lab run dir kept for inspection: {self.run_dir}\n")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def kept(self, child: Child) -> bool:
        """Return whether ``child`` stays running after the run (``keep`` and a KME or gateway)."""
        return self.keep and child.name.startswith(KEPT_PREFIXES)

    def _stop_transient(self) -> None:
        """``keep`` teardown: stop the children that are not kept, record the kept ones' pids."""
        lines = []
        for child in reversed(self.kids.items):
            if self.kept(child) and child.proc.poll() is None:
                lines.append(f"{child.proc.pid} {child.name}\n")
                continue
            try:
                self.kids.stop(child)
            except Exception as exc:  # teardown must go on
                log.warning("stopping %s failed: %s", child.name, exc)
        try:
            (self.run_dir / KEPT_PIDS_FILE).write_text("".join(lines))
        except OSError as exc:
            log.warning("cannot record kept pids: %s", exc)

    def keep_message(self) -> str:
        """Return the ``--keep`` notice for stderr: run id, what runs, how to reach it and tear it down."""
        rid = self.topo.run_id
        running = [c.name for c in self.children.items if self.kept(c)] if self.children else []
        return (
            f"lab {rid} kept running: namespaces {' '.join(self.topo.namespaces)}; "
            f"processes {', '.join(running) or 'none'}; run dir {self.run_dir}\n"
            f"reach it with e.g.: ip netns exec {self.topo.ns('ha')} ping {net.HOST_B}\n"
            f"status: qgate status --socket {self.run_dir}/control-a.sock (or control-b.sock)\n"
            f"tear it down with: qgate lab down {rid} (it deletes {self.run_dir}, logs and audit logs too)\n"
        )

    def mark_failed(self) -> None:
        """Record that the run failed its checks: keep the run dir and print child logs at exit."""
        self._failed = True

    @property
    def kids(self) -> Children:
        """The children set (only valid inside the ``with`` block)."""
        if self.children is None:
            raise LabError("lab not entered")
        return self.children

    def start(self, name: str, role: str, argv: list[str], *, pipe_stdout: bool = False) -> Child:
        """Start ``argv`` as child ``name`` in the namespace of ``role`` (``ha``/``ga``/``gb``/``hb``)."""
        return self.kids.start(name, self.topo.ns(role), argv, pipe_stdout=pipe_stdout)

    def run(self, role: str, argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion in ``role``'s namespace; output captured (never on our stdout).

        Raises:
            LabError: it did not finish within ``timeout`` seconds.
        """
        try:
            return subprocess.run(
                net.ns_argv(self.topo.ns(role), argv),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{argv[0]} in {role} did not finish within {timeout:.0f} s") from exc

    # --- pieces of a qgate run --------------------------------------------------------------

    def start_capture(self) -> Child:
        """Start tcpdump on gateway A's WAN link (all IPv4) into ``<run>/wan-a.pcap``; wait for it."""
        pcap = self.run_dir / "wan-a.pcap"
        argv = ["tcpdump", "-i", self.topo.wan_a, "-n", "-U", "-s", "0", "-B", "8192", "-Z", "root",
                "-w", str(pcap), "ip"]  # fmt: skip
        child = self.start("tcpdump", "ga", argv)

        def listening() -> bool:
            self.kids.check_alive(child)
            return "listening on" in child.tail()

        wait_until("tcpdump to listen", listening, timeout=10)
        return child

    def start_kmes(
        self, *, rate: int = setup.KME_RATE, admins: Sequence[str] = (), quirks: Sequence[str] = ()
    ) -> None:
        """Start both KME simulators (one per gateway namespace) and wait until both listen.

        Args:
            rate: simulated QKD key rate of each KME, bits per second.
            admins: client certificate CNs allowed to inject faults at run time (``--admin``).
            quirks: KME product quirks given to both KMEs (``--quirk``, ``qgate.kms.quirks``).
        """
        for site, role in (("a", "ga"), ("b", "gb")):
            argv = setup.kms_sim_argv(
                sys.executable, self.run_dir, site, rate=rate, admins=admins, quirks=quirks
            )
            self.start(f"kme-{site}", role, argv)
        kmes = [c for c in self.kids.items if c.name.startswith("kme-")]

        def listening() -> bool:
            for child in kmes:
                self.kids.check_alive(child)
            return all(listens(self.topo.ns(role), setup.KME_PORT) for role in ("ga", "gb"))

        wait_until("both KMEs to listen on port 8443", listening, timeout=KME_TIMEOUT)

    def start_qgate(
        self,
        *,
        rekey: dict[str, float] | None = None,
        kme_rate: int = setup.KME_RATE,
        overrides: Mapping[str, setup.SiteOverrides] | None = None,
        kme_quirks: Sequence[str] = (),
    ) -> list[Child]:
        """Write PKI, identities and policies, start both KMEs, then both gateways; return the gateways.

        Args:
            rekey: rekey timing to force into both policies (seconds), else the template's.
            kme_rate: simulated QKD key rate of each KME, bits per second.
            overrides: per site (``a``, ``b``) policy values to force (see ``SiteOverrides``).
            kme_quirks: quirks of both KMEs; the PKI and policies follow (``no-san``, ``cbc-only``).
        """
        setup.make_pki_and_identities(self.run_dir, kme_quirks=kme_quirks)
        setup.write_policies(self.run_dir, rekey=rekey, overrides=overrides, kme_quirks=kme_quirks)
        self.start_kmes(rate=kme_rate, quirks=kme_quirks)
        return self.start_gateways()

    def start_gateways(self) -> list[Child]:
        """Start gateway B (slave) then A (master) with ``qgate up``; return them."""
        return [
            self.start(f"gateway-{site}", role, setup.gateway_argv(sys.executable, self.run_dir, site))
            for site, role in (("b", "gb"), ("a", "ga"))
        ]

    def wait_path(self, watch: list[Child], timeout: float = TUNNEL_TIMEOUT) -> float:
        """Ping host B from host A once a second until one answers; return the seconds waited.

        Raises:
            LabError: no answer within ``timeout`` seconds, or a watched child exited.
        """
        start = time.monotonic()

        def answered() -> bool:
            for child in watch:
                self.kids.check_alive(child)
            return self.run("ha", ["ping", "-c", "1", "-W", "1", net.HOST_B], timeout=5).returncode == 0

        wait_until(f"a ping from host A to {net.HOST_B}", answered, timeout=timeout, interval=0.2)
        return round(time.monotonic() - start, 2)


def listens(ns: str, port: int) -> bool:
    """Return whether a TCP socket listens on ``port`` in namespace ``ns`` (``ss -N``)."""
    proc = subprocess.run(
        ["ss", "-N", ns, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=5, check=False
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


def read_json_line(child: Child, timeout: float) -> dict[str, object]:
    """Read one JSON line from a child's stdout pipe within ``timeout`` seconds.

    Raises:
        LabError: timeout, end of output, or a line that is not a JSON object.
    """
    stream = child.proc.stdout
    if stream is None:
        raise LabError(f"{child.name} has no stdout pipe")
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise LabError(f"no output from {child.name} within {timeout:.0f} s")
    line = stream.readline()
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise LabError(f"{child.name} printed {line[:200]!r}, not JSON:\n{child.tail()}") from exc
    if not isinstance(obj, dict):
        raise LabError(f"{child.name} printed {line[:200]!r}, not a JSON object")
    return obj


def read_stats(path: Path) -> dict[str, object]:
    """Return a gateway stats file's JSON object, or {} when missing or half-written."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def fresh_stats(path: Path, timeout: float = 2.5) -> dict[str, object]:
    """Wait (at most ``timeout`` s) until the gateway rewrites its stats file, then read it."""
    try:
        before = path.stat().st_mtime_ns
    except OSError:
        before = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.stat().st_mtime_ns != before:
                time.sleep(0.01)
                break
        except OSError:
            pass
        time.sleep(0.02)
    return read_stats(path)


@dataclass
class Traffic:
    """Results of the ping and TCP transfer between host A and host B."""

    ping: PingResult
    sent: dict[str, object]
    received: dict[str, object]


def run_traffic(lab: Lab, payload_path: Path, *, seconds: float, pattern: bytes, pings: int) -> Traffic:
    """Ping host B from host A while sending ``payload_path`` to host B paced over ``seconds``.

    Raises:
        LabError: a traffic process failed or timed out.
    """
    traffic = [sys.executable, "-m", "qgate.lab_traffic"]
    receiver = lab.start("receiver", "hb", [*traffic, "recv", "--listen", f"{net.HOST_B}:{TRAFFIC_PORT}"],
                         pipe_stdout=True)  # fmt: skip
    read_json_line(receiver, timeout=10)
    ping_argv = ["ping", "-n", "-c", str(pings), "-i", "0.2", "-W", "2", "-p", pattern.hex(), net.HOST_B]
    ping = lab.start("ping", "ha", ping_argv, pipe_stdout=True)
    sender = lab.start("sender", "ha", [*traffic, "send", "--to", f"{net.HOST_B}:{TRAFFIC_PORT}",
                                        "--file", str(payload_path), "--seconds", str(seconds)],
                       pipe_stdout=True)  # fmt: skip
    limit = seconds + 30
    sent = read_json_line(sender, timeout=limit)
    received = read_json_line(receiver, timeout=10)
    assert ping.proc.stdout is not None
    try:
        ping_out, _ = ping.proc.communicate(timeout=pings * 0.2 + 10)
    except subprocess.TimeoutExpired as exc:
        raise LabError("ping did not finish") from exc
    return Traffic(parse_ping(ping_out.decode(errors="replace")), sent, received)


def _counter(stats: dict[str, object], key: str) -> int:
    value = stats.get(key, 0)
    return value if isinstance(value, int) else 0


def _drops(stats: dict[str, object]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k.startswith("drops") and isinstance(v, int)}


def _tcpdump_dropped(child: Child | None) -> int | None:
    if child is None:
        return None
    match = re.search(r"(\d+) packets? dropped by kernel", child.tail(60))
    return int(match.group(1)) if match else None


@dataclass
class LabOptions:
    """Options of one ``qgate lab run`` (sizes in MB = 10^6 bytes, times in seconds)."""

    transfer_mb: float = 20.0
    seconds: float = 6.0
    pings: int = 20
    tunnel: bool = True
    keep: bool = False
    no_offload: tuple[str, ...] = ()
    """Sites (``a``, ``b``) whose gateway runs the plain data path (policy ``tun.offload: false``)."""
    kme_quirks: tuple[str, ...] = ()
    """Quirks of both KMEs (``--kme-quirk``, names of ``qgate.kms.quirks.QUIRKS``)."""


def run_lab(opts: LabOptions) -> dict[str, object]:
    """Run the acceptance lab and return the result mapping (see :func:`summarise`).

    Raises:
        LabError, DataPlaneError, QgateError: the lab could not run (not a failed check: those
            show as ``ok: false`` in the result).
    """
    started = time.monotonic()
    with Lab(tunnel=opts.tunnel, keep=opts.keep) as lab:
        result = _run_inside(lab, opts)  # an exception marks the run failed in Lab.__exit__
        if not result["ok"]:
            lab.mark_failed()
    result["duration_s"] = round(time.monotonic() - started, 1)
    return result


def _run_inside(lab: Lab, opts: LabOptions) -> dict[str, object]:
    payload = setup.write_payload(lab.run_dir, int(opts.transfer_mb * 1_000_000))
    pattern = secrets.token_bytes(PING_PATTERN_SIZE)
    capture = lab.start_capture()
    overrides = {site: setup.SiteOverrides(tun={"offload": False}) for site in opts.no_offload}
    watch = lab.start_qgate(overrides=overrides, kme_quirks=opts.kme_quirks) if lab.tunnel else []
    waited = lab.wait_path(watch)
    before = {s: fresh_stats(lab.run_dir / f"stats-{s}.json") for s in ("a", "b")} if lab.tunnel else {}
    window_start = time.monotonic()
    traffic = run_traffic(lab, lab.run_dir / "payload.bin", seconds=opts.seconds, pattern=pattern,
                          pings=opts.pings)  # fmt: skip
    status = [gateway_status(lab, site) for site in ("a", "b")] if lab.tunnel else []
    window = time.monotonic() - window_start  # the master's counters below span about this long
    final: dict[str, dict[str, object]] = {}
    for child in watch:
        site = child.name[-1]
        if lab.kept(child):  # --keep: leave it running, take its current counters
            final[site] = fresh_stats(lab.run_dir / f"stats-{site}.json")
            final[site]["exit_status"] = None
            continue
        code = lab.kids.stop(child)
        final[site] = read_stats(lab.run_dir / f"stats-{site}.json")
        final[site]["exit_status"] = code
    lab.kids.stop(capture, signal.SIGINT)
    for child in lab.kids.items:
        if not lab.kept(child):
            lab.kids.stop(child)
    index = PayloadIndex()
    index.add_payload(payload)
    index.add_pattern(pattern)
    classify = _classifier() if lab.tunnel else None
    report = analyse_wan(lab.run_dir / "wan-a.pcap", endpoints=(net.GW_A_WAN, net.GW_B_WAN),
                         classify=classify, index=index)  # fmt: skip
    result = summarise(lab, traffic, report, before, final, waited=waited, dropped=_tcpdump_dropped(capture))
    result["kme_quirks"] = list(opts.kme_quirks)
    if lab.tunnel:
        _rekey_rate(result, window)
        result["status"] = status
        result["audit_verified"] = all(audit_verified(lab, site) for site in ("a", "b"))
        checks = result.get("checks")
        if isinstance(checks, dict):
            checks["audit_verified"] = result["audit_verified"]
            result["ok"] = all(checks.values())
    return result


def _rekey_rate(result: dict[str, object], window: float) -> None:
    """Add ``rekey_window_s``, ``rekeys_per_interval`` and, for windows of REKEY_RATE_MIN_WINDOW
    seconds or more, the check ``rekeys_at_rate``: the master's rekeys (ratchet steps and full
    handshakes, one QKD key each) per ``rekey.interval`` within REKEY_RATE_TOLERANCE of 1."""
    rekeys = _counter(result, "rekeys_qkd") + _counter(result, "rekeys_kem")
    per_interval = rekeys * setup.LAB_REKEY["interval"] / max(window, 1e-3)
    result["rekey_window_s"] = round(window, 2)
    result["rekeys_per_interval"] = round(per_interval, 3)
    checks = result.get("checks")
    if window >= REKEY_RATE_MIN_WINDOW and isinstance(checks, dict):
        checks["rekeys_at_rate"] = abs(per_interval - 1.0) <= REKEY_RATE_TOLERANCE
        result["ok"] = all(checks.values())


def gateway_status(lab: Lab, site: str) -> dict[str, object]:
    """Return ``qgate status --json`` of ``site``'s running gateway (an error object if it fails)."""
    argv = [
        sys.executable,
        "-m",
        "qgate",
        "status",
        "--socket",
        str(lab.run_dir / f"control-{site}.sock"),
        "--json",
    ]
    done = lab.run(f"g{site}", argv, timeout=10)
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": done.stderr.strip()[-300:]}
    return answer if isinstance(answer, dict) else {"ok": False, "error": "not a JSON object"}


def audit_verified(lab: Lab, site: str) -> bool:
    """Whether ``qgate audit verify`` passes on ``site``'s audit log (after the gateway stopped)."""
    path = lab.run_dir / f"audit-{site}.jsonl"
    if not path.exists():
        return False
    argv = [sys.executable, "-m", "qgate", "audit", "verify", str(path), "--json"]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30).returncode == 0


def _classifier() -> Callable[[bytes], str | None]:
    from qgate.protocol.wire import classify_datagram

    return classify_datagram


def summarise(
    lab: Lab,
    traffic: Traffic,
    report: WanReport,
    before: dict[str, dict[str, object]],
    final: dict[str, dict[str, object]],
    *,
    waited: float,
    dropped: int | None,
) -> dict[str, object]:
    """Build the result mapping (JSON-ready) and its acceptance checks.

    Keys: ``ping_loss_pct``, ``tcp_bytes_sent``, ``tcp_bytes_received``, ``sha256_match``,
    ``rekeys_qkd`` and ``rekeys_kem`` (master's counters during the transfer), ``wan_datagrams``,
    ``wan_plaintext_hits``, and detail (``wan_kinds``, ``wan_unparsed``, gateway drop counters
    in total and during the traffic, ``checks`` and ``ok``).
    """
    master, start = final.get("a", {}), before.get("a", {})
    result: dict[str, object] = {
        "run_id": lab.topo.run_id,
        "mode": "qgate" if lab.tunnel else "baseline",
        "tunnel_wait_s": waited,
        "ping_loss_pct": traffic.ping.loss_pct,
        "ping_rtt_p50_ms": traffic.ping.percentile_ms(50),
        "tcp_bytes_sent": traffic.sent.get("bytes"),
        "tcp_bytes_received": traffic.received.get("bytes"),
        "tcp_seconds": traffic.sent.get("seconds"),
        "sha256_match": traffic.sent.get("sha256") is not None
        and traffic.sent.get("sha256") == traffic.received.get("sha256"),
        "rekeys_qkd": _counter(master, "rekeys_qkd") - _counter(start, "rekeys_qkd") if lab.tunnel else 0,
        "rekeys_kem": _counter(master, "rekeys_kem") - _counter(start, "rekeys_kem") if lab.tunnel else 0,
        "rekeys_qkd_total": _counter(master, "rekeys_qkd"),
        "rekeys_kem_total": _counter(master, "rekeys_kem"),
        "wan_frames": report.frames,
        "wan_datagrams": report.datagrams,
        "wan_kinds": dict(report.kinds),
        "wan_unparsed": report.unparsed,
        "wan_other_packets": report.other_packets,
        "wan_ip_fragments": report.ip_fragments,
        "wan_plaintext_hits": report.plaintext_hits,
        "pcap_dropped_by_kernel": dropped,
        "gateway_drops": {s: _drops(st) for s, st in final.items()},
        "gateway_drops_during_traffic": {
            s: {k: v - _drops(before.get(s, {})).get(k, 0) for k, v in _drops(st).items()}
            for s, st in final.items()
        },
        "gateway_exit_status": {s: st.get("exit_status") for s, st in final.items()},
    }
    checks = _checks(result, tunnel=lab.tunnel)
    result["checks"] = checks
    result["ok"] = all(checks.values())
    return result


def _checks(r: dict[str, object], *, tunnel: bool) -> dict[str, bool]:
    checks = {
        "ping_no_loss": r["ping_loss_pct"] == 0,
        "sha256_match": r["sha256_match"] is True,
        "transfer_complete": r["tcp_bytes_received"] == r["tcp_bytes_sent"],
    }
    if tunnel:
        checks.update(
            rekeys_qkd_ge_3=int(str(r["rekeys_qkd"])) >= 3,
            rekeys_kem_ge_1=int(str(r["rekeys_kem"])) >= 1,
            wan_all_qgate=r["wan_unparsed"] == 0 and int(str(r["wan_datagrams"])) > 0,
            wan_no_plaintext=r["wan_plaintext_hits"] == 0,
            no_ip_fragments=r["wan_ip_fragments"] == 0,
        )
    else:
        checks["baseline_plaintext_seen"] = int(str(r["wan_plaintext_hits"])) > 0
    return checks


def lab_down(run_id: str) -> list[str]:
    """Tear down a kept lab run: kill its processes, delete its namespaces and run directory.

    Kills the children recorded in ``<run dir>/kept-pids`` (only when their command line
    still names the run dir, so a reused pid is never hit) and every process left in the
    run's namespaces.

    Returns:
        Problems met (empty when all went).

    Raises:
        LabError: ``run_id`` is not 6 hex characters, or no namespace or run dir of it exists.
    """
    if not net.RUN_ID_RE.match(run_id):
        raise LabError(f"run id {run_id!r} is not 6 lowercase hex characters")
    topo, run_dir = net.Topology(run_id), run_dir_of(run_id)
    if not run_dir.is_dir() and not any(net.namespace_exists(ns) for ns in topo.namespaces):
        raise LabError(f"no lab run {run_id} found (no namespaces qg{run_id}*, no {run_dir})")
    killed = kill_kept(run_dir)
    if killed:
        log.info("killed %d kept process(es) of lab %s", killed, run_id)
    problems = net.destroy_topology(topo)
    if run_dir.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
    return problems


def kill_kept(run_dir: Path) -> int:
    """SIGKILL the processes in ``run_dir``/kept-pids still running from ``run_dir``; return how many."""
    try:
        lines = (run_dir / KEPT_PIDS_FILE).read_text().splitlines()
    except OSError:
        return 0
    count = 0
    for line in lines:
        word = line.split(" ", 1)[0]
        if not word.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{word}/cmdline").read_bytes()
            if str(run_dir).encode() in cmdline:
                os.kill(int(word), signal.SIGKILL)
                count += 1
        except (OSError, ProcessLookupError):
            continue
    return count


def format_summary(result: dict[str, object]) -> str:
    """Return a human summary of a result (for stderr), one item per line."""
    verdict = "OK" if result.get("ok") else "FAILED"
    lines = [f"qgate lab run {result.get('run_id')} ({result.get('mode')}): {verdict}"]
    skip = {"checks", "run_id", "mode", "ok", "status"}
    lines += [f"  {k:24} {v}" for k, v in result.items() if k not in skip]
    checks = result.get("checks")
    if isinstance(checks, dict):
        lines += [f"  check {k:18} {'pass' if v else 'FAIL'}" for k, v in checks.items()]
    status = result.get("status")
    for site in status if isinstance(status, list) else []:
        if isinstance(site, dict) and "peers" in site:  # ``qgate status`` of each gateway at the end
            lines += ["  " + line for line in format_status(site).splitlines()]
    return "\n".join(lines)
