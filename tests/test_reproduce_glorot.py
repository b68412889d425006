"""`vanishing reproduce glorot`: the quick run passes its checks, and its pieces agree with
closed forms, numeric integration and a hand-written numpy backprop."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from vanishing.experiments.reproductions import glorot


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("glorot") / "out"
    calls = []
    result = glorot.reproduce(quick=True, out=out, progress=lambda d, t: calls.append((d, t)))
    return result, out, calls


def test_quick_run_passes_every_check_and_writes_its_files(quick):
    result, out, calls = quick
    failed = [c.what for c in result.checks if not c.ok]
    assert not failed, failed
    assert result.name == "glorot" and result.quick
    assert len(result.checks) >= 8
    names = {p.name for p in result.plots}
    assert names == {
        "init-variances.png",
        "init-variances.svg",
        "sigmoid-saturation.png",
        "sigmoid-saturation.svg",
    }
    assert all(p.is_file() and p.stat().st_size > 0 for p in result.plots)
    saved = json.loads((out / "glorot.json").read_text())
    assert saved["name"] == "glorot" and saved["ok"] is True
    assert len(saved["checks"]) == len(result.checks)
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert result.summary and result.tables


def test_quick_run_standard_factor_is_near_one_third_and_normalized_near_one(quick):
    result, _, _ = quick
    by_what = {c.what: c for c in result.checks}
    std = by_what["standard init: per-layer factor of Var[dC/ds] going back (geometric mean)"]
    norm = by_what["normalized init: per-layer factor of Var[dC/ds] going back (geometric mean)"]
    assert 0.25 < std.measured < 0.36
    assert 0.85 < norm.measured < 1.05


@pytest.mark.parametrize("n_in,n_out", [(1000, 1000), (64, 300), (300, 10)])
def test_sampled_weights_have_the_variance_of_the_uniform_law(n_in, n_out):
    for init, expected in (
        ("standard", 1 / (3 * n_in)),
        ("normalized", 2 / (n_in + n_out)),
    ):
        assert glorot.uniform_limit(n_in, n_out, init) ** 2 / 3 == pytest.approx(expected)
        net = glorot.build_net([n_in, n_out, 2], init=init, seed=1)
        w = net[0].weight.detach().double()
        a = glorot.uniform_limit(n_in, n_out, init)
        assert float(w.abs().max()) <= a
        # the sample variance of n_in * n_out uniform draws: within 5 standard errors
        se = expected * math.sqrt(0.8 / w.numel())  # Var of X^2 for U[-a, a] is (4/45) a^4
        assert abs(float(w.var()) - expected) < 5 * se


def test_gaussian_expectation_matches_closed_forms_and_scipy():
    q = np.array([0.01, 0.5, 2.0])
    np.testing.assert_allclose(glorot.gaussian_expectation(lambda u: u**2, q), q)
    np.testing.assert_allclose(glorot.gaussian_expectation(lambda u: u**4, q), 3 * q**2)
    np.testing.assert_allclose(
        glorot.gaussian_expectation(lambda u: np.maximum(u, 0) ** 2, q), q / 2, rtol=1e-3
    )
    for qq in (0.1, 1.0, 3.0):

        def density(z, qq=qq):
            return np.tanh(math.sqrt(qq) * z) ** 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

        expected, _ = integrate.quad(density, -np.inf, np.inf)
        assert glorot.gaussian_expectation(lambda u: np.tanh(u) ** 2, qq) == pytest.approx(
            expected, rel=1e-5
        )  # 101 nodes: accurate to ~1e-6 here, far inside the checks' 5%


def test_mean_field_is_one_third_and_one_in_the_linear_regime():
    sizes = [64, 1000, 1000, 1000, 1000, 1000, 10]
    std = glorot.mean_field_variances([1e-8], sizes, "standard")
    norm = glorot.mean_field_variances([1e-8], sizes, "normalized")
    np.testing.assert_allclose(std["back_ratio"][:-1], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(norm["back_ratio"][:-1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(std["act"][1:] / std["act"][:-1], 1 / 3, rtol=1e-6)
    assert math.isnan(std["back_ratio"][-1])


def test_mean_field_follows_the_variance_map_by_hand():
    # one example with ||x||^2 = 64: q1 = Var[W] * 64 = 1/3; q2 = (1/3) E[tanh(sqrt(q1) z)^2]
    sizes = [64, 1000, 1000, 10]
    mf = glorot.mean_field_variances([64.0], sizes, "standard")

    def expect(f, q):
        return integrate.quad(
            lambda z: f(math.sqrt(q) * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
            -np.inf,
            np.inf,
        )[0]

    q1 = 1 / 3
    e1 = expect(lambda u: math.tanh(u) ** 2, q1)
    q2 = e1 / 3
    assert mf["act"][0] == pytest.approx(e1, rel=1e-8)
    assert mf["act"][1] == pytest.approx(expect(lambda u: math.tanh(u) ** 2, q2), rel=1e-8)
    chi = expect(lambda u: (1 - math.tanh(u) ** 2) ** 2, q1) / 3
    assert mf["back_ratio"][0] == pytest.approx(chi, rel=1e-8)


def test_init_statistics_match_a_numpy_backprop():
    torch.manual_seed(0)
    net = glorot.build_net([6, 9, 7, 4], init="normalized", seed=3).double()
    x = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    stats = glorot.init_statistics(net, x, y)
    W = [m.weight.detach().numpy() for m in net if isinstance(m, torch.nn.Linear)]
    xs = x.numpy()
    s1 = xs @ W[0].T
    h1 = np.tanh(s1)
    s2 = h1 @ W[1].T
    h2 = np.tanh(s2)
    logits = h2 @ W[2].T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    d_out = (p - np.eye(4)[y.numpy()]) / len(xs)  # mean cross-entropy
    d2 = (d_out @ W[2]) * (1 - h2**2)
    d1 = (d2 @ W[1]) * (1 - h1**2)
    np.testing.assert_allclose(stats["act"], [h1.var(ddof=1), h2.var(ddof=1)], rtol=1e-10)
    np.testing.assert_allclose(stats["grad"], [d1.var(ddof=1), d2.var(ddof=1)], rtol=1e-10)


def test_monitored_sigmoid_means_equal_a_direct_forward_at_step_zero(tmp_path):
    x, y = torch.rand(200, 64), torch.randint(0, 10, (200,))
    rec = glorot.train_sigmoid(x, y, steps=5, run_dir=tmp_path / "r", seed=4, record_every=5)
    net = glorot.build_net(
        [64, *[glorot.SIGMOID_WIDTH] * glorot.SIGMOID_DEPTH, 10],
        init="standard",
        activation="sigmoid",
        seed=4,
    )
    # the first batch: the same seeded draw as train_sigmoid's
    idx = torch.randint(0, 200, (glorot.SIGMOID_BATCH,), generator=torch.Generator().manual_seed(4))
    h, means = x[idx], []
    for module in net.requires_grad_(False):
        h = module(h)
        if isinstance(module, torch.nn.Sigmoid):
            means.append(float(h.mean()))
    assert rec["step"].tolist() == [0]
    np.testing.assert_allclose(rec["act_mean"][0], means, rtol=1e-5)


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="init must be one of"):
        glorot.uniform_limit(3, 3, "xavier")
    with pytest.raises(ValueError, match="activation must be"):
        glorot.build_net([3, 3, 2], init="standard", activation="relu")
    with pytest.raises(ValueError, match="variance"):
        glorot.gaussian_expectation(np.tanh, -1.0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty directory"):
        glorot.reproduce(quick=True, out=tmp_path / "full")
