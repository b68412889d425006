"""non_finite: NaN or infinity in the loss, a gradient or a weight; where it first appeared."""

from __future__ import annotations

from vanishing.diagnose.findings import Finding, Remedy, RuleResult
from vanishing.diagnose.view import RunView
from vanishing.recorder.semantics import nonfinite_steps


def check(view: RunView) -> RuleResult:
    """The rule: its findings and its notes (see the module doc)."""
    return RuleResult(_findings(view), [])


def _findings(view: RunView) -> list[Finding]:
    s = view.steps
    bad = nonfinite_steps(s)
    if not bad:
        return []
    first = bad[0]
    m = view.metrics
    at = m[(m["step"] == first) & ((m["grad_nonfinite"] > 0) | (m["param_nonfinite"] > 0))]
    at = at.sort_values("depth")
    layers = list(dict.fromkeys(at["layer"].tolist()))
    row = s[s["step"] == first].iloc[0]
    where = f"first in layer {layers[0]!r}" if layers else "in the loss"
    lr = (view.run.manifest.get("optimizer") or {}).get("defaults", {}).get("lr")
    lr_text = f" (lr {lr:g})" if isinstance(lr, (int, float)) else ""
    return [
        Finding(
            kind="non_finite",
            layers=layers,
            severity="critical",
            message=f"NaN/inf appeared at step {first}, {where}; {len(bad)} recorded steps affected",
            evidence={
                "first_step": first,
                "steps_affected": len(bad),
                "grad_nonfinite_at_first": float(row["grad_nonfinite"]),
                "param_nonfinite_at_first": float(row["param_nonfinite"]),
                "loss_nonfinite_at_first": float(row["loss_nonfinite"]),
            },
            remedies=[
                Remedy(
                    "lower_learning_rate",
                    f"values became non-finite at step {first}{lr_text}; "
                    "a smaller step keeps weights in range",
                ),
                Remedy(
                    "gradient_clipping",
                    "clipping the gradient norm bounds each update, so one "
                    "bad batch cannot blow the weights up",
                ),
            ],
        )
    ]
