"""The labelled benchmark of the diagnosis: small training jobs whose label holds by construction.

Each :class:`Case` builds a model, an optimizer, a few batches and a loss in plain torch (CPU,
seconds), says which finding kinds its diagnosis *requires* and which it *may also* show, whether
its label already holds at initialisation (so ``vanishing.inspect`` must find it before
training), and how to *confirm* the label independently of ``vanishing`` (``oracle.py``: plain
``torch.autograd.grad``, forward hooks, weight snapshots).

Used by ``tests/test_diagnose_cases.py`` (every case, after training and at init) and by
``bench/diagnosis.py`` (recall / precision per kind against the AUTOTRAINER baseline).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cases import oracle

F = nn.functional


@dataclass
class Job:
    """What a case trains: the model, its optimizer, the batches (cycled) and the loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable
    hidden: list[str]  # the hidden layers through depth, in forward order (module names)


@dataclass(frozen=True)
class Case:
    """A labelled training job. ``confirm(job, losses)`` raises AssertionError when the label
    does not hold on ``job.model`` as it is now (``losses`` is None before training)."""

    name: str
    family: str
    build: Callable[[], Job]
    required: tuple[str, ...]
    confirm: Callable[[Job, list[float] | None], None]
    allowed: tuple[str, ...] = ()
    steps: int = 30
    at_init: bool = True  # the label holds at initialisation, so inspect() must find it

    @property
    def healthy(self) -> bool:
        return not self.required


def train(job: Job, steps: int) -> list[float]:
    """The plain training loop every case uses; returns the loss of each step."""
    losses = []
    for i in range(steps):
        x, y = job.batches[i % len(job.batches)]
        job.optimizer.zero_grad()
        loss = job.loss_fn(job.model(x), y)
        loss.backward()
        job.optimizer.step()
        losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------------------------- data
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def blobs(n=256, d=16, classes=4, batch=64, seed=0, scale=1.0):
    """Gaussian inputs labelled by a random linear teacher: learnable, and fast."""
    g = _gen(seed)
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, classes, generator=g)
    y = (x @ teacher).argmax(1)
    x = x * scale
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def digits(n=512, batch=128, images=False, scale=1.0):
    """sklearn's 8x8 digits (offline), pixels in [0, 1] times ``scale``."""
    x, y = _digits()
    x, y = x[:n] * scale, y[:n]
    if images:
        x = x.view(-1, 1, 8, 8)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def sequences(n=64, T=30, d=2, batch=32, seed=0, target="adding"):
    """Batch-first sequences. ``adding``: Hochreiter's adding problem (two marked values, one in
    the first tenth of the sequence: the target needs memory of the start); ``recent``: the mean
    of the last three steps' first channel (needs no long memory)."""
    g = _gen(seed)
    x = torch.rand(n, T, d, generator=g)
    if target == "adding":
        x[:, :, 1] = 0
        first = torch.randint(0, max(1, T // 10), (n,), generator=g)
        second = torch.randint(T // 2, T, (n,), generator=g)
        x[torch.arange(n), first, 1] = 1
        x[torch.arange(n), second, 1] = 1
        y = (x[:, :, 0] * x[:, :, 1]).sum(1)
    else:
        y = x[:, -3:, 0].mean(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def tokens(n=64, T=12, vocab=20, batch=32, seed=0):
    """Token sequences; the class is whether token 0 appears more often than token 1."""
    g = _gen(seed)
    x = torch.randint(0, vocab, (n, T), generator=g)
    y = ((x == 0).sum(1) > (x == 1).sum(1)).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


# ---------------------------------------------------------------------------------- models
def mlp(sizes, act, init=None, bias=None):
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``act()`` after each hidden one.
    Module names: the linears are "0", "2", ...; returns (model, names of the hidden linears)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        if init is not None:
            init(lin.weight)
            nn.init.zeros_(lin.bias)
        if bias is not None:
            bias(lin.bias)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(act())
    model = nn.Sequential(*layers)
    hidden = [str(2 * i) for i in range(len(sizes) - 2)]
    return model, hidden


def normal(std_times_sqrt_fan_in):
    """N(0, (c / sqrt(fan_in))^2): the weight gain std(W) * sqrt(fan_in) is c."""

    def init(w):
        nn.init.normal_(w, 0.0, std_times_sqrt_fan_in / math.sqrt(w[0].numel()))

    return init


def he(w):
    nn.init.kaiming_normal_(w, nonlinearity="relu")


def lecun(w):
    nn.init.normal_(w, 0.0, 1 / math.sqrt(w[0].numel()))


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        with torch.no_grad():
            self.fc2.weight.mul_(0.3)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResNet(nn.Module):
    def __init__(self, d_in, width, blocks, classes):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.Sequential(*[Residual(width) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


class SeqNet(nn.Module):
    """A recurrent layer read at its last time step by a linear head."""

    def __init__(self, cell, d_in=2, hidden=32, out=1, **kw):
        super().__init__()
        self.rnn = cell(d_in, hidden, batch_first=True, **kw)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


class TinyTransformer(nn.Module):
    def __init__(self, vocab=20, d=32, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class BagOfEmbeddings(nn.Module):
    def __init__(self, vocab=20, d=32, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, 32)
        self.act = nn.ReLU()
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.act(self.fc(self.emb(x).mean(1))))


def cnn(channels, act, init=None, bn=False, classes=10):
    """3x3 convolutions on 8x8 images, then a linear head. Conv names: "c0", "c1", ..."""
    mods = {}
    c_in = 1
    for i, c in enumerate(channels):
        conv = nn.Conv2d(c_in, c, 3, padding=1)
        if init is not None:
            init(conv.weight)
            nn.init.zeros_(conv.bias)
        mods[f"c{i}"] = conv
        if bn:
            mods[f"bn{i}"] = nn.BatchNorm2d(c)
        mods[f"a{i}"] = act()
        c_in = c
    mods["pool"] = nn.AdaptiveAvgPool2d(2)
    mods["flat"] = nn.Flatten()
    mods["head"] = nn.Linear(c_in * 4, classes)
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(mods)), [f"c{i}" for i in range(len(channels))]


def bce_onehot(out, target):
    return F.binary_cross_entropy(out, F.one_hot(target, 10).float())


# ---------------------------------------------------------------------------------- labels
def _batch(job):
    return job.batches[0]


def check_all(*checks):
    def confirm(job, losses):
        for c in checks:
            c(job, losses)

    return confirm


def vanishing_depth(max_ratio=0.1):
    """The speed of learning (bias gradient) of the first hidden layer is at most ``max_ratio``
    of the last hidden layer's, computed with torch.autograd.grad."""

    def confirm(job, _losses):
        x, y = _batch(job)
        g = oracle.bias_grad_norms(job.model, job.hidden, x, y, job.loss_fn)
        assert g[0] <= max_ratio * g[-1], f"not vanishing: bias gradients {g}"

    return confirm


def exploding_depth(min_ratio=10.0, min_act_growth=100.0):
    """The first hidden layer's error signal is >= 10x the last one's, or the ReLU activations'
    spread grows >= 100x from the first to the last hidden layer."""

    def confirm(job, _losses):
        x, y = _batch(job)
        g = oracle.output_grad_norms(job.model, job.hidden, x, y, job.loss_fn)
        s = oracle.activation_stds(job.model, x)
        grows = g[0] >= min_ratio * g[-1] or s[-1] >= min_act_growth * s[0]
        assert grows, f"not exploding: error signal {g}, activation std {s}"

    return confirm


def through_time(vanishing: bool, bound: float = 1e3):
    """dLoss/dx at t=0 over that at t=T-1 is below 1/bound (vanishing) or above bound."""

    def confirm(job, _losses):
        x, y = _batch(job)
        r = oracle.time_grad_ratio(job.model, x, y, job.loss_fn)
        ok = r <= 1 / bound if vanishing else r >= bound
        assert ok, f"gradient ratio t=0 / t=T-1 is {r:.3g}"

    return confirm


def saturated(min_fraction=0.5):
    def confirm(job, _losses):
        fr = oracle.saturated_fractions(job.model, _batch(job)[0])
        assert max(fr.values()) >= min_fraction, f"not saturated: {fr}"

    return confirm


def dead(min_fraction=0.5):
    def confirm(job, _losses):
        fr = oracle.dead_fractions(job.model, _batch(job)[0])
        assert max(fr.values()) >= min_fraction, f"no dead layer: {fr}"

    return confirm


def stalled(max_relative=1e-3):
    """Some weight's one-step |dW|/|W| is <= 1e-3 of the fastest one's (measured on a copy)."""

    def confirm(job, _losses):
        x, y = _batch(job)
        r = oracle.update_ratios(job.model, job.optimizer, x, y, job.loss_fn)
        vals = [v for v in r.values() if math.isfinite(v)]
        assert min(vals) <= max_relative * max(vals), f"no stalled layer: {r}"

    return confirm


def non_finite(job, losses):
    if losses is not None:
        assert not oracle.finite(losses), "every loss stayed finite"


def healthy(depth=False, rnn=False):
    """Loss decreased; no dead or saturated layer (>= 50%); the gradient through depth (and
    time) stays within 10x (1000x through time) from first to last."""

    def confirm(job, losses):
        x, y = _batch(job)
        if losses is not None:
            assert oracle.decreased(losses), f"loss did not decrease: {losses[:3]}..{losses[-3:]}"
        dead_fr = oracle.dead_fractions(job.model, x)
        assert all(v < 0.5 for v in dead_fr.values()), dead_fr
        sat = oracle.saturated_fractions(job.model, x)
        assert all(v < 0.5 for v in sat.values()), sat
        if depth:
            g = oracle.bias_grad_norms(job.model, job.hidden, x, y, job.loss_fn)
            assert 0.1 * g[-1] <= g[0] <= 10 * g[-1], f"gradient through depth {g}"
        if rnn:
            # a plain RNN must carry the gradient through time; a gated cell's decay is set by
            # gates it learns (docs/diagnosis.md), so for LSTM/GRU only growth is excluded
            r = oracle.time_grad_ratio(job.model, x, y, job.loss_fn)
            gated = any(isinstance(m, (nn.LSTM, nn.GRU)) for m in job.model.modules())
            assert (gated or r >= 1e-3) and r <= 1e3, f"gradient through time t0/tT {r:.3g}"

    return confirm


# ---------------------------------------------------------------------------------- cases
CASES: list[Case] = []
V, E, S, D, ST, N = (
    "vanishing_gradient",
    "exploding_gradient",
    "saturated_activations",
    "dead_units",
    "stalled_layers",
    "non_finite",
)


def case(name, family, required=(), allowed=(), steps=30, at_init=True, check=None):
    """Register a builder (a function of nothing returning a Job) as a case, seeded."""

    def register(build):
        def seeded():
            torch.manual_seed(0)
            return build()

        CASES.append(
            Case(
                name=name,
                family=family,
                build=seeded,
                required=tuple(required),
                allowed=tuple(allowed),
                steps=steps,
                at_init=at_init,
                confirm=check,
            )
        )
        return build

    return register


def _sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr)


def _adam(model, lr=1e-3):
    return torch.optim.Adam(model.parameters(), lr=lr)


# -- vanishing -----------------------------------------------------------------------------
@case("sigmoid_deep_normal", "mlp", [V], [S, ST], check=vanishing_depth())
def _():
    model, hidden = mlp([16] + [32] * 10 + [4], nn.Sigmoid, init=lambda w: nn.init.normal_(w))
    return Job(model, _sgd(model, 0.1), blobs(), F.cross_entropy, hidden)


@case("sigmoid_deep_xavier", "mlp", [V], [ST], check=vanishing_depth())
def _():
    model, hidden = mlp([16] + [32] * 10 + [4], nn.Sigmoid, init=nn.init.xavier_normal_)
    return Job(model, _sgd(model, 0.1), blobs(), F.cross_entropy, hidden)


@case(
    "sigmoid_deep_default_stalls",
    "mlp",
    [V, ST],
    [S],
    steps=40,
    at_init=False,
    check=check_all(vanishing_depth(1e-3), stalled()),
)
def _():
    model, hidden = mlp([16] + [32] * 12 + [4], nn.Sigmoid)  # PyTorch's default init
    return Job(model, _sgd(model, 0.05), blobs(), F.cross_entropy, hidden)


@case("tanh_deep_tiny_init", "mlp", [V], [ST], check=vanishing_depth())
def _():
    model, hidden = mlp([16] + [32] * 8 + [4], nn.Tanh, init=normal(0.25))
    return Job(model, _sgd(model, 0.1), blobs(), F.cross_entropy, hidden)


@case("nielsen_4x30_sigmoid", "mlp", [V], [ST], check=vanishing_depth())
def _():
    # Nielsen, Neural Networks and Deep Learning ch. 5 ([784, 30, 30, 30, 30, 10] on MNIST):
    # weights N(0, 1/n_in), biases N(0, 1); here on 8x8 digits
    model, hidden = mlp(
        [64, 30, 30, 30, 30, 10], nn.Sigmoid, init=normal(1.0), bias=nn.init.normal_
    )
    model.append(nn.Sigmoid())
    return Job(model, _sgd(model, 1.0), digits(), bce_onehot, hidden)


@case("sigmoid_deep_cnn", "cnn", [V], [ST, S], check=vanishing_depth())
def _():
    model, hidden = cnn([8] * 7, nn.Sigmoid, init=nn.init.xavier_normal_)
    return Job(
        model, _sgd(model, 0.1), digits(n=256, batch=64, images=True), F.cross_entropy, hidden
    )


@case("tanh_rnn_adding_long", "rnn", [V], [ST], check=through_time(True))
def _():
    model = SeqNet(nn.RNN, hidden=32)
    return Job(model, _sgd(model, 0.01), sequences(T=60), F.mse_loss, [])


@case("sigmoid_deep_wide_xavier_adam", "mlp", [V], [ST], check=vanishing_depth())
def _():
    model, hidden = mlp([16] + [64] * 8 + [4], nn.Sigmoid, init=nn.init.xavier_uniform_)
    return Job(model, _adam(model, 1e-3), blobs(), F.cross_entropy, hidden)


# -- exploding -----------------------------------------------------------------------------
@case("relu_overgain_mlp", "mlp", [E], [N, D, ST], check=exploding_depth())
def _():
    model, hidden = mlp([16] + [32] * 10 + [4], nn.ReLU, init=normal(3.0))
    return Job(model, _sgd(model, 1e-4), blobs(), F.cross_entropy, hidden)


@case("relu_overgain_cnn", "cnn", [E], [N, D, ST], check=exploding_depth())
def _():
    model, hidden = cnn([8] * 7, nn.ReLU, init=normal(3.0))
    return Job(
        model, _sgd(model, 1e-5), digits(n=256, batch=64, images=True), F.cross_entropy, hidden
    )


@case("relu_rnn_recurrent_gain", "rnn", [E], [N, ST], check=through_time(False))
def _():
    model = SeqNet(nn.RNN, hidden=16, nonlinearity="relu")
    with torch.no_grad():  # identity x 1.3: every unit stays active, gradient x1.3 per step
        model.rnn.weight_hh_l0.copy_(1.3 * torch.eye(16))
        model.rnn.bias_hh_l0.zero_()
        model.rnn.bias_ih_l0.fill_(0.01)
        model.rnn.weight_ih_l0.abs_().mul_(0.01)
        model.head.weight.mul_(0.01)
    return Job(model, _sgd(model, 1e-7), sequences(T=30, target="recent"), F.mse_loss, [])


@case("relu_rnn_orthogonal_gain_2", "rnn", [E], [N, ST], check=through_time(False, 10.0))
def _():
    model = SeqNet(nn.RNN, hidden=32, nonlinearity="relu")
    with torch.no_grad():  # orthogonal x 2: about half the units active, ~1.4x per step
        nn.init.orthogonal_(model.rnn.weight_hh_l0)
        model.rnn.weight_hh_l0.mul_(2.0)
        model.head.weight.mul_(0.01)
    return Job(model, _sgd(model, 1e-9), sequences(T=30, target="recent"), F.mse_loss, [])


# -- saturated -----------------------------------------------------------------------------
@case("tanh_large_weights", "mlp", [S], [V, ST], check=saturated())
def _():
    model, hidden = mlp([16, 64, 64, 64, 4], nn.Tanh, init=normal(8.0))
    return Job(model, _sgd(model, 0.01), blobs(), F.cross_entropy, hidden)


@case("sigmoid_unscaled_inputs", "mlp", [S], [V, ST], check=saturated())
def _():
    # raw 0-255 pixel values into a Xavier-initialised sigmoid net: the input scale saturates
    model, hidden = mlp([64, 32, 32, 10], nn.Sigmoid, init=nn.init.xavier_normal_)
    return Job(model, _sgd(model, 0.1), digits(scale=255.0), F.cross_entropy, hidden)


# -- dead ----------------------------------------------------------------------------------
def _neg_bias(model, name, value=-10.0):
    with torch.no_grad():
        dict(model.named_modules())[name].bias.fill_(value)


@case("dead_relu_mlp_negative_bias", "mlp", [D], [ST], check=dead())
def _():
    model, hidden = mlp([16, 32, 32, 32, 32, 4], nn.ReLU, init=he)
    _neg_bias(model, "4")
    return Job(model, _sgd(model, 0.05), blobs(), F.cross_entropy, hidden)


@case("dead_relu_cnn_negative_bias", "cnn", [D], [ST], check=dead())
def _():
    model, hidden = cnn([8, 8, 8], nn.ReLU, init=he)
    _neg_bias(model, "c1", -20.0)
    return Job(
        model, _sgd(model, 0.05), digits(n=256, batch=64, images=True), F.cross_entropy, hidden
    )


@case("dead_relu_mlp_first_layer", "mlp", [D], [ST], check=dead())
def _():
    model, hidden = mlp([16, 64, 64, 4], nn.ReLU, init=he)
    with torch.no_grad():  # 3/4 of the first layer's units start (and stay) off
        model[0].bias[:48].fill_(-8.0)
    return Job(model, _sgd(model, 0.05), blobs(), F.cross_entropy, hidden)


@case("dead_relu_mlp_partial", "mlp", [D], [ST], check=dead())
def _():
    # 60% of the last hidden layer's units off for every input; the rest of the net learns
    model, hidden = mlp([16, 64, 64, 64, 4], nn.ReLU, init=he)
    with torch.no_grad():
        model[4].bias[:38].fill_(-10.0)
    return Job(model, _sgd(model, 0.05), blobs(), F.cross_entropy, hidden)


# -- stalled -------------------------------------------------------------------------------
@case("stalled_param_group_lr", "mlp", [ST], steps=30, at_init=False, check=stalled())
def _():
    # a tiny learning rate on the first two layers (a misconfigured parameter group)
    model, hidden = mlp([16, 32, 32, 32, 32, 4], nn.ReLU, init=he)
    slow = [p for i in (0, 2) for p in model[i].parameters()]
    rest = [p for i in (4, 6, 8) for p in model[i].parameters()]
    opt = torch.optim.SGD([{"params": slow, "lr": 1e-8}, {"params": rest, "lr": 0.05}])
    return Job(model, opt, blobs(), F.cross_entropy, hidden)


# -- non-finite ----------------------------------------------------------------------------
@case("nonfinite_absurd_lr_mlp", "mlp", [N], [E, D, ST], at_init=False, check=non_finite)
def _():
    model, hidden = mlp([16, 32, 32, 32, 4], nn.ReLU, init=he)
    return Job(model, _sgd(model, 1e6), blobs(), F.cross_entropy, hidden)


@case("nonfinite_absurd_lr_cnn", "cnn", [N], [E, D, ST], at_init=False, check=non_finite)
def _():
    model, hidden = cnn([8, 8, 8], nn.ReLU, init=he)
    return Job(
        model, _sgd(model, 1e8), digits(n=256, batch=64, images=True), F.cross_entropy, hidden
    )


# -- healthy controls ----------------------------------------------------------------------
@case("healthy_he_relu_mlp", "mlp", check=healthy(True))
def _():
    model, hidden = mlp([16] + [32] * 8 + [4], nn.ReLU, init=he)
    return Job(model, _sgd(model, 0.02), blobs(), F.cross_entropy, hidden)


@case("healthy_he_relu_deep_digits", "mlp", check=healthy(True))
def _():
    # 12 He-initialised ReLU layers: the hidden layers keep the gradient's scale
    model, hidden = mlp([64] + [64] * 12 + [10], nn.ReLU, init=he)
    return Job(model, _sgd(model, 0.01), digits(), F.cross_entropy, hidden)


@case("healthy_relu_mixed_widths", "mlp", check=healthy(True))
def _():
    # widths 128 -> 16: per-unit gradients compare, raw norms would differ by sqrt(8)
    model, hidden = mlp([16, 128, 96, 64, 32, 16, 4], nn.ReLU, init=he)
    return Job(model, _sgd(model, 0.02), blobs(), F.cross_entropy, hidden)


@case("healthy_relu6_cnn", "cnn", check=healthy())
def _():
    # ReLU6 (MobileNet's activation): half of its inputs are on the off side, which is not a tail
    model, hidden = cnn([8, 16, 16], nn.ReLU6, init=he, bn=True)
    return Job(
        model, _sgd(model, 0.05), digits(n=256, batch=64, images=True), F.cross_entropy, hidden
    )


@case("healthy_shallow_sigmoid", "mlp", check=healthy(True))
def _():
    model, hidden = mlp([64, 30, 30, 10], nn.Sigmoid, init=nn.init.xavier_normal_)
    return Job(model, _sgd(model, 1.0), digits(), F.cross_entropy, hidden)


@case("healthy_xavier_tanh_mlp", "mlp", check=healthy(True))
def _():
    model, hidden = mlp([16] + [32] * 6 + [4], nn.Tanh, init=nn.init.xavier_normal_)
    return Job(model, _sgd(model, 0.05), blobs(), F.cross_entropy, hidden)


@case("healthy_selu_lecun_mlp", "mlp", check=healthy(True))
def _():
    model, hidden = mlp([16] + [32] * 8 + [4], nn.SELU, init=lecun)
    return Job(model, _sgd(model, 0.02), blobs(), F.cross_entropy, hidden)


@case("healthy_leaky_relu_adam", "mlp", check=healthy(True))
def _():
    model, hidden = mlp([16] + [32] * 6 + [4], nn.LeakyReLU, init=he)
    return Job(model, _adam(model), blobs(), F.cross_entropy, hidden)


@case("healthy_gelu_layernorm_mlp", "mlp", check=healthy(True))
def _():
    layers, d = [], 16
    for _ in range(6):
        layers += [nn.Linear(d, 32), nn.LayerNorm(32), nn.GELU()]
        d = 32
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    return Job(model, _adam(model), blobs(), F.cross_entropy, ["0", "3", "6", "9", "12", "15"])


@case("healthy_cnn_relu_he", "cnn", check=healthy(True))
def _():
    # its first layer moves ~15x slower (update / weight) than the classifier head: the head is
    # not a hidden layer, and that is not a vanishing gradient
    model, hidden = cnn([8, 16, 16], nn.ReLU, init=he)
    return Job(
        model, _sgd(model, 0.05), digits(n=256, batch=64, images=True), F.cross_entropy, hidden
    )


@case("healthy_cnn_relu_pooling", "cnn", check=healthy(True))
def _():
    # 8x8 -> 4x4 -> 2x2: fewer positions per layer, so the raw error norms shrink toward the
    # head although the gradient per entry keeps its scale
    from collections import OrderedDict

    convs = OrderedDict()
    c_in = 1
    for i, c in enumerate([16, 16, 16]):
        convs[f"c{i}"] = nn.Conv2d(c_in, c, 3, padding=1)
        he(convs[f"c{i}"].weight)
        convs[f"a{i}"] = nn.ReLU()
        if i < 2:
            convs[f"p{i}"] = nn.MaxPool2d(2)
        c_in = c
    convs["flat"] = nn.Flatten()
    convs["head"] = nn.Linear(16 * 4, 10)
    model = nn.Sequential(convs)
    data = digits(n=256, batch=64, images=True)
    return Job(model, _sgd(model, 0.05), data, F.cross_entropy, ["c0", "c1", "c2"])


@case("healthy_cnn_relu_batchnorm", "cnn", check=healthy())
def _():
    model, hidden = cnn([8, 16, 16, 16], nn.ReLU, bn=True)
    return Job(
        model, _sgd(model, 0.05), digits(n=256, batch=64, images=True), F.cross_entropy, hidden
    )


@case("healthy_residual_mlp", "residual", check=healthy())
def _():
    model = ResNet(16, 32, 12, 4)
    return Job(model, _sgd(model, 0.02), blobs(), F.cross_entropy, [])


@case("healthy_lstm_recent_target", "rnn", check=healthy(rnn=True))
def _():
    model = SeqNet(nn.LSTM, hidden=32)
    return Job(model, _adam(model, 3e-3), sequences(T=20, target="recent"), F.mse_loss, [])


@case("healthy_gru_recent_target", "rnn", check=healthy(rnn=True))
def _():
    model = SeqNet(nn.GRU, hidden=32)
    return Job(model, _adam(model, 3e-3), sequences(T=10, target="recent"), F.mse_loss, [])


@case("healthy_gru_default_30_steps", "rnn", check=healthy(rnn=True))
def _():
    # default init: the gradient at t=0 is ~1e-7 of that at t=29, yet the gates learn
    # (docs/diagnosis.md: gated cells); a note, not a finding
    model = SeqNet(nn.GRU, hidden=32)
    return Job(model, _adam(model, 3e-3), sequences(T=30, target="recent"), F.mse_loss, [])


@case("healthy_lstm_forget_bias_adding", "rnn", check=healthy(rnn=True))
def _():
    model = SeqNet(nn.LSTM, hidden=32)
    with torch.no_grad():
        model.rnn.bias_hh_l0[32:64].fill_(3.0)  # forget gate
    return Job(model, _adam(model, 3e-3), sequences(T=40), F.mse_loss, [])


@case("healthy_tanh_rnn_short_orthogonal", "rnn", check=healthy(rnn=True))
def _():
    model = SeqNet(nn.RNN, hidden=32)
    nn.init.orthogonal_(model.rnn.weight_hh_l0)
    return Job(model, _adam(model, 3e-3), sequences(T=8, target="recent"), F.mse_loss, [])


@case("healthy_transformer", "transformer", check=healthy())
def _():
    model = TinyTransformer()
    return Job(model, _adam(model, 1e-3), tokens(), F.cross_entropy, [])


@case("healthy_embedding_bag", "embedding", check=healthy())
def _():
    model = BagOfEmbeddings()
    return Job(model, _adam(model, 3e-3), tokens(), F.cross_entropy, [])


# -- repeated blocks: transformers and residual streams ------------------------------------
# Depth is judged per role across repeated blocks (docs/diagnosis.md): block 0's query against
# block 3's query, never a chain from an attention projection to a pooler.
def stream(max_ratio=10.0, min_ratio=0.1):
    """The residual stream's gradient (w.r.t. each block's output) stays within [min, max] of
    the last block's, from the first block on (plain torch); and the label's healthy checks."""

    def confirm(job, losses):
        healthy()(job, losses)
        x, y = _batch(job)
        g = oracle.block_output_grad_norms(job.model, job.hidden, x, y, job.loss_fn)
        assert min_ratio * g[-1] <= g[0] <= max_ratio * g[-1], f"stream gradient {g}"

    return confirm


def exploding_stream(min_ratio=10.0):
    """The stream's gradient at the first block is >= 10x that at the last (plain torch)."""

    def confirm(job, _losses):
        x, y = _batch(job)
        g = oracle.block_output_grad_norms(job.model, job.hidden, x, y, job.loss_fn)
        assert g[0] >= min_ratio * g[-1], f"not exploding: stream gradient {g}"

    return confirm


class Encoder(nn.Module):
    """Token embedding + a positional table owned by the model itself (the root module ``''``
    has a parameter), ``nn.TransformerEncoder`` pre-LN or post-LN, a linear head."""

    def __init__(self, blocks, norm_first, vocab=20, d=32, T=12, classes=2):
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(T, d))
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(
            d, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.enc = nn.TransformerEncoder(
            layer, blocks, enable_nested_tensor=False, norm=nn.LayerNorm(d) if norm_first else None
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x) + self.pos[: x.shape[1]]).mean(1))


def _encoder_case(blocks, norm_first):
    name = f"healthy_{'pre' if norm_first else 'post'}_ln_encoder_{blocks}"

    # normalised blocks: the stream's gradient grows toward the input boundedly (trained pre-LN
    # 6 blocks: 12x) and is not an explosion below 100x (docs/diagnosis.md)
    @case(name, "transformer", check=stream(max_ratio=100.0))
    def _():
        model = Encoder(blocks, norm_first)
        hidden = [f"enc.layers.{i}" for i in range(blocks)]
        return Job(
            model, torch.optim.AdamW(model.parameters(), lr=1e-3), tokens(), F.cross_entropy, hidden
        )


for _blocks in (3, 6, 10):
    _encoder_case(_blocks, True)
    _encoder_case(_blocks, False)


class Block(nn.Module):
    """``x + fc2(relu(fc1(x)))``, no normalization; ``zero`` sets fc2 to 0 (Fixup/ReZero-style:
    every block starts as the identity)."""

    def __init__(self, width, zero=False):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        he(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)
        if zero:
            nn.init.zeros_(self.fc2.weight)
        else:
            he(self.fc2.weight)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class PlainResNet(nn.Module):
    def __init__(self, blocks, width=32, zero=False, d_in=16, classes=4):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.Sequential(*[Block(width, zero) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


@case("residual_mlp_unnormalised_explodes", "residual", [E], [N, ST, D], check=exploding_stream())
def _():
    # He-initialised branches with no normalization: each block adds a branch as large as the
    # stream (x1.7 in spread per block), and the gradient compounds with it going back
    model = PlainResNet(10)
    hidden = [f"blocks.{i}" for i in range(10)]
    return Job(model, _sgd(model, 1e-6), blobs(), F.cross_entropy, hidden)


@case("healthy_residual_mlp_fixup", "residual", check=stream())
def _():
    # each branch's last layer starts at zero (Fixup/ReZero): every block is the identity at
    # init and the stream's gradient is flat; Adam moves fc1 as soon as fc2 lets gradient through
    model = PlainResNet(10, zero=True)
    hidden = [f"blocks.{i}" for i in range(10)]
    return Job(model, _adam(model, 1e-3), blobs(), F.cross_entropy, hidden)


@case("sigmoid_blocks_vanish", "mlp", [V], [ST], check=vanishing_depth())
def _():
    # a deep sigmoid net built from repeated blocks (Sequential of Linear+Sigmoid): per role
    # across blocks, the gradient still shrinks ~4x per block
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(16 if i == 0 else 32, 32), nn.Sigmoid()) for i in range(10)],
        nn.Linear(32, 4),
    )
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
    return Job(model, _sgd(model, 0.1), blobs(), F.cross_entropy, [f"{i}.0" for i in range(10)])


class HFLogits(nn.Module):
    """A Hugging Face model called on token ids, returning its logits."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(input_ids=x).logits


def lm_loss(logits, x):
    """Next-token cross-entropy (the target is the input shifted by one)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


class TinyGPT(nn.Module):
    """Pure-torch stand-in for GPT-2 when transformers is not installed: pre-LN decoder blocks,
    an lm_head tied to the token embedding."""

    def __init__(self, vocab=20, d=32, blocks=4, T=12):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(T, d)
        layer = nn.TransformerEncoderLayer(
            d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.h = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, x):
        T = x.shape[1]
        h = self.wte(x) + self.wpe(torch.arange(T))
        return self.lm_head(self.ln_f(self.h(h, mask=self.mask[:T, :T], is_causal=True)))


def _has_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@case("healthy_gpt2_tied_embeddings", "transformer", check=healthy())
def _():
    if _has_transformers():
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=20,
            n_positions=16,
            n_embd=32,
            n_layer=4,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = HFLogits(GPT2LMHeadModel(cfg))
    else:
        model = TinyGPT()
    data = [(x, x) for x, _ in tokens()]
    return Job(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data, lm_loss, [])


class TinyBert(nn.Module):
    """Pure-torch stand-in for BERT: post-LN encoder, a tanh pooler on the first token."""

    def __init__(self, vocab=20, d=32, blocks=4, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(
            d, 4, 64, dropout=0.0, batch_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.pooler = nn.Linear(d, d)
        self.pool_act = nn.Tanh()
        self.classifier = nn.Linear(d, classes)

    def forward(self, x):
        h = self.encoder(self.emb(x))
        return self.classifier(self.pool_act(self.pooler(h[:, 0])))


@case("healthy_bert_pooler", "transformer", check=healthy())
def _():
    # the model: default-initialised BERT, 4 small layers, a pooler on [CLS]; at init
    # the attention queries get ~1e-4 of the pooler's gradient (attention starts uniform), the
    # same in every block: per role the gradient is flat through depth
    if _has_transformers():
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(
            vocab_size=20,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = HFLogits(BertForSequenceClassification(cfg))
    else:
        model = TinyBert()
    return Job(model, torch.optim.AdamW(model.parameters(), lr=1e-3), tokens(), F.cross_entropy, [])


@case("relu_rnn_weights_overflow", "rnn", [N], [E, ST, V], at_init=False, check=non_finite)
def _():
    # the crash: an over-unity identity recurrence trained with a large step until the
    # weights overflow (diagnosing it once raised from an SVD of the non-finite weight)
    model = SeqNet(nn.RNN, hidden=16, nonlinearity="relu")
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(1.5 * torch.eye(16))
    return Job(model, _sgd(model, 10.0), sequences(T=30, target="recent"), F.mse_loss, [])


# -- mean-field tanh nets: ordered / critical / chaotic ---------------------------------------
# Weights N(0, sigma_w2 / fan_in), biases N(0, sigma_b2 = 0.05): mean-field theory
# (src/vanishing/theory.py; Schoenholz et al. 2017) gives the squared gradient a factor chi1 per
# layer back through depth, < 1 in the ordered phase (vanishing), 1 at sigma_w2 ~ 1.76 (critical:
# the gradient keeps its scale), > 1 in the chaotic phase (exploding; the norm grows sqrt(chi1)
# per layer, so it takes ~16 layers at sigma_w2 = 6 to pass 10x). Each label is confirmed twice
# in plain torch/numpy: chi1 by quadrature (oracle.tanh_mean_field), and the measured gradient.
MF_SIGMA_B2 = 0.05


def meanfield(phase, sigma_w2):
    """chi1 (numpy quadrature) is in the phase; the measured gradient through depth agrees:
    bias gradients first/last <= 0.1 (ordered), the error signal first/last >= 10 (chaotic),
    within 10x and the healthy checks (critical)."""

    def confirm(job, losses):
        _q, chi1 = oracle.tanh_mean_field(sigma_w2, MF_SIGMA_B2)
        x, y = _batch(job)
        if phase == "ordered":
            assert chi1 < 0.9, chi1
            vanishing_depth()(job, losses)
        elif phase == "chaotic":
            assert chi1 > 1.1, chi1
            e = oracle.output_grad_norms(job.model, job.hidden, x, y, job.loss_fn)
            assert e[0] >= 10 * e[-1], f"not exploding: error signal {e}"
        else:
            assert abs(chi1 - 1) < 1e-3, chi1
            healthy(True)(job, losses)

    return confirm


def _meanfield_case(phase, sigma_w2, depth, label, allowed=(), lr=0.05):
    @case(
        f"meanfield_tanh_{phase}_{depth}",
        "meanfield",
        label,
        allowed,
        check=meanfield(phase, sigma_w2),
    )
    def _():
        def weights(w):
            nn.init.normal_(w, 0.0, math.sqrt(sigma_w2 / w.shape[1]))

        def biases(b):
            nn.init.normal_(b, 0.0, math.sqrt(MF_SIGMA_B2))

        model, hidden = mlp([16] + [64] * depth + [4], nn.Tanh, init=weights, bias=biases)
        return Job(model, _sgd(model, lr), blobs(), F.cross_entropy, hidden)


#: sigma_w2 where chi1 = 1 for tanh at sigma_b2 = 0.05 (theory.critical_sigma_w2; the confirm
#: recomputes chi1 there by quadrature)
MF_CRITICAL = 1.7609546396067348
_meanfield_case("ordered", 0.5, 10, [V], [ST])
_meanfield_case("ordered", 0.7, 16, [V], [ST])
_meanfield_case("critical", MF_CRITICAL, 10, [])
_meanfield_case("critical", MF_CRITICAL, 16, [])
# small steps: at 0.05 thirty steps of SGD take the chaotic nets out of their phase
_meanfield_case("chaotic", 6.0, 16, [E], [S, ST], lr=1e-3)
_meanfield_case("chaotic", 8.0, 20, [E], [S, ST], lr=1e-3)


# -- a 2-layer LSTM on the adding problem, unsolved and solved -------------------------------
def adding_outcome(solved: bool, vanishing_bound: float = 1e-3):
    """The trained model against the adding problem's trivial baseline, the MSE of predicting
    the targets' mean (their variance): unsolved, the last five losses stay within 20% of it and
    the gradient at t=0 is below 1e-3 of that at t=T-1 (plain torch); solved, the last five
    losses are below half of it. Before training (losses None) the solved case is healthy."""

    def confirm(job, losses):
        ys = torch.cat([y for _, y in job.batches])
        baseline = float(ys.var(unbiased=False))
        if losses is None:
            if not solved:
                raise AssertionError("the unsolved label is about the trained outcome")
            healthy(rnn=True)(job, losses)
            return
        last = sum(losses[-5:]) / 5
        if solved:
            assert last < 0.5 * baseline, f"not solved: loss {last:.3f}, baseline {baseline:.3f}"
            healthy(rnn=True)(job, losses)
        else:
            assert abs(last - baseline) <= 0.2 * baseline, f"loss {last:.3f} vs {baseline:.3f}"
            through_time(True, 1 / vanishing_bound)(job, losses)

    return confirm


def _lstm2(forget_bias=None, hidden=16):
    model = SeqNet(nn.LSTM, hidden=hidden, num_layers=2)
    if forget_bias is not None:
        with torch.no_grad():
            for layer in range(2):
                getattr(model.rnn, f"bias_hh_l{layer}")[hidden : 2 * hidden].fill_(forget_bias)
    return model


@case(
    "lstm2_adding_unsolved",
    "rnn",
    [V],
    [ST],
    steps=80,
    at_init=False,
    check=adding_outcome(False),
)
def _():
    # default init (forget gates ~0.5): the gradient from the first marker is ~1e-5 of the
    # last step's after 30 steps back, and the loss falls to the mean-prediction baseline and
    # stays there (docs/diagnosis.md: outcome and gradient together)
    model = _lstm2()
    return Job(model, _adam(model, 1e-2), sequences(n=128, T=30), F.mse_loss, [])


@case("healthy_lstm2_adding_solved", "rnn", steps=150, check=adding_outcome(True))
def _():
    # forget-gate bias 3 in both layers, a shorter delay: the loss falls far below the baseline
    model = _lstm2(forget_bias=3.0)
    return Job(model, _adam(model, 1e-2), sequences(n=128, T=10), F.mse_loss, [])


BY_NAME = {c.name: c for c in CASES}
