"""``vanishing reproduce NAME``: reproduce a published experiment, published numbers beside ours."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from vanishing.experiments.reproductions.base import Reproduction


def register(app: typer.Typer) -> None:
    """Add the ``reproduce`` command to ``app``."""
    from vanishing.experiments.reproductions import AVAILABLE

    names = ", ".join(AVAILABLE)

    @app.command(help=_help(AVAILABLE))
    def reproduce(
        name: str = typer.Argument(..., help=f"The experiment: {names}, or all."),
        as_json: bool = typer.Option(
            False,
            "--json",
            help='Print one JSON object: {"name", "checks": [{"what", "published", "measured", '
            '"tolerance", "ok"}], ...} (for all: {"reproductions": [...]}).',
        ),
        quick: bool = typer.Option(
            False, "--quick", help="A smaller run (about 30 s each) with its own, looser checks."
        ),
        out: Path = typer.Option(
            None, "--out", "-o", help="Output directory (default runs/reproduce-NAME-<date-time>)."
        ),
        seeds: int = typer.Option(
            None, "--seeds", help="nielsen: initialisations per net (medians over them; 10)."
        ),
        steps: int = typer.Option(None, "--steps", help="nielsen: full-batch steps (500)."),
        data_dir: Path = typer.Option(
            None,
            "--data-dir",
            help="nielsen: directory with the MNIST IDX files (train-images-idx3-ubyte[.gz], "
            "...); default: scikit-learn's bundled digits.",
        ),
    ) -> None:
        from vanishing.cli.app import fail

        if name != "all" and name not in AVAILABLE:
            raise fail(f"unknown experiment {name!r}; available: {names}, all")
        nielsen_options = {"--seeds": seeds, "--steps": steps, "--data-dir": data_dir}
        given = [flag for flag, value in nielsen_options.items() if value is not None]
        if given and name != "nielsen":
            raise fail(f"{', '.join(given)} only apply to nielsen; drop them for {name}")
        if seeds is not None and seeds < 1:
            raise fail(f"--seeds must be at least 1, got {seeds}")
        if steps is not None and steps < 1:
            raise fail(f"--steps must be at least 1, got {steps}")
        if data_dir is not None and not data_dir.expanduser().is_dir():
            raise fail(
                f"--data-dir {data_dir} is not a directory; pass the directory that holds the "
                "MNIST IDX files"
            )
        options = {"seeds": seeds, "steps": steps, "data_dir": data_dir} if given else {}
        if name == "all":
            ok = _all(AVAILABLE, quick=quick, out=out, as_json=as_json)
        else:
            ok = _one(name, quick=quick, out=out, as_json=as_json, options=options)
        raise typer.Exit(0 if ok else 1)


def _help(available: tuple[str, ...]) -> str:
    # names only: titles live in each module, and importing eleven modules would slow every
    # `vanishing --help` (docs/reproductions.md has the table of papers and figures)
    return (
        "Reproduce a published experiment under the monitor: prints the published numbers "
        "beside ours with the tolerance each check uses, writes plots and a JSON record; exit 0 "
        "when every check passes, 1 when one fails.\n\n"
        f"NAME: {', '.join(available)}; or all (every one, and a gallery page index.html with "
        "each table and plot). Papers, figures and tolerances: docs/reproductions.md."
    )


def _consoles() -> tuple[Console, Console]:
    from rich.console import Console

    from vanishing.cli.app import stdout_console

    return stdout_console(120), Console(stderr=True, highlight=False)


def _run(name: str, *, quick: bool, out: Path | None, options: dict, err: Console, show: bool):
    """One reproduction with a transient progress bar on stderr; bad input is a ValueError."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from vanishing.experiments.reproductions import load
    from vanishing.experiments.reproductions.base import check_out

    module = load(name)
    if out is not None:
        check_out(out, name, create=False)  # a refusal is one clean line, before any bar
    with Progress(
        TextColumn(f"{name}{' (quick)' if quick else ''}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        transient=True,
        disable=not show,
    ) as bar:
        task = bar.add_task(name, total=None)
        return module.reproduce(
            quick=quick,
            out=out,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            **options,
        )


def _one(name: str, *, quick: bool, out: Path | None, as_json: bool, options: dict) -> bool:
    import json
    import time

    from vanishing.cli.app import fail

    console, err = _consoles()
    started = time.perf_counter()
    try:
        result = _run(name, quick=quick, out=out, options=options, err=err, show=not as_json)
    except ValueError as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot write the results: {e.strerror or e} ({e.filename or ''})") from None
    seconds = time.perf_counter() - started
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        err.print(f"plots and records written to {result.out} ({seconds:.0f} s)")
    else:
        show(result, console, seconds)
    return result.ok


def show(result: Reproduction, console: Console, seconds: float | None = None) -> None:
    """Print a reproduction as the terminal shows it: title, citation, the checks (published
    beside measured, with each tolerance), its tables, the summary and where the plots went.

    Example:
        >>> from rich.console import Console
        >>> from vanishing.cli.reproduce import show
        >>> from vanishing.experiments.reproductions.base import Check, Reproduction
        >>> r = Reproduction("x", "A title", "Someone 2010", [Check.below("loss", published=0.1, measured=0.05, limit=0.1)])
        >>> show(r, Console(width=80, color_system=None))   # doctest: +ELLIPSIS
        A title...
    """
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{escape(result.title)}[/bold]")
    console.print(escape(result.citation), style="dim")
    for table in result.tables:
        rich_table = Table(title=escape(table.title), title_justify="left")
        for i, head in enumerate(table.header):
            rich_table.add_column(escape(str(head)), justify="left" if i == 0 else "right")
        for row in table.cells():
            rich_table.add_row(*(escape(c) for c in row))
        console.print(rich_table)
    checks = Table(title="Published beside measured", title_justify="left")
    checks.add_column("check")
    checks.add_column("published", justify="right")
    checks.add_column("measured", justify="right")
    checks.add_column("tolerance", justify="right")
    checks.add_column("ok", justify="center")
    for c in result.checks:
        checks.add_row(
            escape(c.what),
            escape(_value(c.published)),
            escape(_value(c.measured)),
            escape(c.tolerance),
            "[green]yes[/green]" if c.ok else "[bold red]NO[/bold red]",
        )
    console.print(checks)
    if result.summary:
        console.print(escape(result.summary))
    passed = sum(c.ok for c in result.checks)
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    verdict = "reproduced" if result.ok else "NOT reproduced"
    console.print(
        f"{verdict}: {passed} of {len(result.checks)} checks pass{took}"
        + (" (quick run)" if result.quick else "")
        + (
            f". Plots: {', '.join(p.name for p in result.plots)} in {result.out}"
            if result.plots
            else ""
        )
        + ("" if result.plots or result.out is None else f". Records: {result.out}")
        + "."
    )


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _all(names: tuple[str, ...], *, quick: bool, out: Path | None, as_json: bool) -> bool:
    """Every reproduction into ``out/NAME`` and the gallery page ``out/index.html``; one that
    fails to run is recorded as a failed check (the others still run)."""
    import json
    import time

    from vanishing.cli.app import fail
    from vanishing.experiments.reproductions import load
    from vanishing.experiments.reproductions.base import Check, Reproduction, check_out
    from vanishing.report.gallery import write_gallery

    console, err = _consoles()
    try:
        root = check_out(out, "all")
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None
    results: list[Reproduction] = []
    times: dict[str, float] = {}
    for name in names:
        started = time.perf_counter()
        try:
            result = _run(name, quick=quick, out=root / name, options={}, err=err, show=not as_json)
        except Exception as e:  # noqa: BLE001 - one broken reproduction must not stop the rest
            module = load(name)
            result = Reproduction(
                name=name,
                title=getattr(module, "TITLE", name),
                citation=getattr(module, "CITATION", ""),
                checks=[
                    Check.holds(
                        "the reproduction runs",
                        published="runs",
                        measured=f"{type(e).__name__}: {e}",
                        ok=False,
                        tolerance="no error",
                    )
                ],
                out=root / name,
                quick=quick,
            )
        times[name] = time.perf_counter() - started
        results.append(result)
        if not as_json:
            show(result, console, times[name])
            console.print()
    page = write_gallery(results, root / "index.html", seconds=times)
    if as_json:
        typer.echo(
            json.dumps({"reproductions": [r.to_dict() for r in results], "gallery": str(page)})
        )
    else:
        failed = [r.name for r in results if not r.ok]
        console.print(
            f"{len(results) - len(failed)} of {len(results)} reproductions pass"
            + (f" (not: {', '.join(failed)})" if failed else "")
            + f"; gallery: {page}"
        )
    return all(r.ok for r in results)
