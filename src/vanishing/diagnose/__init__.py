"""Diagnosis: rules turn a run's records into findings with evidence and remedies."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

from vanishing.diagnose.findings import KINDS, REMEDIES, Diagnosis, Finding, Remedy

__all__ = [
    "Diagnosis",
    "Finding",
    "Remedy",
    "KINDS",
    "REMEDIES",
    "diagnose_run",
    "inspect",
    "model_facts",
]


def diagnose_run(run: Any, model: Any = None) -> Diagnosis:
    """Run every rule on a recorded run (a :class:`vanishing.Run`).

    ``model`` (optional) is the model that was watched, as it is now: with it, numbers the run
    does not record are measured on the model itself (the recurrent weights' largest singular
    value).

    Example:
        >>> diag = vanishing.load_run("runs/my-run").diagnose()   # doctest: +SKIP
    """
    from vanishing.diagnose.rules import RULES
    from vanishing.diagnose.view import RunView
    from vanishing.recorder.reader import RunError

    if run.steps.empty:
        raise RunError(
            f"{run.path}: the run recorded no steps, so there is nothing to diagnose; "
            "train at least one step (or use vanishing.inspect before training)"
        )
    view = RunView(run, facts=model_facts(model) if model is not None else None)
    findings: list[Finding] = []
    for rule in RULES:
        findings.extend(rule(view))
    n = len(view.steps)
    w = len(view.window_steps)
    notes = [
        f"{n} recorded step(s); persistence judged on the last {w}"
        if w
        else f"{n} recorded step(s), none before the first non-finite value: only non_finite "
        "is judged"
    ]
    label, _ = view.depth_signal
    if label:
        notes.append(f"gradient through depth read from the {label} (per unit)")
    notes.extend(view.notes)
    return Diagnosis(findings=findings, notes=notes)


MODEL_FACTS = "<model>"  # key of the facts about the whole model (not a module name)


def model_facts(model: Any) -> dict[str, dict[str, float]]:
    """Per recurrent layer of ``model``: the largest singular value of its recurrent weight
    (``sigma_max_recurrent``; for LSTM/GRU of the stacked gate matrix); under ``"<model>"``,
    whether the model has skip connections (when its forward can be traced).

    Example:
        >>> import torch
        >>> from vanishing.diagnose import model_facts
        >>> rnn = torch.nn.RNN(2, 4)
        >>> with torch.no_grad():
        ...     _ = rnn.weight_hh_l0.copy_(0.5 * torch.eye(4))
        >>> model_facts(torch.nn.Sequential(rnn))
        {'0': {'sigma_max_recurrent': 0.5}, '<model>': {'skip_connections': 0.0}}
    """
    import torch

    from vanishing.monitor import _unwrap

    out: dict[str, dict[str, float]] = {}
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU)):
            w = getattr(module, "weight_hh_l0", None)
            if w is not None:
                with torch.no_grad():
                    sigma = torch.linalg.matrix_norm(w.detach().double(), ord=2)
                out[name] = {"sigma_max_recurrent": round(float(sigma), 12)}
    from vanishing.diagnose.causes import skip_connections

    skip = skip_connections(_unwrap(model))
    if skip is not None:
        out[MODEL_FACTS] = {"skip_connections": float(skip)}
    return out


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

    from vanishing.monitor import Monitor, WatchError, _unwrap
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
            with Monitor(model, run_dir=f"{tmp}/run", flush_every=1):
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
