"""He, Zhang, Ren & Sun (2015): a 30-layer ReLU net with Xavier's ``Var[w] = 1/n`` halves the
forward second moment per layer and stalls; with ``Var[w] = 2/n`` it keeps it and trains.

The net is a fully connected MLP (the paper's Fig. 3 is a 30-layer conv net on ImageNet):
30 weight layers, ``64 -> 29 x width ReLU -> 10``, zero biases, weights ~ ``N(0, gain / n_in)``
with ``gain = 1`` ("Xavier", as the paper writes it: std ``sqrt(1/n)``) or ``gain = 2`` ("He").
Their section 2.2, eq. 10: ``Var[y_L] = Var[y_1] prod_{l=2}^{L} (n_l Var[w_l] / 2)``, so
the factor per layer is 1/2 with Xavier (``2^-29 ~ 1.9e-9`` from the first layer's
pre-activation to the 30th) and 1 with He. Both nets then train on scikit-learn's digits with
SGD under :func:`vanishing.watch`; the losses and per-layer gradient norms are read back from
the runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
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
    "GAINS",
    "build_net",
    "predicted_factor",
    "second_moments",
    "train_net",
    "reproduce",
]

TITLE = "He et al. 2015: Xavier init halves a 30-layer ReLU net's signal per layer and stalls; He init keeps it and trains"
CITATION = (
    "K. He, X. Zhang, S. Ren and J. Sun, 'Delving Deep into Rectifiers: Surpassing Human-Level "
    "Performance on ImageNet Classification', ICCV 2015: section 2.2 (eqs. 7-10, the factor "
    "n Var[w] / 2 per layer) and Fig. 3 (30-layer net: Xavier init stalls, theirs converges)"
)

#: n Var[w] of each initialisation
GAINS = {"xavier": 1.0, "he": 2.0}
DEPTH = 30  # weight layers: 29 ReLU hidden layers and the output layer
LR, MOMENTUM, BATCH = 0.003, 0.9, 64
HE_TRAINED = 0.3  # the He net's smoothed training loss must fall below this (default run)
XAVIER_STALLED = 2.2  # the Xavier net's must stay above this (chance: ln 10 = 2.303)


def build_net(
    n_in: int, width: int, n_out: int, *, init: str, depth: int = DEPTH, seed: int = 0
) -> nn.Sequential:
    """``depth`` Linear layers, a ReLU after each but the last; weights ~ N(0, gain / n_in).

    ``init``: ``"xavier"`` (gain 1) or ``"he"`` (gain 2); biases 0; drawn from a generator
    seeded with ``seed``.

    Example:
        >>> from vanishing.experiments.reproductions.he import build_net
        >>> net = build_net(64, 100, 10, init="he", depth=3)
        >>> [type(m).__name__ for m in net]
        ['Linear', 'ReLU', 'Linear', 'ReLU', 'Linear']
        >>> round(float(net[2].weight.detach().var() * 100), 1)      # 2 / n_in, n_in = 100
        2.0
    """
    import torch
    from torch import nn

    if init not in GAINS:
        raise ValueError(f"init must be one of {', '.join(GAINS)}, got {init!r}")
    if int(depth) < 2 or min(int(n_in), int(width), int(n_out)) < 1:
        raise ValueError(
            f"need depth >= 2 and positive sizes, got depth={depth}, {n_in}->{width}->{n_out}"
        )
    g = torch.Generator().manual_seed(int(seed))
    layers: list[nn.Module] = []
    fan_in = int(n_in)
    for k in range(int(depth)):
        fan_out = int(width) if k < depth - 1 else int(n_out)
        linear = nn.Linear(fan_in, fan_out)
        std = math.sqrt(GAINS[init] / fan_in)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=g) * std)
            linear.bias.zero_()
        layers.append(linear)
        if k < depth - 1:
            layers.append(nn.ReLU())
        fan_in = fan_out
    return nn.Sequential(*layers)


def predicted_factor(init: str) -> float:
    """The per-layer factor of the forward second moment: ``n Var[w] E[relu(y)^2] / E[y^2]``.

    For a zero-mean symmetric ``y``, ``E[relu(y)^2] = E[y^2] / 2`` (their eq. 8), so the factor
    is ``gain / 2``: 1/2 for Xavier, 1 for He.

    Example:
        >>> from vanishing.experiments.reproductions.he import predicted_factor
        >>> predicted_factor("xavier"), predicted_factor("he")
        (0.5, 1.0)
    """
    from vanishing.experiments.reproductions.glorot import gaussian_expectation

    if init not in GAINS:
        raise ValueError(f"init must be one of {', '.join(GAINS)}, got {init!r}")
    half = float(gaussian_expectation(lambda u: np.maximum(u, 0.0) ** 2, 1.0))
    return round(GAINS[init] * half, 12)


def second_moments(net: nn.Sequential, x: Tensor) -> np.ndarray:
    """``E[y_l^2]`` of each Linear layer's output (pre-activation) over ``x`` and units.

    Example:
        >>> import torch
        >>> from vanishing.experiments.reproductions.he import build_net, second_moments
        >>> m = second_moments(build_net(16, 400, 400, init="xavier", depth=3), torch.randn(256, 16))
        >>> [round(float(v), 1) for v in m[1:] / m[:-1]]         # halves per layer
        [0.5, 0.5]
    """
    import torch
    from torch import nn

    moments = []
    with torch.no_grad():
        h = x
        for module in net:
            h = module(h)
            if isinstance(module, nn.Linear):
                moments.append(float(h.double().pow(2).mean()))
    return np.array(moments)


def train_net(
    x: Tensor,
    y: Tensor,
    *,
    init: str,
    width: int,
    steps: int,
    run_dir: str | Path,
    seed: int = 0,
    record_every: int = 5,
) -> dict[str, Any]:
    """Train the 30-layer net under :func:`vanishing.watch`: SGD (lr 0.003, momentum 0.9),
    minibatches of 64 drawn with replacement, cross-entropy.

    Returns, read back from the run: ``"step"`` and ``"loss"`` (the recorded steps' batch
    losses), ``"grad_norm"`` (recorded steps x Linear layers, the weights' gradient norms),
    and ``"run_dir"``.

    Example:
        >>> import tempfile, torch
        >>> from vanishing.experiments.reproductions.he import train_net
        >>> x, y = torch.randn(100, 64), torch.randint(0, 10, (100,))
        >>> r = train_net(x, y, init="he", width=16, steps=4, run_dir=tempfile.mkdtemp() + "/r", record_every=2)
        >>> r["step"].tolist(), r["grad_norm"].shape
        ([0, 2], (2, 30))
    """
    import torch
    from torch import nn

    import vanishing
    from vanishing.experiments.train import minibatches, train

    if int(steps) < 1 or int(record_every) < 1:
        raise ValueError(f"steps and record_every must be positive, got {steps}, {record_every}")
    net = build_net(x.shape[1], width, 10, init=init, seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    batches = minibatches(
        x, y, batch_size=BATCH, generator=torch.Generator().manual_seed(int(seed)), replacement=True
    )
    watch = {"run_dir": run_dir, "every": int(record_every), "flush_every": 100}
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
    linears = [str(k) for k, m in enumerate(net) if isinstance(m, nn.Linear)]
    grads = run.pivot("grad_norm", param="weight")[linears]
    steps_table = run.steps.set_index("step")
    return {
        "step": grads.index.to_numpy(),
        "loss": steps_table["loss"].reindex(grads.index).to_numpy(dtype=np.float64),
        "grad_norm": grads.to_numpy(dtype=np.float64),
        "run_dir": Path(run_dir),
        "model": net,
    }


def _geomean_factor(moments: np.ndarray) -> float:
    """The per-layer factor over the whole stack: ``(m_last / m_first)^(1 / (layers - 1))``."""
    return float((moments[-1] / moments[0]) ** (1.0 / (len(moments) - 1)))


def reproduce(
    *,
    quick: bool = False,
    out: Any = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
) -> Reproduction:
    """Measure the forward factor at init (both inits, several seeds), then train both nets.

    Default: width 256, 5 seeds at init, 400 training steps per net. ``quick``: width 128,
    3 seeds, 200 steps, and a looser "trains" threshold (loss < 1.0).

    Example:
        >>> r = reproduce(quick=True, out="/tmp/he")   # doctest: +SKIP
        >>> r.ok                                       # doctest: +SKIP
        True
    """
    import torch

    from vanishing.experiments.data import digits

    out = check_out(out, "he")
    width, seeds, steps = (128, 3, 200) if quick else (256, 5, 400)
    trained_below = 1.0 if quick else HE_TRAINED
    x, y, x_test, y_test = digits(seed=seed)  # standardized per pixel
    total, done = 2 * seeds + 2, 0

    moments: dict[str, np.ndarray] = {}
    with one_thread():
        for init in GAINS:
            per_seed = []
            for s in range(seeds):
                net = build_net(x.shape[1], width, 10, init=init, seed=seed * 1000 + s)
                per_seed.append(second_moments(net, x))
                done += 1
                if progress is not None:
                    progress(done, total)
            # geometric mean over seeds: the factors are ratios
            moments[init] = np.exp(np.mean(np.log(per_seed), axis=0))
    input_moment = float(x.double().pow(2).mean())

    runs: dict[str, dict[str, Any]] = {}
    final: dict[str, dict[str, float]] = {}
    for init in GAINS:
        runs[init] = train_net(
            x, y, init=init, width=width, steps=steps, run_dir=out / f"{init}-run", seed=seed
        )
        net_loss = runs[init]["loss"]
        final[init] = {"smoothed_loss": float(np.mean(net_loss[-max(1, len(net_loss) // 10) :]))}
        done += 1
        if progress is not None:
            progress(done, total)
    with torch.no_grad():
        for init in GAINS:
            predicted = runs[init]["model"](x_test).argmax(1)
            final[init]["test_accuracy"] = float((predicted == y_test).float().mean())

    factor = {i: _geomean_factor(moments[i]) for i in GAINS}
    checks = [
        Check.within(
            "Xavier (Var = 1/n): per-layer factor of E[y^2], geometric mean over 29 layers",
            published=predicted_factor("xavier"),
            measured=factor["xavier"],
            rel=0.1,
        ),
        Check.within(
            "He (Var = 2/n): per-layer factor of E[y^2], geometric mean over 29 layers",
            published=predicted_factor("he"),
            measured=factor["he"],
            rel=0.1,
        ),
        Check.within(
            "Xavier: log2 of E[y_30^2] / E[y_1^2] (published 2^-29)",
            published=-29.0,
            measured=math.log2(moments["xavier"][-1] / moments["xavier"][0]),
            abs=3.0,
        ),
        Check.above(
            "Xavier: smoothed training loss at the end (stalls near ln 10 = 2.303)",
            published="does not converge",
            measured=final["xavier"]["smoothed_loss"],
            limit=XAVIER_STALLED,
        ),
        Check.below(
            "He: smoothed training loss at the end",
            published="converges",
            measured=final["he"]["smoothed_loss"],
            limit=trained_below,
        ),
    ]
    tables = _tables(moments, input_moment, factor, runs, final)
    plots = _plots(out, moments, runs)
    summary = (
        f"At init the 30-layer ReLU MLP's forward second moment changes by x{factor['xavier']:.3f} "
        f"per layer with Xavier's Var = 1/n (paper: 1/2; E[y_30^2]/E[y_1^2] = "
        f"{moments['xavier'][-1] / moments['xavier'][0]:.1e}) and by x{factor['he']:.3f} with "
        f"He's 2/n (paper: 1). Trained with SGD for {steps} steps under the monitor, the Xavier "
        f"net stays at loss {final['xavier']['smoothed_loss']:.2f} (chance 2.30) while the He "
        f"net reaches {final['he']['smoothed_loss']:.3f} "
        f"({final['he']['test_accuracy'] * 100:.0f}% test accuracy)."
    )
    result = Reproduction(
        name="he",
        title=TITLE,
        citation=CITATION,
        checks=checks,
        tables=tables,
        plots=plots,
        out=out,
        quick=quick,
        settings={
            "data": "scikit-learn digits, standardized per pixel, 1438 train / 359 test",
            "net": f"MLP 64 -> 29 x {width} ReLU -> 10 (30 weight layers), zero biases",
            "init_seeds": seeds,
            "steps": steps,
            "optimizer": {"type": "SGD", "lr": LR, "momentum": MOMENTUM, "batch": BATCH},
            "seed": seed,
        },
        summary=summary,
    )
    (out / "he.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _tables(moments, input_moment, factor, runs, final) -> list[Table]:
    layers = len(moments["xavier"])
    picks = sorted({0, 1, 4, 9, 14, 19, 24, layers - 1})
    rows = [
        [
            k + 1,
            float(moments["xavier"][k] / input_moment),
            0.5**k,
            float(moments["he"][k] / input_moment),
        ]
        for k in picks
    ]
    rows.append(["factor / layer", factor["xavier"], 0.5, factor["he"]])
    t1 = Table(
        f"E[y_l^2] / E[x^2] at init (E[x^2] = {input_moment:.3f}), geometric mean over seeds",
        ["layer", "Xavier (measured)", "Xavier (2^-(l-1))", "He (measured)"],
        rows,
    )
    rows2 = []
    for init in GAINS:
        g = runs[init]["grad_norm"][0]
        rows2.append(
            [
                init,
                float(runs[init]["loss"][0]),
                final[init]["smoothed_loss"],
                final[init]["test_accuracy"],
                float(g[0]),
                float(g[-1]),
            ]
        )
    t2 = Table(
        "training under the monitor: batch loss at step 0, smoothed at the end, test accuracy, "
        "||dL/dW|| of the first and last layer at step 0",
        ["init", "loss step 0", "loss end", "test acc", "grad W_1", "grad W_30"],
        rows2,
    )
    return [t1, t2]


def _plots(out: Path, moments, runs) -> list[Path]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_m, ax_l = fig.subplots(1, 2)
    layers = np.arange(1, len(moments["xavier"]) + 1)
    for init, color in zip(GAINS, ("tab:red", "tab:blue")):
        ax_m.plot(layers, moments[init] / moments[init][0], "o-", ms=3, color=color, label=init)
        ax_l.plot(runs[init]["step"], runs[init]["loss"], color=color, label=init, lw=1)
    ax_m.plot(layers, 0.5 ** (layers - 1), "--", color="gray", label="2^-(l-1)")
    ax_m.set_yscale("log")
    ax_m.set_xlabel("layer l")
    ax_m.set_ylabel("E[y_l^2] / E[y_1^2]")
    ax_m.set_title("forward second moment at init", fontsize=10)
    ax_l.set_xlabel("SGD step")
    ax_l.set_ylabel("batch loss (recorded by the monitor)")
    ax_l.set_title("training the 30-layer ReLU net", fontsize=10)
    for ax in (ax_m, ax_l):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("He et al. 2015: Var[w] = 1/n vs 2/n in a 30-layer ReLU MLP", fontsize=11)
    return save_figure(fig, out, "he")
