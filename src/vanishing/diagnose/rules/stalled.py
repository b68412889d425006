"""stalled_layers: some layers barely change relative to their size while others learn."""

from __future__ import annotations

import math

from vanishing.diagnose.findings import Finding, Remedy, RuleResult
from vanishing.diagnose.view import RunView
from vanishing.recorder.semantics import (
    attention_score_projections,
    is_embedding,
    is_normalization,
    is_weight_param,
)

MAX_RELATIVE = 1e-3  # a stalled layer's update ratio over the learning layers' (90th percentile)
MIN_LEARNING = 1e-5  # the learning layers' update ratio: they do learn
#: a layer whose update is this share of its weight a step is not barely moving, however much
#: faster the others move (a diverging run's layers move 1e2 to 1e8 times their norm)
MAX_STALLED = 1e-3
#: when a stalled layer's gradient (relative to its weight) is this much closer to the learning
#: layers' than its update is, the step size, not the gradient, is what holds it back
LR_GAP = 100.0


def check(view: RunView) -> RuleResult:
    """The rule: its findings and its notes (see the module doc)."""
    notes: list[str] = []
    return RuleResult(_findings(view, notes), notes)


def _judged(layer_type: str) -> bool:
    return not is_embedding(layer_type) and not is_normalization(layer_type)


#: a gain vector this small (RMS) scales the gradient of the branch it multiplies by as much:
#: a layer scale (ConvNeXt starts it at 1e-6, PoolFormer and CaiT at 1e-5)
MAX_GAIN = 1e-2


def _small_gains(view: RunView) -> dict[str, tuple[str, float]]:
    """Per module, the small gain vector it sits behind: ``{module: (gain, rms)}``.

    A gain is a vector or scalar parameter (at most one axis longer than 1: ``[C]``,
    ``[C, 1, 1]``, ``[]``) that is not a bias and not a normalisation's, embedding's or
    activation's, whose RMS at the window's start is below MAX_GAIN. It multiplies the output
    of the layers of its owner module (ConvNeXt's ``layer_scale_parameter`` on
    ``stages.0.layers.0``), or, when its owner has no layer of its own (timm's ``LayerScale``
    module ``ls1``), of its owner's siblings.
    """
    names = [x["name"] for x in view.layers]
    out: dict[str, tuple[str, float]] = {}
    for x in view.layers:
        kind = x.get("type", "")
        if is_normalization(kind) or is_embedding(kind) or x.get("role") == "activation":
            continue
        for p in x.get("params", []):
            shape = [int(d) for d in p.get("shape", [])]
            if p["name"] == "bias" or is_weight_param(p["name"]) and len(shape) >= 2:
                continue  # a layer's own filters, even a [C, 1, 1] depthwise one
            if int(p["numel"]) != max(shape, default=1):
                continue  # a matrix, not a gain (a scalar one, ReZero's alpha, is one)
            norms = view.recent_values(x["name"], p["name"], "param_norm")
            if not len(norms) or not math.isfinite(norms[0]):
                continue
            rms = float(norms[0]) / math.sqrt(int(p["numel"]))
            if rms >= MAX_GAIN:
                continue
            owner = x["name"]
            if not owner:
                continue  # the model's own parameter: which output it scales is not known
            inside = [n for n in names if n.startswith(owner + ".")]
            if not inside:  # a gain module of its own: it scales its siblings' output
                parent = owner.rpartition(".")[0]
                if not parent:
                    continue  # beside everything: which output it scales is not known
                inside = [n for n in names if n.startswith(parent + ".") and n != owner]
            gain = f"{owner}.{p['name']}"
            for n in inside:
                if n not in out or rms < out[n][1]:
                    out[n] = (gain, rms)
    return out


def _structural_roles(
    view: RunView, med, stalled: set[str], module_of: dict[str, str], step_bound
) -> dict[str, list[str]]:
    """Roles of the main stack of blocks that stall in every block they occur in, the last
    block included, held back by their gradient (not their step size), while some other role
    of the stack learns in every block: ``{role: units}``.

    Depth cannot explain such a role: the last block is the one nearest the loss, and the
    other roles of the same blocks learn. What does is how the role's output reaches the loss:
    through a product with another layer's small weights (a DeBERTa's relative-position query
    and key, ConvBERT's span-kernel layers, MobileBERT's shared query/key bottleneck) or a
    saturating step size (Mamba's ``dt_proj``), under SGD at a small init. A role whose step
    size holds it back (a parameter group at a tiny learning rate) stays judged; so do the
    stalled early blocks of a vanishing stack, whose last block learns.
    """
    stack = view.stack
    if len(view.stack_blocks) < 2:
        return {}
    last = len(view.stack_blocks) - 1
    by_role: dict[str, list[tuple[int, str]]] = {}
    for n in med.index:
        entry = stack.get(module_of[n])
        if entry is not None:
            by_role.setdefault(entry[2], []).append((entry[1], n))
    learning = [
        role
        for role, members in by_role.items()
        if not any(n in stalled for _, n in members)
        and {i for i, _ in members} == set(range(last + 1))
    ]
    if not learning:
        return {}
    out: dict[str, list[str]] = {}
    for role, members in by_role.items():
        blocks = {i for i, _ in members}
        units = [n for _, n in members]
        if (
            len(blocks) >= 2
            and last in blocks
            and all(n in stalled for n in units)
            and not any(step_bound(n) for n in units)
        ):
            out[role] = units
    return out


def _findings(view: RunView, notes: list[str]) -> list[Finding]:
    # every weight matrix (weight, weight_ih_l0, in_proj_weight...), per unit: a module, or one
    # layer (rnn.l0) of a stacked recurrent module, so that a stack's lower layer can stall
    u = view.weight_units
    w = u[u["update_ratio"].notna()]
    if w.empty:
        return []
    module_of = dict(zip(u["unit"], u["layer"]))
    med = w.groupby("unit", sort=False)["update_ratio"].median()
    med = med[med.map(math.isfinite)]
    # an embedding is a lookup table whose rows move only when their tokens occur; a
    # normalisation layer's weight is a gain vector started at one, whose update/weight under
    # SGD is lr * |grad| / sqrt(width) whatever the depth (a healthy GPT-2's LayerNorms read
    # ~4e-4 of its matrices'): neither is a step of the gradient's path through depth. Nor
    # are an attention's query and key projections: each one's gradient is proportional to
    # the other's weight, so at a small init they move ~1e-4 as fast as the rest, in every
    # block alike (a stock ELECTRA, BART or Swin under SGD)
    scores = attention_score_projections(x["name"] for x in view.layers)
    med = med[
        [
            _judged(view.by_name[module_of[n]]["type"]) and module_of[n] not in scores
            for n in med.index
        ]
    ]
    # a layer with no gradient in the window (none, or exactly zero at every step) is not slow
    # but unused: not in the forward pass, detached, or its output never reaches the loss (a
    # stock Longformer's last local value projection, when only the global token is read)
    reached = (u["grad_norm"].fillna(0.0) != 0).groupby(u["unit"]).any()
    silent = [n for n in med.index if not reached.get(n, True)]
    if silent:
        notes.append(
            f"{len(silent)} layer(s) received no gradient in the window ("
            + ", ".join(f"'{n}'" for n in silent[:5])
            + (", ..." if len(silent) > 5 else "")
            + "): not used in the forward pass, or their output does not reach the loss "
            "(detached, or read by nothing the loss depends on); not judged as stalled"
        )
        med = med.drop(silent)
    if len(med) < 3:
        return []
    typical = float(med.quantile(0.9))
    if not typical >= MIN_LEARNING:
        return []
    stalled = med[(med <= typical * MAX_RELATIVE) & (med < MAX_STALLED)]
    if stalled.empty:
        return []
    grads = w.groupby("unit")["grad_ratio"].median()
    grads = grads[grads.index.isin(med.index)]
    typical_grad = float(grads.quantile(0.9)) if not grads.empty else float("nan")

    def relative_gradient(n: str) -> float:
        g = float(grads.get(n, float("nan")))
        return g / typical_grad if typical_grad > 0 else float("nan")

    def step_bound(n: str) -> bool:
        # the gradient alone would not stall it, yet the update is far smaller than it says
        rel_grad, rel_update = relative_gradient(n), float(med[n]) / typical
        return (
            math.isfinite(rel_grad) and rel_grad > MAX_RELATIVE and rel_grad >= LR_GAP * rel_update
        )

    gains = _small_gains(view)
    gated = [n for n in stalled.index if module_of[n] in gains and not step_bound(n)]
    if gated:
        behind: dict[tuple[str, float], list[str]] = {}
        for n in gated:
            behind.setdefault(gains[module_of[n]], []).append(n)
        notes.append(
            f"{len(gated)} layer(s) move slowly behind a small gain: "
            + ", ".join(f"'{g}' (RMS {r:.1e})" for g, r in list(behind)[:3])
            + (", ..." if len(behind) > 3 else "")
            + " multiplies their output, so their gradient is scaled by as much until the "
            "gain grows (a layer scale, started small on purpose: AdamW, which these models "
            "train with, moves it at its learning rate from the first step); not judged as "
            "stalled"
        )
        stalled = stalled.drop(gated)
        if stalled.empty:
            return []
    structural = _structural_roles(view, med, set(stalled.index), module_of, step_bound)
    if structural:
        notes.append(
            "; ".join(
                f"'{role}' moves {float(med[units].median()) / typical:.1e} as fast as the layers "
                f"that learn in all {len(units)} blocks alike, the last one too, while the other "
                "roles of those blocks learn"
                for role, units in structural.items()
            )
            + ": a property of the role (its output enters the loss through another layer's "
            "weights: attention scores, a gate, a step size) under this optimizer, not a "
            "gradient lost through depth; not judged as stalled"
        )
        stalled = stalled.drop([n for units in structural.values() for n in units])
        if stalled.empty:
            return []
    order = {x["name"]: i for i, x in enumerate(view.layers)}
    units = sorted(stalled.index, key=lambda n: (order.get(module_of[n], 0), n))
    layers = list(dict.fromkeys(module_of[n] for n in units))
    slowest = float(stalled.min())
    rel = slowest / typical
    per_layer = {
        n: {
            "update_ratio": float(med[n]),
            "relative_update": float(med[n]) / typical,
            "relative_gradient": relative_gradient(n),
        }
        for n in units
    }
    first = units[0]
    rel_grad = per_layer[first]["relative_gradient"]
    rel_first = per_layer[first]["relative_update"]
    zero = (
        " (below float32's resolution of the weight: the update rounds away)"
        if slowest == 0
        else ""
    )
    if step_bound(first):
        cause = (
            f"step size: '{first}' gets {rel_grad:.1e} of the learning layers' gradient (relative "
            f"to its weight) but moves only {rel_first:.1e} as fast: its learning rate (parameter "
            "group) or optimizer state holds it back, not the gradient"
        )
        remedies = [
            Remedy(
                "higher_learning_rate",
                f"'{first}' receives a normal gradient ({rel_grad:.1e} of the others') yet moves "
                f"{rel_first:.1e} as fast: give its parameter group the learning rate of the rest",
            ),
        ]
    else:
        cause = (
            f"gradient: '{first}' gets {rel_grad:.1e} of the learning layers' gradient (relative to "
            f"its weight), so it moves {rel_first:.1e} as fast"
        )
        remedies = [
            Remedy(
                "he_init",
                f"'{first}' moves {rel_first:.1e} as fast as the layers that learn because only "
                f"{rel_grad:.1e} of their gradient reaches it; a careful init keeps its scale",
            ),
            Remedy("batch_norm", "normalisation keeps every layer's gradient on one scale"),
            *(
                []
                if view.residual_model
                else [
                    Remedy(
                        "residual",
                        "skip connections deliver gradient straight to the stalled layers",
                    )
                ]
            ),
            Remedy("layerwise_pretraining", "pretrain the stalled early layers greedily"),
        ]
    return [
        Finding(
            kind="stalled_layers",
            layers=layers,
            severity="critical" if rel <= 1e-4 else "warning",
            message=(
                f"{len(units)} layer(s) barely move"
                + (f" ({', '.join(units)})" if units != layers else "")
                + f": median update/weight {slowest:.1e}{zero}, "
                f"{rel:.1e} of the {typical:.1e} of the layers that learn"
            ),
            evidence={
                "slowest_update_ratio": slowest,
                "typical_update_ratio": typical,
                "relative": rel if math.isfinite(rel) else 0.0,
                "relative_gradient_first": rel_grad,
            },
            remedies=remedies,
            cause=cause,
            per_layer=per_layer,
        )
    ]
