"""``vanishing compare RUN [RUN ...] [-o FILE]``: runs that live anywhere, side by side."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``compare`` command to ``app``."""

    @app.command()
    def compare(
        runs: list[Path] = typer.Argument(..., help="Run directories, anywhere (two or more)."),
        out: Path = typer.Option(
            None,
            "--out",
            "-o",
            help="Also write an HTML page with the runs' depth profiles side by side.",
        ),
    ) -> None:
        """Compare runs side by side: steps, final loss, first / last ratio and findings."""
        from vanishing.cli.app import fail
        from vanishing.recorder.reader import RunError, load_run

        if out is not None and out.is_dir():
            raise fail(
                f"--out {out}: is a directory; pass a file name such as {out / 'compare.html'}"
            )
        try:
            loaded = [load_run(p) for p in runs]
            diagnoses = [r.diagnose() for r in loaded]
        except RunError as e:
            raise fail(str(e).splitlines()[0]) from None
        from vanishing.cli.app import stdout_console
        from vanishing.report.data import distinct_labels
        from vanishing.report.terminal import compare_table

        labels = distinct_labels(runs)
        console = stdout_console(widest=100)
        console.print(compare_table(loaded, labels, diagnoses))
        if out is not None:
            from vanishing.report.html import render_compare, write_page

            try:
                path = write_page(out, render_compare(runs, labels))
            except (ValueError, OSError) as e:
                raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
            typer.echo(str(path))
