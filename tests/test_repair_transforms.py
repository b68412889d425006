"""The model transformations of verified repair, each against a hand-derived oracle."""

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from vanishing.diagnose.findings import REMEDIES
from vanishing.repair.transforms import (
    MODEL_REMEDIES,
    NotApplicable,
    Residual,
    apply_remedy,
    describe_activations,
)

GAIN = {
    "tanh": 5 / 3,
    "relu": math.sqrt(2),
    "leaky_relu(0.2)": math.sqrt(2 / (1 + 0.2**2)),
    "sigmoid": 1.0,
    "selu": 1.0,  # variance 1/fan_in: SELU's fixed point (torch's calculate_gain says 3/4)
    "linear": 1.0,
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mlp(acts, width=8, d_in=4, d_out=2, seed=0):
    torch.manual_seed(seed)
    layers, d = [], d_in
    for act in acts:
        layers += [nn.Linear(d, width), act]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def wide_mlp():
    """Layers big enough for empirical std within 1% (160k weights: relative SE 0.18%)."""
    acts = [nn.Tanh(), nn.ReLU(), nn.LeakyReLU(0.2), nn.Sigmoid(), nn.SELU()]
    return mlp(acts, width=400, d_in=300, d_out=10), [*map(str, range(0, 11, 2))]


WIDE_KINDS = ["tanh", "relu", "leaky_relu(0.2)", "sigmoid", "selu", "linear"]


def assert_std(w, expected, rel=0.012):
    w = w.detach().double()
    n = w.numel()
    assert abs(w.mean().item()) < 5 * expected / math.sqrt(n)
    assert w.std().item() == pytest.approx(expected, rel=rel)


def run_snippet(code, model):
    ns = {"model": model}
    exec(code, ns)
    return ns["model"]


def structure(model):
    return [
        (n, repr(m) if not list(m.children()) else type(m).__name__)
        for n, m in model.named_modules()
    ]


def assert_same_model(a, b):
    assert structure(a) == structure(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------ models
class LSTMNet(nn.Module):
    def __init__(self, rnn=None):
        super().__init__()
        self.lstm = rnn or nn.LSTM(6, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class RNNNet(nn.Module):
    """The common ``out, _ = self.rnn(x)`` pattern."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(5, 7, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
        self.head = nn.Linear(14, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class RNNWithState(RNNNet):
    """Passes an initial hidden state: fine for a GRU, wrong for an LSTM (wants (h, c))."""

    def forward(self, x):
        h0 = torch.zeros(4, x.shape[0], 7)
        out, _ = self.rnn(x, h0)
        return self.head(out[:, -1])


class FunctionalTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(300, 400), nn.Linear(400, 400), nn.Linear(400, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class FunctionalSigmoid(FunctionalTanh):
    def forward(self, x):
        return self.out(nn.functional.sigmoid(self.fc2(nn.functional.sigmoid(self.fc1(x)))))


class Scrambled(nn.Module):
    """Registers its modules in another order than its forward runs them."""

    def __init__(self):
        super().__init__()
        self.act_a, self.act_b = nn.ReLU(), nn.Tanh()
        self.fc2, self.fc1, self.out = nn.Linear(400, 400), nn.Linear(300, 400), nn.Linear(400, 1)

    def forward(self, x):
        return self.out(self.act_a(self.fc2(self.act_b(self.fc1(x)))))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock shape: conv-bn-relu-conv-bn + identity."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    )  # fmt: skip


def encoder(layers=2, norm_first=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 4, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=norm_first
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def named_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            [("fc1", nn.Linear(4, 8)), ("act1", nn.Tanh()), ("fc2", nn.Linear(8, 8)),
             ("act2", nn.Tanh()), ("fc3", nn.Linear(8, 8)), ("act3", nn.Tanh()),
             ("out", nn.Linear(8, 2))]
        )
    )  # fmt: skip


def residual_mlp():
    m = mlp([nn.Tanh()] * 4)
    apply_remedy(m, "residual", example_inputs=torch.randn(5, 4))
    return m


X = torch.randn(5, 4)
SEQ = torch.randn(3, 9, 6)
CASES = {  # remedy -> (model factory, example_inputs)
    "he_init": (lambda: mlp([nn.Tanh(), nn.ReLU()]), X),
    "xavier_init": (lambda: mlp([nn.Tanh(), nn.ReLU()]), X),
    "lecun_init": (lambda: mlp([nn.SELU(), nn.SELU()]), X),
    "orthogonal_init": (lambda: (torch.manual_seed(0), LSTMNet())[1], SEQ),
    "relu": (lambda: mlp([nn.Sigmoid(), nn.Tanh()]), X),
    "leaky_relu": (lambda: mlp([nn.Sigmoid(), nn.ReLU()]), X),
    "prelu": (lambda: mlp([nn.Sigmoid(), nn.ReLU()]), X),
    "elu": (lambda: mlp([nn.Sigmoid(), nn.Tanh()]), X),
    "selu": (lambda: mlp([nn.Sigmoid(), nn.Tanh()]), X),
    "gelu": (lambda: mlp([nn.Sigmoid(), nn.Tanh()]), X),
    "batch_norm": (conv_net, torch.randn(4, 3, 6, 6)),
    "layer_norm": (lambda: mlp([nn.Tanh(), nn.Tanh()]), X),
    "residual": (named_mlp, X),
    "zero_init_residual": (residual_mlp, X),
    "pre_layer_norm": (encoder, torch.randn(2, 5, 16)),
    "forget_gate_bias": (lambda: (torch.manual_seed(0), LSTMNet())[1], SEQ),
    "lstm": (lambda: (torch.manual_seed(0), RNNNet())[1], torch.randn(3, 4, 5)),
    "gru": (lambda: (torch.manual_seed(0), RNNNet())[1], torch.randn(3, 4, 5)),
}


def test_model_remedies_are_the_vocabularys_model_changes():
    recipe = {"gradient_clipping", "lower_learning_rate", "higher_learning_rate"}
    recipe |= {"learning_rate_warmup", "layerwise_pretraining", "input_scaling"}
    assert set(MODEL_REMEDIES) == set(REMEDIES) - recipe
    assert set(CASES) == set(MODEL_REMEDIES)


@pytest.mark.parametrize("remedy", MODEL_REMEDIES)
def test_snippet_makes_the_same_model_with_the_same_seed(remedy):
    factory, inputs = CASES[remedy]
    a = factory()
    b = copy.deepcopy(a)
    done = apply_remedy(a, remedy, example_inputs=inputs, generator=gen(3))
    assert (
        done.remedy == remedy and done.layers and done.description and "\n" not in done.description
    )
    torch.manual_seed(3)
    b = run_snippet(done.code, b)
    assert_same_model(a, b)
    names = dict(a.named_modules())
    assert all(n in names for n in done.layers), (done.layers, list(names))
    with torch.no_grad():
        a.eval(), b.eval()
        assert torch.equal(a(inputs), b(inputs))


@pytest.mark.parametrize("remedy", MODEL_REMEDIES)
def test_the_original_is_untouched(remedy):
    factory, inputs = CASES[remedy]
    original = factory()
    before = copy.deepcopy(original)
    training = [m.training for m in original.modules()]
    apply_remedy(copy.deepcopy(original), remedy, example_inputs=inputs)
    assert_same_model(original, before)
    assert [m.training for m in original.modules()] == training


@pytest.mark.parametrize("remedy", MODEL_REMEDIES)
def test_snippet_makes_the_same_float64_model(remedy):
    # the snippet's new modules (norms, PReLU, LSTM/GRU) take the model's dtype, as apply does
    factory, inputs = CASES[remedy]
    a = factory().double()
    b = copy.deepcopy(a)
    inputs = inputs.double()
    done = apply_remedy(a, remedy, example_inputs=inputs, generator=gen(3))
    torch.manual_seed(3)
    b = run_snippet(done.code, b)
    assert_same_model(a, b)
    assert all(t.dtype == torch.float64 for t in b.state_dict().values() if t.is_floating_point())
    with torch.no_grad():
        a.eval(), b.eval()
        assert torch.equal(a(inputs), b(inputs))


# ------------------------------------------------------------------------------ re-init
def test_he_init_std_is_the_following_activations_gain_over_sqrt_fan_in():
    model, names = wide_mlp()
    done = apply_remedy(model, "he_init", example_inputs=torch.randn(2, 300), generator=gen())
    assert done.layers == names
    for name, kind in zip(names, WIDE_KINDS, strict=True):
        layer = model.get_submodule(name)
        assert_std(layer.weight, GAIN[kind] / math.sqrt(layer.in_features))
        assert torch.count_nonzero(layer.bias) == 0


def test_xavier_init_is_uniform_with_glorots_bound():
    model, names = wide_mlp()
    apply_remedy(model, "xavier_init", generator=gen())
    for name, kind in zip(names, WIDE_KINDS, strict=True):
        layer = model.get_submodule(name)
        fan = layer.in_features + layer.out_features
        bound = GAIN[kind] * math.sqrt(6 / fan)
        w = layer.weight.detach()
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.99 * bound  # uniform: the bound is reached
        assert_std(w, GAIN[kind] * math.sqrt(2 / fan))


def test_lecun_init_is_one_over_sqrt_fan_in_whatever_the_activation():
    model, names = wide_mlp()
    apply_remedy(model, "lecun_init", generator=gen())
    for name in names:
        layer = model.get_submodule(name)
        assert_std(layer.weight, 1 / math.sqrt(layer.in_features))


def test_orthogonal_init_gives_w_wt_equal_gain_squared_identity():
    model, names = wide_mlp()
    apply_remedy(model, "orthogonal_init", generator=gen())
    for name, kind in zip(names, WIDE_KINDS, strict=True):
        w = model.get_submodule(name).weight.detach().double()
        # orthonormal rows when out <= in, orthonormal columns otherwise
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        assert torch.allclose(gram, GAIN[kind] ** 2 * eye, atol=1e-5)


def test_orthogonal_init_of_an_lstm_orthogonal_recurrence_per_gate_xavier_input():
    torch.manual_seed(0)
    model = LSTMNet()
    done = apply_remedy(model, "orthogonal_init", example_inputs=SEQ, generator=gen())
    assert done.layers == ["head", "lstm"]
    h = 16
    for name, p in model.lstm.named_parameters():
        p = p.detach().double()
        if name.startswith("weight_hh"):
            for block in p.chunk(4):
                assert torch.allclose(block @ block.T, torch.eye(h, dtype=p.dtype), atol=1e-6)
        elif name.startswith("weight_ih"):
            for block in p.chunk(4):  # (H, input) per gate: Glorot bound sqrt(6/(in + H))
                assert block.abs().max() <= math.sqrt(6 / (block.shape[1] + h))
        else:
            assert torch.count_nonzero(p) == 0, name


def test_reinit_keeps_frozen_layers_and_says_so():
    # a frozen layer is a pretrained one the user keeps: neither the init remedies nor the
    # swaps' re-init may overwrite it (its snippet leaves it out too)
    model = mlp([nn.Tanh(), nn.Sigmoid()])
    model[0].requires_grad_(False)
    frozen = copy.deepcopy(model[0].state_dict())
    twin = copy.deepcopy(model)
    for remedy in ("he_init", "relu"):
        done = apply_remedy(model, remedy, example_inputs=X, generator=gen(1))
        assert "kept 0 (frozen)" in done.description
        assert all(torch.equal(v, model[0].state_dict()[k]) for k, v in frozen.items())
        torch.manual_seed(1)
        twin = run_snippet(done.code, twin)
        assert_same_model(model, twin)
        assert '"0"' not in done.code
    assert model[2].weight.std() > 0 and torch.count_nonzero(model[2].bias) == 0
    model[2].requires_grad_(False), model[4].requires_grad_(False)
    with pytest.raises(NotApplicable, match="no Linear/Conv layer may be re-initialised.*frozen"):
        apply_remedy(model, "he_init")


class TiedLM(nn.Module):
    """An embedding, a hidden layer, and an output layer sharing the embedding's weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.act(self.hidden(self.emb(ids))))


def test_reinit_keeps_a_layer_tied_to_an_embedding():
    model = TiedLM()
    emb = model.emb.weight.detach().clone()
    ids = torch.randint(0, 20, (3, 5))
    done = apply_remedy(model, "he_init", example_inputs=ids, generator=gen())
    assert done.layers == ["hidden"] and "kept out (weight tied to emb)" in done.description
    assert torch.equal(model.emb.weight, emb) and model.out.weight is model.emb.weight
    assert_std(model.hidden.weight, 0.0 + GAIN["tanh"] / math.sqrt(8), rel=0.6)


def test_he_init_under_weight_norm_sets_the_effective_weight():
    # the weight of a parametrized layer is computed from its originals (g, v): the init must
    # land in what the forward uses, m.weight, and the snippet must do the same
    from torch.nn.utils.parametrizations import weight_norm

    model, names = wide_mlp()
    for name in names:
        weight_norm(model.get_submodule(name))
    twin = copy.deepcopy(model)
    done = apply_remedy(model, "he_init", example_inputs=torch.randn(2, 300), generator=gen())
    assert done.layers == names and "kept" not in done.description
    for name, kind in zip(names, WIDE_KINDS, strict=True):
        layer = model.get_submodule(name)
        assert_std(layer.weight, GAIN[kind] / math.sqrt(layer.in_features))
    torch.manual_seed(0)
    assert_same_model(model, run_snippet(done.code, twin))


@pytest.mark.parametrize("kind", ["orthogonal", "spectral_norm"])
@pytest.mark.parametrize("remedy", ["he_init", "xavier_init", "relu"])
def test_a_parametrization_that_rejects_an_assigned_weight_keeps_its_layer_untouched(kind, remedy):
    # orthogonal and spectral norm do not give an assigned weight back: the layer is kept,
    # its parameters and buffers (power-iteration vectors) exactly as they were, and the draws
    # of the other layers are those of the snippet, which skips it too
    from torch.nn.utils import parametrizations

    model = mlp([nn.Sigmoid(), nn.Sigmoid()])
    getattr(parametrizations, kind)(model[2])
    twin = copy.deepcopy(model)
    layer = copy.deepcopy(model[2].state_dict())
    done = apply_remedy(model, remedy, example_inputs=X, generator=gen(5))
    assert "kept 2 (its weight parametrization" in done.description and "2" not in done.layers
    assert all(torch.equal(v, model[2].state_dict()[k]) for k, v in layer.items())
    torch.manual_seed(5)
    assert_same_model(model, run_snippet(done.code, twin))


def test_a_weight_tied_to_the_root_module_names_it():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.shared = self.lin.weight  # a parameter of the root itself
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.lin(x) @ self.shared))

    done = apply_remedy(Root(), "he_init", example_inputs=X)
    assert "kept lin (weight tied to (model))" in done.description


def test_reinit_keeps_layers_under_old_style_weight_norm_hooks():
    import warnings

    model = mlp([nn.Tanh(), nn.Tanh()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm: deprecated
        nn.utils.weight_norm(model[2])
    v = model[2].weight_v.detach().clone()
    done = apply_remedy(model, "he_init", example_inputs=X, generator=gen())
    assert "kept 2 (old-style torch.nn.utils.weight_norm hook)" in done.description
    assert done.layers == ["0", "4"] and torch.equal(model[2].weight_v, v)


def test_he_init_on_a_recurrent_only_model_points_to_orthogonal_init():
    with pytest.raises(NotApplicable, match="orthogonal_init"):
        apply_remedy(nn.LSTM(3, 4), "he_init")


def test_following_activation_is_read_from_the_forward_order():
    model = Scrambled()
    x = torch.randn(2, 300)
    assert describe_activations(model, x) == {"fc2": "relu", "fc1": "tanh", "out": "linear"}
    # registration order (no inputs): fc2 and fc1 come after both activations
    assert describe_activations(model) == {"fc2": "linear", "fc1": "linear", "out": "linear"}
    apply_remedy(model, "he_init", example_inputs=x, generator=gen())
    assert_std(model.fc1.weight, GAIN["tanh"] / math.sqrt(300))
    assert_std(model.fc2.weight, GAIN["relu"] / math.sqrt(400))
    assert_std(model.out.weight, 1 / math.sqrt(400), rel=0.2)  # only 400 weights


def test_one_activation_module_reused_after_every_layer_follows_each_of_them():
    shared = nn.Tanh()  # registered at "1", "3", "5": named_modules() lists it once
    model = mlp([shared] * 3, width=400, d_in=300)
    expected = {"0": "tanh", "2": "tanh", "4": "tanh", "6": "linear"}
    assert describe_activations(model, torch.randn(2, 300)) == expected
    assert describe_activations(model) == expected
    done = apply_remedy(model, "relu", example_inputs=torch.randn(2, 300), generator=gen())
    assert done.layers == ["1", "3", "5"]
    for i in (2, 4):
        assert_std(model[i].weight, GAIN["relu"] / math.sqrt(400))


def test_activation_option_stands_in_for_functional_activations_not_for_the_output():
    torch.manual_seed(0)
    model = FunctionalTanh()
    x = torch.randn(2, 300)
    done = apply_remedy(model, "he_init", example_inputs=x, activation="tanh", generator=gen())
    assert "fc1 (tanh, gain 1.667)" in done.description
    assert_std(model.fc1.weight, GAIN["tanh"] / math.sqrt(300))
    assert_std(model.fc2.weight, GAIN["tanh"] / math.sqrt(400))
    assert_std(model.out.weight, 1 / math.sqrt(400), rel=0.2)
    apply_remedy(model, "he_init", example_inputs=x, generator=gen())  # invisible: linear
    assert_std(model.fc2.weight, 1 / math.sqrt(400))


def test_tracing_leaves_batchnorm_statistics_and_modes_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    model[1].eval()
    apply_remedy(model, "he_init", example_inputs=torch.randn(6, 4) + 5)
    assert torch.equal(model[1].running_mean, torch.zeros(8))
    assert model.training and not model[1].training


# ------------------------------------------------------------------------------ activation swaps
def test_swap_to_relu_replaces_saturating_modules_keeps_the_output_map_reinits_he():
    torch.manual_seed(0)
    acts = [nn.Sigmoid(), nn.Tanh(), nn.Softsign(), nn.Hardtanh()]
    model = mlp(acts, width=400, d_in=300)
    model.append(nn.Sigmoid())  # the output's probabilities: not a hidden activation
    out_weight = model[8].weight.detach().clone()
    done = apply_remedy(model, "relu", example_inputs=torch.randn(3, 300), generator=gen())
    assert done.layers == ["1", "3", "5", "7"]
    assert [type(model[i]).__name__ for i in (1, 3, 5, 7, 9)] == ["ReLU"] * 4 + ["Sigmoid"]
    assert "hardtanh/sigmoid/softsign/tanh -> relu" in done.description
    assert "He init" in done.description
    for i, fan_in in zip((0, 2, 4, 6), (300, 400, 400, 400), strict=True):
        assert_std(model[i].weight, math.sqrt(2) / math.sqrt(fan_in))
    assert torch.equal(model[8].weight, out_weight)  # the output layer's init is kept


def test_swap_to_selu_reinits_lecun_and_to_elu_keeps_gain_one():
    torch.manual_seed(0)
    model = mlp([nn.Tanh(), nn.Tanh()], width=400, d_in=300)
    apply_remedy(model, "selu", generator=gen())
    assert isinstance(model[1], nn.SELU)
    assert_std(model[0].weight, 1 / math.sqrt(300))
    assert_std(model[2].weight, 1 / math.sqrt(400))
    model = mlp([nn.Tanh(), nn.Tanh()], width=400, d_in=300)
    done = apply_remedy(model, "elu", generator=gen())
    assert "Xavier" in done.description  # the registry's init for ELU: gain 1
    assert_std(model[2].weight, math.sqrt(2 / 800))


def test_swap_to_leaky_relu_also_replaces_relu_and_uses_its_slope_for_the_gain():
    model = mlp([nn.ReLU(), nn.Sigmoid()], width=400, d_in=300)
    apply_remedy(model, "leaky_relu", generator=gen())
    assert all(isinstance(model[i], nn.LeakyReLU) for i in (1, 3))
    assert_std(model[2].weight, math.sqrt(2 / (1 + 0.01**2)) / math.sqrt(400))
    model = mlp([nn.ReLU()])
    before = copy.deepcopy(model)
    apply_remedy(model, "leaky_relu", reinit=False)
    assert torch.equal(model[0].weight, before[0].weight)


def test_swap_replaces_every_registration_of_a_shared_module():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()
            self.net = nn.Sequential(nn.Linear(3, 3), self.act, nn.Linear(3, 3), self.act)
            self.out = nn.Linear(3, 1)

        def forward(self, x):
            return self.out(self.net(x))

    model = Shared()
    done = apply_remedy(model, "gelu", example_inputs=torch.randn(2, 3))
    assert done.layers == ["act", "net.1", "net.3"]
    assert all(isinstance(m, nn.GELU) for m in (model.act, model.net[1], model.net[3]))


def test_swaps_that_cannot_apply_say_why():
    torch.manual_seed(0)
    with pytest.raises(NotApplicable, match="functions inside forward"):
        apply_remedy(FunctionalSigmoid(), "relu", example_inputs=torch.randn(2, 300))
    with pytest.raises(NotApplicable, match="no sigmoid/tanh/softsign/hardtanh/relu6 activation"):
        apply_remedy(mlp([nn.ReLU()]), "relu")
    output_only = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    with pytest.raises(NotApplicable, match="follows the output layer"):
        apply_remedy(output_only, "relu", example_inputs=X)
    with pytest.raises(ValueError, match="swaps to 'relu'"):
        apply_remedy(mlp([nn.Tanh()]), "relu", to="elu")


# ------------------------------------------------------------------------------ norms
def _leaf_calls(model, x):
    calls, hooks = [], []
    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(lambda mod, a, o: calls.append((mod, a[0]))))
    model(x)
    for h in hooks:
        h.remove()
    return calls


def test_batch_norm_goes_between_each_hidden_linear_and_its_activation():
    model = mlp([nn.Tanh()] * 3)
    x = torch.randn(16, 4)
    before = model(x).shape
    done = apply_remedy(model, "batch_norm", example_inputs=x)
    assert done.layers == ["0.1", "2.1", "4.1"]
    names = {n: type(m).__name__ for n, m in model.named_modules()}
    assert [names[f"{i}.{j}"] for i in (0, 2, 4) for j in (0, 1)] == ["Linear", "BatchNorm1d"] * 3
    assert names["6"] == "Linear" and "6.1" not in names  # not after the output layer
    assert all(model.get_submodule(n).num_features == 8 for n in done.layers)
    calls = _leaf_calls(model, x)
    kinds = [type(m).__name__ for m, _ in calls]
    assert kinds == ["Linear", "BatchNorm1d", "Tanh"] * 3 + ["Linear"]
    assert model(x).shape == before
    for m, inp in calls:  # in training mode each Tanh sees batch-normalised features
        if isinstance(m, nn.Tanh):
            assert inp.mean(0).abs().max() < 1e-5
            assert torch.allclose(inp.var(0, unbiased=False), torch.ones(8), atol=1e-3)


def test_norms_after_convs_batchnorm2d_and_groupnorm_as_layernorm():
    x = torch.randn(4, 3, 6, 6)
    model = conv_net()
    done = apply_remedy(model, "batch_norm", example_inputs=x)
    assert done.layers == ["0.1", "2.1"]
    assert all(isinstance(model.get_submodule(n), nn.BatchNorm2d) for n in done.layers)
    model = conv_net()
    done = apply_remedy(model, "layer_norm", example_inputs=x)
    norm = model.get_submodule("2.1")
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 1 and norm.num_channels == 8
    inp = [a for m, a in _leaf_calls(model, x) if isinstance(m, nn.ReLU)][1]
    # LayerNorm over (C, H, W) of each example
    assert inp.flatten(1).mean(1).abs().max() < 1e-5
    assert torch.allclose(inp.flatten(1).var(1, unbiased=False), torch.ones(4), atol=1e-3)
    assert model(x).shape == (4, 10)


def test_batch_norm_skips_sequence_outputs_where_layer_norm_fits():
    model = mlp([nn.Tanh()])
    x = torch.randn(2, 7, 4)  # (batch, time, features): BatchNorm1d would normalise time
    with pytest.raises(NotApplicable, match=r"not \(batch, features\)"):
        apply_remedy(model, "batch_norm", example_inputs=x)
    done = apply_remedy(model, "layer_norm", example_inputs=x)
    assert isinstance(model.get_submodule(done.layers[0]), nn.LayerNorm)
    assert model(x).shape == (2, 7, 2)


def test_norms_that_cannot_apply_say_why():
    normed = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    with pytest.raises(NotApplicable, match="already normalised"):
        apply_remedy(normed, "batch_norm", example_inputs=X)
    with pytest.raises(NotApplicable, match="no hidden"):
        apply_remedy(nn.Linear(4, 1), "layer_norm")

    class LlamaRMSNorm(nn.Module):  # a model's own norm class (Hugging Face's, by its name)
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    for norm in (nn.RMSNorm(8), LlamaRMSNorm(8)):
        own = nn.Sequential(nn.Linear(4, 8), norm, nn.Tanh(), nn.Linear(8, 1))
        with pytest.raises(NotApplicable, match="already normalised"):
            apply_remedy(own, "layer_norm", example_inputs=X)
    with pytest.raises(NotApplicable, match="inside TransformerEncoderLayer"):
        apply_remedy(encoder(), "layer_norm", example_inputs=torch.randn(2, 5, 16))


# ------------------------------------------------------------------------------ residual
def test_residual_wraps_the_same_shape_run_and_computes_x_plus_f_x_exactly():
    model = mlp([nn.Tanh()] * 4)
    oracle = copy.deepcopy(model)
    x = torch.randn(5, 4)
    done = apply_remedy(model, "residual", example_inputs=x)
    # [Linear(4, 8), Tanh] changes the shape; the output Linear(8, 2) is not wrapped
    assert done.layers == ["2", "3", "4"]
    assert [type(m).__name__ for m in model] == ["Linear", "Tanh", *["Residual"] * 3, "Linear"]
    assert isinstance(model[2].block[0], nn.Linear) and isinstance(model[2].block[1], nn.Tanh)
    h = torch.tanh(oracle[0](x))
    for i in (2, 4, 6):
        h = h + torch.tanh(oracle[i](h))
    assert torch.equal(model(x), oracle[8](h))
    r = model[3]
    assert torch.equal(r(h), h + r.block(h))


def test_residual_keeps_the_keys_of_a_named_sequential():
    model = named_mlp()
    done = apply_remedy(model, "residual", example_inputs=X)
    assert done.layers == ["fc2", "fc3"]
    assert list(model._modules) == ["fc1", "act1", "fc2", "fc3", "out"]
    assert list(model.fc2.block._modules) == ["fc2", "act2"]


def test_residual_inside_a_nested_sequential_and_its_snippet():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), inner, nn.Linear(8, 2))
    copy_ = copy.deepcopy(model)
    done = apply_remedy(model, "residual", example_inputs=X)
    # the outer run [inner] is one block: only the inner Sequential's two blocks are wrapped
    assert done.layers == ["2.0", "2.1"]
    assert model[2] is inner and isinstance(inner[0], Residual)
    assert_same_model(model, run_snippet(done.code, copy_))


def test_residual_that_cannot_apply_says_why():
    pyramid = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(NotApplicable, match="same-shape"):
        apply_remedy(pyramid, "residual", example_inputs=torch.randn(2, 8))
    with pytest.raises(NotApplicable, match="same-shape"):  # one same-shape block is no run
        apply_remedy(mlp([nn.Tanh()] * 2), "residual", example_inputs=X)
    with pytest.raises(NotApplicable, match="already has residual structure"):
        apply_remedy(residual_mlp(), "residual", example_inputs=X)
    with pytest.raises(NotApplicable, match="already has residual structure .BasicBlock"):
        apply_remedy(nn.Sequential(BasicBlock(), BasicBlock()), "residual", example_inputs=X)
    with pytest.raises(NotApplicable, match="example_inputs"):
        apply_remedy(mlp([nn.Tanh()] * 4), "residual")


def test_zero_init_residual_makes_each_block_the_identity():
    model = residual_mlp()
    x = torch.randn(5, 4)
    done = apply_remedy(model, "zero_init_residual")
    assert done.layers == [
        "2.block.0",
        "2.block.0",
        "3.block.0",
        "3.block.0",
        "4.block.0",
        "4.block.0",
    ]
    h = torch.tanh(model[0](x))
    for i in (2, 3, 4):
        assert torch.equal(model[i](h), h)  # tanh(0 h + 0) = 0
    assert torch.equal(model(x), model[5](h))


def test_zero_init_residual_zeroes_the_last_norm_of_a_branch():
    torch.manual_seed(0)
    block = Residual(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()))
    w = block.block[0].weight.detach().clone()
    apply_remedy(block, "zero_init_residual")
    assert torch.count_nonzero(block.block[1].weight) == 0
    assert torch.equal(block.block[0].weight, w)
    x = torch.randn(6, 4)
    assert torch.equal(block(x), x)
    net = nn.Sequential(BasicBlock(), BasicBlock())
    done = apply_remedy(net, "zero_init_residual")
    assert done.layers == ["0.bn2", "1.bn2"]
    assert torch.count_nonzero(net[0].bn2.weight) == 0 and torch.all(net[0].bn1.weight == 1)


def test_zero_init_residual_in_a_post_ln_transformer_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    done = apply_remedy(layer, "zero_init_residual")
    assert done.layers == ["self_attn.out_proj"] * 2 + ["linear2"] * 2
    layer.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.norm2(layer.norm1(x)), atol=1e-5)
    with pytest.raises(NotApplicable, match="no residual block"):
        apply_remedy(mlp([nn.Tanh()]), "zero_init_residual")


# ------------------------------------------------------------------------------ transformers
def _pre_ln(layer, x):
    h = layer.norm1(x)
    x = x + layer.self_attn(h, h, h, need_weights=False)[0]
    h = layer.norm2(x)
    return x + layer.linear2(torch.relu(layer.linear1(h)))


def test_pre_layer_norm_flips_norm_first_and_the_layer_computes_pre_ln():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    layer.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        post = layer(x)
        done = apply_remedy(layer, "pre_layer_norm")
        assert done.layers == [""] and layer.norm_first
        pre = layer(x)
        assert torch.allclose(pre, _pre_ln(layer, x), atol=1e-5)
        assert not torch.allclose(pre, post, atol=1e-2)


def test_pre_layer_norm_on_a_stack_adds_the_final_layernorm():
    model = encoder()
    x = torch.randn(2, 5, 16)
    done = apply_remedy(model, "pre_layer_norm", example_inputs=x)
    assert done.layers == ["layers.0", "layers.1", "norm"]
    assert isinstance(model.norm, nn.LayerNorm) and model.norm.normalized_shape == (16,)
    model.eval()
    with torch.no_grad():
        expected = model.norm(_pre_ln(model.layers[1], _pre_ln(model.layers[0], x)))
        assert torch.allclose(model(x), expected, atol=1e-5)
    model = encoder()
    assert apply_remedy(model, "pre_layer_norm", final_norm=False).layers == [
        "layers.0",
        "layers.1",
    ]
    assert model.norm is None
    with pytest.raises(NotApplicable, match="already pre-LN"):
        apply_remedy(encoder(norm_first=True), "pre_layer_norm")
    with pytest.raises(NotApplicable, match="Transformer layers only"):
        apply_remedy(mlp([nn.Tanh()]), "pre_layer_norm")


# ------------------------------------------------------------------------------ recurrent
def test_forget_gate_bias_sets_the_forget_slice_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(5, 7, num_layers=2, bidirectional=True), nn.LSTMCell(3, 7))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = apply_remedy(model, "forget_gate_bias", value=2.0)
    assert done.layers == ["0", "1"]
    h = 7
    biases = [k for k in before if ".bias_" in k]
    assert len(biases) == 10  # 2 layers x 2 directions x (ih, hh) + the cell's 2
    for k in biases:
        new, old = model.state_dict()[k], before[k]
        assert torch.all(new[h : 2 * h] == (2.0 if ".bias_ih" in k else 0.0)), k
        assert torch.equal(new[:h], old[:h]) and torch.equal(new[2 * h :], old[2 * h :]), k
    for k in (k for k in biases if ".bias_ih" in k):
        gate = model.state_dict()[k] + model.state_dict()[k.replace("_ih", "_hh")]
        assert torch.all(gate[h : 2 * h] == 2.0)


def test_forget_gate_bias_that_cannot_apply_says_why():
    with pytest.raises(NotApplicable, match="no forget gate"):
        apply_remedy(nn.GRU(3, 4), "forget_gate_bias")
    with pytest.raises(NotApplicable, match="bias=False"):
        apply_remedy(nn.LSTM(3, 4, bias=False), "forget_gate_bias")
    with pytest.raises(ValueError, match="finite number"):
        apply_remedy(nn.LSTM(3, 4), "forget_gate_bias", value=float("nan"))


@pytest.mark.parametrize(("remedy", "cls"), [("lstm", nn.LSTM), ("gru", nn.GRU)])
def test_rnn_to_lstm_or_gru_keeps_the_sizes_and_the_model_runs(remedy, cls):
    torch.manual_seed(0)
    model = RNNNet()
    x = torch.randn(3, 4, 5)
    done = apply_remedy(model, remedy, example_inputs=x)
    assert done.layers == ["rnn"]
    rnn = model.rnn
    assert type(rnn) is cls
    sizes = (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.batch_first, rnn.bidirectional)
    assert sizes == (5, 7, 2, True, True) and rnn.dropout == 0.1
    assert model(x).shape == (3, 3)
    model(x).sum().backward()
    assert rnn.weight_hh_l1_reverse.grad is not None


def test_rnn_to_lstm_with_an_initial_state_is_not_applicable_gru_is():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)
    with pytest.raises(NotApplicable, match="after lstm, the forward fails"):
        apply_remedy(RNNWithState(), "lstm", example_inputs=x)
    model = RNNWithState()
    apply_remedy(model, "gru", example_inputs=x)
    assert model(x).shape == (3, 3)
    with pytest.raises(NotApplicable, match="no nn.RNN"):
        apply_remedy(LSTMNet(), "gru")


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_value_error_a_recipe_remedy_not_applicable():
    with pytest.raises(ValueError, match="nn.Module"):
        apply_remedy("net", "relu")
    with pytest.raises(ValueError, match="unknown remedy 'relu2'"):
        apply_remedy(mlp([nn.Tanh()]), "relu2")
    with pytest.raises(ValueError, match="unknown option.*value.*takes activation"):
        apply_remedy(mlp([nn.Tanh()]), "he_init", value=1.0)
    with pytest.raises(ValueError, match="activation must be"):
        apply_remedy(mlp([nn.Tanh()]), "he_init", activation="swish")
    with pytest.raises(ValueError, match="torch.Generator"):
        apply_remedy(mlp([nn.Tanh()]), "he_init", generator=0)
    with pytest.raises(NotApplicable, match="training-recipe"):
        apply_remedy(mlp([nn.Tanh()]), "gradient_clipping")
    with pytest.raises(NotApplicable, match="example_inputs fails: RuntimeError"):
        apply_remedy(mlp([nn.Tanh()]), "batch_norm", example_inputs=torch.randn(2, 5))
