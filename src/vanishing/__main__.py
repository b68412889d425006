"""``python -m vanishing``: the same as the ``vanishing`` command."""

from vanishing.cli import _console

_console()
