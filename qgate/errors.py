"""The qgate exception hierarchy: one root, subclasses named by whose fault it is.

Per-packet failures on the data plane (bad tag, replay, unknown epoch) are counted and
dropped, never raised through the forwarding loop. Messages never carry key bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Getting QKD keys from the Key Management Entity failed (ETSI GS QKD 014).

    Subclasses say what to do about it: :class:`KmsUnavailableError` (retry later, with its
    :class:`KmsExhaustedError`), :class:`KmsBadAnswerError` (the KME answered with an error or
    broke the spec: retrying the same request will not help), with its :class:`KmsAuthError`
    (fix certificates or KME configuration) and :class:`KmsKeyRejectedError` (these key_IDs
    are dead). The message and attributes carry no key bytes.

    Attributes:
        status: the HTTP status of the KME's answer, or None when there was no valid answer
            (connection refused, timeout, TLS failure, not HTTP).
        kme_message: the ``message`` of the KME's Error body (section 6.5), printable and cut,
            when it sent one.
        kme_details: the ``details`` entries of that body, each as compact printable JSON cut
            to a few hundred characters (at most a handful); empty when none.
    """

    def __init__(
        self,
        text: str,
        *,
        status: int | None = None,
        kme_message: str | None = None,
        kme_details: tuple[str, ...] = (),
    ) -> None:
        self.status = status
        self.kme_message = kme_message
        self.kme_details = tuple(kme_details)
        super().__init__(text)


class KmsUnavailableError(KmsError):
    """The KME could not be reached or said it cannot serve now; retrying later may succeed.

    Raised for connection refused or reset, timeouts, name resolution failures and the HTTP
    statuses 503 (ETSI GS QKD 014 section 5), 502 and 504 (a proxy in front of an unreachable
    KME) and 429 (rate limit). Never a verdict on particular key_IDs.
    """


class KmsExhaustedError(KmsUnavailableError):
    """The KME is reachable but has no key to give now (its store for this SAE pair is empty).

    Raised for an error answer saying so (503, or 400/404/422/500 from products that do not use
    503: "not enough keys available", "insufficient key material", "key pool exhausted") and
    for a 200 Key container holding no key at all. Retry once the QKD link has made more key.
    """


class KmsBadAnswerError(KmsError):
    """The KME answered, but the answer is an error or does not meet ETSI GS QKD 014.

    Repeating the same request is not expected to help; ``status`` is 200 when a 200 answer
    failed the checks of :mod:`qgate.kms.etsi014`, None when the answer was not valid HTTP.
    """


class KmsAuthError(KmsBadAnswerError):
    """The KME refused the caller, or the TLS handshake with it failed on trust.

    Raised for 401 and 403 on status and enc_keys, for any error answer whose message is about
    the caller's certificate or SAE identity (400 "wrong SAE certificate" too, and on dec_keys),
    and for TLS trust failures (``status`` None). Fix certificates or the KME's SAE configuration.
    """


class KmsKeyRejectedError(KmsBadAnswerError):
    """The KME answered dec_keys but refuses these key_IDs: unknown, consumed, expired, superseded.

    Raised only for "Get key with key IDs" (section 5.3), for 400, 401, 403, 404, 409, 410 and
    422 answers whose message or details are about the keys ("unknown key_ID", "key_ID already
    retrieved", "keys do not exist"), never for an unreachable or 503 KME and never for a
    problem with the caller's certificate (that is :class:`KmsAuthError`). The master SAE's
    key_IDs are dead: it must take fresh keys.

    Attributes:
        key_ids: the key_IDs the refused request asked for (safe to log).
    """

    def __init__(
        self,
        text: str,
        *,
        key_ids: Sequence[str] = (),
        status: int | None = None,
        kme_message: str | None = None,
        kme_details: tuple[str, ...] = (),
    ) -> None:
        self.key_ids = tuple(key_ids)
        super().__init__(text, status=status, kme_message=kme_message, kme_details=kme_details)


class KmsTlsError(KmsAuthError):
    """The TLS connection to the KME failed, or its certificate broke a pin (``status`` is None).

    Attributes:
        cause: the class of failure (:data:`qgate.kms.tls.CAUSES`): ``no_shared_cipher``,
            ``protocol_version``, ``unknown_ca`` (server certificate not signed by ``kme.ca``),
            ``cert_expired``, ``cert_not_yet_valid``, ``cert_invalid``, ``name_mismatch``,
            ``pin_mismatch``, ``client_cert_refused`` (the KME refused our certificate),
            ``handshake_closed`` (closed without saying why) or ``tls_other``.
    """

    def __init__(self, text: str, *, cause: str) -> None:
        self.cause = cause
        super().__init__(text, status=None)


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
