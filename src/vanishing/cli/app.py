"""The typer application; each command lives in its own module with a ``register(app)`` function.

Command modules keep their heavy imports (torch, pandas, matplotlib) inside the command body, so
``vanishing --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import warnings

import typer

from vanishing import __version__

# in the order ``vanishing --help`` lists them
COMMAND_MODULES = ("demo", "run", "sweep", "diagnose", "report", "compare", "reproduce", "fix")

app = typer.Typer(
    help="Find, explain and fix vanishing and exploding gradients in PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)


def _version(value: bool) -> None:
    if value:
        print(f"vanishing {__version__}")
        raise typer.Exit(0)


_warned: set[str] = set()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # a warning on the command line is one line, as an error is (no source line), and once
    # (a damaged part is met by every reader of its table)
    text = str(message).removeprefix("vanishing: ")
    if text not in _warned:
        _warned.add(text)
        print(f"warning: {text}", file=file or sys.stderr)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    warnings.showwarning = _one_line_warning


def stdout_console(piped_width: int = 110, *, widest: int | None = None):
    """The rich console a command prints its tables to: a terminal's width or ``COLUMNS``
    (rich reads it), at most ``widest``; output piped without ``COLUMNS`` gets ``piped_width``
    rather than rich's 80, so that a log file keeps whole table rows.

    Example:
        >>> from vanishing.cli.app import stdout_console
        >>> import os; os.environ["COLUMNS"] = "80"
        >>> stdout_console().width
        80
        >>> del os.environ["COLUMNS"]
    """
    import os

    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console = Console(highlight=False, width=piped_width)
    if widest is not None and console.width > widest:
        console = Console(highlight=False, width=widest)
    return console


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit (code 2, bad input) to raise.

    Example:
        >>> from vanishing.cli.app import fail
        >>> fail("no such run: x").exit_code   # doctest: +SKIP
        2
    """
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _rewrapped(text: str) -> str:
    """A help text with each paragraph on one line: rich keeps single newlines, so a docstring
    paragraph written over several source lines would show as ragged lines of the source's
    width; one line per paragraph is rewrapped to the terminal."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


for _name in COMMAND_MODULES:
    if importlib.util.find_spec(f"vanishing.cli.{_name}") is not None:
        importlib.import_module(f"vanishing.cli.{_name}").register(app)
for _info in app.registered_commands:
    _doc = _info.help or inspect.getdoc(_info.callback)
    if _doc:
        _info.help = _rewrapped(_doc)
