"""exploding_gradient: the gradient (or the forward signal) grows layer after layer, or through
time, or updates are as large as the weights themselves."""

from __future__ import annotations

import math

from vanishing.diagnose.findings import Finding, Remedy, unique
from vanishing.diagnose.view import RunView, depth_slope, gain_target

MIN_GROWTH_PER_LAYER = 2.0  # fitted over the hidden layers, going back from the output
MIN_FIRST_TO_LAST = 10.0
MIN_FIRST_TO_LAST_TIME = 1e3
MAX_UPDATE_RATIO = 1.0  # an update as large as the weight it changes


def check(view: RunView) -> list[Finding]:
    return _through_depth(view) + _through_time(view) + _huge_updates(view)


def _through_depth(view: RunView) -> list[Finding]:
    label, table = view.depth_signal
    grows_back = False
    evidence: dict[str, float] = {}
    layers: list[str] = []
    if not table.empty and table.shape[1] >= 3:
        slope, span = depth_slope(table)
        if slope <= -math.log10(MIN_GROWTH_PER_LAYER) and span <= -math.log10(MIN_FIRST_TO_LAST):
            grows_back = True
            layers = list(table.columns)
            evidence.update(first_to_last_ratio=10**-span, growth_per_layer=10**-slope)
    # the forward side: activations whose spread grows geometrically with depth (over-gain init)
    arows = view.activation_rows()
    forward_growth = False
    if not arows.empty:
        order = [n["name"] for n in view.layers]
        std = arows.pivot_table(index="step", columns="layer", values="act_std", aggfunc="mean")
        std = std[[c for c in order if c in std.columns]]
        if std.shape[1] >= 3:
            slope_f, span_f = depth_slope(std)
            if slope_f >= math.log10(MIN_GROWTH_PER_LAYER) and span_f >= 2:
                forward_growth = True
                layers = layers or list(std.columns)
                evidence.update(
                    activation_growth_per_layer=10**slope_f, last_to_first_activation_std=10**span_f
                )
    if not (grows_back or forward_growth):
        return []
    gain = view.median_gain(view.hidden)
    dominant = view.dominant_activation(view.hidden)
    target, init_name = gain_target(dominant)
    evidence["median_weight_gain"] = gain
    what = (
        f"the {label} grows {evidence.get('growth_per_layer', float('nan')):.1f}x per layer "
        "back through depth"
        if grows_back
        else f"activations grow {evidence['activation_growth_per_layer']:.1f}x per layer forward, "
        "and the gradient with them"
    )
    remedies = []
    if math.isfinite(gain) and gain > 1.25 * target:
        remedies.append(
            Remedy(
                init_name,
                f"the weights' gain std(W)*sqrt(fan_in) is {gain:.2f}, "
                f"above the {target:.2f} that {init_name.replace('_', ' ')} gives "
                f"for {dominant or 'this activation'}; each layer amplifies",
            )
        )
    remedies += [
        Remedy("gradient_clipping", f"{what}; clipping the gradient norm bounds each update"),
        Remedy(
            "batch_norm", "normalising each layer's input stops the scale compounding with depth"
        ),
        Remedy(
            "lower_learning_rate",
            "smaller steps keep the amplified gradient from throwing weights out of range",
        ),
    ]
    return [
        Finding(
            kind="exploding_gradient",
            layers=layers,
            severity="critical"
            if evidence.get("first_to_last_ratio", 0) > 1e4
            or evidence.get("last_to_first_activation_std", 0) > 1e4
            else "warning",
            message=what,
            evidence=evidence,
            remedies=unique(remedies),
        )
    ]


def _through_time(view: RunView) -> list[Finding]:
    out = []
    for layer, ratio, T, _cell in view.time_profiles():
        if not ratio >= MIN_FIRST_TO_LAST_TIME:
            continue
        out.append(
            Finding(
                kind="exploding_gradient",
                layers=[layer],
                severity="critical" if ratio > 1e8 or not math.isfinite(ratio) else "warning",
                message=f"through time in {layer}: the gradient at t=0 is {ratio:.1e}x that at t={T - 1}",
                evidence={"first_to_last_ratio_time": ratio, "sequence_length": T},
                remedies=[
                    Remedy(
                        "gradient_clipping",
                        f"the gradient grows {ratio:.1e}x back through {T} steps; "
                        "clipping its norm keeps updates bounded",
                    ),
                    Remedy(
                        "orthogonal_init",
                        "an orthogonal recurrent matrix has singular values 1: "
                        "neither growth nor decay per step",
                    ),
                    Remedy("lstm", "an LSTM's gates control how much of the state flows back"),
                ],
            )
        )
    return out


def _huge_updates(view: RunView) -> list[Finding]:
    m = view.recent(view.metrics)
    w = m[(m["param"] == "weight") & m["update_ratio"].notna()]
    if w.empty:
        return []
    med = w.groupby("layer")["update_ratio"].median()
    big = med[med >= MAX_UPDATE_RATIO]
    if big.empty:
        return []
    layers = [n for n in (x["name"] for x in view.layers) if n in big.index]
    worst = float(big.max())
    return [
        Finding(
            kind="exploding_gradient",
            layers=layers,
            severity="critical",
            message=f"updates are as large as the weights: median |update|/|W| up to {worst:.2g}",
            evidence={"max_update_ratio": worst, "layers_affected": len(layers)},
            remedies=[
                Remedy(
                    "lower_learning_rate",
                    f"each step changes weights by {worst:.2g}x their own "
                    "norm; 1e-3 is typical of stable training",
                ),
                Remedy(
                    "gradient_clipping", "clipping bounds the update whatever the gradient does"
                ),
            ],
        )
    ]
