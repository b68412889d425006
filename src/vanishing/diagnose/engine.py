"""The diagnosis engine: every rule on a recorded run, findings and notes collected.

Imports neither the monitor nor the run reader (the monitor and ``Run.diagnose`` import this), so
that diagnosing sits below both in the import graph.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vanishing.diagnose.findings import Diagnosis, Finding
from vanishing.recorder.errors import RunError
from vanishing.recorder.semantics import hidden_layers

__all__ = ["diagnose_run", "model_facts", "MODEL_FACTS", "NO_LAYERS"]

MODEL_FACTS = "<model>"  # key of the facts about the whole model (not a module name)
#: the note of a run whose manifest lists no layers: no finding, and no verdict either
NO_LAYERS = "the run lists no layers: nothing to judge"


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
    rule_notes: list[str] = []
    facts = None
    if model is not None:
        try:
            facts = model_facts(model)
        except Exception as e:  # noqa: BLE001 - a model in any state is diagnosed from its records
            rule_notes.append(f"facts about the model not measured ({type(e).__name__}: {e})")
    view = RunView(run, facts=facts)
    findings: list[Finding] = []
    for rule in RULES:
        # never raise: a corrupted record or a model in an odd state costs that rule's judgement
        # (a note says so), not the diagnosis of the others
        try:
            result = rule(view)
        except Exception as e:  # noqa: BLE001
            name = rule.__module__.rpartition(".")[2]
            rule_notes.append(f"rule {name!r} could not judge this run ({type(e).__name__}: {e})")
            continue
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
    try:
        label, table = view.depth_signal
        scale = table.attrs.get("scale", "per unit")
    except Exception:  # noqa: BLE001 - see above
        label = ""
    if label:
        where = ""
        if view.depth_unit == "block":
            where = (
                f", compared per role across the {len(view.stack_blocks)} repeated blocks "
                f"'{view.stack_blocks[0]}' ... '{view.stack_blocks[-1]}' (heads, poolers, "
                "embeddings and the root module placed by role, outside the profile)"
            )
        elif view.stack_blocks:
            where = (
                f"; not judged through depth: {len(view.stack_blocks)} repeated blocks are too "
                "few to compare a role across them"
            )
        notes.append(f"gradient through depth read from the {label} ({scale}){where}")
    elif view.stack_blocks and len(view.stack_blocks) < 3:
        notes.append(
            f"not judged through depth: {len(view.stack_blocks)} repeated blocks are too few to "
            "compare a role across them"
        )
    notes.extend(rule_notes)
    notes.extend(_activation_coverage(run, view))
    notes.extend(_signs(view, findings))
    if not run.layer_info:
        notes.insert(0, NO_LAYERS)
    # parts the reader had to skip (Run.damaged): the steps they held are not judged
    notes[:0] = [f"damaged run: {d}" for d in getattr(run, "damaged", ())]
    return Diagnosis(findings=findings, notes=notes)


def model_facts(model: Any) -> dict[str, dict[str, float]]:
    """Per recurrent layer of ``model``: the largest singular value of its recurrent weight
    (``sigma_max_recurrent``, of the first layer; for LSTM/GRU of the stacked gate matrix), the
    bias of the gate that keeps the state (``forget_gate_bias``: an LSTM's forget gate, a GRU's
    update gate; the smallest over stacked layers, each also as ``forget_gate_bias_l1``...);
    under ``"<model>"``, whether the model has skip connections (when its forward can be
    traced).

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

    from vanishing.modules import _unwrap, skip_connections

    root = _unwrap(model)
    out: dict[str, dict[str, float]] = {}
    for name, module in root.named_modules():
        if isinstance(module, (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU)):
            w = getattr(module, "weight_hh_l0", None)
            if w is None:
                continue
            with torch.no_grad():
                w = w.detach().double()
                if not bool(torch.isfinite(w).all()):
                    # an SVD of NaN/inf does not converge; non_finite reports the weight itself
                    out[name] = {"recurrent_weight_nonfinite": 1.0}
                    continue
                try:
                    sigma = float(torch.linalg.matrix_norm(w, ord=2))
                except RuntimeError:  # e.g. overflow inside the SVD of a huge weight
                    continue
            out[name] = {"sigma_max_recurrent": round(sigma, 12)}
            if isinstance(module, (torch.nn.LSTM, torch.nn.GRU)):
                # the bias of the gate that keeps the state (LSTM: the forget gate, gate order
                # input, forget, cell, output; GRU: the update gate z of r, z, n, which keeps
                # h_{t-1} as z -> 1), per stacked layer, so that a model that sets it is not
                # advised to; "forget_gate_bias" is the smallest over the layers
                h = module.hidden_size
                biases = []
                for layer in range(module.num_layers):
                    with torch.no_grad():
                        b = sum(
                            getattr(module, f"{k}_l{layer}")[h : 2 * h].detach().double()
                            for k in ("bias_ih", "bias_hh")
                            if getattr(module, f"{k}_l{layer}", None) is not None
                        )
                    if isinstance(b, torch.Tensor) and bool(torch.isfinite(b).all()):
                        biases.append(round(float(b.mean()), 12))
                        if module.num_layers > 1:
                            out[name][f"forget_gate_bias_l{layer}"] = biases[-1]
                if biases and len(biases) == module.num_layers:
                    out[name]["forget_gate_bias"] = min(biases)
    skip = skip_connections(root)
    if skip is not None:
        out[MODEL_FACTS] = {"skip_connections": float(skip)}
    return out


def _activation_coverage(run: Any, view: Any) -> list[str]:
    """Notes on the activations the records cannot show: modules with no registered
    derivative (named in the manifest), and a stack with no activation module at all, whose
    activations (if any) are functions called in ``forward`` (``F.relu(x)``)."""
    notes = []
    manifest = getattr(run, "manifest", {}) or {}
    missing = manifest.get("unmeasured_activations") or []
    try:
        if missing:
            by_type: dict[str, list[str]] = {}
            for m in missing:
                by_type.setdefault(str(m.get("type")), []).append(str(m.get("name")))
            kinds = "; ".join(
                f"{t} ({len(names)}: {', '.join(repr(n) for n in names[:3])}"
                f"{' ...' if len(names) > 3 else ''})"
                for t, names in by_type.items()
            )
            notes.append(
                f"activations without a registered derivative, so without statistics: {kinds}; "
                "saturation and dead units are not judged for them "
                "(vanishing.activations.register adds one)"
            )
        has_activation_modules = any(x.get("role") == "activation" for x in view.layers)
        if not has_activation_modules and not missing and len(view.hidden) >= 2:
            notes.append(
                "no activation module in the model: activations applied as functions in forward "
                "(F.relu(x), torch.tanh(x)) are invisible to the monitor, so saturation and dead "
                "units are not judged; nn.ReLU()/nn.Tanh() modules would be recorded"
            )
    except Exception:  # noqa: BLE001 - a note must never cost the diagnosis
        return notes
    return notes


#: the loss "stagnates" when the last tenth of the judged steps averages more than this share
#: of the first tenth's; the weights "drift toward zero" when the hidden layers' median weight
#: norm falls by more than this share from the first to the last judged step
STAGNANT_LOSS = 0.9
WEIGHT_DRIFT = 0.2


GRADIENT_KINDS = ("vanishing_gradient", "exploding_gradient", "stalled_layers")


def _signs(view: Any, findings: list[Finding]) -> list[str]:
    """The seeds' other two signs beside the gradient findings: the loss stagnating against
    its initial value, and the hidden layers' weights drifting toward zero. Each is evidence on
    the gradient findings (``loss_last_over_first``, ``weight_norm_change``) and a note when it
    shows; never raises."""
    notes: list[str] = []
    try:
        curve = view.loss_curve  # one definition of the loss curve (RunView.loss_curve)
        ratio = curve.get("last_over_first")
        if ratio is not None and not math.isfinite(ratio):
            ratio = None
        change = None
        # every weight matrix of the hidden layers (recurrent ones too, per stacked layer)
        hidden = set(hidden_layers(view.layers)) - {
            n for n, p in view.placement.items() if p == "root"
        }
        w = view.all_weight_units
        if hidden and not w.empty:
            w = w[w["layer"].isin(hidden)]
            if view.first_nonfinite is not None:
                w = w[w["step"] < view.first_nonfinite]
            if not w.empty and w["step"].nunique() >= 2:
                a, b = w["step"].min(), w["step"].max()
                start = w[w["step"] == a].set_index("unit")["param_norm"]
                end = w[w["step"] == b].set_index("unit")["param_norm"]
                rel = ((end - start) / start).replace([np.inf, -np.inf], np.nan).dropna()
                if not rel.empty:
                    change = float(rel.median())
        gradient = [f for f in findings if f.kind in GRADIENT_KINDS]
        for f in gradient:
            if ratio is not None:
                f.evidence["loss_last_over_first"] = ratio
            if change is not None:
                f.evidence["weight_norm_change"] = change
        if ratio is not None and ratio > STAGNANT_LOSS and gradient:
            notes.append(
                f"the loss stagnates: its last tenth of steps averages {ratio:.0%} of the first "
                "tenth (one of the three signs of a vanishing gradient, with layers that "
                "barely change and weights that drift toward zero)"
            )
        if change is not None and change < -WEIGHT_DRIFT:
            notes.append(
                f"the weights of the hidden layers drift toward zero: their median norm fell "
                f"{-change:.0%} from the first to the last recorded step"
            )
    except Exception:  # noqa: BLE001 - a sign must never cost the diagnosis
        return notes
    return notes
