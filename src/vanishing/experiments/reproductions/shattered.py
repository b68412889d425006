"""Shattered gradients (Balduzzi et al. 2017, Figs. 1-3): dOutput/dx of a 1-d net vs depth.

A net maps a scalar ``x`` to a scalar. On 256 points of a grid over ``[-2, 2]`` (all 256 are
one batch) the gradient ``g(x) = d output / d x`` is taken at initialisation, for a feed-forward
ReLU net and for a residual net of the same layers, at depths 1 to 50. The gradient of a
shallow net is smooth in ``x`` (neighbouring points have almost the same gradient: "brown
noise"); the feed-forward net's gradient shatters with depth into "white noise", while the
residual net's stays correlated. The measure is the paper's: the correlation between gradients
at neighbouring inputs, the lag-1 autocorrelation of ``g`` over the grid (one number per net,
the mean over seeds is reported).

Both nets share a stem ``h = W_1 relu(w_0 x + b_0)`` (width ``N``; the stem breaks the
symmetry of a 1-d input, whose batch-normalised affine maps would all switch at the batch mean)
and then ``L`` layers; layer ``l`` of the feed-forward net is ``h <- W_l relu(BN(h))`` and the
residual block is ``h <- h + W_l relu(BN(h))`` (pre-activation, He et al. 2016b, batch norm as
in the paper's figure). The output is ``v . h``. Weights are He-normal (variance ``2/N``),
``w_0, b_0 ~ N(0, 1)``, ``v ~ N(0, 1/N)``. Batch norm uses the statistics of the 256 inputs,
held constant when differentiating (so ``g(x_i)`` depends on ``x_i`` only, as in the paper's
per-point plots).

The paper's rates come from a model in which the activation patterns at the two inputs are
independent: feed-forward correlation ``2^-L`` (their Theorem 1) and, with batch norm,
``~ L^(-1/2)`` for residual nets (Theorem 3; closed form of that model:
:func:`resnet_model_correlation`). Neighbouring grid points share most of their activation
patterns, so their measured correlations decay more slowly than the model; the checks test the
published forms (exponential vs sublinear), see docs/reproductions/shattered.md.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from vanishing.experiments.reproductions.base import (
    Check,
    Progress,
    Reproduction,
    Table,
    check_out,
    one_thread,
    save_figure,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "TITLE",
    "CITATION",
    "KINDS",
    "build_net",
    "input_gradient",
    "lag1_correlation",
    "feedforward_model_correlation",
    "resnet_model_correlation",
    "fit_rate",
    "reproduce",
]

TITLE = "Shattered gradients: dOutput/dx turns to white noise with depth, not in resnets"
CITATION = (
    "Balduzzi, Frean, Leary, Lewis, Ma, McWilliams 2017, The Shattered Gradients Problem: If "
    "resnets are the answer, then what is the question?, ICML (PMLR 70), Figs. 1-3, "
    "Theorems 1 and 3"
)

KINDS = ("feedforward", "resnet")
N_POINTS = 256
DEPTHS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 24, 32, 50)
QUICK_DEPTHS = (1, 4, 8, 24, 50)
WHITE_DEPTH = 24  # the depth of the paper's Fig. 1b feed-forward net


def _net_class():
    from torch import nn

    class _ShatterNet(nn.Module):
        """See :func:`build_net`."""

        def __init__(self, kind: str, depth: int, width: int) -> None:
            super().__init__()
            self.kind = kind
            self.embed = nn.Linear(1, width)
            self.stem = nn.Linear(width, width, bias=False)
            self.norms = nn.ModuleList(
                nn.BatchNorm1d(width, affine=False, momentum=None) for _ in range(depth)
            )
            self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
            self.head = nn.Linear(width, 1, bias=False)

        def forward(self, x: Tensor) -> Tensor:
            import torch

            h = self.stem(torch.relu(self.embed(x.reshape(-1, 1))))
            for norm, layer in zip(self.norms, self.layers):
                branch = layer(torch.relu(norm(h)))
                h = h + branch if self.kind == "resnet" else branch
            return self.head(h).reshape(-1)

    return _ShatterNet


def build_net(kind: str, depth: int, *, width: int = 200, seed: int = 0) -> nn.Module:
    """The paper's 1-d net: ``x -> W_1 relu(w_0 x + b_0)``, ``depth`` layers, then ``v . h``.

    ``kind="feedforward"``: each layer is ``h <- W relu(BN(h))``; ``kind="resnet"``:
    ``h <- h + W relu(BN(h))``. Weights drawn from a generator seeded with ``seed``:

    ``w_0, b_0 ~ N(0, 1)`` (the 1-d embedding: its units switch at ``-b_0/w_0``, spread over
    the input range), ``W ~ N(0, 2/N)`` (He), head ``v ~ N(0, 1/N)``, no other biases (batch
    norm removes them). Batch norm has no affine part and its running statistics become those
    of the first batch it sees in training mode (``momentum=None``).

    Example:
        >>> from vanishing.experiments.reproductions.shattered import build_net
        >>> import torch
        >>> net = build_net("resnet", 3, width=8, seed=0)
        >>> len(net.layers), net(torch.zeros(5, dtype=torch.float64)).shape
        (3, torch.Size([5]))
        >>> net = build_net("feedforward", 2, width=100, seed=0)
        >>> round(float(net.layers[0].weight.detach().std() ** 2 * 100), 1)    # He: variance 2/N
        2.0
    """
    import torch

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for name, value, low in (("depth", depth, 0), ("width", width, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    net = _net_class()(kind, depth, width).double()
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        net.embed.weight.copy_(torch.randn(width, 1, generator=g, dtype=torch.float64))
        net.embed.bias.copy_(torch.randn(width, generator=g, dtype=torch.float64))
        he = math.sqrt(2.0 / width)
        for layer in [net.stem, *net.layers]:
            layer.weight.copy_(torch.randn(width, width, generator=g, dtype=torch.float64) * he)
        net.head.weight.copy_(
            torch.randn(1, width, generator=g, dtype=torch.float64) / math.sqrt(width)
        )
    return net


def input_gradient(net: nn.Module, x: Tensor) -> Tensor:
    """``d net(x_i) / d x_i`` at every point of ``x`` (1-d), batch norm on the batch ``x``.

    One forward pass in training mode sets each batch norm's statistics to those of ``x``; the
    gradient is then taken in eval mode, so the statistics are constants and each output
    depends on its own input only (one backward pass of the summed output gives all 256
    derivatives). The net is left in eval mode.

    Example:
        >>> from vanishing.experiments.reproductions.shattered import build_net, input_gradient
        >>> import torch
        >>> net = build_net("feedforward", 0, width=4, seed=0)     # no BN layer: piecewise linear
        >>> x = torch.linspace(-2, 2, 5, dtype=torch.float64)
        >>> g = input_gradient(net, x)
        >>> bool(torch.allclose(g, torch.func.vmap(torch.func.grad(lambda t: net(t).sum()))(x)))
        True
    """
    import torch

    if x.dim() != 1 or len(x) < 2:
        raise ValueError(f"x must be a 1-d tensor of at least 2 points, got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(x)  # momentum=None: the running statistics are now exactly this batch's
    net.eval()
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x).sum(), x)
    return grad.detach()


def lag1_correlation(g: Any) -> float:
    """Pearson correlation of ``(g[i], g[i+1])`` over the grid: neighbouring gradients.

    1 for a linear ramp (and near 1 for brown noise, a random walk), -1 for an alternating
    sequence, near 0 (standard deviation ``1/sqrt(n)``) for white noise. NaN if ``g`` is
    constant on either side.

    Example:
        >>> from vanishing.experiments.reproductions.shattered import lag1_correlation
        >>> lag1_correlation([1.0, 2.0, 3.0, 4.0]), lag1_correlation([1.0, -1.0, 1.0, -1.0])
        (1.0, -1.0)
    """
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    if len(g) < 3:
        raise ValueError(f"need at least 3 gradient values, got {len(g)}")
    a, b = g[:-1] - g[:-1].mean(), g[1:] - g[1:].mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float("nan") if den == 0 else round(float(a @ b) / den, 12)


def feedforward_model_correlation(depth: int) -> float:
    """Theorem 1's correlation of gradients at two inputs with independent ReLU patterns,
    He init: each layer keeps a unit for both inputs with probability 1/4 against 1/2 for one
    input, so the correlation is ``(1/4 / 1/2)^L = 2^-L``.

    Example:
        >>> from vanishing.experiments.reproductions.shattered import feedforward_model_correlation
        >>> feedforward_model_correlation(3)
        0.125
    """
    return 0.5 ** int(depth)


def resnet_model_correlation(depth: int) -> float:
    """Theorem 3's model of a batch-normalised resnet: block ``l`` adds a unit-variance branch
    to a trunk of variance ``l``, so it multiplies the gradient's variance by ``1 + 1/l`` and,
    with independent patterns, the covariance by ``1 + 1/(2l)``:
    ``prod_{l=1}^{L} (1 + 1/(2l)) / (1 + 1/l) = Gamma(L + 3/2) / (Gamma(3/2) Gamma(L + 2))``,
    which behaves as ``L^(-1/2) / Gamma(3/2)`` for large ``L``.

    Example:
        >>> from vanishing.experiments.reproductions.shattered import resnet_model_correlation
        >>> round(resnet_model_correlation(1), 12)
        0.75
        >>> import math
        >>> round(resnet_model_correlation(10_000) * math.sqrt(10_000) * math.gamma(1.5), 3)
        1.0
    """
    depth = int(depth)
    return math.exp(math.lgamma(depth + 1.5) - math.lgamma(1.5) - math.lgamma(depth + 2))


def fit_rate(depths: Any, values: Any, *, form: str) -> float:
    """Least-squares rate of ``values`` vs ``depths`` on log scale.

    ``form="exponential"``: ``r`` in ``values ~ a r^L`` (per-layer factor); ``form="power"``:
    ``p`` in ``values ~ a L^p``. Values must be positive.

    Example:
        >>> from vanishing.experiments.reproductions.shattered import fit_rate
        >>> round(fit_rate([1, 2, 3], [0.5, 0.25, 0.125], form="exponential"), 6)
        0.5
        >>> round(fit_rate([1, 4, 16], [1.0, 0.5, 0.25], form="power"), 6)
        -0.5
    """
    d, v = np.asarray(depths, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if form not in ("exponential", "power"):
        raise ValueError(f"form must be 'exponential' or 'power', got {form!r}")
    if len(d) < 2 or len(d) != len(v) or np.any(v <= 0) or np.any(d <= 0):
        raise ValueError("need at least 2 positive depths and as many positive values")
    slope = np.polyfit(d if form == "exponential" else np.log(d), np.log(v), 1)[0]
    return float(np.exp(slope)) if form == "exponential" else float(slope)


def reproduce(
    *, quick: bool = False, out=None, progress: Progress | None = None, seed: int = 0
) -> Reproduction:
    """Measure the neighbour correlation of ``dOutput/dx`` vs depth for both kinds of net.

    Default: width 200, 8 seeds per net, depths 1-50 (12 of them), about 10 s; ``quick``: width
    100, 4 seeds, depths 1, 4, 8, 24, 50, a few seconds, with the same checks. Writes
    ``gradients.png/svg`` (g vs x for a shallow and a deep net of each kind), ``correlation.png/
    svg`` (correlation vs depth with the model rates) and ``shattered.json`` into ``out``.

    Example:
        >>> r = reproduce(quick=True)        # doctest: +SKIP
        >>> r.ok                             # doctest: +SKIP
        True
    """
    import torch

    out = check_out(out, "shattered")
    width, seeds, depths = (100, 4, QUICK_DEPTHS) if quick else (200, 8, DEPTHS)
    x = torch.linspace(-2.0, 2.0, N_POINTS, dtype=torch.float64)
    corr = {k: np.zeros((len(depths), seeds)) for k in KINDS}
    examples: dict[tuple[str, int], np.ndarray] = {}
    total, done = 2 * len(depths), 0
    with one_thread():
        for kind in KINDS:
            for i, depth in enumerate(depths):
                for s in range(seeds):
                    net = build_net(kind, depth, width=width, seed=seed * 1000 + s)
                    g = input_gradient(net, x)
                    corr[kind][i, s] = lag1_correlation(g.numpy())
                    if s == 0:
                        examples[(kind, depth)] = g.numpy()
                done += 1
                if progress is not None:
                    progress(done, total)
    mean = {k: corr[k].mean(axis=1) for k in KINDS}
    # white noise's lag-1 correlation has standard deviation 1/sqrt(n - 1) per net
    floor = 1.0 / math.sqrt((N_POINTS - 1) * seeds)
    checks, facts = _checks(depths, mean, corr, floor)
    rows = [
        [d, float(mean["feedforward"][i]), float(mean["resnet"][i]),
         feedforward_model_correlation(d), resnet_model_correlation(d)]
        for i, d in enumerate(depths)
    ]  # fmt: skip
    table = Table(
        f"Neighbour correlation of dOutput/dx (mean of {seeds} seeds, width {width})",
        ["depth", "feed-forward", "resnet", "model 2^-L", "model resnet ~L^-1/2"],
        rows,
    )
    plots = save_figure(_plot_gradients(x.numpy(), examples, depths), out, "gradients")
    plots += save_figure(_plot_correlation(depths, mean, corr), out, "correlation")
    deep = depths[-1]
    summary = (
        f"At initialisation the correlation between gradients at neighbouring inputs is "
        f"{mean['feedforward'][0]:.2f} for a 1-layer net (brown noise); the feed-forward net's "
        f"falls to {facts['ff_white']:.2f} by depth {WHITE_DEPTH} (white noise, per-layer factor "
        f"{facts['ff_rate']:.2f}) while the resnet's is still {mean['resnet'][-1]:.2f} at depth "
        f"{deep} (power-law exponent {facts['res_power']:.2f}, published -1/2)."
    )
    result = Reproduction(
        name="shattered",
        title=TITLE,
        citation=CITATION,
        checks=checks,
        tables=[table],
        plots=plots,
        out=out,
        quick=quick,
        settings={
            "width": width,
            "seeds": seeds,
            "seed": seed,
            "depths": list(depths),
            "points": N_POINTS,
            "x_range": [-2.0, 2.0],
            "init": "He normal (2/N), embedding w0, b0 ~ N(0, 1), head N(0, 1/N)",
            "batch_norm": "statistics of the 256-point batch, constant under differentiation",
            "measure": "lag-1 autocorrelation of dOutput/dx over the grid, mean over seeds",
        },
        summary=summary,
    )
    (out / "shattered.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _checks(depths, mean, corr, floor) -> tuple[list[Check], dict[str, float]]:
    ff, res = mean["feedforward"], mean["resnet"]
    d = np.asarray(depths, dtype=np.float64)
    white = depths.index(WHITE_DEPTH)
    # the exponential fit uses the depths before the correlation reaches the white-noise floor
    # (below 0.1 the mean of a few seeds is mostly noise, and log of a value near 0 is
    # meaningless)
    above = ff > 0.1
    ff_rate = fit_rate(d[above], ff[above], form="exponential")
    res_power = fit_rate(d, res, form="power")
    ratio = res[-1] / max(abs(ff[-1]), 2 * floor)
    deepest = int(depths[-1])
    res_bound = res[0] * (deepest / depths[0]) ** -0.5
    checks = [
        Check.above(
            "feed-forward, depth 1: neighbour correlation (brown noise, Fig. 1a)",
            published="~1 (brown noise)",
            measured=ff[0],
            limit=0.9,
        ),
        Check.below(
            f"feed-forward, depth {WHITE_DEPTH}: |neighbour correlation| (white noise, Fig. 1b)",
            published="~0 (white noise)",
            measured=abs(ff[white]),
            limit=0.15,
        ),
        Check.below(
            "feed-forward: per-layer factor of the correlation (exponential fit, c > 0.1)",
            published="0.5 (2^-L, independent patterns)",
            measured=ff_rate,
            limit=0.95,
        ),
        Check.holds(
            f"resnet decays sublinearly: power-law exponent over depths 1-{deepest}",
            published="-1/2 (L^-1/2)",
            measured=f"{res_power:.3g}",
            ok=-1.0 < res_power < 0.0,
            tolerance="-1 < exponent < 0",
        ),
        Check.above(
            f"resnet, depth {deepest}: correlation, at least the published L^-1/2 from depth 1",
            published=f"{res_bound:.3g} (= c(1) * {deepest}^-1/2)",
            measured=res[-1],
            limit=float(res_bound),
        ),
        Check.holds(
            "resnet correlation above feed-forward at every depth >= 8",
            published="resnet > feed-forward",
            measured=", ".join(
                f"{dd}: {r:.2f} vs {f:.2f}" for dd, r, f in zip(depths, res, ff) if dd >= 8
            ),
            ok=bool(np.all((res > ff)[d >= 8])),
            tolerance="every depth >= 8",
        ),
        Check.above(
            f"resnet / feed-forward correlation at depth {deepest} (feed-forward floored at "
            "2 standard errors of white noise)",
            published=">> 1",
            measured=ratio,
            limit=5.0,
        ),
    ]
    return checks, {"ff_rate": ff_rate, "res_power": res_power, "ff_white": float(ff[white])}


def _plot_gradients(x, examples, depths):
    from matplotlib.figure import Figure

    deep = depths[-1]
    panels = [
        ("feedforward", depths[0]),
        ("feedforward", WHITE_DEPTH),
        ("resnet", deep),
    ]
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (kind, depth) in zip(axes, panels):
        g = examples[(kind, depth)]
        ax.plot(x, g, linewidth=0.8)
        ax.set_title(f"{kind}, depth {depth}: c = {lag1_correlation(g):.2f}", fontsize=10)
        ax.set_xlabel("input x")
    axes[0].set_ylabel("dOutput / dx")
    fig.suptitle("Gradients at initialisation on 256 inputs in [-2, 2] (cf. Fig. 1)", fontsize=11)
    return fig


def _plot_correlation(depths, mean, corr):
    from matplotlib.figure import Figure

    d = np.asarray(depths, dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for kind, marker in zip(KINDS, ("o", "s")):
        ax.errorbar(
            d, mean[kind], yerr=corr[kind].std(axis=1), marker=marker, capsize=2, label=kind
        )
    ax.plot(d, [feedforward_model_correlation(v) for v in d], "k:", label="model 2^-L")
    ax.plot(d, [resnet_model_correlation(v) for v in d], "k--", label="model resnet ~L^-1/2")
    ax.set_xscale("log")
    ax.set_xlabel("depth L")
    ax.set_ylabel("correlation of neighbouring gradients")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    ax.set_title("Shattering with depth: mean and sd over seeds", fontsize=10)
    return fig
