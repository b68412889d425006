"""Degradation and residual learning (He, Zhang, Ren, Sun 2016, Figs. 1 and 4, Table 2), scaled down.

The paper's finding: a deeper *plain* net, batch-normalised so that its gradients do not
vanish, reaches a *higher* training error than a shallower one (CIFAR-10, Fig. 1: 56 layers
worse than 20; ImageNet, Fig. 4 and Table 2: plain-34 worse than plain-18), while the same nets
with identity shortcuts get better with depth and beat their plain counterparts.

Scaled down to scikit-learn's digits (1438 training images of 64 pixels) with fully connected
blocks in the layout of the paper's CIFAR nets (``6n + 2`` layers there; ``2n + 2`` here): a
stem Linear -> BN -> ReLU (64 -> width), ``n`` basic blocks Linear -> BN -> ReLU -> Linear -> BN,
plus the block's input for the residual net (option A: identity, all widths equal), then ReLU,
and a Linear head. Depths 8, 20, 32, 56 (``n`` = 3, 9, 15, 27) of equal width, He-normal
initialisation, SGD with momentum 0.9, weight decay 1e-4, batch 128, learning rate 0.1 divided
by 10 at 3/4 of the steps (the paper's recipe, shortened). Every net trains under
:func:`vanishing.watch`; the per-layer gradient norms at initialisation are read back from the
recorded run. The training error is that of the trained net (eval mode) on the whole training
set. See docs/reproductions/resnet.md.
"""

from __future__ import annotations

import json
from collections import OrderedDict
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

__all__ = [
    "TITLE",
    "CITATION",
    "blocks_for_depth",
    "build_net",
    "train_net",
    "first_last_gradient",
    "reproduce",
]

TITLE = "Deep residual learning: deeper plain nets train worse, residual nets do not"
CITATION = (
    "He, Zhang, Ren, Sun 2016, Deep Residual Learning for Image Recognition, CVPR, Fig. 1 "
    "(CIFAR-10 plain-20 vs plain-56 training error), Fig. 4 and Table 2 (plain vs ResNet "
    "18/34 on ImageNet), scaled down to digits"
)

DEPTHS = (8, 20, 32, 56)
QUICK_DEPTHS = (8, 32)
WIDTH = 32
STEPS, QUICK_STEPS = 600, 300
SEEDS, QUICK_SEEDS = 2, 1
LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.1, 0.9, 1e-4, 128


def blocks_for_depth(depth: int) -> int:
    """Basic blocks of a net of ``depth`` weight layers: stem + 2 per block + head.

    Example:
        >>> from vanishing.experiments.reproductions.resnet import blocks_for_depth
        >>> [blocks_for_depth(d) for d in (8, 20, 32, 56)]
        [3, 9, 15, 27]
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 4 or depth % 2:
        raise ValueError(f"depth must be an even integer >= 4 (2 + 2 per block), got {depth!r}")
    return (depth - 2) // 2


def _block_class():
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        """Linear -> BN -> ReLU -> Linear -> BN, (+ input), ReLU: the paper's basic block."""

        def __init__(self, width: int, residual: bool) -> None:
            super().__init__()
            self.linear1 = nn.Linear(width, width, bias=False)  # BN's shift replaces a bias
            self.norm1 = nn.BatchNorm1d(width)
            self.linear2 = nn.Linear(width, width, bias=False)
            self.norm2 = nn.BatchNorm1d(width)
            self.residual = residual

        def forward(self, x: Tensor) -> Tensor:
            h = self.norm2(self.linear2(torch.relu(self.norm1(self.linear1(x)))))
            return torch.relu(x + h if self.residual else h)

    return BasicBlock


def build_net(
    depth: int, *, residual: bool, width: int = WIDTH, n_in: int = 64, n_out: int = 10
) -> nn.Sequential:
    """A plain or residual net of ``depth`` weight layers, He-normal, from torch's global RNG.

    Layers: ``stem.linear/norm/act``, ``blocks.{i}.linear1/norm1/linear2/norm2``, ``head``.
    Plain and residual nets have exactly the same parameters; only the forward pass differs.

    Example:
        >>> from vanishing.experiments.reproductions.resnet import build_net
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = build_net(8, residual=True, width=16)
        >>> len(net.blocks), net(torch.randn(4, 64)).shape
        (3, torch.Size([4, 10]))
        >>> sum(p.numel() for p in net.parameters()) == sum(
        ...     p.numel() for p in build_net(8, residual=False, width=16).parameters())
        True
    """
    from torch import nn

    n_blocks = blocks_for_depth(depth)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    block = _block_class()
    stem = nn.Sequential(
        OrderedDict(
            linear=nn.Linear(n_in, width, bias=False), norm=nn.BatchNorm1d(width), act=nn.ReLU()
        )
    )
    net = nn.Sequential(
        OrderedDict(
            stem=stem,
            blocks=nn.Sequential(*[block(width, residual) for _ in range(n_blocks)]),
            head=nn.Linear(width, n_out),
        )
    )
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear) and name != "head":
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def train_net(
    depth: int,
    residual: bool,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    steps: int,
    seed: int,
    run_dir: str | Path,
    width: int = WIDTH,
) -> dict[str, Any]:
    """Train one net under :func:`vanishing.watch` and measure it.

    Returns ``{"train_error", "train_loss", "test_error", "run_dir", "losses"}``: errors and
    the cross-entropy on the whole training / test split after training (eval mode), the
    minibatch losses as recorded by the monitor, and where the run went.

    Example:
        >>> from vanishing.experiments.reproductions.resnet import train_net
        >>> import tempfile
        >>> from vanishing.experiments.data import digits
        >>> r = train_net(8, True, digits(), steps=3, seed=0, run_dir=tempfile.mkdtemp() + "/r")  # doctest: +SKIP
        >>> sorted(r), len(r["losses"])  # doctest: +SKIP
        (['losses', 'run_dir', 'test_error', 'train_error', 'train_loss'], 3)
    """
    import torch
    from torch import nn

    import vanishing
    from vanishing.experiments.train import minibatches, train

    x, y, xt, yt = data
    torch.manual_seed(seed)
    net = build_net(depth, residual=residual, width=width, n_in=x.shape[1])
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    # the paper divides the learning rate by 10 twice late in training; once here, at 3/4
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, (3 * steps) // 4)], 0.1)
    batches = minibatches(x, y, batch_size=BATCH, generator=torch.Generator().manual_seed(seed))
    watch = {"run_dir": run_dir, "stats": "parameters", "flush_every": max(1, min(steps, 1000))}
    log = train(
        net,
        batches,
        nn.functional.cross_entropy,
        opt,
        steps=steps,
        watch=watch,
        schedule=schedule,
        stop_on_nonfinite=False,
    )
    net.eval()
    with torch.no_grad():
        out, out_t = net(x), net(xt)
        result = {
            "train_error": float((out.argmax(1) != y).double().mean()),
            "train_loss": float(nn.functional.cross_entropy(out, y)),
            "test_error": float((out_t.argmax(1) != yt).double().mean()),
        }
    run_dir = Path(log.monitor.run_dir)
    losses = vanishing.load_run(run_dir).steps["loss"].to_numpy(dtype=np.float64)
    return {**result, "run_dir": run_dir, "losses": losses}


def first_last_gradient(run_dir: str | Path, step: int = 0) -> float:
    """``||dL/dW||`` of the first hidden Linear over the last one's at ``step``, from the run.

    The weight-gradient norms are the monitor's ``grad_norm`` rows of the ``Linear`` layers
    (stem and blocks; not the head) in forward order.

    Example:
        >>> first_last_gradient("runs/reproduce-resnet/plain-56/seed-00")  # doctest: +SKIP
        19300.0
    """
    import vanishing

    table = vanishing.load_run(run_dir).pivot("grad_norm", param="weight")
    linears = [c for c in table.columns if "linear" in str(c)]
    if len(linears) < 2:
        raise ValueError(f"{run_dir}: fewer than two hidden Linear layers were recorded")
    row = table.loc[step]
    return float(row[linears[0]] / row[linears[-1]])


def reproduce(
    *, quick: bool = False, out=None, progress: Progress | None = None, seed: int = 0
) -> Reproduction:
    """Train plain and residual nets at each depth and compare their training errors.

    Default: depths 8, 20, 32, 56, 2 seeds, 600 steps (about 1-2 min on 2 busy cores);
    ``quick``: depths 8 and 32, 1 seed, 300 steps (about 15 s), with the checks that two depths
    allow. Writes one run directory per net (``plain-56/seed-00``, ...), ``training.png/svg``
    (training loss vs step, cf. Figs. 1 and 4) and ``resnet.json`` into ``out``.

    Example:
        >>> r = reproduce(quick=True)        # doctest: +SKIP
        >>> r.ok                             # doctest: +SKIP
        True
    """
    from vanishing.experiments.data import digits

    out = check_out(out, "resnet")
    depths, steps, seeds = (
        (QUICK_DEPTHS, QUICK_STEPS, QUICK_SEEDS) if quick else (DEPTHS, STEPS, SEEDS)
    )
    data = digits()
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    total, done = 2 * len(depths) * seeds, 0
    with one_thread():
        for depth in depths:
            for kind in ("plain", "resnet"):
                for s in range(seeds):
                    r = train_net(
                        depth,
                        kind == "resnet",
                        data,
                        steps=steps,
                        seed=seed * 1000 + s,
                        run_dir=out / f"{kind}-{depth}" / f"seed-{s:02d}",
                    )
                    r["grad_ratio_init"] = first_last_gradient(r["run_dir"], 0)
                    runs.setdefault((kind, depth), []).append(r)
                    done += 1
                    if progress is not None:
                        progress(done, total)
    m = {
        key: {
            k: float(np.mean([r[k] for r in rs]))
            for k in ("train_error", "train_loss", "test_error")
        }
        for key, rs in runs.items()
    }
    for key, rs in runs.items():
        # a geometric mean: the ratio spans orders of magnitude
        m[key]["grad_ratio_init"] = float(
            np.exp(np.mean([np.log(r["grad_ratio_init"]) for r in rs]))
        )
    checks = _checks(depths, m)
    table = Table(
        f"Training and test error on digits after {steps} steps (mean of {seeds} seed"
        f"{'s' if seeds > 1 else ''}, width {WIDTH})",
        ["depth", "plain train err", "ResNet train err", "plain train loss", "ResNet train loss",
         "plain test err", "ResNet test err", "plain |g1|/|gL| init", "ResNet |g1|/|gL| init"],
        [
            [d, m["plain", d]["train_error"], m["resnet", d]["train_error"],
             m["plain", d]["train_loss"], m["resnet", d]["train_loss"],
             m["plain", d]["test_error"], m["resnet", d]["test_error"],
             m["plain", d]["grad_ratio_init"], m["resnet", d]["grad_ratio_init"]]
            for d in depths
        ],
    )  # fmt: skip
    plots = save_figure(_plot(depths, runs, steps), out, "training")
    lo, hi = depths[0], depths[-1]
    summary = (
        f"Plain nets with batch norm train worse as they get deeper (training error "
        f"{m['plain', lo]['train_error']:.4f} at depth {lo}, {m['plain', hi]['train_error']:.4f} "
        f"at {hi}) although their gradients do not vanish (at init the first layer's is "
        f"{m['plain', hi]['grad_ratio_init']:.3g} times the last one's); the same nets with "
        f"identity shortcuts reach {m['resnet', lo]['train_error']:.4f} and "
        f"{m['resnet', hi]['train_error']:.4f}."
    )
    result = Reproduction(
        name="resnet",
        title=TITLE,
        citation=CITATION,
        checks=checks,
        tables=[table],
        plots=plots,
        out=out,
        quick=quick,
        settings={
            "data": "digits (scikit-learn), 1438 train / 359 test, standardised",
            "depths": list(depths),
            "width": WIDTH,
            "steps": steps,
            "seeds": seeds,
            "seed": seed,
            "optimizer": f"SGD lr {LR} (/10 at 3/4 of the steps), momentum {MOMENTUM}, "
            f"weight decay {WEIGHT_DECAY}, batch {BATCH}",
            "init": "He normal",
            "runs": {f"{k}-{d}": [str(r["run_dir"]) for r in rs] for (k, d), rs in runs.items()},
        },
        summary=summary,
    )
    (out / "resnet.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _checks(depths, m) -> list[Check]:
    lo, hi = depths[0], depths[-1]
    err = {key: v["train_error"] for key, v in m.items()}
    loss = {key: v["train_loss"] for key, v in m.items()}
    plain = [err["plain", d] for d in depths]
    checks = []
    if 20 in depths and 56 in depths:
        checks.append(
            Check.above(
                "plain-56 minus plain-20 training error (Fig. 1)",
                published="> 0 (CIFAR-10: 56-layer higher)",
                measured=err["plain", 56] - err["plain", 20],
                limit=0.05,
            )
        )
    checks.append(
        Check.holds(
            "plain nets' training error rises with depth",
            published="rises (Fig. 1, Fig. 4 left)",
            measured=", ".join(f"{d}: {e:.4f}" for d, e in zip(depths, plain)),
            # a fall of up to 0.005 (7 of 1438 images) between neighbours is noise; the
            # deepest must be worse than the shallowest by 2 points
            ok=all(b >= a - 0.005 for a, b in zip(plain, plain[1:]))
            and plain[-1] > plain[0] + 0.02,
            tolerance="each depth >= previous - 0.005; deepest > shallowest + 0.02",
        )
    )
    deep = [d for d in depths if d >= 20]
    checks.append(
        Check.holds(
            "ResNet beats plain at every depth >= 20 (training error and loss)",
            published="ResNet lower at every depth (Fig. 4, Table 2)",
            measured="; ".join(
                f"{d}: err {err['resnet', d]:.4f} vs {err['plain', d]:.4f}, loss "
                f"{loss['resnet', d]:.3g} vs {loss['plain', d]:.3g}"
                for d in deep
            ),
            ok=all(
                err["resnet", d] <= err["plain", d] and loss["resnet", d] <= loss["plain", d] / 2
                for d in deep
            ),
            tolerance="ResNet error <= plain's and ResNet loss <= half of plain's",
        )
    )
    base = 20 if 20 in depths and hi != 20 else lo
    checks.append(
        Check.below(
            f"ResNet-{hi} minus ResNet-{base} training error",
            published="<= 0 (deeper ResNet at least as good: Fig. 4 right, Table 2)",
            measured=err["resnet", hi] - err["resnet", base],
            # 0.01 = 14 of 1438 images: the step budget is the same for every depth, and the
            # deepest net is the last to converge
            limit=0.01,
        )
    )
    if hi >= 32:
        checks.append(
            Check.above(
                f"plain-{hi} test error over plain-{base}'s",
                published="> 1 (Table 2: plain-34 28.54 % vs plain-18 27.94 % top-1)",
                measured=m["plain", hi]["test_error"] / max(m["plain", base]["test_error"], 1e-9),
                limit=1.0,
            )
        )
        checks.append(
            Check.above(
                f"plain-{hi}: first / last hidden layer weight-gradient norm at init (monitor)",
                published="not vanishing: 'healthy norms with BN' (Sec. 4.1)",
                measured=m["plain", hi]["grad_ratio_init"],
                limit=0.1,
            )
        )
    return checks


def _plot(depths, runs, steps):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    window = max(1, steps // 30)
    kernel = np.ones(window) / window
    for ax, kind in zip(axes, ("plain", "resnet")):
        for depth in depths:
            curve = np.mean([r["losses"] for r in runs[kind, depth]], axis=0)
            smooth = np.convolve(curve, kernel, mode="valid")
            ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=f"{kind}-{depth}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{'plain' if kind == 'plain' else 'ResNet'} (cf. Fig. 4)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("training loss (minibatch, smoothed)")
    fig.suptitle(
        "Digits, fully connected basic blocks with batch norm, same width and steps", fontsize=11
    )
    return fig
