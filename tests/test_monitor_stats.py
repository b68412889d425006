"""Every recorded statistic against an independent computation of the same quantity."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import vanishing
from helpers import mlp, retain_outputs, row


def _twins(model, steps, optimizer=lambda params: torch.optim.Adam(params, lr=0.01)):
    """``model`` and an un-watched copy, an optimizer for each, and ``steps`` batches."""
    twin = copy.deepcopy(model)
    opt = optimizer(model.parameters())
    twin_opt = optimizer(twin.parameters())
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g))
        for _ in range(steps)
    ]
    return opt, twin, twin_opt, batches


def _train(model, opt, batches, after_step=lambda: None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after_step()


def _true_norms(twin, twin_opt, batches):
    """Per step, per parameter: (weight norm before the step, update norm), trained here."""
    out = []
    for x, y in batches:
        before = {n: p.detach().clone() for n, p in twin.named_parameters()}
        _train(twin, twin_opt, [(x, y)])
        out.append(
            {
                n: (
                    before[n].double().norm().item(),
                    (p.detach() - before[n]).double().norm().item(),
                )
                for n, p in twin.named_parameters()
            }
        )
    return out


def test_gradient_weight_and_update_norms_match_brute_force(run_dir):
    torch.manual_seed(0)
    model = mlp()
    opt, twin, twin_opt, batches = _twins(model, 4)
    expected = []  # per step: {name: (grad, weight, update)} from the un-watched twin
    for x, y in batches:
        twin_opt.zero_grad()
        loss = nn.functional.cross_entropy(twin(x), y)
        loss.backward()
        before = {n: p.detach().clone() for n, p in twin.named_parameters()}
        twin_opt.step()
        expected.append(
            (
                loss.item(),
                {
                    n: (
                        p.grad.double().norm().item(),
                        before[n].double().norm().item(),
                        (p.detach() - before[n]).double().norm().item(),
                    )
                    for n, p in twin.named_parameters()
                },
            )
        )
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 1, 2, 3]
    for step, (loss, per_param) in enumerate(expected):
        assert run.steps.loss[step] == pytest.approx(loss, rel=1e-6)
        for name, (gn, wn, un) in per_param.items():
            layer, _, param = name.rpartition(".")
            r = row(run, step, layer, param)
            assert r.grad_norm == pytest.approx(gn, rel=1e-5)
            assert r.param_norm == pytest.approx(wn, rel=1e-5)
            assert r.update_norm == pytest.approx(un, rel=1e-4)
            assert r.grad_ratio == pytest.approx(gn / wn, rel=1e-5)
            assert r.update_ratio == pytest.approx(un / wn, rel=1e-4)


def test_speed_of_learning_matches_nielsens_delta_recursion(run_dir):
    """Bias gradients from the backpropagation equations (BP1-BP4), derived by hand.

    Quadratic cost C = 1/(2n) sum_x ||a^L - y||^2, sigmoid everywhere:
    delta^L = (a^L - y) * s'(z^L);  delta^l = (W^{l+1}^T delta^{l+1}) * s'(z^l);
    dC/db^l = mean over the batch of delta^l.  Speed of learning of layer l = ||dC/db^l||.
    """
    torch.manual_seed(0)
    sizes = [6, 5, 5, 5, 2]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    model = nn.Sequential(*layers).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    y = torch.rand(10, 2, dtype=torch.float64)

    # hand-written forward and backward, no autograd
    with torch.no_grad():
        Ws = [m.weight.clone() for m in model if isinstance(m, nn.Linear)]
        bs = [m.bias.clone() for m in model if isinstance(m, nn.Linear)]
        a, zs, acts = x, [], [x]
        for W, b in zip(Ws, bs):
            z = a @ W.T + b
            a = torch.sigmoid(z)
            zs.append(z)
            acts.append(a)
        sp = [torch.sigmoid(z) * (1 - torch.sigmoid(z)) for z in zs]
        delta = (acts[-1] - y) * sp[-1]
        deltas = [delta]
        for layer in range(len(Ws) - 2, -1, -1):
            delta = (delta @ Ws[layer + 1]) * sp[layer]
            deltas.insert(0, delta)
        speeds = [d.mean(dim=0).norm().item() for d in deltas]

    with vanishing.watch(model, run_dir=run_dir):
        loss = 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()
        loss.backward()
    run = vanishing.load_run(run_dir)
    got = run.pivot("grad_norm", param="bias").iloc[0].tolist()
    assert got == pytest.approx(speeds, rel=1e-9)
    assert speeds[0] < speeds[-1]  # the first layer learns slowest: the problem itself


def test_error_signal_is_the_gradient_at_each_layer_output(run_dir):
    torch.manual_seed(0)
    model = mlp(depth=3)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    twin = copy.deepcopy(model)
    outs, handles = retain_outputs(
        twin, [n for n, m in twin.named_modules() if isinstance(m, nn.Linear)]
    )
    nn.functional.cross_entropy(twin(x), y).backward()
    for h in handles:
        h.remove()
    with vanishing.watch(model, run_dir=run_dir):
        nn.functional.cross_entropy(model(x), y).backward()
    run = vanishing.load_run(run_dir)
    for name, out in outs.items():
        assert row(run, 0, name, "").error_norm == pytest.approx(
            out.grad.double().norm().item(), rel=1e-6
        )


@pytest.mark.parametrize(
    "act,kind",
    [
        (nn.Sigmoid, "sigmoid"),
        (nn.Tanh, "tanh"),
        (nn.ReLU, "relu"),
        (nn.GELU, "gelu"),
        (nn.ELU, "elu"),
    ],
)
def test_activation_statistics_match_autograd_derivatives(run_dir, act, kind):
    torch.manual_seed(0)
    model = mlp(depth=2, width=16, act=act)
    with torch.no_grad():
        model[0].bias[:4] = -50.0  # four units of the first layer off (dead for relu)
    x, y = torch.randn(16, 5) * 3, torch.randint(0, 3, (16,))  # 256 outputs: exact percentiles
    with vanishing.watch(model, run_dir=run_dir):
        nn.functional.cross_entropy(model(x), y).backward()
    run = vanishing.load_run(run_dir)
    z = model[0](x).detach().requires_grad_(True)
    a = model[1](z)
    (d,) = torch.autograd.grad(a.sum(), z)
    r = row(run, 0, "1", "")
    assert r.act_mean == pytest.approx(a.mean().item(), rel=1e-5)
    assert r.act_std == pytest.approx(a.std().item(), rel=1e-5)
    # percentiles of the 256 outputs, nearest rank, as numpy's inverted_cdf computes them
    values = a.detach().flatten().double().numpy()
    assert r.act_p02 == pytest.approx(np.percentile(values, 2, method="inverted_cdf"), rel=1e-6)
    assert r.act_p98 == pytest.approx(np.percentile(values, 98, method="inverted_cdf"), rel=1e-6)
    assert r.act_deriv_mean == pytest.approx(d.mean().item(), rel=1e-5, abs=1e-7)
    if kind == "relu":
        dead = ((z <= 0).all(dim=0)).double().mean().item()
        assert r.act_dead == pytest.approx(dead) and dead >= 4 / 16
        assert math.isnan(r.act_saturated)
    elif kind in ("sigmoid", "tanh"):
        bound = 0.25 if kind == "sigmoid" else 1.0
        assert r.act_saturated == pytest.approx((d.abs() < 0.05 * bound).double().mean().item())
        assert r.act_saturated >= 4 / 16 * 0.9  # the pushed units sit in the tail


def test_nonfinite_counts_and_loss(run_dir):
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        model[0].weight.grad[0, :3] = float("nan")
        model[2].bias.grad[1] = float("inf")
        opt.step()
    run = vanishing.load_run(run_dir)
    assert row(run, 0, "0", "weight").grad_nonfinite == 3
    assert row(run, 0, "2", "bias").grad_nonfinite == 1
    assert row(run, 0, "2", "weight").grad_nonfinite == 0
    assert run.steps.grad_nonfinite[0] == 4
    assert run.steps.param_nonfinite[0] == 0
    assert run.steps.loss_nonfinite[0] == 0


def test_recurrent_temporal_profile_matches_input_gradients(run_dir):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.rnn = cell(3, 8, batch_first=True)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    for cell in (nn.RNN, nn.LSTM, nn.GRU):
        model = Net(cell)
        x = torch.randn(4, 20, 3)
        xx = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(copy.deepcopy(model)(xx).pow(2).mean(), xx)
        expected = gx.transpose(0, 1).reshape(20, -1).double().norm(dim=1).tolist()
        d = run_dir.parent / cell.__name__
        with vanishing.watch(model, run_dir=d):
            model(x).pow(2).mean().backward()
        t = vanishing.load_run(d).temporal
        assert t.layer.unique().tolist() == ["rnn"]
        assert t.t.tolist() == list(range(20))
        assert t.grad_norm.tolist() == pytest.approx(expected, rel=1e-6)
        assert expected[0] < expected[-1]  # the gradient fades back through time


def test_tiny_gradients_are_not_flushed_to_zero(run_dir):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with torch.no_grad():
        model[1].weight.fill_(1e-30)
    with vanishing.watch(model, run_dir=run_dir):
        model(torch.ones(2, 3)).sum().backward()
    r = row(vanishing.load_run(run_dir), 0, "0", "bias")
    assert r.grad_norm == pytest.approx(model[0].bias.grad.double().norm().item(), rel=1e-6)
    assert 0 < r.grad_norm < 1e-28


def test_inplace_activation_is_measured_when_it_runs(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias[:6] = -50.0
    x = torch.randn(32, 5)
    with vanishing.watch(model, run_dir=run_dir):
        model(x).sum().backward()
    z = model[0](x).detach()
    r = row(vanishing.load_run(run_dir), 0, "1", "")
    assert r.act_mean == pytest.approx(torch.relu(z).mean().item(), rel=1e-6)
    assert r.act_deriv_mean == pytest.approx((z > 0).double().mean().item())
    assert (
        r.act_dead == pytest.approx(((z <= 0).all(dim=0)).double().mean().item())
        and r.act_dead >= 6 / 16
    )


@pytest.mark.parametrize("layout", ["grouped", "per_tensor"])
def test_no_resident_snapshot_between_recorded_steps_and_updates_stay_exact(run_dir, layout):
    """every=3, low_memory: the parameters' copy is freed after each recorded step (the next
    is not recorded) and taken again at the next one; the update norms equal a brute-force
    twin's."""
    torch.manual_seed(0)
    model = mlp()
    if layout == "per_tensor":  # a non-contiguous weight: the per-tensor (device) path
        with torch.no_grad():
            model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())
        assert not model[0].weight.is_contiguous()
    opt, twin, twin_opt, batches = _twins(model, 7)
    expected = _true_norms(twin, twin_opt, batches)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    held = []
    watch = {"every": 3, "low_memory": True}
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, **watch) as mon:
        _train(model, opt, batches, lambda: held.append(mon.memory()["snapshot_held"]))
        assert mon.memory()["snapshot"] == size
    # the CPU's default keeps the copy (a new allocation costs page faults there)
    kept = []
    with vanishing.watch(twin, optimizer=twin_opt, run_dir=run_dir.parent / "kept", every=3) as mon:
        _train(twin, twin_opt, batches, lambda: kept.append(mon.memory()["snapshot_held"]))
    assert kept == [size] * 7
    # recorded: 0, 3, 6; each is followed by a step that is not: nothing held after any step
    assert held == [0] * 7
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 3, 6]
    for step in (0, 3, 6):
        for name, (_, un) in expected[step].items():
            layer, _, param = name.rpartition(".")
            assert row(run, step, layer, param).update_norm == pytest.approx(un, rel=1e-4)


def test_consecutive_recorded_steps_keep_one_snapshot(run_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir) as mon:
        assert mon.memory()["snapshot"] == 0  # taken at the first step
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])
            ).backward()
            opt.step()
            m = mon.memory()
            assert m["snapshot"] == m["snapshot_held"] == size
            assert m["held"] == size + m["activation_buffers"] + m["records"]
            assert m["records"] == mon._buffer.data.numel() * 8
    manifest = vanishing.load_run(run_dir).manifest
    assert manifest["memory"]["snapshot"] == size


def test_updates_exact_under_a_fused_optimizer_with_steps_not_recorded(run_dir):
    """AdamW(fused=True) (the Hugging Face Trainer's default) writes the weights without
    bumping their version counters: a snapshot kept from step 0 must not pass for step 2's."""
    torch.manual_seed(0)
    model = mlp()
    fused = lambda params: torch.optim.AdamW(params, lr=0.01, fused=True)  # noqa: E731
    opt, twin, twin_opt, batches = _twins(model, 5, fused)
    expected = _true_norms(twin, twin_opt, batches)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, every=2):
        _train(model, opt, batches)
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 2, 4]
    for step in (0, 2, 4):
        for name, (wn, un) in expected[step].items():
            layer, _, param = name.rpartition(".")
            r = row(run, step, layer, param)
            assert r.param_norm == pytest.approx(wn, rel=1e-5), (step, name)
            assert r.update_norm == pytest.approx(un, rel=1e-4), (step, name)
