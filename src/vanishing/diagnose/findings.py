"""What a diagnosis says: findings (what, where, how bad, why) and the remedies for each."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

KINDS = (
    "vanishing_gradient",
    "exploding_gradient",
    "saturated_activations",
    "dead_units",
    "stalled_layers",
    "non_finite",
)
REMEDIES = (
    "relu",
    "leaky_relu",
    "prelu",
    "elu",
    "selu",
    "gelu",
    "he_init",
    "xavier_init",
    "orthogonal_init",
    "lecun_init",
    "batch_norm",
    "layer_norm",
    "residual",
    "lstm",
    "gru",
    "gradient_clipping",
    "lower_learning_rate",
    "higher_learning_rate",
    "layerwise_pretraining",
    "input_scaling",
    "forget_gate_bias",
    "pre_layer_norm",
    "learning_rate_warmup",
    "zero_init_residual",
)
SEVERITIES = ("warning", "critical")


@dataclass(frozen=True)
class Remedy:
    """A fix, named from the contract's vocabulary, with one sentence citing the evidence.

    Example:
        >>> from vanishing import Remedy
        >>> Remedy("relu", "mean sigmoid'(z) is 0.19 in every layer").name
        'relu'
    """

    name: str
    why: str

    def __post_init__(self) -> None:
        if self.name not in REMEDIES:
            raise ValueError(f"unknown remedy {self.name!r}")


@dataclass
class Finding:
    """One problem: its kind, the layers (qualified module names), severity and evidence.

    Example:
        >>> from vanishing import Finding, Remedy
        >>> f = Finding("dead_units", ["fc1"], "warning", "60% of units never fire",
        ...             evidence={"max_dead_fraction": 0.6}, remedies=[Remedy("leaky_relu", "...")])
        >>> f.kind, f.evidence["max_dead_fraction"]
        ('dead_units', 0.6)
    """

    kind: str
    layers: list[str]
    severity: str
    message: str
    evidence: dict[str, float] = field(default_factory=dict)
    remedies: list[Remedy] = field(default_factory=list)
    #: the dominant cause, in one sentence citing the measured factor ("" when not attributed)
    cause: str = ""
    #: per layer, the measured factors behind the cause (e.g. ``mean_dphi``, ``weight_gain``)
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        self.evidence = {k: float(v) for k, v in self.evidence.items()}
        self.per_layer = {
            str(k): {s: float(v) for s, v in row.items()} for k, row in self.per_layer.items()
        }

    def _repr_html_(self) -> str:
        """Rich display in Jupyter (see :func:`vanishing.report.notebook.finding_html`)."""
        return _display().finding_html(self)


@dataclass
class Diagnosis:
    """The findings of one run (problems only; ``notes`` holds facts that are not problems).

    Example:
        >>> from vanishing.diagnose.findings import Diagnosis
        >>> diag = Diagnosis(findings=[], notes=["3 steps recorded"])
        >>> diag.healthy, diag.to_dict()["findings"]
        (True, [])
    """

    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    #: ``vanishing.inspect`` on a feed-forward stack: mean-field theory's predicted first/last
    #: gradient ratio and per-layer factors beside the measured ones (see docs/theory.md);
    #: None elsewhere
    theory: dict[str, Any] | None = None

    @property
    def healthy(self) -> bool:
        return not self.findings

    @property
    def kinds(self) -> list[str]:
        """The kinds found, in the order of the findings, each once."""
        return list(dict.fromkeys(f.kind for f in self.findings))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN and infinities become strings)."""
        out = {
            "healthy": self.healthy,
            "findings": [asdict(f) for f in self.findings],
            "notes": list(self.notes),
        }
        if self.theory is not None:
            out["theory"] = self.theory
        return _jsonable(out)

    def __str__(self) -> str:
        lines = []
        if self.healthy:
            lines.append("No gradient-flow problems found.")
        for f in self.findings:
            where = ", ".join(f.layers[:6]) + (" ..." if len(f.layers) > 6 else "")
            lines.append(f"[{f.severity}] {f.kind}: {f.message}")
            if where:
                lines.append(f"    layers: {where}")
            if f.cause:
                lines.append(f"    cause: {f.cause}")
            for r in f.remedies:
                lines.append(f"    -> {r.name}: {r.why}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Rich display in Jupyter: the verdict, each finding and, when the diagnosis has a run,
        its depth profile (see :func:`vanishing.report.notebook.diagnosis_html`)."""
        return _display().diagnosis_html(self)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": JSON has no such numbers
    return value


def unique(remedies: list[Remedy]) -> list[Remedy]:
    """Remedies with each name once, keeping the first (best) reason given for it."""
    seen: set[str] = set()
    out = []
    for r in remedies:
        if r.name not in seen:
            seen.add(r.name)
            out.append(r)
    return out


class RuleResult(NamedTuple):
    """What one rule returns: its findings (problems) and its notes (facts that are not
    problems, for ``Diagnosis.notes``). Rules share no state; the engine collects these.

    Example:
        >>> from vanishing.diagnose.findings import RuleResult
        >>> findings, notes = RuleResult([], ["2 layers not judged"])
        >>> notes
        ['2 layers not judged']
    """

    findings: list[Finding]
    notes: list[str]


def _display():
    """:mod:`vanishing.report.notebook`, looked up when a notebook asks for a display. The
    report reads diagnoses (and runs); the diagnosis does not depend on the report: its display
    hook finds the report module at call time rather than importing it."""
    import importlib

    return importlib.import_module("vanishing.report.notebook")
