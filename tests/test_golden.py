"""Records of fixed training setups, against the same setups recorded by the monitor of commit
8b0ceff (before the seams refactor): a restructured monitor must record the same numbers.

On the machine that recorded them the tables are identical; on another CPU the matmul kernels
may differ in the last bits, so floats are compared to 1e-9 relative (every recorded statistic
here is far from float32 resolution of its own computation, and a moved column or a changed
formula is off by orders more). The runs also serve as fixtures of runs written by an older
version: they must still load and diagnose.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import vanishing
from golden.scenarios import SCENARIOS

GOLDEN = Path(__file__).parent / "golden" / "recorded"


def _tables(run):
    steps = run.steps.drop(columns=["time"])
    return {"steps": steps, "metrics": run.metrics, "temporal": run.temporal}


def _assert_same(new: pd.DataFrame, old: pd.DataFrame, what: str) -> None:
    assert list(new.columns)[: len(old.columns)] == list(old.columns), what
    new = new[list(old.columns)].reset_index(drop=True)
    old = old.reset_index(drop=True)
    assert new.shape == old.shape, what
    for col in old.columns:
        a, b = new[col].to_numpy(), old[col].to_numpy()
        if a.dtype.kind == "f":
            assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}.{col}: NaN pattern"
            ok = ~np.isnan(b)
            np.testing.assert_allclose(a[ok], b[ok], rtol=1e-9, atol=0, err_msg=f"{what}.{col}")
        else:
            assert a.tolist() == b.tolist(), f"{what}.{col}"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_records_equal_those_of_the_monitor_before_the_refactor(name, tmp_path):
    SCENARIOS[name](tmp_path / name)
    new, old = vanishing.load_run(tmp_path / name), vanishing.load_run(GOLDEN / name)
    assert new.layer_info == old.layer_info
    for table, frame in _tables(old).items():
        _assert_same(_tables(new)[table], frame, f"{name}.{table}")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_runs_written_by_an_older_version_load_and_diagnose(name):
    run = vanishing.load_run(GOLDEN / name)
    assert len(run.steps) > 0
    diag = run.diagnose()
    assert isinstance(diag.healthy, bool)
    assert json.loads(json.dumps(diag.to_dict()))["healthy"] == diag.healthy
