"""Greedy layer-wise pretraining (Hinton et al. 2006; Bengio et al. 2007), autoencoder variant.

Each hidden layer in turn, from the input up, is trained as the encoder of an autoencoder: a
fresh linear decoder maps the layer's output back to the layer's input, and the layer and the
decoder minimise the mean squared reconstruction error by minibatch SGD. The layers below are
frozen meanwhile; their output on the data is the input of the layer being trained. The
decoders are thrown away; the head is left alone. Fine-tuning is ordinary training afterwards.
"""

from __future__ import annotations

from torch import Tensor, nn


def _hidden_units(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(preprocessing, hidden units)`` of an MLP built by ``build_model`` or ``mlp``.

    A unit is a :class:`~vanishing.experiments.models.Dense` or, in a flat ``nn.Sequential``, a
    Linear with the parameter-free or normalising modules after it; the last Linear is the head.
    """
    from vanishing.experiments.models import Dense

    if isinstance(model, nn.Sequential) and isinstance(
        getattr(model, "hidden", None), nn.Sequential
    ):
        pre = [model.flatten] if hasattr(model, "flatten") else []
        return pre, list(model.hidden)
    if not isinstance(model, nn.Sequential) or not any(
        isinstance(m, (nn.Linear, Dense)) for m in model
    ):
        raise ValueError(
            f"layer-wise pretraining needs an MLP (model kind 'mlp'); got {type(model).__name__}"
        )
    pre: list[nn.Module] = []
    units: list[list[nn.Module]] = []
    for m in model:
        if isinstance(m, (nn.Linear, Dense)):
            units.append([m])
        elif units:
            units[-1].append(m)
        else:
            pre.append(m)
    if not isinstance(units[-1][0], nn.Linear) or len(units[-1]) > 1:
        raise ValueError("layer-wise pretraining expects an MLP that ends in a Linear head")
    hidden = [u[0] if len(u) == 1 else nn.Sequential(*u) for u in units[:-1]]
    return pre, hidden


def layerwise_pretrain(
    model: nn.Module,
    x: Tensor,
    *,
    steps: int,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Pretrain each hidden layer of an MLP as an autoencoder, in place; see the module doc.

    ``steps`` SGD steps per layer (:func:`vanishing.experiments.train.train`, unwatched) on
    minibatches of ``x`` (inputs as the model takes them) drawn with replacement with ``seed``
    (``batch_size`` 0 or at least ``len(x)``: the full batch); decoders are initialised from
    ``seed`` too. Returns each hidden layer's mean
    squared reconstruction error over all of ``x`` after its training, in forward order.
    Parameters are updated in place (an optimizer made before keeps working); the model's
    train/eval mode is restored.

    Example:
        >>> import torch
        >>> from vanishing.experiments.models import mlp
        >>> from vanishing.experiments.pretrain import layerwise_pretrain
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> net = mlp(8, 2, depth=2, width=6, activation="sigmoid")
        >>> losses = layerwise_pretrain(net, torch.randn(256, 8), steps=50)
        >>> len(losses), net(torch.randn(3, 8)).shape
        (2, torch.Size([3, 2]))
    """
    import torch

    from vanishing.experiments.train import minibatches, train

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"pretraining steps must be an integer >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be an integer >= 0 (0: full batch), got {batch_size!r}")
    pre, hidden = _hidden_units(model)
    was_training = model.training
    model.train()
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        h = x
        for m in pre:
            h = m(h)
    losses: list[float] = []
    try:
        for unit in hidden:
            with torch.no_grad():
                code_dim = unit(h[:2]).shape[-1]
            decoder = nn.Linear(code_dim, h.shape[-1])  # drawn on the CPU: g is a CPU generator
            bound = 1 / code_dim**0.5
            with torch.no_grad():
                decoder.weight.uniform_(-bound, bound, generator=g)
                decoder.bias.zero_()
            decoder = decoder.to(device=h.device, dtype=h.dtype)
            params = [p for p in unit.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params + list(decoder.parameters()), lr=lr, momentum=0.9)
            # the package's one loop, unwatched; batches drawn with replacement from g, after
            # the decoder's init (g is read lazily, step by step)
            batches = minibatches(h, h, batch_size=batch_size, generator=g, replacement=True)
            autoencoder = nn.Sequential(unit, decoder)  # decoder(unit(batch)) ~ batch
            train(
                autoencoder,
                batches,
                nn.functional.mse_loss,
                opt,
                steps=steps,
                stop_on_nonfinite=False,
            )
            with torch.no_grad():
                code = unit(h)
                losses.append(nn.functional.mse_loss(decoder(code), h).item())  # host sync
                h = code
            for p in params:
                p.grad = None
    finally:
        model.train(was_training)
    return losses
