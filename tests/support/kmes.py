"""Simulated KMEs on 127.0.0.1 over HTTPS with mutual TLS, and a canned stand-in KME.

:func:`start_kme` starts one ``qgate.kms.sim_server.KmeService`` of the lab pair KME_A / KME_B
(certificates from ``qgate.pki.make_pki``), :func:`link_kmes` joins two of them over the
KME-to-KME channel, and :func:`serve_canned` serves a :class:`Canned` KME whose every answer
the test sets, with an ETSI 014 client pointed at it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from qgate.crypto.secret import Secret
from qgate.kms.client import Etsi014Client, server_context
from qgate.kms.sim_server import PEER_TIMEOUT, HttpsPeerLink, KmeHttpServer, KmeService
from qgate.kms.simulator import KmeConfig

HOST: Final = "127.0.0.1"
PEERS: Final = {"KME_A": "KME_B", "KME_B": "KME_A"}
"""The other KME of the lab pair."""
SAES: Final = {"KME_A": ("SAE_A", "SAE_C"), "KME_B": ("SAE_B",)}
"""SAEs attached to each KME unless a test says otherwise."""


def start_kme(
    pki: Path,
    kme_id: str,
    *,
    saes: tuple[str, ...] | None = None,
    peer_saes: tuple[str, ...] | None = None,
    host: str = HOST,
    initial: int = 600,
    admins: tuple[str, ...] = (),
    quirks: tuple[str, ...] = (),
) -> KmeService:
    """Start a serving KME ``kme_id`` (KME_A or KME_B) with no key release (rate 0).

    Args:
        pki: folder of a ``make_pki`` run holding ``ca.pem``, ``<kme_id>.pem``/``.key`` and
            ``link.secret``.
        kme_id: KME_A or KME_B; its peer is the other one.
        saes: SAEs attached to it; default ``SAES[kme_id]``.
        peer_saes: SAEs attached to the peer; default ``SAES[peer]``; ``()``: ask the peer.
        host: address to listen on (a free port is picked: ``service.port``).
        initial: keys stored at start (at most 1000 per direction, 16 per request).
        admins: certificate CNs allowed to call the fault admin API.
        quirks: product quirks (``qgate.kms.quirks``).

    Raises:
        ConfigError: from ``KmeService.bind`` (bad config, certificates or address).
    """
    peer = PEERS[kme_id]
    config = KmeConfig(
        kme_id=kme_id,
        peer_kme_id=peer,
        saes=SAES[kme_id] if saes is None else saes,
        peer_saes=SAES[peer] if peer_saes is None else peer_saes,
        link_secret=Secret((pki / "link.secret").read_bytes()),
        rate=0.0,
        max_key_count=1000,
        initial_key_count=initial,
        max_key_per_request=16,
        admins=admins,
        quirks=quirks,
    )
    service = KmeService.bind(
        config, listen=(host, 0), ca=pki / "ca.pem", cert=pki / f"{kme_id}.pem", key=pki / f"{kme_id}.key"
    )
    service.start()
    return service


def _peer_link(pki: Path, service: KmeService, peer: KmeService, timeout: float) -> HttpsPeerLink:
    me = service.kme.config.kme_id
    return HttpsPeerLink(
        f"https://{HOST}:{peer.port}",
        peer_kme_id=peer.kme.config.kme_id,
        ca=pki / "ca.pem",
        cert=pki / f"{me}.pem",
        key=pki / f"{me}.key",
        timeout=timeout,
        quirks=service.kme.quirks,
    )


def link_kmes(pki: Path, a: KmeService, b: KmeService, *, timeout: float = PEER_TIMEOUT) -> None:
    """Join ``a`` and ``b`` both ways over HTTPS, each fitted to its own quirks.

    Args:
        pki: the folder both KMEs' certificates come from.
        a, b: serving KMEs (peers listen on ``127.0.0.1``).
        timeout: seconds per KME-to-KME request.
    """
    a.kme.peer = _peer_link(pki, a, b, timeout)
    b.kme.peer = _peer_link(pki, b, a, timeout)


class Canned:
    """Stands in for a Kme: answers every request with ``answer``."""

    def __init__(self) -> None:
        self.answer: tuple[int, bytes] = (200, b"{}")

    def handle(
        self, method: str, path: str, query: object, body: bytes, caller: str | None
    ) -> tuple[int, bytes]:
        return self.answer


@contextmanager
def serve_canned(
    pki: Path, *, kme_id: str = "KME_A", sae: str = "SAE_A", timeout: float = 5.0
) -> Iterator[tuple[Canned, Etsi014Client]]:
    """Serve a :class:`Canned` KME on 127.0.0.1 and yield it with a client calling it.

    Args:
        pki: ``make_pki`` folder with ``ca.pem``, ``<kme_id>.pem``/``.key`` (SAN 127.0.0.1)
            and ``<sae>.pem``/``.key``.
        kme_id: the server certificate to present.
        sae: the client certificate to present.
        timeout: the client's seconds per request.

    Yields:
        ``(canned, client)``: set ``canned.answer`` to ``(status, body)`` before each call.
    """
    fake = Canned()
    context = server_context(ca=pki / "ca.pem", cert=pki / f"{kme_id}.pem", key=pki / f"{kme_id}.key")
    server = KmeHttpServer((HOST, 0), fake, context)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = Etsi014Client(
        f"https://{HOST}:{server.server_address[1]}",
        ca=pki / "ca.pem",
        cert=pki / f"{sae}.pem",
        key=pki / f"{sae}.key",
        timeout=timeout,
    )
    try:
        yield fake, client
    finally:
        server.shutdown()
        server.server_close()
