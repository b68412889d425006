"""``vanishing sweep CONFIG [--out DIR] [--workers N] [--backend local|ray]``: a grid of
experiments, resumable."""

from __future__ import annotations

import math
import time
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``sweep`` command to ``app``."""

    @app.command()
    def sweep(
        config: Path = typer.Argument(
            ..., help="Sweep config (TOML): list-valued fields and seeds = [...] are axes."
        ),
        out: Path = typer.Option(
            None, "--out", "-o", help="Sweep directory (default: sweeps/<config name>)."
        ),
        workers: int = typer.Option(
            None,
            "--workers",
            "-w",
            min=1,
            help="Worker processes, or concurrent Ray trials (default: one per core).",
        ),
        backend: str = typer.Option(
            "local",
            "--backend",
            help="local: worker processes here; ray: Ray Tune trials (RAY_ADDRESS: a cluster).",
        ),
        retry_failed: bool = typer.Option(
            False, "--retry-failed", help="Also redo runs that failed before."
        ),
        report: bool = typer.Option(
            True, "--report/--no-report", help="Write the HTML report (report.html in the sweep)."
        ),
    ) -> None:
        """Run every combination of a sweep config in worker processes into a SQLite store.

        With --backend ray the runs are Ray Tune trials: on a local Ray, or on the cluster that
        RAY_ADDRESS names (the sweep directory must then be on storage every node shares).
        Started again (after a crash, a kill or Ctrl-C) with the same config and directory, it
        redoes only the runs that did not finish.
        """
        import signal
        import sqlite3

        from vanishing.cli.app import fail
        from vanishing.experiments.config import ConfigError
        from vanishing.experiments.sweep import (
            BACKENDS,
            DB,
            MissingBackendError,
            SweepBusyError,
            run_sweep,
        )

        if backend not in BACKENDS:
            raise fail(f"--backend {backend!r}: must be one of {', '.join(BACKENDS)}")
        sweep_dir = out if out is not None else Path("sweeps") / config.stem
        if sweep_dir.exists() and not sweep_dir.is_dir():
            raise fail(f"--out {sweep_dir} is a file; pass a directory for the sweep")
        if (sweep_dir / "manifest.json").exists():
            raise fail(
                f"--out {sweep_dir} holds a run (manifest.json), not a sweep; pass a new "
                "directory for the sweep (nothing there is overwritten)"
            )
        display = SweepDisplay(sweep_dir)

        def _terminated(signum, frame):  # SIGTERM (timeout, schedulers): stop workers as Ctrl-C
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            runs, rows = run_sweep(
                config,
                sweep_dir,
                workers=workers or None,
                retry_failed=retry_failed,
                on_event=display.event,
                backend=backend,
                reports=report,
            )
        except MissingBackendError as e:
            raise fail(str(e)) from None
        except ConfigError as e:
            message = str(e)
            prefix = "" if message.startswith(str(config)) else f"{config}: "
            raise fail(prefix + message) from None
        except SweepBusyError as e:
            raise fail(str(e)) from None
        except sqlite3.DatabaseError as e:
            raise fail(f"{sweep_dir / DB} is not a sweep store ({e}); pass another --out") from None
        except OSError as e:
            raise fail(f"cannot write the sweep to {sweep_dir}: {e.strerror or e}") from None
        except KeyboardInterrupt:
            display.close()
            typer.echo(
                "interrupted: run the same command again to finish the remaining runs", err=True
            )
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            display.close()
        print_table(runs, rows)
        typer.echo(f"Results: {sweep_dir / DB} ({len(rows)} runs)")
        if report:
            from vanishing.cli.run import write_report_quietly

            write_report_quietly(sweep_dir)


class SweepDisplay:
    """Progress of a sweep: a rich bar with ETA and the gradient strip of the run that finished
    last (one cell per layer, shaded by its weight-gradient norm at the last recorded step) on a
    terminal; one plain line per finished run (with the ETA) otherwise."""

    def __init__(self, sweep_dir: Path | None = None) -> None:
        from rich.console import Console

        self.sweep_dir = sweep_dir
        self.console = Console(highlight=False)
        self.live = self.console.is_terminal
        self.bar = None
        self.task = None
        self.total = self.todo = self.done = 0
        self.workers = 1
        self.seconds: list[float] = []  # how long each finished run took (its summary's)
        self.started = time.monotonic()

    def eta(self) -> float | None:
        """Seconds left: the mean duration of the finished runs times the rounds of
        ``workers`` parallel runs still to go (the elapsed time over the runs done would count
        the first round's parallel runs as one after another: a first ETA twice too long on 2
        workers). None before any run finished."""
        if not self.seconds:
            return None
        mean = sum(self.seconds) / len(self.seconds)
        left = self.todo - self.done
        return mean * math.ceil(left / max(1, self.workers))

    def event(self, kind: str, run, info) -> None:
        if kind == "plan":
            self.total, self.todo = info["total"], info["todo"]
            self.workers = int(info.get("workers") or 1)
            self.started = time.monotonic()
            finished = self.total - self.todo
            self.console.print(
                f"sweep: {self.total} runs, {finished} already finished, {self.todo} to run"
            )
            if self.live and self.todo:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                from vanishing.report.terminal import SHADES

                self.console.print(
                    "each line's strip: the run that finished last, one cell per layer from "
                    f"input to output, shaded by its weight-gradient norm: '{SHADES[-1]}' the "
                    f"largest, '{SHADES[-2]}' '{SHADES[-3]}' '{SHADES[-4]}' one, two, three "
                    "decades less, blank below; '·' zero, '!' NaN/inf",
                    style="dim",
                )

                self.bar = Progress(
                    TextColumn("runs"),
                    BarColumn(bar_width=20),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("ETA {task.fields[eta]}"),
                    TextColumn("{task.description}"),
                    console=self.console,
                )
                self.bar.start()
                self.task = self.bar.add_task("", total=self.todo, eta="-")
        elif kind == "finish":
            self.done += 1
            seconds = (info or {}).get("seconds")
            if isinstance(seconds, (int, float)) and math.isfinite(seconds):
                self.seconds.append(float(seconds))
            eta = self.eta()
            line = f"{_params(run.params)}: {_outcome(info)}"
            if self.bar is not None:
                last = f"{_params(run.params)}: {info['status']}"
                strip = self.strip(run)
                self.bar.update(
                    self.task,
                    advance=1,
                    eta="-" if eta is None else _clock(eta),
                    description=_clip(last, 48) + (f"  {strip}" if strip else ""),
                )
            else:
                elapsed = time.monotonic() - self.started
                self.console.print(
                    f"[{self.done}/{self.todo}] {line}  (elapsed {_clock(elapsed)}"
                    + ("" if eta is None else f", ETA {_clock(eta)}")
                    + ")",
                    soft_wrap=True,
                )

    def strip(self, run) -> str:
        """The finished run's per-layer gradient strip ("" when it recorded nothing)."""
        if self.sweep_dir is None:
            return ""
        try:
            import vanishing
            from vanishing.report.terminal import gradient_strip

            r = vanishing.load_run(self.sweep_dir / run.run_dir)
            m = r.metrics
            m = m[(m["param"] == "weight") & (m["step"] == m["step"].max())]
            order = {name: i for i, name in enumerate(r.layers)}
            values = m.sort_values("layer", key=lambda s: s.map(order))["grad_norm"].tolist()
            return gradient_strip(values)
        except Exception:  # noqa: BLE001 - a display nicety must never stop the sweep
            return ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _params(params: dict) -> str:
    return " ".join(f"{k.rpartition('.')[2]}={v}" for k, v in params.items())


def _metric(summary: dict | None) -> str:
    if not summary or summary.get("test_metric") is None:
        return "-"
    from vanishing.report.formatting import metric_text

    name = summary.get("metric_name") or "metric"
    short = "acc" if name == "accuracy" else name
    return f"{short} {metric_text(summary['test_metric'], name)}"


def _outcome(summary: dict) -> str:
    text = f"{summary['status']}, {_metric(summary)}"
    if summary.get("error"):
        text += f" ({summary['error'][:80]})"
    return text


def _kinds(status: str | None, summary: dict) -> str:
    if status not in ("completed", "diverged"):
        return "-"
    return ", ".join(summary.get("kinds") or []) or "healthy"


def print_table(runs, rows: list[dict]) -> None:
    """One line per run of the sweep: its swept values, status, test metric, first/last
    hidden-layer speed of learning and diagnosis kinds."""
    from rich.table import Table

    from vanishing.cli.app import stdout_console
    from vanishing.report.formatting import stat_text

    by_key = {r["key"]: r for r in rows}
    names = list(runs[0].params) if runs else []
    table = Table(title="Sweep results")
    for name in names:
        table.add_column(name.rpartition(".")[2])
    for header in ("status", "test metric", "first / last", "diagnosis"):
        # the diagnosis wraps at its commas rather than pushing the table past the terminal
        right = header in ("test metric", "first / last")
        table.add_column(header, justify="right" if right else "left", overflow="fold")
    for run in runs:
        row = by_key.get(run.key, {})
        summary = row.get("summary") or {}
        ratio = summary.get("first_last_ratio")
        table.add_row(
            *(str(run.params[n]) for n in names),
            row.get("status", "?"),
            _metric(summary),
            stat_text(ratio),
            _kinds(row.get("status"), summary).replace(", ", ",\n"),
        )
    stdout_console(160).print(table)  # a log file: no need to squeeze
