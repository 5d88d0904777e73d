"""Shared fixtures: throw-away network namespaces for ``@pytest.mark.netns`` tests.

Tests marked ``netns`` are skipped unless running as root with ``ip`` and ``/dev/net/tun``.
Namespace names are ``qg`` + 6 random hex characters + a role suffix, unique per test, and
are deleted (with any process left in them) on every path.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def netns_available() -> str | None:
    """Return why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = netns_available()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"netns test: {reason}")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


def _delete_ns(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    for pid in pids.stdout.split():
        subprocess.run(["kill", "-9", pid], check=False, capture_output=True)
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


class NetnsFactory:
    """Creates namespaces ``qg<run><suffix>`` (lo up, IPv6 off) and deletes them all in :meth:`cleanup`."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(3)
        self.made: list[str] = []

    def __call__(self, suffix: str = "t") -> str:
        name = f"qg{self.run_id}{suffix}"
        self.made.append(name)
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1"],
            check=True,
        )  # fmt: skip
        return name

    def cleanup(self) -> None:
        for name in self.made:
            _delete_ns(name)


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """Factory ``make(suffix) -> name`` of fresh namespaces, all deleted after the test."""
    factory = NetnsFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def netns_module() -> Iterator[Callable[[str], str]]:
    """Like ``netns``, but the namespaces live for the whole test module."""
    factory = NetnsFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


def _run_python_in_ns(ns: str, code: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def ns_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run(ns, code, timeout=30)``: run Python ``code`` with this interpreter inside namespace ``ns``."""
    return _run_python_in_ns
