"""Records of fixed training setups, against the same setups recorded by the monitor of commit
8b0ceff (before the seams refactor): a restructured monitor must record the same numbers.

On the machine that recorded them the tables are identical; on another CPU the matmul kernels
differ in the last bits (seen: two AMD EPYC VMs of the same CI kind), so floats are compared to
float32 resolution: 1e-5 relative, plus 1e-6 of the column's largest value for the entries that
are rounding noise on every CPU (the norm of a conv bias's gradient ahead of a batch norm, zero
in exact arithmetic, came out 1.5e-8 on one CPU and 2.3e-8 on another). A moved column or a
changed formula is off by orders more. The runs also serve as fixtures of runs written by an older
version: they must still load and diagnose.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import vanishing
from golden.scenarios import SCENARIOS
from vanishing.recorder.semantics import is_normalization

GOLDEN = Path(__file__).parent / "golden" / "recorded"


def _tables(run):
    steps = run.steps.drop(columns=["time"])
    return {"steps": steps, "metrics": run.metrics, "temporal": run.temporal}


#: Parameters whose gradient is zero in exact arithmetic, so that what is recorded of them is
#: rounding noise of the CPU's kernels (and AdamW turns that noise into updates of size lr):
#: a conv bias ahead of a batch norm. Their rows are compared for presence and NaN pattern only.
NOISE = {"conv": [("0", "bias")]}
#: Columns added after the golden runs were recorded: the reader gives an older run them as
#: null, and the new records fill them, so they are not compared here (their own tests are).
ADDED_SINCE = {"error_numel"}


def _assert_same(new: pd.DataFrame, old: pd.DataFrame, what: str, noise=()) -> None:
    assert list(new.columns)[: len(old.columns)] == list(old.columns), what
    new = new[list(old.columns)].reset_index(drop=True)
    old = old.reset_index(drop=True)
    assert new.shape == old.shape, what
    exact = np.ones(len(old), dtype=bool)
    for layer, param in noise:
        if {"layer", "param"} <= set(old.columns):
            exact &= ~((old["layer"] == layer) & (old["param"] == param)).to_numpy()
    for col in old.columns:
        if col in ADDED_SINCE:
            assert old[col].isna().all(), f"{what}.{col}: the golden run predates it"
            continue
        a, b = new[col].to_numpy(), old[col].to_numpy()
        if a.dtype.kind == "f":
            assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}.{col}: NaN pattern"
            ok = ~np.isnan(b) & exact
            scale = float(np.max(np.abs(b[ok]), initial=0.0))
            np.testing.assert_allclose(
                a[ok], b[ok], rtol=1e-5, atol=1e-6 * scale, err_msg=f"{what}.{col}"
            )
        else:
            assert a.tolist() == b.tolist(), f"{what}.{col}"


def _assert_same_layers(new: list[dict], old: list[dict]) -> None:
    """The manifests' layers are equal but for one change made since: a layer followed by a
    normalisation layer and then an activation (conv -> BatchNorm -> LeakyReLU) was recorded
    with no activation; it now has the one after the norm, which the norm had then too."""
    assert [x["name"] for x in new] == [x["name"] for x in old]
    for i, (a, b) in enumerate(zip(new, old)):
        if a.get("activation") != b.get("activation") and b.get("activation") is None:
            after = old[i + 1] if i + 1 < len(old) else {}
            assert is_normalization(after.get("type", "")), (a["name"], after)
            assert after.get("activation") == a["activation"], (a["name"], after)
            a = {**a, "activation": None}
        assert a == b


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_records_equal_those_of_the_monitor_before_the_refactor(name, tmp_path):
    SCENARIOS[name](tmp_path / name)
    new, old = vanishing.load_run(tmp_path / name), vanishing.load_run(GOLDEN / name)
    _assert_same_layers(new.layer_info, old.layer_info)
    for table, frame in _tables(old).items():
        _assert_same(_tables(new)[table], frame, f"{name}.{table}", NOISE.get(name, ()))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_runs_written_by_an_older_version_load_and_diagnose(name):
    run = vanishing.load_run(GOLDEN / name)
    assert len(run.steps) > 0
    diag = run.diagnose()
    assert isinstance(diag.healthy, bool)
    assert json.loads(json.dumps(diag.to_dict()))["healthy"] == diag.healthy
