"""Model builders with the switches that cause or cure vanishing gradients."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softsign": nn.Softsign,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
}
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
)


def init_linear(layer: nn.Linear, init: str, *, std: float = 1.0, activation: str = "relu") -> None:
    """Initialise a linear layer's weight in place (biases are set to zero except for "default").

    ``normal`` draws N(0, std^2) (std 1 is the textbook example that vanishes); ``glorot_standard``
    is U[-1/sqrt(n), 1/sqrt(n)] as in Glorot & Bengio (2010); the others are PyTorch's.

    Example:
        >>> from torch import nn
        >>> from vanishing.experiments.models import init_linear
        >>> layer = nn.Linear(256, 256); init_linear(layer, "he_normal")
        >>> round(layer.weight.std().item() * 16, 1)   # sqrt(2 / 256) * 16 = 1.41
        1.4
    """
    w = layer.weight
    fan_in = w.shape[1]
    with torch.no_grad():
        if init == "default":
            return
        if init == "normal":
            nn.init.normal_(w, 0.0, std)
        elif init == "glorot_standard":
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif init == "xavier_uniform":
            nn.init.xavier_uniform_(w)
        elif init == "xavier_normal":
            nn.init.xavier_normal_(w)
        elif init == "he_uniform":
            nn.init.kaiming_uniform_(w, nonlinearity=_he_nonlinearity(activation))
        elif init == "he_normal":
            nn.init.kaiming_normal_(w, nonlinearity=_he_nonlinearity(activation))
        elif init == "lecun_normal":
            nn.init.normal_(w, 0.0, 1 / math.sqrt(fan_in))
        elif init == "orthogonal":
            nn.init.orthogonal_(w)
        else:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
        if layer.bias is not None:
            layer.bias.zero_()


def _he_nonlinearity(activation: str) -> str:
    return "leaky_relu" if activation in ("leaky_relu", "prelu") else "relu"


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
) -> nn.Sequential:
    """A multilayer perceptron of ``depth`` hidden layers: Linear [-> norm] -> activation.

    Example:
        >>> from vanishing.experiments.models import mlp
        >>> net = mlp(64, 10, depth=3, width=16, activation="relu", init="he_normal")
        >>> [type(m).__name__ for m in net][:3], len(net)
        (['Linear', 'ReLU', 'Linear'], 7)
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
        )
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        linear = nn.Linear(d, width)
        init_linear(linear, init, std=std, activation=activation)
        layers.append(linear)
        if norm == "batch":
            layers.append(nn.BatchNorm1d(width))
        elif norm == "layer":
            layers.append(nn.LayerNorm(width))
        elif norm != "none":
            raise ValueError(f"unknown norm {norm!r}; expected none, batch or layer")
        layers.append(ACTIVATIONS[activation]())
        d = width
    head = nn.Linear(d, d_out)
    init_linear(head, init, std=std, activation=activation)
    layers.append(head)
    return nn.Sequential(*layers)
