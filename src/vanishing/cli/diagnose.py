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
            raise fail(_runs_inside(run) or str(e)) from None
        from vanishing.diagnose.engine import NO_LAYERS

        if as_json:
            typer.echo(json.dumps(diag.to_dict(), indent=2))
        elif NO_LAYERS in diag.notes:  # no findings, and no verdict either: say so, not "healthy"
            typer.echo(f"Cannot judge this run: {NO_LAYERS}.")
            for note in diag.notes:
                if note != NO_LAYERS:
                    typer.echo(f"note: {note}")
        else:
            from vanishing.report.html import verdict_sentence

            width = _width()
            typer.echo(_wrapped(verdict_sentence(diag), width))
            if diag.findings:  # each finding once, in full
                typer.echo("")
                typer.echo(_wrapped(str(diag), width))
            else:
                for note in diag.notes:
                    typer.echo(_wrapped(f"note: {note}", width))
        raise typer.Exit(0 if diag.healthy else 1)


def _width() -> int | None:
    """The width to wrap at: the terminal's (at most 100) or COLUMNS; None (no wrapping) when
    the output is piped, so each finding and note stays one greppable line."""
    import os
    import shutil
    import sys

    if os.environ.get("COLUMNS", "").isdigit() or sys.stdout.isatty():
        return min(shutil.get_terminal_size((80, 24)).columns, 100)
    return None


def _wrapped(text: str, width: int | None) -> str:
    """``text`` with each line wrapped to ``width``, continuation lines indented under it.

    Example:
        >>> from vanishing.cli.diagnose import _wrapped
        >>> print(_wrapped("    -> relu: one two three four", 20))
            -> relu: one
               two three
               four
    """
    import re
    import textwrap

    if width is None:
        return text
    out = []
    for line in text.splitlines():
        lead = re.match(r"\s*(-> |\[\w+\] |note: )?", line).group(0)
        indent = " " * (len(lead) if lead.strip() not in ("", "[critical]", "[warning]") else 4)
        if not lead.strip():
            indent = lead + "    " if lead else "    "
        out.append(
            textwrap.fill(
                line,
                width=max(width, 40),
                subsequent_indent=indent,
                break_on_hyphens=False,
                break_long_words=False,
            )
            if line.strip()
            else line
        )
    return "\n".join(out)


def _runs_inside(path: Path) -> str | None:
    """The error for a directory that holds runs rather than being one: which subfolders are."""
    if not path.is_dir() or (path / "manifest.json").exists():
        return None
    runs = sorted(p for p in path.iterdir() if (p / "manifest.json").is_file())
    if not runs and (path / "sweep.sqlite").is_file():
        runs = sorted(p.parent for p in path.glob("*/*/manifest.json"))
    if not runs:
        return None
    names = ", ".join(str(p.relative_to(path)) for p in runs[:4])
    more = f" and {len(runs) - 4} more" if len(runs) > 4 else ""
    kind = "a sweep" if (path / "sweep.sqlite").is_file() else "a directory of runs"
    return (
        f"{path} is {kind}, not a run; diagnose one of its {len(runs)} runs: "
        f"{names}{more} (e.g. vanishing diagnose {runs[0]}), or see vanishing report {path}"
    )
