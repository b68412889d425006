"""Bad input from a hostile user: run directories of the wrong shape, unbounded configs, API
misuse and a planted symlink. Each is one clear error (exit 2 and one ``error:`` line on the
command line) or an honest note, never a traceback, a hang or a silent "healthy"."""

import json
import os
import shutil
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import vanishing
from helpers import mlp, train
from vanishing.cli import main
from vanishing.experiments.config import ConfigError, apply_overrides, parse_config
from vanishing.recorder.errors import RunError


def _cli(capsys, *args):
    """``vanishing ARGS`` in this process: (exit code, stdout, stderr). An exception that
    escapes the command (a traceback for the user) fails the test."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(code, err):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """20 steps of a small tanh MLP, flushed every 5 steps: parts 0..3 of each table."""
    d = tmp_path_factory.mktemp("good") / "run"
    torch.manual_seed(0)
    model = mlp(depth=3, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=d, flush_every=5):
        train(model, opt, steps=20)
    return d


def _copy(good_run, tmp_path, name="run"):
    d = tmp_path / name
    shutil.copytree(good_run, d)
    return d


def _edit_manifest(d, edit):
    m = json.loads((d / "manifest.json").read_text())
    m = edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _set(key, value):
    def edit(m):
        m[key] = value
        return m

    return edit


def _layer0(key, value):
    def edit(m):
        m["layers"][0][key] = value
        return m

    return edit


# ---- 1. run directories of the wrong shape ----------------------------------------------------


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda m: [1, 2], "not a JSON object"),
        (_set("layers", "x"), "layers"),
        (_set("layers", [1]), "layers[0]"),
        (_layer0("params", 3), "layers[0].params"),
        (_layer0("name", 7), "layers[0].name"),
        (_layer0("num_params", "many"), "layers[0].num_params"),
        (_layer0("params", [{"name": "weight", "shape": "big"}]), "layers[0].params[0].shape"),
        (_set("optimizer", "sgd"), "optimizer"),
        (_set("optimizer", {"type": "SGD", "defaults": 3}), "optimizer.defaults"),
        (_set("schema_version", "1"), "schema version"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_one_run_error(good_run, tmp_path, capsys, edit, what):
    d = _copy(good_run, tmp_path)
    _edit_manifest(d, edit)
    with pytest.raises(RunError) as e:
        vanishing.load_run(d)
    message = str(e.value)
    assert "\n" not in message and "manifest.json" in message and what in message, message
    for command in ("diagnose", "report"):
        line = _one_error_line(*_cli(capsys, command, d)[::2])
        assert "manifest.json" in line and what in line
    assert not (d / "report.html").exists()


def test_a_part_with_the_wrong_schema_is_one_run_error(good_run, tmp_path, capsys):
    d = _copy(good_run, tmp_path)
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), d / "metrics" / "part-00000.parquet")
    with pytest.raises(RunError, match=r"metrics/part-00000\.parquet.*'step'"):
        _ = vanishing.load_run(d).metrics
    for command in ("diagnose", "report"):
        line = _one_error_line(*_cli(capsys, command, d)[::2])
        assert "metrics/part-00000.parquet" in line


def test_a_part_with_a_wrongly_typed_column_is_one_run_error(good_run, tmp_path, capsys):
    d = _copy(good_run, tmp_path)
    t = pq.read_table(d / "steps" / "part-00001.parquet")
    t = t.set_column(t.schema.get_field_index("loss"), "loss", pa.array(["x"] * t.num_rows))
    pq.write_table(t, d / "steps" / "part-00001.parquet")
    with pytest.raises(RunError, match=r"steps/part-00001\.parquet.*'loss'"):
        _ = vanishing.load_run(d).steps
    line = _one_error_line(*_cli(capsys, "diagnose", d)[::2])
    assert "steps/part-00001.parquet" in line


def test_a_damaged_part_is_named_with_its_missing_steps(good_run, tmp_path, capsys):
    d = _copy(good_run, tmp_path)
    part = d / "metrics" / "part-00003.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    expected = "damaged run: part metrics/part-00003.parquet unreadable, steps 15-19 missing"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run = vanishing.load_run(d)
        assert [str(x) for x in run.damaged] == [expected[len("damaged run: ") :]]
        assert run.damaged[0].part == "metrics/part-00003.parquet"
        assert (run.damaged[0].first_step, run.damaged[0].last_step) == (15, 19)
        assert expected in run.diagnose().notes
        assert expected in vanishing.load_run(d, max_steps=5).diagnose().notes
    code, out, err = _cli(capsys, "diagnose", d)
    assert code in (0, 1) and expected in out and "Traceback" not in err
    code, out, err = _cli(capsys, "report", d)
    assert code == 0, err
    page = (d / "report.html").read_text()
    assert "damaged run" in page and "metrics/part-00003.parquet" in page
    assert "steps 15-19 missing" in page


def test_a_damaged_steps_part_names_the_steps_between_its_neighbours(good_run, tmp_path):
    d = _copy(good_run, tmp_path)
    part = d / "steps" / "part-00001.parquet"
    part.write_bytes(b"PAR1 not a parquet file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run = vanishing.load_run(d)
        assert [str(x) for x in run.damaged] == [
            "part steps/part-00001.parquet unreadable, steps 5-9 missing"
        ]


def test_an_intact_run_is_not_damaged(good_run):
    assert vanishing.load_run(good_run).damaged == []


# ---- 2. configs: bounded values -----------------------------------------------------------------


def _config_error(raw):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"seed": 99999999999999999999}, "seed: must be <= 4294967295, got 99999999999999999999"),
        ({"seed": 2**32}, "seed: must be <= 4294967295, got 4294967296"),
        ({"model": {"depth": 100000000}}, "model.depth: must be <= 1000, got 100000000"),
        ({"model": {"width": 10**6}}, "model.width: must be <= 65536, got 1000000"),
        ({"train": {"steps": 10**12}}, "train.steps: must be <= 10000000, got 1000000000000"),
        ({"train": {"lr": float("nan")}}, "train.lr: expected a finite number, got nan"),
        ({"task": {"n_train": 10**12}}, "task.n_train: must be <= 10000000, got 1000000000000"),
        ({"task": {"seq_len": 10**9}}, "task.seq_len: must be <= 100000, got 1000000000"),
        ({"monitor": {"flush_every": 10**9}}, "monitor.flush_every: must be <= 100000, got"),
        ({"model": {"init_std": 1e300}}, "model.init_std: must be <= 1e+30, got 1e+300"),
    ],
)
def test_unbounded_config_values_are_refused(raw, expected):
    assert _config_error(raw).startswith(expected)


def test_the_bounds_themselves_are_accepted():
    cfg = parse_config({"seed": 2**32 - 1, "train": {"steps": 10**7, "lr": 1e308}})
    assert cfg.seed == 2**32 - 1 and cfg.train.lr == 1e308
    parse_config({"model": {"depth": 1000, "width": 16}})


def test_a_model_too_large_to_build_is_refused():
    msg = _config_error({"model": {"depth": 1000, "width": 65536}})
    assert msg.startswith("model.width:") and "parameters" in msg


def test_set_of_a_whole_section_is_refused():
    with pytest.raises(ConfigError, match=r"model is a section.*model\.depth=2"):
        apply_overrides({"model": {"depth": 10, "activation": "relu"}}, ["model={depth=2}"])
    with pytest.raises(ConfigError, match="is a table"):
        apply_overrides({}, ["model.depth={a=1}"])


def test_a_huge_learning_rate_diverges_not_fails(tmp_path):
    from vanishing.experiments.runner import run_experiment

    raw = {
        "task": {"name": "teacher", "n_train": 64, "n_test": 32, "n_features": 8},
        "model": {"depth": 2, "width": 8, "activation": "tanh"},
        "train": {"steps": 10, "batch_size": 16, "lr": 1e308, "eval_every": 5},
    }
    summary = run_experiment(raw, tmp_path / "run")
    assert summary["status"] == "diverged", summary
    assert summary["error"] is None and "non_finite" in summary["kinds"]
    for optimizer in ("adam", "momentum"):
        raw["train"]["optimizer"] = optimizer
        s = run_experiment(raw, tmp_path / optimizer)
        assert s["status"] == "diverged", s


def test_cli_run_refuses_unbounded_values_with_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("seed = 99999999999999999999\n")
    line = _one_error_line(*_cli(capsys, "run", cfg, "--out", tmp_path / "r")[::2])
    assert "seed: must be <= 4294967295" in line
    cfg.write_text("[model]\ndepth = 3\n")
    line = _one_error_line(
        *_cli(capsys, "run", cfg, "--out", tmp_path / "r", "--set", "model={depth=2}")[::2]
    )
    assert "model is a section" in line
    assert not (tmp_path / "r").exists()


def test_sweep_refuses_zero_workers_and_a_run_directory(good_run, tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text("seeds = [0]\n[model]\ndepth = [1]\nwidth = 4\n[train]\nsteps = 1\n")
    code, _, err = _cli(capsys, "sweep", cfg, "--out", tmp_path / "sw", "--workers", "0")
    assert code == 2 and "Traceback" not in err and "--workers" in err
    assert not (tmp_path / "sw").exists()
    d = _copy(good_run, tmp_path)
    before = sorted(p.name for p in d.iterdir())
    line = _one_error_line(*_cli(capsys, "sweep", cfg, "--out", d)[::2])
    assert "holds a run" in line
    assert sorted(p.name for p in d.iterdir()) == before


# ---- 3. API: one rule each -------------------------------------------------------------------


def test_pivot_of_an_unknown_param_names_the_valid_ones(good_run):
    run = vanishing.load_run(good_run)
    with pytest.raises(ValueError, match=r"'nope'.*'bias', 'weight'"):
        run.pivot("grad_norm", param="nope")
    assert not run.pivot("grad_norm", param="weight").empty


def test_a_newer_schema_is_refused_by_report_and_diagnose_alike(good_run, tmp_path, capsys):
    d = _copy(good_run, tmp_path)
    _edit_manifest(d, _set("schema_version", 99))
    for command in ("diagnose", "report"):
        line = _one_error_line(*_cli(capsys, command, d)[::2])
        assert "schema version 99" in line and "upgrade vanishing" in line
    assert not (d / "report.html").exists()
    from vanishing.report.data import RunData

    with pytest.raises(RunError, match="schema version 99"):
        RunData(d)


def test_a_run_without_layers_cannot_be_judged(good_run, tmp_path, capsys):
    from vanishing.diagnose.engine import NO_LAYERS

    d = _copy(good_run, tmp_path)
    _edit_manifest(d, lambda m: {k: v for k, v in m.items() if k != "layers"})
    diag = vanishing.load_run(d).diagnose()
    assert diag.findings == [] and NO_LAYERS in diag.notes
    assert NO_LAYERS == "the run lists no layers: nothing to judge"
    code, out, err = _cli(capsys, "diagnose", d)
    assert code == 0 and "No gradient-flow problems found" not in out
    assert "cannot judge" in out.lower() and NO_LAYERS in out
    code, out, _ = _cli(capsys, "report", d)
    page = (d / "report.html").read_text()
    assert code == 0 and NO_LAYERS in page and "badge ok" not in page


def test_a_failed_run_with_no_steps_is_not_called_healthy(tmp_path, capsys):
    from vanishing.experiments.runner import run_experiment

    empty = tmp_path / "no-mnist-here"
    empty.mkdir()
    summary = run_experiment(
        {"task": {"name": "mnist", "data_dir": str(empty)}}, tmp_path / "sweep" / "failed"
    )
    assert summary["status"] == "failed" and summary["kinds"] is None
    with vanishing.watch(mlp(depth=2), run_dir=tmp_path / "sweep" / "empty"):
        pass  # a run directory with a manifest and no steps
    line = _one_error_line(*_cli(capsys, "diagnose", tmp_path / "sweep" / "empty")[::2])
    assert "recorded no steps" in line
    code, _, err = _cli(capsys, "report", tmp_path / "sweep")  # a directory of runs
    assert code == 0, err
    page = (tmp_path / "sweep" / "report.html").read_text()
    assert "no steps recorded" in page
    assert ">healthy<" not in page and "badge ok" not in page


def test_cli_run_of_a_failed_run_does_not_say_healthy(tmp_path, capsys):
    from vanishing.cli import run as run_cli

    summary = {
        "status": "failed",
        "steps": 0,
        "train_loss": None,
        "test_loss": None,
        "test_metric": None,
        "metric_name": "accuracy",
        "first_last_ratio": None,
        "kinds": None,
        "seconds": 0.1,
        "error": "RuntimeError: boom",
    }
    run_cli.print_summary(summary, tmp_path / "r")
    out = capsys.readouterr().out
    assert "healthy" not in out and "no steps recorded" in out


# ---- 4. the report never follows a planted symlink ---------------------------------------------


def test_report_does_not_follow_a_symlink_planted_at_the_old_temporary_name(good_run, tmp_path):
    from vanishing.report.html import write_report

    d = _copy(good_run, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, d / ".report.html.tmp")
    page = write_report(d)
    assert victim.read_text() == "precious"
    assert page.is_file() and not page.is_symlink()
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]
