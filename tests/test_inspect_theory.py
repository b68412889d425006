"""vanishing.inspect puts the mean-field prediction beside the measured gradient factors."""

import math

import pytest
import torch
from torch import nn

import vanishing
from vanishing.diagnose.inspect import DISAGREE


def _linear(n_in, n_out, sw2, *, bias=True):
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0.0, math.sqrt(sw2 / n_in))
        if bias:
            lin.bias.zero_()
    return lin


def _inspect(model, width, n=64, classes=4):
    x = torch.randn(n, width)
    y = torch.randint(0, classes, (n,))
    return vanishing.inspect(model, x, y, nn.functional.cross_entropy)


def _theory_note(diag):
    return [n for n in diag.notes if n.startswith("mean-field theory")]


def test_deep_linear_net_prediction_is_the_product_of_weight_variances():
    torch.manual_seed(0)
    sw2 = [1.0, 0.8, 0.8, 0.8, 0.8, 1.0]
    layers = [_linear(256, 256, s) for s in sw2[:-1]] + [_linear(256, 4, sw2[-1])]
    model = nn.Sequential(*layers)
    diag = _inspect(model, 256)
    t = diag.theory
    actual = [m.in_features * float(m.weight.detach().double().square().mean()) for m in layers]
    # hidden layers 0..4; ||dL/dh_0|| / ||dL/dh_4|| = sqrt(sw2_1 sw2_2 sw2_3 sw2_4) by hand
    assert t["predicted_ratio"] == pytest.approx(math.sqrt(math.prod(actual[1:5])), rel=1e-9)
    for name, row in t["layers"].items():
        assert row["predicted_chi"] == pytest.approx(actual[int(name) + 1], rel=1e-9)
    assert t["agrees"] and t["measured_ratio"] == pytest.approx(t["predicted_ratio"], rel=0.25)
    [note] = _theory_note(diag)
    assert "agree within" in note
    # machine-readable in the JSON form too, the same numbers
    import json

    back = json.loads(json.dumps(diag.to_dict()))["theory"]
    assert back["predicted_ratio"] == pytest.approx(t["predicted_ratio"], rel=1e-12)


def test_relu_with_he_init_predicts_factor_one():
    torch.manual_seed(1)
    layers = []
    for _ in range(8):
        lin = nn.Linear(256, 256)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    diag = _inspect(nn.Sequential(*layers, nn.Linear(256, 4)), 256)
    t = diag.theory
    assert t["predicted_ratio"] == pytest.approx(1.0, abs=0.05)
    hidden = list(t["layers"].values())[:-1]
    assert all(row["predicted_chi"] == pytest.approx(1.0, abs=0.03) for row in hidden)
    assert t["agrees"] and 1 / DISAGREE < t["measured_ratio"] < DISAGREE


def test_a_vanishing_finding_carries_the_prediction():
    torch.manual_seed(2)
    layers = []
    for _ in range(12):
        layers += [_linear(128, 128, 1.0), nn.Sigmoid()]
    diag = _inspect(nn.Sequential(*layers, _linear(128, 4, 1.0)), 128)
    f = next(f for f in diag.findings if f.kind == "vanishing_gradient")
    assert f.evidence["theory_predicted_ratio"] == pytest.approx(diag.theory["predicted_ratio"])
    assert f.evidence["theory_predicted_ratio"] < 1e-3  # sigmoid' <= 1/4: far below 1
    assert diag.theory["agrees"]


def test_normalization_layers_are_named_when_the_prediction_fails():
    torch.manual_seed(3)
    layers = []
    for _ in range(8):
        layers += [_linear(128, 128, 0.25), nn.BatchNorm1d(128), nn.ReLU()]
    diag = _inspect(nn.Sequential(*layers, _linear(128, 4, 1.0)), 128)
    # the theory (no normalization) predicts 0.125 per layer; batch norm restores the scale
    assert not diag.theory["agrees"]
    [note] = _theory_note(diag)
    assert "disagree" in note and "normalization layers present" in note


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = _linear(width, width, 0.2)
        self.act = nn.Tanh()

    def forward(self, x):
        return x + self.act(self.fc(x))


def test_residual_connections_are_named_when_the_prediction_fails():
    torch.manual_seed(4)
    model = nn.Sequential(*[_Block(128) for _ in range(10)], _linear(128, 4, 1.0))
    diag = _inspect(model, 128)
    [note] = _theory_note(diag)
    assert "disagree" in note and "residual connections" in note


def test_narrow_nets_blame_the_width():
    torch.manual_seed(5)
    layers = []
    for _ in range(20):  # width 4, 20 layers: far from the infinite-width limit
        layers += [_linear(4, 4, 2.0), nn.ReLU()]
    model = nn.Sequential(*layers, _linear(4, 4, 1.0))
    diag = _inspect(model, 4)
    assert not diag.theory["agrees"]  # this seed's draw: 900x off
    assert "width too small" in _theory_note(diag)[0]


def test_models_the_theory_does_not_describe_get_no_note():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(4, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    diag = vanishing.inspect(
        Net(), torch.randn(8, 5, 4), torch.randint(0, 2, (8,)), nn.functional.cross_entropy
    )
    assert not _theory_note(diag) and diag.theory is None and "theory" not in diag.to_dict()


def test_a_failing_prediction_never_raises(monkeypatch):
    from vanishing import theory

    def boom(*a, **k):
        raise RuntimeError("broken")

    monkeypatch.setattr(theory, "predict", boom)
    torch.manual_seed(6)
    model = nn.Sequential(
        _linear(16, 16, 1.0), nn.Tanh(), _linear(16, 16, 1.0), nn.Tanh(), _linear(16, 2, 1.0)
    )
    diag = _inspect(model, 16, classes=2)
    assert not _theory_note(diag)


def test_inspect_leaves_the_model_unchanged():
    torch.manual_seed(7)
    model = nn.Sequential(
        _linear(16, 16, 1.0),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        _linear(16, 16, 1.0),
        nn.ReLU(),
        _linear(16, 2, 1.0),
    )
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _inspect(model, 16, classes=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.training


@pytest.mark.parametrize("phase", ["ordered", "critical", "chaotic"])
def test_meanfield_cases_sit_in_the_phase_they_are_named_for(phase):
    """The labelled mean-field cases (tests/cases/catalog.py): vanishing.theory's chi1 agrees
    with an independent numpy quadrature (tests/cases/oracle.py), names the case's phase, and
    inspect's prediction of the gradient through depth points the same way as the finding."""
    from cases import oracle
    from cases.catalog import CASES, MF_SIGMA_B2

    cases = [c for c in CASES if c.name.startswith(f"meanfield_tanh_{phase}_")]
    assert cases
    for case in cases:
        job = case.build()
        first = job.model[0]
        sw2 = float(first.weight.detach().var()) * first.in_features  # sigma_w^2, measured
        sigma_w2 = {"ordered": (0.5, 0.7), "chaotic": (6.0, 8.0)}.get(phase)
        if sigma_w2 is not None:
            sw2 = min(sigma_w2, key=lambda s: abs(s - sw2))
        else:
            sw2 = vanishing.theory.critical_sigma_w2("tanh", MF_SIGMA_B2)
        r = vanishing.theory.mean_field("tanh", sigma_w2=sw2, sigma_b2=MF_SIGMA_B2)
        q, chi1 = oracle.tanh_mean_field(sw2, MF_SIGMA_B2)
        # two independent quadratures (tanh is smooth: they agree to ~1e-5 at q* ~ 5)
        assert r.q_star == pytest.approx(q, rel=1e-4)
        assert r.chi1 == pytest.approx(chi1, rel=1e-4)
        assert r.phase == phase
        x, y = job.batches[0]
        diag = vanishing.inspect(job.model, x, y, job.loss_fn)
        predicted = diag.theory["predicted_ratio"]  # first / last hidden layer's gradient
        if phase == "ordered":
            assert predicted < 0.1 and "vanishing_gradient" in diag.kinds
        elif phase == "chaotic":
            assert predicted > 10 and "exploding_gradient" in diag.kinds
        else:
            assert 0.1 < predicted < 10 and diag.healthy


def test_the_notebook_view_of_an_inspection_puts_the_model_on_the_phase_diagram(monkeypatch):
    """The diagnosis' display draws each hidden layer at the weight variance it actually has
    (fan_in * mean(W^2), by hand) on the tanh phase diagram; a diagnosis without theory has no
    diagram."""
    import vanishing.theory as theory
    from vanishing.report.notebook import diagnosis_html

    torch.manual_seed(3)
    sw2 = [1.0, 1.5, 2.0, 1.0]
    layers = [_linear(64, 64, s) for s in sw2[:-1]]
    model = nn.Sequential(
        layers[0], nn.Tanh(), layers[1], nn.Tanh(), layers[2], nn.Tanh(), _linear(64, 4, sw2[-1])
    )
    diag = _inspect(model, 64)
    drawn = []
    real = theory.model_phase_diagram

    def spy(points, **kwargs):
        drawn.append(list(points))
        return real(points, **kwargs)

    monkeypatch.setattr(theory, "model_phase_diagram", spy)
    page = diagnosis_html(diag)
    assert 'alt="phase diagram"' in page
    actual = [m.in_features * float(m.weight.detach().double().square().mean()) for m in layers]
    [points] = drawn
    assert [p[0] for p in points] == ["tanh"] * 3
    assert [p[1] for p in points] == pytest.approx(actual, rel=1e-9)
    assert [p[2] for p in points] == [0.0, 0.0, 0.0]  # biases zeroed
    assert 'alt="phase diagram"' not in diagnosis_html(vanishing.Diagnosis(findings=[]))


class _Keyword(nn.Module):
    """The same deep linear net, its forward taking keyword arguments (a Hugging Face-style
    batch): ``features`` and a multiplicative ``mask``."""

    def __init__(self, layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, features, mask):
        return self.body(features * mask)


def test_a_mapping_batch_is_passed_as_keyword_arguments():
    torch.manual_seed(0)
    sw2 = [1.0, 0.5, 0.5, 0.5, 1.0]
    layers = [_linear(128, 128, s) for s in sw2[:-1]] + [_linear(128, 4, sw2[-1])]
    model = _Keyword(layers)
    x = torch.randn(64, 128)
    inputs = {"features": x, "mask": torch.ones_like(x)}
    diag = vanishing.inspect(model, inputs, torch.randint(0, 4, (64,)), nn.functional.cross_entropy)
    actual = [m.in_features * float(m.weight.detach().double().square().mean()) for m in layers]
    # the prediction ran the keyword forward: sqrt(sw2_1 sw2_2 sw2_3) by hand, over hidden 0..3
    assert diag.theory["predicted_ratio"] == pytest.approx(
        math.sqrt(math.prod(actual[1:4])), rel=1e-9
    )
    assert diag.theory["measured_ratio"] == pytest.approx(diag.theory["predicted_ratio"], rel=0.3)
