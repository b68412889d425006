"""stalled_layers: some layers barely change relative to their size while others learn."""

from __future__ import annotations

import math

from vanishing.diagnose.findings import Finding, Remedy
from vanishing.diagnose.view import RunView

MAX_RELATIVE = 1e-3  # a stalled layer's update ratio over the learning layers' (90th percentile)
MIN_LEARNING = 1e-5  # the learning layers' update ratio: they do learn


def check(view: RunView) -> list[Finding]:
    m = view.recent(view.metrics)
    w = m[(m["param"] == "weight") & m["update_ratio"].notna()]
    if w.empty:
        return []
    med = w.groupby("layer")["update_ratio"].median()
    med = med[med.map(math.isfinite)]
    layers = {x["name"] for x in view.layers if x["role"] == "layer"}
    med = med[
        [n in layers and not view.by_name[n]["type"].startswith("Embedding") for n in med.index]
    ]
    if len(med) < 3:
        return []
    typical = float(med.quantile(0.9))
    if not typical >= MIN_LEARNING:
        return []
    stalled = med[med <= typical * MAX_RELATIVE]
    if stalled.empty:
        return []
    layers = [n for n in (x["name"] for x in view.layers) if n in stalled.index]
    slowest = float(stalled.min())
    rel = slowest / typical
    return [
        Finding(
            kind="stalled_layers",
            layers=layers,
            severity="critical" if rel <= 1e-4 else "warning",
            message=(
                f"{len(layers)} layer(s) change {rel:.1e} as fast as the layers that learn "
                f"(update/weight {slowest:.1e} vs {typical:.1e})"
            ),
            evidence={
                "slowest_update_ratio": slowest,
                "typical_update_ratio": typical,
                "relative": rel if math.isfinite(rel) else 0.0,
            },
            remedies=[
                Remedy(
                    "he_init",
                    f"{layers[0]} moves {rel:.1e} as fast as the layers that learn; "
                    "gradients that reach it are too small, and a careful init keeps their scale",
                ),
                Remedy("batch_norm", "normalisation keeps every layer's gradient on one scale"),
                Remedy(
                    "residual", "skip connections deliver gradient straight to the stalled layers"
                ),
                Remedy("layerwise_pretraining", "pretrain the stalled early layers greedily"),
            ],
        )
    ]
