"""Hash-chained audit log: writing, resuming, tamper detection at the right line, the CLI."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from qgate.audit import (
    GENESIS_PREV,
    WRITER_THREAD,
    AuditLog,
    line_digest,
    log_series,
    record_hash,
    render_line,
    rotated_path,
    verify_file,
    verify_lines,
    verify_series,
)
from qgate.cli.audit import audit
from qgate.crypto.secret import Secret
from qgate.errors import ConfigError

T0 = 1_735_689_600_000_000_000  # 2025-01-01T00:00:00Z in ns


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 1_234_567
        return self.now


def _open(path: Path, **kwargs: object) -> AuditLog:
    return AuditLog.open(path, gateway="site-a", fsync_interval=0, clock=FakeClock(), **kwargs)  # type: ignore[arg-type]


def _write_log(path: Path, events: int = 5) -> list[bytes]:
    with _open(path) as log:
        for n in range(events):
            log.append("ratchet_complete", peer="site-b", epoch=n + 2, key_ids=f"id-{n}a,id-{n}b")
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def lines(tmp_path: Path) -> list[bytes]:
    return _write_log(tmp_path / "audit.log")


def _forge(prev_line: bytes, seq: int, **fields: str | int) -> bytes:
    """A well-formed record chained to ``prev_line`` (what someone without a key can make)."""
    rec: dict[str, str | int | float | bool] = {
        "seq": seq,
        "time": "2025-01-01T00:00:09.000000Z",
        "event": "ratchet_complete",
        "gateway": "site-a",
        **fields,
        "prev": line_digest(prev_line),
    }
    rec["hash"] = record_hash(rec)
    return render_line(rec) + b"\n"


# ----- writing ------------------------------------------------------------------------
def test_round_trip_writes_chained_records_that_verify(tmp_path: Path) -> None:
    lines = _write_log(tmp_path / "audit.log", events=3)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert records[0]["event"] == "audit_start" and records[0]["prev"] == GENESIS_PREV
    assert records[0]["format"] == 1 and len(records[0]["nonce"]) == 32
    assert records[2] | {"time": "", "hash": ""} == {
        "seq": 3, "time": "", "event": "ratchet_complete", "gateway": "site-a", "peer": "site-b",
        "epoch": 3, "key_ids": "id-1a,id-1b", "prev": line_digest(lines[1]), "hash": "",
    }  # fmt: skip
    assert records[1]["time"] == "2025-01-01T00:00:00.002469Z"
    result = verify_lines(lines)
    assert result.ok and result.records == 4 and result.line is None
    assert result.head == f"4:{line_digest(lines[-1])}"


def test_new_file_is_private_and_lines_are_the_canonical_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, events=1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert lines[1].startswith(b'{"seq":2,"time":"')
    assert lines[1].index(b'"epoch"') < lines[1].index(b'"prev"') < lines[1].index(b'"hash"')


def test_reopen_resumes_seq_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_log(path, events=2)
    with _open(path) as log:
        assert log.records == 3
        assert log.append("policy_reload", policy="site-a.yaml")
        assert log.flush() and log.records == 4
        head = log.head
    lines = path.read_bytes().splitlines(keepends=True)
    assert sum(b"audit_start" in line for line in lines) == 1
    result = verify_lines(lines)
    assert result.ok and result.records == 4 and result.head == head


def test_reopen_refuses_a_file_whose_last_line_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_log(path, events=3)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=r"audit\.log:4: the line has no newline"):
        _open(path)
    assert path.read_bytes().count(b"\n") == 3  # nothing appended


def test_reopen_refuses_a_last_line_not_chained_to_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path, events=3)
    path.write_bytes(b"".join([*lines[:2], lines[3]]))  # line 3 deleted: the tail skips a seq
    with pytest.raises(ConfigError, match=r"audit\.log:3: 'seq' is 4 where 3 was expected"):
        _open(path)


def test_reopen_refuses_an_edited_last_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_log(path, events=3)
    path.write_bytes(path.read_bytes().replace(b'"epoch":4', b'"epoch":9'))
    with pytest.raises(ConfigError, match=r":4: 'hash' does not match"):
        _open(path)


def test_reopen_finds_the_tail_of_a_file_longer_than_one_read_block(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with _open(path) as log:
        for n in range(300):
            log.append("handshake_complete", peer="site-b", reason="x" * 500, epoch=n)
    assert path.stat().st_size > 3 * 65536
    with _open(path) as log:
        assert log.append("gateway_stop")
    assert verify_file(path).records == 302


def test_second_writer_is_refused_while_the_log_is_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with _open(path), pytest.raises(ConfigError, match="in use by another writer"):
        _open(path)


def test_key_material_fields_are_dropped_and_named_in_redacted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    secret_bytes = bytes(range(32))
    with caplog.at_level(logging.WARNING, logger="qgate.audit"), _open(path) as log:
        log.append(
            "handshake_complete",
            key_ids="id-1",
            key_id="id-2",
            key=secret_bytes.hex(),
            traffic_key=Secret(secret_bytes),
            qkd_secret="00ff",
            epoch=b"\x01\x02",
            seq=99,
        )
    text = path.read_bytes()
    rec = json.loads(text.splitlines()[-1])
    assert rec["key_ids"] == "id-1" and rec["key_id"] == "id-2" and rec["seq"] == 2
    assert rec["redacted"] == "epoch,key,qkd_secret,seq,traffic_key"
    assert secret_bytes.hex().encode() not in text and b"00ff" not in text
    assert "traffic_key" in caplog.text and secret_bytes.hex() not in caplog.text
    assert verify_file(path).ok


def test_reserved_or_malformed_event_names_are_refused(tmp_path: Path) -> None:
    with _open(tmp_path / "audit.log") as log:
        for bad in ("audit_start", "audit_overflow", "", "Handshake", "a b"):
            with pytest.raises(ValueError, match="audit"):
                log.append(bad)


def test_append_after_close_is_refused(tmp_path: Path) -> None:
    log = _open(tmp_path / "audit.log")
    log.close()
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.append("gateway_stop")


def test_close_logs_the_head_as_an_anchor(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="qgate.audit"):
        log = _open(tmp_path / "audit.log")
        log.append("gateway_start")
        log.close()
        head = log.head
    assert f"closed; head {head}" in caplog.text and head.startswith("2:")
    assert head == verify_file(tmp_path / "audit.log").head


def test_concurrent_appends_from_threads_keep_the_chain_valid(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    barrier = threading.Barrier(8)
    with AuditLog.open(path, gateway="site-a", fsync_interval=0.01) as log:
        log.start()

        def worker(n: int) -> None:
            barrier.wait()
            for i in range(100):
                log.append("ratchet_complete", peer=f"peer-{n}", epoch=i)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    result = verify_file(path)
    assert result.ok and result.records == 801, result


def test_background_fsync_runs_and_stops_on_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.set()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = AuditLog.open(tmp_path / "audit.log", gateway="site-a", fsync_interval=0.01)
    log.start()
    log.append("gateway_start")
    assert synced.wait(5)
    log.close()
    assert not any(t.name == WRITER_THREAD for t in threading.enumerate())


# ----- writer thread, overflow, rotation ---------------------------------------------
def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _tasks() -> int:
    """OS threads of this process (what ``drop_privileges`` counts)."""
    return len(os.listdir("/proc/self/task"))


def test_no_thread_runs_until_start_so_a_privilege_drop_can_follow_open(tmp_path: Path) -> None:
    before = _tasks()
    log = AuditLog.open(tmp_path / "audit.log", gateway="site-a")  # the gateway's settings: 1 s fsync
    log.append("gateway_start")
    assert _tasks() == before
    assert not any(t.name == WRITER_THREAD for t in threading.enumerate())
    log.start()
    log.start()  # idempotent: still one writer
    assert sum(t.name == WRITER_THREAD for t in threading.enumerate()) == 1
    log.close()
    assert not any(t.name == WRITER_THREAD for t in threading.enumerate())


def test_records_appended_before_start_wait_and_are_written_after_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog.open(path, gateway="site-a", fsync_interval=0.01, clock=FakeClock())
    for n in range(3):
        assert log.append("handshake_complete", peer="site-b", epoch=n)
    assert path.read_bytes().count(b"\n") == 1  # only audit_start: nothing written on this thread
    log.start()
    assert log.flush(timeout=5)
    assert [r["epoch"] for r in _records(path)[1:]] == [0, 1, 2]
    assert log.records == 4 and verify_file(path).ok
    log.close()


def test_append_never_waits_for_a_stuck_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    entered = threading.Event()
    release = threading.Event()

    def stuck_fsync(fd: int) -> None:
        entered.set()
        release.wait()  # a disk that does not answer: the old code did this inside append, on the event loop
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", stuck_fsync)
    path = tmp_path / "audit.log"
    log = AuditLog.open(path, gateway="site-a", fsync_interval=0)  # strict: fsync every batch
    log.start()
    log.append("ratchet_complete", peer="site-b", epoch=0)
    assert entered.wait(10), "the writer never reached fsync"
    for n in range(10_000):  # all while the writer is stuck in fsync: none may block
        log.append("authentication_failed", peer="site-b", reason="M1 signature", n=n)
    assert not release.is_set() and entered.is_set()
    release.set()
    log.close()
    result = verify_file(path)
    assert result.ok, result
    records = _records(path)
    written = [r for r in records if r["event"] == "authentication_failed"]
    lost = sum(int(str(r["dropped"])) for r in records if r["event"] == "audit_overflow")
    assert len(written) + lost == 10_000 and lost == log.dropped and lost > 0  # the queue is bounded
    assert [r["n"] for r in written] == sorted(int(str(r["n"])) for r in written)  # queue order


def test_overflow_is_counted_and_the_next_record_is_preceded_by_the_gap(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog.open(path, gateway="site-a", fsync_interval=0, clock=FakeClock(), queue_size=10)
    accepted = [log.append("ratchet_complete", peer="site-b", epoch=n) for n in range(25)]
    assert accepted == [True] * 10 + [False] * 15 and log.dropped == 15
    log.start()
    assert log.flush(timeout=5)
    assert log.append("gateway_stop")
    log.close()
    events = [(r["seq"], r["event"], r.get("dropped")) for r in _records(path)]
    assert events[-2:] == [(12, "audit_overflow", 15), (13, "gateway_stop", None)]
    assert [e for _, e, _ in events[1:11]] == ["ratchet_complete"] * 10
    assert verify_file(path).ok


def test_drops_with_no_later_record_are_told_at_close(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog.open(path, gateway="site-a", fsync_interval=0, queue_size=2)
    for n in range(5):
        log.append("ratchet_complete", epoch=n)
    log.close()
    last = _records(path)[-1]
    assert last["event"] == "audit_overflow" and last["dropped"] == 3 and last["seq"] == 4
    assert log.dropped == 3 and verify_file(path).ok


def test_rotation_keeps_at_most_keep_files_each_naming_the_old_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog.open(path, gateway="site-a", fsync_interval=0, max_bytes=2000, keep=2)
    log.start()
    for n in range(60):  # about 300 bytes each: a rotation every 6 or 7 records
        log.append("ratchet_complete", peer="site-b", epoch=n, key_ids=f"id-{n:04d}a,id-{n:04d}b")
        if n % 10 == 0:
            assert log.flush(timeout=5)  # vary the batches: rotation also runs mid-stream
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audit.log.1", "audit.log.2"]
    series = log_series(path)
    assert series == [rotated_path(path, 2), rotated_path(path, 1), path]
    results = verify_series(series)
    assert all(r.ok for r in results), results
    for older, newer, older_result in zip(series, series[1:], results, strict=False):
        start = _records(newer)[0]
        assert start["event"] == "audit_start" and start["prev_file_head"] == older_result.head
        assert 2000 <= older.stat().st_size < 2000 + 10 * 400  # past the budget by one batch at most
    epochs = [r["epoch"] for p in series for r in _records(p)[1:]]
    assert epochs == list(range(60 - len(epochs), 60))  # the newest records, in order, none lost


def test_a_cut_rotated_file_breaks_the_link_to_the_next(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path, gateway="site-a", fsync_interval=0, max_bytes=1500, keep=3) as log:
        for n in range(20):
            log.append("ratchet_complete", peer="site-b", epoch=n, key_ids="id-1,id-2")
    older = rotated_path(path, 1)
    older.write_bytes(b"".join(older.read_bytes().splitlines(keepends=True)[:-1]))
    assert verify_file(older).ok  # on its own the cut is invisible ...
    results = verify_series(log_series(path))
    assert not results[-1].ok and results[-1].line == 1  # ... the newer file's audit_start shows it
    assert "not the head of audit.log.1" in (results[-1].problem or "")


def test_a_rotation_that_cannot_be_done_is_logged_and_the_file_keeps_growing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    (tmp_path / "audit.log.new").write_bytes(b"someone else's file\n")
    with (
        caplog.at_level(logging.ERROR, logger="qgate.audit"),
        AuditLog.open(path, gateway="site-a", fsync_interval=0, max_bytes=1000) as log,
    ):
        for n in range(20):
            log.append("ratchet_complete", peer="site-b", epoch=n)
    assert "cannot rotate" in caplog.text and caplog.text.count("cannot rotate") == 1
    assert not rotated_path(path, 1).exists() and verify_file(path).records == 21


def test_a_write_failure_makes_later_appends_fail_and_counts_the_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qgate.audit as audit_module

    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    log = AuditLog.open(tmp_path / "audit.log", gateway="site-a", fsync_interval=0)
    monkeypatch.setattr(audit_module, "_write_all", disk_full)
    log.start()
    log.append("gateway_start")
    assert not log.flush(timeout=5)
    with pytest.raises(ConfigError, match="No space left"):
        log.append("gateway_stop")
    assert log.dropped == 1
    log.close()


def test_cli_verify_rotated_checks_every_file_and_the_links(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path, gateway="site-a", fsync_interval=0, max_bytes=1500, keep=4) as log:
        for n in range(20):
            log.append("ratchet_complete", peer="site-b", epoch=n, key_ids="id-1,id-2")
    result = CliRunner().invoke(audit, ["verify", str(path), "--rotated", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["ok"] is True and [f["file"] for f in report["files"]][-1] == str(path)
    assert len(report["files"]) == len(log_series(path)) > 1
    older = rotated_path(path, 1)
    older.write_bytes(older.read_bytes().replace(b'"epoch":', b'"epoch": ', 1))
    bad = CliRunner().invoke(audit, ["verify", str(path), "--rotated"])
    assert bad.exit_code == 1 and "audit.log.1: line" in bad.stderr


def test_cli_verify_rotated_fails_when_a_middle_file_of_the_series_was_removed(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path, gateway="site-a", fsync_interval=0, max_bytes=1500, keep=4) as log:
        log.start()
        for n in range(60):
            log.append("ratchet_complete", peer="site-b", epoch=n, key_ids="id-1,id-2")
            log.flush()  # one batch per record: the writer rotates between batches
    assert rotated_path(path, 3).exists()
    rotated_path(path, 2).unlink()
    bad = CliRunner().invoke(audit, ["verify", str(path), "--rotated"])
    assert bad.exit_code == 1 and "audit.log.2 is missing although" in bad.stderr


# ----- tamper detection ---------------------------------------------------------------
def _check(lines: list[bytes], line: int, fragment: str) -> None:
    result = verify_lines(lines)
    assert not result.ok
    assert result.line == line, result
    assert fragment in (result.problem or ""), result
    assert result.records == line - 1


def test_edited_field_is_detected_at_its_line(lines: list[bytes]) -> None:
    lines[2] = lines[2].replace(b'"peer":"site-b"', b'"peer":"site-x"')
    _check(lines, 3, "'hash' does not match")


def test_edited_field_with_recomputed_hash_is_detected_at_the_next_line(lines: list[bytes]) -> None:
    rec = json.loads(lines[2])
    rec["key_ids"] = "forged-id"
    rec["hash"] = record_hash(rec)
    lines[2] = render_line(rec) + b"\n"
    _check(lines, 4, "'prev' is not the SHA-256 of line 3")


def test_reformatted_line_is_detected_as_not_canonical(lines: list[bytes]) -> None:
    lines[1] = json.dumps(json.loads(lines[1])).encode() + b"\n"
    _check(lines, 2, "not in canonical form")


def test_deleted_line_is_detected_where_it_was(lines: list[bytes]) -> None:
    del lines[2]
    _check(lines, 3, "'seq' is 4 where 3 was expected: record(s) before this line are missing")


def test_deleted_first_line_is_detected_at_line_1(lines: list[bytes]) -> None:
    del lines[0]
    _check(lines, 1, "'seq' is 2 where 1 was expected")


def test_inserted_copy_of_a_line_is_detected_at_its_line(lines: list[bytes]) -> None:
    lines.insert(3, lines[1])
    _check(lines, 4, "'seq' is 2 where 4 was expected: a line was inserted")


def test_inserted_well_formed_record_is_detected_at_the_line_after_it(lines: list[bytes]) -> None:
    lines.insert(3, _forge(lines[2], 4, peer="site-b", key_ids="forged"))
    _check(lines, 5, "'seq' is 4 where 5 was expected")


def test_swapped_lines_are_detected_at_the_first_of_them(lines: list[bytes]) -> None:
    lines[2], lines[3] = lines[3], lines[2]
    _check(lines, 3, "'seq' is 4 where 3 was expected")


def test_cut_last_line_is_detected(lines: list[bytes]) -> None:
    lines[-1] = lines[-1][:40]
    _check(lines, 6, "no newline at its end")


def test_appended_garbage_is_detected_at_its_line(lines: list[bytes]) -> None:
    lines.append(b"garbage\n")
    _check(lines, 7, "not JSON")


def test_replaced_genesis_is_detected(lines: list[bytes]) -> None:
    lines[0] = lines[0].replace(b'"audit_start"', b'"gateway_start"')
    _check(lines, 1, "'hash' does not match")


def test_rewritten_tail_is_caught_by_an_earlier_anchor(lines: list[bytes]) -> None:
    anchor = {5: line_digest(lines[4])}
    assert verify_lines(lines, anchors=anchor).ok
    cut = lines[:4]  # the last two lines removed: the chain alone cannot tell
    assert verify_lines(cut).ok
    result = verify_lines(cut, anchors=anchor)
    assert not result.ok and "past the end" in (result.problem or "")
    rewritten = [*lines[:4], _forge(lines[3], 5, peer="site-b")]
    assert verify_lines(rewritten).ok
    result = verify_lines(rewritten, anchors=anchor)
    assert not result.ok and result.line == 5 and "anchor" in (result.problem or "")


def test_empty_log_is_not_valid() -> None:
    result = verify_lines([])
    assert not result.ok and result.line == 1 and "empty" in (result.problem or "")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_byte_edit_is_detected(data: st.DataObject) -> None:
    original = _cached_log()
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != original[position]), label="byte")
    edited = bytearray(original)
    edited[position] = value
    result = verify_lines(bytes(edited).splitlines(keepends=True))
    assert not result.ok
    first_touched = original[:position].count(b"\n") + 1
    assert result.line is not None and result.line >= first_touched


_CACHE: list[bytes] = []


def _cached_log() -> bytes:
    if not _CACHE:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            _CACHE.append(b"".join(_write_log(Path(tmp) / "audit.log", events=4)))
    return _CACHE[0]


# ----- CLI ----------------------------------------------------------------------------
@pytest.fixture
def log_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "audit.log"
    _write_log(path, events=3)
    yield path


def test_cli_verify_reports_the_record_count(log_path: Path) -> None:
    result = CliRunner().invoke(audit, ["verify", str(log_path)])
    assert result.exit_code == 0, result.output
    assert "ok: 4 records" in result.output


def test_cli_verify_json_prints_one_line_last_on_stdout(log_path: Path) -> None:
    result = CliRunner().invoke(audit, ["verify", str(log_path), "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["ok"] is True and report["records"] == 4 and report["line"] is None
    assert report["head"].startswith("4:")


def test_cli_verify_names_the_first_bad_line_and_exits_1(log_path: Path) -> None:
    lines = log_path.read_bytes().splitlines(keepends=True)
    del lines[1]
    log_path.write_bytes(b"".join(lines))
    result = CliRunner().invoke(audit, ["verify", str(log_path), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["ok"] is False and report["line"] == 2 and report["records"] == 1
    assert "missing" in report["problem"]
    assert "line 2: 'seq' is 3 where 2 was expected" in result.stderr


def test_cli_verify_checks_anchors(log_path: Path) -> None:
    head = verify_file(log_path).head
    assert head is not None
    ok = CliRunner().invoke(audit, ["verify", str(log_path), "--anchor", head])
    assert ok.exit_code == 0
    log_path.write_bytes(b"".join(log_path.read_bytes().splitlines(keepends=True)[:-1]))
    cut = CliRunner().invoke(audit, ["verify", str(log_path), "--anchor", head])
    assert cut.exit_code == 1 and "past the end" in cut.stderr
    bad = CliRunner().invoke(audit, ["verify", str(log_path), "--anchor", "nope"])
    assert bad.exit_code == 1 and "not SEQ:SHA256" in bad.stderr


def test_cli_verify_missing_file_exits_1_with_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(audit, ["verify", str(tmp_path / "none.log"), "--json"])
    assert result.exit_code == 1
    assert "cannot read" in json.loads(result.stdout.splitlines()[-1])["problem"]
