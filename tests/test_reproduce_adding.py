"""The adding-problem reproduction: its quick run passes its checks, and its pieces against oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vanishing.experiments.reproductions import adding as A
from vanishing.experiments.tasks import make_task
from vanishing.experiments.train import minibatches


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("adding") / "out"
    return A.reproduce(quick=True, out=out)


def test_quick_run_passes_every_check_and_writes_its_files(quick):
    failed = [c.to_dict() for c in quick.checks if not c.ok]
    assert not failed, failed
    assert quick.name == "adding" and quick.quick
    names = sorted(p.name for p in quick.plots)
    assert names == ["adding.png", "adding.svg"]
    assert all(p.stat().st_size > 0 for p in quick.plots)
    record = json.loads((quick.out / "adding.json").read_text())
    assert record["ok"] is True and set(record["models"]) == set(A.MODELS)
    for kind in A.MODELS:  # each net was trained under the monitor into its own run directory
        assert (quick.out / kind / "manifest.json").exists()
    assert len(quick.tables[0].rows) == 3 and quick.summary


def test_mean_baseline_is_the_variance_of_a_sum_of_two_uniforms():
    # closed form: Var(U1 + U2) = 2 / 12 for independent U[0, 1]; 40000 draws: sd of the
    # estimate ~ 0.0012
    task = make_task("adding", seq_len=10, n_train=40000, n_test=40000, standardize="none")
    assert A.mean_baseline(task.y_train, task.y_test) == pytest.approx(1 / 6, abs=0.005)
    # and the constant that scores it is the mean of the target, E = 1
    assert float(task.y_train.mean()) == pytest.approx(1.0, abs=0.01)


def test_models_start_as_the_papers_describe():
    H = 16
    irnn = A.build_model("irnn", T=5, hidden=H, seed=3).recurrent[0]
    assert irnn.nonlinearity == "relu"
    assert torch.equal(irnn.weight_hh_l0, torch.eye(H))
    assert not irnn.bias_ih_l0.any() and not irnn.bias_hh_l0.any()
    assert float(irnn.weight_ih_l0.detach().std()) == pytest.approx(A.IRNN_INPUT_STD, rel=0.3)
    lstm = A.build_model("lstm", T=5, hidden=H, seed=3).recurrent[0]
    # forget gate is PyTorch's second block (i, f, g, o): effective bias 1 + 0
    assert torch.equal(lstm.bias_ih_l0[H : 2 * H], torch.ones(H))
    assert torch.equal(lstm.bias_hh_l0[H : 2 * H], torch.zeros(H))
    tanh = A.build_model("tanh_rnn", T=5, hidden=H, seed=3).recurrent[0]
    w = tanh.weight_hh_l0
    assert tanh.nonlinearity == "tanh"
    assert torch.allclose(w @ w.T, torch.eye(H), atol=1e-5)
    # same seed, same weights
    again = A.build_model("tanh_rnn", T=5, hidden=H, seed=3).recurrent[0]
    assert torch.equal(again.weight_ih_l0, tanh.weight_ih_l0)


def test_recorded_time_profile_equals_autograd_at_the_first_step(tmp_path):
    """The monitor's dLoss/dx_t at t = 0 and T - 1 of step 0, against the same gradient by hand."""
    task = make_task("adding", seq_len=12, n_train=256, n_test=32, standardize="none")
    result = A.train_model("lstm", task, A.QUICK, steps=2, seed=5, run_dir=tmp_path / "r")
    model = A.build_model("lstm", T=12, hidden=A.QUICK.hidden["lstm"], seed=5)
    batches = minibatches(
        task.x_train,
        task.y_train,
        batch_size=A.QUICK.batch,
        generator=torch.Generator().manual_seed(5),
        replacement=True,
    )
    x, y = next(batches)
    x = x.clone().requires_grad_(True)
    task.loss(model(x), y).backward()
    per_step = x.grad.double().pow(2).sum(dim=(0, 2)).sqrt()
    assert result.profile_steps[0] == 0
    np.testing.assert_allclose(result.grad_first[0], float(per_step[0]), rtol=1e-5)
    np.testing.assert_allclose(result.grad_last[0], float(per_step[-1]), rtol=1e-5)
    assert result.ratio_init == pytest.approx(float(per_step[0] / per_step[-1]), rel=1e-5)


def test_tanh_rnn_gradient_through_time_shrinks_geometrically_at_init():
    """Oracle: for h_t = tanh(W h_{t-1} + U x_t), ||dh_T/dh_0|| <= ||W||^T; with W orthogonal
    scaled by 0.5 the input gradient at t = 0 is below 0.5^(T-1) times the one at T - 1 (up
    to the norm of U, the same factor at both ends)."""
    T, H = 20, 8
    net = A.build_model("tanh_rnn", T=T, hidden=H, seed=0)
    with torch.no_grad():
        net.recurrent[0].weight_hh_l0.mul_(0.5)
    x = torch.rand(4, T, 2, requires_grad=True)
    net(x).sum().backward()
    g = x.grad.pow(2).sum(dim=(0, 2)).sqrt()
    u = torch.linalg.matrix_norm(net.recurrent[0].weight_ih_l0, ord=2)
    head = torch.linalg.vector_norm(net.head.weight)
    # |dL/dx_0| <= 2 (batch sum, 4 rows of norm <= ||head|| ||U|| 0.5^(T-1)) ...
    bound = 2 * float((head * u).detach()) * 0.5 ** (T - 1)
    assert float(g[0]) <= bound
    assert float(g[0] / g[-1]) < 1e-3


def test_bad_input_is_a_one_line_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gru'"):
        A.build_model("gru", T=5, hidden=4, seed=0)
    with pytest.raises(ValueError, match="seed must be"):
        A.reproduce(quick=True, seed=-1, out=tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        A.reproduce(quick=True, out=tmp_path / "full")
