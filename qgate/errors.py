"""The qgate exception hierarchy: one root, subclasses named by whose fault it is.

Per-packet failures on the data plane (bad tag, replay, unknown epoch) are counted and
dropped, never raised through the forwarding loop. Messages never carry key bytes.
"""

from __future__ import annotations

from pathlib import Path


class QgateError(Exception):
    """Root of every error qgate raises on purpose; anything else is a bug."""


class PolicyError(QgateError):
    """A policy file (or a value in it) is invalid.

    Attributes:
        file: the policy file, when known.
        line: 1-based line number in that file, when known.
        path: dotted YAML path of the offending field (``peers[0].rekey.interval``).
        problems: every problem found, as ``(line, path, message)``; ``str()`` lists them all.
    """

    def __init__(
        self,
        message: str,
        *,
        file: Path | str | None = None,
        line: int | None = None,
        path: str | None = None,
        problems: list[tuple[int | None, str, str]] | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.line = line
        self.path = path
        self.problems = problems if problems is not None else [(line, path or "", message)]
        super().__init__(self._render())

    def _render(self) -> str:
        rows = []
        for line, path, message in self.problems:
            where = self.file or "<policy>"
            if line is not None:
                where += f":{line}"
            rows.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        return "\n".join(rows)


class ConfigError(QgateError):
    """A local file or setting outside the policy (key file, certificate, option) is unusable."""


class KmsError(QgateError):
    """Getting QKD keys from the Key Management Entity failed (ETSI GS QKD 014)."""


class KmsUnavailableError(KmsError):
    """The KME could not be reached or said it cannot serve now (connection, timeout, HTTP 503).

    Retrying later may succeed.
    """


class KmsBadAnswerError(KmsError):
    """The KME answered, but the answer is an error or does not meet ETSI GS QKD 014.

    Attributes:
        status: the HTTP status code, or None when the connection itself misbehaved.
        kme_message: the ``message`` field of the KME's error body, when it sent one.
    """

    def __init__(self, text: str, *, status: int | None = None, kme_message: str | None = None) -> None:
        self.status = status
        self.kme_message = kme_message
        super().__init__(text)


class KmsAuthError(KmsBadAnswerError):
    """The KME refused the caller (HTTP 401) or the TLS handshake with it failed on trust."""


class CryptoError(QgateError):
    """A cryptographic input is unusable (invalid encapsulation key, all-zero X25519 output)."""


class ProtocolError(QgateError):
    """A qgate wire-protocol rule was broken."""


class LocalProtocolError(ProtocolError):
    """This side misused the protocol API (a bug in the caller, not the peer's fault)."""


class RemoteProtocolError(ProtocolError):
    """The peer (or someone on the path) sent a malformed or out-of-place message."""


class AuthenticationError(ProtocolError):
    """A signature, pinned identity or key-confirmation MAC did not verify."""


class KeyExhaustedError(QgateError):
    """No usable traffic key: its age or packet limit is reached and no fresh key is available."""


class DataPlaneError(QgateError):
    """The TUN device, UDP socket or network configuration failed."""
