"""Diagnosis on real (small) training jobs whose label holds by construction."""

import json
import math

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
