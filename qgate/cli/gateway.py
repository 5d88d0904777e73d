"""``qgate up``, ``qgate check`` and ``qgate keygen``: parsing and calling only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from qgate.cli.common import LOG_FORMATS, LOG_LEVELS, fail, setup_logging
from qgate.errors import QgateError

if TYPE_CHECKING:
    from qgate.policy import GatewayPolicy


@click.command()
@click.argument("policy_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--stats-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write counters as JSON here every second and at exit.",
)
@click.option(
    "--audit-log",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Append hash-chained audit records (handshakes, rekeys, QKD key_IDs, mode changes) here.",
)
@click.option(
    "--socket",
    "control_socket",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Control socket for qgate status/down (default /run/qgate/<gateway name>.sock).",
)
@click.option(
    "--user",
    "run_user",
    help="After opening the TUN and routes, drop to this system user keeping only CAP_NET_ADMIN.",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="human", show_default=True)
def up(
    policy_file: Path,
    stats_file: Path | None,
    audit_log: Path | None,
    control_socket: Path | None,
    run_user: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run the gateway described by POLICY_FILE in the foreground (SIGINT/SIGTERM stop it cleanly)."""
    from qgate.gateway import run_gateway
    from qgate.policy import load_policy
    from qgate.privileges import harden_process

    setup_logging(log_level, log_format)
    try:
        harden_process()  # before any key is read: no core dumps, no ptrace by the same uid
        policy = load_policy(policy_file)
        _check_kme_credentials(policy)
        run_gateway(
            policy,
            stats_file=stats_file,
            audit_log=audit_log,
            control_socket=control_socket,
            run_user=run_user,
        )
    except QgateError as exc:
        fail(exc)


def _check_kme_credentials(policy: GatewayPolicy) -> None:
    """Run ``qgate check``'s SAE certificate file checks (no network): log warnings, raise on problems.

    Raises:
        CheckFailed: a certificate is expired or not yet valid, the key does not match, ...
    """
    from qgate.checks import CheckFailed, check_kme_credentials

    log = logging.getLogger(__name__)
    try:
        warnings = check_kme_credentials(policy)
    except CheckFailed as exc:
        for warning in exc.warnings:
            log.warning("%s", warning)
        raise
    for warning in warnings:
        log.warning("%s", warning)


@click.command()
@click.argument("policy_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line on stdout.")
@click.option(
    "--warn-days",
    type=click.IntRange(min=0),
    default=30,  # qgate.certs.WARN_DAYS_DEFAULT, not imported here to keep the CLI start fast
    show_default=True,
    help="Warn about certificates expiring within this many days.",
)
@click.option(
    "--no-connect",
    is_flag=True,
    help="Do not contact the KME (by default one TLS handshake, no HTTP request, fetches its certificate).",
)
def check(policy_file: Path, as_json: bool, warn_days: int, no_connect: bool) -> None:
    """Validate POLICY_FILE, the key and certificate files it names and the KME's server certificate.

    Problems fail the check (exit status 1); warnings (printed as ``warning: ...`` on stderr) do not.
    """
    from qgate.checks import CheckFailed, check_policy_file

    try:
        summary = check_policy_file(policy_file, connect=not no_connect, warn_days=warn_days)
    except QgateError as exc:
        warnings = exc.warnings if isinstance(exc, CheckFailed) else []
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc), "warnings": warnings}))
        fail(exc)
        return
    for line in summary.lines():
        click.echo(line, err=as_json)
    for warning in summary.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps({"ok": True, **summary.as_dict()}))


@click.command()
@click.option("--alg", type=click.Choice(["ml-dsa-65", "ml-dsa-87"]), default="ml-dsa-65", show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Private key file; the public key goes beside it with the suffix .pub (site-a.key: site-a.pub).",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def keygen(alg: str, out: Path, force: bool) -> None:
    """Write a new gateway identity (FIPS 204 ML-DSA): OUT (private, mode 0600) and its .pub beside it."""
    from qgate.keyfiles import write_identity

    try:
        private, public = write_identity(out, alg, force=force)
    except QgateError as exc:
        fail(exc)
        return
    click.echo(f"wrote {private} (private, keep it secret) and {public} (give it to the peer)", err=True)


_SOCKET_OPTION = click.option(
    "--socket",
    "control_socket",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The daemon's control socket (default: the only one in /run/qgate).",
)


@click.command()
@_SOCKET_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line on stdout instead of the table.")
def status(control_socket: Path | None, as_json: bool) -> None:
    """Show a running gateway's peers: state, epoch, key stock, rekeys, traffic and drops."""
    from qgate.control import find_socket, request
    from qgate.status import format_status

    try:
        answer = request(find_socket(control_socket), "status")
    except QgateError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc)}))
        fail(exc)
    if as_json:
        click.echo(json.dumps(answer, sort_keys=True))
    else:
        click.echo(format_status(answer))


@click.command()
@_SOCKET_OPTION
def down(control_socket: Path | None) -> None:
    """Stop a running gateway cleanly (it removes its TUN and routes)."""
    from qgate.control import find_socket, request

    try:
        path = find_socket(control_socket)
        answer = request(path, "down")
    except QgateError as exc:
        fail(exc)
    if not answer.get("ok"):
        fail(QgateError(str(answer.get("error"))))
    click.echo(f"gateway {answer.get('gateway')} is stopping", err=True)


@click.command()
def schema() -> None:
    """Print the policy reference (every field, type, unit, default and range) as Markdown."""
    from qgate.schema_doc import policy_reference

    click.echo(policy_reference(), nl=False)
