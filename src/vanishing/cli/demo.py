"""``vanishing demo``: the textbook vanishing gradient and its remedies, side by side."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

# (label, activation, init, depth, norm, residual): the baseline first, the shallow control last
CONFIGS = [
    ("sigmoid, N(0,1) init", "sigmoid", "normal", 10, "none", False),
    ("relu, He init", "relu", "he_normal", 10, "none", False),
    ("leaky_relu, He init", "leaky_relu", "he_normal", 10, "none", False),
    ("tanh, Xavier init", "tanh", "xavier_normal", 10, "none", False),
    ("selu, LeCun init", "selu", "lecun_normal", 10, "none", False),
    ("sigmoid + batch norm", "sigmoid", "normal", 10, "batch", False),
    ("sigmoid + residual, Xavier init", "sigmoid", "xavier_normal", 10, "none", True),
    ("control: sigmoid, N(0,1), 2 hidden", "sigmoid", "normal", 2, "none", False),
]


#: The demo's conclusion, beside its runs: the paragraphs the terminal printed, which the
#: demo's HTML page (vanishing.report.html.render_collection) shows under its verdict.
CONCLUSION = "conclusion.txt"


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to ``app``."""

    @app.command()
    def demo(
        quick: bool = typer.Option(False, "--quick", help="Fewer steps: done in seconds."),
        out: Path = typer.Option(Path("runs"), "--out", "-o", help="Where the run directories go."),
        steps: int = typer.Option(
            0, "--steps", min=0, help="Training steps per model (0: default)."
        ),
        report: bool = typer.Option(
            True, "--report/--no-report", help="Write the HTML report comparing the runs."
        ),
    ) -> None:
        """Watch the vanishing gradient happen in a deep sigmoid net, and the remedies cure it."""
        from vanishing.cli.app import fail

        if out.exists() and not out.is_dir():
            raise fail(f"--out {out} is a file; pass a directory for the demo's runs")
        try:
            rows = run_demo(out=out, steps=steps or (80 if quick else 400))
        except OSError as e:
            raise fail(f"cannot write the demo's runs to {out}: {e.strerror or e}") from None
        if report and rows:
            from vanishing.cli.run import write_report_quietly

            write_report_quietly(rows[0].run_dir.parent)


@dataclass
class DemoRow:
    label: str
    speeds: list[float]  # median over training of each hidden layer's speed, forward order
    #: each hidden layer's speed over the last one's, recorder.semantics.first_last_ratio
    relative: list[float | None]
    accuracy: float
    run_dir: Path
    kinds: list[str]
    #: the hidden layers' qualified module names, forward order (as the diagnosis quotes them)
    names: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """First / last hidden layer: the run's :meth:`vanishing.Run.first_last_ratio`."""
        return self.relative[0] if self.relative else None


def hidden_speeds(run) -> list[float]:
    """Median over the recorded steps of each hidden layer's speed of learning (Nielsen's
    ``||dC/db||``, read where :func:`vanishing.recorder.semantics.speed_source` says).

    Example:
        >>> import vanishing
        >>> from vanishing.cli.demo import hidden_speeds
        >>> from vanishing.report.data import example_run
        >>> speeds = hidden_speeds(vanishing.load_run(example_run()))
        >>> len(speeds), speeds[0] < speeds[-1]
        (6, True)
    """
    return [float(v) for v in run.speeds().median()]


def relative_speeds(run) -> list[float | None]:
    """Each hidden layer's speed of learning over the last hidden layer's, in the one definition
    of the first/last ratio (:func:`vanishing.recorder.semantics.first_last_ratio`: the median
    of per-step ratios), so that the first entry is the run's first/last ratio.

    Example:
        >>> import vanishing
        >>> from vanishing.cli.demo import relative_speeds
        >>> from vanishing.report.data import example_run
        >>> run = vanishing.load_run(example_run())
        >>> rel = relative_speeds(run)
        >>> rel[0] == run.first_last_ratio(), rel[-1]
        (True, 1.0)
    """
    from vanishing.recorder.semantics import first_last_ratio

    speeds = run.speeds()
    if speeds.shape[1] < 2:
        return []
    last = speeds.iloc[:, -1]
    return [first_last_ratio(speeds[c], last) for c in speeds.columns]


def run_demo(*, out: Path, steps: int, width: int = 16, seed: int = 0) -> list[DemoRow]:
    """Train every configuration on the digits under a monitor and print what happened.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from vanishing.cli.demo import run_demo
        >>> rows = run_demo(out=Path(tempfile.mkdtemp()), steps=10)   # doctest: +ELLIPSIS
        vanishing demo...
        >>> rows[0].ratio < rows[1].ratio    # sigmoid N(0,1) vanishes, relu + He does not
        True
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vanishing.cli.app import stdout_console
    from vanishing.experiments.data import digits

    console = stdout_console()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(out) / f"demo-{stamp}"
    suffix = 1
    while base.exists():
        base = Path(out) / f"demo-{stamp}-{suffix}"
        suffix += 1
    console.print(
        f"vanishing demo: {len(CONFIGS)} MLPs (width {width}) on scikit-learn's digits, "
        f"{steps} SGD steps each, every step watched by vanishing.watch"
    )
    data = digits(seed=seed)
    rows: list[DemoRow] = []
    started = time.perf_counter()
    # progress on stderr, gone when done: about a minute on a busy 2-core machine
    progress = Progress(
        TextColumn("training {task.fields[label]:<34}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True, highlight=False),
        transient=True,
    )
    with progress:
        task = progress.add_task("demo", total=len(CONFIGS), label="")
        for i, config in enumerate(CONFIGS):
            progress.update(task, label=config[0])
            rows.append(_train_one(i, config, data, base, steps, width, seed))
            progress.advance(task)
    _print_summary(console, rows, base, time.perf_counter() - started)
    if rows and rows[0].kinds:
        _repair_baseline(console, data, base, steps, width, seed)
    return rows


def _repair_baseline(console, data, base: Path, steps: int, width: int, seed: int) -> None:
    """The demo's last act: vanishing.repair on a fresh baseline, the remedies measured on
    copies, the best one's change written to ``repair.py`` beside the runs."""

    import torch
    from rich.table import Table

    import vanishing
    from vanishing.experiments.models import mlp
    from vanishing.sinks import ParquetSink

    label, act, init, depth, norm, residual = CONFIGS[0]
    x, y = data[0], data[1]
    g = torch.Generator().manual_seed(seed)
    k = min(steps, 200)
    # the same kind of batches the demo trains on: 64 examples drawn with replacement
    batches = [
        (x[i], y[i]) for i in (torch.randint(0, len(x), (64,), generator=g) for _ in range(k))
    ]
    torch.manual_seed(seed)
    model = mlp(64, 10, depth=depth, width=width, activation=act, init=init, norm=norm,
                residual=residual)  # fmt: skip
    started = time.perf_counter()
    rep = vanishing.repair(
        model,
        batches,
        torch.nn.functional.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        steps=k,
        seed=seed,
        progress=False,
    )
    seconds = time.perf_counter() - started
    ParquetSink(base).write_json("repair.json", rep.to_dict())
    rep.report(base / "repair.html")
    best = rep.best
    if best is not None:
        (base / "repair.py").write_text(
            f"# vanishing demo: the change that fixed the baseline ({label}), measured\n"
            + best.code.rstrip()
            + "\n"
        )
    table = Table(
        title="vanishing.repair: each remedy tried on a copy of the baseline",
        caption=f"{k} steps each on the same batches; loss: mean of the last 10% "
        f"(baseline {_fmt(rep.loss_before)})",
    )
    table.add_column("remedy", overflow="fold")
    table.add_column("verdict")
    table.add_column("loss after", justify="right")
    table.add_column("first/last", justify="right")
    for c in rep.candidates[:6]:
        table.add_row(c.remedy, c.verdict, _fmt(c.loss_after), _fmt(c.ratio_after))
    console.print(table)
    if best is None:
        paragraph = f"The repair: no remedy fixed the baseline in {k} steps per candidate."
        console.print(f"{paragraph[:-1]} ({seconds:.0f} s).")
    else:
        paragraph = (
            f"The repair: {len(rep.candidates)} remedies tried on copies of the baseline, "
            f"{k} steps each on the same batches. The fix measured to work: {best.remedy} "
            f"(the diagnosis' findings gone; loss {_fmt(rep.loss_before)} -> "
            f"{_fmt(best.loss_after)}, first / last {_fmt(best.ratio_before)} -> "
            f"{_fmt(best.ratio_after)})."
        )
        console.print(
            f"{paragraph[:-1]}, found in {seconds:.0f} s for {len(rep.candidates) + 1} x {k} "
            f"steps. Its code: {base / 'repair.py'}; every candidate: {base / 'repair.html'}."
        )
    # the demo's page carries the repair's outcome with the rest of its conclusion
    conclusion = base / CONCLUSION
    if conclusion.is_file():
        conclusion.write_text(conclusion.read_text().rstrip("\n") + "\n\n" + paragraph + "\n")


def _fmt(value) -> str:
    from vanishing.report.formatting import stat_text

    return stat_text(value)


def _train_one(i, config, data, base: Path, steps: int, width: int, seed: int) -> DemoRow:
    import torch

    from vanishing.experiments.models import mlp
    from vanishing.experiments.train import train_classifier
    from vanishing.recorder.reader import load_run

    label, act, init, depth, norm, residual = config
    """Train one configuration of the demo under the monitor; its row of the table."""
    torch.manual_seed(seed)
    model = mlp(
        64,
        10,
        depth=depth,
        width=width,
        activation=act,
        init=init,
        norm=norm,
        residual=residual,
    )
    run_dir = base / f"{i:02d}-{act}-{init}-{norm}{'-residual' if residual else ''}-d{depth}"
    t0 = time.perf_counter()
    result = train_classifier(model, data, run_dir=run_dir, steps=steps, seed=seed)
    run = load_run(result.run_dir)
    row = DemoRow(
        label,
        hidden_speeds(run),
        relative_speeds(run),
        result.test_accuracy,
        run_dir,
        run.diagnose().kinds,
        [str(c) for c in run.speeds().columns],
    )
    _write_summary(row, result, steps, time.perf_counter() - t0)
    return row


def _steps(rows: list[DemoRow]) -> int | str:
    import json

    try:
        return json.loads((rows[0].run_dir / "summary.json").read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return "its"


def _write_summary(row: DemoRow, result, steps: int, seconds: float) -> None:
    """``summary.json`` in the run directory, in the format ``vanishing run`` writes."""
    import math

    summary = {
        "status": "diverged" if result.diverged else "completed",
        "steps": steps,
        "train_loss": result.final_loss if math.isfinite(result.final_loss) else None,
        "test_loss": None,
        "test_metric": result.test_accuracy,
        "metric_name": "accuracy",
        "first_last_ratio": row.ratio,
        "kinds": row.kinds,
        "seconds": seconds,
        "error": None,
        "label": row.label,
    }
    from vanishing.sinks import ParquetSink

    ParquetSink(row.run_dir).write_json("summary.json", summary)  # atomic, as the runner's


def _print_summary(console, rows: list[DemoRow], base: Path, seconds: float) -> None:
    from rich.table import Table

    from vanishing.diagnose.view import max_derivative_text
    from vanishing.report.formatting import metric_text, stat_text
    from vanishing.report.names import short_names

    table = Table(
        title="First vs last hidden layer's speed of learning ||dC/db||",
        caption="first/last: the median over training of each step's ratio",
    )
    # fits 80 columns: the diagnosis wraps at its commas instead of being cut
    table.add_column("model", ratio=1, overflow="fold")
    table.add_column("first/last", justify="right", no_wrap=True)
    table.add_column("test acc.", justify="right", no_wrap=True)
    table.add_column("diagnosis", min_width=22, overflow="fold")
    for r in rows:
        table.add_row(
            r.label,
            stat_text(r.ratio),
            metric_text(r.accuracy, "accuracy"),
            ",\n".join(r.kinds) or "healthy",
        )
    console.print(table)

    baseline = rows[0]
    layers = Table(
        title=f"Per-layer speed of learning of the baseline ({baseline.label})",
        caption="÷ last hidden: the median of the per-step ratios",
    )
    layers.add_column("hidden layer (module)", justify="right")
    layers.add_column("||dC/db||", justify="right")
    layers.add_column("÷ last hidden", justify="right")
    names = short_names(baseline.names) if len(baseline.names) == len(baseline.speeds) else None
    for i, (s, rel) in enumerate(zip(baseline.speeds, baseline.relative)):
        name = f"'{names[i]}'" if names else str(i)
        layers.add_row(name, f"{s:.2e}", stat_text(rel))
    console.print(layers)
    conclusion: list[str] = []  # the paragraphs below, also on the demo's HTML page
    shrink = 1 / baseline.ratio if baseline.ratio else float("inf")
    ends = f" ('{baseline.names[0]}' vs '{baseline.names[-1]}')" if len(baseline.names) > 1 else ""
    conclusion.append(
        f"In the baseline the first hidden layer learns {stat_text(shrink)} times slower than the "
        f"last{ends} "
        "(first / last: the median over the steps of each step's ratio): "
        f"each layer multiplies the gradient by sigmoid'(z) <= {max_derivative_text('sigmoid')} "
        "and a weight. The remedies keep "
        "the ratio near 1 (ReLU's derivative is 1 where active; He/Xavier/LeCun init scale weights "
        "to the fan-in; batch norm re-centres inputs away from the flat tails)."
    )
    control = rows[-1] if rows[-1].label.startswith("control") else None
    if control is not None and control.ratio and baseline.ratio:
        conclusion.append(
            f"The control has the baseline's sigmoid and N(0,1) init but 2 hidden layers instead "
            f"of {len(baseline.speeds)}: its first / last is {stat_text(control.ratio)} against "
            f"{stat_text(baseline.ratio)}, so the vanishing comes with depth. Its lower accuracy "
            f"({metric_text(control.accuracy, 'accuracy')}) is how slowly a sigmoid net learns with plain SGD in "
            f"{_steps(rows)} steps"
            + (
                ", and it saturates: N(0,1) weights push a sigmoid into its flat tails at any depth"
                if "saturated_activations" in control.kinds
                else ""
            )
            + "."
        )
    for paragraph in conclusion:
        console.print(paragraph)
    (base / CONCLUSION).write_text("\n\n".join(conclusion) + "\n")
    console.print(
        f"Runs written to {base} ({seconds:.0f} s). Read one with vanishing.load_run(PATH)."
    )
