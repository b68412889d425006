"""Small models and loops shared by the tests."""

import torch
from torch import nn


def mlp(depth=4, width=8, act=nn.Sigmoid, d_in=5, d_out=3):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def train(model, opt, steps=5, *, batch=16, d_in=5, n_classes=3, seed=1, accumulate=1):
    """A plain loop; returns the losses (as Python floats) of each micro-batch."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x = torch.randn(batch, d_in, generator=g)
            y = torch.randint(0, n_classes, (batch,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
        opt.step()
    return losses


def row(run, step, layer, param):
    df = run.metrics
    sel = df[(df.step == step) & (df.layer == layer) & (df.param == param)]
    assert len(sel) == 1, (step, layer, param, len(sel))
    return sel.iloc[0]


def assert_thinned_run_equals(full, thinned, steps, frames=("metrics",)):
    """``thinned`` (recorded at ``steps`` only) holds exactly what ``full`` (every step) holds
    at those steps, every column, with activation statistics and error signals among them."""
    import pandas as pd

    assert thinned.steps.step.tolist() == list(steps)
    for frame in frames:
        a = getattr(full, frame)
        a = a[a.step.isin(list(steps))].reset_index(drop=True)
        b = getattr(thinned, frame).reset_index(drop=True)
        assert len(b) > 0
        pd.testing.assert_frame_equal(a, b)
    m = thinned.metrics
    assert m.error_norm.notna().any() and m.act_mean.notna().any()


def retain_outputs(model, names):
    """Forward hooks that keep each named submodule's output with its gradient retained: the
    autograd oracle for the error signal. Returns (outputs by name, hook handles)."""
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            outputs[name] = output

        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    return outputs, handles


class QuickGELU(nn.Module):
    """Hugging Face's QuickGELUActivation (CLIP), written out: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


QuickGELU.__name__ = "QuickGELUActivation"  # the registry recognises classes by name
