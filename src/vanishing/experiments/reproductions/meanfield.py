"""Mean-field theory of deep tanh nets (Poole et al. 2016; Schoenholz et al. 2017), measured.

What is reproduced:

- the theory (:mod:`vanishing.theory`): ``chi_1`` and the depth scales of tanh over
  ``sigma_w^2`` at ``sigma_b^2 = 0.05`` (``chi_1 = 0.759`` at ``sigma_w^2 = 1``), and the
  critical line ``sigma_w^2(sigma_b^2)`` against the published values;
- the measurement: deep random tanh nets (weights ``N(0, sigma_w^2 / n)``, biases
  ``N(0, sigma_b^2)``), inputs scaled so the first pre-activations have ``q = q*``, one backward
  pass of ``sum(h_L * G)`` (G a fixed Gaussian direction) under :func:`vanishing.watch`; the
  recorded error-signal norms ``||dL/dh_l||`` of every Linear layer give the measured per-layer
  factor ``(||dL/dh_1|| / ||dL/dh_L||)^(2 / (L - 1))`` (the geometric mean of the per-layer
  ratios of squared norms), compared with ``chi_1`` in the ordered phase, on the critical line
  and in the chaotic phase.

See docs/reproductions/meanfield.md for the numbers and the tolerances.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

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

__all__ = [
    "TITLE",
    "CITATION",
    "SIGMA_B2",
    "PUBLISHED_CRITICAL",
    "build_net",
    "measure_factor",
    "reproduce",
]

TITLE = "Mean field: chi_1, the depth scale and the order-to-chaos line of deep tanh nets"
CITATION = (
    "Poole, Lahiri, Raghu, Sohl-Dickstein, Ganguli (2016), 'Exponential expressivity in deep "
    "neural networks through transient chaos', NeurIPS; Schoenholz, Gilmer, Ganguli, "
    "Sohl-Dickstein (2017), 'Deep Information Propagation', ICLR (Fig. 1 and 2: chi_1, the depth "
    "scales and the phase diagram of tanh nets)"
)

SIGMA_B2 = 0.05
#: the tanh critical line sigma_w^2(sigma_b^2) as quoted in the issue (Schoenholz et al. Fig. 1)
PUBLISHED_CRITICAL = {0.01: 1.4242, 0.05: 1.7610, 0.1: 1.9861, 0.2: 2.2852}
#: chi_1 of tanh at sigma_w^2 = 1, sigma_b^2 = 0.05, as quoted in the issue
PUBLISHED_CHI1 = 0.759


def build_net(width: int, depth: int, sigma_w2: float, sigma_b2: float, *, seed: int):
    """A plain tanh stack of ``depth`` Linear layers (Tanh after all but the last), float64.

    Weights ~ N(0, sigma_w2 / width), biases ~ N(0, sigma_b2), from a generator seeded with seed.

    Example:
        >>> from vanishing.experiments.reproductions.meanfield import build_net
        >>> net = build_net(64, 3, 1.5, 0.05, seed=0)
        >>> [type(m).__name__ for m in net]
        ['Linear', 'Tanh', 'Linear', 'Tanh', 'Linear']
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(int(seed))
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, width, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(
                torch.randn(width, width, generator=g, dtype=torch.float64)
                * math.sqrt(sigma_w2 / width)
            )
            lin.bias.copy_(
                torch.randn(width, generator=g, dtype=torch.float64) * math.sqrt(sigma_b2)
            )
        layers.append(lin)
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def measure_factor(
    width: int,
    depth: int,
    sigma_w2: float,
    sigma_b2: float,
    *,
    seed: int,
    batch: int,
    run_dir: Path,
) -> tuple[float, float]:
    """(measured, predicted) per-layer factor of ``||dL/dh||^2`` for one random tanh net.

    Measured: one backward pass recorded by :func:`vanishing.watch`, read back from the run's
    ``error_norm`` of each Linear layer. Predicted: :func:`vanishing.theory.predict` on the same
    net and inputs (finite depth, the net's actual weights). Both are geometric means over the
    ``depth - 1`` layer-to-layer steps.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from vanishing.experiments.reproductions.meanfield import measure_factor
        >>> m, p = measure_factor(128, 8, 1.0, 0.05, seed=0, batch=16,
        ...                       run_dir=Path(tempfile.mkdtemp()) / "r")   # doctest: +SKIP
        >>> abs(m / p - 1) < 0.1                                          # doctest: +SKIP
        True
    """
    import torch

    import vanishing
    from vanishing import theory

    r = theory.mean_field("tanh", sigma_w2, sigma_b2)
    net = build_net(width, depth, sigma_w2, sigma_b2, seed=seed)
    g = torch.Generator().manual_seed(10_000 + int(seed))
    # inputs whose first pre-activations have q = q*: sigma_w^2 E[x^2] + sigma_b^2 = q*
    scale = math.sqrt(max(r.q_star - sigma_b2, 0.0) / sigma_w2)
    x = torch.randn(batch, width, generator=g, dtype=torch.float64) * scale
    direction = torch.randn(batch, width, generator=g, dtype=torch.float64)
    with vanishing.watch(net, run_dir=run_dir, stats="all", flush_every=1):
        (net(x) * direction).sum().backward()
    metrics = vanishing.load_run(run_dir).metrics
    rows = metrics[(metrics["param"] == "") & metrics["error_norm"].notna()]
    names = [str(i) for i, m in enumerate(net) if isinstance(m, torch.nn.Linear)]
    norms = rows.set_index("layer")["error_norm"].reindex(names).to_numpy(dtype=float)
    measured = float((norms[0] / norms[-1]) ** (2.0 / (len(norms) - 1)))
    chis = theory.predict(net, x).chis
    predicted = float(np.exp(np.mean(np.log(chis))))
    return measured, predicted


def reproduce(
    *, quick: bool = False, out: Any = None, progress: Progress | None = None, seed: int = 0
) -> Reproduction:
    """Run the reproduction: theory curves, measured factors, the critical line, two plots.

    Default: width 256, depth 50, batch 32, 3 seeds, 8 values of sigma_w^2; quick: width 128,
    depth 30, 1 seed, 5 values (looser tolerance). Writes ``chi1.png/svg``,
    ``phase.png/svg`` and ``meanfield.json`` into ``out``.

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.reproductions.meanfield import reproduce
        >>> r = reproduce(quick=True, out=tempfile.mkdtemp())   # doctest: +SKIP
        >>> r.ok                                                 # doctest: +SKIP
        True
    """
    out = check_out(out, "meanfield")
    # torch on one thread throughout: the quadratures and nets are small, and on a loaded
    # machine OpenMP's spinning threads make them many times slower
    with one_thread():
        return _reproduce(quick, out, progress, seed)


def _reproduce(quick: bool, out: Path, progress: Progress | None, seed: int) -> Reproduction:
    from vanishing import theory

    started = time.perf_counter()
    if quick:
        width, depth, batch, seeds = 128, 30, 16, 1
        grid = [1.0, 1.5, theory.critical_sigma_w2("tanh", SIGMA_B2), 2.5, 4.0]
        rel = 0.10
    else:
        width, depth, batch, seeds = 256, 50, 32, 3
        grid = [1.0, 1.25, 1.5, theory.critical_sigma_w2("tanh", SIGMA_B2), 2.0, 2.5, 3.0, 4.0]
        rel = 0.05
    total = len(grid) * seeds
    done = 0
    points = []
    for w in grid:
        ms, ps = [], []
        for s in range(seeds):
            m, p = measure_factor(
                width,
                depth,
                w,
                SIGMA_B2,
                seed=seed * 1000 + s,
                batch=batch,
                run_dir=out / "runs" / f"sw2-{w:.4f}-seed-{s}",
            )
            ms.append(m)
            ps.append(p)
            done += 1
            if progress is not None:
                progress(done, total)
        mf = theory.mean_field("tanh", w, SIGMA_B2)
        points.append(
            {
                "sigma_w2": w,
                "chi1": mf.chi1,
                "phase": mf.phase,
                "depth_scale": mf.depth_scale,
                "correlation_depth_scale": mf.correlation_depth_scale,
                "predicted_finite": float(np.exp(np.mean(np.log(ps)))),
                "measured": float(np.exp(np.mean(np.log(ms)))),
                "measured_seeds": ms,
            }
        )
    crit = {b: theory.critical_sigma_w2("tanh", b) for b in PUBLISHED_CRITICAL}
    chi_at_1 = theory.mean_field("tanh", 1.0, SIGMA_B2)
    checks = [
        Check.within(
            f"chi_1 of tanh at sigma_w^2 = 1, sigma_b^2 = {SIGMA_B2} (theory, q* = "
            f"{chi_at_1.q_star:.4f})",
            published=PUBLISHED_CHI1,
            measured=chi_at_1.chi1,
            abs=5e-4,
        )
    ]
    for b, pub in PUBLISHED_CRITICAL.items():
        checks.append(
            Check.within(
                f"critical sigma_w^2 of tanh at sigma_b^2 = {b} (theory)",
                published=pub,
                measured=crit[b],
                abs=3e-3,
            )
        )
    checks.append(
        Check.within(
            "critical sigma_w^2 of ReLU (He et al. 2015: 2)",
            published=2.0,
            measured=theory.critical_sigma_w2("relu", 0.0),
            abs=1e-9,
        )
    )
    for pt in points:
        checks.append(
            Check.within(
                f"measured per-layer gradient factor at sigma_w^2 = {pt['sigma_w2']:.3f} "
                f"({pt['phase']}) vs chi_1",
                published=round(pt["chi1"], 4),
                measured=pt["measured"],
                rel=rel,
            )
        )
    ordered = [p["measured"] for p in points if p["phase"] == "ordered"]
    chaotic = [p["measured"] for p in points if p["phase"] == "chaotic"]
    checks.append(
        Check.holds(
            "gradients shrink in the ordered phase and grow in the chaotic one (measured)",
            published="factor < 1 ordered, > 1 chaotic",
            measured=f"ordered max {max(ordered):.3f}, chaotic min {min(chaotic):.3f}",
            ok=max(ordered) < 1 < min(chaotic),
            tolerance="strict inequality",
        )
    )
    xi_near = theory.mean_field("tanh", crit[SIGMA_B2] * 1.001, SIGMA_B2).correlation_depth_scale
    xi_far = max(p["correlation_depth_scale"] for p in points if abs(p["chi1"] - 1) > 0.1)
    checks.append(
        Check.above(
            "correlation depth scale xi_c diverges at the critical line: xi_c(0.1% above) / "
            "max xi_c(|chi_1 - 1| > 0.1)",
            published="diverges",
            measured=xi_near / xi_far,
            limit=10,
        )
    )
    tables = [
        Table(
            f"tanh, sigma_b^2 = {SIGMA_B2}: theory vs measured per-layer factor of ||dL/dh||^2 "
            f"(width {width}, depth {depth}, {seeds} seed{'s' * (seeds > 1)})",
            [
                "sigma_w^2",
                "phase",
                "chi_1 (theory)",
                "predict() on the nets",
                "measured",
                "-1/log chi_1",
                "xi_c",
            ],
            [
                [
                    p["sigma_w2"],
                    p["phase"],
                    p["chi1"],
                    p["predicted_finite"],
                    p["measured"],
                    p["depth_scale"],
                    p["correlation_depth_scale"],
                ]
                for p in points
            ],
        ),
        Table(
            "tanh critical line sigma_w^2(sigma_b^2)",
            ["sigma_b^2", "published", "computed"],
            [[b, PUBLISHED_CRITICAL[b], round(crit[b], 4)] for b in PUBLISHED_CRITICAL],
        ),
    ]
    plots = save_figure(_plot_chi(points, quick), out, "chi1")
    fig = theory.phase_diagram(
        "tanh",
        sigma_w2=(0.5, 4.0),
        sigma_b2=(0.0, 0.3),
        resolution=12 if quick else 25,
        markers=[(1.0, SIGMA_B2, f"chi_1 = {chi_at_1.chi1:.3f}")],
    )
    ax = fig.axes[0]
    ax.plot(
        list(PUBLISHED_CRITICAL.values()),
        list(PUBLISHED_CRITICAL),
        "o",
        mfc="none",
        mec="k",
        label="published critical points",
    )
    from vanishing.theory import _legend_below

    _legend_below(ax)  # where theory.phase_diagram puts it: inside, it covers the critical line
    plots += save_figure(fig, out, "phase")
    crit_point = next(p for p in points if p["phase"] == "critical")
    summary = (
        f"Deep random tanh nets (width {width}, depth {depth}) back-propagate with a measured "
        f"per-layer factor of ||dL/dh||^2 within {max(abs(p['measured'] / p['chi1'] - 1) for p in points):.1%} "
        f"of the mean-field chi_1 from sigma_w^2 = 1 (chi_1 = {points[0]['chi1']:.3f}, measured "
        f"{points[0]['measured']:.3f}) to 4 (chaotic); on the critical line "
        f"(sigma_w^2 = {crit_point['sigma_w2']:.4f}) it is {crit_point['measured']:.3f}. The "
        "computed critical line matches the published one to 1e-4."
    )
    rep = Reproduction(
        name="meanfield",
        title=TITLE,
        citation=CITATION,
        checks=checks,
        tables=tables,
        plots=plots,
        out=out,
        quick=quick,
        settings={
            "width": width,
            "depth": depth,
            "batch": batch,
            "seeds": seeds,
            "seed": seed,
            "sigma_b2": SIGMA_B2,
            "sigma_w2_grid": grid,
            "seconds": round(time.perf_counter() - started, 1),
        },
        summary=summary,
    )
    (out / "meanfield.json").write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    return rep


def _plot_chi(points: list[dict], quick: bool):
    from matplotlib.figure import Figure

    from vanishing import theory

    ws = np.linspace(0.6, 4.2, 30 if quick else 60)
    curve = [theory.mean_field("tanh", w, SIGMA_B2) for w in ws]
    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    a, b = fig.subplots(1, 2)
    a.plot(ws, [r.chi1 for r in curve], label=r"theory $\chi_1$")
    a.plot(
        [p["sigma_w2"] for p in points],
        [p["measured"] for p in points],
        "o",
        label="measured (geometric mean over depth)",
    )
    a.axhline(1.0, color="0.5", lw=0.8, ls="--")
    a.axvline(theory.critical_sigma_w2("tanh", SIGMA_B2), color="k", lw=0.8, ls=":")
    a.set_xlabel(r"$\sigma_w^2$")
    a.set_ylabel(r"per-layer factor of $\|\partial L / \partial h\|^2$")
    a.set_title(rf"tanh, $\sigma_b^2 = {SIGMA_B2}$", fontsize=10)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.plot(ws, [abs(r.depth_scale) for r in curve], label=r"$|{-1/\log \chi_1}|$ (gradient)")
    b.plot(ws, [r.correlation_depth_scale for r in curve], label=r"$\xi_c$ (correlation)")
    b.set_yscale("log")
    b.set_xlabel(r"$\sigma_w^2$")
    b.set_ylabel("depth scale (layers)")
    b.set_title("depth scales diverge at the critical line", fontsize=10)
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    return fig
