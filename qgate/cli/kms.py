"""``qgate kms-sim`` (one simulated ETSI GS QKD 014 KME) and ``qgate pki`` (lab CA): parsing only."""

from __future__ import annotations

import inspect
import ipaddress
from pathlib import Path

import click

from qgate.cli.common import LOG_LEVELS, fail, setup_logging
from qgate.errors import QgateError
from qgate.kms.quirks import QUIRKS, check_quirks

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


def _check_quirks(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return check_quirks(value)
    except QgateError as exc:
        raise click.BadParameter(str(exc)) from None


_QUIRK_TABLE = "\n".join(f"  {name:15} {text}" for name, text in QUIRKS.items())


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
    default=None,
    help="Steady key release per direction, bits/s, like a fibre link [default: 100000]. With "
    "--burst-period and no --burst-bits: the rate during each pass.",
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
    "--burst-bits",
    type=click.IntRange(min=0),
    default=None,
    help="Satellite passes: bits released per direction by each pass, nothing between passes "
    "(needs --burst-period; not with --rate).",
)
@click.option(
    "--burst-period",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds from one pass to the next (0: steady release at --rate).",
)
@click.option(
    "--burst-duration",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds each pass lasts, its key spread evenly over it (0: all at the start of the period).",
)
@click.option("--sae", "saes", multiple=True, required=True, help="An SAE ID attached to this KME (repeat).")
@click.option(
    "--peer-sae",
    "peer_saes",
    multiple=True,
    help="An SAE ID attached to the peer KME (repeat; default: ask the peer).",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="KIND[:NAME=VALUE,...]",
    help="Misbehave from the start (repeat; kinds below), e.g. error:code=500,body=html,endpoint=enc_keys,"
    "count=3.",
)
@click.option(
    "--admin",
    "admins",
    multiple=True,
    metavar="CN",
    help="Client certificate CN allowed to change faults at run time (repeat), over mutual TLS on this "
    "KME's port: GET|POST|DELETE /kme/v1/admin/faults, DELETE /kme/v1/admin/faults/ID. E.g. ADMIN "
    "from 'qgate pki --sae ADMIN', or the peer KME's ID. Default: nobody.",
)
@click.option(
    "--quirk",
    "quirks",
    multiple=True,
    metavar="NAME",
    callback=_check_quirks,
    help="Behave for good like a third-party KME product (repeat; names listed below).",
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
    rate: float | None,
    max_key_count: int,
    key_size: int,
    min_key_size: int,
    max_key_size: int,
    max_key_per_request: int,
    initial_key_count: int,
    burst_bits: int | None,
    burst_period: float,
    burst_duration: float,
    saes: tuple[str, ...],
    peer_saes: tuple[str, ...],
    faults: tuple[str, ...],
    admins: tuple[str, ...],
    quirks: tuple[str, ...],
    log_level: str,
) -> None:
    """Run one simulated ETSI GS QKD 014 KME in the foreground until SIGINT/SIGTERM.

    Key release: steady at --rate bits/s (fibre), or --burst-bits per pass every --burst-period
    seconds (satellite).

    Faults, given with --fault at start or POSTed as JSON by an --admin certificate:

    \b
      delay:seconds=S            sleep S s, then answer
      error:code=C[,body=B]      answer HTTP C (400..599), body json|html|empty
      short[:missing=N]          200 with N keys fewer than asked
      repeat_id                  200 with a key_ID twice
      wrong_size[:bits=N]        200 with keys of N bits (default: size in bytes)
      forget                     dec_keys: drop the key_IDs, answer 400 unknown key_ID
      close                      serve (keys consumed), close without an answer
      down:seconds=T[,after=S]   after S s refuse connections for T s
    All but down take endpoint=status|enc_keys|dec_keys and count=N (default: every
    endpoint, until cleared).

    \b
    Admin API (mutual TLS, this KME's port, CN given with --admin):
      curl --cacert ca.pem --cert ADMIN.pem --key ADMIN.key https://127.0.0.1:8443/kme/v1/admin/faults \\
        -d '{"kind": "error", "code": 503, "endpoint": "enc_keys", "count": 2}'
      GET lists the faults, DELETE .../faults clears all, DELETE .../faults/ID one.

    Quirks (--quirk NAME) are not events but permanent traits of the third-party ETSI 014 KMEs
    deployments meet (each is logged at start; qgate.kms.quirks says what product behaviour it
    copies; the peer KME is taken to be the same product):
    """
    from qgate.crypto.secret import Secret
    from qgate.kms.faults import parse_fault_option
    from qgate.kms.sim_server import run_kme
    from qgate.kms.simulator import KmeConfig

    setup_logging(log_level)
    address = _parse_listen(listen)
    if burst_bits is not None and rate is not None:
        raise click.UsageError("--rate is the steady release; with --burst-bits give only --burst-period")
    try:
        fault_specs = [parse_fault_option(text) for text in faults]
    except QgateError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    try:
        config = KmeConfig(
            kme_id=kme_id,
            peer_kme_id=peer_kme_id,
            saes=saes,
            link_secret=Secret(link_secret_file.read_bytes()),
            peer_saes=peer_saes,
            rate=100_000.0 if rate is None else rate,
            max_key_count=max_key_count,
            key_size=key_size,
            min_key_size=min_key_size,
            max_key_size=max_key_size,
            max_key_per_request=max_key_per_request,
            burst_period=burst_period,
            burst_duration=burst_duration,
            burst_bits=burst_bits,
            initial_key_count=initial_key_count,
            admins=admins,
            quirks=quirks,
        )
        run_kme(config, listen=address, ca=ca, cert=cert, key=key, peer_url=peer_url, faults=fault_specs)
    except (QgateError, OSError) as exc:
        fail(exc)


kms_sim.help = f"{inspect.cleandoc(kms_sim.help or '')}\n\n\b\n{_QUIRK_TABLE}"


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
@click.option(
    "--no-san",
    "no_san",
    multiple=True,
    metavar="KME_ID",
    help="Give this KME (one of --kme) a certificate without subjectAltName, CN only (repeat): for "
    "'kms-sim --quirk no-san'; clients must pin it (kme.server_cn or kme.server_sha256).",
)
@click.option(
    "--client-ca",
    is_flag=True,
    help="Issue the SAE certificates from a second CA, client-ca.pem; also writes ca-bundle.pem (both "
    "CAs) for 'kms-sim --ca', while SAEs keep trusting ca.pem.",
)
@click.option(
    "--intermediate",
    is_flag=True,
    help="Put an intermediate CA under each root and write every certificate file as the chain "
    "leaf + intermediate.",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def pki(
    out: Path,
    kmes: tuple[str, ...],
    saes: tuple[str, ...],
    no_san: tuple[str, ...],
    client_ca: bool,
    intermediate: bool,
    force: bool,
) -> None:
    """Write a throw-away lab CA, KME and SAE certificates (CN = ID) and the link secret to OUT."""
    from qgate.pki import make_pki

    kme_map: dict[str, list[str]] = {}
    for item in kmes:
        name, _, addrs = item.partition("=")
        if name in kme_map:
            raise click.BadParameter(f"KME {name} given twice", param_hint="--kme")
        kme_map[name] = [a.strip() for a in addrs.split(",") if a.strip()]
    stray = sorted(set(no_san) - set(kme_map))
    if stray:
        raise click.BadParameter(f"{', '.join(stray)} is no --kme", param_hint="--no-san")
    try:
        make_pki(
            out,
            kmes=kme_map,
            saes=list(saes),
            force=force,
            no_san_kmes=no_san,
            client_ca=client_ca,
            intermediate=intermediate,
        )
    except QgateError as exc:
        fail(exc)
        return
    shape = [f"no SAN: {', '.join(no_san)}"] if no_san else []
    shape += ["SAE certificates from client-ca.pem"] if client_ca else []
    shape += ["leaves under an intermediate CA"] if intermediate else []
    extra = f" ({'; '.join(shape)})" if shape else ""
    click.echo(
        f"lab PKI written to {out}: KMEs {', '.join(kme_map)}; SAEs {', '.join(saes)}{extra}", err=True
    )
