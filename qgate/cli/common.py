"""Helpers shared by the click commands: logging set-up and operator-facing errors."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import NoReturn

import click

LOG_LEVELS = ["debug", "info", "warning", "error"]


LOG_FORMATS = ["human", "json"]


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time (RFC 3339 UTC), level, logger, message, and any exception text."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        entry: dict[str, object] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, log_format: str = "human") -> None:
    """Log to stderr at ``level`` (debug, info, warning, error): human lines, or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def fail(exc: BaseException) -> NoReturn:
    """Print an error for the operator on stderr and exit with status 1."""
    click.echo(f"qgate: error: {exc}", err=True)
    sys.exit(1)
