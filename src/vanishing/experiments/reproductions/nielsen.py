"""Nielsen's "speed of learning" experiment (Neural Networks and Deep Learning, chapter 5).

Faithful to his ``network2.py`` and ``generate_gradient.py``:

- sizes ``[n_in, 30, ..., 30, 10]`` with 2, 3 and 4 hidden layers, sigmoid in every layer
  including the output;
- weights ~ N(0, 1/n_in) (his ``default_weight_initializer`` divides N(0, 1) draws by the square
  root of the layer's number of inputs), biases ~ N(0, 1);
- cross-entropy cost ``C = -(1/n) sum_x sum_j [y_j ln a_j + (1 - y_j) ln(1 - a_j)]`` with one-hot
  ``y``, plus ``(lambda / 2n) sum w^2`` over the weights (not the biases);
- full-batch gradient descent on the first ``n = 1000`` training examples, ``eta = 0.1``,
  ``lambda = 5``, 500 steps; his update ``w -> (1 - eta lambda / n) w - eta dC0/dw``,
  ``b -> b - eta dC0/db`` is ``torch.optim.SGD(lr=eta)`` with ``weight_decay = lambda / n`` on a
  parameter group holding only the weights;
- the speed of learning of hidden layer ``l`` is ``||dC/db_l||``, the norm of the batch-averaged
  bias gradient, taken before each update (so step 0 is the initialisation and the last recorded
  step is the gradient that drives the last update, as in his plots).

Every net trains under :func:`vanishing.watch` and the speeds are read back from the recorded run
(the ``grad_norm`` of the ``bias`` rows of the hidden ``Linear`` layers). Data: scikit-learn's
8x8 digits by default (pixels / 16, so in [0, 1] like his MNIST pixels; 64 inputs), or MNIST from
local IDX files (pixels / 255, 784 inputs). See docs/reproductions.md for the numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vanishing.experiments.reproductions.base import Check, Reproduction, one_thread
from vanishing.experiments.reproductions.base import Table as ResultTable

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure
    from torch import Tensor, nn

__all__ = [
    "TITLE",
    "CITATION",
    "ETA",
    "LMBDA",
    "N_TRAIN",
    "STEPS",
    "SEEDS",
    "WIDTH",
    "HIDDEN_LAYERS",
    "REFERENCE",
    "NetResult",
    "NielsenResult",
    "load_data",
    "check_out",
    "build_net",
    "cost",
    "make_optimizer",
    "train_net",
    "speeds_from_run",
    "reproduce",
    "plot_speeds",
    "checks",
]

TITLE = "Nielsen: the speed of learning of each hidden layer of deep sigmoid nets"
CITATION = (
    "M. Nielsen, Neural Networks and Deep Learning (2015), chapter 5, 'The vanishing gradient "
    "problem': the speeds of learning at initialisation quoted in the text and the speed-vs-epoch "
    "figures (network2.py, generate_gradient.py)"
)

ETA = 0.1  # learning rate
LMBDA = 5.0  # L2 regularisation parameter lambda
N_TRAIN = 1000  # the first 1000 training examples, one full batch
STEPS = 500  # gradient descent steps ("epochs" of one full-batch step each)
SEEDS = 10  # independent initialisations; medians are taken over them
QUICK_SEEDS, QUICK_STEPS = 3, 60  # ``quick=True``: the speeds at init need no long training
#: the published speeds are one MNIST run each; ours are medians on digits (or MNIST): a factor
#: of 2 either way covers seed-to-seed spread (the 25-75 % band spans about x1.5) and the data
FACTOR = 2.0
WIDTH = 30  # units per hidden layer
HIDDEN_LAYERS = (2, 3, 4)  # the three nets of the chapter

#: Nielsen's published speeds at initialisation (MNIST, one run each), per hidden layer, as the
#: text of chapter 5 quotes them (neuralnetworksanddeeplearning.com/chap5.html): "0.07... and
#: 0.31...", "0.012, 0.060, and 0.283", "0.003, 0.017, 0.070, and 0.285".
REFERENCE: dict[tuple[int, ...], tuple[float, ...]] = {
    (784, 30, 30, 10): (0.07, 0.31),
    (784, 30, 30, 30, 10): (0.012, 0.060, 0.283),
    (784, 30, 30, 30, 30, 10): (0.003, 0.017, 0.070, 0.285),
}


def load_data(
    data_dir: str | os.PathLike | None = None, *, n: int = N_TRAIN, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, str]:
    """The first ``n`` training examples as ``(x, y_onehot, name)``: x in [0, 1], shape (n, n_in).

    Without ``data_dir``: scikit-learn's bundled digits in their stored order, pixels / 16
    (64 inputs). With it: MNIST from the IDX files there (see
    :func:`vanishing.experiments.idx.load_mnist`), pixels / 255 (784 inputs). ``y_onehot`` is the
    one-hot target over 10 classes. Raises ``ValueError`` for unreadable data or fewer than
    ``n`` examples.

    Example:
        >>> from vanishing.experiments.reproductions.nielsen import load_data
        >>> x, y, name = load_data()
        >>> tuple(x.shape), tuple(y.shape), name, float(x.min()), float(x.max())
        ((1000, 64), (1000, 10), 'digits', 0.0, 1.0)
    """
    if data_dir is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels, scale, name = digits.data, digits.target, 16.0, "digits"
        where = "scikit-learn's digits"
    else:
        from vanishing.experiments.idx import load_mnist

        images, labels, _, _ = load_mnist(data_dir)
        scale, name, where = 255.0, "mnist", f"the MNIST training set in {data_dir}"
    if len(images) < n:
        raise ValueError(
            f"Nielsen's experiment trains on the first {n} examples, but {where} has only "
            f"{len(images)}"
        )
    labels = np.asarray(labels[:n]).astype(np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(
            f"labels of {where} must be digits 0-9, found {labels.min()}..{labels.max()}"
        )
    import torch  # after the data checks: a bad --data-dir fails fast

    dtype = dtype or torch.get_default_dtype()
    x = torch.as_tensor(np.asarray(images[:n], dtype=np.float64).reshape(n, -1) / scale)
    y = torch.nn.functional.one_hot(torch.as_tensor(labels), 10)
    return x.to(dtype), y.to(dtype), name


def build_net(
    sizes: list[int] | tuple[int, ...], *, seed: int, dtype: torch.dtype | None = None
) -> nn.Sequential:
    """Nielsen's network: Linear -> Sigmoid for every layer of ``sizes``, output included.

    Weights ~ N(0, 1/n_in) of the layer, biases ~ N(0, 1), drawn from a generator seeded with
    ``seed`` (biases first, then weights, as his ``default_weight_initializer``).

    Example:
        >>> from vanishing.experiments.reproductions.nielsen import build_net
        >>> net = build_net([64, 30, 30, 10], seed=0)
        >>> [type(m).__name__ for m in net]
        ['Linear', 'Sigmoid', 'Linear', 'Sigmoid', 'Linear', 'Sigmoid']
        >>> round(float(net[0].weight.detach().std() * 8), 1)   # std 1/sqrt(64)
        1.0
    """
    import torch
    from torch import nn

    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive layer sizes, got {list(sizes)}")
    dtype = dtype or torch.get_default_dtype()
    g = torch.Generator().manual_seed(int(seed))
    pairs = list(zip(sizes[:-1], sizes[1:]))
    biases = [torch.randn(n_out, generator=g, dtype=torch.float64) for _, n_out in pairs]
    weights = [
        torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)
        for n_in, n_out in pairs
    ]
    layers: list[nn.Module] = []
    for (n_in, n_out), w, b in zip(pairs, weights, biases):
        linear = nn.Linear(n_in, n_out, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        layers += [linear, nn.Sigmoid()]
    return nn.Sequential(*layers)


def cost(output: Tensor, y_onehot: Tensor) -> Tensor:
    """Nielsen's cross-entropy cost averaged over the batch (the L2 term is the optimizer's).

    ``C0 = -(1/n) sum_x sum_j [y_j ln a_j + (1 - y_j) ln(1 - a_j)]``.

    Example:
        >>> import torch
        >>> from vanishing.experiments.reproductions.nielsen import cost
        >>> a, y = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])
        >>> round(float(cost(a, y)), 4)   # 2 ln 2
        1.3863
    """
    from torch.nn import functional as F

    return F.binary_cross_entropy(output, y_onehot, reduction="sum") / len(output)


def make_optimizer(
    model: nn.Module, *, eta: float = ETA, lmbda: float = LMBDA, n: int = N_TRAIN
) -> torch.optim.SGD:
    """His update as plain SGD: ``w -> (1 - eta lmbda / n) w - eta g``, ``b -> b - eta g``.

    ``SGD(lr=eta, weight_decay=lmbda / n)`` applies ``w - eta (g + (lmbda / n) w)``, which is
    the same; the biases sit in a second parameter group without weight decay because his L2
    term leaves them out.

    Example:
        >>> from vanishing.experiments.reproductions.nielsen import build_net, make_optimizer
        >>> opt = make_optimizer(build_net([4, 3, 2], seed=0))
        >>> [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
        [(2, 0.005), (2, 0.0)]
    """
    import torch

    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return torch.optim.SGD(
        [
            {"params": weights, "weight_decay": lmbda / n},
            {"params": biases, "weight_decay": 0.0},
        ],
        lr=eta,
    )


def speeds_from_run(run_dir: str | os.PathLike) -> np.ndarray:
    """Speed of learning ``||dC/db_l||`` per recorded step and hidden layer, read from a run.

    The hidden layers and where each one's speed is read are those of
    :mod:`vanishing.recorder.semantics` (here: every ``Linear`` but the output layer, at its
    bias), as in every other view of a run. Returns an array of shape
    ``(recorded steps, hidden layers)``.

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.reproductions.nielsen import load_data, train_net, speeds_from_run
        >>> x, y, _ = load_data()
        >>> run_dir = train_net([64, 30, 30, 10], x, y, seed=0, steps=3, run_dir=tempfile.mkdtemp() + "/r")
        >>> speeds_from_run(run_dir).shape
        (3, 2)
    """
    from vanishing.recorder.reader import load_run

    return load_run(run_dir).speeds().to_numpy(dtype=np.float64)


def train_net(
    sizes: list[int] | tuple[int, ...],
    x: Tensor,
    y_onehot: Tensor,
    *,
    seed: int,
    steps: int = STEPS,
    run_dir: str | os.PathLike,
    eta: float = ETA,
    lmbda: float = LMBDA,
) -> Path:
    """Train one of Nielsen's nets by full-batch gradient descent under :func:`vanishing.watch`
    (the package's one loop, :func:`vanishing.experiments.train.train`).

    Every step is recorded (per-parameter statistics only: the speeds need just the bias
    gradients). Torch runs on one thread meanwhile (restored after). Returns the run directory;
    read the speeds with :func:`speeds_from_run`.

    Example:
        >>> import tempfile, vanishing
        >>> from vanishing.experiments.reproductions.nielsen import load_data, train_net
        >>> x, y, _ = load_data()
        >>> run_dir = train_net([64, 30, 30, 10], x, y, seed=0, steps=4, run_dir=tempfile.mkdtemp() + "/r")
        >>> vanishing.load_run(run_dir).steps["step"].tolist()
        [0, 1, 2, 3]
    """
    import torch

    from vanishing.experiments.train import minibatches, train

    if int(sizes[0]) != x.shape[1]:
        raise ValueError(f"sizes[0] = {sizes[0]} but the data have {x.shape[1]} inputs")
    model = build_net(sizes, seed=seed, dtype=x.dtype)
    opt = make_optimizer(model, eta=eta, lmbda=lmbda, n=len(x))
    full_batch = minibatches(x, y_onehot, batch_size=0, generator=torch.Generator())
    watch = {"run_dir": run_dir, "stats": "parameters", "flush_every": max(1, min(steps, 1000))}
    with one_thread():
        # his loop has no divergence check: the costs are read once, at the end
        log = train(model, full_batch, cost, opt, steps=steps, watch=watch, stop_on_nonfinite=False)
    return Path(log.monitor.run_dir)


@dataclass
class NetResult:
    """One net's speeds of learning, medians over seeds.

    ``curves`` is ``(steps, hidden layers)``: the median speed per step; ``init`` is its first
    row, ``final`` its last (the gradient of the last update); ``spread`` holds the 25th and 75th
    percentiles over seeds, ``(2, steps, hidden layers)``.

    Example:
        >>> import numpy as np
        >>> from vanishing.experiments.reproductions.nielsen import NetResult
        >>> net = NetResult([64, 30, 30, 10], np.array([[0.01, 0.03], [0.002, 0.004]]), np.zeros((2, 2, 2)))
        >>> net.to_dict()
        {'sizes': [64, 30, 30, 10], 'init': [0.01, 0.03], 'final': [0.002, 0.004]}
    """

    sizes: list[int]
    curves: np.ndarray
    spread: np.ndarray
    run_dirs: list[Path] = field(default_factory=list)

    @property
    def init(self) -> list[float]:
        """Median speed of each hidden layer at initialisation (step 0)."""
        return [float(v) for v in self.curves[0]]

    @property
    def final(self) -> list[float]:
        """Median speed of each hidden layer at the last recorded step."""
        return [float(v) for v in self.curves[-1]]

    def to_dict(self) -> dict[str, Any]:
        """``{"sizes": [...], "init": [...], "final": [...]}``, JSON-serialisable."""
        return {"sizes": list(self.sizes), "init": self.init, "final": self.final}


@dataclass
class NielsenResult(Reproduction):
    """What :func:`reproduce` measured: one :class:`NetResult` per net, the checks against
    Nielsen's published speeds, and where it went (a :class:`~.base.Reproduction`).

    Example:
        >>> import numpy as np
        >>> from pathlib import Path
        >>> from vanishing.experiments.reproductions.nielsen import NetResult, NielsenResult
        >>> net = NetResult([64, 30, 10], np.array([[0.02], [0.01]]), np.zeros((2, 2, 1)))
        >>> NielsenResult(nets=[net], data="digits", seeds=1, steps=2).to_dict()["nets"]
        [{'sizes': [64, 30, 10], 'init': [0.02], 'final': [0.01]}]
    """

    name: str = "nielsen"
    title: str = TITLE
    citation: str = CITATION
    checks: list[Check] = field(default_factory=list)
    nets: list[NetResult] = field(default_factory=list)
    data: str = ""
    seeds: int = SEEDS
    steps: int = STEPS

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object: the reproduction's keys (name, checks, ...) and ``"nets"``:
        ``[{"sizes", "init", "final"}, ...]``."""
        return {**super().to_dict(), "nets": [net.to_dict() for net in self.nets]}


def checks(nets: list[NetResult]) -> list[Check]:
    """Nielsen's result as checks: in every net the speed at init rises with the layer index,
    the first/last ratio falls with depth, and each speed is within a factor of
    :data:`FACTOR` of the one he quotes for the same net and layer (MNIST).

    Example:
        >>> import numpy as np
        >>> from vanishing.experiments.reproductions.nielsen import NetResult, checks
        >>> net = NetResult([64, 30, 30, 10], np.array([[0.07, 0.31]]), np.zeros((2, 1, 2)))
        >>> [c.ok for c in checks([net])]
        [True, True, True, True]
    """
    out: list[Check] = []
    for net in nets:
        reference = REFERENCE.get((784, *net.sizes[1:]))
        out.append(
            Check.holds(
                f"{len(net.sizes) - 2} hidden layers: speed at init rises with the layer",
                published=" < ".join(f"{v:g}" for v in reference) if reference else "rises",
                measured=" < ".join(f"{v:.2g}" for v in net.init),
                ok=net.init == sorted(net.init),
                tolerance="increasing",
            )
        )
        for layer, (published, measured) in enumerate(zip(reference or (), net.init), 1):
            out.append(
                Check.factor(
                    f"{len(net.sizes) - 2} hidden layers: speed of layer {layer} at init",
                    published=published,
                    measured=measured,
                    factor=FACTOR,
                )
            )
    ratios = [net.init[0] / net.init[-1] for net in nets]
    published = [v[0] / v[-1] for v in REFERENCE.values()][: len(ratios)]
    out.append(
        Check.holds(
            "first / last speed at init falls with depth",
            published=" > ".join(f"{r:.2g}" for r in published),
            measured=" > ".join(f"{r:.2g}" for r in ratios),
            ok=all(a > b for a, b in zip(ratios, ratios[1:])),
            tolerance="decreasing",
        )
    )
    return out


def _default_out() -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"reproduce-nielsen-{stamp}"
    path, i = base, 1
    while path.exists():
        path = Path(f"{base}-{i}")
        i += 1
    return path


def check_out(out: str | os.PathLike | None) -> Path:
    """The directory :func:`reproduce` writes to: ``out``, or a new default one.

    Raises ``ValueError`` if ``out`` exists and is not an empty directory (nothing is ever
    overwritten).

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.reproductions.nielsen import check_out
        >>> check_out(tempfile.mkdtemp()).is_dir()     # an empty directory will do
        True
    """
    out = Path(out) if out is not None else _default_out()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory; pick a new --out")
    return out


def reproduce(
    *,
    quick: bool = False,
    seeds: int | None = None,
    steps: int | None = None,
    data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    hidden_layers: tuple[int, ...] = HIDDEN_LAYERS,
    progress: Callable[[int, int], None] | None = None,
    data: tuple[Tensor, Tensor, str] | None = None,
) -> NielsenResult:
    """Run the experiment: each net, ``seeds`` initialisations, ``steps`` full-batch steps
    (default 10 and 500; ``quick=True``: 3 and 60, the same checks, which concern the speeds
    at initialisation).

    Run directories go to ``out/<k>-hidden/seed-NN`` (default ``out``:
    ``runs/reproduce-nielsen-<date-time>``), the speed-vs-step plot to ``out/speed.png`` and
    ``out/speed.svg``, the numbers to ``out/nielsen.json``. ``progress(done, total)`` is called
    after each trained net. ``out`` must not exist or be an empty directory. ``data``: what
    :func:`load_data` returned, to use instead of loading from ``data_dir``.

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.reproductions.nielsen import reproduce
        >>> r = reproduce(seeds=2, steps=3, out=tempfile.mkdtemp() + "/nielsen")
        >>> [net.sizes for net in r.nets]
        [[64, 30, 30, 10], [64, 30, 30, 30, 10], [64, 30, 30, 30, 30, 10]]
        >>> deep = r.nets[-1].init                     # earlier layers learn slower
        >>> deep == sorted(deep)
        True
        >>> sorted(p.name for p in r.plots)
        ['speed.png', 'speed.svg']
    """
    seeds = (QUICK_SEEDS if quick else SEEDS) if seeds is None else seeds
    steps = (QUICK_STEPS if quick else STEPS) if steps is None else steps
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    out = check_out(out)
    x, y, name = data if data is not None else load_data(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    nets = _train_all(x, y, seeds, steps, out, hidden_layers, progress)
    result = NielsenResult(
        nets=nets,
        data=name,
        seeds=seeds,
        steps=steps,
        out=out,
        quick=quick,
        checks=checks(nets),
        settings={"data": name, "seeds": seeds, "steps": steps, "eta": ETA, "lambda": LMBDA},
    )
    result.tables.append(_result_table(result))
    deep = nets[-1]
    reference = REFERENCE.get((784, *deep.sizes[1:]))
    result.summary = (
        f"In the net with {len(deep.sizes) - 2} hidden layers the first learns "
        f"{deep.init[-1] / deep.init[0]:.3g}x slower than the last at initialisation"
        + (f" (Nielsen, MNIST: {reference[-1] / reference[0]:.3g}x)" if reference else "")
        + "; each layer back divides the speed by about 4 to 5: the sigmoid's derivative is at "
        "most 1/4."
    )
    figure = plot_speeds(result)
    for suffix in ("png", "svg"):
        path = out / f"speed.{suffix}"
        figure.savefig(path, dpi=120)
        result.plots.append(path)
    summary = {
        **result.to_dict(),
        "data": name,
        "seeds": seeds,
        "steps": steps,
        "eta": ETA,
        "lambda": LMBDA,
        "n_train": N_TRAIN,
        "reference_mnist_init": [list(v) for v in REFERENCE.values()],
    }
    (out / "nielsen.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _train_all(x, y, seeds, steps, out, hidden_layers, progress) -> list[NetResult]:
    total, done = len(hidden_layers) * seeds, 0
    nets: list[NetResult] = []
    for depth in hidden_layers:
        sizes = [x.shape[1], *([WIDTH] * depth), 10]
        per_seed, run_dirs = [], []
        for seed in range(seeds):
            run_dir = train_net(
                sizes,
                x,
                y,
                seed=seed,
                steps=steps,
                run_dir=out / f"{depth}-hidden" / f"seed-{seed:02d}",
            )
            run_dirs.append(run_dir)
            per_seed.append(speeds_from_run(run_dir))
            done += 1
            if progress is not None:
                progress(done, total)
        speeds = np.stack(per_seed)  # seeds x steps x hidden
        nets.append(
            NetResult(
                sizes=sizes,
                curves=np.median(speeds, axis=0),
                spread=np.percentile(speeds, [25, 75], axis=0),
                run_dirs=run_dirs,
            )
        )
    return nets


def plot_speeds(result: NielsenResult) -> Figure:
    """Speed of learning vs step, one panel per net, one line per hidden layer, log y.

    Lines are medians over seeds; the shaded band spans the 25th to 75th percentile. Returns a
    matplotlib ``Figure`` (no pyplot global state); save it with ``figure.savefig(path)``.

    Example:
        >>> fig = plot_speeds(result)          # doctest: +SKIP
        >>> fig.savefig("speed.png")           # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    n = len(result.nets)
    fig = Figure(figsize=(4.2 * n, 3.8), layout="constrained")
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for ax, net in zip(axes, result.nets):
        steps = np.arange(len(net.curves))
        for layer in range(net.curves.shape[1]):
            (line,) = ax.plot(steps, net.curves[:, layer], label=f"hidden layer {layer + 1}")
            if result.seeds > 1:
                ax.fill_between(
                    steps,
                    net.spread[0, :, layer],
                    net.spread[1, :, layer],
                    color=line.get_color(),
                    alpha=0.15,
                    linewidth=0,
                )
        ax.set_yscale("log")
        ax.set_title(str(net.sizes), fontsize=10)
        ax.set_xlabel("gradient descent step")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(r"speed of learning $\|\partial C / \partial b_l\|$")
    fig.suptitle(
        f"Nielsen ch. 5 on {result.data}: median over {result.seeds} seed"
        f"{'s' if result.seeds != 1 else ''}, full-batch GD, eta {ETA}, lambda {LMBDA:g}",
        fontsize=11,
    )
    return fig


def _result_table(result: NielsenResult) -> ResultTable:
    rows = []
    for net in result.nets:
        reference = REFERENCE.get((784, *net.sizes[1:])) or ()
        for layer, speed in enumerate(net.init):
            rows.append(
                [
                    len(net.sizes) - 2,
                    layer + 1,
                    reference[layer] if layer < len(reference) else None,
                    speed,
                    net.final[layer],
                ]
            )
    return ResultTable(
        f"Speed of learning ||dC/db_l|| per hidden layer, {result.data}, median of "
        f"{result.seeds} seed{'s' if result.seeds != 1 else ''}",
        ["hidden layers", "layer", "Nielsen (MNIST), init", "measured, init", "measured, end"],
        rows,
    )
