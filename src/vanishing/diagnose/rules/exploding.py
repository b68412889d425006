"""exploding_gradient: the gradient (or the forward signal) grows layer after layer, or through
time, or updates are as large as the weights themselves."""

from __future__ import annotations

import math

import pandas as pd

from vanishing.diagnose.causes import attribute
from vanishing.diagnose.findings import Finding, Remedy, RuleResult, unique
from vanishing.diagnose.view import RunView, depth_trend, gain_target
from vanishing.recorder.semantics import error_source

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
#: in a stack of repeated blocks (a residual stream), the growth per block on the fitted line
#: that makes an explosion: each block adds its branch's gradient, so a pre-LN stack grows
#: toward its input too, but boundedly (16 blocks: 10x in all, ~1.17x per block), while an
#: unnormalised residual MLP compounds at ~1.7x per block
MIN_GROWTH_PER_BLOCK = 1.25
#: a stack whose blocks normalise (pre-LN: each branch's input; post-LN: each sum) cannot
#: compound its forward signal, so its gradient's growth toward the input is the branches'
#: contributions adding up: trained pre-/post-LN encoders of 6-10 blocks read 10-20x per role
#: while their stream's gradient stays within 10x. Only growth beyond this is an explosion there.
MIN_FIRST_TO_LAST_NORMALIZED_STACK = 100.0
#: an unnormalised stack whose branches trained away from zero (Fixup, ReZero), and a chain of
#: layers each followed by a normalization (VGG-BN), add their gradients up the same bounded
#: way: growth back below the normalised bound, with no forward growth, in a run whose loss fell
#: to at most this share of its initial value, is that (a note); growth that trains this well
#: is not a problem to report
MAX_LOSS_SHARE_BOUNDED_STACK = 0.1


def check(view: RunView) -> RuleResult:
    """The rule: its findings and its notes (see the module doc)."""
    notes: list[str] = []
    found = _through_depth(view, notes) + _through_time(view) + _huge_updates(view)
    return RuleResult(found, notes)


def _through_depth(view: RunView, notes: list[str]) -> list[Finding]:
    label, table = view.depth_signal
    grows_back = False
    evidence: dict[str, float] = {}
    layers: list[str] = []
    blocks = view.depth_unit == "block"
    # along a residual stream each block adds its branch's gradient, so growth toward the input
    # is expected; it is an explosion when it compounds block after block
    rate = math.log10(MIN_GROWTH_PER_BLOCK) if blocks else -math.inf
    normalized_stack = blocks and view.block_norms[0]
    if not table.empty and table.shape[1] >= 3:
        trend = depth_trend(table)
        lim = math.log10(
            MIN_FIRST_TO_LAST_NORMALIZED_STACK if normalized_stack else MIN_FIRST_TO_LAST
        )
        if (
            trend["span"] <= -lim
            and trend["fitted_span"] <= -math.log10(MIN_FITTED_FIRST_TO_LAST)
            and -trend["slope"] >= rate
        ):
            grows_back = True
            layers = list(table.columns)
            evidence.update(
                first_to_last_ratio=10 ** -trend["span"],
                fitted_first_to_last_ratio=10 ** -trend["fitted_span"],
                growth_per_layer=10 ** -trend["slope"],
            )
    # the forward side: activations whose spread grows geometrically with depth (over-gain init)
    forward_growth = False
    std = view.activation_spread
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
            layers = layers or (list(std.columns) if blocks else view.hidden) or list(std.columns)
            evidence.update(
                activation_growth_per_layer=10 ** trend_f["slope"],
                last_to_first_activation_std=10 ** trend_f["span"],
            )
    if not (grows_back or forward_growth):
        return []
    if grows_back and not forward_growth and _bounded_and_training(view, table, evidence, blocks):
        unit, what = ("block", "residual stream") if blocks else ("layer", "normalised layers")
        notes.append(
            f"the {label} grows {evidence['growth_per_layer']:.2f}x per {unit} back through "
            f"{table.shape[1]} {unit}s ({evidence['first_to_last_ratio']:.1f}x first to last, "
            f"under {MIN_FIRST_TO_LAST_NORMALIZED_STACK:g}x) while the loss fell to "
            f"{view.loss_curve['last_over_first']:.2g} of its initial value and the activations "
            f"do not compound: gradients adding up boundedly along the {what}, not an explosion"
        )
        return []
    members = view.members(layers)
    hidden = [n for n in members if n in view.by_name and view.by_name[n]["role"] == "layer"]
    cause, causes, factors = attribute(view, hidden or view.hidden, growing=True)
    evidence.update(causes)
    gain = causes["weight_gain"]
    dominant = view.dominant_activation(hidden or view.hidden)
    target, init_name = gain_target(dominant)
    unit = "block" if blocks else "layer"
    what = (
        f"the {label} grows {evidence['growth_per_layer']:.1f}x per {unit} back through depth"
        if grows_back
        else f"activations grow {evidence['activation_growth_per_layer']:.1f}x per {unit} "
        f"forward ({evidence['last_to_first_activation_std']:.1e}x in all), and the gradient "
        "with them"
    )
    remedies = []
    has_norm, post_ln = view.block_norms
    if blocks:
        evidence["blocks"] = len(view.stack_blocks)
        evidence["normalization_in_blocks"] = float(has_norm)
        cause += (
            f"; compounding across {len(view.stack_blocks)} repeated blocks (compared per role: "
            "each block's layers against the same layers of the other blocks)"
        )
        if not has_norm:
            remedies.append(
                Remedy(
                    "zero_init_residual",
                    f"{what}: each block's branch adds a signal as large as the stream's, so the "
                    "scale compounds block after block; zero-initialising each branch's last "
                    "layer (Fixup, ReZero) starts every block at the identity",
                )
            )
        elif post_ln:
            remedies.append(
                Remedy(
                    "learning_rate_warmup",
                    f"{what} in a post-LN stack; a warm-up keeps the first updates small while "
                    "the gradient is largest",
                )
            )
            remedies.append(
                Remedy(
                    "pre_layer_norm",
                    "normalising each branch's input (pre-LN) instead of the sum keeps the "
                    "stream's gradient bounded with depth",
                )
            )
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
        *(
            []
            if blocks and view.normalization_layers
            else [
                Remedy(
                    "layer_norm" if blocks else "batch_norm",
                    "normalising each layer's input stops the scale compounding with depth",
                )
            ]
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


def _normalized_chain(view: RunView, table: pd.DataFrame) -> bool:
    """A chain of layers each of whose outputs goes straight into a normalization (conv ->
    BatchNorm -> ReLU, as in VGG-BN): its forward signal cannot compound, and batch norm itself
    makes the gradient grow geometrically back through depth (Yang et al. 2019, "A Mean Field
    Theory of Batch Normalization"; ~1.14x per layer measured on Linear-BN-ReLU at width 64)."""
    return not table.empty and all(
        error_source(view.layers, str(c)) != str(c) for c in table.columns
    )


def _bounded_and_training(
    view: RunView, table: pd.DataFrame, evidence: dict[str, float], blocks: bool
) -> bool:
    """Growth toward the input of the two kinds that add up boundedly, an unnormalised residual
    stack's or a normalised chain's, within the normalised stacks' bound while the run trains
    well (see MAX_LOSS_SHARE_BOUNDED_STACK)."""
    if blocks:
        if view.block_norms[0] or view.skip_connections is not True:
            # a normalised stack has its own bound, already applied; repeated blocks without
            # a measured skip connection (or no model to measure it on) are no residual stream
            return False
    elif not _normalized_chain(view, table):
        return False
    fell = view.loss_curve.get("last_over_first")
    return (
        evidence["first_to_last_ratio"] < MIN_FIRST_TO_LAST_NORMALIZED_STACK
        and fell is not None
        and fell <= MAX_LOSS_SHARE_BOUNDED_STACK
    )


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
    # every weight matrix, per unit (a module, or one layer of a stacked recurrent module)
    u = view.weight_units
    w = u[u["update_ratio"].notna()]
    if w.empty:
        return []
    med = w.groupby("unit", sort=False)["update_ratio"].median()
    big = med[med >= MAX_UPDATE_RATIO]
    if big.empty:
        return []
    modules = set(w[w["unit"].isin(big.index)]["layer"])
    layers = [n for n in (x["name"] for x in view.layers) if n in modules]
    worst = float(big.max())
    return [
        Finding(
            kind="exploding_gradient",
            layers=layers,
            severity="critical",
            message=f"updates are as large as the weights: median |update|/|W| up to {worst:.2g}",
            evidence={"max_update_ratio": worst, "layers_affected": len(big)},
            remedies=[
                Remedy(
                    "lower_learning_rate",
                    f"each step changes weights by {worst:.2g}x their own "
                    "norm; 1e-3 is typical of stable training",
                ),
                Remedy(
                    "gradient_clipping", "clipping bounds the update whatever the gradient does"
                ),
                *(
                    [
                        Remedy(
                            "learning_rate_warmup",
                            "a post-LN stack's first updates are its largest; a warm-up "
                            "starts the learning rate small while the optimizer's statistics settle",
                        )
                    ]
                    if view.block_norms[1]
                    else []
                ),
            ],
        )
    ]
