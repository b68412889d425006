"""The Pascanu et al. reproduction: its quick run passes its checks; its pieces against oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vanishing.experiments.reproductions import pascanu as P


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return P.reproduce(quick=True, out=tmp_path_factory.mktemp("pascanu") / "out")


def test_quick_run_passes_every_check_and_writes_its_files(quick):
    failed = [c.to_dict() for c in quick.checks if not c.ok]
    assert not failed, failed
    assert sorted(p.name for p in quick.plots) == ["pascanu.png", "pascanu.svg"]
    record = json.loads((quick.out / "pascanu.json").read_text())
    assert record["ok"] is True and record["name"] == "pascanu"
    assert record["runs"]["unclipped"]["diverged"] is True
    assert record["runs"]["clipped"]["diverged"] is False
    for name in ("unclipped", "clipped"):  # both trained under the monitor
        assert (quick.out / name / "manifest.json").exists()
    assert len(quick.tables) == 2 and quick.summary


def test_jacobian_of_a_linear_regime_is_the_matrix_power():
    """Closed form: with U = 0, b = 0, h_0 = 0 every pre-activation is 0, tanh' = 1, so
    dh_t/dh_0 = W^t; for W = lambda Q (Q orthogonal) its norm is lambda^t exactly."""
    H, T, lam = 6, 8, 0.7
    q, _ = torch.linalg.qr(
        torch.randn(H, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    )
    zero = torch.zeros(H, dtype=torch.float64)
    r = P.jacobian_norms(
        lam * q,
        torch.zeros(H, 2, dtype=torch.float64),
        zero,
        torch.zeros(T, 2, dtype=torch.float64),
        zero,
    )
    np.testing.assert_allclose(r["measured"], lam ** np.arange(1, T + 1), rtol=1e-10)
    np.testing.assert_allclose(r["bound"], r["measured"], rtol=1e-10)  # the bound is tight here


def test_jacobian_norm_matches_finite_differences_and_obeys_the_bound():
    H, T = 5, 6
    g = torch.Generator().manual_seed(2)
    W = P.scaled_recurrent_weight(H, 1.3, seed=3)
    U = torch.randn(H, 2, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(H, generator=g, dtype=torch.float64)
    x = torch.rand(T, 2, generator=g, dtype=torch.float64)
    h0 = 0.3 * torch.randn(H, generator=g, dtype=torch.float64)
    r = P.jacobian_norms(W, U, b, x, h0)

    def final(h):
        for t in range(T):
            h = torch.tanh(W @ h + U @ x[t] + b)
        return h

    eps = 1e-6
    cols = [
        (final(h0 + eps * e) - final(h0 - eps * e)) / (2 * eps)
        for e in torch.eye(H, dtype=torch.float64)
    ]
    fd = torch.stack(cols, dim=1)
    assert r["measured"][-1] == pytest.approx(float(torch.linalg.matrix_norm(fd, ord=2)), rel=1e-6)
    assert (r["measured"] <= r["bound"] * (1 + 1e-12)).all()
    assert (r["bound"] <= r["lambda_bound"] * (1 + 1e-12)).all()


def test_scaled_weight_has_the_asked_largest_singular_value():
    for lam in (0.5, 1.0, 3.0):
        s = torch.linalg.svdvals(P.scaled_recurrent_weight(12, lam, seed=4))
        assert float(s[0]) == pytest.approx(lam, rel=1e-12)
        assert float(s[-1]) < lam  # a random matrix, not a scaled orthogonal one


def test_recorded_norms_are_algorithm_1(tmp_path):
    """Oracle: Algorithm 1 rescales g to threshold * g / ||g|| when ||g|| > threshold, so the
    norm the optimizer sees is min(||g||, threshold) (torch adds 1e-6 to the denominator)."""
    r = P.train_clipping(0.5, T=6, steps=20, run_dir=tmp_path / "r")
    expected = np.minimum(r.norm_backward, 0.5 * r.norm_backward / (r.norm_backward + 1e-6))
    np.testing.assert_allclose(r.norm_step, expected, rtol=1e-5)
    assert (r.norm_backward > 0.5).any()  # clipping engaged at least once


def test_bad_input_is_a_one_line_value_error(tmp_path):
    with pytest.raises(ValueError, match="lambda_1 > 0"):
        P.scaled_recurrent_weight(4, -1.0)
    with pytest.raises(ValueError, match="threshold must be"):
        P.train_clipping(0.0, run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="seed must be"):
        P.reproduce(quick=True, seed=-2, out=tmp_path / "x")
