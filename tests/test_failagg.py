"""Unauthenticated failure aggregation: bounded summaries, prompt first report, safe reason categories."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qgate.failagg import (
    OTHER,
    REASON_MAX,
    UNSPECIFIED,
    FailureAggregator,
    is_aggregated,
    reason_category,
)

SAFE = re.compile(r"[a-z0-9_-]([a-z0-9 _-]*[a-z0-9_-])?")


def test_a_flood_of_100000_failures_in_60_s_gives_at_most_6_summaries_per_peer_and_kind() -> None:
    agg = FailureAggregator(interval=10.0)
    summaries = []
    for n in range(100_000):
        now = n * 60.0 / 100_000  # 0 .. 59.9994 s of fake time
        agg.add("site-b", "authentication_failed", "M1 names SAEs 'evil' -> 'SAE_A'", now)
        agg.add("site-c", "bad_handshake_message", f"fragment {n} of 2 out of range", now)
        if n % 33 == 0:  # the gateway polls every 20 ms
            summaries += agg.due(now)
    summaries += agg.flush(60.0)  # the flood is over: hand out the last window too
    for peer, kind in (("site-b", "authentication_failed"), ("site-c", "bad_handshake_message")):
        mine = [s for s in summaries if s["peer"] == peer and s["kind"] == kind]
        assert 1 <= len(mine) <= 6, mine
        assert sum(int(s["count"]) for s in mine) == 100_000
        assert all(9 <= int(s["interval_s"]) <= 10 for s in mine)
    assert {s["last_reason"] for s in summaries} == {"m1 names saes", "fragment n of n out of range"}


def test_the_first_failure_of_a_streak_is_reported_within_one_interval() -> None:
    agg = FailureAggregator(interval=10.0)
    agg.add("site-b", "authentication_failed", "R1 MAC failed", 100.0)
    assert agg.due(105.0) == []
    [summary] = agg.due(110.0)
    assert summary == {
        "peer": "site-b",
        "kind": "authentication_failed",
        "count": 1,
        "interval_s": 10,
        "last_reason": "r1 mac failed",
        "reasons": "r1 mac failed=1",
    }
    assert agg.due(200.0) == [] and agg.pending == 0
    agg.add("site-b", "authentication_failed", "R1 MAC failed", 500.0)  # quiet, then a new streak
    assert [s["count"] for s in agg.due(510.0)] == [1]


def test_one_summary_per_kind_of_a_peer_and_flush_hands_out_the_open_windows() -> None:
    agg = FailureAggregator(interval=10.0)
    agg.add("site-b", "authentication_failed", "Kick names other SAEs", 0.0)
    agg.add("site-b", "unauth_kick", "x", 1.0)
    agg.add("site-b", "unauth_kick", "y", 2.0)
    assert agg.due(9.9) == []
    flushed = agg.flush(3.0)
    assert [(s["kind"], s["count"], s["interval_s"]) for s in flushed] == [
        ("authentication_failed", 1, 3),
        ("unauth_kick", 2, 3),
    ]
    assert agg.flush(4.0) == [] and agg.due(100.0) == []


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("M1 names SAEs 'SAE_X' -> 'SAE_A'", "m1 names saes"),
        ('bad "quoted"\nsecond line', "bad"),
        ("M1: encapsulation key of the wrong size", "m1"),
        ("unknown handshake message type 17", "unknown handshake message type n"),
        ("x25519 flag, R2 step; (MAC)", "x25519 flag r2 step mac"),
        ("caf\u00e9 au lait", "caf"),
        ("\x00\x1b[31mred", UNSPECIFIED),
        ("", UNSPECIFIED),
        ("   ", UNSPECIFIED),
        ("tab\there", "tab"),
        ("back\\slash", "back"),
    ],
)
def test_reasons_are_reduced_to_a_fixed_safe_category(reason: str, category: str) -> None:
    assert reason_category(reason) == category


def test_a_10_kb_reason_with_quotes_newlines_and_non_ascii_becomes_a_short_safe_category() -> None:
    tail = "\u00e9\n'\"}{" * 2000  # about 12 KB of quotes, newlines, braces and non-ASCII
    assert reason_category("A" * 10_000 + tail) == "a" * REASON_MAX
    assert reason_category("M1 names SAE " + tail) == "m1 names sae"
    assert reason_category("bad\nmessage" + tail) == "bad"
    assert reason_category(tail) == UNSPECIFIED
    assert reason_category("word " * 2000) == ("word " * 16).strip()


@given(st.text(max_size=2000))
def test_any_reason_gives_a_safe_category(reason: str) -> None:
    category = reason_category(reason)
    assert 1 <= len(category) <= REASON_MAX
    assert category == UNSPECIFIED or SAFE.fullmatch(category), category


def test_memory_is_capped_and_the_rest_counted_as_other() -> None:
    agg = FailureAggregator(interval=10.0, max_reasons=2, max_peers=2, max_kinds=2)
    for peer in ("a", "b", "c", "d"):
        for kind in ("drop_x", "drop_y", "drop_z"):
            for reason in ("one", "two", "three", "four"):
                agg.add(peer, kind, reason, 0.0)
    summaries = agg.due(10.0)
    assert {s["peer"] for s in summaries} == {"a", "b", OTHER}
    assert {s["kind"] for s in summaries} == {"drop_x", "drop_y", OTHER}
    assert sum(int(s["count"]) for s in summaries) == 4 * 3 * 4
    by = {(s["peer"], s["kind"]): s for s in summaries}
    assert by[("a", "drop_x")]["reasons"] == "one=1;two=1;other=2"
    assert by[(OTHER, OTHER)]["count"] == 2 * 4  # peers c and d, kind drop_z
    assert len(summaries) == 3 * 3  # (2 peers + other) times (2 kinds + other)


def test_peer_and_kind_names_are_reduced_too() -> None:
    agg = FailureAggregator()
    agg.add("10.0.0.1:51820\n" + "x" * 100, "unauth_\u00e9vil", "r", 0.0)
    [summary] = agg.flush(1.0)
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", str(summary["peer"]))
    assert summary["kind"] == "unauth__vil"


def test_which_kinds_are_aggregated() -> None:
    for kind in ("authentication_failed", "bad_handshake_message", "unauth_kick", "drop_stale_m1"):
        assert is_aggregated(kind)
    for kind in ("handshake_complete", "mode_change", "kick_received", "qkd_request_failed"):
        assert not is_aggregated(kind)


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"interval": 0.0}, {"interval": float("nan")}, {"max_reasons": 0}):
        with pytest.raises(ValueError):
            FailureAggregator(**kwargs)  # type: ignore[arg-type]


def test_a_report_that_stands_for_many_drops_counts_them_all() -> None:
    agg = FailureAggregator(interval=10.0)
    agg.add("site-b", "unauth_mac2", "fails mac2: a spoofed flood", 0.0, count=4000)
    agg.add("site-b", "unauth_mac2", "fails mac2: a spoofed flood", 5.0, count=0)  # counts as one
    [summary] = agg.due(10.0)
    assert summary["count"] == 4001 and summary["reasons"] == "fails mac2=4001"
