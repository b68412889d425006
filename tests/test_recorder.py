"""The run directory: flushing, crash safety, bounded memory, readable without vanishing."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import pyarrow.parquet as pq
import pytest
import torch

import vanishing
from helpers import mlp, train
from vanishing.recorder.reader import RunError


def test_parts_are_written_every_flush_and_read_without_vanishing(run_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, flush_every=4) as mon:
        train(model, opt, steps=6)
        assert sorted(p.name for p in (run_dir / "steps").iterdir()) == ["part-00000.parquet"]
    assert sorted(p.name for p in (run_dir / "steps").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    # plain pyarrow (or pandas/polars/duckdb) reads the tables as one dataset each
    steps = pq.read_table(run_dir / "steps").to_pandas()
    assert sorted(steps.step) == list(range(6))
    metrics = pq.read_table(run_dir / "metrics").to_pandas()
    assert set(metrics.layer) == {str(i) for i in range(9)}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["status"] == "completed"
    assert [layer["name"] for layer in manifest["layers"]] == [str(i) for i in range(9)]
    assert manifest["optimizer"]["type"] == "SGD"
    assert mon.step == 6


def test_load_run_errors(tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        vanishing.load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a run directory"):
        vanishing.load_run(tmp_path / "empty")
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "manifest.json").write_text('{"schema_version": 999}')
    with pytest.raises(RunError, match="upgrade vanishing"):
        vanishing.load_run(tmp_path / "future")


def test_torn_tail_is_ignored(run_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, flush_every=2):
        train(model, opt, steps=4)
    # a flush that died half-way: its metrics part landed, its steps part did not,
    # plus a temporary file that was never renamed
    (run_dir / "metrics" / "part-00002.parquet").write_bytes(
        (run_dir / "metrics" / "part-00000.parquet").read_bytes()
    )
    (run_dir / "steps" / ".part-00002.parquet.tmp").write_bytes(b"PAR1 torn")
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 1, 2, 3]
    assert sorted(run.metrics.step.unique()) == [0, 1, 2, 3]
    assert len(run.metrics) == 4 * len(run.metrics[run.metrics.step == 0])


_KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, torch, vanishing
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = vanishing.watch(model, optimizer=opt, run_dir=sys.argv[1], flush_every=5)
    step = 0
    while True:  # runs until killed
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
        opt.step()
        step += 1
        if step == 23:
            print("ready", flush=True)
    """
)


def test_sigkill_loses_at_most_the_unflushed_window(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_KILLED_SCRIPT)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = vanishing.load_run(run_dir)
    steps = run.steps.step.tolist()
    assert len(steps) >= 20 and len(steps) % 5 == 0  # whole flushes only
    assert steps == list(range(len(steps)))
    assert sorted(run.metrics.step.unique()) == steps
    assert run.manifest["status"] == "running"
    assert run.layers == ["0", "1", "2"]


def test_host_memory_stays_constant_as_the_run_grows(run_dir):
    model = mlp(depth=3, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, flush_every=20):
        steps(200)
        tracemalloc.start()
        # warm-up while traced: torch's autograd engine keeps a bounded pool of ~2000 small
        # objects of recent backward passes alive (seen without vanishing too); how many steps
        # it takes to fill depends on what ran before in the process, so warm up long enough
        steps(3000)
        early, _ = tracemalloc.get_traced_memory()
        steps(1500)
        late, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert late - early < 64 * 1024, (early, late)
    assert len(vanishing.load_run(run_dir).steps) == 4700


def test_run_files_are_readable_by_others_as_with_open(run_dir):
    """Atomic writes go through mkstemp (mode 0600); the files must end up as open() makes
    them (0666 minus the umask), so a shared runs/ folder stays readable."""
    import os
    import stat

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with vanishing.watch(model, run_dir=run_dir):
        model(torch.randn(4, 3)).sum().backward()
    umask = os.umask(0o022)
    os.umask(umask)
    files = [run_dir / "manifest.json", *run_dir.glob("*/part-*.parquet")]
    assert len(files) >= 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


@pytest.mark.parametrize("dropna", [False, True])
def test_step_table_is_pandas_pivot_table(dropna):
    """The diagnosis' fast pivot against pandas' own pivot_table, on frames with NaN and
    infinite values, all-NaN layers and steps, and repeated (step, layer) rows."""
    import numpy as np
    import pandas as pd

    from vanishing.recorder.tables import step_table

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        n = int(rng.integers(1, 40))
        df = pd.DataFrame(
            {
                "step": rng.integers(0, 6, n),
                "layer": rng.choice(["a", "b", "c", "10", "2"], n),
                "v": np.where(rng.random(n) < 0.4, np.nan, rng.normal(size=n)),
            }
        )
        # overflowed statistics: +-inf (whose sum with -+inf is NaN, as pandas' mean gives)
        df.loc[rng.random(n) < 0.05, "v"] = np.inf
        df.loc[rng.random(n) < 0.05, "v"] = -np.inf
        expected = df.pivot_table(
            index="step", columns="layer", values="v", aggfunc="mean", dropna=dropna
        )
        got = step_table(df, "v", dropna=dropna)
        if expected.empty:
            assert got.isna().all().all()
            continue
        pd.testing.assert_frame_equal(got, expected, check_column_type=False, check_dtype=False)
        checked += 1
    assert checked > 150


def test_speeds_equal_a_brute_force_mean_per_unit_and_step(tmp_path):
    """Run.speeds() (one bincount over the rows) against the plain definition: per speed unit,
    the mean over its source rows of ``grad_norm`` at each step, read where speed_units says
    (a batch-normalised layer at the norm's bias, a stacked LSTM per layer at ``bias_ih_lK``),
    on a run with steps where some layers get no gradient (a detached branch every other step)
    and a bounded read of it."""
    import numpy as np
    import pandas as pd

    from vanishing.recorder.reader import Run
    from vanishing.recorder.semantics import speed_units

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 8)
            self.bn = torch.nn.BatchNorm1d(8)
            self.b = torch.nn.Linear(8, 8)
            self.rnn = torch.nn.LSTM(8, 6, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(6, 1)

        def forward(self, x, cut=False):
            h = torch.sigmoid(self.bn(self.a(x)))
            h = torch.tanh(self.b(h.detach() if cut else h))
            return self.head(self.rnn(h.unsqueeze(1).repeat(1, 3, 1))[0][:, -1])

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with vanishing.watch(net, opt, run_dir=tmp_path / "r", every=2):
        for step in range(12):
            opt.zero_grad()
            net(torch.randn(16, 4), cut=step % 4 == 2).pow(2).mean().backward()
            opt.step()
    run = vanishing.load_run(tmp_path / "r")
    m = run.metrics
    expected = {}
    for name, layer, param in speed_units(run.layer_info):
        rows = m[(m["layer"] == layer) & (m["param"] == param)]
        if len(rows):
            expected[name] = rows.groupby("step")["grad_norm"].mean()
    expected = pd.DataFrame(expected)
    expected.index.name = "step"
    got = run.speeds()
    assert list(got.columns) == [n for n, _, _ in speed_units(run.layer_info)]
    assert {"rnn.l0", "rnn.l1"} <= set(got.columns) and len(got) == 6
    assert got.isna().any().any()  # the cut steps: no gradient before the detach
    pd.testing.assert_frame_equal(got, expected[got.columns], check_dtype=False)
    bounded = Run(tmp_path / "r", max_steps=3).speeds()
    pd.testing.assert_frame_equal(bounded, got, check_dtype=False)
    first, last = got.columns[0], got.columns[-1]
    ratios = (got[first] / got[last]).to_numpy()
    assert run.first_last_ratio() == pytest.approx(float(np.median(ratios[np.isfinite(ratios)])))
