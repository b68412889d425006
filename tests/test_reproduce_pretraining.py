"""`vanishing reproduce pretraining`: the quick run's checks, and its pieces against oracles
(the initial weight scales, the monitor's first-layer gradient against plain autograd, the
evaluation against a direct computation)."""

import json
import math

import pytest
import torch
from torch import nn

from vanishing.experiments.data import digits
from vanishing.experiments.reproductions import pretraining
from vanishing.experiments.train import minibatches


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    calls = []
    out = tmp_path_factory.mktemp("pretraining") / "quick"
    result = pretraining.reproduce(quick=True, out=out, progress=lambda d, t: calls.append((d, t)))
    return result, out, calls


def test_quick_run_passes_its_checks_and_writes_files(quick):
    result, out, calls = quick
    failed = [(c.what, c.measured, c.tolerance) for c in result.checks if not c.ok]
    assert not failed
    assert result.name == "pretraining" and result.quick and len(result.checks) >= 5
    assert {p.name for p in result.plots} == {"pretraining.png", "pretraining.svg"}
    saved = json.loads((out / "pretraining.json").read_text())
    assert saved["ok"] is True
    # the pretrained nets' reconstruction errors are recorded, one per hidden layer
    recon = saved["settings"]["reconstruction"]
    assert [len(v[0]) for v in recon.values()] == [pretraining.DEEP, pretraining.SHALLOW]
    assert (out / "sigmoid-6-pretrained" / "seed-00" / "manifest.json").is_file()
    assert calls[-1] == (len(pretraining.CONFIGS), len(pretraining.CONFIGS))


def test_sigmoid_init_is_four_over_sqrt_fan_in():
    net = pretraining.build_net(3, "sigmoid", width=400, seed=1)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for m in linears:
        assert float(m.weight.detach().std()) == pytest.approx(
            4 / math.sqrt(m.in_features), rel=0.03
        )
    relu = [
        m for m in pretraining.build_net(3, "relu", width=400, seed=1) if isinstance(m, nn.Linear)
    ]
    assert float(relu[1].weight.detach().std()) == pytest.approx(math.sqrt(2 / 400), rel=0.03)


def test_build_net_is_seeded():
    a, b = (pretraining.build_net(2, "sigmoid", seed=7) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_monitor_first_layer_gradient_and_evaluation_match_autograd(tmp_path):
    data = digits()
    r = pretraining.run_config(
        2, "sigmoid", False, data, seed=3, short=1, long=1, pretrain_steps=1, run_dir=tmp_path / "r"
    )
    # replay: same net, same first batch, one SGD step by hand
    net = pretraining.build_net(2, "sigmoid", seed=3)
    xb, yb = next(
        minibatches(
            *data[:2],
            batch_size=pretraining.BATCH,
            generator=torch.Generator().manual_seed(3),
            replacement=True,
        )
    )
    nn.functional.cross_entropy(net(xb), yb).backward()
    assert r["first_grad"] == pytest.approx(float(net[0].weight.grad.norm()), rel=1e-4)
    ratio = net[0].weight.grad.norm() / net[2].weight.grad.norm()
    assert r["first_last"] == pytest.approx(float(ratio), rel=1e-4)
    with torch.no_grad():
        for p in net.parameters():
            p -= pretraining.LR * p.grad
        x, y, xt, yt = data
        loss = float(nn.functional.cross_entropy(net(x), y))
        error = float((net(xt).argmax(1) != yt).double().mean())
    assert r["short_train_loss"] == pytest.approx(loss, rel=1e-5)
    assert r["long_test_error"] == pytest.approx(error)


@pytest.mark.parametrize(
    "call",
    [
        lambda: pretraining.build_net(2, "tanh"),
        lambda: pretraining.build_net(0, "relu"),
        lambda: pretraining.run_config(
            2, "relu", False, digits(), seed=0, short=5, long=4, pretrain_steps=1, run_dir="x"
        ),
    ],
)
def test_bad_input_is_a_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_out_must_be_empty(tmp_path):
    (tmp_path / "x").write_text("taken")
    with pytest.raises(ValueError, match="not an empty directory"):
        pretraining.reproduce(quick=True, out=tmp_path)
