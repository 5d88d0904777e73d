"""Child processes of a lab run: started in namespaces, logged to files, always stopped.

Every child writes stdout and stderr to ``<run dir>/logs/<name>.log`` (never to the lab's
stdout, which carries only the result). Children get their own session (Ctrl-C reaches only
the lab, which then stops them in order) and ``PR_SET_PDEATHSIG`` = SIGTERM, so they also go
when the lab process dies abruptly, except in ``detach`` mode (``qgate lab run --keep``):
then children outlive the lab, and ``qgate lab down`` ends them.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from qgate.errors import QgateError
from qgate.lab_net import ns_argv

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG: Final = 1
"""prctl option: signal delivered to this process when its parent dies (<linux/prctl.h>)."""
STOP_GRACE: Final = 5.0
"""Seconds a child gets after SIGTERM (or SIGINT) before SIGKILL."""
LOG_TAIL_LINES: Final = 30


class LabError(QgateError):
    """A lab run could not be completed (a child failed, a wait timed out)."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    """One started child process.

    Attributes:
        name: label used in logs and the log file name.
        proc: the process (``ip netns exec`` execs, so this is the program itself).
        log_path: where its stdout/stderr go (None when its stdout is a pipe to the lab).
    """

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the child's log file (empty when none)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Children:
    """The set of children of one lab run; :meth:`stop_all` in a ``finally`` ends them all.

    Args:
        log_dir: directory of the children's log files (created).
        detach: no parent-death signal, so children survive the lab process (``--keep``).
    """

    def __init__(self, log_dir: Path, *, detach: bool = False) -> None:
        self.log_dir = log_dir
        self.detach = detach
        self.items: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, ns: str, argv: list[str], *, pipe_stdout: bool = False) -> Child:
        """Start ``argv`` inside namespace ``ns``.

        Args:
            name: label, also the log file stem.
            ns: network namespace to run in.
            argv: the command.
            pipe_stdout: give the lab a pipe on the child's stdout (stderr still goes to the log).

        Raises:
            LabError: the command could not be started.
        """
        log_path = self.log_dir / f"{name}.log"
        logf: IO[bytes] = log_path.open("ab")
        try:
            proc = subprocess.Popen(
                ns_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdout else logf,
                stderr=logf,
                start_new_session=True,  # own session: Ctrl-C and the terminal's SIGHUP miss them
                preexec_fn=None if self.detach else _die_with_parent,  # lab starts them from one thread
            )
        except OSError as exc:
            raise LabError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        finally:
            logf.close()
        child = Child(name, proc, log_path)
        self.items.append(child)
        log.info("started %s (pid %d) in %s", name, proc.pid, ns)
        return child

    def check_alive(self, child: Child) -> None:
        """Raise LabError (with its log tail) when ``child`` has already exited."""
        code = child.proc.poll()
        if code is not None:
            raise LabError(f"{child.name} exited early with status {code}:\n{child.tail()}")

    def stop(self, child: Child, sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> int | None:
        """Send ``sig``, wait up to ``grace`` seconds, then SIGKILL; return the exit status."""
        proc = child.proc
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.1f s; killing it", child.name, grace)
                proc.kill()
                proc.wait(timeout=grace)
            except ProcessLookupError:
                pass
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def stop_all(self) -> None:
        """Stop every child still running, newest first; never raises."""
        for child in reversed(self.items):
            try:
                self.stop(child)
            except Exception as exc:  # teardown must go on
                log.warning("stopping %s failed: %s", child.name, exc)

    def dump_logs(self, stream: IO[str] = sys.stderr) -> None:
        """Write the tail of every child's log to ``stream`` (stderr), for failure reports."""
        for child in self.items:
            tail = child.tail()
            if tail:
                stream.write(f"----- {child.name} ({child.log_path}) -----\n{tail}\n")


def wait_until(what: str, predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1) -> None:
    """Poll ``predicate()`` until it returns true, at most ``timeout`` seconds.

    Raises:
        LabError: ``timeout`` passed (the message names ``what``).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
