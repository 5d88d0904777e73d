"""Key stores of the KME simulator: a simulated QKD link's key stream and its two ends (sans-I/O).

Model. Two KMEs share a link secret. The link carries two independent streams of key blocks,
one per direction (``"KME_A>KME_B"``: keys KME_A hands to its master SAEs for slaves behind
KME_B). Block ``i`` of a direction is known to both KMEs by derivation from the link secret, so
they never exchange key bytes; the two directions never share a block, so both KMEs can act as
master at once without collisions.

* :class:`OutgoingPool` (master side): blocks of ``key_size`` bits are released (steadily at
  ``rate`` bits/s like fibre, or ``burst_bits`` per pass every ``burst_period`` seconds like
  satellite passes, :class:`ReleaseSchedule`) into a store of at most ``max_key_count``
  blocks; the overflow is lost. A delivered key of ``size`` bits consumes ``ceil(size / key_size)``
  consecutive blocks and is named by its first block's index.
* :class:`IncomingStore` (slave side): keys the peer KME reported as delivered to its master SAE,
  waiting for the slave SAE's dec_keys; each is handed out once and then forgotten (only its
  key_ID is remembered a while, for the ``consumed-401`` quirk).

Nothing here locks; the simulator serialises access. Time comes in as ``now``: wall-clock
seconds since the Unix epoch, so both KMEs index the stream alike and a restart resumes it.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qgate.crypto.secret import Secret

KDF_SALT: Final = b"qgate kms-sim v1"
"""HKDF salt (RFC 5869) for deriving key bytes from the link secret."""
MAX_DERIVED_KEY_BITS: Final = 255 * 32 * 8
"""Bits: the most HKDF-SHA-256 can output (RFC 5869 section 2.3), so the largest max_key_size."""
SEEN_MEMORY: Final = 4
"""The slave store remembers this many x capacity consumed key indices to refuse replays."""
UNKNOWN_KEY_ID: Final = "unknown key_ID"
"""Error message of dec_keys for a key_ID not waiting (never delivered, taken, dropped)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a store refused a request: HTTP status (400/401/503), message, ETSI ``details``."""

    status: int
    message: str
    details: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveredKey:
    """A key the master KME handed to its master SAE, as reported to the slave KME.

    Attributes:
        key_id: the key_ID (a UUID derived from the link secret, direction and index).
        index: first block of the key in its direction's stream.
        size_bits: key length in bits.
        master_sae: the SAE that got it with enc_keys.
        slave_sae: the SAE allowed to get it with dec_keys.
    """

    key_id: str
    index: int
    size_bits: int
    master_sae: str
    slave_sae: str


class LinkKeys:
    """Derive key_IDs and key bytes of a simulated QKD link from its shared secret.

    Args:
        link_secret: the secret both KMEs hold (>= 16 bytes).
    """

    def __init__(self, link_secret: Secret) -> None:
        self._secret = link_secret

    def key_id(self, direction: str, index: int) -> str:
        """Return the key_ID of the key starting at block ``index``: a version-4-shaped UUID string."""
        mac = hmac.new(self._secret.reveal(), _label(b"key_ID", direction, index), hashlib.sha256)
        return str(uuid.UUID(bytes=mac.digest()[:16], version=4))

    def key(self, direction: str, index: int, size_bits: int) -> Secret:
        """Return the ``size_bits // 8`` key bytes starting at block ``index`` (HKDF-SHA-256, RFC 5869)."""
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=size_bits // 8,
            salt=KDF_SALT,
            info=_label(b"key", direction, index) + size_bits.to_bytes(4, "big"),
        )
        return Secret(hkdf.derive(self._secret.reveal()))


@dataclass(frozen=True, slots=True)
class ReleaseSchedule:
    """How the link releases key: steadily at ``rate`` bits/s (fibre), or in passes (satellite).

    Attributes:
        rate: bits per second of steady release (>= 0); in passes without ``burst_bits``, the
            rate during each pass.
        burst_period: seconds of one pass cycle; 0 means steady release.
        burst_duration: seconds the pass at the start of each cycle lasts; 0: its key comes at
            once at the start of the cycle.
        burst_bits: bits released per pass; None: ``rate * burst_duration``.
    """

    rate: float
    burst_period: float = 0.0
    burst_duration: float = 0.0
    burst_bits: float | None = None

    @property
    def pass_bits(self) -> float:
        """Bits released by one pass."""
        return self.burst_bits if self.burst_bits is not None else self.rate * self.burst_duration

    def bits_released(self, elapsed: float) -> float:
        """Bits released during the first ``elapsed`` seconds (>= 0) since the origin (Unix epoch).

        In passes, pass number ``n = elapsed // burst_period`` starts at ``n * burst_period``
        and releases ``pass_bits`` evenly over ``burst_duration`` (all at once if that is 0).
        """
        if self.burst_period <= 0:
            return self.rate * elapsed
        cycles, rest = divmod(elapsed, self.burst_period)
        bits = self.pass_bits
        if self.burst_duration <= 0:
            return (cycles + 1) * bits
        return cycles * bits + bits * min(rest, self.burst_duration) / self.burst_duration


class OutgoingPool:
    """Blocks of one direction ready for this KME's master SAEs (master side of the link).

    The stream index is tied to the wall clock, like a QKD link producing key continuously:
    block ``i`` is released once ``schedule.bits_released(now)`` (seconds since the Unix epoch,
    the origin both KMEs agree on without talking) reaches ``(i + 1) * key_size`` bits. The store
    holds at most the ``max_key_count`` most recently released blocks not yet taken, so a KME
    started again later resumes at the current index and never hands out a block twice as long
    as the clock does not go backwards (:meth:`clock_behind`).

    Args:
        schedule: the release schedule.
        key_size: bits per block (the Status ``key_size``).
        max_key_count: blocks stored at most (the Status ``max_key_count``).
        start: wall-clock time (Unix seconds) this KME started.
        initial: blocks present at ``start`` (at most ``max_key_count``; both KMEs must
            agree): the stream runs ``initial`` blocks ahead of the clock. Only 0 guarantees no
            reuse across restarts: a KME started again within ``initial * key_size / rate``
            seconds of stopping may repeat blocks.
    """

    def __init__(
        self, schedule: ReleaseSchedule, *, key_size: int, max_key_count: int, start: float, initial: int = 0
    ) -> None:
        self._schedule = schedule
        self._key_size = key_size
        self._max = max_key_count
        self._latest = start
        self._lead = min(initial, max_key_count)
        self._next_index = self.released(start) - self._lead

    def released(self, now: float) -> int:
        """Index of the next block to be released after ``now``.

        That is the blocks released since the Unix epoch, plus the ``initial`` blocks the link
        is ahead by (the same on both KMEs).
        """
        return int(self._schedule.bits_released(max(0.0, now)) // self._key_size) + self._lead

    def clock_behind(self, now: float) -> float:
        """Seconds ``now`` lies before the latest time seen (> 0: the clock went backwards)."""
        return max(0.0, self._latest - now)

    def available(self, now: float) -> int:
        """Blocks stored at ``now``; 0 while the clock is behind the latest time seen."""
        window = self._window(now)
        return 0 if window is None else window[1] - window[0]

    def take(self, blocks: int, now: float) -> int | None:
        """Remove ``blocks`` consecutive blocks; return the first one's index, or None if too few."""
        window = self._window(now)
        if window is None or window[1] - window[0] < blocks:
            return None
        first = window[0]
        self._next_index = first + blocks
        return first

    def _window(self, now: float) -> tuple[int, int] | None:
        """``(first, end)``: the stored blocks are ``first .. end - 1``; None if the clock went back."""
        if now < self._latest:
            return None
        self._latest = now
        end = self.released(now)
        return max(self._next_index, end - self._max), max(end, self._next_index)


class IncomingStore:
    """Keys the peer KME delivered to its master SAEs, waiting for our slave SAEs (slave side).

    Args:
        capacity: keys kept at most; past it the oldest waiting key is dropped.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._waiting: OrderedDict[str, DeliveredKey] = OrderedDict()
        self._consumed: set[int] = set()
        self._floor = 0  # indices below this are treated as consumed (memory bound)
        self._taken: OrderedDict[str, None] = OrderedDict()  # key_IDs handed out, newest last

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, keys: Sequence[DeliveredKey]) -> tuple[list[DeliveredKey], Rejection | None]:
        """Record keys reported delivered; all or none.

        Returns:
            ``(dropped, None)`` with the oldest waiting keys dropped to stay within capacity, or
            ``([], rejection)`` (400) if a key_ID or index is already waiting or was consumed.
        """
        indices = [k.index for k in keys]
        for key in keys:
            if key.key_id in self._waiting or key.index in self._consumed or key.index < self._floor:
                return [], Rejection(400, f"key_ID {key.key_id} already delivered")
        if len(set(indices)) != len(indices):
            return [], Rejection(400, "repeated key index in one report")
        for key in keys:
            self._waiting[key.key_id] = key
        dropped: list[DeliveredKey] = []
        while len(self._waiting) > self._capacity:
            dropped.append(self._waiting.popitem(last=False)[1])
            self._consume(dropped[-1].index)
        return dropped, None

    def take(self, caller: str, master_sae: str, key_ids: Sequence[str]) -> list[DeliveredKey] | Rejection:
        """Hand out ``key_ids`` (distinct) to slave SAE ``caller``; all or none, each only once.

        Returns:
            The keys in the order asked, or a Rejection: 400 for an unknown (or already taken)
            key_ID or one delivered to another master SAE, 401 when ``caller`` is not the slave
            SAE the master named (ETSI GS QKD 014 section 5.3).
        """
        found: list[DeliveredKey] = []
        for key_id in key_ids:
            key = self._waiting.get(key_id)
            if key is None or key.master_sae != master_sae:
                return Rejection(400, UNKNOWN_KEY_ID, ({"key_ID": key_id},))
            if key.slave_sae != caller:
                return Rejection(401, "key_ID was not delivered for this SAE", ({"key_ID": key_id},))
            found.append(key)
        for key in found:
            del self._waiting[key.key_id]
            self._consume(key.index)
            self._taken[key.key_id] = None
        while len(self._taken) > SEEN_MEMORY * self._capacity:
            self._taken.popitem(last=False)
        return found

    def was_taken(self, key_id: str) -> bool:
        """Whether :meth:`take` handed ``key_id`` out (among the last SEEN_MEMORY x capacity)."""
        return key_id in self._taken

    def supersede(self, master_sae: str, slave_sae: str, *, keep: Collection[str] = ()) -> list[DeliveredKey]:
        """Drop for good the waiting keys of one (master SAE, slave SAE) pair but ``keep``; return them.

        The ``replace-on-enc`` quirk: a new enc_keys for the pair (its key_IDs in ``keep``)
        replaces the keys its slave has not fetched yet.
        """
        pair = (master_sae, slave_sae)
        gone = [
            k for k in self._waiting.values() if (k.master_sae, k.slave_sae) == pair and k.key_id not in keep
        ]
        for key in gone:
            del self._waiting[key.key_id]
            self._consume(key.index)
        return gone

    def forget(self, key_ids: Sequence[str]) -> list[str]:
        """Drop the waiting keys among ``key_ids`` for good (a KME losing them); return their IDs."""
        forgotten = [k for k in key_ids if k in self._waiting]
        for key_id in forgotten:
            self._consume(self._waiting.pop(key_id).index)
        return forgotten

    def _consume(self, index: int) -> None:
        self._consumed.add(index)
        if len(self._consumed) > SEEN_MEMORY * self._capacity:
            ordered = sorted(self._consumed)
            half = len(ordered) // 2
            self._floor = max(self._floor, ordered[half - 1] + 1)
            self._consumed = set(ordered[half:])


def _label(kind: bytes, direction: str, index: int) -> bytes:
    encoded = direction.encode("ascii")
    return kind + b"\x00" + len(encoded).to_bytes(2, "big") + encoded + index.to_bytes(8, "big")
