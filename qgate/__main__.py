"""``python -m qgate``: the same as the ``qgate`` command."""

from qgate.cli import main

main()
