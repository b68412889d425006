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
        app(args=args, prog_name="vanishing", standalone_mode=False)
    except SystemExit as e:  # typer/click exit with a code
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - click usage errors and our one-line errors
        import click

        if isinstance(e, click.exceptions.Exit):
            return e.exit_code
        if isinstance(e, click.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            return 130
        raise
    return 0


def _console() -> None:
    sys.exit(main())
