"""The labelled benchmark (tests/cases/): every case's diagnosis finds each kind its label
requires and nothing beyond the kinds it allows, after training under ``vanishing.watch`` and,
where the label already holds at initialisation, from ``vanishing.inspect`` before training.

Each label is first confirmed by an independent plain-torch computation (tests/cases/oracle.py),
so a case cannot pass on a label that does not hold.
"""

import pytest
import torch

from cases.catalog import CASES
from cases.runner import inspect_case, run_case
from vanishing.diagnose import KINDS

AT_INIT = [c for c in CASES if c.at_init]


def _ids(case):
    return case.name


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: extra threads only contend (and the CI runners have 2 cores)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_catalog_covers_every_kind_and_the_required_controls():
    assert len(CASES) >= 60  # issue 13's target
    assert len({c.name for c in CASES}) == len(CASES)
    for c in CASES:
        assert set(c.required) | set(c.allowed) <= set(KINDS), c.name
        assert not set(c.required) & set(c.allowed), c.name
    required = {k for c in CASES for k in c.required}
    assert required == set(KINDS)
    healthy = [c for c in CASES if c.healthy]
    assert len(healthy) >= 12
    assert {"mlp", "cnn", "residual", "rnn", "transformer", "meanfield"} <= {
        c.family for c in healthy
    }
    assert all(c.at_init for c in healthy)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_diagnosis_after_training(case, tmp_path):
    diag, job, losses = run_case(case, tmp_path / "run")
    case.confirm(job, losses)  # the label holds on the trained model (plain torch)
    found = set(diag.kinds)
    assert set(case.required) <= found, f"missed {set(case.required) - found}:\n{diag}"
    extra = found - set(case.required) - set(case.allowed)
    assert not extra, f"false alarm {extra}:\n{diag}"
    for f in diag.findings:
        assert f.layers and f.remedies, f
        assert all(r.why for r in f.remedies)


@pytest.mark.parametrize("case", AT_INIT, ids=_ids)
def test_diagnosis_at_init(case):
    diag, job = inspect_case(case)
    case.confirm(job, None)  # the label holds on the untouched model
    found = set(diag.kinds)
    assert set(case.required) <= found, f"missed {set(case.required) - found}:\n{diag}"
    extra = found - set(case.required) - set(case.allowed)
    assert not extra, f"false alarm {extra}:\n{diag}"
