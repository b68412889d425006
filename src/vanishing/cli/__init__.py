"""The ``vanishing`` command line (typer). Exit codes: 0 success, 1 problems found, 2 bad input."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vanishing`` console script.

    Example:
        >>> from vanishing.cli import main
        >>> main(["--version"])   # doctest: +ELLIPSIS
        vanishing ...
        0
    """
    from vanishing.cli.app import app

    args = sys.argv[1:] if argv is None else argv
    try:
        # standalone mode: usage errors print one line of usage and exit with code 2
        app(args=args, prog_name="vanishing")
    except SystemExit as e:
        if e.code is None:
            return 0
        return e.code if isinstance(e.code, int) else 1
    return 0


def _console() -> None:
    sys.exit(main())
