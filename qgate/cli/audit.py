"""``qgate audit verify``: check a hash-chained audit log (thin; logic in qgate.audit)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qgate.audit import (
    VerifyResult,
    log_series,
    parse_anchor,
    rotated_path,
    series_gaps,
    verify_file,
    verify_series,
)
from qgate.errors import QgateError


@click.group()
def audit() -> None:
    """Audit log of key events (handshakes, rekeys, QKD key_IDs, mode changes)."""


@audit.command("verify")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result line last on stdout.")
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="SEQ:SHA256",
    help="A head the gateway logged earlier (at open/close); line SEQ must still hash to it (repeat).",
)
@click.option(
    "--rotated",
    is_flag=True,
    help="Also check the rotated files FILE.1, FILE.2, ... and that each file's audit_start names the"
    " head of the one before it (anchors apply to FILE).",
)
def verify(file: Path, as_json: bool, anchors: tuple[str, ...], rotated: bool) -> None:
    """Check FILE's hash chain from the first line to the last.

    Exit status 0 and the record count when the chain is intact; 1 and the first bad line (number and
    what is wrong) otherwise, or when FILE cannot be read or an anchor is malformed. The gateway
    rotates a full log to FILE.1 (FILE.1 to FILE.2, ...); an anchor logged before a rotation belongs
    to the file that was FILE then.
    """
    paths = log_series(file) if rotated else [file]
    try:
        wanted = dict(parse_anchor(text) for text in anchors)
        results = verify_series(paths, anchors=wanted) if rotated else [verify_file(file, anchors=wanted)]
    except QgateError as exc:
        paths, results = [file], [VerifyResult(False, 0, problem=str(exc))]
    gaps = series_gaps(file) if rotated else []
    if gaps:
        missing = rotated_path(file, len(paths))
        later = ", ".join(map(str, gaps))
        problem = f"{missing} is missing although {later} exist: a file of the series was removed"
        paths, results = [*paths, missing], [*results, VerifyResult(False, 0, problem=problem)]
    for path, result in zip(paths, results, strict=True):
        _report(path, result, as_json)
    ok = all(result.ok for result in results)
    if as_json:
        rows = [{"file": str(path), **result.as_json()} for path, result in zip(paths, results, strict=True)]
        line = {"ok": ok, "files": rows} if rotated else rows[0]
        click.echo(json.dumps(line, separators=(",", ":")))
    if not ok:
        raise SystemExit(1)


def _report(file: Path, result: VerifyResult, as_json: bool) -> None:
    if result.ok:
        click.echo(f"{file}: ok: {result.records} records, head {result.head}", err=as_json)
    else:
        where = f"line {result.line}: " if result.line is not None else ""
        click.echo(f"{file}: {where}{result.problem}", err=True)
        click.echo(f"{file}: {result.records} record(s) verified before it", err=True)
