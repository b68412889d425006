"""Commands of the ``vanishing`` CLI; each command's work lives in its own module."""

from __future__ import annotations

from pathlib import Path

import typer

from vanishing import __version__

app = typer.Typer(
    help="Find, explain and fix vanishing and exploding gradients in PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"vanishing {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="Fewer steps: done in seconds."),
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Where the run directories go."),
    steps: int = typer.Option(0, "--steps", min=0, help="Training steps per model (0: default)."),
) -> None:
    """Watch the vanishing gradient happen in a deep sigmoid net, and ReLU + He init cure it."""
    from vanishing.cli.demo import run_demo

    run_demo(out=out, steps=steps or (80 if quick else 400))
