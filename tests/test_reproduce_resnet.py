"""`vanishing reproduce resnet`: the quick run's checks, and its pieces against oracles (the
basic block by hand, He's variance, the monitor's gradient norms against plain autograd)."""

import json
import math

import pytest
import torch
from torch import nn

from vanishing.experiments.data import digits
from vanishing.experiments.reproductions import resnet
from vanishing.experiments.train import minibatches


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    calls = []
    out = tmp_path_factory.mktemp("resnet") / "quick"
    result = resnet.reproduce(quick=True, out=out, progress=lambda d, t: calls.append((d, t)))
    return result, out, calls


def test_quick_run_passes_its_checks_and_writes_files(quick):
    result, out, calls = quick
    failed = [(c.what, c.measured, c.tolerance) for c in result.checks if not c.ok]
    assert not failed
    assert result.name == "resnet" and result.quick and len(result.checks) >= 5
    assert {p.name for p in result.plots} == {"training.png", "training.svg"}
    saved = json.loads((out / "resnet.json").read_text())
    assert saved["ok"] is True and saved["settings"]["depths"] == list(resnet.QUICK_DEPTHS)
    for depth in resnet.QUICK_DEPTHS:
        for kind in ("plain", "resnet"):
            assert (out / f"{kind}-{depth}" / "seed-00" / "manifest.json").is_file()
    assert calls[-1] == (2 * len(resnet.QUICK_DEPTHS), 2 * len(resnet.QUICK_DEPTHS))


def test_the_quick_table_agrees_with_the_checks(quick):
    result, _, _ = quick
    header = result.tables[0].header
    rows = {row[0]: dict(zip(header, row)) for row in result.tables[0].rows}
    shallow, deep = resnet.QUICK_DEPTHS
    # the degradation the paper reports: the deeper plain net trains worse, the ResNet does not
    assert rows[deep]["plain train err"] > rows[shallow]["plain train err"]
    assert rows[deep]["ResNet train err"] < rows[deep]["plain train err"]


def test_basic_block_is_the_papers_formula():
    torch.manual_seed(0)
    for residual in (False, True):
        net = resnet.build_net(4, residual=residual, width=6)
        block = net.blocks[0].train()
        x = torch.randn(16, 6)

        def bn(z):  # training-mode batch norm with the initial affine (1, 0)
            return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

        h = bn(torch.relu(bn(x @ block.linear1.weight.T)) @ block.linear2.weight.T)
        expected = torch.relu(x + h) if residual else torch.relu(h)
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_residual_block_with_a_zeroed_branch_passes_its_input():
    torch.manual_seed(0)
    block = resnet.build_net(4, residual=True, width=5).blocks[0]
    with torch.no_grad():
        block.norm2.weight.zero_()
    x = torch.randn(8, 5)
    assert torch.allclose(block(x), torch.relu(x))


def test_he_initialisation_variance():
    torch.manual_seed(0)
    net = resnet.build_net(56, residual=False, width=64)
    w = torch.cat([b.linear1.weight.detach().flatten() for b in net.blocks])
    assert float(w.var()) == pytest.approx(2 / 64, rel=0.05)


def test_plain_and_residual_nets_have_the_same_parameters():
    shapes = [
        [(n, tuple(p.shape)) for n, p in resnet.build_net(20, residual=r).named_parameters()]
        for r in (False, True)
    ]
    assert shapes[0] == shapes[1]
    assert (
        sum(isinstance(m, nn.Linear) for m in resnet.build_net(20, residual=True).modules()) == 20
    )


def test_monitor_gradient_ratio_matches_autograd(tmp_path):
    data = digits()
    r = resnet.train_net(8, False, data, steps=1, seed=5, run_dir=tmp_path / "r")
    # replay the same first step by hand: same seed, same first batch, plain autograd
    torch.manual_seed(5)
    net = resnet.build_net(8, residual=False)
    xb, yb = next(
        minibatches(*data[:2], batch_size=resnet.BATCH, generator=torch.Generator().manual_seed(5))
    )
    nn.functional.cross_entropy(net(xb), yb).backward()
    expected = net.stem.linear.weight.grad.norm() / net.blocks[-1].linear2.weight.grad.norm()
    assert resnet.first_last_gradient(r["run_dir"], 0) == pytest.approx(float(expected), rel=1e-4)
    assert math.isfinite(r["train_error"]) and 0 <= r["train_error"] <= 1


@pytest.mark.parametrize("depth", [3, 7, 0, True, 8.0])
def test_bad_depth_is_a_value_error(depth):
    with pytest.raises(ValueError, match="depth"):
        resnet.build_net(depth, residual=True)


def test_out_must_be_empty(tmp_path):
    (tmp_path / "x").write_text("taken")
    with pytest.raises(ValueError, match="not an empty directory"):
        resnet.reproduce(quick=True, out=tmp_path)
