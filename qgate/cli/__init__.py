"""The ``qgate`` command: click groups and commands only, no logic beyond parsing and calling."""

from __future__ import annotations

import click

from qgate import __version__
from qgate.cli.audit import audit
from qgate.cli.gateway import check, down, keygen, schema, status, up
from qgate.cli.kme import kme
from qgate.cli.kms import kms_sim, pki
from qgate.cli.lab import lab
from qgate.constants import PROTOCOL_VERSION


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__,
    prog_name="qgate",
    message=f"%(prog)s, version %(version)s (wire protocol {PROTOCOL_VERSION})",
)
def main() -> None:
    """qgate: hybrid QKD + ML-KEM encryption gateway."""


main.add_command(up)
main.add_command(down)
main.add_command(status)
main.add_command(check)
main.add_command(schema)
main.add_command(keygen)
main.add_command(kme)
main.add_command(kms_sim)
main.add_command(pki)
main.add_command(lab)
main.add_command(audit)
