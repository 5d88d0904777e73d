"""qgate.crypto.secret.Secret: never shows, hashes or pickles its bytes."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest

from qgate.crypto.secret import Secret


def test_secret_repr_str_and_format_hide_bytes() -> None:
    s = Secret(b"top-secret-key")
    assert repr(s) == str(s) == f"{s}" == "<SECRET>"
    assert "top" not in repr([s]) and "top" not in f"{s!r:>20}"


def test_secret_in_log_message_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("key=%s %r", Secret(b"abc123"), Secret(b"abc123"))
    assert "abc123" not in caplog.text


def test_secret_reveal_len_and_constant_time_equality() -> None:
    s = Secret(bytearray(b"\x01\x02"))
    assert s.reveal() == b"\x01\x02" and len(s) == 2
    assert s == Secret(b"\x01\x02") and s != Secret(b"\x01\x03")
    assert s != b"\x01\x02"  # never equal to plain bytes


def test_secret_is_immutable_and_unhashable() -> None:
    s = Secret(b"k")
    with pytest.raises(AttributeError):
        s._value = b"x"
    with pytest.raises(TypeError):
        hash(s)
    with pytest.raises(TypeError):
        {s}  # noqa: B018


def test_secret_refuses_pickling_but_copies_as_itself() -> None:
    s = Secret(b"k")
    with pytest.raises(TypeError):
        pickle.dumps(s)
    assert copy.copy(s) is s and copy.deepcopy(s) is s
