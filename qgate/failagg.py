"""Aggregate unauthenticated and malformed handshake failures into periodic summary records.

Anyone who can send a datagram to the gateway can make it fail a handshake (a forged Kick or M1 with
wrong SAE IDs or a bad signature). One audit record per failure lets such a flood fill the disk and
stall the event loop; so these failures are counted here and the gateway audits one summary per peer
and kind per ``interval`` instead. This module holds no I/O and no clock: time comes in as ``now``
(monotonic seconds).

Windows: the first failure of a peer opens a window; when ``interval`` seconds have passed since
then, ``due(now)`` returns one summary per kind seen in the window and closes it; the next failure
opens a new window. So the first failure of a streak is reported at most one interval (plus the
caller's polling period) after it happened, and a steady flood gives at most one summary per peer
and kind per interval (60 s at 10 s: at most 6).

Memory is bounded: at most ``max_peers`` peers (more are counted under the peer ``"other"``), per
peer at most ``max_kinds`` kinds (more under the kind ``"other"``), per kind at most ``max_reasons``
reason categories (more under ``"other"``).

Reason categories (``reason_category``): a failure's reason is an exception message that may quote
bytes from the datagram (SAE IDs as ``'...'``, library messages as ``...: detail``), so it is never
copied. It is reduced to a category by these steps, in order:

1. cut at the first ``:``, quote (``'``, ``"``, `````), backslash or character that is not printable
   ASCII (a newline, a control character, anything non-ASCII);
2. lower-case; every character other than ``a-z``, ``0-9``, space, ``_`` and ``-`` becomes a space;
3. every number standing alone (a run of digits between non-word characters) becomes ``n``;
4. runs of spaces become one space, leading and trailing spaces go, and the result is cut to
   ``REASON_MAX`` (80) characters (trailing space removed again);
5. an empty result is ``"unspecified"``.

So "M1 names SAEs 'X' -> 'Y'" is "m1 names saes", "fragment 7 of 2 out of range" is "fragment n of n
out of range". Peer and kind names come from the policy and the code, not from the wire, but are
still reduced to at most 64 characters of ``[A-Za-z0-9_.-]`` (``_safe_name``) so a later caller
passing an address cannot break the record either.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Final

AGGREGATED_KINDS: Final = frozenset({"authentication_failed", "bad_handshake_message"})
"""Protocol event kinds counted here instead of audited one by one."""
AGGREGATED_PREFIXES: Final = ("unauth_", "drop_")
"""Event kind prefixes counted here too (unauthenticated input and dropped messages)."""
OTHER: Final = "other"
"""Peer, kind or reason name that collects everything past the caps."""
UNSPECIFIED: Final = "unspecified"
"""The category of an empty reason (or one with nothing left after the reduction)."""
REASON_MAX: Final = 80
"""Characters of a reason category at most."""
NAME_MAX: Final = 64
"""Characters of a peer or kind name at most."""

_CUT = re.compile(r"[:'\"`\\]|[^\x20-\x7e]")
_UNSAFE = re.compile(r"[^a-z0-9 _-]")
_NUMBER = re.compile(r"(?<![a-z0-9_])[0-9]+(?![a-z0-9_])")
_SPACES = re.compile(r" {2,}")
_BAD_NAME = re.compile(r"[^A-Za-z0-9_.-]")

Summary = dict[str, str | int]


def is_aggregated(kind: str) -> bool:
    """Tell whether protocol events of ``kind`` go through the aggregator (not one record each)."""
    return kind in AGGREGATED_KINDS or kind.startswith(AGGREGATED_PREFIXES)


def reason_category(reason: str) -> str:
    """Reduce a failure reason to a short, safe category (the rule is in the module docstring).

    Args:
        reason: any text, of any length (an exception message).

    Returns:
        1 to ``REASON_MAX`` characters of ``[a-z0-9 _-]``, never starting or ending with a space.
    """
    head = _CUT.split(reason[: 4 * REASON_MAX], maxsplit=1)[0]
    text = _NUMBER.sub("n", _UNSAFE.sub(" ", head.lower()))
    text = _SPACES.sub(" ", text).strip()[:REASON_MAX].rstrip()
    return text or UNSPECIFIED


def _safe_name(name: str) -> str:
    return _BAD_NAME.sub("_", name[:NAME_MAX]) or UNSPECIFIED


@dataclass
class _Tally:
    """Failures of one kind in the open window."""

    count: int = 0
    last_reason: str = UNSPECIFIED
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Window:
    """One peer's open window: when it opened and the tallies by kind."""

    opened: float
    kinds: dict[str, _Tally] = field(default_factory=dict)


class FailureAggregator:
    """Count failures by peer, kind and reason category; hand out summaries once per interval.

    Args:
        interval: seconds a window stays open (> 0); at most one summary per peer and kind per
            interval.
        max_reasons: reason categories tallied per peer and kind (>= 1); the rest count as "other".
        max_peers: peers tracked at once (>= 1); the rest count under the peer "other".
        max_kinds: kinds tracked per peer (>= 1); the rest count under the kind "other".

    Raises:
        ValueError: an argument is out of range (a caller bug).
    """

    def __init__(
        self, interval: float = 10.0, max_reasons: int = 8, *, max_peers: int = 64, max_kinds: int = 8
    ) -> None:
        """Start with no open window."""
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval {interval} s is not a positive number")
        if min(max_reasons, max_peers, max_kinds) < 1:
            raise ValueError("max_reasons, max_peers and max_kinds must be at least 1")
        self.interval = interval
        self.max_reasons = max_reasons
        self.max_peers = max_peers
        self.max_kinds = max_kinds
        self._windows: dict[str, _Window] = {}

    def add(self, peer: str, kind: str, reason: str, now: float, count: int = 1) -> None:
        """Count ``count`` failures of one kind and reason.

        Args:
            peer: the peer's policy name (or where the datagram came from).
            kind: the event kind ("authentication_failed", "bad_handshake_message", "unauth_...").
            reason: the failure's reason text; only its category (``reason_category``) is kept.
            now: monotonic seconds.
            count: failures this call stands for (>= 1; the engine reports cheap drops such as mac1
                and mac2 failures once per interval with their number); less than 1 counts as 1.
        """
        count = max(1, count)
        window = self._window(_safe_name(peer), now)
        kind = _safe_name(kind)
        if kind not in window.kinds and len(window.kinds) >= self.max_kinds:
            kind = OTHER
        tally = window.kinds.setdefault(kind, _Tally())
        category = reason_category(reason)
        tally.count += count
        tally.last_reason = category
        if category not in tally.reasons and len(tally.reasons) >= self.max_reasons:
            category = OTHER
        tally.reasons[category] = tally.reasons.get(category, 0) + count

    def _window(self, peer: str, now: float) -> _Window:
        if peer not in self._windows and len(self._windows) >= self.max_peers:
            peer = OTHER
        window = self._windows.get(peer)
        if window is None:
            window = self._windows[peer] = _Window(now)
        return window

    def due(self, now: float) -> list[Summary]:
        """Close the windows open for ``interval`` seconds or more and return their summaries.

        Args:
            now: monotonic seconds (call it often, e.g. from the gateway's timer tick).

        Returns:
            One record per peer and kind of each closed window, peers and kinds in first-seen order::

                {"peer": "site-b", "kind": "authentication_failed", "count": 1234, "interval_s": 10,
                 "last_reason": "m1 names saes", "reasons": "m1 names saes=1200;r1 mac failed=34"}

            ``interval_s`` is the window's length in whole seconds (longer than ``interval`` when
            ``due`` was called late); ``reasons`` lists ``category=count`` joined by ";".
        """
        closed = [peer for peer, w in self._windows.items() if now - w.opened >= self.interval]
        return [record for peer in closed for record in self._close(peer, now)]

    def flush(self, now: float) -> list[Summary]:
        """Close every open window now, due or not (at shutdown), and return their summaries."""
        return [record for peer in list(self._windows) for record in self._close(peer, now)]

    def _close(self, peer: str, now: float) -> list[Summary]:
        window = self._windows.pop(peer)
        seconds = max(0, round(now - window.opened))
        return [
            {
                "peer": peer,
                "kind": kind,
                "count": tally.count,
                "interval_s": seconds,
                "last_reason": tally.last_reason,
                "reasons": ";".join(f"{name}={n}" for name, n in tally.reasons.items()),
            }
            for kind, tally in window.kinds.items()
        ]

    @property
    def pending(self) -> int:
        """Failures counted in open windows, not yet handed out."""
        return sum(t.count for w in self._windows.values() for t in w.kinds.values())
