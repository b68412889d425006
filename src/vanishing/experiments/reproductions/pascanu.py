"""Pascanu, Mikolov & Bengio (2013): the Jacobian bound through time, and norm clipping.

Two parts.

1. **The bound** (their section 2.1, eq. 7): for a tanh RNN ``h_t = tanh(W h_{t-1} + U x_t + b)``,
   ``dh_t/dh_0 = prod_k diag(tanh'(a_k)) W`` (``a_k`` the pre-activation), so
   ``||dh_t/dh_0|| <= prod_k ||diag(tanh'(a_k))|| ||W|| <= (lambda_1 gamma)^t`` with
   ``lambda_1 = ||W||_2`` (the largest singular value) and ``gamma = 1`` (tanh' <= 1). We build
   ``W`` with ``||W||_2 = lambda_1`` for several scales, run one sequence of the adding problem,
   take the whole Jacobian ``dh_t/dh_0`` for every ``t`` by autograd (float64) and check that
   its spectral norm obeys both bounds, and that for ``lambda_1 < 1`` it falls at least as fast
   as ``lambda_1^t`` (vanishes geometrically).
2. **Clipping** (their Algorithm 1: ``if ||g|| > threshold: g <- threshold g / ||g||``, i.e.
   ``torch.nn.utils.clip_grad_norm_``): a tanh RNN whose recurrent weight starts at 1.5 times
   an orthogonal matrix, trained by plain SGD on the adding problem, once without clipping and
   once with threshold 1, both under :func:`vanishing.watch` with the
   :class:`~vanishing.probes.clipping.ClippingProbe`, so the run records the pre-clip norm
   (``grad_norm_backward``) and the norm the optimizer used (``grad_norm_step``). Without
   clipping the loss explodes to non-finite values within a few dozen steps; with it the same
   net, same seed, same batches trains.

See docs/reproductions/pascanu.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
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
    from torch import Tensor, nn

__all__ = [
    "TITLE",
    "CITATION",
    "SCALES",
    "jacobian_norms",
    "scaled_recurrent_weight",
    "ClipRun",
    "train_clipping",
    "reproduce",
    "plot_results",
]

TITLE = (
    "Pascanu et al. 2013: ||dh_T/dh_0|| <= (lambda_1)^T, and norm clipping rescues an exploding RNN"
)
CITATION = (
    "Pascanu, Mikolov & Bengio 2013, 'On the difficulty of training recurrent neural networks', "
    "ICML, section 2.1 (eq. 7: the bound on the Jacobian through time) and section 3.2, "
    "Algorithm 1 (gradient norm clipping)"
)

#: largest singular values of W tried in the bound part (below 1, at 1, above 1)
SCALES = (0.5, 0.9, 1.0, 1.5, 3.0)
#: the exploding net of the clipping part: recurrent weight = GAIN x an orthogonal matrix
GAIN = 1.5
#: Algorithm 1's threshold
THRESHOLD = 1.0


@dataclass(frozen=True)
class _Setup:
    T_bound: int  # sequence length of the bound part
    hidden: int
    T_task: int  # sequence length of the clipping part's adding problem
    steps: int
    lr: float
    batch: int


DEFAULT = _Setup(T_bound=60, hidden=32, T_task=10, steps=800, lr=0.1, batch=32)
QUICK = _Setup(T_bound=30, hidden=32, T_task=10, steps=800, lr=0.1, batch=32)


def scaled_recurrent_weight(hidden: int, lambda_1: float, *, seed: int = 0) -> Tensor:
    """A Gaussian ``hidden x hidden`` matrix rescaled so that its largest singular value is
    ``lambda_1`` (float64; the other singular values spread below it, as in a random net).

    Example:
        >>> import torch
        >>> from vanishing.experiments.reproductions.pascanu import scaled_recurrent_weight
        >>> w = scaled_recurrent_weight(16, 0.9)
        >>> round(float(torch.linalg.matrix_norm(w, ord=2)), 6)
        0.9
    """
    import torch

    if hidden < 1 or not lambda_1 > 0:
        raise ValueError(f"need hidden >= 1 and lambda_1 > 0, got {hidden}, {lambda_1}")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden, hidden, generator=g, dtype=torch.float64)
    return w * (lambda_1 / torch.linalg.matrix_norm(w, ord=2))


def jacobian_norms(W: Tensor, U: Tensor, b: Tensor, x: Tensor, h0: Tensor) -> dict[str, np.ndarray]:
    """For ``h_t = tanh(W h_{t-1} + U x_t + b)``, ``t = 1..T``: the measured and bounded
    ``||dh_t/dh_0||_2``.

    ``x`` is one sequence ``(T, n_in)``, ``h0`` the start state ``(H,)``. The Jacobians come
    from autograd (``torch.func.jacrev`` of all states w.r.t. ``h0``); returns ``measured``
    (their spectral norms), ``bound`` (``prod_k max|tanh'(a_k)| ||W||_2``, the middle term of
    Pascanu et al.'s eq. 7) and ``lambda_bound`` (``||W||_2^t``), each of length ``T``.

    Example:
        >>> import torch
        >>> from vanishing.experiments.reproductions.pascanu import jacobian_norms
        >>> W = 0.5 * torch.eye(2, dtype=torch.float64)
        >>> z = torch.zeros(2, dtype=torch.float64)
        >>> r = jacobian_norms(W, torch.zeros(2, 1, dtype=torch.float64), z,
        ...                    torch.zeros(3, 1, dtype=torch.float64), z)
        >>> r["measured"].round(4).tolist()     # tanh'(0) = 1: exactly 0.5^t
        [0.5, 0.25, 0.125]
    """
    import torch

    def states(h: Tensor) -> Tensor:
        out = []
        for t in range(x.shape[0]):
            h = torch.tanh(W @ h + U @ x[t] + b)
            out.append(h)
        return torch.stack(out)

    jac = torch.func.jacrev(states)(h0)  # (T, H, H): dh_t / dh_0
    measured = torch.linalg.matrix_norm(jac, ord=2)
    with torch.no_grad():
        h, derivs = h0, []
        for t in range(x.shape[0]):
            a = W @ h + U @ x[t] + b
            h = torch.tanh(a)
            derivs.append((1 - h * h).abs().max())  # ||diag(tanh'(a_t))||_2
    lam = torch.linalg.matrix_norm(W, ord=2)
    bound = torch.cumprod(torch.stack(derivs) * lam, 0)
    steps = torch.arange(1, x.shape[0] + 1, dtype=torch.float64)
    return {
        "measured": measured.detach().numpy(),
        "bound": bound.numpy(),
        "lambda_bound": (lam**steps).numpy(),
    }


def _decay_rate(norms: np.ndarray) -> float:
    """Per-step factor of a geometric fit ``||J_t|| ~ c r^t`` over the second half of ``t``
    (the start is transient: the first steps' derivatives depend on ``h_0``)."""
    t = np.arange(1, len(norms) + 1)
    keep = (t > len(norms) // 2) & (norms > 0)
    slope = np.polyfit(t[keep], np.log(norms[keep]), 1)[0]
    return float(math.exp(slope))


def _build_net(T: int, hidden: int, seed: int) -> nn.Module:
    import torch
    from torch import nn

    from vanishing.experiments.models import RecurrentNet

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = RecurrentNet((T, 2), 1, cell="rnn", width=hidden, activation="tanh")
        with torch.no_grad():
            w = net.recurrent[0].weight_hh_l0
            nn.init.orthogonal_(w)
            w.mul_(GAIN)
    finally:
        torch.random.set_rng_state(state)
    return net


@dataclass
class ClipRun:
    """One training run of the clipping part, read back from its run directory.

    ``losses`` are the recorded training losses (a non-finite one ends the run);
    ``norm_backward``/``norm_step`` the total gradient norm before clipping and the one the
    optimizer used (the ClippingProbe's columns); ``test_mse`` after training (NaN if the
    weights became non-finite).

    Example:
        >>> import numpy as np
        >>> from vanishing.experiments.reproductions.pascanu import ClipRun
        >>> r = ClipRun(None, np.array([1.0, np.inf]), np.array([2.0, 1e9]), np.array([2.0, 1e9]), float("nan"))
        >>> r.diverged, r.max_norm
        (True, 1000000000.0)
    """

    threshold: float | None
    losses: np.ndarray
    norm_backward: np.ndarray
    norm_step: np.ndarray
    test_mse: float
    run_dir: Path | None = None

    @property
    def diverged(self) -> bool:
        """A recorded loss was NaN or infinite."""
        return not bool(np.isfinite(self.losses).all())

    @property
    def max_norm(self) -> float:
        """The largest pre-clip gradient norm recorded (NaN/inf count as inf)."""
        finite = np.where(np.isfinite(self.norm_backward), self.norm_backward, np.inf)
        return float(finite.max()) if len(finite) else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "threshold": self.threshold,
            "steps": len(self.losses),
            "diverged": self.diverged,
            "first_loss": float(self.losses[0]),
            "max_loss": float(np.nanmax(np.where(np.isfinite(self.losses), self.losses, np.inf))),
            "final_loss": float(self.losses[-1]),
            "max_preclip_norm": self.max_norm,
            "test_mse": self.test_mse,
            "run_dir": None if self.run_dir is None else str(self.run_dir),
        }


def train_clipping(
    threshold: float | None,
    *,
    T: int = DEFAULT.T_task,
    hidden: int = DEFAULT.hidden,
    steps: int = DEFAULT.steps,
    lr: float = DEFAULT.lr,
    batch: int = DEFAULT.batch,
    seed: int = 0,
    run_dir: str | os.PathLike,
) -> ClipRun:
    """Train the exploding tanh RNN (recurrent weight 1.5 x orthogonal) on the adding problem
    by SGD, clipping the gradient norm at ``threshold`` (None: no clipping), under the monitor
    with the ClippingProbe. A non-finite loss stops training after that step.

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.reproductions.pascanu import train_clipping
        >>> r = train_clipping(1.0, T=5, steps=3, run_dir=tempfile.mkdtemp() + "/r")
        >>> len(r.losses), bool((r.norm_step <= 1.0 + 1e-6).all())
        (3, True)
    """
    import torch

    from vanishing.experiments.tasks import make_task
    from vanishing.experiments.train import minibatches, train
    from vanishing.probes.clipping import ClippingProbe
    from vanishing.recorder.reader import load_run

    if threshold is not None and not threshold > 0:
        raise ValueError(f"threshold must be > 0 or None, got {threshold!r}")
    task = make_task("adding", seed=seed, seq_len=T, n_train=4000, n_test=1000, standardize="none")
    net = _build_net(T, hidden, seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    batches = minibatches(
        task.x_train,
        task.y_train,
        batch_size=batch,
        generator=torch.Generator().manual_seed(seed),
        replacement=True,
    )
    watch = {"run_dir": run_dir, "stats": "parameters", "probes": [ClippingProbe()]}
    with one_thread():
        log = train(
            net,
            batches,
            task.loss,
            opt,
            steps=steps,
            watch=watch,
            clip_norm=threshold,
            stop_on_nonfinite=True,
        )
        net.eval()
        with torch.no_grad():
            test_mse = task.metric(net(task.x_test), task.y_test)
    s = load_run(log.monitor.run_dir).steps
    return ClipRun(
        threshold=threshold,
        losses=s["loss"].to_numpy(dtype=np.float64),
        norm_backward=s["grad_norm_backward"].to_numpy(dtype=np.float64),
        norm_step=s["grad_norm_step"].to_numpy(dtype=np.float64),
        test_mse=float(test_mse),
        run_dir=Path(log.monitor.run_dir),
    )


def reproduce(
    *,
    quick: bool = False,
    out: str | os.PathLike | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> Reproduction:
    """Run both parts (see the module docstring); write ``pascanu.json`` and the plot to ``out``.

    ``quick``: a shorter sequence for the bound (T = 30 instead of 60);
    the checks are the same. ``progress(done, total)`` after each scale and each training run.

    Example:
        >>> r = reproduce(quick=True)       # doctest: +SKIP
        >>> r.ok                            # doctest: +SKIP
        True
    """
    import torch

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = check_out(out, "pascanu")
    setup = QUICK if quick else DEFAULT
    total, done = len(SCALES) + 2, 0
    start = time.perf_counter()

    # part 1: the bound, one adding-problem sequence, the same U, b, x, h0 for every scale
    from vanishing.experiments.tasks import make_task

    H = setup.hidden
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(H, 2, generator=g, dtype=torch.float64)  # N(0, 1): the states move
    b = 0.1 * torch.randn(H, generator=g, dtype=torch.float64)
    h0 = 0.5 * torch.randn(H, generator=g, dtype=torch.float64).tanh()
    task = make_task("adding", seed=seed, seq_len=setup.T_bound, n_train=1, n_test=1)
    x = task.x_train[0].double()
    bounds: dict[float, dict[str, np.ndarray]] = {}
    for lam in SCALES:
        W = scaled_recurrent_weight(H, lam, seed=seed)
        bounds[lam] = jacobian_norms(W, U, b, x, h0)
        done += 1
        if progress is not None:
            progress(done, total)

    # part 2: the same exploding net with and without Algorithm 1
    runs = {}
    for name, threshold in (("unclipped", None), ("clipped", THRESHOLD)):
        runs[name] = train_clipping(
            threshold,
            T=setup.T_task,
            hidden=H,
            steps=setup.steps,
            lr=setup.lr,
            batch=setup.batch,
            seed=seed,
            run_dir=out / name,
        )
        done += 1
        if progress is not None:
            progress(done, total)
    seconds = time.perf_counter() - start

    checks = _checks(bounds, runs)
    rows = []
    for lam, r in bounds.items():
        rate = _decay_rate(r["measured"])
        rows.append(
            [
                lam,
                float(r["measured"][-1]),
                float(r["bound"][-1]),
                float(r["lambda_bound"][-1]),
                float((r["measured"] / r["bound"]).max()),
                rate,
            ]
        )
    t_bound = setup.T_bound
    tables = [
        Table(
            f"||dh_t/dh_0||_2 of a tanh RNN, T = {t_bound}, H = {H} (autograd, float64)",
            [
                "lambda_1",
                f"measured, t={t_bound}",
                "prod ||diag tanh'|| ||W||",
                "lambda_1^T",
                "max_t measured / bound",
                "decay per step (fit)",
            ],
            rows,
        ),
        Table(
            f"SGD on the adding problem (T = {setup.T_task}), W_hh = {GAIN} x orthogonal, "
            f"lr {setup.lr}",
            ["run", "steps", "diverged", "max pre-clip norm", "final loss", "test MSE"],
            [
                [
                    n,
                    len(r.losses),
                    r.diverged,
                    r.max_norm,
                    float(r.losses[-1]),
                    r.test_mse,
                ]
                for n, r in runs.items()
            ],
        ),
    ]
    rep = Reproduction(
        name="pascanu",
        title=TITLE,
        citation=CITATION,
        checks=checks,
        tables=tables,
        out=out,
        quick=quick,
        settings={
            "scales": list(SCALES),
            "T_bound": setup.T_bound,
            "hidden": H,
            "T_task": setup.T_task,
            "steps": setup.steps,
            "lr": setup.lr,
            "batch": setup.batch,
            "gain": GAIN,
            "threshold": THRESHOLD,
            "seed": seed,
        },
        summary=_summary(bounds, runs, t_bound),
    )
    rep.plots = save_figure(plot_results(bounds, runs), out, "pascanu")
    payload = rep.to_dict()
    payload["runs"] = {n: r.to_dict() for n, r in runs.items()}
    payload["seconds"] = seconds
    (out / "pascanu.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return rep


def _checks(bounds: dict[float, dict[str, np.ndarray]], runs: dict[str, ClipRun]) -> list[Check]:
    # a relative slack of 1e-9 absorbs float64 rounding of the spectral norms
    worst_mid = max(float((r["measured"] / r["bound"]).max()) for r in bounds.values())
    worst_lam = max(float((r["measured"] / r["lambda_bound"]).max()) for r in bounds.values())
    checks = [
        Check.below(
            "max over lambda_1 and t of ||dh_t/dh_0|| / prod_k ||diag tanh'(a_k)|| ||W||",
            published="<= 1 (eq. 7)",
            measured=worst_mid,
            limit=1 + 1e-9,
        ),
        Check.below(
            "max over lambda_1 and t of ||dh_t/dh_0|| / lambda_1^t",
            published="<= 1 (eq. 7, gamma = 1)",
            measured=worst_lam,
            limit=1 + 1e-9,
        ),
    ]
    for lam in (s for s in SCALES if s < 1):
        rate = _decay_rate(bounds[lam]["measured"])
        checks.append(
            Check.below(
                f"lambda_1 = {lam}: per-step decay factor of ||dh_t/dh_0|| (geometric fit)",
                published=f"<= lambda_1 = {lam} (vanishes geometrically)",
                measured=rate,
                limit=lam + 1e-6,
            )
        )
    un, cl = runs["unclipped"], runs["clipped"]
    checks += [
        Check.holds(
            "without clipping: training diverges",
            published="loss explodes (exploding gradients)",
            measured=(
                f"non-finite loss at step {len(un.losses) - 1}"
                if un.diverged
                else f"max loss {float(np.max(un.losses)):.3g}"
            ),
            ok=un.diverged or float(np.max(un.losses)) > 100 * float(un.losses[0]),
            tolerance="non-finite, or max loss > 100 x the first",
        ),
        Check.above(
            "with clipping: largest pre-clip gradient norm recorded (x the threshold)",
            published="> 1 (clipping engaged)",
            measured=cl.max_norm / THRESHOLD,
            limit=1.0,
        ),
        Check.below(
            "with clipping: largest norm the optimizer used (x the threshold)",
            published="<= 1 (Algorithm 1)",
            measured=float(np.nanmax(cl.norm_step)) / THRESHOLD,
            limit=1 + 1e-5,
        ),
        Check.holds(
            "with clipping: training stays finite",
            published="trains",
            measured="finite" if not cl.diverged else "diverged",
            ok=not cl.diverged and math.isfinite(cl.test_mse),
            tolerance="every loss finite",
        ),
        Check.below(
            "with clipping: test MSE after training, x the mean-prediction baseline (1/6)",
            published="< 1 (it learns)",
            measured=cl.test_mse / BASELINE,
            limit=1.0,
        ),
    ]
    return checks


#: test MSE of predicting the mean on the adding problem (the target's variance)
BASELINE = 1.0 / 6.0


def _summary(bounds, runs, T: int) -> str:
    un, cl = runs["unclipped"], runs["clipped"]
    lam = 0.9
    return (
        f"The autograd Jacobian ||dh_t/dh_0|| of a tanh RNN stays under "
        f"prod ||diag tanh'|| ||W|| <= lambda_1^t for every lambda_1 in {list(SCALES)}; at "
        f"lambda_1 = {lam} it is {float(bounds[lam]['measured'][-1]):.2g} at t = {T} "
        f"({lam}^{T} = {lam**T:.2g}). Plain SGD on an RNN with W_hh = {GAIN} x orthogonal "
        f"{'diverged (non-finite loss) at step ' + str(len(un.losses) - 1) if un.diverged else 'did not diverge'}; "
        f"clipping the norm at {THRESHOLD:g} (pre-clip norms up to {cl.max_norm:.3g}) trained "
        f"it to test MSE {cl.test_mse:.3g}."
    )


def plot_results(bounds: dict[float, dict[str, np.ndarray]], runs: dict[str, ClipRun]) -> Figure:
    """Left: measured ||dh_t/dh_0|| (solid) and lambda_1^t (dashed) per scale; middle: the
    pre-clip gradient norms; right: the training losses, clipped and not.

    Example:
        >>> fig = plot_results(bounds, runs)   # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_j, ax_n, ax_l = fig.subplots(1, 3)
    for i, (lam, r) in enumerate(bounds.items()):
        t = np.arange(1, len(r["measured"]) + 1)
        ax_j.plot(t, r["measured"], color=f"C{i}", label=f"lambda_1 = {lam}")
        ax_j.plot(t, r["lambda_bound"], color=f"C{i}", ls="--", lw=0.8)
    ax_j.set_yscale("log")
    ax_j.set_xlabel("t")
    ax_j.set_title(
        r"$\|\partial h_t/\partial h_0\|$ (solid) vs $\lambda_1^t$ (dashed)", fontsize=10
    )
    ax_j.legend(fontsize=7)
    for name, r in runs.items():
        steps = np.arange(len(r.losses))
        norms = np.where(np.isfinite(r.norm_backward), r.norm_backward, np.nan)
        losses = np.where(np.isfinite(r.losses), r.losses, np.nan)
        ax_n.plot(steps, norms, label=name, lw=0.8)
        ax_l.plot(steps, losses, label=name, lw=0.8)
    ax_n.axhline(THRESHOLD, color="k", ls=":", lw=1, label="threshold")
    for ax, title in ((ax_n, "gradient norm before clipping"), (ax_l, "training loss")):
        ax.set_yscale("log")
        ax.set_xlabel("SGD step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    return fig
