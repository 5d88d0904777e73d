"""Anti-replay window for one epoch's receive direction (RFC 6479 sliding bitmap; RFC 4303 section 3.4.3).

Call ``accept`` only after the record's AES-GCM tag verified, so a forged counter can never
move the window (WireGuard's rule).
"""

from __future__ import annotations

from qgate.constants import REPLAY_WINDOW_SIZE


class ReplayWindow:
    """Accept each 64-bit counter at most once, within ``size`` packets of the highest seen.

    The bitmap is one Python int: bit ``i`` set means counter ``top - i`` was seen.
    """

    __slots__ = ("_bits", "_mask", "_size", "_top")

    def __init__(self, size: int = REPLAY_WINDOW_SIZE) -> None:
        """Make an empty window of ``size`` packets (>= 1)."""
        self._size = size
        self._mask = (1 << size) - 1
        self._top = -1
        self._bits = 0

    def accept(self, counter: int) -> bool:
        """Record ``counter``; return False if it was seen before or is too old for the window."""
        top = self._top
        if counter > top:
            shift = counter - top
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self._size else 1
            self._top = counter
            return True
        age = top - counter
        if age >= self._size:
            return False
        bit = 1 << age
        if self._bits & bit:
            return False
        self._bits |= bit
        return True

    @property
    def highest(self) -> int:
        """The highest counter accepted so far (-1 when none)."""
        return self._top
