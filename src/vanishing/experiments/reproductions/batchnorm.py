"""Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz (2019): at initialisation, batch norm
makes a deep ReLU net's gradients explode by ``pi / (pi - 1) ~ 1.467`` per layer.

Nets: ``depth`` blocks ``Linear (no bias) -> BatchNorm1d -> ReLU`` of ``width`` units (He
weights ``N(0, 2/n)``; batch norm makes the scale irrelevant), then a ``Linear`` head to 10
outputs; inputs and targets are standard Gaussian, the loss is the squared error summed over
outputs and averaged over the batch. One forward and backward pass in training mode (batch
statistics) under :func:`vanishing.watch`; ``||dL/dW_l||^2`` of each block's weight is read back
from the run (``grad_norm``). The per-layer factor ``||dL/dW_l||^2 / ||dL/dW_{l+1}||^2`` is
summarised by its geometric mean over the half of the blocks nearest the input: near the
output the factor climbs from ~1 to its asymptotic value over a few layers (the gradient's
direction in batch space settles first), and the paper's rate is that asymptote.

The mean-field value: with batch statistics over a large batch, a unit's pre-norm input has
batch variance ``sigma_w^2 Var[phi(z)]`` and the backward pass through ``normalise -> phi ->
W`` multiplies ``E[delta^2]`` by ``E[phi'(z)^2] / Var[phi(z)]`` (``z ~ N(0, 1)``), independent
of ``sigma_w``; for ReLU ``(1/2) / (1/2 - 1/(2 pi)) = pi / (pi - 1)``
(:func:`bn_gradient_rate`). The same nets without batch norm (He init) keep ``~1``.
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
    from torch import nn

__all__ = [
    "TITLE",
    "CITATION",
    "PUBLISHED_RATE",
    "bn_gradient_rate",
    "build_net",
    "gradient_sq_norms",
    "per_layer_rate",
    "reproduce",
]

TITLE = "Yang et al. 2019: batch norm makes a deep ReLU net's gradient explode by pi/(pi-1) per layer at init"
CITATION = (
    "G. Yang, J. Pennington, V. Rao, J. Sohl-Dickstein and S. S. Schoenholz, 'A Mean Field "
    "Theory of Batch Normalization', ICLR 2019: the gradient explosion rate of fully connected "
    "ReLU nets with batch norm at init, pi/(pi-1) ~ 1.467 per layer in ||grad||^2 (large width, "
    "large batch)"
)

#: the paper's rate for ReLU: ``pi / (pi - 1)``
PUBLISHED_RATE = math.pi / (math.pi - 1)
N_OUT = 10

_ACTIVATIONS = ("relu", "tanh")


def _phi(
    name: str,
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    if name == "relu":
        return (lambda z: np.maximum(z, 0.0)), (lambda z: (z > 0).astype(np.float64))
    if name == "tanh":
        return np.tanh, (lambda z: 1.0 / np.cosh(z) ** 2)
    raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {name!r}")


def bn_gradient_rate(activation: str = "relu", *, points: int = 20_001) -> float:
    """``E[phi'(z)^2] / Var[phi(z)]`` for ``z ~ N(0, 1)``: the large-batch mean-field factor
    of ``||grad||^2`` per ``Linear -> BatchNorm -> phi`` block.

    Integrated by Simpson's rule on ``[-12, 0]`` and ``[0, 12]`` separately (so ReLU's kink is
    no error source).

    Example:
        >>> import math
        >>> from vanishing.experiments.reproductions.batchnorm import bn_gradient_rate
        >>> round(bn_gradient_rate("relu"), 6), round(math.pi / (math.pi - 1), 6)
        (1.466942, 1.466942)
        >>> round(bn_gradient_rate("tanh"), 3)
        1.178
    """
    phi, dphi = _phi(activation)
    if points < 3 or points % 2 == 0:
        raise ValueError(f"points must be an odd number >= 3 (Simpson's rule), got {points}")
    # each half-line on its own grid, its end at 0 taken as a one-sided limit: ReLU's kink and
    # the jump of its derivative sit at 0, where Simpson's rule would otherwise mix the sides
    half = np.linspace(0.0, 12.0, points)
    h = half[1] - half[0]
    weights = np.ones(points)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    density = np.exp(-half * half / 2) / math.sqrt(2 * math.pi) * weights * h / 3
    right = half.copy()
    right[0] = np.nextafter(0.0, 1.0)
    left = -half
    left[0] = np.nextafter(0.0, -1.0)

    def expect(f: Callable[[np.ndarray], np.ndarray]) -> float:
        return float((f(left) * density).sum() + (f(right) * density).sum())

    mean = expect(phi)
    return expect(lambda z: dphi(z) ** 2) / (expect(lambda z: phi(z) ** 2) - mean**2)


def build_net(
    width: int,
    depth: int,
    *,
    batchnorm: bool = True,
    activation: str = "relu",
    seed: int = 0,
) -> nn.Sequential:
    """``depth`` blocks ``Linear(width, width, bias=False) [-> BatchNorm1d] -> phi``, then a
    ``Linear(width, 10, bias=False)`` head; weights ``N(0, 2 / n_in)`` (head ``N(0, 1/n_in)``).

    Example:
        >>> from vanishing.experiments.reproductions.batchnorm import build_net
        >>> net = build_net(8, 2)
        >>> [type(m).__name__ for m in net]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Linear', 'BatchNorm1d', 'ReLU', 'Linear']
        >>> [type(m).__name__ for m in build_net(8, 1, batchnorm=False, activation="tanh")]
        ['Linear', 'Tanh', 'Linear']
    """
    import torch
    from torch import nn

    _phi(activation)
    if int(width) < 1 or int(depth) < 1:
        raise ValueError(f"width and depth must be positive, got width={width}, depth={depth}")
    g = torch.Generator().manual_seed(int(seed))
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = []
    for _ in range(int(depth)):
        linear = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(width, width, generator=g) * math.sqrt(2 / width))
        layers.append(linear)
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
    head = nn.Linear(width, N_OUT, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(N_OUT, width, generator=g) / math.sqrt(width))
    layers.append(head)
    return nn.Sequential(*layers)


def gradient_sq_norms(
    net: nn.Sequential, batch: int, *, run_dir: str | Path, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per block (input first): ``||dL/dW_l||^2`` of its Linear weight (``"weight"``) and
    ``||dL/du_l||^2`` of its Linear output, the error signal (``"error"``), from one watched pass.

    Inputs and targets ``N(0, 1)`` (``batch`` examples, seeded), ``L`` = squared error summed
    over the outputs, averaged over the batch; the pass runs under :func:`vanishing.watch`
    (no optimizer: the run's step is the backward pass) and both are read from the run
    (``grad_norm`` and ``error_norm``).

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.reproductions.batchnorm import build_net, gradient_sq_norms
        >>> g2 = gradient_sq_norms(build_net(16, 3), 32, run_dir=tempfile.mkdtemp() + "/r")
        >>> g2["weight"].shape, g2["error"].shape
        ((3,), (3,))
    """
    import torch
    from torch import nn

    import vanishing

    if int(batch) < 2:
        raise ValueError(f"batch norm needs a batch of at least 2 examples, got {batch}")
    linears = [str(k) for k, m in enumerate(net) if isinstance(m, nn.Linear)][:-1]
    width = net[int(linears[0])].in_features
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(int(batch), width, generator=g)
    y = torch.randn(int(batch), N_OUT, generator=g)
    net.train()
    with vanishing.watch(net, run_dir=run_dir):
        loss = (net(x) - y).pow(2).sum() / len(x)
        loss.backward()
    run = vanishing.load_run(run_dir)
    weight = run.pivot("grad_norm", param="weight")[linears].iloc[0]
    error = run.pivot("error_norm")[linears].iloc[0]
    return {
        "weight": weight.to_numpy(dtype=np.float64) ** 2,
        "error": error.to_numpy(dtype=np.float64) ** 2,
    }


def per_layer_rate(sq_norms: Sequence[float] | np.ndarray, *, skip: int = 2) -> float:
    """Geometric mean of ``g_l / g_{l+1}`` over the half of the layers nearest the input, less
    the ``skip`` ratios next to the input.

    Layer 1 reads the raw input (variance 1, not ``Var[relu] = 0.34``), which rescales its
    gradients and, through the batch statistics, the next layer's: a transient, not the rate.

    Example:
        >>> from vanishing.experiments.reproductions.batchnorm import per_layer_rate
        >>> round(per_layer_rate([1.5**k for k in range(10, 0, -1)]), 6)
        1.5
    """
    g = np.asarray(sq_norms, dtype=np.float64)
    if np.any(~np.isfinite(g)) or np.any(g <= 0):
        raise ValueError("squared gradient norms must be positive and finite")
    ratios = g[:-1] / g[1:]
    half = ratios[int(skip) : len(g) // 2]
    if len(half) < 1:
        raise ValueError(f"{len(g)} layers leave no ratio in the input half after skip={skip}")
    return float(np.exp(np.mean(np.log(half))))


def reproduce(
    *,
    quick: bool = False,
    out: Any = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
) -> Reproduction:
    """Measure the rate over a grid of widths and batch sizes, and the no-BN and tanh contrasts.

    Default: depth 50, widths 256-1024, batches 64-1024, 3 seeds each. ``quick``: depth 30, two
    sizes, 2 seeds.

    Example:
        >>> r = reproduce(quick=True, out="/tmp/batchnorm")   # doctest: +SKIP
        >>> r.ok                                              # doctest: +SKIP
        True
    """
    out = check_out(out, "batchnorm")
    if quick:
        depth, seeds = 30, 2
        grid = [(256, 128), (512, 256)]
    else:
        depth, seeds = 50, 3
        grid = [(256, 64), (256, 256), (512, 256), (512, 512), (1024, 256), (1024, 1024)]
    main = grid[-1]
    contrast = grid[-2] if quick else (512, 256)
    cases = [("relu", True, w, b) for w, b in grid]
    cases += [("relu", False, *contrast), ("tanh", True, *contrast)]
    total, done = len(cases) * seeds, 0

    kinds = ("weight", "error")
    profiles: dict[str, dict[tuple, np.ndarray]] = {k: {} for k in kinds}
    rates: dict[str, dict[tuple, float]] = {k: {} for k in kinds}
    with one_thread():
        for activation, bn, width, batch in cases:
            per_seed = []
            for s in range(seeds):
                tag = f"{activation}-{'bn' if bn else 'plain'}-w{width}-b{batch}-s{s}"
                net = build_net(
                    width, depth, batchnorm=bn, activation=activation, seed=seed * 1000 + s
                )
                run_dir = out / "runs" / tag
                per_seed.append(
                    gradient_sq_norms(net, batch, run_dir=run_dir, seed=seed * 1000 + s)
                )
                done += 1
                if progress is not None:
                    progress(done, total)
            key = (activation, bn, width, batch)
            for kind in kinds:
                curves = [p[kind] for p in per_seed]
                # geometric means over seeds: the factors are ratios
                profiles[kind][key] = np.exp(np.mean(np.log(curves), axis=0))
                logs = [np.log(per_layer_rate(c)) for c in curves]
                rates[kind][key] = float(np.exp(np.mean(logs)))

    main_key = ("relu", True, *main)
    plain_key = ("relu", False, *contrast)
    tanh_key = ("tanh", True, *contrast)
    weight_rates, error_rates = rates["weight"], rates["error"]
    big = [k for k in weight_rates if k[0] == "relu" and k[1] and k[3] >= 256]
    worst = max(big, key=lambda k: abs(weight_rates[k] / PUBLISHED_RATE - 1))
    tanh_rate = bn_gradient_rate("tanh")
    g = profiles["weight"][main_key]
    checks = [
        Check.within(
            f"ReLU + BN, width {main[0]}, batch {main[1]}: per-layer factor of ||dL/dW||^2",
            published=PUBLISHED_RATE,
            measured=weight_rates[main_key],
            rel=0.03,
        ),
        Check.within(
            f"ReLU + BN, width {main[0]}, batch {main[1]}: per-layer factor of the error "
            "signal ||dL/du||^2",
            published=PUBLISHED_RATE,
            measured=error_rates[main_key],
            rel=0.03,
        ),
        Check.within(
            f"ReLU + BN, worst size with batch >= 256 (width {worst[2]}, batch {worst[3]}), "
            "||dL/dW||^2",
            published=PUBLISHED_RATE,
            measured=weight_rates[worst],
            rel=0.05,
        ),
        Check.within(
            "mean-field value E[phi'^2] / Var[phi] for ReLU, by quadrature",
            published=PUBLISHED_RATE,
            measured=bn_gradient_rate("relu"),
            rel=1e-9,
        ),
        Check.within(
            f"ReLU, no BN, He init (width {contrast[0]}, batch {contrast[1]}): per-layer factor "
            "of the error signal",
            published=1.0,
            measured=error_rates[plain_key],
            abs=0.06,
        ),
        Check.within(
            "tanh + BN: per-layer factor of ||dL/dW||^2 vs the same mean field, "
            "E[tanh'^2] / Var[tanh]",
            published=round(tanh_rate, 4),
            measured=weight_rates[tanh_key],
            rel=0.03,
        ),
        Check.above(
            f"ReLU + BN: ||dL/dW_1||^2 / ||dL/dW_{depth}||^2 (explodes toward the input)",
            published="grows exponentially with depth",
            measured=float(g[0] / g[-1]),
            limit=PUBLISHED_RATE ** (depth / 2),
        ),
    ]
    tables = _tables(rates, profiles, main_key, plain_key, tanh_key, tanh_rate, depth)
    plots = _plots(out, profiles, rates, main_key, plain_key, tanh_key, depth)
    summary = (
        f"At init, a {depth}-block ReLU MLP with batch norm (width {main[0]}, batch {main[1]}) "
        f"multiplies ||dL/dW||^2 by {weight_rates[main_key]:.3f} per layer toward the input (paper: "
        f"pi/(pi-1) = {PUBLISHED_RATE:.3f}); the first layer's squared gradient is "
        f"{g[0] / g[-1]:.1e} times the last one's. Without batch norm (He init) the factor is "
        f"{error_rates[plain_key]:.3f} (error signal)."
    )
    result = Reproduction(
        name="batchnorm",
        title=TITLE,
        citation=CITATION,
        checks=checks,
        tables=tables,
        plots=plots,
        out=out,
        quick=quick,
        settings={
            "depth": depth,
            "seeds": seeds,
            "grid_width_batch": [list(p) for p in grid],
            "contrast_width_batch": list(contrast),
            "inputs": "N(0, 1), targets N(0, 1), loss sum of squared errors / batch",
            "rate_layers": "g_l / g_{l+1} for l = 3 .. depth / 2 (the input half)",
            "seed": seed,
        },
        summary=summary,
    )
    (out / "batchnorm.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _tables(rates, profiles, main_key, plain_key, tanh_key, tanh_rate, depth) -> list[Table]:
    rows = []
    for key, rate in rates["weight"].items():
        activation, bn, width, batch = key
        predicted = (PUBLISHED_RATE if activation == "relu" else tanh_rate) if bn else 1.0
        p = profiles["weight"][key]
        rows.append(
            [
                activation,
                "yes" if bn else "no",
                width,
                batch,
                rate,
                rates["error"][key],
                predicted,
                float(p[0] / p[-1]),
            ]
        )
    t1 = Table(
        f"per-layer factor over the input half of {depth} blocks (geometric mean over seeds): "
        "of ||dL/dW_l||^2 and of the error signal ||dL/du_l||^2",
        [
            "activation",
            "BN",
            "width",
            "batch",
            "dW factor",
            "error factor",
            "mean field",
            "g_1/g_L",
        ],
        rows,
    )
    p = profiles["weight"][main_key]
    e = profiles["error"][main_key]
    r, re = p[:-1] / p[1:], e[:-1] / e[1:]
    picks = sorted({0, 1, 4, 9, len(r) // 2, len(r) - 10, len(r) - 5, len(r) - 2, len(r) - 1})
    t2 = Table(
        f"ReLU + BN, width {main_key[2]}, batch {main_key[3]}: factor per layer "
        "(it settles within ~10 layers of the output)",
        ["layer l", "||dW_l||^2 / ||dW_l+1||^2", "error signal"],
        [[k + 1, float(r[k]), float(re[k])] for k in picks if k >= 0],
    )
    return [t1, t2]


def _plots(out: Path, profiles, rates, main_key, plain_key, tanh_key, depth) -> list[Path]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_g, ax_r = fig.subplots(1, 2)
    layers = np.arange(1, depth + 1)
    labels = {
        main_key: f"ReLU + BN (w {main_key[2]}, B {main_key[3]})",
        plain_key: f"ReLU, no BN, He (w {plain_key[2]}, B {plain_key[3]})",
        tanh_key: f"tanh + BN (w {tanh_key[2]}, B {tanh_key[3]})",
    }
    for key, label in labels.items():
        p = profiles["weight"][key]
        ax_g.plot(layers, p / p[-1], "o-", ms=2.5, label=label)
    ax_g.plot(
        layers, PUBLISHED_RATE ** (depth - layers), "--", color="gray", label="(pi/(pi-1))^(L-l)"
    )
    ax_g.set_yscale("log")
    ax_g.set_xlabel("layer l (input = 1)")
    ax_g.set_ylabel("||dL/dW_l||^2 / ||dL/dW_L||^2")
    ax_g.set_title("squared weight-gradient norm at init", fontsize=10)
    for key in (k for k in rates["weight"] if k[0] == "relu" and k[1]):
        p = profiles["weight"][key]
        ax_r.plot(layers[:-1], p[:-1] / p[1:], lw=1, label=f"w {key[2]}, B {key[3]}")
    ax_r.axhline(PUBLISHED_RATE, color="gray", ls="--", label="pi/(pi-1)")
    ax_r.set_xlabel("layer l")
    ax_r.set_ylabel("g_l / g_(l+1)")
    ax_r.set_title("ReLU + BN: factor per layer", fontsize=10)
    for ax in (ax_g, ax_r):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Yang et al. 2019: gradient explosion under batch norm at init", fontsize=11)
    return save_figure(fig, out, "batchnorm")
