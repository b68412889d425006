"""The selu reproduction: quick run passes its checks; its pieces against closed forms."""

import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from vanishing import theory
from vanishing.experiments.reproductions import selu


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return selu.reproduce(quick=True, out=tmp_path_factory.mktemp("selu") / "out")


def test_quick_run_passes_every_check(quick):
    failed = [(c.what, c.published, c.measured, c.tolerance) for c in quick.checks if not c.ok]
    assert not failed
    assert quick.ok and quick.name == "selu" and quick.quick


def test_quick_run_writes_plots_and_json(quick):
    assert sorted(p.name for p in quick.plots) == ["moments.png", "moments.svg"]
    data = json.loads((quick.out / "selu.json").read_text())
    assert data["name"] == "selu" and data["ok"] is True and quick.summary


def test_constants_match_the_closed_form():
    # E[selu(z)] = 0: alpha = phi(0) / (1/2 - e^{1/2} Phi(-1)), phi(0) = 1/sqrt(2 pi)
    alpha = (1 / math.sqrt(2 * math.pi)) / (0.5 - math.exp(0.5) * norm.cdf(-1))
    # E[selu(z)^2] = 1: lambda^-2 = 1/2 + alpha^2 (e^2 Phi(-2) - 2 e^{1/2} Phi(-1) + 1/2)
    neg2 = math.exp(2) * norm.cdf(-2) - 2 * math.exp(0.5) * norm.cdf(-1) + 0.5
    lam = 1 / math.sqrt(0.5 + alpha**2 * neg2)
    a, l_ = selu.solve_constants()
    assert a == pytest.approx(alpha, rel=1e-12) and l_ == pytest.approx(lam, rel=1e-12)
    assert a == pytest.approx(selu.ALPHA, rel=1e-12) and l_ == pytest.approx(selu.LAMBDA, rel=1e-12)


def test_theory_curve_of_relu_halves_and_selu_is_fixed():
    _, relu_var = selu._theory_curve("relu", 0.0, 1.0, 5)
    # ReLU, sigma_w^2 = 1: q_l = 2^-l; output variance E[relu^2] - E[relu]^2 = q (1/2 - 1/(2 pi))
    for l_, v in enumerate(relu_var):
        q = 2.0**-l_
        assert v == pytest.approx(q * (0.5 - 1 / (2 * math.pi)), rel=1e-9)
    m, v = selu._theory_curve("selu", 0.0, 1.0, 3)
    assert np.allclose(m, 0, atol=1e-9) and np.allclose(v, 1, atol=1e-9)


def test_monitor_moments_equal_a_direct_forward(tmp_path):
    import torch

    means, variances = selu.layer_moments(
        "selu", 0.3, 2.0, width=32, batch=64, depth=4, seed=5, run_dir=tmp_path / "r"
    )
    net = selu.build_net(32, 4, "selu", seed=5)
    g = torch.Generator().manual_seed(50_005)
    h = 0.3 + math.sqrt(2.0) * torch.randn(64, 32, generator=g, dtype=torch.float64)
    for i, m in enumerate(net):
        h = m(h)
        if i % 2 == 1:
            assert means[i // 2] == pytest.approx(float(h.mean()), abs=1e-6)
            assert variances[i // 2] == pytest.approx(float(h.var()), rel=1e-3)


def test_lecun_weights():
    w = selu.build_net(512, 1, "tanh", seed=0)[0].weight.detach()
    assert 512 * float(w.var()) == pytest.approx(1.0, rel=0.02)
    with pytest.raises(ValueError, match="activation must be"):
        selu.build_net(4, 1, "gelu", seed=0)


def test_fixed_point_of_the_length_map_is_one():
    assert theory.length_map("selu", 1.0, 1.0) == pytest.approx(1.0, abs=1e-12)
