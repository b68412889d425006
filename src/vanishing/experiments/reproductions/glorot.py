"""Glorot & Bengio (2010): standard vs normalized initialisation of deep tanh nets, and the
saturation of a sigmoid net's top hidden layer.

Two experiments, both on scikit-learn's 8x8 digits (64 inputs, 10 classes):

- **At initialisation** (their section 4.2.1, Figs. 6 and 7): a net of 5 tanh hidden layers of
  ``width`` units (1000 by default, as in the paper), zero biases, and weights drawn either from
  the "standard" ``U[-1/sqrt(n_in), 1/sqrt(n_in)]`` (so ``n Var[W] = 1/3``) or the
  "normalized" ``U[-sqrt(6)/sqrt(n_in + n_out), +...]`` (``Var[W] = 2 / (n_in + n_out)``, so
  ``n Var[W] = 1`` between equal layers). One forward and backward pass of the mean
  cross-entropy over all training images gives, per hidden layer ``l``, the variance of the
  activations ``h^l = tanh(s^l)`` and of the back-propagated gradient ``dCost/ds^l``. Their
  linear-regime analysis: each layer multiplies both variances by ``n Var[W]`` -- 1/3 with the
  standard init, 1 with the normalized one. The exact mean-field value, with tanh's curvature,
  is computed by Gauss-Hermite quadrature (:func:`mean_field_variances`) and checked too.
- **Training** (their Fig. 1; the brief of issue #15 calls it Fig. 2): 4 sigmoid hidden layers
  of 300 units, standard init, softmax output, SGD with minibatches of 10 and learning rate
  0.5, trained under :func:`vanishing.watch`; the mean activation of each sigmoid layer is read
  back from the run (``act_mean``). The top hidden layer drops to ~0 within the first thousand
  steps while the lower ones stay near 0.5, and (in the default run) recovers thousands of steps
  later, when the loss starts to fall.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vanishing.experiments.reproductions.base import (
    Check,
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
    "INITS",
    "uniform_limit",
    "build_net",
    "gaussian_expectation",
    "mean_field_variances",
    "init_statistics",
    "train_sigmoid",
    "reproduce",
]

TITLE = "Glorot & Bengio 2010: standard init shrinks tanh variances x1/3 per layer, normalized keeps them; sigmoid's top layer saturates"
CITATION = (
    "X. Glorot and Y. Bengio, 'Understanding the difficulty of training deep feedforward neural "
    "networks', AISTATS 2010: section 4.2.1 (n Var[W] = 1/3 for the standard init, eq. 16 the "
    "normalized init), Figs. 6-7 (activation and back-propagated gradient histograms per layer), "
    "Fig. 1 (sigmoid top hidden layer saturating at 0)"
)

INITS = ("standard", "normalized")
WIDTH = 1000  # the paper's hidden layer size
DEPTH = 5  # tanh hidden layers, as in the paper
SIGMOID_DEPTH, SIGMOID_WIDTH = 4, 300
SIGMOID_LR, SIGMOID_BATCH = 0.5, 10
SATURATED = 0.05  # "saturated at 0": the top layer's mean sigmoid output below this


def uniform_limit(n_in: int, n_out: int, init: str) -> float:
    """The half-width ``a`` of ``U[-a, a]`` for a layer ``n_in -> n_out`` under ``init``.

    ``"standard"``: ``1 / sqrt(n_in)``; ``"normalized"``: ``sqrt(6) / sqrt(n_in + n_out)``.
    ``U[-a, a]`` has variance ``a^2 / 3``.

    Example:
        >>> from vanishing.experiments.reproductions.glorot import uniform_limit
        >>> round(1000 * uniform_limit(1000, 1000, "standard") ** 2 / 3, 4)    # n Var[W]
        0.3333
        >>> round(1000 * uniform_limit(1000, 1000, "normalized") ** 2 / 3, 4)
        1.0
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if int(n_in) < 1 or int(n_out) < 1:
        raise ValueError(f"layer sizes must be positive, got {n_in} -> {n_out}")
    if init == "standard":
        return 1.0 / math.sqrt(n_in)
    return math.sqrt(6.0) / math.sqrt(n_in + n_out)


def build_net(
    sizes: Sequence[int], *, init: str, activation: str = "tanh", seed: int = 0
) -> nn.Sequential:
    """``Linear -> activation`` for each hidden layer, then a ``Linear`` output (logits).

    Weights ~ ``U[-a, a]`` with ``a`` from :func:`uniform_limit`, biases 0, drawn from a
    generator seeded with ``seed``. ``activation``: ``"tanh"`` or ``"sigmoid"``.

    Example:
        >>> from vanishing.experiments.reproductions.glorot import build_net
        >>> net = build_net([64, 100, 100, 10], init="standard")
        >>> [type(m).__name__ for m in net]
        ['Linear', 'Tanh', 'Linear', 'Tanh', 'Linear']
        >>> float(net[2].weight.detach().abs().max()) <= 0.1, float(net[2].bias.detach().abs().max())
        (True, 0.0)
    """
    import torch
    from torch import nn

    acts = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if activation not in acts:
        raise ValueError(f"activation must be 'tanh' or 'sigmoid', got {activation!r}")
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive layer sizes, got {list(sizes)}")
    g = torch.Generator().manual_seed(int(seed))
    layers: list[nn.Module] = []
    pairs = list(zip(sizes[:-1], sizes[1:]))
    for k, (n_in, n_out) in enumerate(pairs):
        linear = nn.Linear(n_in, n_out)
        a = uniform_limit(n_in, n_out, init)
        with torch.no_grad():
            linear.weight.copy_(torch.rand(n_out, n_in, generator=g) * (2 * a) - a)
            linear.bias.zero_()
        layers.append(linear)
        if k < len(pairs) - 1:
            layers.append(acts[activation]())
    return nn.Sequential(*layers)


def gaussian_expectation(f: Callable[[np.ndarray], np.ndarray], q: Any, *, nodes: int = 101):
    """``E[f(sqrt(q) z)]`` for ``z ~ N(0, 1)`` by Gauss-Hermite quadrature; ``q`` may be an array.

    Example:
        >>> import numpy as np
        >>> from vanishing.experiments.reproductions.glorot import gaussian_expectation
        >>> round(float(gaussian_expectation(lambda u: u**4, 2.0)), 6)   # 3 q^2
        12.0
        >>> round(float(gaussian_expectation(lambda u: np.maximum(u, 0) ** 2, 1.0)), 3)
        0.5
    """
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / math.sqrt(2 * math.pi)
    q = np.asarray(q, dtype=np.float64)
    if np.any(q < 0):
        raise ValueError("q is a variance and must be >= 0")
    u = np.sqrt(q)[..., None] * z
    return (f(u) * w).sum(axis=-1)


def _tanh_deriv(u: np.ndarray) -> np.ndarray:
    return 1.0 / np.cosh(u) ** 2


def mean_field_variances(sq_norms: Any, sizes: Sequence[int], init: str) -> dict[str, np.ndarray]:
    """The mean-field (infinite-width) prediction for a zero-bias tanh net at init.

    ``sq_norms``: ``||x||^2`` of each input example. Per example the pre-activation of hidden
    layer 1 has variance ``q_1 = Var[W^1] ||x||^2`` and ``q_{l+1} = n_l Var[W^{l+1}]
    E[tanh(sqrt(q_l) z)^2]``. Returned, one entry per hidden layer (averaged over examples):
    ``"act"``: ``E[tanh(s^l)^2]`` (the activation variance: the mean is 0 by symmetry) and
    ``"back_ratio"``: ``Var[dC/ds^l] / Var[dC/ds^{l+1}] = n_{l+1} Var[W^{l+1}]
    E[tanh'(s^l)^2]`` (``nan`` for the top hidden layer, whose next layer is the output).

    Example:
        >>> import numpy as np
        >>> from vanishing.experiments.reproductions.glorot import mean_field_variances
        >>> mf = mean_field_variances([1e-6], [64, 1000, 1000, 1000, 10], "standard")
        >>> np.round(mf["back_ratio"][:2], 4)        # the linear regime: n Var[W] = 1/3
        array([0.3333, 0.3333])
        >>> np.round(mf["act"][1] / mf["act"][0], 4)
        np.float64(0.3333)
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 3:
        raise ValueError("sizes must have at least one hidden layer between input and output")
    var_w = [uniform_limit(a, b, init) ** 2 / 3 for a, b in zip(sizes[:-1], sizes[1:])]
    q = var_w[0] * np.asarray(sq_norms, dtype=np.float64)
    hidden = len(sizes) - 2
    act, back = np.zeros(hidden), np.full(hidden, np.nan)
    for layer in range(hidden):
        act[layer] = gaussian_expectation(lambda u: np.tanh(u) ** 2, q).mean()
        if layer + 1 < hidden:
            # the next layer's weights fan out of n_{l+1} = sizes[layer + 2] units back into l
            sigma2_back = sizes[layer + 2] * var_w[layer + 1]
            back[layer] = (
                sigma2_back * gaussian_expectation(lambda u: _tanh_deriv(u) ** 2, q).mean()
            )
            q = (
                sizes[layer + 1]
                * var_w[layer + 1]
                * gaussian_expectation(lambda u: np.tanh(u) ** 2, q)
            )
    return {"act": act, "back_ratio": back}


def init_statistics(net: nn.Sequential, x: Tensor, y: Tensor) -> dict[str, np.ndarray]:
    """Per hidden layer: ``Var`` of the activations and of ``dCost/ds`` (one pass, autograd).

    ``Cost`` is the mean cross-entropy of ``net(x)`` against labels ``y``; ``s^l`` is the input
    of hidden layer ``l``'s activation. Variances are over all examples and units.

    Example:
        >>> import torch
        >>> from vanishing.experiments.reproductions.glorot import build_net, init_statistics
        >>> net = build_net([8, 50, 50, 3], init="normalized")
        >>> stats = init_statistics(net, torch.randn(32, 8), torch.zeros(32, dtype=torch.long))
        >>> stats["act"].shape, stats["grad"].shape
        ((2,), (2,))
    """
    import torch
    from torch import nn

    pre: list[Tensor] = []
    post: list[Tensor] = []
    h = x
    for module in net:
        if isinstance(module, (nn.Tanh, nn.Sigmoid)):
            h.retain_grad()
            pre.append(h)
            h = module(h)
            post.append(h)
        else:
            h = module(h)
    loss = nn.functional.cross_entropy(h, y)
    loss.backward()
    with torch.no_grad():
        act = np.array([float(a.double().var()) for a in post])
        grad = np.array([float(s.grad.double().var()) for s in pre])
    return {"act": act, "grad": grad}


def train_sigmoid(
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    run_dir: str | Path,
    seed: int = 0,
    record_every: int = 25,
) -> dict[str, np.ndarray]:
    """Train the 4-sigmoid-layer net (standard init) under :func:`vanishing.watch`.

    SGD, learning rate 0.5, minibatches of 10 drawn with replacement; every ``record_every``-th
    step is recorded. Returns, read back from the run: ``"step"``, ``"act_mean"`` (recorded
    steps x sigmoid layers, bottom to top) and ``"loss"``.

    Example:
        >>> import tempfile, torch
        >>> from vanishing.experiments.reproductions.glorot import train_sigmoid
        >>> x, y = torch.rand(100, 64), torch.randint(0, 10, (100,))
        >>> r = train_sigmoid(x, y, steps=20, run_dir=tempfile.mkdtemp() + "/r", record_every=10)
        >>> r["step"].tolist(), r["act_mean"].shape
        ([0, 10], (2, 4))
    """
    import torch
    from torch import nn

    import vanishing
    from vanishing.experiments.train import minibatches, train

    if int(steps) < 1 or int(record_every) < 1:
        raise ValueError(f"steps and record_every must be positive, got {steps}, {record_every}")
    sizes = [x.shape[1], *[SIGMOID_WIDTH] * SIGMOID_DEPTH, 10]
    net = build_net(sizes, init="standard", activation="sigmoid", seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=SIGMOID_LR)
    batches = minibatches(
        x,
        y,
        batch_size=SIGMOID_BATCH,
        generator=torch.Generator().manual_seed(int(seed)),
        replacement=True,
    )
    watch = {"run_dir": run_dir, "every": int(record_every), "flush_every": 200}
    with one_thread():
        train(
            net,
            batches,
            nn.functional.cross_entropy,
            opt,
            steps=int(steps),
            watch=watch,
            stop_on_nonfinite=False,
        )
    run = vanishing.load_run(run_dir)
    sigmoids = [str(k) for k, m in enumerate(net) if isinstance(m, nn.Sigmoid)]
    act_mean = run.pivot("act_mean")[sigmoids]
    losses = run.steps.set_index("step")["loss"].reindex(act_mean.index)
    return {
        "step": act_mean.index.to_numpy(),
        "act_mean": act_mean.to_numpy(dtype=np.float64),
        "loss": losses.to_numpy(dtype=np.float64),
    }


def _geomean(values: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(values))))


def _smooth(values: np.ndarray, k: int) -> np.ndarray:
    """Running mean over ``k`` recorded steps (minibatches of 10 make the curves noisy)."""
    k = max(1, min(k, len(values)))
    kernel = np.ones(k) / k
    return np.convolve(values, kernel, mode="valid")


def reproduce(
    *,
    quick: bool = False,
    out: Any = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
) -> Reproduction:
    """Run both experiments, write ``glorot.json`` and the plots to ``out``, return the checks.

    Default: width 1000, 5 seeds at init; the sigmoid net for 12000 steps. ``quick``: width
    500, 2 seeds, 600 images at init, 2000 sigmoid steps, and no check of the recovery (it comes later).

    Example:
        >>> r = reproduce(quick=True, out="/tmp/glorot")   # doctest: +SKIP
        >>> r.ok                                           # doctest: +SKIP
        True
    """

    from vanishing.experiments.data import digits

    out = check_out(out, "glorot")
    width, seeds, sig_steps = (500, 2, 2000) if quick else (WIDTH, 5, 12000)
    total = 2 * seeds + 1
    done = 0
    x_pix, y_pix, _, _ = digits(standardize="none", seed=seed)
    x_pix = x_pix / 16.0  # pixels in [0, 1], as the paper's image inputs
    sizes = [x_pix.shape[1], *[width] * DEPTH, 10]
    # quick: the init statistics from 600 images (still 300000 entries per layer and variance)
    x_init, y_init = (x_pix[:600], y_pix[:600]) if quick else (x_pix, y_pix)

    measured: dict[str, list[dict[str, np.ndarray]]] = {init: [] for init in INITS}
    with one_thread():
        for init in INITS:
            for s in range(seeds):
                net = build_net(sizes, init=init, seed=seed * 1000 + s)
                measured[init].append(init_statistics(net, x_init, y_init))
                done += 1
                if progress is not None:
                    progress(done, total)
    sq_norms = (x_init.double() ** 2).sum(dim=1).numpy()
    theory = {init: mean_field_variances(sq_norms, sizes, init) for init in INITS}
    # averaged over seeds in log space: the per-layer factors are ratios
    act = {i: np.exp(np.mean([np.log(m["act"]) for m in measured[i]], axis=0)) for i in INITS}
    grad = {i: np.exp(np.mean([np.log(m["grad"]) for m in measured[i]], axis=0)) for i in INITS}
    back = {i: grad[i][:-1] / grad[i][1:] for i in INITS}  # Var[d^l] / Var[d^{l+1}], l = 1..4
    fwd = {i: act[i][1:] / act[i][:-1] for i in INITS}  # Var[h^{l+1}] / Var[h^l]
    fwd_theory = {i: theory[i]["act"][1:] / theory[i]["act"][:-1] for i in INITS}

    sig = train_sigmoid(x_pix, y_pix, steps=sig_steps, run_dir=out / "sigmoid-run", seed=seed)
    done += 1
    if progress is not None:
        progress(done, total)

    checks = _checks(back, fwd, theory, fwd_theory, sig, quick)
    tables = _tables(sizes, act, grad, back, fwd, theory, fwd_theory, sig)
    plots = _plots(out, act, grad, theory, sig)
    gm = {i: _geomean(back[i]) for i in INITS}
    top = sig["act_mean"][:, -1]
    summary = (
        f"At init, each tanh layer back multiplies the gradient variance by {gm['standard']:.3f} "
        f"with the standard init (paper: 1/3) and by {gm['normalized']:.3f} with the normalized "
        f"init (paper: ~1), over {DEPTH} hidden layers of {width} units. A 4-layer sigmoid net's "
        f"top hidden layer falls to a mean activation of {top.min():.3f} (lower layers stay near "
        f"0.5) within {_first_below(sig, SATURATED)} steps"
        + ("." if quick else f" and recovers to {top[-10:].mean():.2f} by step {sig_steps}.")
    )
    result = Reproduction(
        name="glorot",
        title=TITLE,
        citation=CITATION,
        checks=checks,
        tables=tables,
        plots=plots,
        out=out,
        quick=quick,
        settings={
            "data": "scikit-learn digits, 1438 training images, pixels / 16 in [0, 1]",
            "tanh_sizes": sizes,
            "init_examples": len(x_init),
            "init_seeds": seeds,
            "sigmoid_sizes": [64, *[SIGMOID_WIDTH] * SIGMOID_DEPTH, 10],
            "sigmoid_steps": sig_steps,
            "sigmoid_lr": SIGMOID_LR,
            "sigmoid_batch": SIGMOID_BATCH,
            "seed": seed,
        },
        summary=summary,
    )
    (out / "glorot.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _first_below(sig: dict[str, np.ndarray], limit: float) -> int | None:
    below = np.nonzero(sig["act_mean"][:, -1] < limit)[0]
    return int(sig["step"][below[0]]) if len(below) else None


def _checks(back, fwd, theory, fwd_theory, sig, quick) -> list[Check]:
    gm_back = {i: _geomean(back[i]) for i in INITS}
    gm_theory = {i: _geomean(theory[i]["back_ratio"][:-1]) for i in INITS}
    gm_fwd = {i: _geomean(fwd[i]) for i in INITS}
    checks = [
        Check.within(
            "standard init: per-layer factor of Var[dC/ds] going back (geometric mean)",
            published=1 / 3,
            measured=gm_back["standard"],
            rel=0.15,
        ),
        Check.within(
            "standard init: that factor vs the exact mean-field value with tanh's curvature",
            published=round(gm_theory["standard"], 4),
            measured=gm_back["standard"],
            rel=0.05,
        ),
        Check.within(
            "normalized init: per-layer factor of Var[dC/ds] going back (geometric mean)",
            published=1.0,
            measured=gm_back["normalized"],
            abs=0.1,
        ),
        Check.within(
            "normalized init: that factor vs the exact mean-field value",
            published=round(gm_theory["normalized"], 4),
            measured=gm_back["normalized"],
            rel=0.05,
        ),
        Check.within(
            "standard init: per-layer factor of Var[h] going up (geometric mean)",
            published=1 / 3,
            measured=gm_fwd["standard"],
            rel=0.2,
        ),
        Check.within(
            "normalized init: per-layer factor of Var[h] going up (geometric mean)",
            published=1.0,
            measured=gm_fwd["normalized"],
            abs=0.15,
        ),
        Check.within(
            "Var[h] factors (both inits) vs mean field: largest relative deviation",
            published=0.0,
            measured=max(float(np.max(np.abs(fwd[i] / fwd_theory[i] - 1))) for i in INITS),
            abs=0.05,
        ),
    ]
    top, bottom = sig["act_mean"][:, -1], sig["act_mean"][:, 0]
    steps = sig["step"]
    early = steps <= 2000
    first = _first_below(sig, SATURATED)
    checks += [
        Check.below(
            "sigmoid: top hidden layer's mean activation, lowest in the first 2000 steps",
            published="saturates at 0 quickly",
            measured=float(top[early].min()),
            limit=SATURATED,
        ),
        Check.below(
            f"sigmoid: step at which the top layer's mean activation first falls below {SATURATED}",
            published="early in training",
            measured=float("inf") if first is None else first,
            limit=1500,
        ),
        Check.within(
            "sigmoid: bottom hidden layer's mean activation over the first 2000 steps",
            published=0.5,
            measured=float(bottom[early].mean()),
            abs=0.05,
        ),
    ]
    if not quick:
        late = _smooth(top, 10)[-1]
        checks.append(
            Check.above(
                "sigmoid: top layer's mean activation at the end over its early minimum",
                published="slowly desaturates",
                measured=float(late / max(top[early].min(), 1e-12)),
                limit=3.0,
            )
        )
        checks.append(
            Check.below(
                "sigmoid: training loss at the end (smoothed; ln 10 = 2.30 is chance)",
                published="learning resumes after desaturation",
                measured=float(_smooth(sig["loss"], 20)[-1]),
                limit=2.0,
            )
        )
    return checks


def _tables(sizes, act, grad, back, fwd, theory, fwd_theory, sig) -> list[Table]:
    hidden = len(sizes) - 2
    rows = []
    for layer in range(hidden):
        rows.append(
            [
                layer + 1,
                float(act["standard"][layer]),
                float(act["normalized"][layer]),
                float(grad["standard"][layer]),
                float(grad["normalized"][layer]),
                float(back["standard"][layer]) if layer < hidden - 1 else None,
                float(theory["standard"]["back_ratio"][layer]) if layer < hidden - 1 else None,
                float(back["normalized"][layer]) if layer < hidden - 1 else None,
                float(theory["normalized"]["back_ratio"][layer]) if layer < hidden - 1 else None,
            ]
        )
    init_table = Table(
        f"tanh net {sizes} at init: variances per hidden layer, and the factor Var[d^l]/Var[d^l+1]"
        " (measured, mean field)",
        [
            "layer",
            "Var h std",
            "Var h norm",
            "Var dC/ds std",
            "Var dC/ds norm",
            "back factor std",
            "mean field",
            "back factor norm",
            "mean field",
        ],
        rows,
    )
    picks = np.unique(np.linspace(0, len(sig["step"]) - 1, 9).round().astype(int))
    sig_rows = [
        [int(sig["step"][k]), *[float(v) for v in sig["act_mean"][k]], float(sig["loss"][k])]
        for k in picks
    ]
    sig_table = Table(
        "sigmoid net: mean activation per hidden layer during training (recorded by the monitor)",
        ["step", *[f"layer {k + 1}" for k in range(sig["act_mean"].shape[1])], "batch loss"],
        sig_rows,
    )
    return [init_table, sig_table]


def _plots(out: Path, act, grad, theory, sig) -> list[Path]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_act, ax_grad = fig.subplots(1, 2)
    layers = np.arange(1, len(act["standard"]) + 1)
    for init, color in zip(INITS, ("tab:red", "tab:blue")):
        ax_act.plot(layers, act[init], "o-", color=color, label=f"{init} (measured)")
        ax_act.plot(layers, theory[init]["act"], "--", color=color, alpha=0.6, label="mean field")
        ax_grad.plot(layers, grad[init], "o-", color=color, label=init)
    ax_act.set_title("activation variance Var[tanh(s^l)]", fontsize=10)
    ax_grad.set_title("back-propagated gradient variance Var[dC/ds^l]", fontsize=10)
    for ax in (ax_act, ax_grad):
        ax.set_yscale("log")
        ax.set_xlabel("hidden layer")
        ax.set_xticks(layers)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Glorot & Bengio 2010 at init: standard vs normalized initialization", fontsize=11)
    paths = save_figure(fig, out, "init-variances")

    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.subplots()
    for k in range(sig["act_mean"].shape[1]):
        ax.plot(sig["step"], sig["act_mean"][:, k], label=f"hidden layer {k + 1}")
    ax.set_xlabel("SGD step (minibatches of 10)")
    ax.set_ylabel("mean sigmoid output")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("4-layer sigmoid net, standard init: the top layer saturates at 0", fontsize=10)
    paths += save_figure(fig, out, "sigmoid-saturation")
    return paths
