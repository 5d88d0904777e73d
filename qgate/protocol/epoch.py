"""Epochs and the per-peer set of live epochs: sealing and opening data records (make-before-break).

An epoch is one pair of directional AES-256-GCM keys plus the chaining key it came from. A peer
holds at most: ``current`` (sends and receives), ``next`` (receives only: installed by the slave
before the master switches to it), and a few ``previous`` epochs that still open reordered
packets for ``EPOCH_GRACE`` seconds. Each epoch is known on the wire by the receiver's 32-bit
index (docs/protocol.md, Epochs). Per-packet failures are counted, never raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from qgate.constants import AEAD_PACKET_LIMIT, DATA_HEADER_SIZE, EPOCH_GRACE
from qgate.crypto.aead import NONCE_PREFIX, RecordKey
from qgate.crypto.secret import Secret
from qgate.errors import AuthenticationError
from qgate.protocol.replay import ReplayWindow
from qgate.protocol.wire import data_header_fields, pack_data_header

PREVIOUS_MAX: Final = 3
"""Replaced epochs kept for reordered packets at most (older ones are dropped at once)."""


@dataclass
class DataStats:
    """Data-plane counters of one peer (packets and bytes are inner sizes)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    drops_no_session: int = 0
    drops_key_expired: int = 0
    drops_key_exhausted: int = 0
    drops_unknown_index: int = 0
    drops_auth: int = 0
    drops_replay: int = 0
    drops_malformed: int = 0


class Epoch:
    """One epoch's keys and counters. ``repr()`` never shows keys."""

    __slots__ = (
        "chaining_key",
        "confirm_context",
        "confirm_key",
        "created_at",
        "expires_at",
        "key_ids",
        "kind",
        "my_index",
        "number",
        "peer_index",
        "recv_key",
        "replay",
        "send_counter",
        "send_key",
    )

    def __init__(
        self,
        *,
        number: int,
        my_index: int,
        peer_index: int,
        send_key: Secret,
        recv_key: Secret,
        chaining_key: Secret,
        created_at: float,
        kind: str,
        key_ids: tuple[str, ...],
    ) -> None:
        self.number = number
        self.my_index = my_index
        self.peer_index = peer_index
        self.send_key = RecordKey(send_key)
        self.recv_key = RecordKey(recv_key)
        self.chaining_key = chaining_key
        self.created_at = created_at
        self.kind = kind
        self.key_ids = key_ids
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.expires_at: float | None = None
        self.confirm_key: Secret | None = None
        self.confirm_context: bytes = b""

    def __repr__(self) -> str:
        return f"Epoch(number={self.number}, my_index={self.my_index:#010x}, kind={self.kind})"

    @property
    def degraded(self) -> bool:
        """Whether no QKD key went into this epoch (a handshake on ML-KEM and X25519 alone)."""
        return not self.key_ids


@dataclass
class EpochSet:
    """The live epochs of one peer and the rules that pick which one seals and which open.

    Attributes:
        max_key_age: seconds after which an epoch's keys are never used again (policy
            ``rekey.max_key_age``), in either direction.
        packet_limit: records sealed under one key at most (RFC 9001 section 6.6: 2^23).
    """

    max_key_age: float
    packet_limit: int = AEAD_PACKET_LIMIT
    stats: DataStats = field(default_factory=DataStats)
    current: Epoch | None = None
    next: Epoch | None = None
    previous: list[Epoch] = field(default_factory=list)
    by_index: dict[int, Epoch] = field(default_factory=dict)

    def install_current(self, epoch: Epoch, now: float) -> None:
        """Make ``epoch`` the sending epoch; the old current one is kept for the grace period."""
        old = self.current
        if old is not None and old is not epoch:
            old.expires_at = now + EPOCH_GRACE
            self.previous.append(old)
        if self.next is epoch:
            self.next = None
        self.current = epoch
        self.by_index[epoch.my_index] = epoch
        self._trim()

    def install_next(self, epoch: Epoch) -> None:
        """Install ``epoch`` for receiving only (the slave, before the master switches)."""
        if self.next is not None:
            self.by_index.pop(self.next.my_index, None)
        self.next = epoch
        self.by_index[epoch.my_index] = epoch

    def promote_next(self, now: float) -> Epoch | None:
        """Make the receive-only epoch the sending one; return it (None if there was none)."""
        epoch = self.next
        if epoch is not None:
            self.install_current(epoch, now)
        return epoch

    def expire(self, now: float) -> None:
        """Drop replaced epochs whose grace period has passed."""
        keep = [e for e in self.previous if e.expires_at is not None and e.expires_at > now]
        for gone in self.previous:
            if gone not in keep:
                self._forget(gone)
        self.previous = keep

    def clear(self) -> None:
        """Forget every epoch (keys dropped)."""
        self.current = self.next = None
        self.previous = []
        self.by_index.clear()

    def _trim(self) -> None:
        while len(self.previous) > PREVIOUS_MAX:
            self._forget(self.previous.pop(0))

    def _forget(self, epoch: Epoch) -> None:
        if self.by_index.get(epoch.my_index) is epoch:
            del self.by_index[epoch.my_index]

    def usable(self, epoch: Epoch, now: float) -> bool:
        """Whether ``epoch``'s keys are inside their hard lifetime and grace period."""
        if now - epoch.created_at > self.max_key_age:
            return False
        return epoch.expires_at is None or now <= epoch.expires_at

    def seal(self, packet: bytes, now: float) -> bytes | None:
        """Return the data datagram ``header(16) || ciphertext || tag(16)``, or None if no key may seal.

        None is counted: no session, key past ``max_key_age``, or key at its packet limit.
        """
        out = self.seal_batch((packet,), now)
        return out[0] if out else None

    def seal_batch(self, packets: Sequence[bytes], now: float) -> list[bytes]:
        """Seal ``packets`` in order under the current epoch; the same records as ``seal`` one by one.

        The epoch, its age and its packet limit are checked once for the batch; packets beyond
        the limit, or all of them without a usable epoch, are dropped and counted as ``seal``
        counts them.

        Returns:
            The data datagrams (``header(16) || ciphertext || tag(16)`` each), a prefix of the batch.
        """
        epoch = self.current
        stats = self.stats
        if epoch is None:
            stats.drops_no_session += len(packets)
            return []
        if now - epoch.created_at > self.max_key_age:
            stats.drops_key_expired += len(packets)
            return []
        counter = epoch.send_counter
        room = self.packet_limit - counter
        if room < len(packets):
            stats.drops_key_exhausted += len(packets) - max(room, 0)
            packets = packets[: max(room, 0)]
        index, seal = epoch.peer_index, epoch.send_key.seal_nonce
        out = []
        size = 0
        for packet in packets:  # nonce = 0^4 || the header's 8 counter bytes (protocol.md 2.1)
            header = pack_data_header(index, counter)
            out.append(header + seal(NONCE_PREFIX + header[8:], header, packet))
            counter += 1
            size += len(packet)
        epoch.send_counter = counter
        stats.tx_packets += len(out)
        stats.tx_bytes += size
        return out

    def open(self, datagram: bytes, now: float) -> tuple[bytes, Epoch] | None:
        """Verify and decrypt a data datagram; return ``(plaintext, epoch)`` or None (counted).

        Order (docs/protocol.md section 6): epoch lookup, tag check, then the replay window.
        """
        stats = self.stats
        fields = data_header_fields(datagram)
        if fields is None:  # short, another type, or non-zero reserved bytes
            stats.drops_malformed += 1
            return None
        index, counter = fields
        epoch = self.by_index.get(index)
        if epoch is None:
            stats.drops_unknown_index += 1
            return None
        if not self.usable(epoch, now):
            stats.drops_key_expired += 1
            return None
        try:
            view = memoryview(datagram)
            plaintext = epoch.recv_key.open_nonce(
                NONCE_PREFIX + datagram[8:DATA_HEADER_SIZE], view[:DATA_HEADER_SIZE], view[DATA_HEADER_SIZE:]
            )
        except AuthenticationError:
            stats.drops_auth += 1
            return None
        if not epoch.replay.accept(counter):
            stats.drops_replay += 1
            return None
        stats.rx_packets += 1
        stats.rx_bytes += len(plaintext)
        return plaintext, epoch
