"""vanishing_gradient: the gradient shrinks back through depth, or back through time."""

from __future__ import annotations

import math

from vanishing.diagnose.causes import attribute
from vanishing.diagnose.findings import Finding, Remedy, RuleResult, unique
from vanishing.diagnose.view import (
    RunView,
    depth_trend,
    gain_target,
    is_squashing,
    max_derivative_text,
)

#: the first hidden layer gets at most this share of the last hidden layer's gradient (per unit)
MAX_FIRST_TO_LAST = 0.1
#: ... and the least-squares line through all hidden layers confirms a shrink (so one outlying
#: endpoint cannot make the finding); a little looser, the fit smooths the endpoints
MAX_FITTED_FIRST_TO_LAST = 0.2
#: through time (plain RNN cells): gradient at t=0 over gradient at t=T-1
MAX_FIRST_TO_LAST_TIME = 1e-3
#: gated cells (LSTM, GRU) whose profile decays are reported as a note, not a finding
GATED = ("LSTM", "GRU")


def check(view: RunView) -> RuleResult:
    """The rule: its findings and its notes (see the module doc)."""
    notes: list[str] = []
    return RuleResult(_through_depth(view) + _through_time(view, notes), notes)


def _through_depth(view: RunView) -> list[Finding]:
    # the error signal, or the speed of learning (which sums the error over examples and
    # positions): early layers learning far more slowly is the problem, whichever shows it
    chosen = None
    for signal, values in view.depth_signals:
        if values.shape[1] < 3:
            continue
        trend = depth_trend(values)
        ratio = 10 ** -trend["span"]  # first hidden layer's gradient over the last one's
        fitted = 10 ** -trend["fitted_span"]
        if ratio <= MAX_FIRST_TO_LAST and fitted <= MAX_FITTED_FIRST_TO_LAST:
            chosen = (signal, values, trend, ratio, fitted)
            break
    if chosen is None:
        return []
    label, table, trend, ratio, fitted = chosen
    layers = list(table.columns)
    blocks = view.depth_unit == "block"
    members = view.members(layers)
    per_layer = 10 ** trend["slope"]
    cause, causes, factors = attribute(view, members, growing=False)
    evidence = {
        "first_to_last_ratio": ratio,
        "fitted_first_to_last_ratio": fitted,
        "shrink_per_layer": per_layer,
        "hidden_layers": len(members),
        **causes,
    }
    if blocks:
        evidence["blocks"] = len(layers)
        evidence["roles_compared"] = float(table.attrs.get("roles", 0))
        cause += (
            f"; the same layers of each of {len(layers)} repeated blocks compared (median over "
            "roles of each block's gradient relative to the first block's)"
        )
    remedies = _depth_remedies(view, members, per_layer, ratio, evidence, label)
    if blocks and view.block_norms[1]:
        remedies = unique(
            [
                Remedy(
                    "pre_layer_norm",
                    f"'{layers[0]}' gets {ratio:.1e} of the {label} of '{layers[-1]}': each "
                    "post-LN block normalises the sum x + f(x), dividing the stream's gradient "
                    "again and again; normalising the branch input instead (pre-LN) leaves the "
                    "identity path untouched",
                ),
                Remedy(
                    "learning_rate_warmup",
                    "post-LN stacks whose gradient compounds at init train only with a "
                    "learning-rate warm-up",
                ),
            ]
            + remedies
        )
    unit = "block" if blocks else "layer"
    what = f"{len(layers)} blocks" if blocks else f"{len(layers)} hidden layers"
    return [
        Finding(
            kind="vanishing_gradient",
            layers=layers,
            severity="critical" if ratio <= 1e-4 else "warning",
            message=(
                f"the {label} shrinks {per_layer:.1f}x per {unit} back through {what}: "
                f"'{layers[0]}' gets {ratio:.1e} of the gradient of '{layers[-1]}'"
            ),
            evidence=evidence,
            remedies=remedies,
            cause=cause,
            per_layer=factors,
        )
    ]


def _depth_remedies(view, layers, per_layer, ratio, evidence, label) -> list[Remedy]:
    dominant = view.dominant_activation(layers)
    deriv = evidence["mean_dphi"]
    gain = evidence["weight_gain"]
    sat = evidence["saturated_fraction"]
    target, init_name = gain_target(dominant)
    squashing = is_squashing(dominant)  # sigmoid, tanh, softsign, hardtanh
    head = f"'{layers[0]}' gets {ratio:.1e} of the {label} of '{layers[-1]}'"
    weights_first = evidence["weight_decades_per_layer"] < evidence["activation_decades_per_layer"]
    remedies = []
    if squashing and math.isfinite(sat) and sat >= 0.5 and gain > 1.25 * target:
        remedies.append(
            Remedy(
                init_name,
                f"{head}; {sat:.0%} of {dominant} inputs sit in the flat tails because the "
                f"weights' gain std(W)*sqrt(fan_in) is {gain:.2f}, above the {target:.2f} "
                f"{init_name.replace('_', ' ')} gives",
            )
        )
    if squashing and math.isfinite(sat) and sat >= 0.5:
        remedies.append(
            Remedy(
                "input_scaling",
                f"{head}; {sat:.0%} of {dominant} inputs sit in the flat tails: standardised "
                "inputs and smaller weights bring them back to the slope",
            )
        )
    if math.isfinite(gain) and gain < 0.8 * target and (weights_first or not squashing):
        remedies.append(
            Remedy(
                init_name,
                f"{head}; the weights' gain std(W)*sqrt(fan_in) is {gain:.2f}, below the "
                f"{target:.2f} {init_name.replace('_', ' ')} gives for "
                f"{dominant or 'this activation'}",
            )
        )
    act_costs = evidence["activation_decades_per_layer"] <= math.log10(0.7)
    if squashing and act_costs:
        remedies.append(
            Remedy(
                "relu",
                f"{head}; mean {dominant}'(z) is {deriv:.2f} (at most "
                f"{max_derivative_text(dominant)}), so every layer scales "
                "the gradient down; ReLU's derivative is 1 where active",
            )
        )
        remedies.append(
            Remedy(
                "he_init",
                "with ReLU, He init (gain sqrt 2) keeps the gradient's scale through depth; "
                f"the weights' gain now is {gain:.2f}",
            )
        )
    if squashing and math.isfinite(gain) and gain > 1.25 * target:
        remedies.append(
            Remedy(
                init_name,
                f"the weights' gain std(W)*sqrt(fan_in) is {gain:.2f}, above the {target:.2f} "
                f"{init_name.replace('_', ' ')} gives: pre-activations land where "
                f"{dominant}'(z) is small (mean {deriv:.2f})",
            )
        )
    if math.isfinite(gain) and gain < 0.8 * target:
        remedies.append(
            Remedy(
                init_name,
                f"the weights' gain std(W)*sqrt(fan_in) is {gain:.2f}, below the {target:.2f} "
                f"{init_name.replace('_', ' ')} gives for {dominant or 'this activation'}",
            )
        )
    if not view.normalization_layers:
        remedies.append(
            Remedy(
                "batch_norm",
                "the model has no normalization layer; normalising each layer's input keeps "
                f"pre-activations where the derivative is large (now {per_layer:.1f}x lost per "
                "layer)",
            )
        )
    if view.residual_model is not True:  # a model that has them gets no such advice
        remedies.append(
            Remedy(
                "residual",
                ("the model has no skip connection; " if view.skip_connections is False else "")
                + "skip connections add an identity path, so the gradient "
                f"reaches '{layers[0]}' without passing through every layer",
            )
        )
    if squashing and act_costs and len(layers) >= 6:
        remedies.append(
            Remedy(
                "layerwise_pretraining",
                "pretraining each layer greedily gives "
                "the early layers useful weights before the gradient must reach them",
            )
        )
    return unique(remedies)


def time_cause(view: RunView, layer: str, cell: str, per_step: float) -> tuple[str, dict]:
    """The recurrent weight's scale behind a decay (or growth) through time."""
    scale = view.recurrent_scale(layer)
    sigma = scale.get("sigma_max_recurrent", float("nan"))
    rms = scale.get("rms_singular_value_recurrent", float("nan"))
    if math.isfinite(sigma):
        what = f"the recurrent weight's largest singular value is {sigma:.2f}"
        if math.isfinite(rms):
            what += f" (RMS {rms:.2f})"
    elif math.isfinite(rms):
        what = f"the recurrent weight's RMS singular value is {rms:.2f}"
    else:
        return f"the gradient keeps {per_step:.2g} of itself each step", scale
    if cell == "RNN":
        bound = "at most" if math.isfinite(sigma) else "about"
        what += f"; with the activation's derivative (<= 1) each step scales it by {bound} that"
    return what + f" (measured: {per_step:.2g} per step)", scale


def _through_time(view: RunView, notes: list[str]) -> list[Finding]:
    out = []
    for layer, ratio, T, cell in view.time_profiles():
        if not ratio <= MAX_FIRST_TO_LAST_TIME:
            continue
        per_step = ratio ** (1 / max(T - 1, 1)) if ratio > 0 else 0.0
        if cell in GATED:
            forget = view.facts.get(layer, {}).get("forget_gate_bias", float("nan"))
            advice = (
                f"its forget-gate bias is already {forget:.2g}"
                if math.isfinite(forget) and forget >= 0.5
                else "if the target needs the start of the sequence: forget_gate_bias"
            )
            notes.append(
                f"{layer} ({cell}): the gradient reaching t=0 is {ratio:.1e} of that at "
                f"t={T - 1} ({per_step:.2f}x per step); gated cells learn to keep or forget "
                f"through their gates, so this is not judged a problem ({advice})"
            )
            continue
        cause, scale = time_cause(view, layer, cell, per_step)
        sigma = scale.get("sigma_max_recurrent", scale.get("rms_singular_value_recurrent"))
        remedies = [
            Remedy(
                "lstm",
                f"the gradient at t=0 is {ratio:.1e} of that at t={T - 1}; an LSTM's "
                "additive cell state carries it across time steps",
            ),
            Remedy("gru", "a GRU's gated update also keeps an additive path through time"),
            Remedy(
                "orthogonal_init",
                "an orthogonal recurrent matrix has all singular values 1"
                + (f" (now {sigma:.2f})" if sigma is not None else "")
                + f", where now the gradient keeps {per_step:.2f} of itself each step",
            ),
        ]
        out.append(
            Finding(
                kind="vanishing_gradient",
                layers=[layer],
                severity="critical" if ratio < 1e-8 else "warning",
                message=(
                    f"through time in {layer} ({cell}): the gradient reaching t=0 is "
                    f"{ratio:.1e} of that at t={T - 1} ({per_step:.2f}x per step)"
                ),
                evidence={
                    "first_to_last_ratio_time": ratio,
                    "sequence_length": T,
                    "kept_per_step": per_step,
                    **scale,
                },
                remedies=unique(remedies),
                cause=cause,
            )
        )
    return out
