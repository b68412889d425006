"""vanishing_gradient: the gradient shrinks back through depth, or back through time."""

from __future__ import annotations

import math

from vanishing.diagnose.findings import Finding, Remedy, unique
from vanishing.diagnose.view import _BOUNDED, RunView, depth_slope, gain_target

#: each layer back must lose at least this factor (fitted over all hidden layers) ...
MIN_SHRINK_PER_LAYER = 2.0
#: ... and the first hidden layer must get at most this share of the last one's gradient
MAX_FIRST_TO_LAST = 0.1
#: through time: gradient at t=0 over gradient at t=T-1
MAX_FIRST_TO_LAST_TIME = 1e-3


def check(view: RunView) -> list[Finding]:
    return _through_depth(view) + _through_time(view)


def _through_depth(view: RunView) -> list[Finding]:
    label, table = view.depth_signal
    if table.empty or table.shape[1] < 3:
        return []
    slope, span = depth_slope(table)  # decades per layer and in all, first -> last
    ratio = 10**-span  # first hidden layer's gradient over the last one's
    if not (slope >= math.log10(MIN_SHRINK_PER_LAYER) and ratio <= MAX_FIRST_TO_LAST):
        return []
    layers = list(table.columns)
    per_layer = 10**slope
    severity = "critical" if ratio <= 1e-4 else "warning"
    evidence = {
        "first_to_last_ratio": ratio,
        "shrink_per_layer": per_layer,
        "hidden_layers": len(layers),
    }
    remedies = _depth_remedies(view, layers, per_layer, ratio, evidence)
    return [
        Finding(
            kind="vanishing_gradient",
            layers=layers,
            severity=severity,
            message=(
                f"the {label} shrinks {per_layer:.1f}x per layer back through {len(layers)} hidden "
                f"layers: '{layers[0]}' gets {ratio:.1e} of the gradient of '{layers[-1]}'"
            ),
            evidence=evidence,
            remedies=remedies,
        )
    ]


def _depth_remedies(view, layers, per_layer, ratio, evidence) -> list[Remedy]:
    dominant = view.dominant_activation(layers)
    arows = view.activation_rows()
    deriv = float(arows["act_deriv_mean"].median()) if not arows.empty else float("nan")
    gain = view.median_gain(layers)
    target, init_name = gain_target(dominant)
    evidence["median_weight_gain"] = gain
    evidence["mean_activation_derivative"] = deriv
    head = f"'{layers[0]}' gets {ratio:.1e} of the gradient of '{layers[-1]}'"
    remedies = []
    if dominant in _BOUNDED:
        remedies.append(
            Remedy(
                "relu",
                f"{head}; mean {dominant}'(z) is {deriv:.2f} (at most "
                f"{'1/4' if dominant == 'sigmoid' else '1'}), so every layer scales "
                "the gradient down; ReLU's derivative is 1 where active",
            )
        )
        remedies.append(
            Remedy(
                "he_init",
                f"with ReLU, He init (gain sqrt 2) keeps the gradient's "
                f"scale through depth; the weights' gain now is {gain:.2f}",
            )
        )
    if math.isfinite(gain) and gain < 0.8 * target:
        remedies.insert(
            len(remedies) if dominant in _BOUNDED else 0,
            Remedy(
                init_name,
                f"{head}; the weights' gain std(W)*sqrt(fan_in) is "
                f"{gain:.2f}, below the {target:.2f} {init_name.replace('_', ' ')} "
                f"gives for {dominant or 'this activation'}",
            ),
        )
    remedies.append(
        Remedy(
            "batch_norm",
            f"normalising each layer's input keeps pre-activations "
            f"where the derivative is large; the gradient now loses "
            f"{per_layer:.1f}x per layer",
        )
    )
    remedies.append(
        Remedy(
            "residual",
            "skip connections add an identity path, so the gradient "
            f"reaches {layers[0]} without passing through every layer",
        )
    )
    if dominant in _BOUNDED and len(layers) >= 6:
        remedies.append(
            Remedy(
                "layerwise_pretraining",
                "pretraining each layer greedily gives "
                "the early layers useful weights before the gradient must reach them",
            )
        )
    return unique(remedies)


def _through_time(view: RunView) -> list[Finding]:
    out = []
    for layer, ratio, T, cell in view.time_profiles():
        if not ratio <= MAX_FIRST_TO_LAST_TIME:
            continue
        per_step = ratio ** (1 / max(T - 1, 1)) if ratio > 0 else 0.0
        remedies = []
        if cell == "RNN":
            remedies += [
                Remedy(
                    "lstm",
                    f"the gradient at t=0 is {ratio:.1e} of that at t={T - 1}; an LSTM's "
                    "additive cell state carries it across time steps",
                ),
                Remedy("gru", "a GRU's gated update also keeps an additive path through time"),
                Remedy(
                    "orthogonal_init",
                    "an orthogonal recurrent matrix has all singular values "
                    f"1, where now the gradient keeps {per_step:.2f} of itself each step",
                ),
            ]
        if cell == "LSTM":
            remedies.append(
                Remedy(
                    "forget_gate_bias",
                    f"the gradient at t=0 is {ratio:.1e} of "
                    f"that at t={T - 1}; a forget-gate bias of 1-3 keeps the cell "
                    "state (and its gradient) from decaying each step",
                )
            )
        remedies.append(
            Remedy(
                "orthogonal_init",
                "orthogonal recurrent weights preserve the gradient's norm from step to step",
            )
        )
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
                },
                remedies=unique(remedies),
            )
        )
    return out
