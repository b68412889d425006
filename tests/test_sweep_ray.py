"""`vanishing sweep --backend ray`: the same grid as Ray Tune trials, on a local Ray of 2 CPUs
started once for the module (no network, no dashboard), into the same run directories and
`sweep.sqlite` rows as the local worker pool; resumed with `Tuner.restore` and the store."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")
tune = pytest.importorskip("ray.tune")

import vanishing  # noqa: E402
from vanishing.experiments.config import read_toml  # noqa: E402
from vanishing.experiments.sweep import RAY_DIR, plan_sweep, read_sweep, run_sweep  # noqa: E402

pytestmark = pytest.mark.slow

SWEEP = """
name = "tiny-ray"
seeds = [0]

[task]
name = "teacher"
n_train = 128
n_test = 64
n_features = 8

[model]
depth = [1, 3]
width = 8

[train]
steps = 10
batch_size = 32
eval_every = 5

[monitor]
stats = "parameters"
"""

# what may differ between two trainings of the same run: wall-clock times
TIMES = ("started_at", "finished_at")


@pytest.fixture(scope="module")
def local_ray():
    address = os.environ.pop("RAY_ADDRESS", None)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="error",
    )
    try:
        yield
    finally:
        ray.shutdown()
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, local_ray):
    """The same config swept by the local pool and by Ray: (config, local dir, ray dir, events)."""
    root = tmp_path_factory.mktemp("sweeps")
    cfg = root / "sweep.toml"
    cfg.write_text(SWEEP)
    run_sweep(cfg, root / "local", workers=2)
    events = []
    run_sweep(
        cfg,
        root / "ray",
        workers=2,
        backend="ray",
        on_event=lambda kind, run, info: events.append((kind, run and run.key)),
    )
    return cfg, root / "local", root / "ray", events


def _rows(sweep_dir):
    conn = sqlite3.connect(sweep_dir / "sweep.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return {r["key"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    finally:
        conn.close()


def _comparable(row):
    """A store row without its times; its summary without the seconds it took."""
    out = {k: v for k, v in row.items() if k not in TIMES}
    summary = json.loads(out.pop("summary"))
    summary.pop("seconds")
    return out, summary


def _mtimes(run_dir):
    return {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_ray_backend_writes_what_the_local_pool_writes(sweeps):
    cfg, local, on_ray, events = sweeps
    plan = plan_sweep(read_toml(cfg))
    keys = {r.key for r in plan}
    assert len(keys) == 2
    local_rows, ray_rows = _rows(local), _rows(on_ray)
    assert set(local_rows) == set(ray_rows) == keys
    for key in keys:
        assert ray_rows[key]["status"] == "completed"
        # same keys, params, config, status, kinds, error, run_dir; the same summary numbers
        assert _comparable(ray_rows[key]) == _comparable(local_rows[key])
        assert ray_rows[key]["started_at"] <= ray_rows[key]["finished_at"]
    # the same run directories, holding the same files and the same recorded numbers
    dirs = {r.key: r.run_dir for r in plan}  # readable names, the same on both backends
    assert {p.name for p in (on_ray / "runs").iterdir()} == {d.split("/")[1] for d in dirs.values()}
    for key in keys:
        a, b = local / dirs[key], on_ray / dirs[key]
        assert set(_mtimes(a)) == set(_mtimes(b))
        ra, rb = vanishing.load_run(a), vanishing.load_run(b)
        assert ra.metrics.equals(rb.metrics)
        assert ra.steps.drop(columns=["time"], errors="ignore").equals(
            rb.steps.drop(columns=["time"], errors="ignore")
        )
    assert [kind for kind, _ in events].count("start") == 2
    assert [kind for kind, _ in events].count("finish") == 2
    assert (on_ray / RAY_DIR / "tuner.pkl").is_file()  # Tune's own state, inside the sweep
    # the report reads a Ray sweep unchanged
    assert [r["status"] for r in read_sweep(on_ray)] == ["completed", "completed"]
    r = subprocess.run(
        [sys.executable, "-m", "vanishing", "report", str(on_ray)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert (on_ray / "report.html").is_file()


class _Spy:
    """Counts calls of Tuner.restore (and their arguments) and of Tuner.fit, in this process."""

    def __init__(self, monkeypatch):
        self.restores, self.fits = [], 0
        restore, fit = tune.Tuner.restore.__func__, tune.Tuner.fit

        def spy_restore(cls, path, trainable, **kwargs):
            self.restores.append((path, kwargs))
            return restore(cls, path, trainable, **kwargs)

        def spy_fit(tuner):
            self.fits += 1
            return fit(tuner)

        monkeypatch.setattr(tune.Tuner, "restore", classmethod(spy_restore))
        monkeypatch.setattr(tune.Tuner, "fit", spy_fit)


def _forget(sweep_dir, run):
    """As if the run never finished: no summary.json, no row."""
    key = run.key
    (sweep_dir / run.run_dir / "summary.json").unlink()
    conn = sqlite3.connect(sweep_dir / "sweep.sqlite")
    with conn:
        conn.execute("DELETE FROM runs WHERE key = ?", (key,))
    conn.close()


def _resume(tmp_path, sweeps, name):
    cfg, _, on_ray, _ = sweeps
    sweep_dir = tmp_path / name
    shutil.copytree(on_ray, sweep_dir)  # a moved sweep directory resumes as well
    victim, other = plan_sweep(read_toml(cfg))
    return cfg, sweep_dir, victim, other


def test_a_ray_sweep_redoes_only_the_run_that_did_not_finish(tmp_path, sweeps, monkeypatch):
    cfg, sweep_dir, victim, other = _resume(tmp_path, sweeps, "again")
    before = _rows(sweep_dir)
    _forget(sweep_dir, victim)
    untouched = _mtimes(sweep_dir / other.run_dir)
    spy = _Spy(monkeypatch)
    started = []
    run_sweep(
        cfg,
        sweep_dir,
        workers=2,
        backend="ray",
        on_event=lambda kind, run, info: started.append(run.key) if kind == "start" else None,
    )
    # Tune's experiment is restored first (every trial in it had finished: nothing to do), then
    # the run the store says is missing trains as a fresh experiment
    assert spy.restores == [(str(sweep_dir / RAY_DIR), {"resume_errored": True})]
    assert spy.fits == 2
    assert started == [victim.key]
    assert _mtimes(sweep_dir / other.run_dir) == untouched  # not trained again
    after = _rows(sweep_dir)
    assert after[other.key] == before[other.key]
    assert _comparable(after[victim.key]) == _comparable(before[victim.key])  # same numbers
    assert (sweep_dir / victim.run_dir / "summary.json").is_file()

    # and started once more: nothing to do, Ray not even asked
    started.clear()
    run_sweep(cfg, sweep_dir, workers=2, backend="ray", on_event=lambda *a: started.append(a))
    assert started[0][0] == "plan" and len(started) == 1 and spy.fits == 2


def _mark_trial(sweep_dir, key, status):
    """Edit Tune's saved experiment state: the trial of ``key`` ended with ``status``."""
    state = sorted((sweep_dir / RAY_DIR).glob("experiment_state-*.json"))[-1]
    data = json.loads(state.read_text())
    for trial in data["trial_data"]:
        fields = json.loads(trial[0])
        if fields["config"]["key"] == key:
            fields["status"] = status
            trial[0] = json.dumps(fields, indent=2)
            break
    else:
        raise AssertionError(f"no trial of {key} in {state}")
    state.write_text(json.dumps(data))


def test_tuner_restore_resumes_an_errored_trial(tmp_path, sweeps, monkeypatch):
    """A trial Tune saw fail (its worker died) is rerun by Tuner.restore(resume_errored=True)
    without a new experiment; the other trial, finished, is left alone."""
    cfg, sweep_dir, victim, other = _resume(tmp_path, sweeps, "errored")
    before = _rows(sweep_dir)
    _forget(sweep_dir, victim)
    _mark_trial(sweep_dir, victim.key, "ERROR")
    untouched = _mtimes(sweep_dir / other.run_dir)
    spy = _Spy(monkeypatch)
    started = []
    run_sweep(
        cfg,
        sweep_dir,
        workers=2,
        backend="ray",
        on_event=lambda kind, run, info: started.append(run.key) if kind == "start" else None,
    )
    assert len(spy.restores) == 1 and spy.fits == 1  # the restored experiment did it all
    assert started == [victim.key]
    assert _mtimes(sweep_dir / other.run_dir) == untouched
    after = _rows(sweep_dir)
    assert after[other.key] == before[other.key]
    assert _comparable(after[victim.key]) == _comparable(before[victim.key])


def test_a_ray_sweep_killed_before_tune_saved_a_trial_starts_afresh(tmp_path, sweeps, monkeypatch):
    """Only tuner.pkl in <sweep>/ray (killed at once): nothing to restore, a fresh experiment."""
    cfg, sweep_dir, victim, other = _resume(tmp_path, sweeps, "early")
    for state in (sweep_dir / RAY_DIR).glob("*state-*.json"):
        state.unlink()
    _forget(sweep_dir, victim)
    spy = _Spy(monkeypatch)
    _, rows = run_sweep(cfg, sweep_dir, workers=2, backend="ray")
    assert spy.restores == [] and spy.fits == 1
    assert [r["status"] for r in rows] == ["completed", "completed"]


def _cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, **kwargs
    )


def test_an_unknown_backend_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(SWEEP)
    r = _cli("-m", "vanishing", "sweep", cfg, "--out", tmp_path / "out", "--backend", "dask")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --backend 'dask'") and "local, ray" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_without_ray_the_ray_backend_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(SWEEP)
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from vanishing.cli import main\n"
        f"sys.argv = ['vanishing', 'sweep', {str(cfg)!r}, '--out', {str(tmp_path / 'out')!r},"
        " '--backend', 'ray']\n"
        "sys.exit(main())\n"
    )
    r = _cli("-c", code)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == 'error: --backend ray needs ray: pip install "vanishing[ray]"'
    assert not (tmp_path / "out").exists()
    # the local backend does not import ray
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from vanishing.experiments.sweep import run_sweep\n"
        f"run_sweep({str(cfg)!r}, {str(tmp_path / 'local')!r}, workers=1)\n"
    )
    r = _cli("-c", code, timeout=120)
    assert r.returncode == 0, r.stderr
