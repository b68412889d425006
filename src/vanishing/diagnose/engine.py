"""The diagnosis engine: every rule on a recorded run, findings and notes collected.

Imports neither the monitor nor the run reader (the monitor and ``Run.diagnose`` import this), so
that diagnosing sits below both in the import graph.
"""

from __future__ import annotations

from typing import Any

from vanishing.diagnose.findings import Diagnosis, Finding
from vanishing.recorder.errors import RunError

__all__ = ["diagnose_run", "model_facts", "MODEL_FACTS"]

MODEL_FACTS = "<model>"  # key of the facts about the whole model (not a module name)


def diagnose_run(run: Any, model: Any = None) -> Diagnosis:
    """Run every rule on a recorded run (a :class:`vanishing.Run`, bounded or whole).

    ``model`` (optional) is the model that was watched, as it is now: with it, numbers the run
    does not record are measured on the model itself (the recurrent weights' largest singular
    value).

    Example:
        >>> from vanishing.diagnose.engine import diagnose_run
        >>> from vanishing.report.data import example_run
        >>> import vanishing
        >>> "vanishing_gradient" in diagnose_run(vanishing.load_run(example_run())).kinds
        True
    """
    from vanishing.diagnose.rules import RULES
    from vanishing.diagnose.view import RunView

    if run.steps.empty:
        raise RunError(
            f"{run.path}: the run recorded no steps, so there is nothing to diagnose; "
            "train at least one step (or use vanishing.inspect before training)"
        )
    view = RunView(run, facts=model_facts(model) if model is not None else None)
    findings: list[Finding] = []
    rule_notes: list[str] = []
    for rule in RULES:
        result = rule(view)
        findings.extend(result.findings)
        rule_notes.extend(result.notes)
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
    notes.extend(rule_notes)
    return Diagnosis(findings=findings, notes=notes)


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

    from vanishing.diagnose.causes import skip_connections
    from vanishing.modules import _unwrap

    root = _unwrap(model)
    out: dict[str, dict[str, float]] = {}
    for name, module in root.named_modules():
        if isinstance(module, (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU)):
            w = getattr(module, "weight_hh_l0", None)
            if w is not None:
                with torch.no_grad():
                    sigma = torch.linalg.matrix_norm(w.detach().double(), ord=2)
                out[name] = {"sigma_max_recurrent": round(float(sigma), 12)}
    skip = skip_connections(root)
    if skip is not None:
        out[MODEL_FACTS] = {"skip_connections": float(skip)}
    return out
