"""``vanishing run CONFIG [--out DIR] [--set FIELD=VALUE ...]``: train one experiment."""

from __future__ import annotations

import re
from pathlib import Path

import typer

REFRESH_SECONDS = 0.1  # live view refresh: the monitor's latest() costs one host sync


def register(app: typer.Typer) -> None:
    """Add the ``run`` command to ``app``."""

    @app.command()
    def run(
        config: Path = typer.Argument(..., help="Experiment config (TOML), see docs/config.md."),
        out: Path = typer.Option(
            None, "--out", "-o", help="Run directory to create (default: runs/<name>-<time>)."
        ),
        overrides: list[str] = typer.Option(
            None,
            "--set",
            help="Override a field: --set model.depth=20 --set model.activation=relu.",
        ),
        report: bool = typer.Option(
            True, "--report/--no-report", help="Write the HTML report (report.html in the run)."
        ),
    ) -> None:
        """Train one experiment from a config file, monitored, into a run directory."""
        from vanishing.cli.app import fail
        from vanishing.experiments.config import (
            ConfigError,
            apply_overrides,
            parse_config,
            read_toml,
        )

        try:
            raw = apply_overrides(read_toml(config), overrides or [])
            cfg = parse_config(raw)
        except ConfigError as e:
            raise fail(_config_message(str(e), config, overrides or [])) from None
        run_dir = out if out is not None else default_run_dir(cfg.name)
        problem = preflight(cfg, run_dir)
        if problem:
            raise fail(problem)
        try:
            summary = train_with_view(cfg, run_dir)
        except KeyboardInterrupt:
            typer.echo(f"interrupted: the records up to now are in {run_dir}", err=True)
            raise typer.Exit(130) from None
        except OSError as e:  # the run directory cannot be made or written
            raise fail(f"cannot write the run to {run_dir}: {e.strerror or e}") from None
        print_summary(summary, run_dir)
        if report:
            write_report_quietly(run_dir)
        raise typer.Exit(1 if summary["status"] == "failed" else 0)


def _config_message(message: str, config: Path, overrides: list[str]) -> str:
    """Where a config error is: in a ``--set`` (named so) or in the config file.

    Example:
        >>> from pathlib import Path
        >>> from vanishing.cli.run import _config_message
        >>> _config_message("model.depth: expected an integer, got 'x'", Path("c.toml"), ["model.depth=x"])
        "--set 'model.depth=x': model.depth: expected an integer, got 'x'"
        >>> _config_message("model.depth: expected an integer, got 'x'", Path("c.toml"), [])
        "c.toml: model.depth: expected an integer, got 'x'"
    """
    if message.startswith(("--set ", str(config))):
        return message
    for item in reversed(overrides):  # the last --set of a field is the one that counts
        field = item.partition("=")[0].strip()
        if field and (message.startswith(f"{field}:") or f"field {field} " in message):
            return f"--set {item!r}: {message}"
    return f"{config}: {message}"


def write_report_quietly(target: Path) -> Path | None:
    """Write ``target``'s HTML report and say where; a report that fails warns, never fails
    the command whose records it would show (they are already on disk)."""
    from vanishing.report.html import write_report

    try:
        page = write_report(target)
    except Exception as e:  # noqa: BLE001 - the training result stands without its report
        typer.echo(f"warning: could not write the report of {target}: {e}", err=True)
        return None
    typer.echo(f"Report: {page}")
    return page


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """``runs/<name>-<date-time>`` (name made file-safe), never an existing directory.

    Example:
        >>> from vanishing.cli.run import default_run_dir
        >>> default_run_dir("deep sigmoid / N(0,1)").name.startswith("deep-sigmoid-N-0-1-")
        True
    """
    import datetime as dt

    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-.") or "run"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{slug}-{stamp}", 1
    while path.exists():
        path, n = root / f"{slug}-{stamp}-{n}", n + 1
    return path


def preflight(cfg, run_dir: Path) -> str | None:
    """What would stop the run before it starts (bad device, missing data, occupied run
    directory), as a one-line message; None when it can start.

    Example:
        >>> from pathlib import Path
        >>> from vanishing.cli.run import preflight
        >>> from vanishing.experiments.config import parse_config
        >>> preflight(parse_config({"task": {"name": "mnist", "data_dir": "/nope"}}), Path("/tmp/x"))
        'task.data_dir: /nope is not a directory (it should hold the four MNIST IDX files)'
    """
    from vanishing.experiments.config import ConfigError

    if cfg.task.name == "mnist":
        from vanishing.experiments.idx import MNIST_FILES, _find

        data_dir = Path(cfg.task.data_dir).expanduser()
        if not data_dir.is_dir():
            return (
                f"task.data_dir: {cfg.task.data_dir} is not a directory "
                "(it should hold the four MNIST IDX files)"
            )
        try:
            for name in MNIST_FILES:
                _find(data_dir, name)
        except ValueError as e:
            return f"task.data_dir: {e}"
    if run_dir.exists() and not run_dir.is_dir():
        return f"--out {run_dir} is a file; pass a new directory for the run"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return f"{run_dir} is not empty; pass a new --out directory (nothing there is overwritten)"
    if cfg.train.device != "cpu":
        from vanishing.experiments.runner import resolve_device

        try:
            resolve_device(cfg.train.device)
        except ConfigError as e:
            return str(e)
    return None


def train_with_view(cfg, run_dir: Path) -> dict:
    """Run the experiment with a live view: the per-layer gradient view of
    ``vanishing.report.terminal`` when available, else a progress bar."""
    import time

    from rich.console import Console

    from vanishing.experiments.runner import run_experiment

    console = Console(highlight=False)
    total = cfg.train.steps
    title = f"{cfg.name}: {cfg.model.kind} depth {cfg.model.depth}, {cfg.task.name}"
    try:
        from vanishing.report.terminal import TrainingView
    except ImportError:
        TrainingView = None

    last = [0.0]

    def due(step: int) -> bool:
        now = time.monotonic()
        if step + 1 >= total or now - last[0] >= REFRESH_SECONDS:
            last[0] = now
            return True
        return False

    if TrainingView is not None:
        with TrainingView(total=total, title=title) as view:

            def progress(step, loss, monitor):
                if due(step):
                    view.update(step + 1, loss=loss, layer_values=monitor.latest("grad_norm"))

            return run_experiment(cfg, run_dir, progress=progress)

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}"),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(title, total=total, loss="-")

        def progress(step, loss, monitor):
            if due(step):
                bar.update(task, completed=step + 1, loss=f"{loss:.4g}")

        return run_experiment(cfg, run_dir, progress=progress)


def _fmt(value, spec: str = ".4g") -> str:
    from vanishing.report.formatting import stat_text

    return stat_text(value, spec)


def _verdict(summary: dict) -> str:
    """The diagnosis line of a summary: its kinds, "healthy", or why there is no diagnosis."""
    kinds = summary.get("kinds")
    if kinds is None or not summary.get("steps"):
        return "none: no steps recorded"
    return ", ".join(kinds) or "healthy"


def print_summary(summary: dict, run_dir: Path) -> None:
    """Print a run's summary as a table, then where its records are."""
    from rich.console import Console
    from rich.table import Table

    from vanishing.report.formatting import metric_text

    console = Console(highlight=False)
    table = Table(title="Run summary", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    metric = summary["metric_name"] or "metric"
    rows = [
        ("status", summary["status"]),
        ("steps", str(summary["steps"])),
        ("train loss (last step)", _fmt(summary["train_loss"])),
        ("test loss", _fmt(summary["test_loss"])),
        (f"test {metric}", metric_text(summary["test_metric"], metric)),
        ("first / last hidden speed", _fmt(summary["first_last_ratio"], ".2e")),
        ("diagnosis", _verdict(summary)),
        ("seconds", f"{summary['seconds']:.1f}"),
    ]
    if summary.get("error"):
        rows.append(("error", summary["error"]))
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    console.print(f"Run written to {run_dir}  (vanishing diagnose {run_dir})")
