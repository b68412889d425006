"""`vanishing fix CONFIG`: the fixed config is valid, says what changed, and trains better on its
own (the check is an independent run of the fixed config, not the repair's probe)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vanishing
from vanishing.experiments.config import load_config, read_toml
from vanishing.experiments.fix import config_changes, to_toml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "vanishing", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "name", sorted(p.name for p in CONFIGS.glob("*.toml") if "sweep" not in p.name)
)
def test_to_toml_round_trips_every_shipped_config(tmp_path, name):
    config = load_config(CONFIGS / name)
    (tmp_path / "c.toml").write_text(to_toml(config.to_dict()))
    assert load_config(tmp_path / "c.toml") == config


def test_config_changes_follow_the_remedy_and_the_probes_numbers():
    cfg = {"model": {"kind": "rnn"}, "train": {"lr": 0.5}}
    assert config_changes("batch_norm", {}, cfg) == {"model.norm": "batch"}
    assert config_changes("orthogonal_init", {}, cfg) == {
        "model.init": "orthogonal",
        "model.recurrent_init": "orthogonal",
    }
    assert config_changes("lower_learning_rate", {"lr_factor": 0.1}, cfg) == {"train.lr": 0.05}
    assert config_changes("lstm", {}, cfg) == {"model.cell": "lstm"}
    assert config_changes("zero_init_residual", {}, cfg) is None
    # a model change probed at another rate (repair's round two) sets both
    assert config_changes("orthogonal_init", {"lr_factor": 10.0}, cfg) == {
        "model.init": "orthogonal",
        "model.recurrent_init": "orthogonal",
        "train.lr": 5.0,
    }
    assert config_changes("zero_init_residual", {"lr_factor": 10.0}, cfg) is None


def test_fix_deep_sigmoid_writes_a_config_that_trains(tmp_path):
    out = tmp_path / "fix"
    r = _cli("fix", CONFIGS / "deep_sigmoid.toml", "-k", 60, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    fixed = load_config(out / "fixed.toml")
    original = load_config(CONFIGS / "deep_sigmoid.toml")
    rep = json.loads((out / "repair.json").read_text())
    chosen = next(c for c in rep["candidates"] if c["verdict"] == "fixed")
    changed = {
        f"{s}.{k}"
        for s in ("model", "train")
        for k, v in getattr(fixed, s).model_dump().items()
        if getattr(original, s).model_dump()[k] != v
    }
    assert changed and changed == set(
        config_changes(chosen["remedy"], chosen["options"], original.to_dict())
    )
    assert f"Fix: {chosen['remedy']}" in r.stdout and (out / "report.html").is_file()
    page = (out / "repair.html").read_text()
    assert f"{chosen['remedy']} fixes it" in page and page.count("<tr>") >= len(rep["candidates"])
    # the independent check: the fixed config built and trained on its own beats the baseline
    before = vanishing.load_run(out / "probes" / "baseline").steps["loss"].tolist()
    after = vanishing.load_run(out / "check").steps["loss"].tolist()
    assert len(after) == 60 and sum(after[-6:]) < 0.8 * sum(before[-6:])
    assert "vanishing_gradient" not in vanishing.load_run(out / "check").diagnose().kinds
    assert read_toml(out / "fixed.toml")["name"] == "deep-sigmoid"


def test_fix_bad_input_is_one_line_exit_2(tmp_path):
    r = _cli("fix", tmp_path / "nope.toml")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope.toml'}: no such config file"
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = _cli("fix", CONFIGS / "deep_sigmoid.toml", "--out", tmp_path / "full")
    assert (
        r.returncode == 2 and "not an empty directory" in r.stderr and "Traceback" not in r.stderr
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ndepth = -1\n")
    r = _cli("fix", bad, "--out", tmp_path / "o")
    assert (
        r.returncode == 2 and r.stderr.startswith(f"error: {bad}") and "Traceback" not in r.stderr
    )
