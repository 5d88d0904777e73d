"""``qgate kms-sim`` (one simulated ETSI GS QKD 014 KME) and ``qgate pki`` (lab CA): parsing only."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from qgate.cli.common import LOG_LEVELS, fail, setup_logging
from qgate.errors import QgateError

_FILE = click.Path(path_type=Path, dir_okay=False, exists=True, readable=True)


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise click.BadParameter(f"expected IP:PORT, got {value!r}") from None
    if not sep or not 0 <= number <= 65535:
        raise click.BadParameter(f"expected IP:PORT, got {value!r}")
    return host, number


@click.command("kms-sim")
@click.option("--kme-id", required=True, help="This KME's ID (CN of --cert).")
@click.option(
    "--listen", default="0.0.0.0:8443", show_default=True, help="IP:PORT to serve HTTPS on (port 0: any)."
)
@click.option(
    "--ca", type=_FILE, required=True, help="Lab CA (PEM) trusted for SAE and peer KME certificates."
)
@click.option("--cert", type=_FILE, required=True, help="This KME's certificate (PEM).")
@click.option("--key", type=_FILE, required=True, help="This KME's private key (PEM).")
@click.option("--peer-kme-id", required=True, help="The peer KME's ID (CN of its certificate).")
@click.option("--peer-url", default=None, help="The peer KME's base URL, https://IP:PORT.")
@click.option(
    "--link-secret-file", type=_FILE, required=True, help="Shared secret of the simulated QKD link."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=100_000.0,
    show_default=True,
    help="Key released per direction, bits/s.",
)
@click.option(
    "--max-key-count",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Keys stored per direction at most.",
)
@click.option(
    "--key-size", type=click.IntRange(min=8), default=256, show_default=True, help="Default key size, bits."
)
@click.option(
    "--min-key-size",
    type=click.IntRange(min=8),
    default=64,
    show_default=True,
    help="Smallest key size a request may ask for, bits.",
)
@click.option(
    "--max-key-size",
    type=click.IntRange(min=8),
    default=8192,
    show_default=True,
    help="Largest key size a request may ask for, bits.",
)
@click.option("--max-key-per-request", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--initial-key-count",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Keys stored at start.",
)
@click.option(
    "--burst-period",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds per burst cycle (0: steady, like fibre).",
)
@click.option(
    "--burst-duration",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds of key release per cycle (a satellite pass).",
)
@click.option("--sae", "saes", multiple=True, required=True, help="An SAE ID attached to this KME (repeat).")
@click.option(
    "--peer-sae",
    "peer_saes",
    multiple=True,
    help="An SAE ID attached to the peer KME (repeat; default: ask the peer).",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def kms_sim(
    kme_id: str,
    listen: str,
    ca: Path,
    cert: Path,
    key: Path,
    peer_kme_id: str,
    peer_url: str | None,
    link_secret_file: Path,
    rate: float,
    max_key_count: int,
    key_size: int,
    min_key_size: int,
    max_key_size: int,
    max_key_per_request: int,
    initial_key_count: int,
    burst_period: float,
    burst_duration: float,
    saes: tuple[str, ...],
    peer_saes: tuple[str, ...],
    log_level: str,
) -> None:
    """Run one simulated ETSI GS QKD 014 KME in the foreground until SIGINT/SIGTERM."""
    from qgate.crypto.secret import Secret
    from qgate.kms.sim_server import run_kme
    from qgate.kms.simulator import KmeConfig

    setup_logging(log_level)
    address = _parse_listen(listen)
    try:
        config = KmeConfig(
            kme_id=kme_id,
            peer_kme_id=peer_kme_id,
            saes=saes,
            link_secret=Secret(link_secret_file.read_bytes()),
            peer_saes=peer_saes,
            rate=rate,
            max_key_count=max_key_count,
            key_size=key_size,
            min_key_size=min_key_size,
            max_key_size=max_key_size,
            max_key_per_request=max_key_per_request,
            burst_period=burst_period,
            burst_duration=burst_duration,
            initial_key_count=initial_key_count,
        )
        run_kme(config, listen=address, ca=ca, cert=cert, key=key, peer_url=peer_url)
    except (QgateError, OSError) as exc:
        fail(exc)


@click.command("pki")
@click.option(
    "--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Directory to write into."
)
@click.option(
    "--kme",
    "kmes",
    multiple=True,
    required=True,
    help="KME_ID or KME_ID=IP[,IP...] (repeat); 127.0.0.1 is always added.",
)
@click.option("--sae", "saes", multiple=True, required=True, help="An SAE ID (repeat).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def pki(out: Path, kmes: tuple[str, ...], saes: tuple[str, ...], force: bool) -> None:
    """Write a throw-away lab CA, KME and SAE certificates (CN = ID) and the link secret to OUT."""
    from qgate.pki import make_pki

    kme_map: dict[str, list[str]] = {}
    for item in kmes:
        name, _, addrs = item.partition("=")
        if name in kme_map:
            raise click.BadParameter(f"KME {name} given twice", param_hint="--kme")
        kme_map[name] = [a.strip() for a in addrs.split(",") if a.strip()]
    try:
        make_pki(out, kmes=kme_map, saes=list(saes), force=force)
    except QgateError as exc:
        fail(exc)
        return
    click.echo(f"lab PKI written to {out}: KMEs {', '.join(kme_map)}; SAEs {', '.join(saes)}", err=True)
