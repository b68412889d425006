"""``vanishing diagnose RUN [--json]``: the diagnosis of a recorded run."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``diagnose`` command to ``app``."""

    @app.command()
    def diagnose(
        run: Path = typer.Argument(..., help="A run directory written by vanishing.watch."),
        as_json: bool = typer.Option(False, "--json", help="Print the diagnosis as JSON."),
    ) -> None:
        """Print the diagnosis of a recorded run (exit 1 when it finds problems)."""
        import json

        from vanishing.cli.app import fail
        from vanishing.recorder.reader import RunError, load_run

        try:
            diag = load_run(run).diagnose()
        except RunError as e:
            raise fail(str(e)) from None
        from vanishing.diagnose.engine import NO_LAYERS

        if as_json:
            typer.echo(json.dumps(diag.to_dict(), indent=2))
        elif NO_LAYERS in diag.notes:  # no findings, and no verdict either: say so, not "healthy"
            typer.echo(f"Cannot judge this run: {NO_LAYERS}.")
            for note in diag.notes:
                if note != NO_LAYERS:
                    typer.echo(f"note: {note}")
        else:
            from rich.console import Console

            from vanishing.report.terminal import diagnosis_table

            if diag.findings:  # the summary first, then each finding in full
                Console(highlight=False).print(diagnosis_table(diag))
            typer.echo(str(diag))
        raise typer.Exit(0 if diag.healthy else 1)
