"""The adding problem: a tanh RNN cannot carry the gradient 100 steps back; an LSTM and an IRNN can.

Hochreiter & Schmidhuber (1997, experiment 4) built the adding problem to show that a plain
recurrent net cannot learn a dependency across many time steps, since the error signal it sends
back shrinks geometrically on the way; the LSTM's gated cell state carries it. Le, Jaitly &
Hinton (2015, Fig. 2) added the IRNN: ReLU units, the recurrent weight initialised to the
identity and zero biases, so that at initialisation the state (and the gradient) is copied
unchanged from step to step.

What is run (each model trained under :func:`vanishing.watch`, so its run directory holds the
temporal profile: ``||dLoss/dx_t||`` at each time step of the recurrent layer's input):

- the task of :func:`vanishing.experiments.tasks.make_task` ``"adding"``: T steps of (a value
  U[0, 1], a marker), one marker in each half; the target is the sum of the two marked values.
  Predicting the mean (1) scores the target's variance, 1/6 (Le et al. quote 0.1767 for their
  variant);
- three one-layer recurrent nets of the same width with a linear head on the last state
  (:class:`vanishing.experiments.models.RecurrentNet`): a tanh RNN (recurrent weight orthogonal,
  the best-conditioned start a tanh RNN can have), an LSTM with forget-gate bias 1 and an IRNN
  (input weights N(0, 0.001^2), as in Le et al.);
- Adam with a cosine learning-rate decay and total-norm gradient clipping at 1 (Le et al.:
  plain SGD, clipping, and up to 10^6 steps; Adam reaches the same end within minutes here).

The checks: the target variance is 1/6; the tanh RNN stays near it, the LSTM goes below 0.01
test MSE, the IRNN below 0.01 too (Le et al.'s 100 units, 8000 Adam steps at lr 0.002); the gradient reaching t = 0 relative to t = T - 1 is tiny
in the trained tanh RNN and of order 1 in the other two. See docs/reproductions/adding.md.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
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
    import os

    from matplotlib.figure import Figure
    from torch import nn

__all__ = [
    "TITLE",
    "CITATION",
    "MODELS",
    "BASELINE_MEAN",
    "BASELINE_LE",
    "Settings",
    "DEFAULT",
    "QUICK",
    "ModelResult",
    "build_model",
    "train_model",
    "time_profile",
    "mean_baseline",
    "reproduce",
    "plot_results",
]

TITLE = "Adding problem, T = 100: a tanh RNN stays at the baseline, an LSTM and an IRNN solve it"
CITATION = (
    "Hochreiter & Schmidhuber 1997, 'Long short-term memory', Neural Computation 9(8), "
    "experiment 4 (the adding problem); Le, Jaitly & Hinton 2015, 'A simple way to initialize "
    "recurrent networks of rectified linear units', arXiv:1504.00941, Fig. 2 (adding problem)"
)

#: the three nets, in the order they are trained and shown
MODELS = ("tanh_rnn", "lstm", "irnn")
LABELS = {"tanh_rnn": "tanh RNN", "lstm": "LSTM, forget bias 1", "irnn": "IRNN"}

#: MSE of predicting the mean: the variance of the sum of two U[0, 1] values, 2 x 1/12
BASELINE_MEAN = 1.0 / 6.0
#: the baseline Le et al. (2015) quote for their variant of the task (predicting 1 always)
BASELINE_LE = 0.1767
#: below this test MSE a net has solved the task (Le et al.'s IRNN and LSTM curves end there)
SOLVED = 0.01
#: IRNN input weights: N(0, 0.001^2) (Le et al. 2015, section 4)
IRNN_INPUT_STD = 0.001


@dataclass(frozen=True)
class Settings:
    """What :func:`reproduce` runs: the sequence length, the nets' size and the training recipe.

    ``hidden``, ``steps`` and ``lr`` are per model (keys of :data:`MODELS`): the IRNN gets Le et
    al.'s 100 units and more steps (at 64 units it left the baseline plateau late or not at
    all within 6000 steps, see docs/reproductions/adding.md); every model gets Adam with a
    cosine decay of ``lr`` to 0 over its steps, batches of ``batch`` drawn with replacement
    from ``n_train`` training sequences and total-norm clipping at ``clip``. ``record_every``:
    the monitor records every that many steps (and the first one).

    Example:
        >>> from vanishing.experiments.reproductions.adding import DEFAULT, QUICK
        >>> DEFAULT.T, QUICK.T < DEFAULT.T
        (100, True)
    """

    T: int
    hidden: dict[str, int]
    batch: int
    n_train: int
    n_test: int
    steps: dict[str, int]
    lr: dict[str, float]
    clip: float = 1.0
    record_every: int = 10


DEFAULT = Settings(
    T=100,
    hidden={"tanh_rnn": 64, "lstm": 64, "irnn": 100},
    batch=64,
    n_train=10000,
    n_test=1000,
    steps={"tanh_rnn": 1500, "lstm": 1500, "irnn": 8000},
    lr={"tanh_rnn": 0.002, "lstm": 0.01, "irnn": 0.002},
)
QUICK = Settings(
    T=30,
    hidden={"tanh_rnn": 32, "lstm": 32, "irnn": 32},
    batch=64,
    n_train=4000,
    n_test=1000,
    steps={"tanh_rnn": 300, "lstm": 700, "irnn": 200},
    lr={"tanh_rnn": 0.002, "lstm": 0.01, "irnn": 0.002},
)


def build_model(kind: str, *, T: int, hidden: int, seed: int) -> nn.Module:
    """One of the three nets: a one-layer ``RecurrentNet`` (``recurrent.0``, ``head``).

    ``tanh_rnn``: tanh units, recurrent weight orthogonal, PyTorch's other defaults; ``lstm``:
    forget-gate bias 1 (in ``bias_ih``; ``bias_hh``'s forget slice 0), PyTorch's other defaults;
    ``irnn``: ReLU units, recurrent weight the identity, input weights N(0, 0.001^2), zero
    biases. The weights depend only on ``seed``.

    Example:
        >>> import torch
        >>> from vanishing.experiments.reproductions.adding import build_model
        >>> net = build_model("irnn", T=5, hidden=4, seed=0)
        >>> torch.equal(net.recurrent[0].weight_hh_l0, torch.eye(4))
        True
        >>> net(torch.rand(3, 5, 2)).shape
        torch.Size([3, 1])
    """
    import torch
    from torch import nn

    from vanishing.experiments.models import RecurrentNet

    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; expected one of: {', '.join(MODELS)}")
    if T < 2 or hidden < 1:
        raise ValueError(f"need T >= 2 and hidden >= 1, got T={T}, hidden={hidden}")
    cell = "lstm" if kind == "lstm" else "rnn"
    activation = "relu" if kind == "irnn" else "tanh"
    gen = torch.Generator().manual_seed(seed)
    with _seeded(seed):
        net = RecurrentNet((T, 2), 1, cell=cell, width=hidden, activation=activation)
    layer = net.recurrent[0]
    with torch.no_grad():
        if kind == "tanh_rnn":
            nn.init.orthogonal_(layer.weight_hh_l0, generator=gen)
        elif kind == "lstm":
            layer.bias_ih_l0[hidden : 2 * hidden] = 1.0  # PyTorch's gate order: i, f, g, o
            layer.bias_hh_l0[hidden : 2 * hidden] = 0.0
        else:
            nn.init.eye_(layer.weight_hh_l0)
            layer.weight_ih_l0.normal_(0.0, IRNN_INPUT_STD, generator=gen)
            layer.bias_ih_l0.zero_()
            layer.bias_hh_l0.zero_()
    return net


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global generator (module constructors draw from it), restoring it after."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@dataclass
class ModelResult:
    """One trained net: its test MSE, the gradient profile through time and where it was recorded.

    ``profile_steps`` are the recorded steps; ``grad_first`` and ``grad_last`` the recorded
    ``||dLoss/dx_t||`` at t = 0 and t = T - 1 of each. ``ratio_init`` is their ratio at step 0,
    ``ratio_end`` the median ratio over the last quarter of the recorded steps.

    Example:
        >>> import numpy as np
        >>> from vanishing.experiments.reproductions.adding import ModelResult
        >>> r = ModelResult("lstm", 0.001, np.array([0, 10]), np.array([1e-3, 1e-1]), np.array([1.0, 1.0]))
        >>> r.ratio_init, r.ratio_end
        (0.001, 0.1)
    """

    kind: str
    test_mse: float
    profile_steps: np.ndarray
    grad_first: np.ndarray
    grad_last: np.ndarray
    run_dir: Path | None = None
    seconds: float = float("nan")
    diverged: bool = False
    steps: int = 0

    @property
    def ratios(self) -> np.ndarray:
        """``grad_first / grad_last`` at each recorded step."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.grad_first / self.grad_last

    @property
    def ratio_init(self) -> float:
        """Gradient at t = 0 over that at t = T - 1, at initialisation (the first step)."""
        return float(self.ratios[0])

    @property
    def ratio_end(self) -> float:
        """The same ratio, median over the last quarter of the recorded steps."""
        r = self.ratios
        return float(np.median(r[-max(1, len(r) // 4) :]))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: kind, test MSE, ratios, seconds, steps, diverged, run directory."""
        return {
            "kind": self.kind,
            "test_mse": self.test_mse,
            "ratio_init": self.ratio_init,
            "ratio_end": self.ratio_end,
            "seconds": self.seconds,
            "steps": self.steps,
            "diverged": self.diverged,
            "run_dir": None if self.run_dir is None else str(self.run_dir),
        }


def time_profile(run_dir: str | os.PathLike, layer: str = "recurrent.0") -> dict[str, np.ndarray]:
    """The recorded gradient through time of ``layer``: ``||dLoss/dx_t||`` at t = 0 and t = T - 1.

    Read from the run's ``temporal`` table (docs/run-format.md): for each recorded step, the row
    with ``t == 0`` and the one with ``t == length - 1`` (the profile always keeps both ends).
    Returns ``{"step", "first", "last"}`` arrays in step order.

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.reproductions.adding import QUICK, time_profile, train_model
        >>> from vanishing.experiments.tasks import make_task
        >>> task = make_task("adding", seq_len=8, n_train=64, n_test=16, standardize="none")
        >>> r = train_model("tanh_rnn", task, QUICK, steps=3, seed=0, run_dir=tempfile.mkdtemp() + "/r")
        >>> p = time_profile(r.run_dir)
        >>> p["step"].tolist(), bool((p["first"] < p["last"]).all())
        ([0, 2], True)
    """
    from vanishing.recorder.reader import load_run

    t = load_run(run_dir).temporal
    t = t[t.layer == layer]
    if t.empty:
        raise ValueError(f"{run_dir} has no temporal profile of layer {layer!r}")
    first = t[t.t == 0].set_index("step").grad_norm.sort_index()
    last = t[t.t == t.length - 1].set_index("step").grad_norm.sort_index()
    first, last = first.align(last, join="inner")
    return {
        "step": first.index.to_numpy(dtype=np.int64),
        "first": first.to_numpy(dtype=np.float64),
        "last": last.to_numpy(dtype=np.float64),
    }


def mean_baseline(y_train, y_test) -> float:
    """Test MSE of the best constant guess learned from the training targets (their mean).

    Example:
        >>> import torch
        >>> from vanishing.experiments.reproductions.adding import mean_baseline
        >>> mean_baseline(torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [1.0]]))
        0.5
    """
    mean = float(y_train.double().mean())
    return float((y_test.double() - mean).pow(2).mean())


def train_model(
    kind: str,
    task,
    settings: Settings,
    *,
    seed: int,
    run_dir: str | os.PathLike,
    steps: int | None = None,
) -> ModelResult:
    """Train one net on ``task`` (an adding ``Task``) under :func:`vanishing.watch`; test it.

    The recipe is ``settings``' (Adam, cosine decay, clipping, batches with replacement from a
    generator seeded with ``seed``); ``steps`` overrides ``settings.steps[kind]``. Torch runs on
    one thread meanwhile. The monitor records every ``settings.record_every``-th step and the
    last, all statistics (so the temporal profile); the test MSE is measured after training.

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.reproductions.adding import QUICK, train_model
        >>> from vanishing.experiments.tasks import make_task
        >>> task = make_task("adding", seq_len=8, n_train=64, n_test=16, standardize="none")
        >>> r = train_model("lstm", task, QUICK, steps=4, seed=0, run_dir=tempfile.mkdtemp() + "/r")
        >>> r.steps, r.profile_steps.tolist(), r.test_mse > 0
        (4, [0, 3], True)
    """
    import torch

    from vanishing.experiments.train import minibatches, train

    steps = settings.steps[kind] if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T = task.input_shape[0]
    model = build_model(kind, T=T, hidden=settings.hidden[kind], seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr[kind])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    batches = minibatches(
        task.x_train,
        task.y_train,
        batch_size=settings.batch,
        generator=torch.Generator().manual_seed(seed),
        replacement=True,
    )
    every = settings.record_every
    watch = {
        "run_dir": run_dir,
        "every": lambda step: step % every == 0 or step == steps - 1,
        "flush_every": 200,
    }
    start = time.perf_counter()
    with one_thread():
        log = train(
            model,
            batches,
            task.loss,
            opt,
            steps=steps,
            watch=watch,
            clip_norm=settings.clip,
            schedule=schedule,
        )
        model.eval()
        with torch.no_grad():
            test_mse = task.metric(model(task.x_test), task.y_test)
    seconds = time.perf_counter() - start
    profile = time_profile(log.monitor.run_dir)
    return ModelResult(
        kind=kind,
        test_mse=float(test_mse),
        profile_steps=profile["step"],
        grad_first=profile["first"],
        grad_last=profile["last"],
        run_dir=Path(log.monitor.run_dir),
        seconds=seconds,
        diverged=log.diverged,
        steps=log.steps,
    )


#: the gradient reaching t = 0, over that at t = T - 1: "vanished" below this (tanh RNN) ...
VANISHED = 0.05
#: ... and "carried" above this (LSTM, IRNN)
CARRIED = 0.1
#: the LSTM's and the IRNN's ratio over the tanh RNN's, at the end: at least this
CONTRAST = 100.0
#: ... and the IRNN's: at least this (its ratio ends at 0.35-1.0 over seeds 0-3, against the
#: orthogonal tanh RNN's 0.0097 at seed 0: 71x measured; our own bound, not the paper's)
IRNN_CONTRAST = 10.0


def _checks(results: dict[str, ModelResult], baseline: float, quick: bool) -> list[Check]:
    tanh, lstm, irnn = (results[k] for k in MODELS)
    checks = [
        Check.within(
            "test MSE of predicting the training mean (the target's variance, 2 x 1/12)",
            published=BASELINE_MEAN,
            measured=baseline,
            rel=0.1,
        ),
    ]
    if not quick:
        checks.append(
            Check.within(
                "tanh RNN test MSE stays near the baseline",
                published=BASELINE_MEAN,
                measured=tanh.test_mse,
                rel=0.3,
            )
        )
    checks.append(
        Check.below(
            "LSTM (forget bias 1) test MSE",
            published=f"< {SOLVED:g} (solves the task)",
            measured=lstm.test_mse,
            limit=SOLVED if not quick else 0.05,
        )
    )
    if not quick:
        checks.append(
            Check.below(
                "IRNN test MSE",
                published=f"< {SOLVED:g} (solves the task)",
                measured=irnn.test_mse,
                limit=SOLVED,
            )
        )
    checks += [
        Check.below(
            "tanh RNN: gradient at t=0 / t=T-1, end of training",
            published="vanishes (exponentially in T)",
            measured=tanh.ratio_end,
            limit=VANISHED,
        ),
        Check.above(
            "LSTM's gradient ratio at the end, x the tanh RNN's",
            published="orders of magnitude",
            measured=lstm.ratio_end / tanh.ratio_end,
            limit=CONTRAST,
        ),
        Check.above(
            "LSTM: gradient at t=0 / t=T-1, end of training",
            published="carried (constant error carousel)",
            measured=lstm.ratio_end,
            limit=CARRIED,
        ),
        Check.above(
            "IRNN: gradient at t=0 / t=T-1 at initialisation",
            published="~1 (identity recurrence)",
            measured=irnn.ratio_init,
            limit=CARRIED,
        ),
    ]
    if not quick:
        checks.append(
            Check.above(
                "IRNN: gradient at t=0 / t=T-1, end of training",
                published="carried",
                measured=irnn.ratio_end,
                limit=CARRIED,
            )
        )
        checks.append(
            Check.above(
                "IRNN's gradient ratio at the end, x the tanh RNN's",
                published="orders of magnitude",
                measured=irnn.ratio_end / tanh.ratio_end,
                limit=IRNN_CONTRAST,
            )
        )
    return checks


def reproduce(
    *,
    quick: bool = False,
    out: str | os.PathLike | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> Reproduction:
    """Train the tanh RNN, the LSTM and the IRNN on the adding problem; check them (see module).

    Default: T = 100 (:data:`DEFAULT`); ``quick``: T = 30, fewer steps (:data:`QUICK`), with
    looser checks stated in docs/reproductions/adding.md. Run directories go to
    ``out/<model>``, the plot to ``out/adding.png``/``.svg``, the result to ``out/adding.json``.
    ``progress(done, 3)`` is called after each net.

    Example:
        >>> r = reproduce(quick=True)       # doctest: +SKIP
        >>> r.ok                            # doctest: +SKIP
        True
    """
    from vanishing.experiments.tasks import make_task

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = check_out(out, "adding")
    settings = QUICK if quick else DEFAULT
    task = make_task(
        "adding",
        seed=seed,
        seq_len=settings.T,
        n_train=settings.n_train,
        n_test=settings.n_test,
        standardize="none",
    )
    baseline = mean_baseline(task.y_train, task.y_test)
    results: dict[str, ModelResult] = {}
    start = time.perf_counter()
    for i, kind in enumerate(MODELS):
        results[kind] = train_model(kind, task, settings, seed=seed, run_dir=out / kind)
        if progress is not None:
            progress(i + 1, len(MODELS))
    seconds = time.perf_counter() - start
    checks = _checks(results, baseline, quick)
    table = Table(
        f"Adding problem, T = {settings.T}: outcome and gradient through time",
        [
            "model",
            "units",
            "steps",
            "test MSE",
            "grad t=0 / t=T-1 at init",
            "grad t=0 / t=T-1, end",
            "seconds",
        ],
        [
            [
                LABELS[k],
                settings.hidden[k],
                r.steps,
                r.test_mse,
                r.ratio_init,
                r.ratio_end,
                round(r.seconds, 1),
            ]
            for k, r in results.items()
        ],
    )
    rep = Reproduction(
        name="adding",
        title=TITLE,
        citation=CITATION,
        checks=checks,
        tables=[table],
        out=out,
        quick=quick,
        settings={**asdict(settings), "seed": seed, "optimizer": "adam", "schedule": "cosine"},
        summary=_summary(results, settings.T, baseline),
    )
    rep.plots = save_figure(plot_results(results, settings.T), out, "adding")
    payload = rep.to_dict()
    payload["models"] = {k: r.to_dict() for k, r in results.items()}
    payload["seconds"] = seconds
    (out / "adding.json").write_text(json.dumps(payload, indent=2) + "\n")
    return rep


def _summary(results: dict[str, ModelResult], T: int, baseline: float) -> str:
    tanh, lstm, irnn = (results[k] for k in MODELS)
    return (
        f"At T = {T} the tanh RNN ends at test MSE {tanh.test_mse:.3g} (predicting the mean: "
        f"{baseline:.3g}), the LSTM at {lstm.test_mse:.2g} and the IRNN at {irnn.test_mse:.2g}. "
        f"The gradient reaching the first time step, relative to the last, is "
        f"{tanh.ratio_end:.1e} in the trained tanh RNN against {lstm.ratio_end:.1e} (LSTM) and "
        f"{irnn.ratio_end:.1e} (IRNN)."
    )


def plot_results(results: dict[str, ModelResult], T: int) -> Figure:
    """Two panels: gradient at t = 0 over t = T - 1 per recorded step (log), and test MSE.

    Example:
        >>> fig = plot_results(results, 100)   # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_ratio, ax_mse = fig.subplots(1, 2)
    for kind, r in results.items():
        ratio = np.where(np.isfinite(r.ratios) & (r.ratios > 0), r.ratios, np.nan)
        ax_ratio.plot(r.profile_steps, ratio, label=LABELS[kind])
    ax_ratio.set_yscale("log")
    ax_ratio.set_xlabel("training step")
    ax_ratio.set_ylabel(r"$\|\partial L/\partial x_0\| \,/\, \|\partial L/\partial x_{T-1}\|$")
    ax_ratio.set_title(f"gradient reaching t = 0 (T = {T})", fontsize=10)
    ax_ratio.grid(True, alpha=0.3)
    ax_ratio.legend(fontsize=8)
    names = [LABELS[k] for k in results]
    values = [max(r.test_mse, 1e-6) for r in results.values()]
    ax_mse.bar(names, values, color=["C0", "C1", "C2"][: len(names)])
    ax_mse.axhline(BASELINE_MEAN, color="k", ls="--", lw=1, label="predict the mean (1/6)")
    ax_mse.axhline(SOLVED, color="gray", ls=":", lw=1, label=f"solved ({SOLVED:g})")
    ax_mse.set_yscale("log")
    ax_mse.set_ylabel("test MSE")
    ax_mse.set_title("after training", fontsize=10)
    ax_mse.legend(fontsize=8)
    return fig
