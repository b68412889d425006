"""Greedy layer-wise pretraining of a deep sigmoid net, where it helps and where it does not.

Hinton, Osindero & Teh (2006) and Bengio, Lamblin, Popovici & Larochelle (2007) trained deep
nets by first training each hidden layer, from the input up, as an autoencoder (or RBM) of the
layer below, then fine-tuning the whole net; Bengio et al.'s Table 1 reports lower test error for
the pretrained deep net than for the same net trained from a random start, and Erhan et al.
(2010) find that the advantage grows with depth.

Here, on scikit-learn's digits: MLPs of width 128 with sigmoid hidden layers (6 deep, 2
shallow), each trained from the same random start with and without the package's greedy
layer-wise autoencoder pretraining (:func:`vanishing.experiments.pretrain.layerwise_pretrain`:
linear decoder, squared error, SGD with momentum), then fine-tuned with the same minibatch SGD
for the same number of steps under :func:`vanishing.watch`. The same net with ReLU and He
initialisation, not pretrained, is the modern baseline. Test error and training loss are read
after a short budget (300 steps) and a long one (1500 steps); the per-layer gradient norms
come from the recorded runs.

The sigmoid nets start from N(0, (4 / sqrt(fan_in))^2) weights: Glorot & Bengio's (2010)
advice of a 4x larger init for the logistic sigmoid. With the small "standard" uniform init
(U[-1/sqrt(fan_in), 1/sqrt(fan_in)], PyTorch's default) a 6-layer sigmoid net of this width
does not train in this budget with or without this pretraining: each layer's output has about a
tenth of its input's spread, and the squared-error autoencoder of a layer whose input hardly
varies is already near zero loss, so it has no reason to amplify it. See
docs/reproductions/pretraining.md.
"""

from __future__ import annotations

import json
from pathlib import Path
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

__all__ = ["TITLE", "CITATION", "CONFIGS", "build_net", "run_config", "reproduce"]

TITLE = "Greedy layer-wise pretraining: helps a deep sigmoid net early, not a ReLU net"
CITATION = (
    "Bengio, Lamblin, Popovici, Larochelle 2007, Greedy Layer-Wise Training of Deep Networks, "
    "NIPS, Table 1; Erhan, Bengio, Courville, Manzagol, Vincent, Bengio 2010, Why Does "
    "Unsupervised Pre-training Help Deep Learning?, JMLR 11, depth and training-length "
    "experiments; after Hinton, Osindero, Teh 2006"
)

WIDTH = 128
DEEP, SHALLOW = 6, 2
LR, BATCH = 0.1, 64
PRETRAIN_LR = 0.5
#: (hidden layers, activation, pretrained): the nets compared
CONFIGS = (
    (DEEP, "sigmoid", False),
    (DEEP, "sigmoid", True),
    (DEEP, "relu", False),
    (SHALLOW, "sigmoid", False),
    (SHALLOW, "sigmoid", True),
)
DEFAULT = {"short": 300, "long": 1500, "pretrain_steps": 600, "seeds": 3}
QUICK = {"short": 300, "long": 1200, "pretrain_steps": 200, "seeds": 1}
FIRST_STEPS = 50  # the first-layer gradient is compared over the first 50 fine-tuning steps


def build_net(depth: int, activation: str, *, width: int = WIDTH, seed: int = 0) -> nn.Sequential:
    """The MLP compared here: ``depth`` hidden layers of ``width``, 64 inputs, 10 outputs.

    Sigmoid: weights N(0, (4/sqrt(fan_in))^2) (Glorot & Bengio's factor 4 for the logistic);
    ReLU: He-normal. Biases are PyTorch's default. Drawn from torch's RNG seeded with ``seed``.

    Example:
        >>> from vanishing.experiments.reproductions.pretraining import build_net
        >>> net = build_net(3, "sigmoid", width=100)
        >>> [type(m).__name__ for m in net][:2], round(float(net[2].weight.detach().std()), 2)
        (['Linear', 'Sigmoid'], 0.4)
    """
    import torch

    from vanishing.experiments.models import mlp

    if activation not in ("sigmoid", "relu"):
        raise ValueError(f"activation must be 'sigmoid' or 'relu', got {activation!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    torch.manual_seed(seed)
    if activation == "relu":
        return mlp(64, 10, depth=depth, width=width, activation="relu", init="he_normal")
    net = mlp(64, 10, depth=depth, width=width, activation="sigmoid", init="default")
    # mlp's "normal" init takes one std for every layer; fan-in differs (64 vs width), so the
    # 4/sqrt(fan_in) scale is set per layer here, from the same RNG
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 4.0 / m.in_features**0.5)
    return net


def run_config(
    depth: int,
    activation: str,
    pretrained: bool,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    seed: int,
    short: int,
    long: int,
    pretrain_steps: int,
    run_dir: str | Path,
) -> dict[str, Any]:
    """Build, optionally pretrain, then fine-tune one net for ``long`` steps under the monitor.

    Returns the test error and full-training-set loss after ``short`` and after ``long``
    fine-tuning steps (``short_test_error``, ``short_train_loss``, ``long_...``), the first
    hidden layer's median weight-gradient norm over the first fine-tuning steps and its ratio
    to the last hidden layer's (``first_grad``, ``first_last``), the autoencoders'
    reconstruction errors, and the run directory.

    Example:
        >>> from vanishing.experiments.reproductions.pretraining import run_config
        >>> import tempfile
        >>> from vanishing.experiments.data import digits
        >>> r = run_config(2, "sigmoid", True, digits(), seed=0, short=2, long=3,
        ...                pretrain_steps=2, run_dir=tempfile.mkdtemp() + "/r")  # doctest: +SKIP
        >>> len(r["reconstruction"]), r["short_test_error"] <= 1  # doctest: +SKIP
        (2, True)
    """
    import torch
    from torch import nn

    import vanishing
    from vanishing.experiments.pretrain import layerwise_pretrain
    from vanishing.experiments.train import minibatches, train

    if not 0 < short <= long:
        raise ValueError(f"need 0 < short <= long fine-tuning steps, got {short} and {long}")
    x, y, xt, yt = data
    net = build_net(depth, activation, seed=seed)
    reconstruction = []
    if pretrained:
        reconstruction = layerwise_pretrain(
            net, x, steps=pretrain_steps, lr=PRETRAIN_LR, batch_size=BATCH, seed=seed
        )
    measured: dict[int, tuple[float, float]] = {}

    def evaluate(step: int) -> None:
        net.eval()
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(net(x), y))
            error = float((net(xt).argmax(1) != yt).double().mean())
        measured[step + 1] = (loss, error)
        net.train()

    opt = torch.optim.SGD(net.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    log = train(
        net,
        minibatches(x, y, batch_size=BATCH, generator=g, replacement=True),
        nn.functional.cross_entropy,
        opt,
        steps=long,
        watch={"run_dir": run_dir, "stats": "parameters", "flush_every": max(1, min(long, 1000))},
        evaluate=evaluate,
        eval_every=short,
        stop_on_nonfinite=False,
    )
    run = vanishing.load_run(log.monitor.run_dir)
    grads = run.pivot("grad_norm", param="weight")
    hidden = [c for c in grads.columns if str(c) != str(len(net) - 1)]  # not the head
    early = grads.iloc[:FIRST_STEPS]
    return {
        "short_train_loss": measured[short][0],
        "short_test_error": measured[short][1],
        "long_train_loss": measured[long][0],
        "long_test_error": measured[long][1],
        "first_grad": float(early[hidden[0]].median()),
        "first_last": float((early[hidden[0]] / early[hidden[-1]]).median()),
        "reconstruction": reconstruction,
        "losses": run.steps["loss"].to_numpy(dtype=np.float64),
        "run_dir": Path(log.monitor.run_dir),
    }


def _name(depth: int, activation: str, pretrained: bool) -> str:
    return f"{activation}-{depth}{'-pretrained' if pretrained else ''}"


def reproduce(
    *, quick: bool = False, out=None, progress: Progress | None = None, seed: int = 0
) -> Reproduction:
    """Run the five nets of :data:`CONFIGS` for each seed and compare them.

    Default: 3 seeds, 600 pretraining steps per layer, fine-tuning read at 300 and 1500 steps
    (about 2-3 min on 2 busy cores); ``quick``: 1 seed, 200 pretraining steps, 300 and 1200
    fine-tuning steps; its depth check compares training losses (one seed's test errors on
    359 images are too noisy for it). Writes the run directories (``sigmoid-6-pretrained/
    seed-00``, ...), ``pretraining.png/svg`` (training loss vs step) and ``pretraining.json``.

    Example:
        >>> r = reproduce(quick=True)        # doctest: +SKIP
        >>> [c.ok for c in r.checks]         # doctest: +SKIP
        [True, True, True, True, True]
    """
    from vanishing.experiments.data import digits

    out = check_out(out, "pretraining")
    budget = QUICK if quick else DEFAULT
    data = digits()
    results: dict[tuple[int, str, bool], list[dict[str, Any]]] = {}
    total, done = len(CONFIGS) * budget["seeds"], 0
    with one_thread():
        for s in range(budget["seeds"]):
            for depth, act, pre in CONFIGS:
                r = run_config(
                    depth,
                    act,
                    pre,
                    data,
                    seed=seed * 1000 + s,
                    short=budget["short"],
                    long=budget["long"],
                    pretrain_steps=budget["pretrain_steps"],
                    run_dir=out / _name(depth, act, pre) / f"seed-{s:02d}",
                )
                results.setdefault((depth, act, pre), []).append(r)
                done += 1
                if progress is not None:
                    progress(done, total)
    keys = ("short_train_loss", "short_test_error", "long_train_loss", "long_test_error",
            "first_grad", "first_last")  # fmt: skip
    m = {c: {k: float(np.mean([r[k] for r in rs])) for k in keys} for c, rs in results.items()}
    checks = _checks(m, budget)
    table = Table(
        f"Digits, width {WIDTH}, SGD lr {LR}, batch {BATCH}, mean of {budget['seeds']} seed"
        f"{'s' if budget['seeds'] > 1 else ''}",
        ["net", f"train loss @{budget['short']}", f"test err @{budget['short']}",
         f"train loss @{budget['long']}", f"test err @{budget['long']}",
         f"first-layer |dL/dW| (median, first {FIRST_STEPS} steps)", "first / last"],
        [[_name(*c), *(m[c][k] for k in keys)] for c in CONFIGS],
    )  # fmt: skip
    plots = save_figure(_plot(results, budget), out, "pretraining")
    no, pre, relu = (DEEP, "sigmoid", False), (DEEP, "sigmoid", True), (DEEP, "relu", False)
    summary = (
        f"After {budget['short']} fine-tuning steps the {DEEP}-layer sigmoid net has test error "
        f"{m[pre]['short_test_error']:.3f} with greedy pretraining and "
        f"{m[no]['short_test_error']:.3f} without (training loss {m[pre]['short_train_loss']:.3f} "
        f"vs {m[no]['short_train_loss']:.3f}); a ReLU net with He init reaches "
        f"{m[relu]['short_test_error']:.3f} without any pretraining, and after "
        f"{budget['long']} steps the sigmoid gap is {m[no]['long_test_error'] - m[pre]['long_test_error']:+.3f}."
    )
    result = Reproduction(
        name="pretraining",
        title=TITLE,
        citation=CITATION,
        checks=checks,
        tables=[table],
        plots=plots,
        out=out,
        quick=quick,
        settings={
            **budget,
            "seed": seed,
            "width": WIDTH,
            "depths": [DEEP, SHALLOW],
            "fine_tune": f"SGD lr {LR}, batch {BATCH} drawn with replacement",
            "pretrain": f"layerwise_pretrain: linear decoder, MSE, SGD lr {PRETRAIN_LR} "
            f"momentum 0.9, batch {BATCH}",
            "init": "sigmoid: N(0, 16/fan_in); relu: He normal",
            "reconstruction": {
                _name(*c): [r["reconstruction"] for r in rs] for c, rs in results.items() if c[2]
            },
        },
        summary=summary,
    )
    (out / "pretraining.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _checks(m, budget) -> list[Check]:
    short, long = budget["short"], budget["long"]
    no, pre, relu = (DEEP, "sigmoid", False), (DEEP, "sigmoid", True), (DEEP, "relu", False)
    sno, spre = (SHALLOW, "sigmoid", False), (SHALLOW, "sigmoid", True)
    gain_deep = m[no]["short_test_error"] - m[pre]["short_test_error"]
    gain_shallow = m[sno]["short_test_error"] - m[spre]["short_test_error"]
    gain_long = m[no]["long_test_error"] - m[pre]["long_test_error"]
    return [
        Check.holds(
            f"{DEEP}-layer sigmoid net, test error after {short} steps: pretrained vs not",
            published="pretrained lower (Bengio et al. 2007, Table 1)",
            measured=f"{m[pre]['short_test_error']:.4f} vs {m[no]['short_test_error']:.4f}",
            ok=m[pre]["short_test_error"] < m[no]["short_test_error"],
            tolerance="pretrained < not pretrained",
        ),
        Check.holds(
            f"{DEEP}-layer sigmoid net, training loss after {short} steps: pretrained vs not",
            published="pretrained lower (starts nearer a good solution)",
            measured=f"{m[pre]['short_train_loss']:.4f} vs {m[no]['short_train_loss']:.4f}",
            ok=m[pre]["short_train_loss"] < 0.8 * m[no]["short_train_loss"],
            tolerance="pretrained < 0.8 x not pretrained",
        ),
        _depth_check(m, budget, gain_deep, gain_shallow),
        Check.holds(
            f"{DEEP}-layer sigmoid net, first-layer weight gradient over the first "
            f"{FIRST_STEPS} steps: pretrained vs not (monitor)",
            published="larger (expected: pretrained lower layers get a usable gradient)",
            measured=f"{m[pre]['first_grad']:.3g} vs {m[no]['first_grad']:.3g}",
            ok=m[pre]["first_grad"] > m[no]["first_grad"],
            tolerance="pretrained > not pretrained",
        ),
        Check.holds(
            f"ReLU + He, not pretrained, vs pretrained sigmoid: test error after {short} steps",
            published="(modern practice) no pretraining needed",
            measured=f"{m[relu]['short_test_error']:.4f} vs {m[pre]['short_test_error']:.4f}",
            # 0.01 = 3.6 of 359 test images: "as well" allows that much seed noise
            ok=m[relu]["short_test_error"] <= m[pre]["short_test_error"] + 0.01,
            tolerance="ReLU <= pretrained sigmoid + 0.01",
        ),
        Check.holds(
            f"test-error advantage of pretraining at depth {DEEP} after {long} steps",
            published="persists (Erhan et al. 2010: a regulariser); here expected to close",
            measured=f"{gain_long:+.4f} (after {short} steps: {gain_deep:+.4f})",
            # closes: less than half the short-budget advantage, and under 1 point
            ok=gain_long < 0.5 * gain_deep and gain_long < 0.01,
            tolerance=f"< half the advantage at {short} steps and < 0.01",
        ),
    ]


def _depth_check(m, budget, gain_deep, gain_shallow) -> Check:
    short = budget["short"]
    if budget["seeds"] >= 3:
        return Check.holds(
            f"test-error advantage of pretraining after {short} steps: depth {DEEP} vs {SHALLOW}",
            published="grows with depth (Erhan et al. 2010)",
            measured=f"{gain_deep:+.4f} vs {gain_shallow:+.4f}",
            ok=gain_deep > gain_shallow,
            tolerance=f"advantage at {DEEP} > advantage at {SHALLOW}",
        )

    def rel(depth: int) -> float:
        a, b = m[depth, "sigmoid", False], m[depth, "sigmoid", True]
        return 1 - b["short_train_loss"] / a["short_train_loss"]

    return Check.holds(
        f"relative training-loss advantage of pretraining after {short} steps: depth {DEEP} "
        f"vs {SHALLOW} (quick: one seed)",
        published="grows with depth (Erhan et al. 2010, test error)",
        measured=f"{rel(DEEP):+.3f} vs {rel(SHALLOW):+.3f} (test error: {gain_deep:+.4f} vs "
        f"{gain_shallow:+.4f})",
        ok=rel(DEEP) > rel(SHALLOW),
        tolerance=f"advantage at {DEEP} > advantage at {SHALLOW}",
    )


def _plot(results, budget):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.8, 4.2), layout="constrained")
    ax = fig.subplots()
    window = 25
    kernel = np.ones(window) / window
    for c, rs in results.items():
        curve = np.convolve(np.mean([r["losses"] for r in rs], axis=0), kernel, mode="valid")
        style = "-" if c[0] == DEEP else ":"
        ax.plot(np.arange(len(curve)) + window - 1, curve, style, label=_name(*c))
    ax.axvline(budget["short"], color="grey", linewidth=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("training loss (minibatch, smoothed)")
    ax.set_title("Fine-tuning after greedy layer-wise pretraining (digits)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return fig
