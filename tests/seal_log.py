"""A recording RecordKey for tests: which key sealed which counter, in sealing order.

``monkeypatch.setattr(qgate.protocol.epoch, "RecordKey", SealLog)`` makes every epoch created
afterwards log ``(key fingerprint, counter)`` for each record it seals; the counter is read back
from the nonce (``0^4 || counter``, docs/protocol.md section 2.1), so the log sees exactly what
the cipher is given.
"""

from __future__ import annotations

import hashlib
import typing

from qgate.crypto.aead import RecordKey
from qgate.crypto.secret import Secret


class SealLog(RecordKey):
    """A RecordKey that records, for every record it seals, which key (a fingerprint) and which counter."""

    uses: typing.ClassVar[list[tuple[str, int]]] = []

    def __init__(self, key: Secret) -> None:
        super().__init__(key)
        self.fingerprint = hashlib.sha256(key.reveal()).hexdigest()[:16]

    def seal_nonce(self, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        SealLog.uses.append((self.fingerprint, int.from_bytes(nonce[4:], "big")))
        return super().seal_nonce(nonce, aad, plaintext)
