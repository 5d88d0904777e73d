"""Append-only, hash-chained audit log of key events (handshakes, rekeys, QKD key_IDs, mode changes).

File format (format 1): UTF-8 text that is in fact pure ASCII, one JSON object per line, each line ended
by ``\\n``. Line N holds the record with ``"seq": N`` (so the sequence number is the line number). A
record's keys, in this order::

    seq      int, 1 for the first line, +1 per line
    time     str, RFC 3339 UTC with microseconds: "2025-01-31T12:00:00.123456Z" (wall clock when the
             record was appended; may step back when the clock is set, so it is not checked for order)
    event    str, the event kind ("handshake_complete", "ratchet_complete", "mode_change", ...)
    gateway  str, the name of the gateway that wrote the record
    ...      the event's fields, names sorted: str, int, float (finite) or bool values only
    prev     str, 64 hex: SHA-256 of the previous line's bytes (without its "\\n"); 64 zeros on line 1
    hash     str, 64 hex: SHA-256 of the canonical JSON of the record without "hash" (keys sorted,
             separators "," and ":", non-ASCII escaped as \\uXXXX)

The line itself is the JSON of the record in exactly that key order, with the same separators and
escaping (``render_line``), so any byte change to a line is either a broken form or a hash mismatch on
that very line. Line 1 is an ``audit_start`` record with ``"format": 1`` and a random ``"nonce"``
(16 bytes, hex) so that two files never share a chain; a file begun by rotation adds
``"prev_file_head"``: the head (``SEQ:SHA256``) of the file before it. An ``audit_overflow`` record
with ``"dropped": N`` stands where N records were lost to a full queue (see Writing). A record never
holds key bytes: fields whose name contains "key", "secret", "psk" or "password" (other than
``key_id``/``key_ids``) and values of any other type (bytes, ``Secret``, None, containers, NaN) are
dropped before writing; the record then lists the dropped names in ``"redacted"`` and a warning is
logged (names only, never values).

What the chain proves: editing, deleting, inserting or reordering lines, or cutting the last line,
breaks the chain at the first affected line (``verify_lines``). A hash chain has no secret, so someone
who can rewrite the file can drop or rewrite the *tail* (every line from the edit to the end) and
recompute it. Anchoring the head elsewhere closes that gap: ``AuditLog`` logs its head (``SEQ:SHA256``
of the last line) at open, at each rotation and at close through ``logging`` (syslog / journal / a
remote collector), and ``verify_lines(..., anchors={seq: sha256})`` / ``qgate audit verify --anchor
SEQ:SHA256`` check that the file still holds that exact line. No HMAC key is used on purpose: a key on
the gateway would sit next to the file it protects.

Writing: ``append`` runs on the gateway's event loop, where a GOOSE message has a budget of well under
a millisecond and an fsync costs from about 0.1 ms to tens of ms; so it only checks the fields, takes
the time and puts the record on a bounded queue (``QUEUE_SIZE``, 4096 records). One writer thread,
started by ``start`` (after the privilege drop, which needs a single-threaded process; records
appended before wait in the queue), chains the records in queue order, writes up to
``BATCH_RECORDS`` of them with one ``write(2)`` on an ``O_APPEND`` descriptor and fsyncs at most
every ``fsync_interval`` seconds (1 s), or after every batch when ``fsync_interval`` is 0 (strict).
When the queue is full the record is dropped and counted (``AuditLog.dropped``), and the writer puts
an ``audit_overflow`` record with the number lost before the next record it writes (or last, at
``close``): the chain stays valid and shows the gap.

Durability: a crash of the process loses the records still queued (normally none: the writer takes
them within microseconds; at most the queue); a power cut also loses those written in the last
``fsync_interval``. ``close`` writes what is queued, fsyncs and closes; ``flush`` waits until
everything appended so far is on disk.

Rotation: once the file reaches ``max_bytes`` (default 64 MiB; a file ends at most one batch past it)
the writer fsyncs it, renames ``path.(keep-1)`` to ``path.keep``, ..., ``path`` to ``path.1`` (at most
``keep`` old files, default 4; higher numbers are left alone), and starts a new ``path`` whose
``audit_start`` carries the old head as ``prev_file_head``. ``verify_series(log_series(path))`` /
``qgate audit verify --rotated`` check every file and each link. A rotation that cannot be done (the
directory not writable after the privilege drop) is logged and the file keeps growing.
"""

from __future__ import annotations

import contextlib
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
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple

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
OVERFLOW_EVENT: Final = "audit_overflow"
QUEUE_SIZE: Final = 4096  # records waiting for the writer thread at most; more are dropped and counted
BATCH_RECORDS: Final = 256  # records written with one write(2) at most
DEFAULT_MAX_BYTES: Final = 64 << 20  # bytes of a file before it is rotated
DEFAULT_KEEP: Final = 4  # rotated files kept: path.1 (newest) to path.4
WRITER_THREAD: Final = "qgate-audit-writer"

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


def rotated_path(path: Path, number: int) -> Path:
    """Return the name of ``path``'s rotated file ``number`` (``path.1`` is the newest, 1-based)."""
    return path.with_name(f"{path.name}.{number}")


def log_series(path: Path) -> list[Path]:
    """Return ``path``'s rotated files that exist, oldest first, then ``path``: path.N, ..., path.1, path.

    The numbers are counted up from 1 and stop at the first missing one.
    """
    older: list[Path] = []
    while rotated_path(path, len(older) + 1).exists():
        older.append(rotated_path(path, len(older) + 1))
    return [*reversed(older), path]


def series_gaps(path: Path) -> list[Path]:
    """Return rotated files of ``path`` that ``log_series`` skips: ``path.N`` beyond a missing number.

    Such a file means one in the middle of the series was deleted (or renamed): the chain of files
    then has a hole that the links between the remaining files cannot show.
    """
    found = len(log_series(path)) - 1
    numbers = []
    for other in path.parent.glob(path.name + ".*"):
        suffix = other.name[len(path.name) + 1 :]
        if suffix.isdigit() and int(suffix) > found:
            numbers.append(int(suffix))
    return [rotated_path(path, n) for n in sorted(numbers)]


def verify_series(paths: Sequence[Path], *, anchors: Mapping[int, str] | None = None) -> list[VerifyResult]:
    """Check files written one after another by rotation: each on its own, and the links between them.

    Every file after the first must start with an ``audit_start`` whose ``prev_file_head`` is the
    head of the file before it (the first file may name a head of a file rotated away).

    Args:
        paths: the files, oldest first (``log_series``).
        anchors: heads for the last file (anchors of older files: check those files one by one).

    Returns:
        One ``VerifyResult`` per file, in order; a broken link fails the newer file at line 1.

    Raises:
        ConfigError: a file cannot be opened or read.
    """
    results: list[VerifyResult] = []
    for number, path in enumerate(paths):
        result = verify_file(path, anchors=anchors if number == len(paths) - 1 else None)
        if number and result.ok and results[-1].ok:
            problem = _link_problem(path, paths[number - 1], results[-1].head)
            if problem is not None:
                result = VerifyResult(False, 0, line=1, problem=problem, head=result.head)
        results.append(result)
    return results


def _link_problem(path: Path, older: Path, older_head: str | None) -> str | None:
    try:
        with path.open("rb") as handle:
            first = parse_line(handle.readline())
    except OSError as exc:
        raise ConfigError(f"audit log {path}: cannot read: {exc.strerror or exc}") from exc
    named = first.get("prev_file_head") if isinstance(first, dict) else None
    if named is None:
        return f"its {START_EVENT!r} names no previous file head, yet {older.name} comes before it"
    if named != older_head:
        return (
            f"'prev_file_head' {named} is not the head of {older.name} ({older_head}):"
            " the older file was cut, edited or replaced"
        )
    return None


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


class _Pending(NamedTuple):
    """A record waiting for the writer: what ``append`` took (seq, prev and hash come at writing)."""

    event: str
    time_ns: int
    fields: Record
    lost_before: int  # records dropped between the previous accepted record and this one


def _build_line(seq: int, prev: str, gateway: str, item: _Pending) -> bytes:
    rec: Record = {"seq": seq, "time": rfc3339_utc(item.time_ns), "event": item.event, "gateway": gateway}
    rec.update(item.fields)
    rec["prev"] = prev
    rec["hash"] = record_hash(rec)
    return render_line(rec)


class AuditLog:
    """A hash-chained audit log file written by one thread of its own; ``append`` is cheap and thread-safe.

    Build it with ``AuditLog.open``; ``start`` the writer thread (after a privilege drop: no thread
    runs before), ``append`` records, ``close`` at the end (or use ``with``).
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
        rng: Callable[[int], bytes],
        max_bytes: int | None,
        keep: int,
        queue_size: int,
    ) -> None:
        """Wrap an open, locked descriptor; use ``AuditLog.open`` instead."""
        self.path = path
        self.gateway = gateway
        self._clock, self._rng = clock, rng
        self._fsync_interval, self._max_bytes, self._keep = fsync_interval, max_bytes, keep
        # Callers' side, under _lock: the queue and its counters.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits for records, a flush or close
        self._idle = threading.Condition(self._lock)  # flush waits for the writer
        self._queue: deque[_Pending] = deque()
        self._limit = queue_size
        self._accepted = 0  # records queued since open
        self._synced = 0  # of those, written and fsynced
        self._sync_target = 0  # a flush waits until _synced reaches this
        self._lost = 0  # dropped since the last accepted record (its audit_overflow record tells)
        self._dropped = 0  # dropped since open
        self._closed = False
        self._failed: str | None = None
        self._writer: threading.Thread | None = None
        # Writer's side, under _io_lock (the writer thread; the caller only before start and after join).
        self._io_lock = threading.Lock()
        self._fd: int | None = fd
        self._chain = chain  # replaced, never mutated: ``head`` reads it without a lock
        self._size = os.fstat(fd).st_size
        self._dirty = False
        self._sync_due = 0.0

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        gateway: str,
        fsync_interval: float = 1.0,
        clock: Callable[[], int] = time.time_ns,
        rng: Callable[[int], bytes] = os.urandom,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        queue_size: int = QUEUE_SIZE,
    ) -> AuditLog:
        """Open (or create) an audit log for appending, resuming its chain; start no thread.

        A new or empty file gets mode 0600 and an ``audit_start`` record (written here, on the
        caller's thread). An existing file must end with a valid record correctly chained to the
        line before it (the whole file is not re-read: that is ``qgate audit verify``'s job). The
        file is locked (``flock``) so that two writers can never fork the chain.

        Args:
            path: the log file.
            gateway: this gateway's name, written into every record.
            fsync_interval: seconds between fsyncs of new records (> 0), or 0 to fsync every batch.
            clock: wall clock, nanoseconds since the Unix epoch (tests pass a fake); called by
                ``append`` on the caller's thread.
            rng: randomness source for the ``audit_start`` nonce (``NONCE_SIZE`` bytes).
            max_bytes: size in bytes past which the file is rotated (>= 1), or None: never.
            keep: rotated files kept (``path.1`` newest to ``path.<keep>``; >= 0).
            queue_size: records waiting for the writer at most (>= 1); more are dropped and counted.

        Raises:
            ConfigError: a setting is out of range, or the file cannot be opened, is not a regular
                file, is locked by another writer, or its last line is broken or not chained (the
                message names the line).
        """
        _check_settings(path, fsync_interval, max_bytes, keep, queue_size)
        fd = _open_locked(path)
        try:
            chain = _resume_state(fd, path)
            self = cls(
                path, fd, chain or _Chain(), gateway=gateway, fsync_interval=fsync_interval, clock=clock,
                rng=rng, max_bytes=max_bytes, keep=keep, queue_size=queue_size,
            )  # fmt: skip
            if chain is None:
                with self._io_lock:
                    self._write_batch([self._start_record(None)])
        except BaseException:
            os.close(fd)
            raise
        log.info("audit log %s open; head %s", path, self.head)
        return self

    def start(self) -> None:
        """Start the writer thread; records appended before it wait in the queue. Idempotent.

        Call it after ``drop_privileges`` (which refuses to run beside other threads): the thread
        then has the reduced credentials. Does nothing once the log is closed.
        """
        with self._lock:
            if self._writer is not None or self._closed:
                return
            self._writer = threading.Thread(target=self._run, name=WRITER_THREAD, daemon=True)
            self._writer.start()

    @property
    def head(self) -> str:
        """``SEQ:SHA256`` of the last line written: an anchor to log elsewhere and check later."""
        chain = self._chain
        return f"{chain.seq}:{chain.digest}"

    @property
    def records(self) -> int:
        """The number of records written to the current file (its last seq)."""
        return self._chain.seq

    @property
    def dropped(self) -> int:
        """Records appended but never written: dropped on a full queue, or queued when writing failed."""
        with self._lock:
            return self._dropped

    def append(self, event: str, /, **fields: object) -> bool:
        """Queue one record for the writer thread; no file I/O and no hashing on the caller's thread.

        The record's time is taken here; its seq, prev and hash when the writer writes it, in queue
        order. Fields that may hold key material (see ``is_secret_name``), reserved names (seq, time,
        event, gateway, prev, hash, redacted) and values that are not str, int, finite float or bool
        are dropped; the record then names them in ``"redacted"`` and a warning is logged (names
        only). On a full queue the record is dropped and counted (``dropped``); the next record
        written is preceded by an ``audit_overflow`` record with the number lost.

        Args:
            event: the event kind, lower-case ("handshake_complete", "policy_reload", ...).
            **fields: the event's details (``peer``, ``epoch``, ``key_ids`` as a comma-joined str, ...).

        Returns:
            True when the record was queued, False when it was dropped (queue full).

        Raises:
            ConfigError: writing or syncing failed earlier (disk full, I/O error): the log stays
                unusable after a failure since its tail is then unknown.
            ValueError: ``event`` is not a lower-case name or is one the log writes itself
                (``audit_start``, ``audit_overflow``: a caller bug), or the log is closed.
        """
        if not isinstance(event, str) or not _EVENT.fullmatch(event):
            raise ValueError(f"audit event name {event!r} is not a lower-case name")
        if event in (START_EVENT, OVERFLOW_EVENT):
            raise ValueError(f"{event!r} records are written by AuditLog itself")
        kept, dropped = _clean_fields(fields)
        if dropped:
            log.warning("audit %s: dropped field(s) %s (key material or unsupported value)", event, dropped)
            kept["redacted"] = ",".join(dropped)
        stamp = self._clock()
        with self._lock:
            if self._closed:
                raise ValueError(f"audit log {self.path} is closed")
            if self._failed is not None:
                raise ConfigError(f"unusable after an earlier failure: {self._failed}")
            if len(self._queue) < self._limit:
                self._queue.append(_Pending(event, stamp, kept, self._lost))
                self._lost, self._accepted = 0, self._accepted + 1
                if len(self._queue) == 1:
                    self._work.notify()
                return True
            self._lost, self._dropped = self._lost + 1, self._dropped + 1
            first = self._lost == 1
        if first:  # once per run of drops; the count is in ``dropped`` and in the file
            log.warning("audit log %s: %d records wait for the disk; dropping (and counting) new ones",
                        self.path, self._limit)  # fmt: skip
        return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record appended before this call is written and fsynced.

        Blocks the caller (tests, tools, shutdown; not the event loop). Before ``start`` the records
        are written on the calling thread.

        Returns:
            True when they are on disk; False on timeout, or when the log failed or is closed.
        """
        with self._lock:
            target = self._accepted
            if self._closed or self._failed is not None:
                return False
            if self._writer is not None:
                self._sync_target = max(self._sync_target, target)
                self._work.notify()
                done = self._idle.wait_for(lambda: self._synced >= target or bool(self._failed), timeout)
                return done and self._failed is None
        while self._step(wait=False):
            pass
        with self._lock:
            return self._synced >= target and self._failed is None

    # ----- the writer --------------------------------------------------------------------
    def _run(self) -> None:
        while self._step(wait=True):
            pass

    def _step(self, *, wait: bool) -> bool:
        """Take up to BATCH_RECORDS queued records (first waiting for work if ``wait``), write, fsync.

        Returns:
            Whether to go on: False once closed and drained (``wait``), drained (not ``wait``), or
            after a failure.
        """
        with self._io_lock:
            with self._lock:
                if wait:
                    while not (self._queue or self._closed or self._sync_target > self._synced):
                        if not self._work.wait(self._wait_time()):
                            break  # a periodic fsync is due
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), BATCH_RECORDS))]
                done = self._accepted - len(self._queue)
                more = bool(self._queue) or (wait and not self._closed)
                force = self._sync_target > self._synced or not more
            try:
                self._write_batch(batch)
                synced = self._settle(force=force)
            except ConfigError as exc:
                self._fail(exc, len(batch))
                return False
        with self._lock:
            if synced:
                self._synced = done
            self._idle.notify_all()
        return more

    def _wait_time(self) -> float | None:
        """Seconds until unsynced records are due for fsync, or None (nothing to sync)."""
        return max(0.0, self._sync_due - time.monotonic()) if self._dirty else None

    def _write_batch(self, batch: list[_Pending], base: _Chain | None = None) -> None:
        """Chain and write ``batch`` (each lost run first told by an audit_overflow record) in one write(2).

        Rotates the file afterwards when it has reached ``max_bytes``.

        Raises:
            ConfigError: the write failed.
        """
        if not batch:
            return
        chain = base if base is not None else self._chain
        seq, digest, out = chain.seq, chain.digest, []
        for item in batch:
            if item.lost_before:  # the gap first, so the file shows it where it happened
                seq += 1
                gap = _Pending(OVERFLOW_EVENT, item.time_ns, {"dropped": item.lost_before}, 0)
                out.append(_build_line(seq, digest, self.gateway, gap) + b"\n")
                digest = line_digest(out[-1])
            seq += 1
            out.append(_build_line(seq, digest, self.gateway, item) + b"\n")
            digest = line_digest(out[-1])
        data = b"".join(out)
        assert self._fd is not None
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            raise ConfigError(
                f"audit log {self.path}: cannot write record(s) {chain.seq + 1}-{seq}: {exc.strerror or exc}"
            ) from exc
        self._chain = _Chain(seq, digest)
        self._size += len(data)
        if not self._dirty:
            self._dirty, self._sync_due = True, time.monotonic() + self._fsync_interval
        if self._max_bytes is not None and self._size >= self._max_bytes and seq > 1:
            self._rotate()  # (never a file holding its audit_start only: no endless rotation)

    def _settle(self, *, force: bool) -> bool:
        """Fsync when forced, strict (interval 0) or due; return whether all written records are on disk.

        Raises:
            ConfigError: fsync failed.
        """
        if not self._dirty:
            return True
        if not (force or self._fsync_interval == 0 or time.monotonic() >= self._sync_due):
            return False
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise ConfigError(f"audit log {self.path}: fsync: {exc.strerror or exc}") from exc
        self._dirty = False
        return True

    def _start_record(self, prev_file_head: str | None) -> _Pending:
        fields: Record = {"format": FORMAT_VERSION, "nonce": self._rng(NONCE_SIZE).hex()}
        if prev_file_head is not None:
            fields["prev_file_head"] = prev_file_head
        return _Pending(START_EVENT, self._clock(), fields, 0)

    def _rotate(self) -> None:
        """Move the file to path.1 (path.1 to path.2, ...) and go on in a new file that names its head.

        A rotation that cannot be done (e.g. the directory is not writable after a privilege drop)
        is logged once and the file keeps growing.

        Raises:
            ConfigError: the fsync of the old file or the write of the new audit_start failed.
        """
        self._settle(force=True)
        head, fresh = self.head, self.path.with_name(self.path.name + ".new")
        try:
            fd = _open_locked(fresh)
            try:
                if os.fstat(fd).st_size:
                    raise ConfigError(f"{fresh} is not empty")
                _shift(self.path, fresh, self._keep)
            except BaseException:
                os.close(fd)
                raise
        except (ConfigError, OSError) as exc:
            self._max_bytes = None
            log.error("audit log %s: cannot rotate (%s); it keeps growing", self.path, exc)
            return
        assert self._fd is not None
        os.close(self._fd)
        self._fd, self._size = fd, 0
        self._write_batch([self._start_record(head)], base=_Chain())
        where = rotated_path(self.path, 1) if self._keep else "deleted, keep 0"
        log.info("audit log %s rotated: the previous file (%s) ends at head %s", self.path, where, head)

    def _fail(self, exc: ConfigError, lost: int) -> None:
        with self._lock:
            self._failed = str(exc)
            lost += len(self._queue) + self._lost
            self._dropped += lost
            self._queue.clear()
            self._lost = 0
            self._idle.notify_all()
        log.error("%s; the audit log is unusable from now on (%d queued record(s) lost)", exc, lost)

    def close(self) -> None:
        """Write what is queued, fsync, unlock and close the file, and log its head as an anchor.

        Records dropped since the last written one are told by a final ``audit_overflow`` record.
        Waits for the writer thread. Idempotent. Raises nothing: failures are logged as errors.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
            self._work.notify_all()
        if writer is not None:
            writer.join()
        while self._failed is None and self._step(wait=False):
            pass
        with self._io_lock:
            self._close_file()

    def _close_file(self) -> None:
        with self._lock:
            lost, self._lost = self._lost, 0
            failed = self._failed is not None
        if self._fd is None:
            return
        if lost and not failed:
            try:
                self._write_batch([_Pending(OVERFLOW_EVENT, self._clock(), {"dropped": lost}, 0)])
            except ConfigError as exc:
                log.error("%s", exc)
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            os.fsync(fd)
        except OSError as exc:
            log.error("audit log %s: final fsync failed: %s", self.path, exc.strerror or exc)
        os.close(fd)  # also releases the flock
        head = self.head
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


def _check_settings(
    path: Path, fsync_interval: float, max_bytes: int | None, keep: int, queue_size: int
) -> None:
    if fsync_interval < 0 or not math.isfinite(fsync_interval):
        raise ConfigError(f"audit log {path}: fsync interval {fsync_interval} s is not >= 0")
    if max_bytes is not None and max_bytes < 1:
        raise ConfigError(f"audit log {path}: size budget {max_bytes} bytes is not >= 1")
    if keep < 0:
        raise ConfigError(f"audit log {path}: {keep} rotated files to keep is not >= 0")
    if queue_size < 1:
        raise ConfigError(f"audit log {path}: queue of {queue_size} records is not >= 1")


def _shift(path: Path, fresh: Path, keep: int) -> None:
    """Rename path.(keep-1) to path.keep, ..., path to path.1, then ``fresh`` to path; sync the directory.

    With ``keep`` 0 the old file is replaced (deleted). Files numbered above ``keep`` are left alone.
    """
    if keep:
        for number in range(keep - 1, 0, -1):
            older = rotated_path(path, number)
            if older.exists():
                os.replace(older, rotated_path(path, number + 1))
        os.replace(path, rotated_path(path, 1))
    os.replace(fresh, path)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)  # the renames survive a power cut
        finally:
            os.close(dir_fd)
