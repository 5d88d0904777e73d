"""Helpers shared by the click commands: logging set-up and operator-facing errors."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click

LOG_LEVELS = ["debug", "info", "warning", "error"]


def setup_logging(level: str) -> None:
    """Log to stderr, one line per record, at ``level`` (debug, info, warning, error)."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def fail(exc: BaseException) -> NoReturn:
    """Print an error for the operator on stderr and exit with status 1."""
    click.echo(f"qgate: error: {exc}", err=True)
    sys.exit(1)
