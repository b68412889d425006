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


@app.command()
def diagnose(
    run: Path = typer.Argument(..., help="A run directory written by vanishing.watch."),
    as_json: bool = typer.Option(False, "--json", help="Print the diagnosis as JSON."),
) -> None:
    """Print the diagnosis of a recorded run (exit 1 when it finds problems)."""
    import json

    from vanishing.recorder.reader import RunError, load_run

    try:
        diag = load_run(run).diagnose()
    except RunError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(diag.to_dict(), indent=2))
    else:
        typer.echo(str(diag))
    raise typer.Exit(0 if diag.healthy else 1)
