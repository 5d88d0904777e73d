"""The lab run directory: PKI, gateway identities, rendered policies, the transfer payload.

Layout (all paths in the policies are relative to the run directory)::

    <run>/pki/{ca,KME_A,KME_B,SAE_A,SAE_B}.{pem,key}, link.secret   (qgate.pki.make_pki)
    <run>/keys/site-a.{key,pub}, site-b.{key,pub}                    (qgate.keyfiles.write_identity)
    <run>/site-a.yaml, site-b.yaml                                   (rendered policies)
    <run>/payload.bin                                                (random TCP transfer bytes)
    <run>/logs/*.log, wan-a.pcap, stats-a.json, stats-b.json

Policies are rendered from the repository's ``policies/site-a.yaml`` and ``site-b.yaml`` when
they exist (keeping their KEM, X25519 and fail-mode choices) or from a built-in template; the
lab always forces what its topology and acceptance need: addresses, KME credentials, the TUN,
the peer. Rekey timing comes from the template (``policies/`` uses QKD every 1 s, ML-KEM every
4 s, so a 6 s run sees several rekeys), else :data:`LAB_REKEY`, unless the caller forces one.

KME quirks (``qgate lab run --kme-quirk NAME``, :mod:`qgate.kms.quirks`) go to both KMEs; the
ones the gateways must answer with an explicit policy decision also shape the PKI and the
policies (:func:`quirk_kme_policy`): ``no-san`` writes KME certificates without
subjectAltName and pins each gateway's KME by CN (``kme.server_cn``); ``cbc-only`` allows one
CBC-SHA suite besides the AEAD ones (``kme.tls_ciphers``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import yaml

from qgate import lab_net as net

log = logging.getLogger(__name__)

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
POLICY_TEMPLATE_DIR: Final = REPO_ROOT / "policies"
IDENTITY_ALG: Final = "ml-dsa-65"
GATEWAY_PORT: Final = 51820
KME_PORT: Final = 8443
TUN_NAME: Final = "qgtun0"
TUN_MTU: Final = 1420
LAB_REKEY: Final = {"interval": 1.0, "kem_interval": 4.0, "max_key_age": 3.0}
"""Seconds: the lab's rekey timing (QKD ratchet, full ML-KEM handshake, hard key age)."""
KME_RATE: Final = 100_000
"""Bits per second: the simulated QKD key rate of each lab KME (``kms-sim --rate``)."""
ADMIN_CN: Final = "ADMIN"
"""CN of the lab's fault-admin client certificate (``kms-sim --admin ADMIN``)."""
CBC_POLICY_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE-ECDSA-AES256-SHA"
"""OpenSSL cipher list the lab policy allows toward a ``cbc-only`` KME (``kme.tls_ciphers``)."""


@dataclass(frozen=True)
class SiteOverrides:
    """Policy values one lab site's rendered policy is forced to (on top of the template).

    Attributes:
        peer: keys of the peer entry, e.g. ``{"fail_mode": "pqc_only_if_qkd_down", "qkd_prefetch": 0}``.
        kme: keys of the ``kme`` section, e.g. ``{"timeout": 1.0}`` (seconds).
        rekey: keys of the peer's ``rekey`` mapping (seconds), merged into the rendered one.
        tun: keys of the gateway's ``tun`` section besides name and MTU, e.g. ``{"offload": False}``.
    """

    peer: Mapping[str, object] = field(default_factory=dict)
    kme: Mapping[str, object] = field(default_factory=dict)
    rekey: Mapping[str, float] = field(default_factory=dict)
    tun: Mapping[str, object] = field(default_factory=dict)


SITES: Final[dict[str, dict[str, str]]] = {
    "a": {"name": "site-a", "peer": "b", "wan": net.GW_A_WAN, "sae": "SAE_A", "kme": "KME_A",
          "role": "master", "peer_lan": net.LAN_B},
    "b": {"name": "site-b", "peer": "a", "wan": net.GW_B_WAN, "sae": "SAE_B", "kme": "KME_B",
          "role": "slave", "peer_lan": net.LAN_A},
}  # fmt: skip


def make_pki_and_identities(run_dir: Path, *, admin: bool = False, kme_quirks: Sequence[str] = ()) -> None:
    """Write the lab PKI (``<run>/pki``) and both gateway identities (``<run>/keys``).

    Args:
        run_dir: the run directory.
        admin: also write the fault-admin client certificate ``pki/ADMIN.{pem,key}``
            (:data:`ADMIN_CN`), for KMEs started with ``--admin ADMIN``.
        kme_quirks: the KMEs' quirks; ``no-san``: KME certificates without subjectAltName.

    Raises:
        ConfigError: (from qgate.keyfiles) an identity could not be written.
    """
    from qgate.keyfiles import write_identity
    from qgate.pki import make_pki

    make_pki(
        run_dir / "pki",
        kmes={"KME_A": [net.GW_A_WAN], "KME_B": [net.GW_B_WAN]},
        saes=["SAE_A", "SAE_B", *([ADMIN_CN] if admin else [])],
        no_san_kmes=["KME_A", "KME_B"] if "no-san" in kme_quirks else [],
    )
    (run_dir / "keys").mkdir(mode=0o700, exist_ok=True)
    for site in ("a", "b"):
        write_identity(run_dir / "keys" / f"site-{site}.key", IDENTITY_ALG)


def _mapping(value: object) -> dict[str, object]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _template(site: str) -> dict[str, object]:
    path = POLICY_TEMPLATE_DIR / f"site-{site}.yaml"
    if path.is_file():
        loaded = yaml.safe_load(path.read_text())
        if isinstance(loaded, dict):
            log.info("rendering lab policy from %s", path)
            return _mapping(loaded)
    return {"gateway": {}, "kme": {}, "peers": [{}]}


def quirk_kme_policy(site: str, kme_quirks: Sequence[str]) -> dict[str, object]:
    """Return the ``kme`` policy keys ``site``'s gateway needs to work with KMEs having ``kme_quirks``.

    ``no-san``: ``server_cn`` (the KME's certificate CN, pinned instead of a hostname check);
    ``cbc-only``: ``tls_ciphers`` = :data:`CBC_POLICY_CIPHERS`. Nothing for other quirks.
    """
    keys: dict[str, object] = {}
    if "no-san" in kme_quirks:
        keys["server_cn"] = SITES[site]["kme"]
    if "cbc-only" in kme_quirks:
        keys["tls_ciphers"] = CBC_POLICY_CIPHERS
    return keys


def render_policy(
    site: str,
    *,
    rekey: dict[str, float] | None = None,
    overrides: SiteOverrides | None = None,
    kme_quirks: Sequence[str] = (),
) -> dict[str, object]:
    """Return the lab policy of ``site`` (``a`` or ``b``) as a YAML-ready mapping.

    Args:
        site: which gateway.
        rekey: rekey timing (seconds) to force; default: the template's, else :data:`LAB_REKEY`.
        overrides: further values to force into this site's policy (applied last, so they win
            over the template, ``rekey`` and ``kme_quirks``; the topology fields are forced
            again after them).
        kme_quirks: the KMEs' quirks; adds the ``kme`` keys of :func:`quirk_kme_policy`.
    """
    info, peer = SITES[site], SITES[SITES[site]["peer"]]
    doc = _template(site)
    gateway = _mapping(doc.get("gateway"))
    gateway.update(
        name=info["name"],
        identity=f"keys/site-{site}.key",
        listen=f"{info['wan']}:{GATEWAY_PORT}",
        tun={"name": TUN_NAME, "mtu": TUN_MTU},
    )
    extra = overrides or SiteOverrides()
    gateway["tun"] = {**extra.tun, "name": TUN_NAME, "mtu": TUN_MTU}
    kme = _mapping(doc.get("kme"))
    kme.update(quirk_kme_policy(site, kme_quirks))
    kme.update(extra.kme)
    kme.update(
        url=f"https://127.0.0.1:{KME_PORT}",
        sae_id=info["sae"],
        ca="pki/ca.pem",
        cert=f"pki/{info['sae']}.pem",
        key=f"pki/{info['sae']}.key",
        timeout=kme.get("timeout", 5),
    )
    peers = doc.get("peers")
    first = _mapping(peers[0] if isinstance(peers, list) and peers else None)
    first.update(extra.peer)
    first.update(
        name=peer["name"],
        public_key=f"keys/{peer['name']}.pub",
        endpoint=f"{peer['wan']}:{GATEWAY_PORT}",
        sae_id=peer["sae"],
        qkd_role=info["role"],
        subnets=[info["peer_lan"]],
    )
    if rekey is not None or not isinstance(first.get("rekey"), dict):
        first["rekey"] = dict(rekey or LAB_REKEY)
    if extra.rekey:
        first["rekey"] = {**_mapping(first.get("rekey")), **extra.rekey}
    first.setdefault("kem", "ml-kem-768")
    first.setdefault("fail_mode", "qkd_and_pqc")
    return {"gateway": gateway, "kme": kme, "peers": [first]}


def write_policies(
    run_dir: Path,
    *,
    rekey: dict[str, float] | None = None,
    overrides: Mapping[str, SiteOverrides] | None = None,
    kme_quirks: Sequence[str] = (),
) -> dict[str, Path]:
    """Render both lab policies into ``run_dir``; return ``{"a": path, "b": path}``.

    Args:
        run_dir: the run directory.
        rekey: rekey timing (seconds) forced into both policies (see :func:`render_policy`).
        overrides: per site (``a``, ``b``) values forced into that site's policy.
        kme_quirks: the KMEs' quirks (see :func:`quirk_kme_policy`).

    When ``qgate.policy.load_policy`` exists, each rendered file is validated with it.

    Raises:
        PolicyError: a rendered policy does not validate.
    """
    paths: dict[str, Path] = {}
    for site in ("a", "b"):
        path = run_dir / f"site-{site}.yaml"
        doc = render_policy(site, rekey=rekey, overrides=(overrides or {}).get(site), kme_quirks=kme_quirks)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths[site] = path
    try:
        from qgate.policy import load_policy  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        log.warning("qgate.policy.load_policy not available; lab policies not validated")
        return paths
    for path in paths.values():
        load_policy(path)
    return paths


def write_payload(run_dir: Path, size: int) -> bytes:
    """Write ``size`` random bytes (os.urandom) to ``<run>/payload.bin`` and return them."""
    data = os.urandom(size)
    (run_dir / "payload.bin").write_bytes(data)
    return data


def kms_sim_argv(
    python: str,
    run_dir: Path,
    site: str,
    *,
    rate: int = KME_RATE,
    admins: Sequence[str] = (),
    quirks: Sequence[str] = (),
) -> list[str]:
    """Return the ``qgate kms-sim`` command of ``site``'s KME (run in that gateway's namespace).

    Args:
        python: interpreter to run ``-m qgate`` with.
        run_dir: the run directory (PKI under ``pki/``).
        site: ``a`` or ``b``.
        rate: simulated QKD key rate, bits per second.
        admins: client certificate CNs allowed to inject faults (``--admin``, e.g. :data:`ADMIN_CN`).
        quirks: KME product quirks (``--quirk``, names of ``qgate.kms.quirks.QUIRKS``; checked
            by kms-sim).
    """
    info, peer = SITES[site], SITES[SITES[site]["peer"]]
    pki = run_dir / "pki"
    return [
        python, "-m", "qgate", "kms-sim",
        "--kme-id", info["kme"], "--listen", f"0.0.0.0:{KME_PORT}",
        "--ca", str(pki / "ca.pem"), "--cert", str(pki / f"{info['kme']}.pem"),
        "--key", str(pki / f"{info['kme']}.key"),
        "--peer-kme-id", peer["kme"], "--peer-url", f"https://{peer['wan']}:{KME_PORT}",
        "--link-secret-file", str(pki / "link.secret"),
        "--rate", str(rate), "--max-key-count", "1000",
        "--sae", info["sae"], "--peer-sae", peer["sae"],
        *(arg for cn in admins for arg in ("--admin", cn)),
        *(arg for name in quirks for arg in ("--quirk", name)),
    ]  # fmt: skip


def gateway_argv(python: str, run_dir: Path, site: str) -> list[str]:
    """Return the ``qgate up`` command of ``site``'s gateway, with its stats file in the run dir."""
    return [
        python, "-m", "qgate", "up", str(run_dir / f"site-{site}.yaml"),
        "--stats-file", str(run_dir / f"stats-{site}.json"),
        "--socket", str(run_dir / f"control-{site}.sock"),
        "--audit-log", str(run_dir / f"audit-{site}.jsonl"),
        "--log-level", "debug",  # every KME retry's event too (drills count them); info: once a streak
    ]  # fmt: skip
