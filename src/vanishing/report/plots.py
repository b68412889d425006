"""Pictures of gradient flow, one function per plot, each returning a matplotlib Figure.

Every run plot takes a ``vanishing.Run``, a run directory or a
:class:`~vanishing.report.data.RunData` (pass one RunData to several plots to read the run
once), reads the run directory only (never a live model), and returns None when the run has
no data for it (no activation rows, no recurrent layer, no ``eval.parquet``). Figures are
``matplotlib.figure.Figure`` objects rendered with the Agg backend; pyplot's global state is
never touched. Long runs are drawn from time buckets: the line is the bucket mean (geometric
for norms) and the shaded band spans the bucket's minimum and maximum, so spikes stay visible.

Example:
    >>> import tempfile
    >>> from vanishing.report import plots
    >>> from vanishing.report.data import RunData, example_run
    >>> data = RunData(example_run())                     # or a path, or vanishing.load_run(...)
    >>> figs = {name: fn(data) for name, fn in plots.RUN_PLOTS}
    >>> sorted(name for name, fig in figs.items() if fig is None)   # no recurrent layer
    ['temporal']
    >>> png, svg = plots.save_figure(figs["speed_heatmap"], tempfile.mkdtemp() + "/speed")
    >>> png.name, svg.name
    ('speed.png', 'speed.svg')
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vanishing import activations as _activations
from vanishing.report.data import Agg, RunData, as_run_data
from vanishing.report.names import common_prefix, short_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "depth_profile",
    "speed_heatmap",
    "speed_curves",
    "activations",
    "saturation",
    "temporal_profile",
    "update_ratio",
    "loss_curves",
    "sweep_metric",
    "speed_by_layer",
    "save_figure",
    "png_bytes",
    "RUN_PLOTS",
    "MAX_DERIVATIVE",
]

#: max |phi'(z)| per built-in activation kind with its default options (from the torch-free
#: registry, at import; the plots read the registry when they draw, so later kinds show too)
MAX_DERIVATIVE = {a.kind: a.max_derivative() for a in _activations.registered()}


def _max_derivative(kind: str | None) -> float:
    """``max |phi'|`` of a recorded kind from the registry now; NaN when it is not registered."""
    return _activations.get(kind).max_derivative() if kind in _activations.kinds() else math.nan


_MAX_LEGEND = 10  # more lines than this get a colour bar by depth instead of a legend
_MAX_SHOWN = 8  # activation curves drawn (evenly spaced through depth)


def _figure(width: float = 8.0, height: float = 4.5, ncols: int = 1) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained", dpi=100)
    fig.subplots(1, ncols)
    return fig


def _label(name: str, limit: int = 28) -> str:
    """A free text (a run's label, a metric name) safe for matplotlib text ($ would start
    mathtext), shortened at its end. Layer names go through :func:`_names` instead."""
    text = name if len(name) <= limit else name[: limit - 1] + "…"
    return (text or "(root)").replace("$", r"\$")


def _names(names: Sequence[str], limit: int = 16) -> list[str]:
    """Layer labels for an axis or a legend: the one shortening of every view
    (:func:`vanishing.report.names.short_names`), made safe for matplotlib text."""
    return [n.replace("$", r"\$") for n in short_names(list(names), limit)]


def _axis_label(what: str, names: Sequence[str]) -> str:
    """``what, forward order``, and the prefix the labels dropped (every name shares it)."""
    prefix = common_prefix([n for n in names if n])
    text = f"{what}, forward order (input → output)"
    return text + (f"; names after '{_label(prefix, 40)}.'" if prefix else "")


_MAX_TICKS = 24  # named ticks on a depth axis; more layers get evenly spaced named ticks


def _name_ticks(ax, positions: Sequence[float], names: Sequence[str], axis: str = "x") -> None:
    """Tick a depth axis with the layers' names: every layer up to _MAX_TICKS of them, else
    evenly spaced ones (always the first and the last): never a second numbering."""
    labels = _names(names, 14)
    keep = _evenly(list(range(len(names))), _MAX_TICKS)
    pos = [positions[i] for i in keep]
    text = [labels[i] for i in keep]
    if axis == "x":
        ax.set_xticks(pos, text, rotation=45, ha="right", fontsize=7)
    else:
        ax.set_yticks(pos, text, fontsize=7)


def _step_axis(ax) -> None:
    """A training-step x axis: steps are whole numbers, so are its ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _run_colors(n: int) -> list:
    """Colours that tell runs apart (not a depth scale): tab10, tab20 up to 20, then viridis."""
    from matplotlib import colormaps

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    return _colors(n)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def _depth_colorbar(fig, ax, names: Sequence[str], what: str = "layer") -> None:
    """A colour bar by depth, ticked with layer names (first at the bottom)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    base = colormaps["viridis"]
    cmap = LinearSegmentedColormap.from_list("depth", [base(0.0), base(0.45), base(0.9)])
    sm = ScalarMappable(norm=Normalize(0, max(len(names) - 1, 1)), cmap=cmap)
    bar = fig.colorbar(sm, ax=ax, pad=0.01)
    keep = _evenly(list(range(len(names))), 8)
    labels = _names(names, 14)
    bar.set_ticks(keep, labels=[labels[i] for i in keep], fontsize=7)
    bar.set_label(_axis_label(what, names), fontsize=8)


def _legend(ax, **kwargs) -> Any:
    """A legend beside the axes, never over the data (constrained layout makes the room)."""
    kwargs.setdefault("fontsize", 7)
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, **kwargs)


def _legend_or_bar(fig, ax, names: Sequence[str], what: str = "layer") -> None:
    if len(names) <= _MAX_LEGEND:
        prefix = common_prefix([n for n in names if n])
        title = f"{what} (forward order)" + (f"\nafter '{_label(prefix, 30)}.'" if prefix else "")
        _legend(ax, title=title, title_fontsize=7)
    else:
        _depth_colorbar(fig, ax, names, what)


def _downsampled(agg: Agg) -> bool:
    return bool(len(agg.start)) and bool((agg.end != agg.start).any())


def _lines(ax, agg: Agg, names: Sequence[str], *, band: bool = True) -> None:
    """One line per layer over training (colour by depth), min-max band where downsampled.

    Many layers are drawn as one LineCollection (fast to render), with bands only around the
    first and the last layer (a hundred overlapping bands would hide each other)."""
    import numpy as np
    from matplotlib.collections import LineCollection

    colors = _colors(len(names))
    x = np.asarray(agg.x, dtype=float)
    if len(names) <= _MAX_LEGEND:
        for color, name, label in zip(colors, names, _names(names, 28)):
            ax.plot(x, agg.mean[name].to_numpy(dtype=float), color=color, lw=1.2, label=label)
        banded = list(zip(colors, names))
    else:
        segs = [np.column_stack([x, agg.mean[n].to_numpy(dtype=float)]) for n in names]
        ax.add_collection(LineCollection(segs, colors=colors, linewidths=0.9))
        ax.autoscale_view()
        banded = [(colors[0], names[0]), (colors[-1], names[-1])]
    if band and _downsampled(agg):
        for color, name in banded:
            ax.fill_between(
                x,
                agg.lo[name].to_numpy(float),
                agg.hi[name].to_numpy(float),
                color=color,
                alpha=0.15,
                lw=0,
                rasterized=True,
            )


def _note_downsampling(ax, data: RunData, agg: Agg) -> None:
    read, total = data.coverage
    parts = []
    if _downsampled(agg):
        parts.append(f"{len(agg.x)} time buckets: line = mean, band = min..max")
    if read < total:
        parts.append(f"metrics of {read} of {total} recorded steps read")
    if parts:
        ax.text(
            0.01,
            0.01,
            "; ".join(parts),
            transform=ax.transAxes,
            fontsize=7,
            color="0.35",
            va="bottom",
        )


def _log_if_wide(ax, values, axis: str = "y") -> None:
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) and v.max() / v.min() > 100:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _evenly(names: Sequence[str], k: int) -> list[str]:
    if len(names) <= k:
        return list(names)
    import numpy as np

    idx = sorted(set(np.linspace(0, len(names) - 1, k).round().astype(int).tolist()))
    return [names[i] for i in idx]


# ---- run plots ---------------------------------------------------------------------------------


def depth_profile(run: Any, steps: Sequence[int] | None = None) -> Figure | None:
    """Per-layer weight-gradient norm and error signal through depth at chosen steps.

    ``steps`` default: the first, middle and last recorded steps. Values are the exact recorded
    ones, left to right in forward order, log scale, ticked with module names. The left panel
    has one point per weight matrix (:attr:`RunData.weight_params`: a stacked LSTM's
    ``weight_ih_l0`` ... ``weight_hh_l1``, attention's ``in_proj_weight``); the right one
    per module that owns parameters.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.plots import depth_profile
        >>> fig = depth_profile(example_run())
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['step 0', 'step 9', 'step 19']
    """
    data = as_run_data(run)
    chosen = list(steps) if steps is not None else data.profile_steps()
    if not chosen:
        return None
    grad = data.weight_at_steps("grad_norm", chosen)
    err = data.at_steps("error_norm", None, chosen)
    err = err[[n for n in data.param_layers if n in err.columns]]
    panels = [
        (grad, "weight gradient  ‖∂L/∂W‖", "‖∂L/∂W‖ (L2 norm)", "weight matrix"),
        (err, "error signal  ‖∂L/∂h‖ (layer output)", "‖∂L/∂h‖ (L2 norm)", "layer"),
    ]
    panels = [p for p in panels if not p[0].empty and p[0].notna().to_numpy().any()]
    if not panels:
        return None
    fig = _figure(11 if len(panels) == 2 else 7, 4.6, len(panels))
    axes = fig.axes
    colors = {
        s: c for s, c in zip(chosen, ["#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd"] * 4)
    }
    for ax, (table, title, ylabel, what) in zip(axes, panels):
        x = list(range(table.shape[1]))
        for step in chosen:
            if step not in table.index:
                continue
            ax.plot(
                x,
                table.loc[step].to_numpy(float),
                marker="o",
                ms=3,
                lw=1.4,
                color=colors[step],
                label=f"step {step}",
            )
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(_axis_label(what, list(table.columns)), fontsize=8)
        _name_ticks(ax, x, list(table.columns))
        ax.grid(True, which="major", alpha=0.3)
        _legend(ax, fontsize=8)
    fig.suptitle(
        "Gradient through depth (vanishing: the curve falls toward the input)", fontsize=11
    )
    return fig


def speed_heatmap(run: Any) -> Figure | None:
    """Heatmap, hidden layer x step, of log10 of the speed of learning ‖∂C/∂b‖.

    Rows are hidden layers in forward order (first at the top); a dark band at the top that
    stays dark is the vanishing gradient. With many steps each column is a time bucket
    (geometric mean of its steps).

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.plots import speed_heatmap
        >>> fig = speed_heatmap(example_run())
        >>> fig.axes[0].collections[0].get_array().shape   # 6 hidden layers x 20 steps
        (6, 20)
    """
    import numpy as np
    from matplotlib import colormaps

    data = as_run_data(run)
    agg = data.speed()
    if agg.empty:
        return None
    names = list(agg.mean.columns)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log10(agg.mean.to_numpy(float).T)  # layer x bucket
    z = np.ma.masked_invalid(z)
    start = np.asarray(agg.start, dtype=float)
    end = np.asarray(agg.end, dtype=float)
    edges = np.r_[start, end[-1] + 1]
    fig = _figure(10, max(3.2, min(6.5, 1.6 + 0.18 * len(names))))
    ax = fig.axes[0]
    cmap = colormaps["magma"].with_extremes(bad="0.8")
    mesh = ax.pcolormesh(
        edges, np.arange(len(names) + 1) + 0.5, z, cmap=cmap, shading="flat", rasterized=True
    )
    ax.set_ylim(len(names) + 0.5, 0.5)
    _name_ticks(ax, list(range(1, len(names) + 1)), names, axis="y")
    ax.set_ylabel(
        _axis_label("hidden layer", names).replace(" (input → output)", ", first at top"),
        fontsize=8,
    )
    _step_axis(ax)
    bar = fig.colorbar(mesh, ax=ax, pad=0.01)
    bar.set_label("log10 ‖∂C/∂b‖  (speed of learning)")
    ax.set_title("Speed of learning per hidden layer over training", fontsize=11)
    _note_downsampling(ax, data, agg)
    return fig


def speed_curves(run: Any) -> Figure | None:
    """Nielsen's picture: speed of learning ‖∂C/∂b‖ of each hidden layer over training, log scale.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.plots import speed_curves
        >>> fig = speed_curves(example_run())
        >>> len(fig.axes[0].get_lines()), fig.axes[0].get_yscale()
        (6, 'log')
    """
    data = as_run_data(run)
    agg = data.speed()
    if agg.empty:
        return None
    names = list(agg.mean.columns)
    fig = _figure(9, 4.6)
    ax = fig.axes[0]
    _lines(ax, agg, names)
    ax.set_yscale("log")
    _step_axis(ax)
    ax.set_ylabel("‖∂C/∂b‖ (L2 norm)")
    ax.set_title("Speed of learning of each hidden layer (Nielsen)", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    _legend_or_bar(fig, ax, names, "hidden layer")
    _note_downsampling(ax, data, agg)
    return fig


def has_percentiles(run: Any) -> bool:
    """Whether the run recorded activation percentiles (the activation band is then the 2nd to
    98th percentile; ±1 std otherwise)."""
    data = as_run_data(run)
    low = data.agg("act_p02", None, data.activation_layers)
    return bool(not low.empty and low.mean.notna().to_numpy().any())


def activation_band(run: Any) -> str:
    """The band the activation plot draws around each layer's mean, in words."""
    return "2nd-98th percentile" if has_percentiles(run) else "±1 std"


def activations(run: Any) -> Figure | None:
    """Activation values per layer over training (mean, band = 2nd to 98th percentile, as in
    Glorot & Bengio's figures; ±1 std for runs recorded before percentiles were) and the mean
    derivative phi'(z) per layer against its bound max |phi'|.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.plots import activations
        >>> fig = activations(example_run())
        >>> fig.axes[1].get_title()
        'Mean derivative of each activation vs its maximum'
    """
    import numpy as np

    data = as_run_data(run)
    mean = data.agg("act_mean", None, data.activation_layers)
    std = data.agg("act_std", None, data.activation_layers)
    low = data.agg("act_p02", None, data.activation_layers)
    high = data.agg("act_p98", None, data.activation_layers)
    percentiles = has_percentiles(data)
    deriv_at = data.at_steps("act_deriv_mean", None, data.profile_steps())
    deriv_at = deriv_at[[n for n in data.activation_layers if n in deriv_at.columns]]
    has_mean = not mean.empty
    has_deriv = not deriv_at.empty and deriv_at.notna().to_numpy().any()
    if not has_mean and not has_deriv:
        return None
    fig = _figure(12 if has_mean and has_deriv else 7, 4.6, int(has_mean) + int(has_deriv))
    axes = list(fig.axes)
    if has_mean:
        ax = axes.pop(0)
        all_names = list(mean.mean.columns)
        shown = _evenly(all_names, _MAX_SHOWN)
        colors = _colors(len(shown))
        labels = dict(zip(all_names, _names(all_names, 16)))
        for color, name in zip(colors, shown):
            m = mean.mean[name].to_numpy(float)
            if percentiles and name in low.mean.columns and name in high.mean.columns:
                lo, hi = low.mean[name].to_numpy(float), high.mean[name].to_numpy(float)
            else:
                s = std.mean[name].to_numpy(float) if name in std.mean.columns else 0 * m
                lo, hi = m - s, m + s
            ax.plot(mean.x, m, color=color, lw=1.3, label=labels[name])
            if name in (shown[0], shown[-1]):
                # bands of every layer overlap into one smear: the first and last layer's
                # bands show the spread at both ends of the stack, the lines show each mean
                ax.fill_between(mean.x, lo, hi, color=color, alpha=0.18, lw=0)
        _step_axis(ax)
        band = "2nd-98th percentile" if percentiles else "±1 std"  # as activation_band()
        ax.set_ylabel(f"activation value (mean, band {band})")
        title = "Activations over training"
        if len(shown) < len(all_names):
            title += f" ({len(shown)} of {len(all_names)} layers)"
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        prefix = common_prefix([n for n in all_names if n])
        _legend(
            ax,
            fontsize=7,
            title="activation layer (forward order)"
            + (f"\nafter '{_label(prefix, 30)}.'" if prefix else ""),
            title_fontsize=7,
        )
        _note_downsampling(ax, data, mean)
    if has_deriv:
        ax = axes.pop(0)
        names = list(deriv_at.columns)
        x = np.arange(len(names))
        for step, color in zip(deriv_at.index, ["#1f77b4", "#ff7f0e", "#d62728"] * 3):
            ax.plot(
                x,
                deriv_at.loc[step].to_numpy(float),
                marker="o",
                ms=3,
                lw=1.2,
                color=color,
                label=f"mean φ'(z), step {step}",
            )
        bound = [_max_derivative(data.by_name.get(n, {}).get("activation")) for n in names]
        ax.step(x, bound, where="mid", color="black", ls="--", lw=1, label="bound max |φ'|")
        ax.set_ylim(bottom=0)
        ax.set_xlabel(_axis_label("activation layer", names), fontsize=8)
        ax.set_ylabel("mean φ'(z) over the batch")
        ax.set_title("Mean derivative of each activation vs its maximum", fontsize=10)
        _name_ticks(ax, list(x), names)
        ax.grid(True, alpha=0.3)
        _legend(ax, fontsize=7)
    return fig


def saturation(run: Any) -> Figure | None:
    """Saturated fraction (|phi'| < 5% of its max) and dead-unit fraction of each activation
    layer over training.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.plots import saturation
        >>> [ax.get_ylabel() for ax in saturation(example_run()).axes]   # sigmoid: no dead units
        ['share of entries saturated']
    """
    data = as_run_data(run)
    panels = []
    for stat, title, ylabel in (
        ("act_saturated", "Saturated fraction (|φ'(z)| < 5% of max)", "share of entries saturated"),
        ("act_dead", "Dead units (input ≤ 0 for the whole batch)", "share of units dead"),
    ):
        agg = data.agg(stat, None, data.activation_layers)
        agg = Agg(
            *(getattr(agg, k).dropna(axis=1, how="all") for k in ("mean", "lo", "hi")),
            agg.x,
            agg.start,
            agg.end,
        )
        if not agg.empty:
            panels.append((agg, title, ylabel))
    if not panels:
        return None
    fig = _figure(12 if len(panels) == 2 else 8, 4.4, len(panels))
    for ax, (agg, title, ylabel) in zip(fig.axes, panels):
        names = list(agg.mean.columns)
        _lines(ax, agg, names)
        ax.set_ylim(-0.02, 1.02)
        _step_axis(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        _legend_or_bar(fig, ax, names, "activation layer")
        _note_downsampling(ax, data, agg)
    return fig


def temporal_profile(run: Any) -> Figure | None:
    """Gradient norm reaching each time step of each recurrent layer (log scale), at the first,
    middle and last recorded steps: a curve that falls toward t = 0 is vanishing through time.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.plots import temporal_profile
        >>> fig = temporal_profile(example_run("rnn"))
        >>> fig.axes[0].get_xlabel(), temporal_profile(example_run("mlp")) is None
        ('time step t (T = 30)', True)
    """
    data = as_run_data(run)
    t = data.temporal
    if t.empty:
        return None
    layers = [n for n in data.recurrent_layers if n in set(t["layer"])][:4]
    layers += [n for n in dict.fromkeys(t["layer"]) if n not in layers][: 4 - len(layers)]
    fig = _figure(min(5.2 * len(layers), 14), 4.4, len(layers))
    for ax, layer in zip(fig.axes, layers):
        rows = t[t["layer"] == layer]
        steps = sorted(set(rows["step"]))
        chosen = sorted({steps[0], steps[(len(steps) - 1) // 2], steps[-1]})
        for step, color in zip(chosen, ["#1f77b4", "#ff7f0e", "#d62728"]):
            r = rows[rows["step"] == step].sort_values("t")
            ax.plot(
                r["t"],
                r["grad_norm"],
                marker="o",
                ms=2.5,
                lw=1.3,
                color=color,
                label=f"step {step}",
            )
        ax.set_yscale("log")
        ax.set_xlabel(f"time step t (T = {int(rows['length'].max())})")
        ax.set_ylabel("‖∂L/∂x_t‖ (L2 norm)")
        ax.set_title(f"Gradient through time: {_label(layer)}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        _legend(ax, fontsize=8)
    return fig


def update_ratio(run: Any) -> Figure | None:
    """Update/parameter ratio ‖ΔW‖/‖W‖ of each weight matrix over training (log scale),
    with the often-quoted healthy level of about 1e-3. One line per weight matrix
    (:attr:`RunData.weight_params`: a stacked LSTM's layers ``l0``, ``l1`` apart, its
    recurrent ``weight_hh_*`` beside its input ``weight_ih_*``).

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.plots import update_ratio
        >>> len(update_ratio(example_run()).axes[0].get_lines())   # 7 layers + the 1e-3 line
        8
    """
    data = as_run_data(run)
    agg = data.weight_agg("update_ratio")
    agg = Agg(
        *(getattr(agg, k).dropna(axis=1, how="all") for k in ("mean", "lo", "hi")),
        agg.x,
        agg.start,
        agg.end,
    )
    if agg.empty:
        return None
    names = list(agg.mean.columns)
    fig = _figure(9, 4.6)
    ax = fig.axes[0]
    _lines(ax, agg, names)
    ax.axhline(1e-3, color="0.3", ls="--", lw=1, label="1e-3 (rule of thumb)")
    ax.set_yscale("log")
    _step_axis(ax)
    ax.set_ylabel("‖ΔW‖ / ‖W‖ per step")
    ax.set_title("Update/parameter ratio of each weight matrix", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    _legend_or_bar(fig, ax, names, "weight matrix")
    _note_downsampling(ax, data, agg)
    return fig


def loss_curves(run: Any) -> Figure | None:
    """Training loss per step (band: min..max per time bucket), evaluation loss and metric
    (accuracy or MSE) per split from ``eval.parquet`` when the run has one.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.plots import loss_curves
        >>> fig = loss_curves(example_run())      # no eval.parquet: one panel
        >>> len(fig.axes), fig.axes[0].get_lines()[0].get_label()
        (1, 'training loss (per step)')
    """
    import numpy as np

    data = as_run_data(run)
    loss = data.loss()
    ev = data.eval
    if loss.mean.empty and ev is None:
        return None
    has_metric = ev is not None and "metric" in ev and ev["metric"].notna().any()
    fig = _figure(12 if has_metric else 8, 4.4, 2 if has_metric else 1)
    ax = fig.axes[0]
    values = []
    if not loss.mean.empty:
        y = loss.mean["loss"].to_numpy(float)
        ax.plot(loss.x, y, color="#1f77b4", lw=1.2, label="training loss (per step)")
        if _downsampled(loss):
            ax.fill_between(
                loss.x,
                loss.lo["loss"].to_numpy(float),
                loss.hi["loss"].to_numpy(float),
                color="#1f77b4",
                alpha=0.15,
                lw=0,
            )
        values += list(loss.lo["loss"]) + list(loss.hi["loss"])
    if ev is not None:
        for split, color in zip(sorted(set(ev["split"])), ["#ff7f0e", "#2ca02c", "#9467bd"]):
            r = ev[ev["split"] == split].sort_values("step")
            ax.plot(
                r["step"], r["loss"], marker="o", ms=3, color=color, label=f"{split} loss (eval)"
            )
            values += list(r["loss"])
    _log_if_wide(ax, values)
    _step_axis(ax)
    ax.set_ylabel("loss")
    ax.set_title("Loss", fontsize=11)
    ax.grid(True, alpha=0.3)
    _legend(ax, fontsize=8)
    if has_metric:
        ax2 = fig.axes[1]
        name = str(ev["metric_name"].dropna().iloc[0]) if "metric_name" in ev else "metric"
        for split, color in zip(sorted(set(ev["split"])), ["#ff7f0e", "#2ca02c", "#9467bd"]):
            r = ev[ev["split"] == split].sort_values("step")
            ax2.plot(r["step"], r["metric"], marker="o", ms=3, color=color, label=split)
        if name == "accuracy":
            ax2.set_ylim(0, 1.0)
        else:
            _log_if_wide(ax2, np.asarray(ev["metric"], dtype=float))
        _step_axis(ax2)
        ax2.set_ylabel(_label(name, 40))
        ax2.set_title(f"Evaluation {_label(name, 40)}", fontsize=11)
        ax2.grid(True, alpha=0.3)
        _legend(ax2, fontsize=8)
    return fig


#: (file stem, plot function) of every per-run plot, in report order.
RUN_PLOTS = (
    ("loss", loss_curves),
    ("depth_profile", depth_profile),
    ("speed_heatmap", speed_heatmap),
    ("speed_curves", speed_curves),
    ("activations", activations),
    ("saturation", saturation),
    ("temporal", temporal_profile),
    ("update_ratio", update_ratio),
)


# ---- several runs ----------------------------------------------------------------------------


def speed_by_layer(runs: Sequence[Any], labels: Sequence[str] | None = None) -> Figure | None:
    """Median speed of learning over training of each hidden layer, one line per run (log).

    Runs whose hidden layers have the same names share an axis ticked with those names; runs
    of different depths or names are drawn from each one's first hidden layer (left) to its
    last (right), so a 2-layer and a 10-layer net compare end to end, and no layer gets a
    number that is not its name.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.plots import speed_by_layer
        >>> fig = speed_by_layer([example_run()], ["sigmoid, N(0,1)"])
        >>> fig.axes[0].get_lines()[0].get_label()
        'sigmoid, N(0,1)'
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['0', '2', '4', '6', '8', '10']
    """
    import numpy as np

    datas = [as_run_data(r) for r in runs]
    labels = list(labels) if labels is not None else [d.path.name for d in datas]
    drawn = []
    for d, label in zip(datas, labels):
        agg = d.speed()
        if not agg.empty:
            drawn.append(
                (label, list(agg.mean.columns), np.nanmedian(agg.mean.to_numpy(float), axis=0))
            )
    if not drawn:
        return None
    same = all(names == drawn[0][1] for _, names, _ in drawn)
    fig = _figure(9, 4.8)
    ax = fig.axes[0]
    colors = _run_colors(len(drawn))
    for (label, _layers, med), color in zip(drawn, colors):
        x = np.arange(len(med)) if same else np.linspace(0.0, 1.0, len(med))
        ax.plot(x, med, marker="o", ms=3, lw=1.4, color=color, label=_label(label, 40))
    ax.set_yscale("log")
    if same:
        _name_ticks(ax, list(range(len(drawn[0][1]))), drawn[0][1])
        ax.set_xlabel(_axis_label("hidden layer", drawn[0][1]), fontsize=8)
    else:
        ax.set_xticks([0.0, 1.0], ["first hidden layer", "last hidden layer"], fontsize=8)
        ax.set_xlabel(
            "hidden layers, forward order (each run from its first to its last)", fontsize=8
        )
    ax.set_ylabel("median ‖∂C/∂b‖ over training")
    ax.set_title("Speed of learning through depth, per run", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, fontsize=7)
    return fig


def _fmt(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def sweep_metric(
    sweep: str | os.PathLike, metric: str = "test_metric", x: str | None = None
) -> Figure | None:
    """A summary metric of a sweep's finished runs against one swept field (default
    ``model.depth``, else the first swept field), one line per combination of the other swept
    fields (the remedies), mean over seeds with the seeds' min..max as a band.

    ``metric``: a numeric key of summary.json (``test_metric``, ``test_loss``, ``train_loss``,
    ``first_last_ratio``, ``seconds``).

    Example:
        >>> fig = sweep_metric("sweeps/depth", "first_last_ratio")   # doctest: +SKIP
    """
    import numpy as np

    from vanishing.experiments.store import read_sweep

    rows = [r for r in read_sweep(sweep) if r["summary"]]
    fields = list(dict.fromkeys(k for r in rows for k in r["params"] if k != "seed"))
    if not rows or not fields:
        return None
    if x is None:
        varied = [f for f in fields if len({_fmt(r["params"].get(f)) for r in rows}) > 1]
        x = "model.depth" if "model.depth" in varied else (varied or fields)[0]
    elif x not in fields:
        raise ValueError(f"{x!r} is not a swept field; swept: {', '.join(fields)}")
    others = [f for f in fields if f != x]
    groups: dict[str, dict[Any, list[float]]] = {}
    for r in rows:
        value = r["summary"].get(metric)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(value):
            continue
        label = ", ".join(f"{f.split('.')[-1]}={_fmt(r['params'].get(f))}" for f in others) or "all"
        groups.setdefault(label, {}).setdefault(r["params"].get(x), []).append(value)
    if not groups:
        return None
    xs_all = list(dict.fromkeys(v for g in groups.values() for v in g))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
    order = sorted(xs_all) if numeric else sorted(xs_all, key=_fmt)
    pos = {v: (float(v) if numeric else i) for i, v in enumerate(order)}
    fig = _figure(9, 4.8)
    ax = fig.axes[0]
    colors = [f"C{i % 10}" for i in range(len(groups))]
    allv = []
    for (label, by_x), color in zip(sorted(groups.items()), colors):
        xs = [v for v in order if v in by_x]
        px = [pos[v] for v in xs]
        mean = [float(np.mean(by_x[v])) for v in xs]
        lo = [float(np.min(by_x[v])) for v in xs]
        hi = [float(np.max(by_x[v])) for v in xs]
        allv += lo + hi
        n_seeds = max(len(by_x[v]) for v in xs)
        ax.plot(
            px,
            mean,
            marker="o",
            ms=4,
            lw=1.5,
            color=color,
            label=_label(label, 60) + (f" ({n_seeds} seeds)" if n_seeds > 1 else ""),
        )
        if n_seeds > 1:
            ax.fill_between(px, lo, hi, color=color, alpha=0.15, lw=0)
    if not numeric:
        ax.set_xticks(list(pos.values()), [_label(_fmt(v), 16) for v in order])
    elif all(float(v).is_integer() for v in order):  # integer values get integer ticks
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    names = {r["summary"].get("metric_name") for r in rows if r["summary"]} - {None}
    accuracy = metric == "test_metric" and names == {"accuracy"}
    if metric == "first_last_ratio":
        ax.set_yscale("log")
    elif accuracy:  # in percent, as every table shows it
        from matplotlib.ticker import PercentFormatter

        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    else:
        _log_if_wide(ax, allv)
    ax.set_xlabel(_label(x, 60))
    ax.set_ylabel(
        ("test accuracy" if accuracy else _label(metric, 60))
        + (" (first / last hidden layer)" if metric == "first_last_ratio" else "")
    )
    shown = "test accuracy" if accuracy else _label(metric, 60)
    ax.set_title(f"{shown} vs {_label(x, 60)} (mean over seeds, band = min..max)", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, fontsize=7)
    return fig


# ---- output ------------------------------------------------------------------------------------


def save_figure(fig: Figure, path_stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``fig`` as ``<path_stem>.png`` and ``<path_stem>.svg``; returns both paths.

    Example:
        >>> import tempfile
        >>> from matplotlib.figure import Figure
        >>> from vanishing.report.plots import save_figure
        >>> fig = Figure(); _ = fig.subplots().plot([1, 2, 3])
        >>> png, svg = save_figure(fig, tempfile.mkdtemp() + "/line")
        >>> png.read_bytes()[:4], svg.suffix
        (b'\\x89PNG', '.svg')
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")
    fig.savefig(png, dpi=110, metadata={"Software": None})
    fig.savefig(svg)
    return png, svg


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for inlining in HTML).

    Example:
        >>> from matplotlib.figure import Figure
        >>> from vanishing.report.plots import png_bytes
        >>> fig = Figure(); _ = fig.subplots().plot([1, 2])
        >>> png_bytes(fig)[:4]
        b'\\x89PNG'
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()
