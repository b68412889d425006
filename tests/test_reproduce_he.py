"""`vanishing reproduce he`: the quick run passes its checks; the pieces agree with the closed
form n Var[w] / 2, a numpy forward pass and plain autograd."""

import json

import numpy as np
import pytest
import torch
from scipy import integrate

from vanishing.experiments.reproductions import he


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("he") / "out"
    calls = []
    result = he.reproduce(quick=True, out=out, progress=lambda d, t: calls.append((d, t)))
    return result, out, calls


def test_quick_run_passes_every_check_and_writes_its_files(quick):
    result, out, calls = quick
    failed = [c.what for c in result.checks if not c.ok]
    assert not failed, failed
    assert result.name == "he" and result.quick and len(result.checks) == 5
    assert {p.name for p in result.plots} == {"he.png", "he.svg"}
    assert all(p.stat().st_size > 0 for p in result.plots)
    saved = json.loads((out / "he.json").read_text())
    assert saved["name"] == "he" and saved["ok"] is True
    assert (out / "xavier-run" / "manifest.json").is_file()
    assert (out / "he-run" / "manifest.json").is_file()
    assert calls[-1][0] == calls[-1][1]


def test_quick_run_separates_the_two_inits(quick):
    result, _, _ = quick
    measured = [c.measured for c in result.checks]
    xavier, he_factor = measured[0], measured[1]
    assert 0.4 < xavier < 0.55 and 0.85 < he_factor < 1.1
    assert measured[3] > 2.2 > 1.0 > measured[4]  # stalled vs trained


def test_predicted_factor_is_half_the_gain_by_numeric_integration():
    relu2 = integrate.quad(
        lambda z: max(z, 0.0) ** 2 * np.exp(-z * z / 2) / np.sqrt(2 * np.pi), -np.inf, np.inf
    )[0]
    assert relu2 == pytest.approx(0.5, rel=1e-9)
    assert he.predicted_factor("xavier") == pytest.approx(1.0 * relu2, rel=1e-9)
    assert he.predicted_factor("he") == pytest.approx(2.0 * relu2, rel=1e-9)


@pytest.mark.parametrize("init", ["xavier", "he"])
def test_weights_have_variance_gain_over_fan_in(init):
    net = he.build_net(64, 500, 10, init=init, depth=3, seed=2)
    for linear, fan_in in zip([net[0], net[2], net[4]], [64, 500, 500]):
        w = linear.weight.detach().double()
        expected = he.GAINS[init] / fan_in
        # Var of a sample variance of N Gaussian draws: 2 sigma^4 / N; 5 standard errors
        assert abs(float(w.var()) - expected) < 5 * expected * np.sqrt(2 / w.numel())
        assert float(linear.bias.detach().abs().max()) == 0.0


def test_second_moments_equal_a_numpy_forward_pass():
    net = he.build_net(5, 7, 3, init="he", depth=4, seed=1).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    W = [m.weight.detach().numpy() for m in net if isinstance(m, torch.nn.Linear)]
    h, expected = x.numpy(), []
    for w in W:
        y = h @ w.T
        expected.append((y**2).mean())
        h = np.maximum(y, 0)
    np.testing.assert_allclose(he.second_moments(net, x), expected, rtol=1e-12)


@pytest.mark.parametrize("init,factor", [("xavier", 0.5), ("he", 1.0)])
def test_a_wide_net_follows_the_closed_form_layer_by_layer(init, factor):
    torch.manual_seed(0)
    net = he.build_net(32, 2000, 2000, init=init, depth=5, seed=3)
    m = he.second_moments(net, torch.randn(256, 32))
    # at width 2000 each layer's factor is within a few % of n Var[w] / 2
    np.testing.assert_allclose(m[1:] / m[:-1], factor, rtol=0.06)


def test_recorded_gradients_at_step_zero_equal_autograd(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(120, 64), torch.randint(0, 10, (120,))
    rec = he.train_net(
        x, y, init="he", width=24, steps=1, run_dir=tmp_path / "r", seed=5, record_every=1
    )
    net = he.build_net(64, 24, 10, init="he", seed=5)
    idx = torch.randint(0, 120, (he.BATCH,), generator=torch.Generator().manual_seed(5))
    loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
    loss.backward()
    expected = [float(m.weight.grad.norm()) for m in net if isinstance(m, torch.nn.Linear)]
    np.testing.assert_allclose(rec["grad_norm"][0], expected, rtol=1e-5)
    assert rec["loss"][0] == pytest.approx(float(loss.detach()), rel=1e-6)


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="init must be one of"):
        he.build_net(3, 3, 2, init="kaiming")
    with pytest.raises(ValueError, match="depth >= 2"):
        he.build_net(3, 3, 2, init="he", depth=1)
    with pytest.raises(ValueError, match="init must be one of"):
        he.predicted_factor("glorot")
    with pytest.raises(ValueError, match="positive"):
        he.train_net(
            torch.zeros(4, 3), torch.zeros(4), init="he", width=2, steps=0, run_dir=tmp_path
        )
