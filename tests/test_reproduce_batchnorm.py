"""`vanishing reproduce batchnorm`: the quick run passes its checks; the mean-field rate
matches pi/(pi-1) and numeric integration; the monitored norms equal plain autograd."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from vanishing.experiments.reproductions import batchnorm


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("batchnorm") / "out"
    calls = []
    result = batchnorm.reproduce(quick=True, out=out, progress=lambda d, t: calls.append((d, t)))
    return result, out, calls


def test_quick_run_passes_every_check_and_writes_its_files(quick):
    result, out, calls = quick
    failed = [c.what for c in result.checks if not c.ok]
    assert not failed, failed
    assert result.name == "batchnorm" and result.quick and len(result.checks) == 7
    assert {p.name for p in result.plots} == {"batchnorm.png", "batchnorm.svg"}
    assert all(p.stat().st_size > 0 for p in result.plots)
    saved = json.loads((out / "batchnorm.json").read_text())
    assert saved["name"] == "batchnorm" and saved["ok"] is True
    assert calls[-1][0] == calls[-1][1] == len(calls)


def test_quick_run_bn_explodes_and_plain_does_not(quick):
    result, _, _ = quick
    rows = {(r[0], r[1]): r for r in result.tables[0].rows}
    bn_relu = [r for r in result.tables[0].rows if r[0] == "relu" and r[1] == "yes"]
    assert all(1.4 < r[4] < 1.55 for r in bn_relu)
    assert 0.94 < rows[("relu", "no")][5] < 1.06


def test_relu_rate_is_pi_over_pi_minus_one():
    # E[relu'^2] = 1/2, E[relu] = 1/sqrt(2 pi), E[relu^2] = 1/2: (1/2) / (1/2 - 1/(2 pi))
    assert 0.5 / (0.5 - 1 / (2 * math.pi)) == pytest.approx(math.pi / (math.pi - 1), rel=1e-15)
    assert batchnorm.bn_gradient_rate("relu") == pytest.approx(batchnorm.PUBLISHED_RATE, rel=1e-12)


def test_tanh_rate_matches_scipy_integration():
    def expect(f):
        return integrate.quad(
            lambda z: f(z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi), -np.inf, np.inf
        )[0]

    expected = expect(lambda z: (1 - math.tanh(z) ** 2) ** 2) / expect(lambda z: math.tanh(z) ** 2)
    assert batchnorm.bn_gradient_rate("tanh") == pytest.approx(expected, rel=1e-9)


def test_monitored_norms_equal_autograd(tmp_path):
    net = batchnorm.build_net(12, 4, seed=7)
    got = batchnorm.gradient_sq_norms(net, 20, run_dir=tmp_path / "r", seed=3)
    net = batchnorm.build_net(12, 4, seed=7)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 12, generator=g), torch.randn(20, 10, generator=g)
    h, outputs = x, []
    linears = [m for m in net if isinstance(m, torch.nn.Linear)][:-1]
    for module in net:
        h = module(h)
        if module in linears:
            h.retain_grad()
            outputs.append(h)
    ((h - y) ** 2).sum().div(20).backward()
    np.testing.assert_allclose(
        got["weight"], [float(m.weight.grad.pow(2).sum()) for m in linears], rtol=1e-5
    )
    np.testing.assert_allclose(
        got["error"], [float(u.grad.pow(2).sum()) for u in outputs], rtol=1e-5
    )


def test_batch_norm_makes_the_factors_independent_of_the_weight_scale(tmp_path):
    # BN(c u) = BN(u): scaling every block's weights by c divides each block's gradient by c,
    # so the per-layer factors are unchanged (the paper: no weight variance removes the blow-up).
    # Exact up to BN's eps, made negligible here (at 1e-5 it moves these norms by ~0.5%)
    def net(scale):
        model = batchnorm.build_net(32, 6, seed=1)
        with torch.no_grad():
            for m in model[:-1]:
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(scale)
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.eps = 1e-12
        return model

    base = batchnorm.gradient_sq_norms(net(1.0), 64, run_dir=tmp_path / "a")
    scaled = batchnorm.gradient_sq_norms(net(3.0), 64, run_dir=tmp_path / "b")
    np.testing.assert_allclose(scaled["weight"], base["weight"] / 9, rtol=1e-4)
    np.testing.assert_allclose(scaled["error"], base["error"] / 9, rtol=1e-4)


def test_per_layer_rate_uses_the_input_half_past_the_skipped_ratios():
    g = np.array([100.0, 1.0, 8.0, 4.0, 2.0, 1.0, 1.0, 1.0])  # ratios 100, 1/8, 2, 2, 2, 1, 1
    assert batchnorm.per_layer_rate(g) == pytest.approx(2.0)  # ratios 2..3 of the first 4
    assert batchnorm.per_layer_rate(g, skip=0) == pytest.approx((100 * 0.125 * 2 * 2) ** 0.25)


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="activation must be one of"):
        batchnorm.bn_gradient_rate("gelu")
    with pytest.raises(ValueError, match="odd number"):
        batchnorm.bn_gradient_rate("relu", points=10)
    with pytest.raises(ValueError, match="positive"):
        batchnorm.build_net(0, 3)
    with pytest.raises(ValueError, match="at least 2 examples"):
        batchnorm.gradient_sq_norms(batchnorm.build_net(4, 2), 1, run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="positive and finite"):
        batchnorm.per_layer_rate([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="no ratio"):
        batchnorm.per_layer_rate([1.0, 2.0, 3.0])
