"""``vanishing report RUN_OR_SWEEP [-o FILE]``: a self-contained HTML report."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to ``app``."""

    @app.command()
    def report(
        target: Path = typer.Argument(
            ...,
            help="A run directory, a sweep directory (sweep.sqlite), or a directory of runs "
            "(e.g. what vanishing demo wrote).",
        ),
        out: Path = typer.Option(
            None, "--out", "-o", help="The HTML file to write (default: TARGET/report.html)."
        ),
    ) -> None:
        """Write a self-contained HTML report (plots, diagnosis, layer table, config)."""
        from vanishing.cli.app import fail
        from vanishing.report.html import target_kind, write_report

        try:
            target_kind(target)
            path = write_report(target, out)
        except (ValueError, OSError) as e:
            raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        typer.echo(str(path))
