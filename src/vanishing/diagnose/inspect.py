"""``vanishing.inspect``: diagnose a model before training, from one batch.

The one part of the diagnosis that drives a model: it watches one forward and backward pass
with the monitor, so it imports :mod:`vanishing.monitor` (when called), which imports only the
engine below it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from vanishing.diagnose.findings import Diagnosis

__all__ = ["inspect"]


def inspect(model, inputs, targets, loss_fn: Callable) -> Diagnosis:
    """Diagnose a model before training, from one forward and backward pass on one batch.

    The model is left exactly as it was: parameters, ``.grad``, buffers (batch-norm running
    statistics), training/eval mode and the random number generators' state.

    Example:
        >>> import torch, vanishing
        >>> from torch import nn
        >>> torch.manual_seed(0)   # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = []
        >>> for _ in range(12):
        ...     layers += [nn.Linear(32, 32), nn.Sigmoid()]
        >>> model = nn.Sequential(*layers, nn.Linear(32, 4))
        >>> diag = vanishing.inspect(model, torch.randn(64, 32), torch.randint(0, 4, (64,)),
        ...                          nn.functional.cross_entropy)
        >>> diag.kinds
        ['vanishing_gradient']
    """
    import torch

    from vanishing.diagnose.engine import diagnose_run
    from vanishing.modules import _unwrap
    from vanishing.monitor import Monitor, WatchError
    from vanishing.monitor.monitor import suspended
    from vanishing.recorder.reader import load_run

    if not isinstance(model, torch.nn.Module):
        raise WatchError(f"inspect() needs a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise WatchError("loss_fn must be callable as loss_fn(model(inputs), targets)")
    root = _unwrap(model)
    grads = {id(p): p.grad for p in root.parameters()}
    buffers = {
        k: v.clone()
        for k, v in root.state_dict(keep_vars=True).items()
        if not isinstance(v, torch.nn.Parameter)
    }
    modes = {m: m.training for m in root.modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory(prefix="vanishing-inspect-") as tmp:
        try:
            for p in root.parameters():
                p.grad = None
            root.train()
            # a model being trained under a monitor: that one hears nothing of this batch
            with suspended(model), Monitor(model, run_dir=f"{tmp}/run", flush_every=1):
                loss = loss_fn(model(inputs), targets)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise WatchError("loss_fn must return a scalar tensor")
                loss.backward()
            return diagnose_run(load_run(f"{tmp}/run"), model)
        finally:
            for p in root.parameters():
                p.grad = grads.get(id(p))
            with torch.no_grad():
                state = root.state_dict(keep_vars=True)
                for k, v in buffers.items():
                    state[k].copy_(v)
            for m, training in modes.items():
                m.training = training
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
