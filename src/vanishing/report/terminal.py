"""Terminal views: rich summary tables, the per-layer gradient strip, a live training view.

The strip shows one character cell per layer (forward order), shaded by log10 magnitude, so
that a vanishing gradient is visible while it happens::

    [  ░░▒▒▓▓████]   first layers blank: their gradients are decades below the last ones

When stdout is not a terminal the live view prints plain text lines at a bounded rate instead
of redrawing.

Example:
    >>> from vanishing.report.terminal import gradient_strip
    >>> gradient_strip([1e-6, 1e-4, 1e-2, 1.0])
    ' ░▓█'
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SHADES",
    "NONFINITE",
    "ZERO",
    "gradient_strip",
    "summary_table",
    "run_table",
    "sweep_table",
    "diagnosis_table",
    "TrainingView",
]

#: Cells from the smallest to the largest magnitude.
SHADES = " ░▒▓█"
#: Cell of a NaN or infinite value.
NONFINITE = "!"
#: Cell of an exact zero (no gradient at all).
ZERO = "·"
_MIN_SPAN = 3.0  # decades: a strip spanning less than this is shaded against this range


def gradient_strip(
    values: Sequence[float], lo: float | None = None, hi: float | None = None
) -> str:
    """One character per value, shaded by log10 |value| between ``lo`` and ``hi`` (decades).

    Default range: ``hi`` is the largest log10 magnitude, ``lo`` the smallest, widened to at
    least 3 decades below ``hi`` (so a healthy, even profile shades dark throughout). Larger
    magnitudes never get a lighter cell. NaN or infinity: ``!``; exactly zero: ``·``.

    Example:
        >>> from vanishing.report.terminal import gradient_strip
        >>> gradient_strip([1e-9, 1e-3, 1.0, float("nan"), 0.0])
        ' ▓█!·'
        >>> gradient_strip([0.5, 0.4, 0.6])     # within 3 decades of each other: all dark
        '███'
    """
    logs = []
    for v in values:
        try:
            x = abs(float(v))
        except (TypeError, ValueError):
            x = float("nan")
        logs.append(math.log10(x) if math.isfinite(x) and x > 0 else (None if x == 0 else math.nan))
    finite = [x for x in logs if x is not None and math.isfinite(x)]
    if hi is None:
        hi = max(finite) if finite else 0.0
    if lo is None:
        lo = min(min(finite) if finite else hi, hi - _MIN_SPAN)
    span = max(hi - lo, 1e-12)
    out = []
    top = len(SHADES) - 1
    for x in logs:
        if x is None:
            out.append(ZERO)
        elif not math.isfinite(x):
            out.append(NONFINITE)
        else:
            level = int(math.floor((x - lo) / span * top + 0.5))
            out.append(SHADES[min(max(level, 0), top)])
    return "".join(out)


# ---- tables -----------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".3g") -> str:
    from vanishing.report.formatting import stat_text

    return stat_text(value, spec)


def diagnosis_table(diag: Any):
    """A rich Table of a Diagnosis: one row per finding (kind, severity, layers, remedies).

    Example:
        >>> from vanishing.diagnose.findings import Diagnosis
        >>> from vanishing.report.terminal import diagnosis_table
        >>> diagnosis_table(Diagnosis(findings=[])).row_count
        1
    """
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Diagnosis", show_lines=True)
    table.add_column("finding")
    table.add_column("severity")
    table.add_column("layers", overflow="fold", max_width=36)
    table.add_column("remedies (best first)", overflow="fold")
    if not diag.findings:
        table.add_row(Text("healthy", style="green"), "", "", "no gradient-flow problems found")
    for f in diag.findings:
        layers = ", ".join(f.layers[:6]) + (
            f" … (+{len(f.layers) - 6})" if len(f.layers) > 6 else ""
        )
        style = "bold red" if f.severity == "critical" else "yellow"
        table.add_row(
            Text(f.kind, style="bold")
            + Text("\n" + f.message, style="dim")
            + (Text("\ncause: " + f.cause) if getattr(f, "cause", "") else Text("")),
            Text(f.severity, style=style),
            Text(layers),
            Text("\n".join(f"{r.name}: {r.why}" for r in f.remedies)),
        )
    return table


def run_table(run: Any):
    """A rich Table summarising a run: steps, loss, the speed of learning of the first and last
    hidden layers, their ratio, the gradient strip through depth and the diagnosis kinds.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.terminal import run_table
        >>> run_table(example_run()).row_count
        5
    """
    from rich.table import Table
    from rich.text import Text

    from vanishing.recorder.semantics import ratio_pairs
    from vanishing.report.data import as_run_data
    from vanishing.report.formatting import RATIO_LABEL_BY_ROLE, ratio_label

    data = as_run_data(run)
    table = Table(title=f"Run {data.path.name}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    steps = data.step_list
    table.add_row(
        "recorded steps", f"{len(steps)}" + (f" ({steps[0]}..{steps[-1]})" if steps else "")
    )
    if steps:
        loss = data.steps["loss"]
        table.add_row("loss first → last", f"{_fmt(loss.iloc[0])} → {_fmt(loss.iloc[-1])}")
    speed = data.speed().mean
    if speed.shape[1]:
        last = speed.iloc[-1].to_numpy(float)
        label = ratio_label(data.layer_info)
        if label == RATIO_LABEL_BY_ROLE:
            # a stack's first and last layers have different roles (a transformer's block 0
            # attention, its last block's MLP): their raw speeds are not comparable, the
            # ratio of each role with itself is
            per_step = data.run.step_ratios()
            table.add_row(
                "speed of learning, last step",
                f"first / last block, median over {len(ratio_pairs(data.layer_info))} roles "
                f"{_fmt(per_step.iloc[-1] if len(per_step) else None)}",
            )
        else:
            first_name, last_name = speed.columns[0], speed.columns[-1]
            table.add_row(
                "speed of learning, last step",
                f"first hidden '{first_name}' {_fmt(last[0])}, last hidden '{last_name}' "
                f"{_fmt(last[-1])}",
            )
        table.add_row(label, _fmt(data.first_last_ratio()))
        table.add_row("strip (input → output)", Text("[" + gradient_strip(list(last)) + "]"))
    summary = data.summary or {}
    if summary.get("test_metric") is not None:
        from vanishing.report.formatting import metric_text

        name = summary.get("metric_name") or "metric"
        table.add_row(f"test {name}", metric_text(summary["test_metric"], name))
    kinds = summary.get("kinds")
    if kinds is not None:
        table.add_row("diagnosis", ", ".join(kinds) or "healthy")
    return table


def sweep_table(sweep: str | os.PathLike):
    """A rich Table of a sweep's runs from sweep.sqlite: swept values, seed, status, results.

    Example:
        >>> sweep_table("sweeps/depth")   # doctest: +SKIP
    """
    from rich.table import Table

    from vanishing.experiments.store import read_sweep
    from vanishing.report.formatting import metric_text

    rows = read_sweep(sweep)
    fields = list(dict.fromkeys(k for r in rows for k in r["params"] if k != "seed"))
    table = Table(title=f"Sweep {Path(sweep).name}: {len(rows)} runs")
    for f in fields:
        table.add_column(f.split(".")[-1])
    for name in ("seed", "status", "test metric", "first / last", "diagnosis"):
        table.add_column(
            name, justify="right" if name in ("seed", "test metric", "first / last") else "left"
        )
    for r in rows:
        s = r["summary"] or {}
        kinds = r["kinds"] if r["kinds"] is not None else s.get("kinds")
        table.add_row(
            *[str(r["params"].get(f, "")) for f in fields],
            str(r["seed"]),
            r["status"],
            metric_text(s.get("test_metric"), s.get("metric_name")),
            _fmt(s.get("first_last_ratio")),
            ", ".join(kinds) if kinds else ("healthy" if kinds is not None else "—"),
        )
    return table


def compare_table(runs: Any, labels: list[str] | None = None, diagnoses: Any = None):
    """A rich Table of runs side by side, one row each: recorded steps, final loss, the first /
    last ratio of the speed of learning and the diagnosis' finding kinds. Fits 80 columns.

    ``diagnoses`` (one per run, or None) saves diagnosing the runs again.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.terminal import compare_table
        >>> compare_table([example_run(), example_run()], ["a", "b"]).row_count
        2
    """
    from rich.table import Table
    from rich.text import Text

    from vanishing.recorder.reader import Run, load_run
    from vanishing.report.data import distinct_labels
    from vanishing.report.formatting import ratio_label

    runs = [r if isinstance(r, Run) else load_run(getattr(r, "path", r)) for r in runs]
    labels = list(labels) if labels is not None else distinct_labels([r.path for r in runs])
    diagnoses = list(diagnoses) if diagnoses is not None else [r.diagnose() for r in runs]
    table = Table(
        title=f"{len(runs)} run{'s' if len(runs) != 1 else ''} compared", caption_justify="left"
    )
    table.add_column("run", overflow="fold", max_width=24)
    table.add_column("steps", justify="right")
    table.add_column("final loss", justify="right")
    table.add_column("first / last", justify="right")
    table.add_column("findings", overflow="fold")
    ratio_labels: dict[str, None] = {}  # what each run's ratio compares, in order, once
    for run, label, diag in zip(runs, labels, diagnoses):
        loss = run.all_steps.get("loss", [])
        # one line per kind, in the order found, styled by its worst finding: a run can hold
        # two findings of one kind (a NaN step and the growth before it)
        critical: dict[str, bool] = {}
        for f in diag.findings:
            critical[f.kind] = critical.get(f.kind, False) or f.severity == "critical"
        findings = Text()
        for i, (kind, worst) in enumerate(critical.items()):
            findings += Text(("\n" if i else "") + kind, style="bold red" if worst else "yellow")
        ratio_labels[ratio_label(run.layer_info)] = None
        table.add_row(
            label,
            str(len(run.all_steps)),
            _fmt(loss.iloc[-1], ".4g") if len(loss) else "—",
            _fmt(run.first_last_ratio()),
            findings if diag.findings else Text("healthy", style="green"),
        )
    table.caption = "first / last: " + "; ".join(ratio_labels)
    return table


def summary_table(obj: Any):
    """The rich summary Table of a Diagnosis, a sweep directory, or a run (a ``vanishing.Run``,
    a run directory or a RunData).

    Example:
        >>> from vanishing.diagnose.findings import Diagnosis
        >>> from vanishing.report.terminal import summary_table
        >>> summary_table(Diagnosis(findings=[])).title
        'Diagnosis'
    """
    if hasattr(obj, "findings") and hasattr(obj, "notes"):
        return diagnosis_table(obj)
    path = getattr(obj, "path", obj)
    if isinstance(path, (str, os.PathLike)) and (Path(path) / "sweep.sqlite").is_file():
        return sweep_table(path)
    return run_table(obj)


# ---- live view --------------------------------------------------------------------------------


class TrainingView:
    """A progress bar with ETA, the loss and the live per-layer gradient strip.

    ``update(step, loss=..., layer_values={layer: grad_norm})`` with ``step`` the number of
    steps done so far (1..total). On a terminal it redraws in place (rich); otherwise it prints
    a plain line at most every ``every`` of the total (10% by default) and at the end.
    ``Monitor.latest("grad_norm")`` gives the ``layer_values`` of the last recorded step.

    Example:
        >>> import io
        >>> from vanishing.report.terminal import TrainingView
        >>> out = io.StringIO()
        >>> with TrainingView(total=4, title="fit", file=out) as view:
        ...     for step in range(1, 5):
        ...         view.update(step, loss=1.0 / step, layer_values={"0": 1e-4, "1": 1e-2})
        >>> print(out.getvalue().splitlines()[-1])
        fit: step 4/4 (100%) loss 0.25 elapsed 0s [░█]
    """

    def __init__(
        self, total: int, *, title: str = "training", file: Any = None, every: float = 0.1
    ) -> None:
        if total <= 0:
            raise ValueError(f"total must be a positive number of steps, got {total}")
        self.total = int(total)
        self.title = title
        self.file = file if file is not None else sys.stdout
        self.every = max(float(every), 1e-6)
        self._progress = None
        self._task = None
        self._start = 0.0
        self._next_print = 0
        self._last: tuple[int, Any, str] = (0, None, "")
        self.lines = 0  #: plain lines printed

    @property
    def live(self) -> bool:
        """Whether the view redraws in place (its stream is a terminal)."""
        isatty = getattr(self.file, "isatty", None)
        return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"

    def __enter__(self) -> TrainingView:
        self._start = time.perf_counter()
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[loss]}"),
                TextColumn("[{task.fields[strip]}]", markup=False),
                console=Console(file=self.file),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total, loss="", strip="")
        return self

    def update(
        self,
        step: int,
        *,
        loss: float | None = None,
        layer_values: Mapping[str, float] | None = None,
    ) -> None:
        """Show that ``step`` steps are done, with the current loss and per-layer values."""
        strip = gradient_strip(list(layer_values.values())) if layer_values else ""
        self._last = (int(step), loss, strip)
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=min(step, self.total),
                loss="" if loss is None else f"loss {_fmt(loss, '.4g')}",
                strip=strip,
            )
            return
        if step >= self._next_print or step >= self.total:
            self._print()
            interval = max(1, math.ceil(self.total * self.every))
            self._next_print = (step // interval + 1) * interval

    def _print(self) -> None:
        step, loss, strip = self._last
        elapsed = time.perf_counter() - self._start
        pct = 100.0 * min(step, self.total) / self.total
        parts = [f"{self.title}: step {step}/{self.total} ({pct:.0f}%)"]
        if loss is not None:
            parts.append(f"loss {_fmt(loss, '.4g')}")
        if 0 < step < self.total:
            parts.append(f"eta {elapsed / step * (self.total - step):.0f}s")
        else:
            parts.append(f"elapsed {elapsed:.0f}s")
        if strip:
            parts.append(f"[{strip}]")
        print(" ".join(parts), file=self.file, flush=True)
        self.lines += 1
        self._printed_step = step

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            return
        if self._last[0] and getattr(self, "_printed_step", None) != self._last[0]:
            self._print()
