"""vanishing_gradient: the gradient shrinks back through depth, or back through time."""

from __future__ import annotations

import math

import numpy as np

from vanishing.diagnose.causes import attribute
from vanishing.diagnose.findings import Finding, Remedy, RuleResult, unique
from vanishing.diagnose.view import (
    MIN_LOSS_STEPS,
    RunView,
    depth_trend,
    gain_target,
    is_squashing,
    max_derivative_text,
)
from vanishing.recorder.semantics import is_normalization

#: the first hidden layer gets at most this share of the last hidden layer's gradient (per unit)
MAX_FIRST_TO_LAST = 0.1
#: ... and the least-squares line through all hidden layers confirms a shrink (so one outlying
#: endpoint cannot make the finding); a little looser, the fit smooths the endpoints
MAX_FITTED_FIRST_TO_LAST = 0.2
#: a gradient shrinking before a final norm is the activations' scale only while the first
#: layers' weight gradient (relative to the weight) is at least this share of the output
#: layer's: the stalled rule's line (an output layer's reads 10-100x a healthy hidden one's)
MIN_HEAD_SHARE = 1e-3
#: the activations keep their spread forward when it shrinks by less than this factor per
#: layer (the least-squares line through the forward profile): not the geometric shrink of an
#: init gain below the activation's (PyTorch's default init under ReLU: 2.1-2.4x a layer, and
#: then every layer learns slowly, the first as slowly as the last); a torchvision VGG-16's
#: 1.2x a layer (its small-init classifier) is not that
MAX_FORWARD_SHRINK_PER_LAYER = 1.5
#: through time (plain RNN cells): gradient at t=0 over gradient at t=T-1
MAX_FIRST_TO_LAST_TIME = 1e-3
#: gated cells (LSTM, GRU) whose profile decays are a finding only when the loss also sits at
#: its initial plateau (RunView.loss_curve); else a note: the gates may rightly forget
GATED = ("LSTM", "GRU")
#: a forget-gate (GRU: update-gate) bias from this on counts as set (Gers et al. use 1; PyTorch's
#: default init averages 0), so it is not advised again
KEEP_GATE_BIAS = 0.5


def check(view: RunView) -> RuleResult:
    """The rule: its findings and its notes (see the module doc)."""
    notes: list[str] = []
    found = _through_depth(view, notes) + _through_time(view, notes)
    notes.extend(_stack_notes(view))
    return RuleResult(found, notes)


def _stack_notes(view: RunView) -> list[str]:
    """Per stacked recurrent module (``nn.LSTM(num_layers=2)``): each layer's weight gradient
    and update size, shown apart (torch runs the layers as one module, the records keep their
    parameters apart), and what the time profile of the stack does and does not show."""
    out = []
    for x in view.layers:
        if not x.get("recurrent"):
            continue
        stack = view.recurrent_stack(x["name"])
        if not stack:
            continue
        subs = [k.rpartition(".")[2] if x["name"] else k for k in stack]
        grads = ", ".join(f"{s} {v['weight_grad_norm']:.2g}" for s, v in zip(subs, stack.values()))
        ups = ", ".join(f"{s} {v['update_ratio']:.2g}" for s, v in zip(subs, stack.values()))
        low = next(iter(stack.values()))["grad_vs_top_layer"]
        forward = [s for s in subs if not s.endswith("_reverse")]  # l0 against the top layer
        both = " bidirectional" if len(forward) < len(subs) else ""
        out.append(
            f"{x['name'] or 'the model'} ({x.get('type', '')}, {len(forward)}{both} stacked "
            f"layers), per layer: weight gradient {grads} ({forward[0]} gets {low:.2g}x of "
            f"{forward[-1]}'s), update/weight {ups}; its time profile is measured at the stack's input, through "
            "every layer: torch runs the layers in one fused op, so no profile per layer "
            "through time is recorded"
        )
    return out


def _after_last_hidden(view: RunView) -> list[dict]:
    """The layers after the last hidden layer, in forward order (empty when there is none)."""
    hidden = view.hidden
    names = [x["name"] for x in view.layers]
    if not hidden or hidden[-1] not in names:
        return []
    return view.layers[names.index(hidden[-1]) + 1 :]


def _output_layer(view: RunView) -> str | None:
    """The output layer: the first parameter-owning layer after the last hidden one that is
    not a normalisation layer (None when there is none)."""
    for x in _after_last_hidden(view):
        if (x.get("num_params") or 0) > 0 and not is_normalization(x.get("type", "")):
            return x["name"]
    return None


def _normalised_before_head(view: RunView) -> tuple[str, str] | None:
    """``(norm, head)``: the normalisation layer between the last hidden layer and the output
    layer, outside the model's stack of blocks (PoolFormer's ``norm``, a ViT's final LayerNorm,
    a chain's last BatchNorm), and that output layer; or None. With such a norm the loss does
    not depend on the scale the hidden layers hand on, so a gradient that shrinks back toward
    the input may only mirror activations that shrink forward."""
    head = _output_layer(view)
    norm = None
    for x in _after_last_hidden(view):
        if x["name"] == head:
            return (norm, head) if norm is not None else None
        if is_normalization(x.get("type", "")):
            if x["name"] in view.stack:
                return None
            norm = norm or x["name"]
    return None


def _finite_positive(table) -> bool:
    """Every recorded (non-NaN) entry of a step x layer table is finite and above zero."""
    values = table.to_numpy(dtype=float)
    recorded = values[~np.isnan(values)]
    return bool(np.isfinite(recorded).all() and (recorded > 0).all())


def _forward_spread_kept(view: RunView) -> float | None:
    """The factor by which the activations' spread changes per layer forward (least-squares
    line through :attr:`RunView.activation_spread`) when it shrinks by less than
    :data:`MAX_FORWARD_SHRINK_PER_LAYER`: no geometric shrink of the forward signal. None when
    it shrinks faster, or is not recorded at three or more activations (nothing is known)."""
    std = view.activation_spread
    if std.shape[1] < 3 or not _finite_positive(std):
        return None
    per_layer = 10 ** depth_trend(std)["slope"]
    if not math.isfinite(per_layer) or per_layer < 1 / MAX_FORWARD_SHRINK_PER_LAYER:
        return None
    return per_layer


def _relative_weight_gradient_ratio(view: RunView, head: str) -> float | None:
    """The first hidden layer's (or block's, role by role) weight gradient relative to its
    weight, over the last one's: the least-squares line's first/last (as for the depth
    signals). None where fewer than three are recorded, or where the first layers do not
    learn at least MIN_HEAD_SHARE as fast as the output layer ``head`` (relative to their
    weights): a profile of gradients that are all tiny (a stock EfficientNet's blocks at init,
    1e-35 of their weights, its BatchNorm gains drawn from N(0, 0.02)) says nothing of health."""
    table = view.profile("grad_ratio", "weight")
    if table.empty:
        return None
    table = table.dropna(axis=1, how="all")
    if not _finite_positive(table):
        return None  # an exactly zero (underflowed) weight gradient learns nothing
    head_rate = view.recent_values(head, "weight", "grad_ratio")
    head_rate = head_rate[np.isfinite(head_rate)]
    if view.depth_unit == "block":
        first_cols = [c for c in table.columns if view.stack.get(c, ("", -1, ""))[1] == 0]
    else:
        first_cols = list(table.columns[:1])
    first_rate = float(np.nanmedian(table[first_cols].to_numpy(dtype=float))) if first_cols else 0.0
    if not len(head_rate) or not first_rate >= MIN_HEAD_SHARE * float(np.median(head_rate)):
        return None
    if view.depth_unit == "block":
        table = view.by_block(table)
    if table.shape[1] < 3:
        return None
    fitted = depth_trend(table)["fitted_span"]
    return 10**-fitted if math.isfinite(fitted) else None


def _through_depth(view: RunView, notes: list[str]) -> list[Finding]:
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
    end = _normalised_before_head(view)
    head = end[1] if end is not None else _output_layer(view)
    relative = _relative_weight_gradient_ratio(view, head) if head is not None else None
    if relative is not None and relative > MAX_FITTED_FIRST_TO_LAST:
        shown = (
            f"the {label} shrinks back through depth ('{layers[0]}' gets {ratio:.1e} of what "
            f"'{layers[-1]}' gets), but the layers' weight gradients relative to their weights do "
            f"not (first / last {relative:.2g})"
        )
        if end is not None:
            # each layer's weight gradient is its error signal times its input: when the
            # inputs grow toward the input as the error signal shrinks, the first layers learn
            # as fast relative to their weights as the last (PoolFormer at init: error signal
            # 1/74 of the last stage's, relative weight gradient 2.5x); the norm makes that
            # scale harmless
            notes.append(
                f"{shown}: the activations shrink forward by as much, and '{end[0]}' before "
                "the output layer makes the loss independent of their scale; the first layers "
                "learn as fast as the last, so this is no vanishing gradient"
            )
            return []
        kept = _forward_spread_kept(view)
        if kept is not None:
            # the activations keep their spread forward (He init, a norm in every layer), so
            # the decline is in the gradient per entry, not in how fast the layers learn: each
            # pooling or stride hands it to more positions, a norm divides it by its input's
            # spread (VGG-16 at torchvision's init: the first conv's error signal per entry
            # 1/30 of the classifier's, its weight gradient relative to the weight 1.2x)
            notes.append(
                f"{shown}, and the activations keep their spread forward ({kept:.2f}x per "
                f"{'block' if view.depth_unit == 'block' else 'layer'}): what shrinks is the "
                "gradient per entry (pooling and strides spread it over more positions, a "
                "norm divides it by its input's spread), not the layers' speed; the first "
                "layers learn as fast as the last, so this is no vanishing gradient"
            )
            return []
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
    remedies = _depth_remedies(
        view, members, per_layer, ratio, evidence, label, (layers[0], layers[-1])
    )
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
                f"'{layers[0]}' gets {ratio:.1e} of the {label} of '{layers[-1]}'"
            ),
            evidence=evidence,
            remedies=remedies,
            cause=cause,
            per_layer=factors,
        )
    ]


def _depth_remedies(view, layers, per_layer, ratio, evidence, label, ends) -> list[Remedy]:
    # ``layers``: the hidden layers judged; ``ends``: the first and last unit the finding
    # names (a block of a repeated stack, or a layer), so its remedies name them the same way
    dominant = view.dominant_activation(layers)
    deriv = evidence["mean_dphi"]
    gain = evidence["weight_gain"]
    sat = evidence["saturated_fraction"]
    target, init_name = gain_target(dominant)
    squashing = is_squashing(dominant)  # sigmoid, tanh, softsign, hardtanh
    head = f"'{ends[0]}' gets {ratio:.1e} of the {label} of '{ends[-1]}'"
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
                f"reaches '{ends[0]}' without passing through every layer",
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
            curve = view.loss_curve
            if curve.get("plateau"):
                out.append(_gated_plateau(view, layer, cell, ratio, T, per_step, curve))
                continue
            forget = view.facts.get(layer, {}).get("forget_gate_bias", float("nan"))
            gate = "update-gate" if cell == "GRU" else "forget-gate"
            advice = (
                f"its {gate} bias is already {forget:.2g}"
                if math.isfinite(forget) and forget >= KEEP_GATE_BIAS
                else "if the target needs the start of the sequence: forget_gate_bias"
            )
            why = (
                "the loss is still falling"
                if curve
                else f"fewer than {MIN_LOSS_STEPS} steps: no loss curve to read"
            )
            notes.append(
                f"{layer} ({cell}): the gradient reaching t=0 is {ratio:.1e} of that at "
                f"t={T - 1} ({per_step:.2f}x per step); gated cells learn to keep or forget "
                f"through their gates, so this is not judged a problem while the loss does "
                f"not sit at its initial plateau ({why}; {advice})"
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


def _gated_plateau(view, layer, cell, ratio, T, per_step, curve) -> Finding:
    """An LSTM/GRU whose gradient through time decays below the bound while the loss sits at
    its initial plateau: the outcome shows that what the gates forget was needed."""
    facts = view.facts.get(layer, {})
    forget = facts.get("forget_gate_bias", float("nan"))
    per_layer_bias = {k: v for k, v in facts.items() if k.startswith("forget_gate_bias_")}
    gate = "update gate" if cell == "GRU" else "forget gate"
    head = (
        f"the loss has stayed at {curve['last_over_first']:.0%} of its initial value (it fell "
        f"{1 - curve['last_over_window_start']:.0%} over the last half of the run) while the "
        f"gradient reaching t=0 is {ratio:.1e} of that at t={T - 1}"
    )
    remedies = []
    if math.isfinite(forget) and forget >= KEEP_GATE_BIAS:
        known = f"its {gate} bias is already {forget:.2g}"
    elif math.isfinite(forget):
        known = f"its {gate} bias is {forget:.2g}"
        remedies.append(
            Remedy(
                "forget_gate_bias",
                f"{head}; the {gate} bias is {forget:.2g} (about {_sigmoid(forget):.2f} of the "
                "state kept per step): a bias of 1 or more keeps the state, and the gradient, "
                "across many more steps",
            )
        )
    else:
        known = f"its {gate} bias is not in the records (diagnose with the model to measure it)"
        remedies.append(
            Remedy(
                "forget_gate_bias",
                f"{head}; unless it is already set: a {gate} bias of 1 or more keeps the state, "
                "and the gradient, across many more steps (the records do not show the gate's "
                "bias; load_run(RUN).diagnose(model) measures it)",
            )
        )
    remedies += [
        Remedy(
            "higher_learning_rate",
            f"{head}; the signal from the distant inputs is that small a share of each "
            "gradient, so larger steps (with clipping) are what move the model off the plateau",
        ),
        Remedy(
            "gradient_clipping",
            "clipping the gradient norm keeps the larger steps safe when the loss leaves the "
            "plateau and the gradient spikes",
        ),
    ]
    evidence = {
        "first_to_last_ratio_time": ratio,
        "sequence_length": T,
        "kept_per_step": per_step,
        "loss_last_over_first": curve["last_over_first"],
        "loss_last_over_window_start": curve["last_over_window_start"],
        **({"forget_gate_bias": forget} if math.isfinite(forget) else {}),
        **per_layer_bias,
    }
    return Finding(
        kind="vanishing_gradient",
        layers=[layer],
        severity="critical" if ratio < 1e-8 else "warning",
        message=(
            f"through time in {layer} ({cell}): the gradient reaching t=0 is {ratio:.1e} of that "
            f"at t={T - 1} ({per_step:.2f}x per step) and the loss sits at its initial plateau"
        ),
        evidence=evidence,
        remedies=unique(remedies),
        cause=(
            f"the gates forget: {known}, and the gradient keeps {per_step:.2f} of itself per "
            f"step back through time; the loss at {curve['last_over_first']:.0%} of its initial "
            "value shows that the start of the sequence was needed"
        ),
        per_layer=view.recurrent_stack(layer),
    )


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))
