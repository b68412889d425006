"""dead_units: ReLU-like units that are off for every input, so they pass no gradient."""

from __future__ import annotations

from vanishing.diagnose.findings import Finding, Remedy, RuleResult
from vanishing.diagnose.view import RunView, dies_outright

MIN_DEAD = 0.5  # share of a layer's units off for every example, in (nearly) every step
#: The share must hold at this quantile of the window's steps: a dead unit stays dead, while a
#: healthy unit that happens to be off for a whole small batch (chance 0.5^B) is not off in
#: every batch, so small batches do not raise false alarms.
PERSISTENCE_QUANTILE = 0.1
#: Below this many examples per unit in one call, "off for every example" is too likely for a
#: healthy unit (chance 0.5^n) to be called death: such layers get a note instead.
MIN_EXAMPLES = 8


def check(view: RunView) -> RuleResult:
    """The rule: its findings and its notes (see the module doc)."""
    notes: list[str] = []
    return RuleResult(_findings(view, notes), notes)


def _findings(view: RunView, notes: list[str]) -> list[Finding]:
    rows = view.activation_rows()
    rows = rows[rows["act_dead"].notna()]
    # only units that pass no gradient at all when off (ReLU, ReLU6); leaky ReLU, PReLU, ELU and
    # SELU units still pass some
    judged = {n: dies_outright(view.activation_of(n)) for n in rows["layer"].unique()}
    rows = rows[rows["layer"].map(judged).to_numpy(dtype=bool)]
    if rows.empty:
        return []
    small = {
        n
        for n in rows["layer"].unique()
        if (view.by_name.get(n, {}).get("examples_per_unit") or MIN_EXAMPLES) < MIN_EXAMPLES
    }
    if small:
        notes.append(
            f"dead units not judged in {len(small)} layer(s): fewer than {MIN_EXAMPLES} examples "
            "per unit in a batch, where a healthy ReLU unit is off for all of them by chance"
        )
        rows = rows[~rows["layer"].isin(small)]
    if rows.empty:
        return []
    med = rows.groupby("layer")["act_dead"].quantile(PERSISTENCE_QUANTILE)
    bad = med[med >= MIN_DEAD]
    if bad.empty:
        return []
    layers = [n for n in (x["name"] for x in view.layers) if n in bad.index]
    worst = float(bad.max())
    return [
        Finding(
            kind="dead_units",
            layers=layers,
            severity="critical" if worst >= 0.9 else "warning",
            message=f"{worst:.0%} of units output zero for every example in {len(layers)} layer(s)",
            evidence={
                "max_dead_fraction": worst,
                "mean_dead_fraction": float(bad.mean()),
                "first_layer_dead_fraction": float(bad[layers[0]]),
            },
            cause=(
                f"{float(bad[layers[0]]):.0%} of the units after '{layers[0]}' are off for every "
                "example (their input is <= 0: a negative bias or weights pushed there by large "
                "updates)"
                + (
                    f"; the {len(layers) - 1} layer(s) after it see only what is left"
                    if len(layers) > 1
                    else ""
                )
            ),
            per_layer={n: {"dead_fraction": float(bad[n])} for n in layers},
            remedies=[
                Remedy(
                    "leaky_relu",
                    f"{worst:.0%} of units are stuck at 0 with zero gradient; a leaky "
                    "slope lets them recover",
                ),
                Remedy("he_init", "He init with zero biases starts about half the units active"),
                Remedy(
                    "lower_learning_rate",
                    "large updates push biases so negative that units never fire again",
                ),
                Remedy(
                    "batch_norm", "normalising pre-activations keeps units near their threshold"
                ),
            ],
        )
    ]
