"""Diagnosis: rules turn a run's records into findings with evidence and remedies.

:mod:`~vanishing.diagnose.engine` runs the rules on a recorded run (``diagnose_run``);
:mod:`~vanishing.diagnose.inspect` diagnoses a model before training (``inspect``).
"""

from __future__ import annotations

from vanishing.diagnose.engine import MODEL_FACTS, diagnose_run, model_facts
from vanishing.diagnose.findings import KINDS, REMEDIES, Diagnosis, Finding, Remedy
from vanishing.diagnose.inspect import inspect

__all__ = [
    "Diagnosis",
    "Finding",
    "Remedy",
    "KINDS",
    "REMEDIES",
    "MODEL_FACTS",
    "diagnose_run",
    "inspect",
    "model_facts",
]
