"""exploding_gradient: the gradient (or the forward signal) grows layer after layer, or through
time, or updates are as large as the weights themselves."""

from __future__ import annotations

import math

from vanishing.diagnose.causes import attribute
from vanishing.diagnose.findings import Finding, Remedy, RuleResult, unique
from vanishing.diagnose.view import RunView, depth_trend, gain_target

#: the first hidden layer gets at least this multiple of the last one's gradient (per unit),
#: as measured and on the least-squares line through the hidden layers
MIN_FIRST_TO_LAST = 10.0
MIN_FITTED_FIRST_TO_LAST = 5.0  # the fitted line confirms the growth (it smooths the endpoints)
#: or the activations' spread grows geometrically forward: at least this much per layer (fitted)
#: and at least MIN_FIRST_TO_LAST in all, measured and fitted
MIN_ACTIVATION_GROWTH_PER_LAYER = 1.5
#: through time: gradient at t=0 over that at t=T-1, measured and on the fitted line (a healthy
#: or learning RNN gives early steps at most a few times the last one's gradient)
MIN_FIRST_TO_LAST_TIME = 10.0
#: gated cells (LSTM, GRU): their input-gradient profile also reflects which inputs the learned
#: gates keep (a trained cell may rightly weigh the first steps more), so only gross growth counts
MIN_FIRST_TO_LAST_TIME_GATED = 1e3
MAX_UPDATE_RATIO = 1.0  # an update as large as the weight it changes


def check(view: RunView) -> RuleResult:
    """The rule: its findings and its notes (see the module doc)."""
    return RuleResult(_through_depth(view) + _through_time(view) + _huge_updates(view), [])


def _through_depth(view: RunView) -> list[Finding]:
    label, table = view.depth_signal
    grows_back = False
    evidence: dict[str, float] = {}
    layers: list[str] = []
    if not table.empty and table.shape[1] >= 3:
        trend = depth_trend(table)
        lim = math.log10(MIN_FIRST_TO_LAST)
        if trend["span"] <= -lim and trend["fitted_span"] <= -math.log10(MIN_FITTED_FIRST_TO_LAST):
            grows_back = True
            layers = list(table.columns)
            evidence.update(
                first_to_last_ratio=10 ** -trend["span"],
                fitted_first_to_last_ratio=10 ** -trend["fitted_span"],
                growth_per_layer=10 ** -trend["slope"],
            )
    # the forward side: activations whose spread grows geometrically with depth (over-gain init)
    arows = view.activation_rows()
    forward_growth = False
    if not arows.empty:
        order = [n["name"] for n in view.layers]
        std = arows.pivot_table(index="step", columns="layer", values="act_std", aggfunc="mean")
        std = std[[c for c in order if c in std.columns]]
        if std.shape[1] >= 3:
            trend_f = depth_trend(std)
            lim = math.log10(MIN_FIRST_TO_LAST)
            per_layer = math.log10(MIN_ACTIVATION_GROWTH_PER_LAYER)
            if (
                trend_f["span"] >= lim
                and trend_f["fitted_span"] >= math.log10(MIN_FITTED_FIRST_TO_LAST)
                and trend_f["slope"] >= per_layer
            ):
                forward_growth = True
                layers = layers or [n for n in view.hidden] or list(std.columns)
                evidence.update(
                    activation_growth_per_layer=10 ** trend_f["slope"],
                    last_to_first_activation_std=10 ** trend_f["span"],
                )
    if not (grows_back or forward_growth):
        return []
    hidden = [n for n in layers if n in view.by_name and view.by_name[n]["role"] == "layer"]
    cause, causes, factors = attribute(view, hidden or view.hidden, growing=True)
    evidence.update(causes)
    gain = causes["weight_gain"]
    dominant = view.dominant_activation(view.hidden)
    target, init_name = gain_target(dominant)
    what = (
        f"the {label} grows {evidence['growth_per_layer']:.1f}x per layer back through depth"
        if grows_back
        else f"activations grow {evidence['activation_growth_per_layer']:.1f}x per layer forward "
        f"({evidence['last_to_first_activation_std']:.1e}x in all), and the gradient with them"
    )
    remedies = []
    if math.isfinite(gain) and gain > 1.25 * target:
        remedies.append(
            Remedy(
                init_name,
                f"{what}; the weights' gain std(W)*sqrt(fan_in) is {gain:.2f}, "
                f"above the {target:.2f} that {init_name.replace('_', ' ')} gives "
                f"for {dominant or 'this activation'}, so each layer amplifies",
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
            cause=cause,
            per_layer=factors,
        )
    ]


def _through_time(view: RunView) -> list[Finding]:
    out = []
    from vanishing.diagnose.rules.vanishing import time_cause

    for layer, ratio, T, cell in view.time_profiles():
        gated = cell in ("LSTM", "GRU")
        bound = MIN_FIRST_TO_LAST_TIME_GATED if gated else MIN_FIRST_TO_LAST_TIME
        if not (ratio >= bound and view.time_trend(layer) >= bound):
            continue
        per_step = ratio ** (1 / max(T - 1, 1)) if math.isfinite(ratio) else math.inf
        cause, scale = time_cause(view, layer, cell, per_step)
        out.append(
            Finding(
                kind="exploding_gradient",
                layers=[layer],
                severity="critical" if ratio > 1e4 or not math.isfinite(ratio) else "warning",
                message=f"through time in {layer}: the gradient at t=0 is {ratio:.1e}x that at t={T - 1}",
                evidence={
                    "first_to_last_ratio_time": ratio,
                    "sequence_length": T,
                    "growth_per_step": per_step,
                    **scale,
                },
                cause=cause,
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
