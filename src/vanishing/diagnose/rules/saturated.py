"""saturated_activations: a bounded activation spends most inputs in its flat tails."""

from __future__ import annotations

from vanishing.diagnose.findings import Finding, Remedy
from vanishing.diagnose.view import RunView

MIN_SATURATED = 0.5  # share of entries with phi' below 5% of its maximum, median over the window


def check(view: RunView) -> list[Finding]:
    rows = view.activation_rows()
    rows = rows[rows["act_saturated"].notna()]
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
                Remedy(
                    "input_scaling",
                    f"{worst:.0%} of pre-activations are far from 0; standardised "
                    "inputs and smaller weights bring them back to the slope",
                ),
                Remedy(
                    "xavier_init",
                    "Xavier init sizes weights so pre-activations stay in the "
                    f"{kind}'s linear range",
                ),
                Remedy(
                    "batch_norm",
                    "normalising pre-activations keeps them centred where the derivative is large",
                ),
                Remedy("relu", "ReLU has no upper tail to saturate in"),
            ],
        )
    ]
