"""Logs: human lines by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import json
import logging

from qgate.cli.common import JsonLineFormatter


def test_json_log_lines_carry_time_level_logger_and_message() -> None:
    args = ("site-b",)
    record = logging.LogRecord("qgate.gateway", logging.WARNING, __file__, 1, "peer %s down", args, None)
    entry = json.loads(JsonLineFormatter().format(record))
    assert entry["level"] == "warning" and entry["logger"] == "qgate.gateway"
    assert entry["message"] == "peer site-b down" and entry["time"].endswith("Z")


def test_json_log_lines_include_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("qgate", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonLineFormatter().format(record))["exception"]
