"""Test helper: find and load the shared known-answer vectors (``../shared/vectors``).

Vectors are data: tests load them and compare; expected values are never pasted by hand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def vectors_dir() -> Path:
    """Return ``<repo>/../shared/vectors``."""
    return (REPO_ROOT.parent / "shared" / "vectors").resolve()


def vector_path(*parts: str) -> Path:
    """Return the path of a vector file under :func:`vectors_dir`."""
    return vectors_dir().joinpath(*parts)


def load_json(*parts: str) -> Any:
    """Load a JSON vector file."""
    with vector_path(*parts).open(encoding="utf-8") as handle:
        return json.load(handle)


def wycheproof_tests(*parts: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield ``(group, test)`` for every test of a Wycheproof JSON file."""
    data = load_json(*parts)
    for group in data["testGroups"]:
        for test in group["tests"]:
            yield group, test


def wycheproof_params(*parts: str) -> list[Any]:
    """Return pytest params ``(group, test)`` with ids ``tc<tcId>``."""
    import pytest

    return [pytest.param(g, t, id=f"tc{t['tcId']}") for g, t in wycheproof_tests(*parts)]


_RSP_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def parse_rsp(*parts: str, start_key: str) -> list[dict[str, str]]:
    """Parse a NIST/KAT ``.rsp``/``.txt`` file into records of ``key = value`` lines.

    A new record starts at every ``start_key`` line; lines in ``[brackets]`` set header
    fields copied into the following records (lower-cased keys); a lone ``FAIL`` line sets
    ``FAIL = ""``.
    """
    records: list[dict[str, str]] = []
    header: dict[str, str] = {}
    current: dict[str, str] | None = None
    for raw in vector_path(*parts).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            key, _, value = line[1:-1].partition("=")
            header[key.strip().lower()] = value.strip()
            current = None
            continue
        if line == "FAIL":
            if current is not None:
                current["FAIL"] = ""
            continue
        match = _RSP_LINE.match(line)
        if match is None:
            continue
        key, value = match.group(1), match.group(2)
        if key == start_key:
            current = dict(header)
            records.append(current)
        if current is not None:
            current[key] = value
    return records
