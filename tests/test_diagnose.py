"""Diagnosis on real (small) training jobs whose label holds by construction."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import vanishing


def _mlp(depth, width=32, act=nn.Sigmoid, init=None, bias=None, d_in=16, d_out=4):
    layers, d = [], d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if init is not None:
            init(lin.weight)
            nn.init.zeros_(lin.bias)
        if bias is not None:
            nn.init.constant_(lin.bias, bias)
        layers += [lin, act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, d_out))


def _data(n=128, d_in=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return x, y % classes


def _train(model, run_dir, steps=40, lr=0.05, opt=torch.optim.SGD):
    x, y = _data()
    o = opt(model.parameters(), lr=lr)
    with vanishing.watch(model, optimizer=o, run_dir=run_dir) as mon:
        for i in range(steps):
            idx = torch.arange(i * 32, i * 32 + 32) % len(x)
            o.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            o.step()
        return mon.diagnose()


def _inspect(model):
    x, y = _data()
    return vanishing.inspect(model, x, y, nn.functional.cross_entropy)


def _he(w):
    nn.init.kaiming_normal_(w, nonlinearity="relu")


def _digit_images():
    """scikit-learn's digits as 1x8x8 images in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0, torch.tensor(
        d.target
    )


def _vgg(widths, norm):
    """3x3 conv layers on the digits, ReLU, "M" a 2x2 max-pool, a linear head: with ``norm`` a
    BatchNorm after each conv (PyTorch's init), else no norm and He-initialised convs."""
    layers, c = [], 1
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        conv = nn.Conv2d(c, w, 3, padding=1)
        if norm:
            layers += [conv, nn.BatchNorm2d(w), nn.ReLU()]
        else:
            _he(conv.weight)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def test_deep_sigmoid_vanishes_at_init_and_in_training(run_dir):
    torch.manual_seed(0)
    model = _mlp(10)
    diag = _inspect(model)
    assert "vanishing_gradient" in diag.kinds
    f = next(f for f in diag.findings if f.kind == "vanishing_gradient")
    assert f.layers[0] == "0" and f.evidence["first_to_last_ratio"] < 1e-3
    assert f.remedies[0].name == "relu" and "sigmoid'(z)" in f.remedies[0].why
    trained = _train(model, run_dir)
    assert "vanishing_gradient" in trained.kinds
    stalled = next(f for f in trained.findings if f.kind == "stalled_layers")
    assert stalled.layers[0] == "0" and "18" not in stalled.layers  # early layers, not late ones
    assert stalled.evidence["relative"] <= 1e-3


def test_healthy_he_relu_net_has_no_findings(run_dir):
    torch.manual_seed(0)
    model = _mlp(8, act=nn.ReLU, init=_he)
    assert _inspect(model).healthy
    diag = _train(model, run_dir, steps=60, lr=0.02)
    assert diag.healthy, str(diag)


def test_healthy_shallow_sigmoid_and_tanh_xavier(run_dir):
    torch.manual_seed(0)
    assert _inspect(_mlp(2)).healthy
    assert _inspect(_mlp(8, act=nn.Tanh, init=nn.init.xavier_normal_)).healthy


def test_over_gain_relu_explodes():
    torch.manual_seed(0)
    model = _mlp(
        10, act=nn.ReLU, init=lambda w: nn.init.normal_(w, 0.0, 3.0 / math.sqrt(w.shape[1]))
    )
    diag = _inspect(model)
    assert "exploding_gradient" in diag.kinds, str(diag)
    assert "vanishing_gradient" not in diag.kinds


def test_dead_units_from_negative_bias():
    torch.manual_seed(0)
    model = _mlp(4, act=nn.ReLU, init=_he)
    with torch.no_grad():
        model[2].bias.fill_(-10.0)
    diag = _inspect(model)
    f = next(f for f in diag.findings if f.kind == "dead_units")
    # layer 3's units never fire; the layers after it only ever see zeros, so theirs neither
    assert f.layers[0] == "3" and "1" not in f.layers
    assert f.evidence["max_dead_fraction"] == 1.0


def test_saturation_from_large_weights():
    torch.manual_seed(0)
    model = _mlp(3, act=nn.Tanh, init=lambda w: nn.init.normal_(w, 0.0, 3.0))
    diag = _inspect(model)
    f = next(f for f in diag.findings if f.kind == "saturated_activations")
    assert f.evidence["max_saturated_fraction"] > 0.5


def test_absurd_learning_rate_goes_non_finite(run_dir):
    torch.manual_seed(0)
    diag = _train(_mlp(3, act=nn.ReLU, init=_he), run_dir, steps=30, lr=1e6)
    f = next(f for f in diag.findings if f.kind == "non_finite")
    assert f.severity == "critical" and f.evidence["first_step"] >= 0
    assert f.remedies[0].name == "lower_learning_rate"


def test_tanh_rnn_vanishes_through_time_and_lstm_with_forget_bias_does_not(tmp_path):
    class Net(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.rnn = cell(2, 16, batch_first=True)
            self.head = nn.Linear(16, 1)
            if cell is nn.LSTM:
                with torch.no_grad():
                    self.rnn.bias_hh_l0[16:32].fill_(3.0)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1]).squeeze(1)

    x, y = torch.rand(16, 80, 2), torch.rand(16)
    kinds = {}
    for cell in (nn.RNN, nn.LSTM):
        torch.manual_seed(0)
        diag = vanishing.inspect(Net(cell), x, y, nn.functional.mse_loss)
        kinds[cell.__name__] = diag
    rnn = next(f for f in kinds["RNN"].findings if f.kind == "vanishing_gradient")
    assert rnn.layers == ["rnn"] and rnn.remedies[0].name == "lstm"
    assert kinds["LSTM"].healthy, str(kinds["LSTM"])


def test_inspect_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4)
    )
    model.eval()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    _inspect(model)
    assert not model.training
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[4].weight.grad is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_diagnosis_output_forms(run_dir):
    torch.manual_seed(0)
    diag = _inspect(_mlp(10))
    d = diag.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["healthy"] is False and d["findings"][0]["kind"] == "vanishing_gradient"
    text = str(diag)
    assert "vanishing_gradient" in text and "->" in text
    for f in diag.findings:
        assert f.severity in ("warning", "critical") and f.remedies


def test_diagnosing_an_empty_run_is_a_clear_error(run_dir):
    with vanishing.watch(_mlp(2), run_dir=run_dir):
        pass
    with pytest.raises(ValueError, match="nothing to diagnose"):
        vanishing.load_run(run_dir).diagnose()


def test_nielsens_4x30_sigmoid_net_vanishes_4_to_5x_per_layer():
    """Nielsen, Neural Networks and Deep Learning ch. 5: [784, 30, 30, 30, 30, 10], sigmoid,
    weights N(0, 1/n_in), biases N(0, 1): each hidden layer learns ~4-5x slower than the next."""
    from vanishing.experiments.data import digits

    x, y, _, _ = digits()
    x, y = x[:1000], y[:1000]
    shrink = []
    for seed in range(3):
        torch.manual_seed(seed)
        sizes = [64, 30, 30, 30, 30, 10]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            lin = nn.Linear(a, b)
            nn.init.normal_(lin.weight, 0.0, 1 / math.sqrt(a))
            nn.init.normal_(lin.bias, 0.0, 1.0)
            layers += [lin, nn.Sigmoid()]
        model = nn.Sequential(*layers)

        def loss(out, target):
            return nn.functional.binary_cross_entropy(
                out, nn.functional.one_hot(target, 10).float()
            )

        diag = vanishing.inspect(model, x, y, loss)
        assert diag.kinds == ["vanishing_gradient"], str(diag)
        shrink.append(diag.findings[0].evidence["shrink_per_layer"])
    assert all(3.0 <= s <= 7.0 for s in shrink), shrink


# ------------------------------------------------------------------ causes, time, recorded tables
def _sigmoid_derivative_means(model, x):
    """Mean sigmoid'(z) of each activation module, from forward hooks (independent of vanishing)."""
    out = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, y: out.append(float((y * (1 - y)).mean())))
        for m in model.modules()
        if isinstance(m, nn.Sigmoid)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_cause_is_the_activation_derivative_for_xavier_sigmoid():
    torch.manual_seed(0)
    model = _mlp(10, init=nn.init.xavier_normal_)
    x, _ = _data()
    f = next(f for f in _inspect(model).findings if f.kind == "vanishing_gradient")
    assert f.cause.startswith("activation derivative")
    expected = sorted(_sigmoid_derivative_means(model, x))[5]  # median of the 10 hidden layers
    assert f.evidence["mean_dphi"] == pytest.approx(expected, abs=0.01)
    gains = sorted(
        float(m.weight.detach().std() * math.sqrt(m.weight.shape[1])) for m in list(model)[0:-1:2]
    )
    assert f.evidence["weight_gain"] == pytest.approx((gains[4] + gains[5]) / 2, rel=0.02)
    assert f.per_layer["0"]["mean_dphi"] == pytest.approx(
        _sigmoid_derivative_means(model, x)[0], abs=1e-6
    )
    assert f.remedies[0].name == "relu" and "sigmoid'(z) is 0.2" in f.remedies[0].why


def test_cause_is_the_weight_scale_for_tiny_tanh_init():
    torch.manual_seed(0)
    model = _mlp(8, act=nn.Tanh, init=lambda w: nn.init.normal_(w, 0.0, 0.25 / math.sqrt(32)))
    f = next(f for f in _inspect(model).findings if f.kind == "vanishing_gradient")
    assert f.cause.startswith("weight scale")
    assert f.evidence["weight_gain_vs_target"] == pytest.approx(0.25, rel=0.15)
    assert f.remedies[0].name == "xavier_init"
    assert "relu" not in [r.name for r in f.remedies]  # tanh'(z) is ~1 here: not the cause


class _Seq(nn.Module):
    def __init__(self, cell, hidden=16):
        super().__init__()
        self.rnn = cell(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(1)


def test_rnn_finding_cites_the_recurrent_weights_singular_values():
    torch.manual_seed(0)
    model = _Seq(nn.RNN)
    x, y = torch.rand(16, 60, 2), torch.rand(16)
    f = next(
        f
        for f in vanishing.inspect(model, x, y, nn.functional.mse_loss).findings
        if f.kind == "vanishing_gradient"
    )
    w = model.rnn.weight_hh_l0.detach().double()
    assert f.evidence["sigma_max_recurrent"] == pytest.approx(
        float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-6
    )
    assert f.evidence["rms_singular_value_recurrent"] == pytest.approx(
        float(w.norm() / math.sqrt(16)), rel=1e-5
    )
    assert "singular value" in f.cause
    assert [r.name for r in f.remedies][:3] == ["lstm", "gru", "orthogonal_init"]


def test_gated_cell_decay_is_a_note_not_a_finding():
    """A default LSTM's gradient at t=0 is ~1e-5 of that at t=19 (forget gate ~0.5): measured and
    reported as a note, not as vanishing_gradient (docs/diagnosis.md: gated cells)."""
    torch.manual_seed(0)
    model = _Seq(nn.LSTM, hidden=32)
    x, y = torch.rand(32, 20, 2), torch.rand(32)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.mse_loss(model(xg), y), [xg])
    per_t = g.pow(2).sum((0, 2)).sqrt()
    ratio = float(per_t[0] / per_t[-1])
    assert ratio < 1e-3  # the decay is real
    diag = vanishing.inspect(model, x, y, nn.functional.mse_loss)
    assert diag.healthy, str(diag)
    note = next(n for n in diag.notes if "LSTM" in n)
    assert f"{ratio:.1e}" in note


class _RecordedRun:
    """A stand-in for vanishing.Run: the tables a monitor writes, built by hand."""

    def __init__(self, profiles, widths=None):
        import pandas as pd

        n_layers = len(profiles[0])
        widths = widths or [32] * n_layers
        names = [str(2 * i) for i in range(n_layers + 1)]  # hidden layers, then the head
        self.path = "recorded"
        self.manifest = {"optimizer": None}
        self.layer_info = [
            {
                "name": n,
                "depth": i,
                "type": "Linear",
                "role": "layer",
                "activation": None,
                "recurrent": False,
                "params": [
                    {"name": "weight", "shape": [w, w], "numel": w * w},
                    {"name": "bias", "shape": [w], "numel": w},
                ],
                "num_params": w * w + w,
            }
            for i, (n, w) in enumerate(zip(names, widths + [4]))
        ]
        rows = []
        for step, prof in enumerate(profiles):
            for i, (name, value) in enumerate(zip(names, list(prof) + [1.0])):
                rows.append(
                    {"step": step, "layer": name, "param": "", "depth": i, "error_norm": value}
                )
        self.metrics = pd.DataFrame(rows)
        for col in (
            "grad_norm",
            "param_norm",
            "update_norm",
            "update_ratio",
            "act_std",
            "act_mean",
            "act_deriv_mean",
            "act_saturated",
            "act_dead",
            "grad_nonfinite",
            "param_nonfinite",
        ):
            self.metrics[col] = float("nan")
        self.steps = pd.DataFrame(
            {
                "step": range(len(profiles)),
                "loss_nonfinite": 0.0,
                "grad_nonfinite": 0.0,
                "param_nonfinite": 0.0,
            }
        )
        self.temporal = pd.DataFrame(
            {"step": [], "layer": [], "t": [], "length": [], "grad_norm": []}
        )


def test_rules_read_a_recorded_table_and_need_persistence():
    from vanishing.diagnose import diagnose_run

    nielsen = [4.5**k for k in range(4)]  # 4.5x per layer, ~90x first to last
    flat = [1.0, 1.1, 0.9, 1.0]
    diag = diagnose_run(_RecordedRun([nielsen] * 10))
    f = next(f for f in diag.findings if f.kind == "vanishing_gradient")
    assert f.evidence["shrink_per_layer"] == pytest.approx(4.5)
    assert f.evidence["first_to_last_ratio"] == pytest.approx(4.5**-3)
    # one bad step in the window is not persistent; the window is the last half of the run
    assert diagnose_run(_RecordedRun([flat] * 9 + [nielsen])).healthy
    assert not diagnose_run(_RecordedRun([flat] * 4 + [nielsen] * 6)).healthy
    assert diagnose_run(_RecordedRun([nielsen] * 6 + [flat] * 4 + [flat] * 4)).healthy


def test_profile_is_per_unit_so_width_changes_are_not_vanishing_or_exploding():
    from vanishing.diagnose import diagnose_run

    for widths in ([16, 64, 256, 1024, 4096], [4096, 1024, 256, 64, 16]):
        raw = [math.sqrt(w) for w in widths]  # the same gradient per unit: raw norms differ 16x
        assert diagnose_run(_RecordedRun([raw] * 4, widths=widths)).healthy
        shrinking = [r * 3.0**k for k, r in enumerate(raw)]  # and 3x per layer on top: found
        kinds = diagnose_run(_RecordedRun([shrinking] * 4, widths=widths)).kinds
        assert kinds == ["vanishing_gradient"]


def test_stalled_cause_tells_a_tiny_learning_rate_from_a_tiny_gradient(tmp_path):
    from cases.catalog import BY_NAME
    from cases.runner import run_case

    causes = {}
    for name in ("stalled_param_group_lr", "sigmoid_deep_default_stalls"):
        diag, _, _ = run_case(BY_NAME[name], tmp_path / name)
        f = next(f for f in diag.findings if f.kind == "stalled_layers")
        causes[name] = f
    lr = causes["stalled_param_group_lr"]
    assert lr.layers == ["0", "2"]  # exactly the two layers given lr 1e-8
    assert lr.cause.startswith("step size") and lr.remedies[0].name == "higher_learning_rate"
    deep = causes["sigmoid_deep_default_stalls"]
    assert deep.cause.startswith("gradient") and deep.remedies[0].name == "he_init"
    assert deep.per_layer[deep.layers[0]]["relative_gradient"] < 1e-3


def test_monitor_diagnose_measures_the_recurrent_weight_on_the_live_model(tmp_path):
    """mon.diagnose() hands the watched model to the rules: a tanh RNN whose gradient vanishes
    through time gets the largest singular value of weight_hh, as torch.linalg computes it."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 16, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.3)  # contracting: the gradient shrinks every step back in time
    head = nn.Linear(16, 1)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 40, 3), torch.randn(16, 1)
    with vanishing.watch(model, opt, run_dir=tmp_path / "r") as mon:
        for _ in range(4):
            opt.zero_grad()
            out, _ = rnn(x)
            nn.functional.mse_loss(head(out[:, -1]), y).backward()
            opt.step()
        diag = mon.diagnose()
        expected = torch.linalg.matrix_norm(rnn.weight_hh_l0.detach(), ord=2).item()
    (finding,) = [f for f in diag.findings if f.kind == "vanishing_gradient"]
    assert finding.layers == ["rnn"]
    assert finding.evidence["sigma_max_recurrent"] == pytest.approx(expected, rel=1e-6)
    assert "largest singular value" in finding.cause


def test_small_batches_do_not_make_healthy_relu_units_dead(tmp_path):
    """Off for every example of a batch of 1 is a coin flip per unit, not death: neither the
    recorded run (batch 1 for many steps) nor inspect on a batch of 1 may call it dead, while
    units killed by a negative bias stay found."""
    torch.manual_seed(0)
    layers, d = [], 20
    for _ in range(5):
        lin = nn.Linear(d, 32)
        nn.init.kaiming_normal_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        d = 32
    model = nn.Sequential(*layers, nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with vanishing.watch(model, opt, run_dir=tmp_path / "r") as mon:
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(torch.randn(1, 20)), torch.randint(0, 3, (1,))
            ).backward()
            opt.step()
    assert "dead_units" not in mon.diagnose().kinds
    one = vanishing.inspect(
        model, torch.randn(1, 20), torch.randint(0, 3, (1,)), nn.functional.cross_entropy
    )
    assert "dead_units" not in one.kinds and any("dead units not judged" in n for n in one.notes)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit of the first layer off for any input
    big = vanishing.inspect(
        model, torch.randn(64, 20), torch.randint(0, 3, (64,)), nn.functional.cross_entropy
    )
    assert "dead_units" in big.kinds


def test_a_layer_never_used_in_forward_is_a_note_not_a_stalled_layer(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
            self.unused = nn.Linear(16, 16)

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with vanishing.watch(model, opt, run_dir=tmp_path / "r") as mon:
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(torch.randn(32, 8)), torch.randint(0, 3, (32,))
            ).backward()
            opt.step()
        diag = mon.diagnose()
    assert "stalled_layers" not in diag.kinds
    assert any("'unused'" in n and "no gradient" in n for n in diag.notes)


class _BasicBlock(nn.Module):
    """He et al.'s block, written as torchvision writes it (``out += identity``)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return torch.relu(out)


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        return self.f(x) if x.sum() > 0 else x  # data-dependent: cannot be traced


def test_skip_connections_are_found_from_a_trace():
    from vanishing.modules import skip_connections

    class Bias(nn.Module):  # adding a constant is not a skip connection
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)

        def forward(self, x):
            return self.f(x) + 1.0

    plain = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    assert skip_connections(plain) is False
    assert skip_connections(Bias()) is False
    assert skip_connections(nn.Sequential(_BasicBlock(3), nn.Flatten())) is True
    layer = nn.TransformerEncoderLayer(8, 2, batch_first=True)
    assert skip_connections(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)) is True
    assert skip_connections(_Gated()) is None


class _SkipSequential(nn.Sequential):  # a Sequential whose own forward adds its input
    def forward(self, x):
        return x + super().forward(x)


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 4)),
        lambda: nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Dropout(0.1), nn.GELU()),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        ),
        lambda: _SkipSequential(nn.Linear(4, 4), nn.Tanh()),
        lambda: nn.Sequential(nn.Linear(4, 4), _SkipSequential(nn.Linear(4, 4), nn.Tanh())),
        lambda: nn.Sequential(nn.Linear(3, 3), _BasicBlock(3).conv1),
    ],
    ids=["mlp", "nested-cnn", "own-forward-adds", "nested-own-forward", "leaf-of-a-block"],
)
def test_a_chain_of_torch_layers_is_answered_without_a_trace_as_the_trace_answers(
    build, monkeypatch
):
    import vanishing.modules as modules

    fast = modules.skip_connections(build())
    monkeypatch.setattr(modules, "_plain_chain", lambda m: False)  # the trace, always
    assert fast is modules.skip_connections(build())


def test_vanishing_cause_names_the_missing_skip_connection():
    torch.manual_seed(0)
    layers = []
    for _ in range(10):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    diag = vanishing.inspect(
        model, torch.randn(64, 32), torch.randint(0, 4, (64,)), nn.functional.cross_entropy
    )
    (finding,) = [f for f in diag.findings if f.kind == "vanishing_gradient"]
    assert finding.evidence["skip_connections"] == 0.0
    assert "no skip connection" in finding.cause
    residual = [r for r in finding.remedies if r.name == "residual"]
    assert residual and residual[0].why.startswith("the model has no skip connection")


def test_activations_the_records_cannot_show_are_named_in_notes(tmp_path):
    """An activation module with no registered derivative is named; a stack with no activation
    module (F.relu in forward) is said to be unjudged for saturation and dead units."""
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.act = act

        def forward(self, x):
            return self.c(self.act(F.relu(self.b(F.relu(self.a(x))))))

    notes = {}
    for label, act in (
        ("hardswish", nn.Hardswish()),
        ("functional", nn.Identity()),
        ("relu", nn.ReLU()),
    ):
        model = Net(act)
        with vanishing.watch(model, run_dir=tmp_path / label) as mon:
            model(torch.randn(3, 4)).sum().backward()
        notes[label] = " ".join(vanishing.load_run(mon.run_dir).diagnose().notes)
        assert vanishing.load_run(mon.run_dir).manifest.get("unmeasured_activations", []) == (
            [{"name": "act", "type": "Hardswish"}] if label == "hardswish" else []
        )
    assert (
        "without a registered derivative" in notes["hardswish"]
        and "Hardswish (1: 'act')" in notes["hardswish"]
    )
    assert "no activation module in the model" in notes["functional"]
    assert "no activation module" not in notes["relu"]
    assert "registered derivative" not in notes["relu"]


def test_the_loss_stagnating_and_weights_drifting_are_evidence_and_notes(tmp_path):
    """The seeds' three signs: besides the layers that barely change (stalled_layers), the
    loss against its initial value and the weight norms' trend, computed here by hand."""

    def train(name, lr, weight_decay):
        torch.manual_seed(0)
        layers = []
        for _ in range(10):
            layers += [nn.Linear(16, 16), nn.Sigmoid()]
        model = nn.Sequential(*layers, nn.Linear(16, 4))
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
        x, y = torch.randn(128, 16), torch.randint(0, 4, (128,))
        with vanishing.watch(model, opt, run_dir=tmp_path / name) as mon:
            for _ in range(40):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        run = vanishing.load_run(mon.run_dir)
        diag = run.diagnose()
        (f,) = [f for f in diag.findings if f.kind == "vanishing_gradient"]
        return run, f, " ".join(diag.notes)

    # a small step: the vanishing gradient leaves the loss where it started
    run, f, text = train("flat", lr=0.001, weight_decay=0.0)
    loss = run.steps["loss"].to_numpy()
    assert f.evidence["loss_last_over_first"] == pytest.approx(loss[-4:].mean() / loss[:4].mean())
    assert f.evidence["loss_last_over_first"] > 0.9 and "the loss stagnates" in text
    assert "drift toward zero: their" not in text
    # heavy weight decay where the gradient cannot push back: the weights shrink
    run, f, text = train("decay", lr=0.1, weight_decay=0.5)
    w = run.metrics[(run.metrics.param == "weight") & (run.metrics.layer == "0")]
    assert w.param_norm.iloc[-1] / w.param_norm.iloc[0] - 1 < -0.5
    assert f.evidence["weight_norm_change"] < -0.5 and "drift toward zero: their" in text


def test_a_trained_fixup_stream_adding_up_is_a_note_and_a_flat_one_is_a_finding(tmp_path):
    """A residual MLP whose branches start at zero (Fixup) trains its loss down 1000x; by then
    its stream's gradient grows toward the input as the trained branches add theirs (10-100x
    over 10 blocks, no forward growth): a note, not an explosion. The same weights trained on
    at a learning rate that cannot move the loss give the same growth, now with a loss that
    does not fall: then it is reported."""
    import re

    from cases.catalog import PlainResNet, blobs

    torch.manual_seed(0)
    model = PlainResNet(10, zero=True)
    batches = blobs()

    def train(name, opt, steps):
        with vanishing.watch(model, opt, run_dir=tmp_path / name, every=4) as mon:
            for i in range(steps):
                x, y = batches[i % len(batches)]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            run = vanishing.load_run(mon.run_dir)
            return run, mon.diagnose()

    run, diag = train("trained", torch.optim.Adam(model.parameters(), lr=1e-3), 100)
    loss = run.steps.sort_values("step")["loss"].to_numpy()
    assert loss[-10:].mean() / loss[:10].mean() < 0.01  # it trains
    assert "exploding_gradient" not in diag.kinds
    (note,) = [n for n in diag.notes if "adding up boundedly along the residual stream" in n]
    growth = float(re.search(r"\(([\d.]+)x first to last", note).group(1))
    assert 10 <= growth < 100  # the regime the note is about: past the plain 10x criterion
    # without the model (`vanishing diagnose RUN`): the skip connections the monitor traced
    closed = vanishing.load_run(run.path)  # read after close (`run` was read before it)
    assert closed.manifest["skip_connections"] is True
    alone = closed.diagnose()
    assert "exploding_gradient" not in alone.kinds
    assert any("adding up boundedly along the residual stream" in n for n in alone.notes)

    flat_run, flat = train("flat", torch.optim.SGD(model.parameters(), lr=1e-12), 100)
    (f,) = [f for f in flat.findings if f.kind == "exploding_gradient"]
    assert f.severity == "warning" and f.evidence["loss_last_over_first"] > 0.5
    assert 10 <= f.evidence["first_to_last_ratio"] < 100
    assert "exploding_gradient" in vanishing.load_run(flat_run.path).diagnose().kinds


def test_a_trained_vgg_bn_chain_adding_up_is_a_note_and_a_deep_bn_mlp_is_a_finding(tmp_path):
    """Batch norm makes the gradient grow back through a chain of normalised layers (Yang et al.
    2019): a 6-layer conv-BN-ReLU net that trains its loss down 50x reads ~30x first to last,
    a note; 30 Linear-BN-ReLU layers whose loss stays up read 10-100x too, and are reported."""
    import re

    x, y = _digit_images()
    torch.manual_seed(0)
    model = _vgg((16, 16, 32, 32, 64, 64), norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    with vanishing.watch(model, opt, run_dir=tmp_path / "vgg", every=5) as mon:
        for step in range(150):
            for group in opt.param_groups:
                group["lr"] = 0.05 * min(1.0, (step + 1) / 30)
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        diag = mon.diagnose()
    loss = vanishing.load_run(mon.run_dir).steps.sort_values("step")["loss"].to_numpy()
    assert loss[-3:].mean() / loss[:3].mean() < 0.1
    assert "exploding_gradient" not in diag.kinds
    (note,) = [n for n in diag.notes if "adding up boundedly along the normalised layers" in n]
    assert 10 <= float(re.search(r"\(([\d.]+)x first to last", note).group(1)) < 100

    torch.manual_seed(0)
    layers, width = [], 16
    for _ in range(30):
        layers += [nn.Linear(width, 64), nn.BatchNorm1d(64), nn.ReLU()]
        width = 64
    deep = nn.Sequential(*layers, nn.Linear(64, 4))
    xs = torch.randn(128, 16)
    ys = (xs[:, :4].sum(1) > 0).long()
    opt = torch.optim.SGD(deep.parameters(), lr=0.01)
    with vanishing.watch(deep, opt, run_dir=tmp_path / "deep") as mon:
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(deep(xs), ys).backward()
            opt.step()
        (f,) = [f for f in mon.diagnose().findings if f.kind == "exploding_gradient"]
    assert 10 <= f.evidence["first_to_last_ratio"] < 100
    assert f.evidence["loss_last_over_first"] > 0.5


def test_the_error_profile_is_the_rms_over_recorded_entries_so_pooling_is_not_growth(tmp_path):
    """Each layer's error entries (batch x channels x positions) are recorded beside its norm,
    checked against autograd; the depth profile is the RMS norm / sqrt(entries), so a trained
    VGG whose 2x2 max-pools shrink the maps 16x between its first and last conv layers (its
    error norm per channel then grows ~4x toward the input from positions alone) is not read
    as an exploding gradient."""
    from vanishing.diagnose.view import RunView

    x, y = _digit_images()
    torch.manual_seed(0)
    model = _vgg((16, 16, "M", 32, 32, "M", 64, 64), norm=False)
    convs = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Conv2d)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    outputs = {}
    hooks = [
        model[int(n)].register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out))
        for n in convs
    ]
    with vanishing.watch(model, opt, run_dir=tmp_path / "vgg", every=5) as mon:
        for step in range(300):
            for group in opt.param_groups:
                group["lr"] = 0.05 * min(1.0, (step + 1) / 30)
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if step == 0:  # autograd's own gradients w.r.t. each conv output: the oracle
                for out in outputs.values():
                    out.retain_grad()
            loss.backward()
            if step == 0:
                truth = {n: (float(o.grad.norm()), o.grad.numel()) for n, o in outputs.items()}
                for h in hooks:
                    h.remove()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        diag = mon.diagnose()
    run = vanishing.load_run(mon.run_dir)
    m = run.metrics
    first = m[(m.step == 0) & (m.param == "")].set_index("layer")
    for n, (norm, numel) in truth.items():
        assert first.loc[n, "error_numel"] == numel  # 64 x 16 x 64 down to 64 x 64 x 4
        assert first.loc[n, "error_norm"] == pytest.approx(norm, rel=1e-5)
    label, table = RunView(run).depth_signal
    rows = m[(m.param == "") & m.step.isin(table.index)]
    norm = rows.pivot_table(index="step", columns="layer", values="error_norm")[convs]
    numel = rows.pivot_table(index="step", columns="layer", values="error_numel")[convs]
    assert label == "error signal" and list(table.columns) == convs
    assert np.allclose(table.to_numpy(), (norm / np.sqrt(numel)).to_numpy())
    # per channel (the profile before the entry counts) the positions add 4x of growth
    per_channel = norm.median() / np.sqrt([16, 16, 32, 32, 64, 64])
    assert per_channel.iloc[0] / per_channel.iloc[-1] > 10
    assert "exploding_gradient" not in diag.kinds


def test_a_diverging_run_has_no_stalled_layer_that_moves_many_times_its_own_norm(tmp_path):
    """lr 50 on a ReLU MLP: the loss grows 1e26-fold in 5 steps, then NaN. The stalled rule
    compares each layer's update/weight with the others' 90th percentile only, so a layer
    moving 5.8e4 times its norm a step read as 'barely moving' beside one moving 1.4e8 times
    (with he_init, residual... as remedies). The oracle: the loop's own update/weight of
    every layer before the NaN, all far above any stall."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 4),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    moved = []
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        for s in range(12):
            g = torch.Generator().manual_seed(s)
            x = torch.randn(64, 32, generator=g)
            y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
            before = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if torch.isfinite(loss) and s >= 2:
                after = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
                moved += [((a - b).norm() / b.norm()).item() for a, b in zip(after, before)]
    assert moved and min(v for v in moved if math.isfinite(v)) > 1e-2  # nothing stalls
    diagnosis = vanishing.load_run(tmp_path / "r").diagnose(model=model)
    assert "non_finite" in diagnosis.kinds
    assert "stalled_layers" not in diagnosis.kinds, str(diagnosis)


def test_a_stall_not_behind_a_small_gain_is_still_found(tmp_path):
    """The control of the layer-scale note: a sigmoid chain whose first layer stalls (weights
    of std 50 saturate its sigmoid: its gradient is ~1e-7 of the others') beside a side branch
    scaled by a 1e-6 gain vector. The branch's layer is behind the gain (held at 1e-6); the
    chain's stalled layer is not, and stays a finding."""

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)
            self.gain = nn.Parameter(torch.full((32,), 1e-6))

        def forward(self, x):
            return self.gain * self.lin(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layers = []
            for _ in range(6):
                layers += [nn.Linear(32, 32), nn.Sigmoid()]
            self.chain = nn.Sequential(*layers)
            self.side = Branch()
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.chain(x) + self.side(x))

    torch.manual_seed(0)
    model = Net()
    for m in model.chain:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0)
    nn.init.normal_(model.chain[0].weight, std=50.0)
    rest = [p for n, p in model.named_parameters() if n != "side.gain"]
    # the gain held at 1e-6 (at lr 0.5 it would grow to ~0.1 in a step, freeing the branch)
    held = {"params": [model.side.gain], "lr": 0.0}
    opt = torch.optim.SGD([{"params": rest, "lr": 0.5}, held])
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    rates = {}
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        for _ in range(30):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            for n, p in model.named_parameters():
                if n.endswith("weight"):
                    d = (p.detach() - before[n]).double().norm() / before[n].double().norm()
                    rates.setdefault(n, []).append(float(d))
    med = {n: float(np.median(v)) for n, v in rates.items()}
    line = 1e-3 * float(np.quantile(list(med.values()), 0.9))
    assert med["side.lin.weight"] < line and med["chain.0.weight"] < line, med
    diagnosis = vanishing.load_run(tmp_path / "r").diagnose(model=model)
    (finding,) = [f for f in diagnosis.findings if f.kind == "stalled_layers"]
    assert "chain.0" in finding.layers and "side.lin" not in finding.layers
    assert any("'side.gain' (RMS 1.0e-06)" in n for n in diagnosis.notes), diagnosis.notes


def test_small_gains_are_vectors_that_scale_a_branch_not_a_layers_own_filters(tmp_path):
    """What the stalled rule counts as a gain: a block's small vector parameter (its layers
    are behind it) or a gain module's (its siblings are); a depthwise 1x1 convolution's
    [C, 1, 1] filters are small too but scale only that layer's own output."""
    from vanishing.diagnose.rules.stalled import _small_gains
    from vanishing.diagnose.view import RunView

    class LayerScale(nn.Module):  # timm's: a module holding only the gain
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.full((8,), 1e-5))

        def forward(self, x):
            return self.gamma * x

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.scale = nn.Parameter(torch.full((8,), 1e-6))  # ConvNeXt's layer_scale_parameter

        def forward(self, x):
            return x + self.scale * self.lin(x)

    class Depthwise(nn.Module):  # small [8, 1, 1] filters beside a layer: no gain
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv1d(8, 8, 1, groups=8)
            nn.init.normal_(self.dw.weight, std=1e-3)
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.lin(self.dw(x.unsqueeze(-1)).squeeze(-1))

    class Branch(nn.Module):  # timm's block: the gain module beside the layer it scales
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(8, 8)
            self.ls = LayerScale()

        def forward(self, x):
            return x + self.ls(self.mlp(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = Block()
            self.branch = Branch()
            self.depthwise = Depthwise()
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.depthwise(self.branch(self.blk(x))))

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the gains stay as initialised
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
    gains = _small_gains(RunView(vanishing.load_run(tmp_path / "r")))
    assert {k: g for k, (g, _) in gains.items()} == {
        "blk.lin": "blk.scale",
        "branch.mlp": "branch.ls.gamma",
    }  # not the head: a gain scales its block's layers, nothing outside it
    assert gains["blk.lin"][1] == pytest.approx(1e-6, rel=1e-3)


#: torchvision's VGG-16 ("D") with its channels / 4 and 1024-wide classifier layers
_VGG16 = [16, 16, "M", 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M", 128, 128, 128, "M"]


def _vgg16(batch_norm: bool, torchvision_init: bool) -> nn.Module:
    """torchvision's VGG layout as an ``nn.Sequential(features, pool, flatten, classifier)``,
    and its init (kaiming_normal_ fan_out for the convs, N(0, 0.01) for the Linear layers)."""
    torch.manual_seed(0)
    layers, c = [], 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c, v, 3, padding=1), *([nn.BatchNorm2d(v)] if batch_norm else [])]
        layers.append(nn.ReLU(inplace=True))
        c = v
    classifier = [nn.Linear(c * 49, 1024), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(1024, 1024)]
    classifier += [nn.ReLU(True), nn.Dropout(0.5), nn.Linear(1024, 10)]
    net = nn.Sequential(
        nn.Sequential(*layers), nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Sequential(*classifier)
    )
    if torchvision_init:
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
    return net


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_at_torchvision_init_is_not_vanishing(batch_norm):
    """A VGG-16 at torchvision's init (He init of the convs, the init He et al. show trains
    such plain nets) read as vanishing: its error signal per entry at the first conv is ~1/80
    of the classifier's (plain), or its BatchNorm bias gradient 2e-5 (BN), because five max
    pools spread the gradient over 4x the positions each time and BatchNorm divides it by its
    input's spread. What matters, its weight gradients relative to the weights, does not
    shrink (autograd below), and the activations keep their spread forward: a note, not a
    finding. Control: the same net at PyTorch's default init, whose activations shrink
    geometrically forward, stays vanishing; so does the net as two numbered children of one
    Sequential, which is no stack of two blocks (features against classifier)."""
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    net = _vgg16(batch_norm, torchvision_init=True)
    nn.functional.cross_entropy(net(x), y).backward()
    weights = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    rates = [float(w.grad.norm() / w.detach().norm()) for w in weights]
    assert rates[0] >= 0.2 * rates[-2], rates  # the first conv learns as fast as the classifier
    net.zero_grad()
    diagnosis = vanishing.inspect(net, x, y, nn.functional.cross_entropy)
    assert "vanishing_gradient" not in diagnosis.kinds, str(diagnosis)
    assert any("no vanishing gradient" in n and "per layer" in n for n in diagnosis.notes)

    net = _vgg16(batch_norm, torchvision_init=False)
    if not batch_norm:  # BatchNorm makes the convs' scale irrelevant
        nn.functional.cross_entropy(net(x), y).backward()
        weights = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        rates = [float(w.grad.norm() / w.detach().norm()) for w in weights]
        assert rates[0] < 1e-3 * rates[-2], rates  # really vanishing
        net.zero_grad()
        diagnosis = vanishing.inspect(net, x, y, nn.functional.cross_entropy)
        assert "vanishing_gradient" in diagnosis.kinds, str(diagnosis)
