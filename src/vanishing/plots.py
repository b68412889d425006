"""Plots of a run, one function each: pass a run (``vanishing.Run`` or a run directory path),
get a matplotlib ``Figure`` (None when the run has no data for that plot).

These are the plots of the HTML report (:mod:`vanishing.report.plots`, where they are drawn),
under their public names. They read the run directory only (never a live model), with bounded
memory, and never touch pyplot's global state; in a notebook a returned figure shows inline,
elsewhere ``save_figure(fig, "name")`` writes ``name.png`` and ``name.svg``. To draw several plots of
one large run, read it once with ``vanishing.report.data.RunData(path)`` and pass that.

Example:
    >>> import vanishing, vanishing.plots
    >>> from vanishing.report.data import example_run
    >>> run = vanishing.load_run(example_run())          # a 6-hidden-layer sigmoid MLP
    >>> fig = vanishing.plots.depth_profile(run)
    >>> fig.axes[0].get_yscale()
    'log'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vanishing.report import plots as _plots

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "depth_profile",
    "speed_heatmap",
    "speed_curves",
    "activations",
    "saturation",
    "gradient_through_time",
    "update_ratio",
    "loss_curves",
    "speed_by_layer",
    "sweep_metric",
    "save_figure",
    "png_bytes",
]


def depth_profile(run: Any, steps: Sequence[int] | None = None) -> Figure | None:
    """Gradient through depth: each layer's weight-gradient norm ‖∂L/∂W‖ and error signal
    ‖∂L/∂h‖, in forward order, at ``steps`` (default: the first, middle and last recorded).
    A curve falling toward the input is the vanishing gradient.

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> fig = vanishing.plots.depth_profile(example_run())
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['step 0', 'step 9', 'step 19']
    """
    return _plots.depth_profile(run, steps)


def speed_heatmap(run: Any) -> Figure | None:
    """Speed of learning ‖∂C/∂b‖ of each hidden layer (rows) over training (columns), log10.

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> fig = vanishing.plots.speed_heatmap(example_run())
        >>> fig.axes[0].collections[0].get_array().shape   # 6 hidden layers x 20 steps
        (6, 20)
    """
    return _plots.speed_heatmap(run)


def speed_curves(run: Any) -> Figure | None:
    """Nielsen's picture: one speed-of-learning curve ‖∂C/∂b‖ per hidden layer, log scale.

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> len(vanishing.plots.speed_curves(example_run()).axes[0].get_lines())
        6
    """
    return _plots.speed_curves(run)


def activations(run: Any) -> Figure | None:
    """Activation values of each layer over training and the mean derivative phi'(z) of each
    activation against its bound max |phi'|.

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> len(vanishing.plots.activations(example_run()).axes)
        2
    """
    return _plots.activations(run)


def saturation(run: Any) -> Figure | None:
    """Saturated share (|phi'| < 5% of its max) and dead-unit share of each activation layer.

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> [ax.get_ylabel() for ax in vanishing.plots.saturation(example_run()).axes]
        ['share of entries saturated']
    """
    return _plots.saturation(run)


def gradient_through_time(run: Any) -> Figure | None:
    """Gradient norm reaching each time step of each recurrent layer (None without one).

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> fig = vanishing.plots.gradient_through_time(example_run("rnn"))
        >>> fig.axes[0].get_xlabel(), vanishing.plots.gradient_through_time(example_run()) is None
        ('time step t (T = 30)', True)
    """
    return _plots.temporal_profile(run)


def update_ratio(run: Any) -> Figure | None:
    """Update/parameter ratio ‖ΔW‖/‖W‖ of each layer's weight over training, log scale.

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> vanishing.plots.update_ratio(example_run()).axes[0].get_yscale()
        'log'
    """
    return _plots.update_ratio(run)


def loss_curves(run: Any) -> Figure | None:
    """Training loss per step, and the evaluation loss and metric when the run has them.

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> vanishing.plots.loss_curves(example_run()).axes[0].get_lines()[0].get_label()
        'training loss (per step)'
    """
    return _plots.loss_curves(run)


def speed_by_layer(runs: Sequence[Any], labels: Sequence[str] | None = None) -> Figure | None:
    """Several runs compared: the median speed of learning of each hidden layer, one line per
    run (e.g. a model and its remedy).

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> fig = vanishing.plots.speed_by_layer([example_run()], ["sigmoid"])
        >>> fig.axes[0].get_lines()[0].get_label()
        'sigmoid'
    """
    return _plots.speed_by_layer(runs, labels)


def sweep_metric(
    sweep: str | os.PathLike, metric: str = "test_metric", x: str | None = None
) -> Figure | None:
    """A sweep's summary ``metric`` (``test_metric``, ``first_last_ratio``, ...) against a swept
    field ``x`` (default ``model.depth``), one line per remedy, band = spread over seeds.

    Example:
        >>> import tempfile, vanishing.plots
        >>> from vanishing.experiments.sweep import SweepStore
        >>> d = tempfile.mkdtemp(); SweepStore(d + "/sweep.sqlite").close()
        >>> vanishing.plots.sweep_metric(d) is None        # no finished run yet
        True
    """
    return _plots.sweep_metric(sweep, metric, x)


def save_figure(fig: Figure, path_stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``fig`` as ``<path_stem>.png`` and ``<path_stem>.svg``; returns both paths.

    Example:
        >>> import tempfile, vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> fig = vanishing.plots.loss_curves(example_run())
        >>> png, svg = vanishing.plots.save_figure(fig, tempfile.mkdtemp() + "/loss")
        >>> png.name, svg.name
        ('loss.png', 'loss.svg')
    """
    return _plots.save_figure(fig, path_stem)


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes (to embed or send somewhere).

    Example:
        >>> import vanishing.plots
        >>> from vanishing.report.data import example_run
        >>> vanishing.plots.png_bytes(vanishing.plots.loss_curves(example_run()))[:4]
        b'\\x89PNG'
    """
    return _plots.png_bytes(fig, dpi)
