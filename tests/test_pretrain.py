"""Greedy layer-wise pretraining: it improves what each layer keeps of its input (judged by the
best linear decoder, solved exactly), reports honest losses, and leaves a working model."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from vanishing.experiments.models import build_model, mlp
from vanishing.experiments.pretrain import layerwise_pretrain
from vanishing.experiments.tasks import make_task


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task():
    return make_task("digits", n_train=512, n_test=64)


def _best_linear_error(unit, h):
    """Mean squared error of the least-squares affine reconstruction of ``h`` from unit(h)."""
    with torch.no_grad():
        code = unit(h).double().numpy()
    a = np.concatenate([code, np.ones((len(code), 1))], 1)
    target = h.double().numpy()
    solution = np.linalg.lstsq(a, target, rcond=None)[0]
    return float(((a @ solution - target) ** 2).mean())


def test_pretraining_makes_every_layer_keep_more_of_its_input(task):
    """Saturated sigmoid layers (N(0, 1) weights) lose information about their input; after
    pretraining, even the best linear decoder reconstructs each layer's input better, layer
    by layer on the same inputs. The returned losses (an SGD-trained decoder) cannot beat the
    least-squares optimum."""
    torch.manual_seed(0)
    model = build_model(task, depth=3, width=32, activation="sigmoid", init="normal")
    original = copy.deepcopy(model)
    losses = layerwise_pretrain(model, task.x_train, steps=300, lr=0.5, seed=0)
    assert len(losses) == 3
    h = model.flatten(task.x_train)
    for unit, before_unit, reported in zip(model.hidden, original.hidden, losses):
        before, after = _best_linear_error(before_unit, h), _best_linear_error(unit, h)
        assert after < 0.9 * before, (before, after)
        assert reported >= after - 1e-6
        with torch.no_grad():
            h = unit(h)


def test_pretraining_leaves_the_model_usable(task):
    torch.manual_seed(1)
    model = build_model(task, depth=2, width=16, activation="tanh", norm="batch")
    model.eval()
    ids = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    head = copy.deepcopy(model.head.state_dict())
    first = model.hidden[0].linear.weight.detach().clone()
    layerwise_pretrain(model, task.x_train, steps=20, batch_size=32)
    assert not model.training  # mode restored
    assert [id(p) for p in model.parameters()] == ids
    assert all(torch.equal(v, model.head.state_dict()[k]) for k, v in head.items())
    assert not torch.equal(first, model.hidden[0].linear.weight)
    assert all(p.grad is None for p in model.parameters())
    out = model(task.x_test)
    assert out.shape == (64, 10)
    before = task.loss(out, task.y_test).item()
    model.train()
    for _ in range(30):  # the optimizer made before pretraining still drives the same tensors
        opt.zero_grad()
        task.loss(model(task.x_train), task.y_train).backward()
        opt.step()
    model.eval()
    assert task.loss(model(task.x_test), task.y_test).item() < before


def test_pretraining_is_deterministic_given_the_seed(task):
    def run(seed):
        torch.manual_seed(0)
        model = build_model(task, depth=2, width=8)
        losses = layerwise_pretrain(model, task.x_train, steps=10, seed=seed)
        return losses, model.hidden[1].linear.weight.detach()

    (la, wa), (lb, wb), (lc, _) = run(3), run(3), run(4)
    assert la == lb and torch.equal(wa, wb) and la != lc


def test_legacy_flat_and_residual_mlps_are_supported():
    x = torch.randn(128, 6)
    flat = mlp(6, 2, depth=3, width=5, activation="sigmoid", norm="layer")
    assert len(layerwise_pretrain(flat, x, steps=5)) == 3
    residual = mlp(6, 2, depth=3, width=5, residual=True)
    assert len(layerwise_pretrain(residual, x, steps=5, batch_size=0)) == 3
    assert flat(x).shape == residual(x).shape == (128, 2)


def test_non_mlp_models_and_bad_steps_are_clear_errors(task):
    cnn = build_model(task, kind="cnn", depth=1, width=4)
    with pytest.raises(ValueError, match="layer-wise pretraining needs an MLP"):
        layerwise_pretrain(cnn, task.x_train, steps=5)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        layerwise_pretrain(mlp(64, 10, depth=1), task.x_train.flatten(1), steps=0)
    with pytest.raises(ValueError, match="needs an MLP"):
        layerwise_pretrain(nn.Sequential(nn.ReLU()), task.x_train, steps=5)


def test_batch_size_0_is_the_full_batch_as_in_the_runner(task):
    """0 and anything >= the data size both mean the full batch (no sampling at all)."""

    def run(batch_size):
        torch.manual_seed(0)
        model = build_model(task, depth=2, width=8)
        losses = layerwise_pretrain(model, task.x_train, steps=5, batch_size=batch_size)
        return losses, model.hidden[1].linear.weight.detach()

    (l0, w0), (ln, wn) = run(0), run(len(task.x_train) + 1)
    assert l0 == ln and torch.equal(w0, wn)
