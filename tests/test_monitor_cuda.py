"""The monitor on a CUDA device records what it records on the CPU (skipped without CUDA).

Each test trains the same model from the same weights on the same batches on both devices and
compares every recorded statistic. The GPU path computes norms differently (fused float64
``_foreach_norm``, per-call activation statistics), so this is its oracle.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import vanishing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Net(nn.Module):
    """Every statistic family: linear + batch norm, five activation kinds, an LSTM (temporal)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.act1 = nn.Sigmoid()
        self.fc2 = nn.Linear(16, 16)
        self.act2 = nn.GELU()
        self.fc3 = nn.Linear(16, 16)
        self.act3 = nn.PReLU()
        self.fc4 = nn.Linear(16, 16)
        self.act4 = nn.ReLU()
        self.rnn = nn.LSTM(16, 12, batch_first=True)
        self.act5 = nn.Tanh()
        self.head = nn.Linear(12, 3)

    def forward(self, x):  # x: [batch, time, 6]
        b, t, f = x.shape
        h = self.act1(self.bn(self.embed(x.reshape(b * t, f))))
        h = self.act4(self.fc4(self.act3(self.fc3(self.act2(self.fc2(h))))))
        out, _ = self.rnn(h.reshape(b, t, 16))
        return self.head(self.act5(out[:, -1]))


def _train(model, device, run_dir, steps=6):
    model = model.to(device)
    # SGD: Adam's update of a parameter whose gradient is ~0 (the bias before batch norm) is
    # g / (sqrt(v) + eps), chaotic in the last bits of g, so devices would legitimately differ
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(8, 10, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(steps)
    ]
    with vanishing.watch(model, opt, run_dir=run_dir, flush_every=4):
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
    return vanishing.load_run(run_dir)


def _close(a, b, rel, abs_=0.0):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    np.testing.assert_allclose(a[ok], b[ok], rtol=rel, atol=abs_)


def test_cuda_records_match_cpu(tmp_path):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = Net()
    cpu = _train(copy.deepcopy(model), "cpu", tmp_path / "cpu")
    gpu = _train(copy.deepcopy(model), "cuda", tmp_path / "gpu")
    assert cpu.layers == gpu.layers
    key = ["step", "layer", "param"]
    mc = cpu.metrics.sort_values(key).reset_index(drop=True)
    mg = gpu.metrics.sort_values(key).reset_index(drop=True)
    assert mc[key].equals(mg[key])
    for col in (
        "grad_norm",
        "param_norm",
        "update_norm",
        "error_norm",
        "act_mean",
        "act_std",
        "act_deriv_mean",
    ):
        _close(mc[col], mg[col], rel=2e-3, abs_=1e-7)
    for col in ("act_saturated", "act_dead"):  # thresholded shares: a unit may sit on the line
        _close(mc[col], mg[col], rel=0, abs_=0.02)
    _close(cpu.steps.loss, gpu.steps.loss, rel=1e-4)
    tc = cpu.temporal.sort_values(["step", "layer", "t"]).reset_index(drop=True)
    tg = gpu.temporal.sort_values(["step", "layer", "t"]).reset_index(drop=True)
    assert len(tc) == len(tg) > 0
    _close(tc.grad_norm, tg.grad_norm, rel=2e-3, abs_=1e-9)


def test_cuda_tiny_gradients_are_exact(tmp_path):
    """Gradients of 1e-30 underflow in float32 squares; the GPU path accumulates in float64."""
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 1)).cuda()
    with vanishing.watch(model, run_dir=tmp_path / "r") as mon:
        (model(torch.randn(4, 32, device="cuda")).sum() * 1e-30).backward()
        expected = model[0].weight.grad.double().norm().item()
    got = vanishing.load_run(mon.run_dir).metrics.query("layer == '0' and param == 'weight'")
    assert got.grad_norm.iloc[0] == pytest.approx(expected, rel=1e-6)
    assert expected < 1e-25


def test_cuda_amp_grad_scaler_unscaled_and_skipped_steps(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x, y = torch.randn(16, 8, device="cuda"), torch.randint(0, 2, (16,), device="cuda")
    true_norms = []
    with vanishing.watch(model, opt, run_dir=tmp_path / "r", scaler=scaler) as mon:
        for i in range(4):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
                if i == 2:
                    loss = loss * float("inf")  # this step's gradients overflow: scaler skips it
            scaler.scale(loss).backward()
            if i != 2:
                true_norms.append((model[0].weight.grad.float() / scaler.get_scale()).norm().item())
            scaler.step(opt)
            scaler.update()
    run = vanishing.load_run(mon.run_dir)
    assert len(run.steps) == 3 and run.steps.skipped.sum() == 1
    w = run.metrics.query("layer == '0' and param == 'weight'").sort_values("step")
    assert w.grad_norm.tolist() == pytest.approx(true_norms, rel=1e-3)
