"""saturated_activations: a bounded activation spends most inputs in its flat tails."""

from __future__ import annotations

import math

from vanishing.diagnose.findings import Finding, Remedy, RuleResult
from vanishing.diagnose.view import RunView, dies_outright, gain_target

MIN_SATURATED = 0.5  # share of entries with phi' below 5% of its maximum, median over the window


def check(view: RunView) -> RuleResult:
    """The rule: its findings and its notes (see the module doc)."""
    return RuleResult(_findings(view), [])


def _findings(view: RunView) -> list[Finding]:
    rows = view.activation_rows()
    rows = rows[rows["act_saturated"].notna()]
    # ReLU6's recorded share counts its off side (z <= 0), which is a ReLU's normal half, not a
    # flat tail: activations whose units die outright are judged by dead_units instead
    judged = {n: not dies_outright(view.activation_of(n)) for n in rows["layer"].unique()}
    rows = rows[rows["layer"].map(judged).to_numpy(dtype=bool)]
    if rows.empty:
        return []
    med = rows.groupby("layer")[["act_saturated", "act_deriv_mean", "act_mean"]].median()
    bad = med[med["act_saturated"] >= MIN_SATURATED]
    if bad.empty:
        return []
    order = [x["name"] for x in view.layers]
    layers = [n for n in order if n in bad.index]
    worst = float(bad["act_saturated"].max())
    kind = view.by_name[layers[0]].get("activation") or "activation"
    cause, per_layer, input_first = _cause(view, layers, bad, kind)
    scaling = Remedy(
        "input_scaling",
        f"{worst:.0%} of {kind} inputs sit in the flat tails; standardised inputs "
        "(zero mean, unit variance) bring the pre-activations back to the slope",
    )
    target, init_name = gain_target(kind)
    init = Remedy(
        init_name,
        f"{init_name.replace('_', ' ')} sizes weights (gain {target:.2f}) so pre-activations "
        f"stay in the {kind}'s linear range",
    )
    return [
        Finding(
            kind="saturated_activations",
            layers=layers,
            severity="critical" if worst >= 0.9 else "warning",
            message=(
                f"{worst:.0%} of {kind} inputs sit in the flat tails (derivative < 5% of its max) "
                f"in {len(layers)} layer(s)"
            ),
            evidence={
                "max_saturated_fraction": worst,
                "mean_saturated_fraction": float(bad["act_saturated"].mean()),
                "min_mean_derivative": float(bad["act_deriv_mean"].min()),
            },
            remedies=[
                *([scaling, init] if input_first else [init, scaling]),
                Remedy(
                    "batch_norm",
                    "normalising pre-activations keeps them centred where the derivative is large",
                ),
                Remedy("relu", f"ReLU has no upper tail to saturate in, unlike {kind}"),
            ],
            cause=cause,
            per_layer=per_layer,
        )
    ]


def _cause(view: RunView, layers: list[str], bad, kind: str) -> tuple[str, dict, bool]:
    """Input scale when the saturated layer is fed by a weight of normal gain (so its inputs are
    too large), weight scale when that weight's gain is well above the careful init's."""
    owner = {act: layer for layer, act in view.activation_after.items()}
    per_layer: dict[str, dict[str, float]] = {}
    for act in layers:
        layer = owner.get(act)
        gain = view.weight_gain(layer) if layer else float("nan")
        per_layer[act] = {
            "saturated_fraction": float(bad.loc[act, "act_saturated"]),
            "mean_dphi": float(bad.loc[act, "act_deriv_mean"]),
            "weight_gain": gain,
        }
    first = layers[0]
    target, init_name = gain_target(kind)
    gain = per_layer[first]["weight_gain"]
    sat = per_layer[first]["saturated_fraction"]
    layer = owner.get(first)
    fed_by_input = layer is not None and layer == next(
        (x["name"] for x in view.layers if x["num_params"] > 0), None
    )
    if math.isfinite(gain) and gain > 1.25 * target:
        return (
            f"weight scale: '{layer}' has gain std(W)*sqrt(fan_in) {gain:.2f}, above the "
            f"{target:.2f} {init_name.replace('_', ' ')} gives, so {sat:.0%} of its "
            f"pre-activations land in the {kind}'s tails",
            per_layer,
            False,
        )
    if fed_by_input:
        return (
            f"input scale: the first layer '{layer}' has a normal weight gain ({gain:.2f}), yet "
            f"{sat:.0%} of its pre-activations land in the {kind}'s tails: the inputs are too large",
            per_layer,
            True,
        )
    return (
        f"pre-activations too large in '{first}' ({sat:.0%} in the tails) with weight gain "
        f"{gain:.2f}: the scale of its inputs from the layers before",
        per_layer,
        True,
    )
