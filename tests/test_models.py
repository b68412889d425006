"""Model builders: every init against its formula, recurrent inits, residual and norm wiring by
hand, output shapes of every kind on every task, and a short training run."""

import copy
import math

import pytest
import torch
from torch import nn

from vanishing.experiments.models import (
    ACTIVATIONS,
    BIAS_INITS,
    CELLS,
    INITS,
    KINDS,
    NORMS,
    RECURRENT_INITS,
    ConvBlock,
    Dense,
    build_model,
    init_linear,
    init_weight_,
    mlp,
)
from vanishing.experiments.tasks import TASKS, make_task


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(a, b):
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------- inits vs formulas
FAN_IN, FAN_OUT = 400, 300


@pytest.mark.parametrize(
    ("init", "activation", "expected_std", "uniform_bound"),
    [
        ("glorot_standard", "sigmoid", 1 / math.sqrt(FAN_IN) / math.sqrt(3), 1 / math.sqrt(FAN_IN)),
        (
            "xavier_uniform",
            "tanh",
            math.sqrt(2 / (FAN_IN + FAN_OUT)),
            math.sqrt(6 / (FAN_IN + FAN_OUT)),
        ),
        ("xavier_normal", "tanh", math.sqrt(2 / (FAN_IN + FAN_OUT)), None),
        ("he_uniform", "relu", math.sqrt(2 / FAN_IN), math.sqrt(6 / FAN_IN)),
        ("he_normal", "relu", math.sqrt(2 / FAN_IN), None),
        ("he_normal", "elu", math.sqrt(2 / FAN_IN), None),
        ("he_normal", "leaky_relu", math.sqrt(2 / ((1 + 0.01**2) * FAN_IN)), None),
        ("he_normal", "prelu", math.sqrt(2 / ((1 + 0.25**2) * FAN_IN)), None),
        (
            "he_uniform",
            "prelu",
            math.sqrt(2 / ((1 + 0.25**2) * FAN_IN)),
            math.sqrt(6 / ((1 + 0.25**2) * FAN_IN)),
        ),
        ("lecun_normal", "selu", 1 / math.sqrt(FAN_IN), None),
    ],
)
def test_init_std_and_bounds_match_the_formula(init, activation, expected_std, uniform_bound):
    layer = nn.Linear(FAN_IN, FAN_OUT)
    init_linear(layer, init, activation=activation)
    w = layer.weight.detach()
    assert _rel(w.std().item(), expected_std) < 0.01  # prelu's slope alone moves it 3 %
    assert abs(w.mean().item()) < 0.02 * expected_std
    if uniform_bound is not None:
        assert w.abs().max().item() <= uniform_bound
        assert w.abs().max().item() > 0.99 * uniform_bound
    else:  # a normal draw exceeds 3 std in ~0.27 % of entries
        assert 0.001 < (w.abs() > 3 * expected_std).float().mean().item() < 0.005
    assert torch.count_nonzero(layer.bias) == 0  # legacy: non-default inits zero the bias


@pytest.mark.parametrize("std", [1.0, 0.05])
def test_normal_init_uses_the_given_std(std):
    w = init_weight_(torch.empty(FAN_OUT, FAN_IN), "normal", std=std)
    assert _rel(w.std().item(), std) < 0.02
    assert abs(w.mean().item()) < 0.02 * std


def test_convolution_fan_in_counts_the_kernel():
    conv = nn.Conv2d(16, 64, 3)  # fan_in = 16 * 3 * 3 = 144
    init_linear(conv, "lecun_normal")
    assert _rel(conv.weight.std().item(), 1 / 12) < 0.03
    init_linear(conv, "glorot_standard")
    assert conv.weight.abs().max().item() <= 1 / 12
    assert conv.weight.abs().max().item() > 0.99 / 12


@pytest.mark.parametrize("shape", [(64, 64), (32, 64), (64, 32)])
def test_orthogonal_init_is_exactly_orthogonal(shape):
    w = init_weight_(torch.empty(shape), "orthogonal").double()
    small = min(shape)
    gram = w @ w.T if shape[0] <= shape[1] else w.T @ w
    assert torch.allclose(gram, torch.eye(small, dtype=torch.double), atol=1e-5)


def test_identity_init_square_non_square_and_conv():
    assert torch.equal(init_weight_(torch.empty(5, 5), "identity"), torch.eye(5))
    wide = init_weight_(torch.randn(3, 5), "identity")
    assert torch.equal(wide, torch.eye(5)[:3])
    tall = init_weight_(torch.randn(5, 3), "identity")
    assert torch.equal(tall, torch.eye(5)[:, :3])
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    init_linear(conv, "identity")
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(conv(x), x)


def test_default_init_keeps_pytorch_weights_and_biases():
    layer = nn.Linear(10, 10)
    before = copy.deepcopy(layer.state_dict())
    init_linear(layer, "default")
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_bias_inits():
    layer = nn.Linear(50, 20000)
    init_linear(layer, "default", bias_init="normal", bias_value=0.5, bias_std=2.0)
    assert _rel(layer.bias.std().item(), 2.0) < 0.03 and abs(layer.bias.mean().item() - 0.5) < 0.06
    init_linear(layer, "he_normal", bias_init="constant", bias_value=-1.5)
    assert torch.all(layer.bias == -1.5)
    init_linear(layer, "he_normal", bias_init="zeros")
    assert torch.all(layer.bias == 0)
    torch.manual_seed(3)
    fresh = nn.Linear(50, 20000)
    kept = fresh.bias.clone()
    init_linear(fresh, "he_normal", bias_init="default")
    assert torch.equal(fresh.bias, kept)


def test_build_model_applies_init_and_bias_to_every_layer():
    task = make_task("teacher", n_train=8, n_test=8, n_features=256)
    model = build_model(
        task,
        depth=3,
        width=256,
        activation="selu",
        init="lecun_normal",
        bias_init="constant",
        bias_value=0.25,
    )
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4
    for m in linears:
        assert _rel(m.weight.std().item(), 1 / math.sqrt(m.in_features)) < 0.1
        assert torch.all(m.bias == 0.25)
    cnn = build_model(task, kind="cnn", depth=2, width=64, activation="relu", init="he_normal")
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 5  # stem + 2 blocks of 2
    for m in convs[1:]:
        assert _rel(m.weight.std().item(), math.sqrt(2 / (64 * 3))) < 0.1
        assert torch.all(m.bias == 0)  # bias_init default is "zeros"
    default = build_model(task, depth=2, width=256)  # init default, bias_init zeros
    assert all(torch.all(m.bias == 0) for m in default.modules() if isinstance(m, nn.Linear))


def test_transformer_attention_projections_get_the_init():
    task = make_task("adding", n_train=4, n_test=4, seq_len=10)
    model = build_model(task, kind="transformer", depth=1, width=64, init="normal", init_std=0.5)
    attn = model.encoder.layers[0].self_attn
    assert _rel(attn.in_proj_weight.std().item(), 0.5) < 0.05
    assert torch.all(attn.in_proj_bias == 0)


# --------------------------------------------------------------------------- recurrent inits
def _seq_task():
    return make_task("adding", n_train=4, n_test=4, seq_len=6)


def test_recurrent_identity_init_times_gain_is_the_irnn():
    model = build_model(
        _seq_task(),
        kind="rnn",
        cell="rnn",
        depth=2,
        width=16,
        activation="relu",
        recurrent_init="identity",
        recurrent_gain=0.5,
        init="normal",
        init_std=0.001,
    )
    for layer in model.recurrent:
        assert torch.equal(layer.weight_hh_l0, 0.5 * torch.eye(16))
        assert torch.all(layer.bias_ih_l0 == 0) and torch.all(layer.bias_hh_l0 == 0)
        assert _rel(layer.weight_ih_l0.std().item(), 0.001) < 0.3


@pytest.mark.parametrize(("cell", "gates"), [("lstm", 4), ("gru", 3), ("rnn", 1)])
def test_recurrent_orthogonal_init_is_orthogonal_per_gate(cell, gates):
    gain = 1.2
    model = build_model(
        _seq_task(),
        kind="rnn",
        cell=cell,
        depth=1,
        width=12,
        activation="tanh",
        recurrent_init="orthogonal",
        recurrent_gain=gain,
    )
    w = model.recurrent[0].weight_hh_l0.detach().double()
    assert w.shape == (gates * 12, 12)
    for block in w.view(gates, 12, 12):
        assert torch.allclose(
            block.T @ block, gain**2 * torch.eye(12, dtype=torch.double), atol=1e-5
        )


def test_recurrent_gain_scales_the_default_init():
    torch.manual_seed(5)
    a = build_model(_seq_task(), kind="rnn", cell="gru", depth=1, width=8)
    torch.manual_seed(5)
    b = build_model(_seq_task(), kind="rnn", cell="gru", depth=1, width=8, recurrent_gain=3.0)
    assert torch.allclose(b.recurrent[0].weight_hh_l0, 3.0 * a.recurrent[0].weight_hh_l0)


def test_forget_gate_bias_sets_exactly_the_forget_slice():
    H = 10
    model = build_model(
        _seq_task(),
        kind="rnn",
        cell="lstm",
        depth=2,
        width=H,
        forget_bias=1.0,
        bias_init="normal",
        bias_value=0.0,
        bias_std=1.0,
    )
    for layer in model.recurrent:
        b_ih, b_hh = layer.bias_ih_l0.detach(), layer.bias_hh_l0.detach()
        assert torch.all(b_ih[H : 2 * H] == 1.0) and torch.all(b_hh[H : 2 * H] == 0.0)
        others = torch.cat([b_ih[:H], b_ih[2 * H :]])
        assert torch.all(others != 1.0) and others.std() > 0.3  # left to bias_init (normal)
        assert torch.all(torch.cat([b_hh[:H], b_hh[2 * H :]]) == 0)


def test_forget_slice_is_the_forget_gate_of_pytorchs_lstm():
    """One LSTM step by hand: all weights 0, c0 = 1. If [H:2H] is the forget gate, c1 =
    sigmoid(b) * c0; were it the input gate, c1 would be sigmoid(0) * c0 = 0.5."""
    H, b = 4, 3.0
    model = build_model(
        _seq_task(),
        kind="rnn",
        cell="lstm",
        depth=1,
        width=H,
        forget_bias=b,
        init="normal",
        init_std=0.0,
        recurrent_init="default",
        recurrent_gain=0.0,
    )
    lstm = model.recurrent[0]
    assert torch.all(lstm.weight_ih_l0 == 0) and torch.all(lstm.weight_hh_l0 == 0)
    x = torch.zeros(1, 1, 2)
    _, (h1, c1) = lstm(x, (torch.zeros(1, 1, H), torch.ones(1, 1, H)))
    f = torch.sigmoid(torch.tensor(b))
    assert torch.allclose(c1, f * torch.ones(1, 1, H))
    assert torch.allclose(h1, 0.5 * torch.tanh(f) * torch.ones(1, 1, H))


# --------------------------------------------------------------------------- residual and norms
def test_residual_mlp_layers_compute_x_plus_f_of_x():
    task = make_task("teacher", n_train=8, n_test=8, n_features=6)
    model = build_model(task, depth=3, width=5, activation="tanh", residual=True, init="normal")
    x = task.x_test
    h0 = torch.tanh(x @ model.hidden[0].linear.weight.T + model.hidden[0].linear.bias)
    assert torch.allclose(model.hidden[0](x), h0)  # the projection to the width is plain
    lin1 = model.hidden[1].linear
    h1 = h0 + torch.tanh(h0 @ lin1.weight.T + lin1.bias)
    assert torch.allclose(model.hidden[1](h0), h1)
    lin2 = model.hidden[2].linear
    h2 = h1 + torch.tanh(h1 @ lin2.weight.T + lin2.bias)
    assert torch.allclose(model(x), h2 @ model.head.weight.T + model.head.bias, atol=1e-6)


def test_legacy_mlp_residual_matches_build_model_layers():
    net = mlp(6, 3, depth=3, width=5, activation="sigmoid", init="normal", residual=True)
    assert [type(m) for m in net] == [Dense, Dense, Dense, nn.Linear]
    assert [m.residual for m in net[:3]] == [False, True, True]
    x = torch.randn(4, 6)
    h = torch.sigmoid(net[0].linear(x))
    for block in net[1:3]:
        h = h + torch.sigmoid(h @ block.linear.weight.T + block.linear.bias)
    assert torch.allclose(net(x), net[3](h))
    assert all(torch.all(m.bias == 0) for m in net.modules() if isinstance(m, nn.Linear))


def test_legacy_mlp_keeps_its_flat_layout():
    net = mlp(64, 10, depth=2, width=8, activation="relu", norm="batch")
    assert [type(m).__name__ for m in net] == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
    ]


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.parametrize("residual", [False, True])
def test_conv_block_by_hand(norm, residual):
    block = ConvBlock(3, dims=2, activation="elu", norm=norm, residual=residual)
    block.train()
    x = torch.randn(4, 3, 5, 5)
    F = nn.functional

    def n(h):
        if norm == "batch":
            return F.batch_norm(h, None, None, training=True, eps=1e-5)
        if norm == "layer":
            return F.group_norm(h, 1, eps=1e-5)
        return h

    h = F.elu(n(F.conv2d(x, block.conv1.weight, block.conv1.bias, padding=1)))
    h = n(F.conv2d(h, block.conv2.weight, block.conv2.bias, padding=1))
    expected = F.elu(h + x if residual else h)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_norm_sits_between_linear_and_activation():
    task = make_task("teacher", n_train=32, n_test=32, n_features=6)
    F = nn.functional
    for norm in ("batch", "layer"):
        model = build_model(task, depth=2, width=7, activation="sigmoid", norm=norm)
        layer = model.hidden[0]
        assert [name for name, _ in layer.named_children()] == ["linear", "norm", "act"]
        z = layer.linear(task.x_train)
        if norm == "batch":
            zn = F.batch_norm(z, None, None, training=True)
        else:
            zn = F.layer_norm(z, (7,))
        assert torch.allclose(layer(task.x_train), torch.sigmoid(zn), atol=1e-6)
    cnn = build_model(task, kind="cnn", depth=1, width=4, norm="layer")
    assert isinstance(cnn.stem.norm, nn.GroupNorm) and cnn.stem.norm.num_groups == 1
    assert [n for n, _ in cnn.blocks[0].named_children()] == [
        "conv1",
        "norm1",
        "act1",
        "conv2",
        "norm2",
        "act2",
    ]


# --------------------------------------------------------------------------- shapes per kind
def _tasks():
    out = {
        name: make_task(name, n_train=16, n_test=8, seq_len=6)
        for name in TASKS
        if name not in ("mnist", "mnist1d")
    }
    return out


@pytest.fixture(scope="module")
def small_tasks():
    tasks = _tasks()
    tasks["mnist1d"] = make_task("mnist1d", n_train=20, n_test=10)
    return tasks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [t for t in TASKS if t != "mnist"])
def test_every_kind_fits_every_task(kind, name, small_tasks):
    task = small_tasks[name]
    act = "tanh" if kind == "rnn" else "gelu"
    model = build_model(task, kind=kind, depth=2, width=8, heads=2, activation=act)
    out = model(task.x_train)
    n = len(task.x_train)
    if task.per_step:
        assert out.shape == (n, task.input_shape[0], task.n_outputs)
    else:
        assert out.shape == (n, task.n_outputs)
    loss = task.loss(out, task.y_train)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_sequence_readers_follow_the_documented_layout(small_tasks):
    """rnn reads digits as 8 rows of 8 pixels: feeding the rows by hand gives the same output."""
    task = small_tasks["digits"]
    model = build_model(task, kind="rnn", cell="gru", depth=1, width=6)
    x = task.x_test
    rows = x[:, 0]  # (N, 8, 8): row r is time step r
    h, _ = model.recurrent[0](rows)
    assert torch.allclose(model(x), model.head(h[:, -1]))
    signal = small_tasks["mnist1d"]
    model = build_model(signal, kind="rnn", cell="rnn", activation="tanh", depth=1, width=6)
    h, _ = model.recurrent[0](signal.x_test.transpose(1, 2))  # 40 steps of 1 value
    assert h.shape[1] == 40
    assert torch.allclose(model(signal.x_test), model.head(h[:, -1]))


@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_pre_and_post_layer_norm(norm_first, small_tasks):
    task = small_tasks["copy"]
    model = build_model(task, kind="transformer", depth=2, width=8, heads=2, norm_first=norm_first)
    assert all(layer.norm_first == norm_first for layer in model.encoder.layers)
    assert (model.encoder.norm is not None) == norm_first
    assert isinstance(model.encoder.layers[0].activation, nn.Sigmoid)  # a real module


def test_layer_names_are_readable_and_in_forward_order(small_tasks, tmp_path):
    import vanishing

    task = small_tasks["digits"]
    model = build_model(task, depth=2, width=8, activation="relu", norm="layer")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r"):
        opt.zero_grad()
        task.loss(model(task.x_train), task.y_train).backward()
        opt.step()
    names = [info["name"] for info in vanishing.load_run(tmp_path / "r").layer_info]
    assert names == [
        "hidden.0.linear",
        "hidden.0.norm",
        "hidden.0.act",
        "hidden.1.linear",
        "hidden.1.norm",
        "hidden.1.act",
        "head",
    ]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "resnet"}, "unknown kind 'resnet'; expected one of: mlp, cnn, rnn, transformer"),
        ({"activation": "swish"}, "unknown activation 'swish'; expected one of: sigmoid"),
        ({"init": "kaiming"}, "unknown init 'kaiming'; expected one of: default, normal"),
        ({"bias_init": "ones"}, "unknown bias_init 'ones'"),
        ({"norm": "group"}, "unknown norm 'group'; expected one of: none, batch, layer"),
        ({"kind": "rnn", "cell": "lstmx"}, "unknown cell 'lstmx'"),
        ({"kind": "rnn", "recurrent_init": "eye"}, "unknown recurrent_init 'eye'"),
        (
            {"kind": "rnn", "activation": "sigmoid"},
            "plain RNN cell supports activation tanh or relu",
        ),
        ({"kind": "rnn", "cell": "gru", "forget_bias": 1.0}, "forget_bias applies to LSTMs only"),
        ({"kind": "transformer", "width": 10, "heads": 4}, "divisible by heads"),
        ({"kind": "transformer", "norm": "batch"}, "always uses LayerNorm"),
        ({"depth": -1}, "depth must be an integer >= 0"),
        ({"width": 0}, "width must be an integer >= 1"),
    ],
)
def test_bad_config_is_a_one_line_error(kwargs, match, small_tasks):
    with pytest.raises(ValueError, match=match) as err:
        build_model(small_tasks["teacher"], **kwargs)
    assert "\n" not in str(err.value)


def test_exported_vocabularies():
    assert set(ACTIVATIONS) == {
        "sigmoid",
        "tanh",
        "softsign",
        "relu",
        "leaky_relu",
        "prelu",
        "elu",
        "selu",
        "gelu",
    }
    assert "identity" in INITS and "glorot_standard" in INITS
    assert KINDS == ("mlp", "cnn", "rnn", "transformer")
    assert CELLS == ("rnn", "lstm", "gru") and NORMS == ("none", "batch", "layer")
    assert BIAS_INITS == ("zeros", "default", "constant", "normal")
    assert RECURRENT_INITS == ("default", "orthogonal", "identity")


# --------------------------------------------------------------------------- training smoke
def test_relu_he_mlp_learns_digits():
    task = make_task("digits")
    torch.manual_seed(0)
    model = build_model(task, depth=3, width=64, activation="relu", init="he_normal")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(task.x_train), (64,), generator=g)
        opt.zero_grad()
        task.loss(model(task.x_train[idx]), task.y_train[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert task.metric(model(task.x_test), task.y_test) > 0.9
