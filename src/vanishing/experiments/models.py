"""Model builders with the switches that cause or cure vanishing gradients.

:func:`build_model` builds one of four kinds from a task's input shape. How each kind reads an
example of shape ``input_shape`` (the batch dimension comes first everywhere):

| input_shape | mlp | cnn | rnn / transformer (time steps x features) |
| --- | --- | --- | --- |
| ``(F,)`` flat (teacher) | as is | Conv1d over ``(1, F)`` | ``F`` steps of 1 |
| ``(C, L)`` signal (mnist1d ``(1, 40)``) | flattened | Conv1d | ``L`` steps of ``C`` |
| ``(C, H, W)`` image (digits ``(1, 8, 8)``, mnist ``(1, 28, 28)``) | flattened | Conv2d | ``H`` rows of ``C*W`` |
| ``(T, F)`` sequence (adding, copy) | flattened | Conv1d over ``(F, T)`` | ``T`` steps of ``F`` |

So the rnn reads digits as 8 steps of 8 pixels, mnist1d as 40 steps of 1 value and mnist as 28
rows of 28 pixels. Every kind ends in a ``head`` Linear: on the last hidden state (rnn), the
mean over positions (cnn, transformer), or on every step when the task is ``per_step``.

Layer names, in forward order (what the monitor reports):

* mlp: ``hidden.{i}.linear``, ``hidden.{i}.norm``, ``hidden.{i}.act``, ``head``. Hidden layer
  ``i`` is Linear -> norm -> activation; with ``residual=True`` every hidden layer after the
  first (the projection from the input to ``width``) returns ``x + act(norm(linear(x)))``, so
  the identity path bypasses the activation's derivative.
* cnn: ``stem.conv/norm/act`` (input channels -> ``width``), then ``depth`` blocks
  ``blocks.{i}.conv1, norm1, act1, conv2, norm2, act2``: conv-norm-act-conv-norm, plus the input
  when ``residual`` (He et al. 2016), then act. Plain and residual nets have the same layers.
  ``norm="layer"`` is GroupNorm with one group (LayerNorm over channels and positions).
* rnn: ``recurrent.{i}`` (one single-layer ``nn.RNN``/``nn.LSTM``/``nn.GRU`` per stacked
  layer, so each gets its own temporal profile), ``head``.
* transformer: ``embed`` (Linear per time step), ``pos`` (learned positional embedding),
  ``encoder.layers.{i}`` (``nn.TransformerEncoderLayer``, no dropout, feed-forward 4 x width,
  the chosen activation module), ``encoder.norm`` (final LayerNorm when pre-LN), ``head``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from vanishing import activations as _registry
from vanishing.experiments.config import RNN_CELL_ACTIVATIONS

#: activation name -> module class: the registry's entries that name a class to build
ACTIVATIONS = {kind: _registry.get(kind).module_class() for kind in _registry.buildable_kinds()}
INITS = (
    "default",
    "normal",
    "glorot_standard",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "lecun_normal",
    "orthogonal",
    "identity",
)
KINDS = ("mlp", "cnn", "rnn", "transformer")
CELLS = ("rnn", "lstm", "gru")
NORMS = ("none", "batch", "layer")
BIAS_INITS = ("zeros", "default", "constant", "normal")
RECURRENT_INITS = ("default", "orthogonal", "identity")

# gates stacked in an LSTM/GRU weight (PyTorch order: LSTM i, f, g, o; GRU r, z, n)
_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def check_choice(field: str, value: Any, allowed) -> None:
    """Raise a one-line ``ValueError`` unless ``value`` is one of ``allowed``.

    Example:
        >>> from vanishing.experiments.models import check_choice, NORMS
        >>> check_choice("norm", "group", NORMS)
        Traceback (most recent call last):
        ...
        ValueError: unknown norm 'group'; expected one of: none, batch, layer
    """
    if value not in allowed:
        raise ValueError(f"unknown {field} {value!r}; expected one of: {', '.join(allowed)}")


def _fan_in(w: Tensor) -> int:
    return w.shape[1] * math.prod(w.shape[2:])


def init_weight_(
    w: Tensor, init: str, *, std: float = 1.0, activation: str = "relu", generator=None
) -> Tensor:
    """Initialise a weight matrix or convolution kernel in place; returns it.

    ``fan_in`` is ``w.shape[1] * kernel size``. ``normal``: N(0, std^2) (std 1 is the textbook
    example that vanishes); ``glorot_standard``: U[-1/sqrt(fan_in), 1/sqrt(fan_in)], the
    "standard" init of Glorot & Bengio (2010); ``xavier_*``: Glorot's normalised init (gain 1);
    ``he_*``: Kaiming init in fan-in mode with gain sqrt(2 / (1 + a^2)), a = 0.01 for leaky_relu
    and 0.25 for prelu, else 0; ``lecun_normal``: N(0, 1/fan_in); ``orthogonal``: a (semi-)
    orthogonal matrix; ``identity``: the identity on the leading square block (Dirac kernel for
    convolutions); ``default`` leaves the tensor as it is.

    Example:
        >>> import torch
        >>> from vanishing.experiments.models import init_weight_
        >>> w = init_weight_(torch.empty(3, 3), "identity")
        >>> w.tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        >>> w = init_weight_(torch.empty(400, 400), "lecun_normal")
        >>> round(w.std().item() * 20, 1)   # 1 / sqrt(400) * 20 = 1
        1.0
    """
    check_choice("init", init, INITS)
    g = generator
    with torch.no_grad():
        if init == "default":
            return w
        if init == "normal":
            nn.init.normal_(w, 0.0, std, generator=g)
        elif init == "glorot_standard":
            bound = 1 / math.sqrt(_fan_in(w))
            nn.init.uniform_(w, -bound, bound, generator=g)
        elif init == "xavier_uniform":
            nn.init.xavier_uniform_(w, generator=g)
        elif init == "xavier_normal":
            nn.init.xavier_normal_(w, generator=g)
        elif init in ("he_uniform", "he_normal"):
            # He init's a: the off side's slope (nn.LeakyReLU's 0.01, nn.PReLU's initial 0.25)
            slope = _registry.get(activation).negative_slope if activation in ACTIVATIONS else 0.0
            fn = nn.init.kaiming_uniform_ if init == "he_uniform" else nn.init.kaiming_normal_
            fn(w, a=slope, mode="fan_in", nonlinearity="leaky_relu", generator=g)
        elif init == "lecun_normal":
            nn.init.normal_(w, 0.0, 1 / math.sqrt(_fan_in(w)), generator=g)
        elif init == "orthogonal":
            nn.init.orthogonal_(w, generator=g)
        elif init == "identity":
            if w.dim() == 2:
                nn.init.eye_(w)
            else:
                nn.init.dirac_(w)
    return w


def init_bias_(b: Tensor, bias_init: str, *, value: float = 0.0, std: float = 1.0) -> Tensor:
    """Initialise a bias in place: ``zeros``, ``constant`` (``value``), ``normal``
    (N(``value``, ``std``^2)) or ``default`` (left as it is); returns it.

    Example:
        >>> import torch
        >>> from vanishing.experiments.models import init_bias_
        >>> init_bias_(torch.empty(2), "constant", value=0.5).tolist()
        [0.5, 0.5]
    """
    check_choice("bias_init", bias_init, BIAS_INITS)
    with torch.no_grad():
        if bias_init == "zeros":
            b.zero_()
        elif bias_init == "constant":
            b.fill_(value)
        elif bias_init == "normal":
            b.normal_(value, std)
    return b


def init_linear(
    layer: nn.Module,
    init: str,
    *,
    std: float = 1.0,
    activation: str = "relu",
    bias_init: str | None = None,
    bias_value: float = 0.0,
    bias_std: float = 1.0,
) -> None:
    """Initialise a Linear or Conv layer's weight (see :func:`init_weight_`) and bias in place.

    With ``bias_init=None`` the bias is zeroed unless ``init`` is ``"default"`` (which keeps all
    of PyTorch's init); otherwise the bias follows ``bias_init`` (see :func:`init_bias_`).

    Example:
        >>> from torch import nn
        >>> from vanishing.experiments.models import init_linear
        >>> layer = nn.Linear(256, 256); init_linear(layer, "he_normal")
        >>> round(layer.weight.std().item() * 16, 1)   # sqrt(2 / 256) * 16 = 1.41
        1.4
        >>> init_linear(layer, "default", bias_init="constant", bias_value=1.0)
        >>> layer.bias[:3].tolist()
        [1.0, 1.0, 1.0]
    """
    init_weight_(layer.weight, init, std=std, activation=activation)
    if layer.bias is None:
        return
    if bias_init is None:
        bias_init = "default" if init == "default" else "zeros"
    init_bias_(layer.bias, bias_init, value=bias_value, std=bias_std)


def _norm(norm: str, width: int, dims: int = 0) -> nn.Module | None:
    """The normalisation layer for ``width`` features (dims 0) or channels (dims 1, 2)."""
    check_choice("norm", norm, NORMS)
    if norm == "none":
        return None
    if norm == "layer":
        return nn.LayerNorm(width) if dims == 0 else nn.GroupNorm(1, width)
    return (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d)[dims](width)


def _activation(activation: str) -> nn.Module:
    check_choice("activation", activation, ACTIVATIONS)
    return ACTIVATIONS[activation]()


class Dense(nn.Module):
    """One hidden layer: Linear -> [norm] -> activation, or ``x +`` that with ``residual=True``.

    Example:
        >>> import torch
        >>> from vanishing.experiments.models import Dense
        >>> layer = Dense(4, 4, activation="sigmoid", residual=True)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(layer(x), x + torch.sigmoid(layer.linear(x)))
        True
    """

    def __init__(
        self, d_in: int, d_out: int, *, activation: str, norm: str = "none", residual=False
    ) -> None:
        super().__init__()
        if residual and d_in != d_out:
            raise ValueError(f"a residual layer needs equal widths, got {d_in} -> {d_out}")
        self.linear = nn.Linear(d_in, d_out)
        self.norm = _norm(norm, d_out)
        self.act = _activation(activation)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear(x)
        if self.norm is not None:
            h = self.norm(h)
        h = self.act(h)
        return x + h if self.residual else h


def mlp(
    d_in: int,
    d_out: int,
    *,
    depth: int = 10,
    width: int = 32,
    activation: str = "sigmoid",
    init: str = "default",
    std: float = 1.0,
    norm: str = "none",
    residual: bool = False,
    bias_init: str | None = None,
    bias_value: float = 0.0,
    bias_std: float = 1.0,
) -> nn.Sequential:
    """A multilayer perceptron of ``depth`` hidden layers: Linear [-> norm] -> activation.

    Without ``residual`` the layers are flat children of the ``nn.Sequential``. With it, hidden
    layer 1 is a plain :class:`Dense` (input -> width) and every later one a residual
    :class:`Dense` returning ``x + act(norm(linear(x)))``. Biases: see :func:`init_linear`.

    Example:
        >>> from vanishing.experiments.models import mlp
        >>> net = mlp(64, 10, depth=3, width=16, activation="relu", init="he_normal")
        >>> [type(m).__name__ for m in net][:3], len(net)
        (['Linear', 'ReLU', 'Linear'], 7)
        >>> [type(m).__name__ for m in mlp(64, 10, depth=3, residual=True)]
        ['Dense', 'Dense', 'Dense', 'Linear']
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("norm", norm, NORMS)
    _check_int("depth", depth, 0)
    _check_int("width", width, 1)
    layers: list[nn.Module] = []
    d = d_in
    for i in range(depth):
        if residual:
            layers.append(Dense(d, width, activation=activation, norm=norm, residual=i > 0))
        else:
            layers.append(nn.Linear(d, width))
            if norm != "none":
                layers.append(_norm(norm, width))
            layers.append(ACTIVATIONS[activation]())
        d = width
    layers.append(nn.Linear(d, d_out))
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            init_linear(
                m,
                init,
                std=std,
                activation=activation,
                bias_init=bias_init,
                bias_value=bias_value,
                bias_std=bias_std,
            )
    return net


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")


def _steps_and_features(input_shape: tuple[int, ...], sequence: bool) -> tuple[int, int]:
    """How a recurrent or attention model reads one example: (time steps, features per step)."""
    if sequence:
        return input_shape[0], input_shape[1]
    if len(input_shape) == 1:
        return input_shape[0], 1
    if len(input_shape) == 2:
        return input_shape[1], input_shape[0]
    if len(input_shape) == 3:
        return input_shape[1], input_shape[0] * input_shape[2]
    raise ValueError(f"cannot read inputs of shape {input_shape} as a sequence")


def _as_sequence(x: Tensor, input_shape: tuple[int, ...], sequence: bool) -> Tensor:
    """``(N, *input_shape)`` -> ``(N, T, F)`` as in :func:`_steps_and_features`."""
    if sequence:
        return x
    if len(input_shape) == 1:
        return x.unsqueeze(-1)
    if len(input_shape) == 2:
        return x.transpose(1, 2)
    return x.permute(0, 2, 1, 3).flatten(2)


class ConvBlock(nn.Module):
    """Two convolutions, conv-norm-act-conv-norm, plus the input if ``residual``, then act.

    Example:
        >>> import torch
        >>> from vanishing.experiments.models import ConvBlock
        >>> block = ConvBlock(4, dims=2, activation="relu", residual=True)
        >>> block(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """

    def __init__(
        self,
        channels: int,
        *,
        dims: int,
        activation: str,
        norm: str = "none",
        residual: bool = False,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv1 = conv(channels, channels, kernel_size, padding="same")
        self.norm1 = _norm(norm, channels, dims)
        self.act1 = _activation(activation)
        self.conv2 = conv(channels, channels, kernel_size, padding="same")
        self.norm2 = _norm(norm, channels, dims)
        self.act2 = _activation(activation)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        if self.norm1 is not None:
            h = self.norm1(h)
        h = self.conv2(self.act1(h))
        if self.norm2 is not None:
            h = self.norm2(h)
        if self.residual:
            h = h + x
        return self.act2(h)


class ConvNet(nn.Module):
    """A stem convolution, ``depth`` :class:`ConvBlock` s, global mean pooling (or per-step), head.

    Example:
        >>> import torch
        >>> from vanishing.experiments.models import ConvNet
        >>> net = ConvNet((1, 8, 8), 10, depth=2, width=4, activation="relu")
        >>> net(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        *,
        depth: int,
        width: int,
        activation: str,
        norm: str = "none",
        residual: bool = False,
        kernel_size: int = 3,
        sequence: bool = False,
        per_step: bool = False,
    ) -> None:
        super().__init__()
        self.input_shape, self.sequence, self.per_step = tuple(input_shape), sequence, per_step
        if sequence:
            in_ch, dims = input_shape[1], 1
        elif len(input_shape) == 1:
            in_ch, dims = 1, 1
        elif len(input_shape) in (2, 3):
            in_ch, dims = input_shape[0], len(input_shape) - 1
        else:
            raise ValueError(f"cnn cannot read inputs of shape {input_shape}")
        if per_step and dims != 1:
            raise ValueError("cnn: per-step outputs need a 1-D input (a sequence or signal)")
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        stem: list[tuple[str, nn.Module]] = [
            ("conv", conv(in_ch, width, kernel_size, padding="same"))
        ]
        norm_layer = _norm(norm, width, dims)
        if norm_layer is not None:
            stem.append(("norm", norm_layer))
        stem.append(("act", _activation(activation)))
        self.stem = nn.Sequential(OrderedDict(stem))
        self.blocks = nn.Sequential(
            *(
                ConvBlock(
                    width,
                    dims=dims,
                    activation=activation,
                    norm=norm,
                    residual=residual,
                    kernel_size=kernel_size,
                )
                for _ in range(depth)
            )
        )
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence:
            x = x.transpose(1, 2)
        elif len(self.input_shape) == 1:
            x = x.unsqueeze(1)
        h = self.blocks(self.stem(x))
        if self.per_step:
            return self.head(h.transpose(1, 2))
        return self.head(h.flatten(2).mean(2))


class RecurrentNet(nn.Module):
    """Stacked single-layer RNN/LSTM/GRU modules (batch first) and a linear head.

    Classifies from the last time step's hidden state of the top layer, or from every step's
    when ``per_step``.

    Example:
        >>> import torch
        >>> from vanishing.experiments.models import RecurrentNet
        >>> net = RecurrentNet((8, 8), 10, cell="lstm", depth=2, width=16)
        >>> net(torch.randn(3, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        *,
        cell: str = "rnn",
        depth: int = 1,
        width: int = 32,
        activation: str = "tanh",
        sequence: bool = True,
        per_step: bool = False,
    ) -> None:
        super().__init__()
        check_choice("cell", cell, CELLS)
        self.input_shape, self.sequence, self.per_step = tuple(input_shape), sequence, per_step
        _, features = _steps_and_features(self.input_shape, sequence)
        layers = []
        for i in range(depth):
            d_in = features if i == 0 else width
            if cell == "rnn":
                layers.append(nn.RNN(d_in, width, batch_first=True, nonlinearity=activation))
            else:
                layers.append(
                    (nn.LSTM if cell == "lstm" else nn.GRU)(d_in, width, batch_first=True)
                )
        self.recurrent = nn.ModuleList(layers)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = _as_sequence(x, self.input_shape, self.sequence)
        for layer in self.recurrent:
            h, _ = layer(h)
        return self.head(h if self.per_step else h[:, -1])


class PositionalEmbedding(nn.Module):
    """A learned embedding per position, added to the input ``(N, T, d)``; weight N(0, 0.02^2).

    Example:
        >>> import torch
        >>> from vanishing.experiments.models import PositionalEmbedding
        >>> pos = PositionalEmbedding(5, 3)
        >>> x = torch.zeros(2, 5, 3)
        >>> torch.equal(pos(x)[1], pos.weight)
        True
    """

    def __init__(self, steps: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(steps, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight[: x.shape[1]]


class TransformerNet(nn.Module):
    """Linear embedding per time step, learned positions, a TransformerEncoder, mean-pool, head.

    ``norm_first=True`` is pre-LN (with a final LayerNorm), ``False`` post-LN as in Vaswani et
    al. (2017). No dropout; no attention mask (every step sees the whole sequence).

    Example:
        >>> import torch
        >>> from vanishing.experiments.models import TransformerNet
        >>> net = TransformerNet((40, 1), 10, depth=2, width=16, heads=4)
        >>> net(torch.randn(3, 40, 1)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        *,
        depth: int = 2,
        width: int = 32,
        heads: int = 4,
        activation: str = "relu",
        norm_first: bool = True,
        sequence: bool = True,
        per_step: bool = False,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"transformer width {width} must be divisible by heads {heads}")
        self.input_shape, self.sequence, self.per_step = tuple(input_shape), sequence, per_step
        steps, features = _steps_and_features(self.input_shape, sequence)
        self.embed = nn.Linear(features, width)
        self.pos = PositionalEmbedding(steps, width)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=4 * width,
            dropout=0.0,
            activation=_activation(activation),
            batch_first=True,
            norm_first=norm_first,
        )
        self.encoder = nn.TransformerEncoder(
            layer,
            depth,
            norm=nn.LayerNorm(width) if norm_first else None,
            enable_nested_tensor=False,
        )
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.pos(self.embed(_as_sequence(x, self.input_shape, self.sequence))))
        return self.head(h if self.per_step else h.mean(1))


def _init_recurrent(
    layer: nn.RNNBase,
    cell: str,
    *,
    init: str,
    init_std: float,
    activation: str,
    recurrent_init: str,
    recurrent_gain: float,
    bias_init: str,
    bias_value: float,
    bias_std: float,
    forget_bias: float,
) -> None:
    h = layer.hidden_size
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("weight_ih"):
                init_weight_(p, init, std=init_std, activation=activation)
            elif name.startswith("weight_hh"):
                if recurrent_init != "default":
                    for gate in p.view(_GATES[cell], h, h):  # each gate's square block
                        init_weight_(gate, recurrent_init)
                p.mul_(recurrent_gain)
            elif name.startswith("bias_ih"):
                init_bias_(p, bias_init, value=bias_value, std=bias_std)
            elif name.startswith("bias_hh") and bias_init != "default":
                p.zero_()  # the constant / normal bias lives in bias_ih alone
        if forget_bias:
            for name, p in layer.named_parameters():
                if name.startswith("bias_"):
                    p[h : 2 * h] = forget_bias if name.startswith("bias_ih") else 0.0


def build_model(
    task,
    *,
    kind: str = "mlp",
    depth: int = 10,
    width: int = 32,
    activation: str = "sigmoid",
    init: str = "default",
    init_std: float = 1.0,
    bias_init: str = "zeros",
    bias_value: float = 0.0,
    bias_std: float = 1.0,
    norm: str = "none",
    residual: bool = False,
    cell: str = "rnn",
    recurrent_init: str = "default",
    recurrent_gain: float = 1.0,
    forget_bias: float = 0.0,
    heads: int = 4,
    norm_first: bool = True,
    kernel_size: int = 3,
) -> nn.Module:
    """Build a model for ``task`` (a :class:`~vanishing.experiments.tasks.Task`) from a config.

    The model maps ``(N, *task.input_shape)`` to ``(N, task.n_outputs)``, or to
    ``(N, T, task.n_outputs)`` when ``task.per_step``; see the module docstring for how each kind
    reads its inputs and names its layers. Parameters draw from torch's global generator (seed
    it first).

    Initialisation (after construction): ``init`` (see :func:`init_weight_`) applies to every
    Linear and Conv weight (head included), the attention input projections and the recurrent
    input weights; ``"default"`` keeps PyTorch's. ``bias_init`` applies to every bias of those
    (``"default"`` keeps PyTorch's; so the config default ``"zeros"`` zeroes them even with
    ``init="default"``); for recurrent layers a constant/normal bias goes into ``bias_ih`` and
    ``bias_hh`` is zeroed. ``recurrent_init`` applies to each gate's square block of
    ``weight_hh``, which is then multiplied by ``recurrent_gain``. ``forget_bias`` (LSTM only;
    0 leaves the slice to ``bias_init``) sets the forget-gate slice ``[H:2H]`` of ``bias_ih``
    and zeroes that of ``bias_hh`` (PyTorch's gate order is i, f, g, o).

    Constraints: a plain RNN cell takes ``activation`` tanh or relu (LSTM/GRU have fixed
    nonlinearities and ignore it); rnn takes ``norm="none"`` and ``residual=False``; the
    transformer always has residual connections and LayerNorm (``norm`` "none" or "layer";
    ``residual`` is not used).

    Example:
        >>> import torch
        >>> from vanishing.experiments.tasks import make_task
        >>> from vanishing.experiments.models import build_model
        >>> task = make_task("digits")
        >>> net = build_model(task, depth=3, width=16, activation="relu", init="he_normal")
        >>> [name for name, _ in net.named_children()]
        ['flatten', 'hidden', 'head']
        >>> net(task.x_test[:5]).shape
        torch.Size([5, 10])
        >>> build_model(task, kind="rnn", cell="lstm", depth=1)(task.x_test[:5]).shape
        torch.Size([5, 10])
    """
    check_choice("kind", kind, KINDS)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("init", init, INITS)
    check_choice("bias_init", bias_init, BIAS_INITS)
    check_choice("norm", norm, NORMS)
    check_choice("cell", cell, CELLS)
    check_choice("recurrent_init", recurrent_init, RECURRENT_INITS)
    _check_int("depth", depth, 0 if kind in ("mlp", "cnn") else 1)
    _check_int("width", width, 1)
    shape = tuple(int(s) for s in task.input_shape)
    n_out, sequence, per_step = task.n_outputs, bool(task.sequence), bool(task.per_step)
    if forget_bias and (kind != "rnn" or cell != "lstm"):
        raise ValueError("forget_bias applies to LSTMs only: set kind = 'rnn' and cell = 'lstm'")

    if kind == "mlp":
        d_in = math.prod(shape)
        hidden = [
            Dense(
                d_in if i == 0 else width,
                width,
                activation=activation,
                norm=norm,
                residual=residual and i > 0,
            )
            for i in range(depth)
        ]
        head = nn.Linear(width if depth else d_in, n_out * (shape[0] if per_step else 1))
        model: nn.Module = nn.Sequential(
            OrderedDict(flatten=nn.Flatten(), hidden=nn.Sequential(*hidden), head=head)
        )
        if per_step:
            model.add_module("unflatten", nn.Unflatten(1, (shape[0], n_out)))
    elif kind == "cnn":
        _check_int("kernel_size", kernel_size, 1)
        model = ConvNet(
            shape,
            n_out,
            depth=depth,
            width=width,
            activation=activation,
            norm=norm,
            residual=residual,
            kernel_size=kernel_size,
            sequence=sequence,
            per_step=per_step,
        )
    elif kind == "rnn":
        if cell == "rnn" and activation not in RNN_CELL_ACTIVATIONS:
            raise ValueError(
                f"a plain RNN cell supports activation {' or '.join(RNN_CELL_ACTIVATIONS)}, "
                f"got {activation!r}; "
                "or use cell = 'lstm' / 'gru'"
            )
        if norm != "none" or residual:
            raise ValueError("kind 'rnn' supports norm = 'none' and residual = false only")
        model = RecurrentNet(
            shape,
            n_out,
            cell=cell,
            depth=depth,
            width=width,
            activation=activation,
            sequence=sequence,
            per_step=per_step,
        )
    else:
        if norm == "batch":
            raise ValueError(
                "kind 'transformer' always uses LayerNorm: set norm = 'none' or 'layer'"
            )
        _check_int("heads", heads, 1)
        model = TransformerNet(
            shape,
            n_out,
            depth=depth,
            width=width,
            heads=heads,
            activation=activation,
            norm_first=norm_first,
            sequence=sequence,
            per_step=per_step,
        )

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            init_linear(
                m,
                init,
                std=init_std,
                activation=activation,
                bias_init=bias_init,
                bias_value=bias_value,
                bias_std=bias_std,
            )
        elif isinstance(m, nn.MultiheadAttention):
            init_weight_(m.in_proj_weight, init, std=init_std, activation=activation)
            if m.in_proj_bias is not None:
                init_bias_(m.in_proj_bias, bias_init, value=bias_value, std=bias_std)
        elif isinstance(m, nn.RNNBase):
            _init_recurrent(
                m,
                cell,
                init=init,
                init_std=init_std,
                activation=activation,
                recurrent_init=recurrent_init,
                recurrent_gain=recurrent_gain,
                bias_init=bias_init,
                bias_value=bias_value,
                bias_std=bias_std,
                forget_bias=forget_bias,
            )
    return model
