"""``qgate lab run`` / ``qgate lab down``: the two-site namespace lab (thin; logic in qgate.lab)."""

from __future__ import annotations

import json
import os
import sys
from typing import Final

import click

from qgate.cli.common import setup_logging
from qgate.errors import QgateError

NOT_ROOT: Final = "the lab needs root (network namespaces, veth, TUN)"


def _need_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException(NOT_ROOT)


def _check_quirks(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from qgate.kms.quirks import check_quirks

    try:
        return check_quirks(value)
    except QgateError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group()
def lab() -> None:
    """Two qgate sites in network namespaces on this machine (needs root)."""


@lab.command("run")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result line last on stdout.")
@click.option("--keep", is_flag=True,
              help="Leave namespaces, KMEs, gateways running (end: `qgate lab down RUN_ID`).")  # fmt: skip
@click.option("--transfer-mb", type=click.FloatRange(0.1, 1000), default=20.0, show_default=True,
              help="TCP transfer size, MB (10^6 bytes) of random bytes.")  # fmt: skip
@click.option("--seconds", type=click.FloatRange(1, 60), default=6.0, show_default=True,
              help="Seconds the transfer is paced over.")  # fmt: skip
@click.option("--pings", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Pings from host A to host B (0.2 s apart), during the transfer.")  # fmt: skip
@click.option("--no-tunnel", is_flag=True, help="Baseline: plain IP forwarding between the sites, no qgate.")
@click.option("--no-offload", type=click.Choice(["a", "b", "both"]), default=None,
              help="Run gateway a, b or both on the plain data path (tun.offload: false).")  # fmt: skip
@click.option("--kme-quirk", "kme_quirks", multiple=True, metavar="NAME", callback=_check_quirks,
              help="Give both KMEs this product quirk (repeat; see `qgate kms-sim --help`); no-san "
                   "and cbc-only also make the policies pin the KME by CN or allow a CBC suite.")  # fmt: skip
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))  # fmt: skip
def run(
    as_json: bool,
    keep: bool,
    transfer_mb: float,
    seconds: float,
    pings: int,
    no_tunnel: bool,
    no_offload: str | None,
    kme_quirks: tuple[str, ...],
    log_level: str,
) -> None:
    """Build the lab, start KMEs and gateways, send traffic, capture the WAN, check it, tear down.

    Exit status 0 when every check passed, 1 when one failed, 2 when the lab could not run,
    130 when interrupted.
    """
    setup_logging(log_level)
    try:
        if os.geteuid() != 0:
            raise PermissionError(NOT_ROOT)
        from qgate.lab import LabOptions, format_summary, run_lab

        plain = ("a", "b") if no_offload == "both" else (no_offload,) if no_offload else ()
        opts = LabOptions(transfer_mb=transfer_mb, seconds=seconds, pings=pings, tunnel=not no_tunnel,
                          keep=keep, no_offload=plain, kme_quirks=kme_quirks)  # fmt: skip
        result = run_lab(opts)
    except KeyboardInterrupt:
        click.echo(f"lab run interrupted; {'kept' if keep else 'torn down'}", err=True)
        _emit({"ok": False, "error": "interrupted"}, as_json)
        sys.exit(130)
    except (QgateError, OSError) as exc:
        click.echo(f"lab run could not run: {exc}", err=True)
        _emit({"ok": False, "error": str(exc)}, as_json)
        sys.exit(2)
    except Exception as exc:  # any other failure before a verdict is still "could not run"
        click.echo(f"lab run could not run: {type(exc).__name__}: {exc}", err=True)
        _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, as_json)
        sys.exit(2)
    click.echo(format_summary(result), err=True)
    _emit(result, as_json)
    sys.exit(0 if result.get("ok") else 1)


def _emit(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, separators=(",", ":"), default=str) + "\n")
        sys.stdout.flush()


@lab.command("down")
@click.argument("run_id", required=False)
@click.option("--all", "all_runs", is_flag=True, help="Tear down every lab run found (qg<6 hex><role>).")
def down(run_id: str | None, all_runs: bool) -> None:
    """Tear down a lab run kept with --keep: processes, namespaces, run directory."""
    from qgate.lab import lab_down
    from qgate.lab_net import lab_namespaces

    _need_root()
    if all_runs:
        run_ids = sorted({name[2:8] for name in lab_namespaces()})
    elif run_id:
        run_ids = [run_id]
    else:
        raise click.UsageError("give a RUN_ID or --all")
    problems: list[str] = []
    try:
        for rid in run_ids:
            problems += lab_down(rid)
            click.echo(f"lab {rid} torn down", err=True)
    except QgateError as exc:  # includes "no lab run <id> found"
        raise click.ClickException(str(exc)) from exc
    if problems:
        raise click.ClickException("; ".join(problems))


@lab.command("quirks")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result line last on stdout.")
@click.option("--seconds", type=click.FloatRange(1, 60), default=60.0, show_default=True,
              help="Seconds of traffic per lab (the rekey rate is checked from 30 s).")  # fmt: skip
@click.option("--kme-quirk", "kme_quirks", multiple=True, metavar="NAME", callback=_check_quirks,
              help="Run only these quirks (repeat); default: all (`qgate kms-sim --help`).")  # fmt: skip
def quirks(as_json: bool, seconds: float, kme_quirks: tuple[str, ...]) -> None:
    """Run one lab per KME quirk, all at once, and tabulate how the tunnel fared on each.

    Each lab is `qgate lab run --kme-quirk NAME`: a paced TCP transfer with a ping every 0.2 s,
    rekeys every 1 s. Exit status 0 when every lab passed every check, 1 otherwise.
    """
    from qgate.kms.quirks import QUIRK_NAMES
    from qgate.lab_quirks import format_rows, run_quirk_labs, summary_rows

    _need_root()
    results = run_quirk_labs(kme_quirks or QUIRK_NAMES, seconds=seconds)
    rows = summary_rows(results)
    click.echo(format_rows(rows), err=True)
    ok = all(row["ok"] for row in rows)
    if as_json:
        sys.stdout.write(json.dumps({"ok": ok, "rows": rows, "results": results}, default=str) + "\n")
    sys.exit(0 if ok else 1)
