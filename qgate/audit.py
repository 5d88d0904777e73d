"""Append-only, hash-chained audit log of key events (handshakes, rekeys, QKD key_IDs, mode changes).

File format (format 1): UTF-8 text that is in fact pure ASCII, one JSON object per line, each line ended
by ``\\n``. Line N holds the record with ``"seq": N`` (so the sequence number is the line number). A
record's keys, in this order::

    seq      int, 1 for the first line, +1 per line
    time     str, RFC 3339 UTC with microseconds: "2025-01-31T12:00:00.123456Z" (wall clock; may step
             back when the clock is set, so it is not checked for order)
    event    str, the event kind ("handshake_complete", "ratchet_complete", "mode_change", ...)
    gateway  str, the name of the gateway that wrote the record
    ...      the event's fields, names sorted: str, int, float (finite) or bool values only
    prev     str, 64 hex: SHA-256 of the previous line's bytes (without its "\\n"); 64 zeros on line 1
    hash     str, 64 hex: SHA-256 of the canonical JSON of the record without "hash" (keys sorted,
             separators "," and ":", non-ASCII escaped as \\uXXXX)

The line itself is the JSON of the record in exactly that key order, with the same separators and
escaping (``render_line``), so any byte change to a line is either a broken form or a hash mismatch on
that very line. Line 1 is an ``audit_start`` record with ``"format": 1`` and a random ``"nonce"``
(16 bytes, hex) so that two files never share a chain. A record never holds key bytes: fields whose
name contains "key", "secret", "psk" or "password" (other than ``key_id``/``key_ids``) and values of
any other type (bytes, ``Secret``, None, containers, NaN) are dropped before writing; the record then
lists the dropped names in ``"redacted"`` and a warning is logged (names only, never values).

What the chain proves: editing, deleting, inserting or reordering lines, or cutting the last line,
breaks the chain at the first affected line (``verify_lines``). A hash chain has no secret, so someone
who can rewrite the file can drop or rewrite the *tail* (every line from the edit to the end) and
recompute it. Anchoring the head elsewhere closes that gap: ``AuditLog`` logs its head (``SEQ:SHA256``
of the last line) at open and close through ``logging`` (syslog / journal / a remote collector), and
``verify_lines(..., anchors={seq: sha256})`` / ``qgate audit verify --anchor SEQ:SHA256`` check that the
file still holds that exact line. No HMAC key is used on purpose: a key on the gateway would sit next to
the file it protects.

Durability: each record is handed to the kernel with one ``write(2)`` on an ``O_APPEND`` descriptor as
soon as it is appended, so a crash of the process loses nothing. ``fsync`` (survives power loss) costs
from about 0.1 ms to tens of ms, and ``append`` runs on the gateway's event loop where a GOOSE message
has a budget of well under a millisecond; so by default a background thread fsyncs at most every
``fsync_interval`` seconds (1 s: a power cut loses at most the last second of records), plus on
``close``. ``fsync_interval=0`` fsyncs every record inside ``append`` (strict sites, slow disks beware).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final

from qgate.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
GENESIS_PREV: Final = "0" * 64
START_EVENT: Final = "audit_start"
NONCE_SIZE: Final = 16  # bytes of randomness in the audit_start record
HEAD_FIELDS: Final = ("seq", "time", "event", "gateway")
TAIL_FIELDS: Final = ("prev", "hash")
RESERVED_FIELDS: Final = frozenset({*HEAD_FIELDS, *TAIL_FIELDS, "redacted"})
ALLOWED_KEY_FIELDS: Final = frozenset({"key_id", "key_ids"})
SECRET_NAME_PARTS: Final = ("key", "secret", "psk", "password")
TAIL_BLOCK: Final = 65536  # bytes read at a time when looking for the last lines of a file

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_EVENT = re.compile(r"[a-z][a-z0-9_.-]{0,63}")

Value = str | int | float | bool
Record = dict[str, Value]


# ----- format -------------------------------------------------------------------------
def is_secret_name(name: str) -> bool:
    """Tell whether a field name may hold key material and must never be written.

    Args:
        name: the field name.

    Returns:
        True when the lower-cased name contains "key", "secret", "psk" or "password", except the
        names ``key_id`` and ``key_ids`` (ETSI GS QKD 014 key_IDs are identifiers, not keys).
    """
    lower = name.lower()
    return lower not in ALLOWED_KEY_FIELDS and any(part in lower for part in SECRET_NAME_PARTS)


def record_hash(record: Mapping[str, Value]) -> str:
    """Return the hex SHA-256 of the canonical JSON of ``record`` without its "hash" field.

    Canonical JSON: keys sorted, separators "," and ":", non-ASCII escaped, no NaN/Infinity.
    """
    body = {k: v for k, v in record.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def render_line(record: Mapping[str, Value]) -> bytes:
    """Return the line bytes of ``record`` (without "\\n"): seq, time, event, gateway, fields, prev, hash.

    Raises:
        ValueError: a float is NaN or infinite (a bug: ``AuditLog.append`` drops those).
    """
    middle = sorted(k for k in record if k not in HEAD_FIELDS and k not in TAIL_FIELDS)
    order = [k for k in HEAD_FIELDS if k in record] + middle + [k for k in TAIL_FIELDS if k in record]
    text = json.dumps(
        {k: record[k] for k in order}, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def line_digest(line: bytes) -> str:
    """Return the hex SHA-256 of a line's bytes without its trailing "\\n" (the next record's "prev")."""
    return hashlib.sha256(line.removesuffix(b"\n")).hexdigest()


def rfc3339_utc(time_ns: int) -> str:
    """Format a wall-clock time (nanoseconds since the Unix epoch) as RFC 3339 UTC with microseconds."""
    seconds, rest = divmod(time_ns, 1_000_000_000)
    return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}.{rest // 1000:06d}Z"


def _check_value(name: str, value: object) -> str | None:
    if not _NAME.fullmatch(name):
        return f"field name {name!r} is not lower-case letters, digits and '_'"
    if is_secret_name(name):
        return f"field {name!r} may hold key material"
    if not isinstance(value, str | int | float) or (isinstance(value, float) and not math.isfinite(value)):
        return f"field {name!r} is not a string or a number"
    return None


def _check_fields(rec: Mapping[str, object]) -> str | None:
    seq, stamp, event, gateway = (rec.get(k) for k in HEAD_FIELDS)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "'seq' is missing or not a positive integer"
    if not isinstance(stamp, str) or not _TIME.fullmatch(stamp):
        return "'time' is missing or not RFC 3339 UTC with microseconds"
    try:
        datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return f"'time' {stamp!r} is not a valid date and time"
    if not isinstance(event, str) or not _EVENT.fullmatch(event):
        return "'event' is missing or not a lower-case event name"
    if not isinstance(gateway, str):
        return "'gateway' is missing or not a string"
    for name in TAIL_FIELDS:
        if not isinstance(rec.get(name), str) or not _HEX64.fullmatch(str(rec[name])):
            return f"{name!r} is missing or not 64 lower-case hex digits"
    for name, value in rec.items():
        if name not in HEAD_FIELDS and name not in TAIL_FIELDS:
            problem = _check_value(name, value)
            if problem is not None:
                return problem
    return None


def parse_line(line: bytes) -> Record | str:
    """Parse and check one line on its own (form, fields, own hash), not its place in the chain.

    Args:
        line: the line's bytes as read from the file, with its trailing "\\n".

    Returns:
        The record, or a one-line description of what is wrong with the line.
    """
    if not line.endswith(b"\n"):
        return "the line has no newline at its end (cut short, or a partial write)"
    body = line[:-1]
    if not body.isascii():
        return "the line holds non-ASCII bytes"
    try:
        rec: object = json.loads(body)
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(rec, dict):
        return "not a JSON object"
    problem = _check_fields(rec)
    if problem is not None:
        return problem
    if render_line(rec) != body:
        return "not in canonical form (spacing, key order, escapes or number format changed)"
    if record_hash(rec) != rec["hash"]:
        return "'hash' does not match the record's content (the record was edited)"
    return rec


# ----- verification -------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyResult:
    """The outcome of checking an audit log.

    Attributes:
        ok: True when every line is valid and chained, and every anchor matched.
        records: the number of records verified (all of them when ok; those before the bad line if not).
        line: the 1-based number of the first bad line, or None (ok, or an anchor past the end).
        problem: what is wrong, one line of text, or None when ok.
        head: ``SEQ:SHA256`` of the last verified line (an anchor for later checks), or None.
    """

    ok: bool
    records: int
    line: int | None = None
    problem: str | None = None
    head: str | None = None

    def as_json(self) -> dict[str, object]:
        """Return the result as plain JSON-able data (what ``qgate audit verify --json`` prints)."""
        return {
            "ok": self.ok,
            "records": self.records,
            "line": self.line,
            "problem": self.problem,
            "head": self.head,
        }


class _Chain:
    """The running state of a chain check: the last good record's seq and line digest."""

    def __init__(self, seq: int = 0, digest: str = GENESIS_PREV) -> None:
        self.seq = seq
        self.digest = digest

    def feed(self, line: bytes) -> str | None:
        """Check the next line; advance on success, return the problem otherwise."""
        rec = parse_line(line)
        if isinstance(rec, str):
            return rec
        seq, want = int(rec["seq"]), self.seq + 1
        if seq > want:
            return f"'seq' is {seq} where {want} was expected: record(s) before this line are missing"
        if seq < want:
            return f"'seq' is {seq} where {want} was expected: a line was inserted, repeated or moved"
        if (rec["event"] == START_EVENT) != (seq == 1):
            return f"{START_EVENT!r} must be the first record and only the first"
        if seq == 1 and rec.get("format") != FORMAT_VERSION:
            return f"unsupported audit log format {rec.get('format')!r} (this qgate reads {FORMAT_VERSION})"
        if rec["prev"] != self.digest:
            what = "the genesis value (64 zeros)" if seq == 1 else f"the SHA-256 of line {seq - 1}"
            return f"'prev' is not {what}: a line before this one was edited, removed or inserted"
        self.seq, self.digest = seq, line_digest(line)
        return None


def verify_lines(lines: Iterable[bytes], *, anchors: Mapping[int, str] | None = None) -> VerifyResult:
    """Check a whole audit log: every line's form and hash, and the chain from line 1 to the end.

    Pure function; reads the lines once, in constant memory.

    Args:
        lines: the file's lines as bytes, each with its "\\n" (as iterating a file opened "rb" yields).
        anchors: optional ``{seq: hex SHA-256}`` heads logged earlier (``AuditLog.head``); each line
            ``seq`` must still have exactly that digest. Closes the "rewritten tail" gap.

    Returns:
        A ``VerifyResult``; ``ok`` False names the first bad line and what is wrong with it. An empty
        input is bad at line 1 (no ``audit_start`` record).
    """
    chain = _Chain()
    wanted = dict(anchors or {})
    for number, line in enumerate(lines, start=1):
        head = f"{chain.seq}:{chain.digest}" if chain.seq else None
        problem = chain.feed(line)
        if problem is None and number in wanted and wanted.pop(number) != chain.digest:
            problem = "does not match its anchor: the line was rewritten after its hash was logged"
        if problem is not None:
            return VerifyResult(False, number - 1, line=number, problem=problem, head=head)
    head = f"{chain.seq}:{chain.digest}" if chain.seq else None
    if chain.seq == 0:
        return VerifyResult(False, 0, line=1, problem=f"the log is empty (no {START_EVENT!r} record)")
    if wanted:
        seq = min(wanted)
        problem = f"anchor {seq}:{wanted[seq][:16]}... is past the end (line {chain.seq}): lines were cut off"
        return VerifyResult(False, chain.seq, line=None, problem=problem, head=head)
    return VerifyResult(True, chain.seq, head=head)


def parse_anchor(text: str) -> tuple[int, str]:
    """Parse an anchor ``SEQ:SHA256`` (as logged by ``AuditLog``) into ``(seq, hex digest)``.

    Raises:
        ConfigError: the text is not a positive integer, ":" and 64 hex digits.
    """
    seq, _, digest = text.strip().partition(":")
    if not seq.isdigit() or int(seq) < 1 or not _HEX64.fullmatch(digest.lower()):
        raise ConfigError(f"anchor {text!r} is not SEQ:SHA256 (a line number, ':', 64 hex digits)")
    return int(seq), digest.lower()


def verify_file(path: Path, *, anchors: Mapping[int, str] | None = None) -> VerifyResult:
    """Check the audit log at ``path`` with ``verify_lines``.

    Raises:
        ConfigError: the file cannot be opened or read.
    """
    try:
        with path.open("rb") as handle:
            return verify_lines(handle, anchors=anchors)
    except OSError as exc:
        raise ConfigError(f"audit log {path}: cannot read: {exc.strerror or exc}") from exc


# ----- writing ------------------------------------------------------------------------
def _read_tail(fd: int, size: int) -> tuple[bytes | None, bytes]:
    """Return the last two lines of a non-empty file (the first None when there is only one)."""
    pos, buf = size, b""
    while True:
        start = max(0, pos - TAIL_BLOCK)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        if pos == 0 or buf[:-1].count(b"\n") >= 2:
            break
    lines = buf.splitlines(keepends=True)
    if pos > 0:
        lines = lines[1:]  # the first piece may start mid-line
    return (lines[-2] if len(lines) >= 2 else None), lines[-1]


def _count_lines(fd: int, size: int) -> int:
    count, pos, last = 0, 0, b"\n"
    while pos < size:
        chunk = os.pread(fd, min(1 << 20, size - pos), pos)
        if not chunk:
            break
        count, pos, last = count + chunk.count(b"\n"), pos + len(chunk), chunk[-1:]
    return count + (last != b"\n")


def _resume_state(fd: int, path: Path) -> _Chain | None:
    """Check the last record (and its link to the one before); return the chain state to continue.

    Returns None for an empty file. Raises ConfigError naming the bad line.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    before, last = _read_tail(fd, size)
    chain = _Chain()
    problem: str | None = None
    if before is not None:
        rec = parse_line(before)
        if isinstance(rec, str):
            problem, offset = rec, 1
        else:
            chain = _Chain(int(rec["seq"]), line_digest(before))
    if problem is None:
        problem, offset = chain.feed(last), 0
    if problem is not None:
        number = _count_lines(fd, size) - offset
        raise ConfigError(
            f"audit log {path}:{number}: {problem}; refusing to append "
            f"(check it with `qgate audit verify {path}`, then move it aside)"
        )
    return chain


class AuditLog:
    """A hash-chained audit log file open for appending; thread-safe.

    Build it with ``AuditLog.open``; ``append`` records, ``close`` at the end (or use ``with``).
    """

    def __init__(
        self,
        path: Path,
        fd: int,
        chain: _Chain,
        *,
        gateway: str,
        fsync_interval: float,
        clock: Callable[[], int],
    ) -> None:
        """Wrap an open, locked descriptor; use ``AuditLog.open`` instead."""
        self.path = path
        self.gateway = gateway
        self._fd: int | None = fd
        self._chain = chain
        self._clock = clock
        self._fsync_interval = fsync_interval
        self._lock = threading.Lock()  # record building, writing, chain state
        self._sync_lock = threading.Lock()  # descriptor lifetime against a concurrent fsync
        self._dirty = False
        self._failed: str | None = None
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        gateway: str,
        fsync_interval: float = 1.0,
        clock: Callable[[], int] = time.time_ns,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> AuditLog:
        """Open (or create) an audit log for appending, resuming its chain.

        A new or empty file gets mode 0600 and an ``audit_start`` record. An existing file must end
        with a valid record correctly chained to the line before it (the whole file is not re-read:
        that is ``qgate audit verify``'s job). The file is locked (``flock``) so that two writers can
        never fork the chain.

        Args:
            path: the log file.
            gateway: this gateway's name, written into every record.
            fsync_interval: seconds between background fsyncs of new records (> 0), or 0 to fsync
                every record inside ``append``.
            clock: wall clock, nanoseconds since the Unix epoch (tests pass a fake).
            rng: randomness source for the ``audit_start`` nonce (``NONCE_SIZE`` bytes).

        Raises:
            ConfigError: the file cannot be opened, is not a regular file, is locked by another
                writer, or its last line is broken or not chained (the message names the line).
        """
        if fsync_interval < 0 or not math.isfinite(fsync_interval):
            raise ConfigError(f"audit log {path}: fsync interval {fsync_interval} s is not >= 0")
        fd = _open_locked(path)
        try:
            chain = _resume_state(fd, path)
            self = cls(
                path, fd, chain or _Chain(), gateway=gateway, fsync_interval=fsync_interval, clock=clock
            )
            if chain is None:
                with self._lock:
                    self._write_locked(
                        START_EVENT, {"format": FORMAT_VERSION, "nonce": rng(NONCE_SIZE).hex()}
                    )
        except BaseException:
            os.close(fd)
            raise
        if fsync_interval > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name="qgate-audit-fsync", daemon=True)
            self._flusher.start()
        log.info("audit log %s open; head %s", path, self.head)
        return self

    @property
    def head(self) -> str:
        """``SEQ:SHA256`` of the last line written: an anchor to log elsewhere and check later."""
        with self._lock:
            return f"{self._chain.seq}:{self._chain.digest}"

    @property
    def records(self) -> int:
        """The number of records in the file (the last seq)."""
        with self._lock:
            return self._chain.seq

    def append(self, event: str, /, **fields: object) -> int:
        """Write one record, chained to the previous one, with one ``write(2)``.

        Fields that may hold key material (see ``is_secret_name``), reserved names (seq, time, event,
        gateway, prev, hash, redacted) and values that are not str, int, finite float or bool are
        dropped; the record then names them in ``"redacted"`` and a warning is logged (names only).

        Args:
            event: the event kind, lower-case ("handshake_complete", "policy_reload", ...).
            **fields: the event's details (``peer``, ``epoch``, ``key_ids`` as a comma-joined str, ...).

        Returns:
            The record's seq (its line number).

        Raises:
            ConfigError: writing or syncing failed (disk full, I/O error), now or earlier: the log
                stays unusable after a failure since its tail is then unknown.
            ValueError: ``event`` is not a lower-case name or is ``audit_start`` (a caller bug), or
                the log is closed.
        """
        if not isinstance(event, str) or not _EVENT.fullmatch(event):
            raise ValueError(f"audit event name {event!r} is not a lower-case name")
        if event == START_EVENT:
            raise ValueError(f"{START_EVENT!r} is written by AuditLog.open only")
        kept, dropped = _clean_fields(fields)
        if dropped:
            log.warning("audit %s: dropped field(s) %s (key material or unsupported value)", event, dropped)
            kept["redacted"] = ",".join(dropped)
        with self._lock:
            return self._write_locked(event, kept)

    def _write_locked(self, event: str, fields: Record) -> int:
        if self._fd is None:
            raise ValueError(f"audit log {self.path} is closed")
        if self._failed is not None:
            raise ConfigError(f"audit log {self.path}: unusable after an earlier failure: {self._failed}")
        seq = self._chain.seq + 1
        rec: Record = {"seq": seq, "time": rfc3339_utc(self._clock()), "event": event}
        rec.update({"gateway": self.gateway, **fields, "prev": self._chain.digest})
        rec["hash"] = record_hash(rec)
        line = render_line(rec)
        try:
            _write_all(self._fd, line + b"\n")
            if self._fsync_interval == 0:
                os.fsync(self._fd)
        except OSError as exc:
            self._failed = f"record {seq}: {exc.strerror or exc}"
            raise ConfigError(f"audit log {self.path}: cannot write {self._failed}") from exc
        self._chain = _Chain(seq, line_digest(line))
        self._dirty = self._fsync_interval > 0
        return seq

    def sync(self) -> None:
        """Fsync records written since the last sync; the background thread calls this.

        Raises:
            ConfigError: fsync failed (the log is unusable from then on).
        """
        with self._sync_lock:
            with self._lock:
                fd, dirty, self._dirty = self._fd, self._dirty, False
            if fd is None or not dirty:
                return
            try:
                os.fsync(fd)
            except OSError as exc:
                with self._lock:
                    self._failed = f"fsync: {exc.strerror or exc}"
                raise ConfigError(f"audit log {self.path}: {self._failed}") from exc

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._fsync_interval):
            try:
                self.sync()
            except ConfigError as exc:
                log.error("%s", exc)
                return

    def close(self) -> None:
        """Fsync, unlock and close the file, and log its head (``SEQ:SHA256``) as an anchor.

        Idempotent. Raises nothing: a failed final fsync is logged as an error.
        """
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        with self._sync_lock, self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                os.fsync(fd)
            except OSError as exc:
                log.error("audit log %s: final fsync failed: %s", self.path, exc.strerror or exc)
            os.close(fd)  # also releases the flock
            head = f"{self._chain.seq}:{self._chain.digest}"
        log.info("audit log %s closed; head %s (check: qgate audit verify %s --anchor %s)",
                 self.path, head, self.path, head)  # fmt: skip

    def __enter__(self) -> AuditLog:
        """Return the log itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the log."""
        self.close()


def _clean_fields(fields: Mapping[str, object]) -> tuple[Record, list[str]]:
    kept: Record = {}
    dropped: list[str] = []
    for name, value in fields.items():
        if name in RESERVED_FIELDS or _check_value(name, value) is not None:
            dropped.append(name)
        else:
            assert isinstance(value, str | int | float)
            kept[name] = value
    return kept, sorted(dropped)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _open_locked(path: Path) -> int:
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ConfigError(f"audit log {path}: cannot open: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"audit log {path}: not a regular file")
        if info.st_mode & 0o077:
            log.warning("audit log %s is readable or writable by group/others (mode %o)", path,
                        stat.S_IMODE(info.st_mode))  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise ConfigError(f"audit log {path}: in use by another writer (locked)") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd
