"""Run a case: train it under ``vanishing.watch`` and diagnose, or inspect it at init."""

from __future__ import annotations

import vanishing
from cases.catalog import Case, Job, train


def run_case(case: Case, run_dir) -> tuple[vanishing.Diagnosis, Job, list[float]]:
    """Train ``case`` for its steps under a monitor; (diagnosis, trained job, losses)."""
    job = case.build()
    with vanishing.watch(job.model, optimizer=job.optimizer, run_dir=run_dir) as mon:
        losses = train(job, case.steps)
        diag = mon.diagnose()
    return diag, job, losses


def inspect_case(case: Case) -> tuple[vanishing.Diagnosis, Job]:
    """``vanishing.inspect`` on the untrained model and its first batch."""
    job = case.build()
    x, y = job.batches[0]
    return vanishing.inspect(job.model, x, y, job.loss_fn), job
