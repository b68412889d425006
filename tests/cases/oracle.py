"""Independent measurements that establish each case's label, in plain torch.

Nothing here imports ``vanishing``: these functions recompute, from the model and a batch, the
quantities a label rests on (gradients through depth and time with ``torch.autograd.grad``,
pre-activations through forward hooks, weight changes from snapshots), so that a case's label is
confirmed without trusting the code under test.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BOUNDED = (nn.Sigmoid, nn.Tanh)
RELU = (nn.ReLU,)


def bias_grad_norms(model, layers, x, y, loss_fn):
    """||dLoss/d bias|| of each named module (Nielsen's speed of learning), in the given order."""
    mods = dict(model.named_modules())
    biases = [mods[name].bias for name in layers]
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, biases)
    return [float(g.double().norm()) for g in grads]


def output_grad_norms(model, layers, x, y, loss_fn):
    """||dLoss/d(output of module)|| of each named module (the backpropagated error signal)."""
    mods = dict(model.named_modules())
    outs = {}

    def keep(name):
        def hook(_m, _i, out):
            outs[name] = out

        return hook

    handles = [mods[n].register_forward_hook(keep(n)) for n in layers]
    try:
        loss = loss_fn(model(x), y)
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(loss, [outs[n] for n in layers])
    return [float(g.double().norm()) for g in grads]


def activation_io(model, x, kinds):
    """(module name, input, output) of every activation module of the given types, in call order."""
    seen = []

    def keep(name):
        def hook(_m, inp, out):
            seen.append((name, inp[0].detach(), out.detach()))

        return hook

    handles = [
        m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, kinds)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def dead_fractions(model, x):
    """Per ReLU module: the share of units whose input is <= 0 for every example of the batch
    (units: features, or channels of a convolutional map)."""
    out = {}
    for name, z, _ in activation_io(model, x, RELU):
        off = z <= 0
        if off.dim() > 2:  # N, C, ...: a channel is off when every position is off
            off = off.flatten(2).all(2)
        out[name] = float(off.all(0).double().mean())
    return out


def saturated_fractions(model, x):
    """Per sigmoid/tanh module: the share of entries whose derivative is below 5% of its max."""
    out = {}
    for name, _z, y in activation_io(model, x, BOUNDED):
        mod = dict(model.named_modules())[name]
        if isinstance(mod, nn.Sigmoid):
            d, top = y * (1 - y), 0.25
        else:
            d, top = 1 - y * y, 1.0
        out[name] = float((d < 0.05 * top).double().mean())
    return out


def activation_stds(model, x, kinds=(nn.ReLU,)):
    """Standard deviation of each activation module's output, in call order."""
    return [float(y.double().std()) for _, _, y in activation_io(model, x, kinds)]


def time_grad_ratio(model, x, y, loss_fn):
    """||dLoss/d x[:, 0]|| / ||dLoss/d x[:, -1]|| for a batch-first sequence input x."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(model(x), y), [x])
    per_t = g.double().pow(2).sum((0, 2)).sqrt()
    return float(per_t[0] / per_t[-1])


def update_ratios(model, opt, x, y, loss_fn):
    """One optimizer step on (x, y) on a deep copy: |W_new - W_old| / |W_old| per weight."""
    import copy

    twin = copy.deepcopy(model)
    twin_opt = type(opt)(
        [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [_twin(model, twin, p)]}
            for g in opt.param_groups
            for p in g["params"]
        ]
    )
    before = {n: p.detach().clone() for n, p in twin.named_parameters() if n.endswith("weight")}
    twin_opt.zero_grad()
    loss_fn(twin(x), y).backward()
    twin_opt.step()
    after = dict(twin.named_parameters())
    return {
        n: float((after[n].detach() - w).double().norm() / w.double().norm())
        for n, w in before.items()
    }


def _twin(model, twin, p):
    names = {id(q): n for n, q in model.named_parameters()}
    return dict(twin.named_parameters())[names[id(p)]]


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def decreased(losses, k=5) -> bool:
    """The mean of the last k losses is below the mean of the first k."""
    return finite(losses) and sum(losses[-k:]) / k < sum(losses[:k]) / k


def block_output_grad_norms(model, blocks, x, y, loss_fn):
    """||dLoss/d(output of block)|| of each named block (the residual stream after it)."""
    return output_grad_norms(model, blocks, x, y, loss_fn)


def tanh_mean_field(sigma_w2, sigma_b2, nodes=201):
    """(q*, chi1) of a wide tanh net with weights N(0, sigma_w2 / fan_in) and biases
    N(0, sigma_b2) (Poole et al. 2016; Schoenholz et al. 2017), by Gauss-Hermite quadrature in
    numpy: q* is the fixed point of q = sigma_w2 E[tanh(sqrt(q) z)^2] + sigma_b2, and
    chi1 = sigma_w2 E[tanh'(sqrt(q*) z)^2] the factor on the squared gradient per layer
    (below 1 ordered: vanishing; above 1 chaotic: exploding)."""
    import numpy as np

    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    q = 1.0
    for _ in range(2000):
        q_new = sigma_w2 * float(np.sum(w * np.tanh(np.sqrt(q) * z) ** 2)) + sigma_b2
        if abs(q_new - q) < 1e-14:
            break
        q = q_new
    chi1 = sigma_w2 * float(np.sum(w * (1 - np.tanh(np.sqrt(q) * z) ** 2) ** 2))
    return q, chi1
