"""The control socket: status and down requests, safe permissions, one daemon per socket."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from qgate.control import request, serve
from qgate.errors import ConfigError
from qgate.status import format_status


def _run_server(path: Path, client_calls: list[str]) -> list[dict[str, object]]:
    answers: list[dict[str, object]] = []

    async def main() -> None:
        server = await serve(path, lambda req: {"ok": True, "echo": req["cmd"]})
        try:
            for cmd in client_calls:
                answers.append(await asyncio.to_thread(request, path, cmd))
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    return answers


def test_requests_get_one_json_answer_each(tmp_path: Path) -> None:
    sock = tmp_path / "ctl" / "gw.sock"
    answers = _run_server(sock, ["status", "down", "ping"])
    assert answers == [{"ok": True, "echo": "status"}, {"ok": True, "echo": "down"}, {"ok": True}]


def test_socket_and_directory_are_private(tmp_path: Path) -> None:
    sock = tmp_path / "ctl" / "gw.sock"

    async def main() -> None:
        server = await serve(sock, lambda req: {"ok": True})
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        server.close()

    asyncio.run(main())


def test_a_group_writable_socket_directory_is_refused(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    os.chmod(unsafe, 0o777)
    with pytest.raises(ConfigError, match="not writable by group or others"):
        asyncio.run(serve(unsafe / "gw.sock", lambda req: {"ok": True}))


def test_a_second_daemon_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "ctl" / "gw.sock"

    async def main() -> None:
        server = await serve(sock, lambda req: {"ok": True})
        try:
            with pytest.raises(ConfigError, match="another qgate daemon"):
                await serve(sock, lambda req: {"ok": True})
        finally:
            server.close()

    asyncio.run(main())


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "ctl" / "gw.sock"
    assert _run_server(sock, ["status"])  # leaves no listener behind
    assert _run_server(sock, ["status"]) == [{"ok": True, "echo": "status"}]


def test_no_daemon_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is qgate up running"):
        request(tmp_path / "none.sock", "status")


def test_status_table_shows_each_peer_and_why_it_is_down() -> None:
    text = format_status(
        {
            "gateway": "site-a",
            "pid": 1,
            "uptime_s": 3.0,
            "peers": [
                {"name": "site-b", "state": "down", "why": "qkd_request_failed: KME unreachable",
                 "epoch": None, "drops": {"bad_tag": 2, "replay": 0}, "tx_bytes": 0, "rx_bytes": 0},
            ],
        }
    )  # fmt: skip
    assert "site-b" in text and "down" in text and "KME unreachable" in text and "bad_tag 2" in text


def test_status_table_names_what_the_kme_does_and_the_tls_suite() -> None:
    kme = {
        "reachable": True,
        "supply_mode": "on_demand",
        "supply_reason": "the slave's KME refused prefetched key_ID k1",
        "prefetch_stock": 0,
        "prefetch_batch": 16,
        "behaviour": ["max_key_per_request 4: prefetch batches of 4"],
        "last_error": "",
    }
    tls = {
        "version": "TLSv1.2",
        "cipher": "ECDHE-ECDSA-AES256-SHA",
        "weak_ciphers_allowed": True,
        "server_identity": "pinned by CN KME_A",
    }
    peers = [{"name": "site-b", "state": "up", "kme": kme}]
    text = format_status({"gateway": "site-a", "pid": 1, "uptime_s": 3.0, "peers": peers, "kme_tls": tls})
    assert "site-b: kme reachable, supply on_demand, the slave's KME refused prefetched key_ID k1" in text
    assert "max_key_per_request 4" in text
    assert "kme tls: TLSv1.2 ECDHE-ECDSA-AES256-SHA, server pinned by CN KME_A; weak ciphers allowed" in text
