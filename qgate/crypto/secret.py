"""A holder for key material that never shows its bytes by accident.

Secrets print as ``<SECRET>`` (as Rosenpass does), compare in constant time, cannot be
hashed (so they never become dict keys or set members) and refuse to be pickled (so they
never leave the process through multiprocessing or a cache by mistake).
"""

from __future__ import annotations

import hmac
from typing import Final, NoReturn

_REDACTED: Final = "<SECRET>"


class Secret:
    """Immutable holder of secret bytes (keys, shared secrets, QKD key material).

    Args:
        value: the secret bytes; copied, so later changes to a ``bytearray`` do not leak in.

    The only way to the bytes is :meth:`reveal`, which makes every use greppable.
    """

    __slots__ = ("_value",)

    _value: bytes

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        object.__setattr__(self, "_value", bytes(value))

    def reveal(self) -> bytes:
        """Return the secret bytes. Never log, print or put them in an exception."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return _REDACTED

    def __str__(self) -> str:
        return _REDACTED

    def __format__(self, format_spec: str) -> str:
        return _REDACTED

    def __eq__(self, other: object) -> bool:
        """Compare with another Secret in constant time (``hmac.compare_digest``)."""
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    __hash__ = None  # type: ignore[assignment]

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret refuses to be pickled")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("Secret refuses to be pickled")

    def __getstate__(self) -> NoReturn:
        raise TypeError("Secret refuses to be pickled")
