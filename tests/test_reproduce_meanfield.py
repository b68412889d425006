"""The meanfield reproduction: quick run passes its checks; its pieces against hand-derived math."""

import json
import math

import numpy as np
import pytest
import torch

from vanishing import theory
from vanishing.experiments.reproductions import meanfield


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("meanfield") / "out"
    return meanfield.reproduce(quick=True, out=out)


def test_quick_run_passes_every_check(quick):
    failed = [(c.what, c.published, c.measured, c.tolerance) for c in quick.checks if not c.ok]
    assert not failed
    assert quick.ok and quick.name == "meanfield" and quick.quick


def test_quick_run_writes_plots_and_json(quick):
    names = sorted(p.name for p in quick.plots)
    assert names == ["chi1.png", "chi1.svg", "phase.png", "phase.svg"]
    assert all(p.stat().st_size > 0 for p in quick.plots)
    data = json.loads((quick.out / "meanfield.json").read_text())
    assert data["name"] == "meanfield" and data["ok"] is True
    assert len(data["checks"]) == len(quick.checks) and quick.summary


def test_quick_run_covers_every_phase(quick):
    phases = {row[1] for row in quick.tables[0].rows}
    assert phases == {"ordered", "critical", "chaotic"}


def test_net_has_the_asked_variances():
    net = meanfield.build_net(512, 3, 2.0, 0.1, seed=0)
    w = net[0].weight.detach()
    assert 512 * float(w.var()) == pytest.approx(2.0, rel=0.02)
    assert float(torch.cat([net[i].bias for i in (0, 2, 4)]).var()) == pytest.approx(0.1, rel=0.15)


def test_measured_factor_agrees_with_the_theory(tmp_path):
    # measured (monitor) vs predict() on the same net vs the infinite-width chi_1
    m, p = meanfield.measure_factor(256, 20, 1.2, 0.05, seed=3, batch=32, run_dir=tmp_path / "r")
    assert m == pytest.approx(p, rel=0.05)
    assert p == pytest.approx(theory.mean_field("tanh", 1.2, 0.05).chi1, rel=0.03)


def test_measurement_equals_autograd(tmp_path):
    # the monitor's recorded error norms give the same factor as plain autograd on the same net
    width, depth, sw2, sb2, seed, batch = 64, 6, 1.5, 0.05, 7, 8
    m, _ = meanfield.measure_factor(
        width, depth, sw2, sb2, seed=seed, batch=batch, run_dir=tmp_path / "r"
    )
    net = meanfield.build_net(width, depth, sw2, sb2, seed=seed)
    r = theory.mean_field("tanh", sw2, sb2)
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(batch, width, generator=g, dtype=torch.float64) * math.sqrt(
        (r.q_star - sb2) / sw2
    )
    d = torch.randn(batch, width, generator=g, dtype=torch.float64)
    hs, h = [], x
    for mod in net:
        h = mod(h)
        if isinstance(mod, torch.nn.Linear):
            h.retain_grad()
            hs.append(h)
    (h * d).sum().backward()
    norms = np.array([float(t.grad.norm()) for t in hs])
    assert m == pytest.approx((norms[0] / norms[-1]) ** (2 / (depth - 1)), rel=1e-5)
