"""`vanishing sweep`: grid expansion into a SQLite store, worker processes, and resuming after a
real SIGKILL without redoing or duplicating runs."""

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vanishing
from vanishing.experiments.config import expand_sweep, read_toml
from vanishing.experiments.sweep import (
    SweepBusyError,
    SweepStore,
    plan_sweep,
    read_sweep,
    run_sweep,
)

SWEEP = """
name = "tiny"
seeds = [0, 1]

[task]
name = "teacher"
n_train = 128
n_test = 64
n_features = 8

[model]
depth = [1, 4]
width = 8
activation = ["sigmoid", "relu"]

[train]
steps = {steps}
batch_size = 32
eval_every = 10

[monitor]
stats = "parameters"
"""


def _write(tmp_path, steps=10, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(SWEEP.format(steps=steps))
    return path


def _db_rows(sweep_dir):
    conn = sqlite3.connect(sweep_dir / "sweep.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM runs")]
    finally:
        conn.close()


def test_sweep_runs_the_grid_into_the_store(tmp_path):
    cfg = _write(tmp_path)
    events = []
    runs, rows = run_sweep(
        cfg, tmp_path / "out", workers=2, on_event=lambda kind, run, info: events.append(kind)
    )
    expected = expand_sweep(read_toml(cfg))
    assert [r.params for r in runs] == [p for p, _ in expected]
    assert [r.key for r in runs] == [c.key for _, c in expected]

    stored = _db_rows(tmp_path / "out")
    assert len(stored) == 8 and {r["key"] for r in stored} == {c.key for _, c in expected}
    by_key = {r["key"]: r for r in stored}
    for params, config in expected:
        row = by_key[config.key]
        assert row["status"] == "completed"
        assert json.loads(row["params"]) == params
        assert row["seed"] == params["seed"]
        assert json.loads(row["config"]) == config.to_dict()
        # readable: the swept fields' last names and values, in the config's order
        assert row["run_dir"] == (
            f"runs/depth={params['model.depth']}-activation={params['model.activation']}"
            f"-seed={params['seed']}"
        )
        run_dir = tmp_path / "out" / row["run_dir"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert json.loads(row["summary"]) == summary
        assert json.loads(row["kinds"]) == summary["kinds"]
        assert json.loads((run_dir / "config.json").read_text()) == config.to_dict()
        assert row["started_at"] <= row["finished_at"] and row["error"] is None
    assert (tmp_path / "out/sweep.toml").read_text() == cfg.read_text()
    assert events.count("start") == 8 and events.count("finish") == 8 and events[0] == "plan"
    assert [r["key"] for r in rows] == [r.key for r in runs]
    assert read_sweep(tmp_path / "out")[0]["params"] == expected[0][0]

    # deep sigmoid nets vanish more than shallow ones, as recorded in the store
    ratio = {
        (p["model.depth"], p["model.activation"], p["seed"]): json.loads(by_key[c.key]["summary"])[
            "first_last_ratio"
        ]
        for p, c in expected
    }
    assert ratio[(1, "sigmoid", 0)] is None  # one hidden layer: no first/last pair
    assert ratio[(4, "sigmoid", 0)] < ratio[(4, "relu", 0)]

    # started again: nothing left to do, nothing redone, nothing duplicated
    before = {r["key"]: r["finished_at"] for r in stored}
    events.clear()
    run_sweep(cfg, tmp_path / "out", workers=2, on_event=lambda k, r, i: events.append(k))
    assert events == ["plan"]
    assert {r["key"]: r["finished_at"] for r in _db_rows(tmp_path / "out")} == before


def test_store_resets_interrupted_runs_and_never_duplicates(tmp_path):
    runs = plan_sweep({"model": {"depth": [2, 3, 4]}})
    store = SweepStore(tmp_path / "s.sqlite")
    store.add(runs)
    store.mark_running(runs[0].key)
    store.finish(runs[1].key, {"status": "failed", "kinds": [], "error": "x"})
    store.add(runs)  # a restart adds the same keys again
    assert store.reset_interrupted() == 1
    assert store.statuses() == {
        runs[0].key: "pending",
        runs[1].key: "failed",
        runs[2].key: "pending",
    }
    assert store.retry([r.key for r in runs]) == 1
    assert set(store.statuses().values()) == {"pending"}
    n = store.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert n == 3
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_a_half_written_run_directory_is_redone_from_scratch(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        '[task]\nname = "teacher"\nn_train = 64\n[model]\ndepth = [1, 2]\nwidth = 4\n'
        "[train]\nsteps = 5\n"
    )
    plan = plan_sweep(read_toml(cfg))
    out = tmp_path / "out"
    run_sweep(cfg, out, workers=1)
    # simulate a kill in the middle of one run: its row says running, its directory is partial
    victim = plan[1]
    conn = sqlite3.connect(out / "sweep.sqlite")
    with conn:
        conn.execute(
            "UPDATE runs SET status='running', summary=NULL, finished_at=NULL WHERE key=?",
            (victim.key,),
        )
    conn.close()
    (out / victim.run_dir / "summary.json").unlink()
    (out / victim.run_dir / "steps" / "junk.txt").write_text("left over")
    # and one killed after its run finished but before the parent wrote its row
    survivor = plan[0]
    conn = sqlite3.connect(out / "sweep.sqlite")
    with conn:
        conn.execute(
            "UPDATE runs SET status='running', summary=NULL, finished_at=NULL WHERE key=?",
            (survivor.key,),
        )
    conn.close()
    written = (out / survivor.run_dir / "summary.json").stat().st_mtime_ns
    events = []
    run_sweep(cfg, out, workers=1, on_event=lambda kind, run, info: events.append((kind, run)))
    rows = {r["key"]: r for r in _db_rows(out)}
    assert rows[victim.key]["status"] == "completed"
    assert not (out / victim.run_dir / "steps" / "junk.txt").exists()
    assert vanishing.load_run(out / victim.run_dir).steps["step"].tolist() == list(range(5))
    # the finished one is taken as it is, not trained again
    assert rows[survivor.key]["status"] == "completed"
    assert (out / survivor.run_dir / "summary.json").stat().st_mtime_ns == written
    assert [run.key for kind, run in events if kind == "start"] == [victim.key]


def test_a_run_that_fails_is_recorded_and_the_sweep_goes_on(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        f'[task]\nname = ["teacher", "mnist"]\ndata_dir = "{empty}"\nn_train = 64\n'
        "[model]\ndepth = 2\nwidth = 4\n[train]\nsteps = 3\n"
    )
    runs, rows = run_sweep(cfg, tmp_path / "out", workers=2)
    status = {r["params"]["task.name"]: (r["status"], r["error"]) for r in rows}
    assert status["teacher"] == ("completed", None)
    assert status["mnist"][0] == "failed" and status["mnist"][1]
    # failed runs stay failed on a restart, unless asked to retry them
    started = []
    on_event = lambda kind, run, info: started.append(run.key) if kind == "start" else None  # noqa: E731
    run_sweep(cfg, tmp_path / "out", workers=2, on_event=on_event)
    assert started == []
    run_sweep(cfg, tmp_path / "out", workers=2, retry_failed=True, on_event=on_event)
    assert started == [r.key for r in runs if r.params["task.name"] == "mnist"]


def _cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "vanishing", *map(str, args)],
        capture_output=True,
        text=True,
        **kwargs,
    )


def test_cli_sweep_bad_config_exits_2_before_running_anything(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[model]\nactivation = ["relu", "sigmod"]\n')
    r = _cli("sweep", cfg, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "'sigmod' is not one of" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_sweep_killed_and_restarted_redoes_only_unfinished_runs(tmp_path):
    """A real SIGKILL of the whole process group mid-sweep, then the same command again."""
    cfg = _write(tmp_path, steps=60)
    out = tmp_path / "out"
    expected = {c.key for _, c in expand_sweep(read_toml(cfg))}
    db = out / "sweep.sqlite"
    args = [sys.executable, "-m", "vanishing", "sweep", str(cfg), "--out", str(out), "-w", "2"]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    completed_at_kill: dict[str, float] = {}
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if db.exists():
                try:
                    rows = _db_rows(out)
                except sqlite3.OperationalError:
                    rows = []
                done = {r["key"]: r["finished_at"] for r in rows if r["status"] == "completed"}
                if len(done) >= 2:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before it could be killed: {proc.stderr.read()}")
            time.sleep(0.05)
        else:
            pytest.fail("no run completed in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rows = _db_rows(out)
    completed_at_kill = {r["key"]: r["finished_at"] for r in rows if r["status"] == "completed"}
    assert 2 <= len(completed_at_kill) < len(expected)  # killed mid-sweep

    r = _cli("sweep", cfg, "--out", out, "-w", "2")
    assert r.returncode == 0, r.stderr
    finished = int(re.search(r"(\d+) already finished", r.stdout).group(1))
    assert finished >= len(completed_at_kill)
    rows = _db_rows(out)
    keys = [row["key"] for row in rows]
    assert sorted(keys) == sorted(expected)  # every run exactly once
    assert all(row["status"] == "completed" for row in rows)
    for row in rows:
        if row["key"] in completed_at_kill:  # not redone
            assert row["finished_at"] == completed_at_kill[row["key"]]
        run_dir = out / row["run_dir"]
        steps = vanishing.load_run(run_dir).steps["step"].tolist()
        assert steps == list(range(60))  # a clean run, not a resumed half
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        row["run_dir"].removeprefix("runs/") for row in rows
    )
    # plain output (not a terminal): one line per run trained, with its ETA (a run killed after
    # its summary.json but before its row was marked is recovered, not trained again)
    assert r.stdout.count("ETA") >= len(expected) - finished


def test_two_sweeps_cannot_share_a_directory(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    cfg = _write(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another sweep holds the directory
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(SweepBusyError, match="another vanishing sweep"):
            run_sweep(cfg, out, workers=1)
        r = _cli("sweep", cfg, "--out", out)
        assert r.returncode == 2 and "another vanishing sweep is running" in r.stderr
    assert not (out / "sweep.sqlite").exists()  # nothing was touched


def _descendants(pid):
    """PIDs of every process under ``pid`` (Linux /proc)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in out:
                    out.add(c)
                    todo.append(c)
    return out


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_workers_do_not_outlive_a_killed_sweep(tmp_path):
    """SIGKILL of the sweep process alone (not its group): its workers stop within seconds
    instead of training on, orphaned, into run directories a restart will redo."""
    cfg = _write(tmp_path, steps=20000)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "vanishing", "sweep", str(cfg), "--out", str(out), "-w", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers = set()
        while time.monotonic() < deadline and len(workers) < 3:  # forkserver + 2 workers
            workers = _descendants(proc.pid)
            time.sleep(0.2)
        assert len(workers) >= 3, "the sweep started no workers"
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        left = [p for p in workers if _alive(p)]
        assert not left, f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _descendants(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def test_sigterm_stops_the_sweep_like_ctrl_c(tmp_path):
    cfg = _write(tmp_path, steps=20000)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "vanishing", "sweep", str(cfg), "--out", str(out), "-w", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        running = False
        while time.monotonic() < deadline and not running:  # both workers are training
            time.sleep(0.2)
            with contextlib.suppress(sqlite3.Error, FileNotFoundError):
                running = (
                    sum(r["status"] == "running" for r in _db_rows(out)) >= 2
                    if (out / "sweep.sqlite").exists()
                    else False
                )
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    # interrupted runs stay 'running' in the store: the next start redoes them
    assert {r["status"] for r in _db_rows(out)} <= {"pending", "running", "completed"}


def test_sweep_progress_shows_the_finished_runs_gradient_strip(tmp_path):
    from vanishing.cli.sweep import SweepDisplay
    from vanishing.report.terminal import gradient_strip

    cfg = _write(tmp_path)
    runs, _ = run_sweep(cfg, tmp_path / "out", workers=1)
    run = runs[0]
    recorded = vanishing.load_run(tmp_path / "out" / run.run_dir)
    last = recorded.pivot("grad_norm", param="weight").iloc[-1]  # columns in forward order
    strip = SweepDisplay(tmp_path / "out").strip(run)
    assert len(strip) == run.config.model.depth + 1  # one cell per Linear, head included
    assert strip == gradient_strip(last.tolist())


def test_a_sweep_recorded_under_key_named_directories_resumes_in_place(tmp_path):
    """A sweep written before readable names (``runs/<key>``) is resumed where its runs are:
    the store's run_dir is the record, nothing is trained twice or moved."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        '[task]\nname = "teacher"\nn_train = 64\n[model]\ndepth = [1, 2]\nwidth = 4\n'
        "[train]\nsteps = 5\n"
    )
    out = tmp_path / "out"
    run_sweep(cfg, out, workers=1)
    plan = plan_sweep(read_toml(cfg))
    assert [r.run_dir for r in plan] == ["runs/depth=1-seed=0", "runs/depth=2-seed=0"]
    # rewrite it as the old layout: directories named by key, rows saying so; one unfinished
    conn = sqlite3.connect(out / "sweep.sqlite")
    with conn:
        for r in plan:
            (out / r.run_dir).rename(out / "runs" / r.key)
            conn.execute("UPDATE runs SET run_dir=? WHERE key=?", (f"runs/{r.key}", r.key))
        conn.execute("UPDATE runs SET status='pending', summary=NULL WHERE key=?", (plan[1].key,))
    conn.close()
    done = (out / "runs" / plan[0].key / "summary.json").stat().st_mtime_ns
    events = []
    run_sweep(cfg, out, workers=1, on_event=lambda kind, run, info: events.append((kind, run)))
    assert [run.key for kind, run in events if kind == "start"] == [plan[1].key]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(r.key for r in plan)
    assert (out / "runs" / plan[0].key / "summary.json").stat().st_mtime_ns == done
    rows = {r["key"]: r for r in _db_rows(out)}
    assert {r["status"] for r in rows.values()} == {"completed"}
    assert vanishing.load_run(out / "runs" / plan[1].key).steps["step"].tolist() == list(range(5))


def test_the_eta_counts_parallel_runs_as_parallel():
    """The first ETA: mean run time x rounds of `workers` runs left (not elapsed / done, which
    counts the first round's parallel runs as one after another)."""
    from vanishing.cli.sweep import SweepDisplay

    d = SweepDisplay()
    d.live = False  # plain lines
    d.event("plan", None, {"total": 10, "todo": 10, "workers": 2})
    assert d.eta() is None
    run = type("R", (), {"params": {"seed": 0}})()
    d.event("finish", run, {"status": "completed", "seconds": 30.0})
    assert d.eta() == 30.0 * 5  # 9 left on 2 workers: 5 rounds of 30 s
    d.event("finish", run, {"status": "completed", "seconds": 50.0})
    assert d.eta() == 40.0 * 4  # 8 left: 4 rounds of the mean, 40 s


def test_the_results_table_fits_the_terminal_and_writes_ratios_as_every_view(
    tmp_path, monkeypatch, capsys
):
    from vanishing.cli.sweep import print_table
    from vanishing.report.formatting import stat_text

    runs, rows = run_sweep(_write(tmp_path), tmp_path / "out", workers=1)
    monkeypatch.setenv("COLUMNS", "80")
    print_table(runs, rows)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    for row in rows:
        ratio = (row["summary"] or {}).get("first_last_ratio")
        assert f" {stat_text(ratio)} " in out  # the .3g of the report, not a second format
