"""The command line: exit codes 0 / 1 (problems found) / 2 (bad input), no tracebacks."""

import json
import os
import subprocess
import sys

import torch
from torch import nn

import vanishing


def _cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "vanishing", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
    )


def _record(run_dir, depth):
    torch.manual_seed(0)
    layers, d = [], 8
    for _ in range(depth):
        layers += [nn.Linear(d, 16), nn.Sigmoid()]
        d = 16
    model = nn.Sequential(*layers, nn.Linear(d, 2))
    with vanishing.watch(model, run_dir=run_dir):
        nn.functional.cross_entropy(
            model(torch.randn(32, 8)), torch.randint(0, 2, (32,))
        ).backward()


def test_diagnose_exit_codes_and_json(tmp_path):
    _record(tmp_path / "deep", 10)
    _record(tmp_path / "shallow", 2)
    deep = _cli("diagnose", tmp_path / "deep")
    assert deep.returncode == 1 and "vanishing_gradient" in deep.stdout
    out = _cli("diagnose", tmp_path / "deep", "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout)["findings"][0]["kind"] == "vanishing_gradient"
    ok = _cli("diagnose", tmp_path / "shallow")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_bad_input_exits_2_with_one_line(tmp_path):
    for args in (("diagnose", tmp_path / "nope"), ("diagnose",), ("no-such-command",)):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr


def test_version_and_quick_demo(tmp_path):
    assert _cli("--version").stdout.startswith("vanishing ")
    r = _cli("demo", "--quick", "--out", tmp_path, cwd=tmp_path, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    # fits an 80-column terminal: tables and paragraphs wrap (a long path is left whole)
    wide = [line for line in r.stdout.splitlines() if len(line) > 80 and str(tmp_path) not in line]
    assert not wide, wide
    assert "first / last" in r.stdout and "Runs written to" in r.stdout
    (demo_dir,) = tmp_path.glob("demo-*")
    assert r.stdout.strip().endswith(str(demo_dir / "report.html"))
    page = (demo_dir / "report.html").read_text()
    summaries = [json.loads(p.read_text()) for p in sorted(demo_dir.glob("*/summary.json"))]
    assert len(summaries) == 8 and all(0 <= s["test_metric"] <= 1 for s in summaries)
    assert summaries[0]["label"].startswith("sigmoid, N(0,1)") and "vanishing_gradient" in page
    # the demo ends with the repair of its baseline; the change it prints is real code: run on
    # a fresh baseline and trained independently, it learns where the baseline does not
    assert "The fix measured to work" in r.stdout
    rep = json.loads((demo_dir / "repair.json").read_text())
    assert rep["candidates"][0]["verdict"] == "fixed"
    # the page tells the same story: its verdict and conclusion end with the measured fix
    verdict = page.split('<p class="verdict')[1].split("</p>")[0]
    assert f"the fix measured to work: {rep['best']} (repair.html)." in verdict
    conclusion = page.split("<h2>Conclusion</h2>")[1].split("<h2>")[0]
    assert f"The fix measured to work: {rep['best']} " in conclusion
    assert 'href="repair.html"' in page and (demo_dir / "repair.html").is_file()
    import torch

    from vanishing.experiments.data import digits
    from vanishing.experiments.models import mlp
    from vanishing.experiments.train import train_classifier

    losses = {}
    for fixed in (False, True):
        torch.manual_seed(0)
        model = mlp(64, 10, depth=10, width=16, activation="sigmoid", init="normal")
        if fixed:
            exec((demo_dir / "repair.py").read_text(), {"model": model})
        result = train_classifier(model, digits(), run_dir=tmp_path / f"t{fixed}", steps=80)
        losses[fixed] = result.final_loss
    assert losses[True] < 0.8 * losses[False], losses


def test_dash_h_is_help_for_every_command():
    from vanishing.cli.app import COMMAND_MODULES

    for args in ((), *((name,) for name in COMMAND_MODULES)):
        short, long = _cli(*args, "-h"), _cli(*args, "--help")
        assert short.returncode == 0 and short.stdout == long.stdout, (args, short.stderr)
        assert "Usage:" in short.stdout


def test_every_commands_help_paragraphs_are_rewrapped_to_the_terminal():
    # rich keeps a help text's single newlines: a paragraph written over several source lines
    # showed in `vanishing --help` as ragged lines of the source's width
    import typer

    from vanishing.cli.app import app

    group = typer.main.get_command(app)
    assert len(group.commands) >= 8
    for name, command in group.commands.items():
        for paragraph in (command.help or "").strip().split("\n\n"):
            assert "\n" not in paragraph.strip(), (name, paragraph)
    listing = _cli("--help", env={"COLUMNS": "80"}).stdout
    assert (
        "│ fix        Repair an experiment: its remedies tried for K steps, the best    │"
        in listing
    )


def test_a_bad_set_is_named_as_the_set_not_the_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\ndepth = 3\n")
    r = _cli("run", cfg, "--out", tmp_path / "r", "--set", "model.depth=abc")
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "error: --set 'model.depth=abc': model.depth: expected an integer, got 'abc'"
    )
    r = _cli("run", cfg, "--out", tmp_path / "r", "--set", "depth=5")
    assert r.returncode == 2 and "did you mean model.depth?" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    cfg.write_text("[model]\ndepth = 'deep'\n")  # an error in the file still names the file
    r = _cli("run", cfg, "--out", tmp_path / "r", "--set", "model.width=8")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {cfg}: model.depth:")


def test_diagnose_prints_each_finding_once_within_80_columns(tmp_path):
    import os

    _record(tmp_path / "deep", 10)
    r = subprocess.run(
        [sys.executable, "-m", "vanishing", "diagnose", str(tmp_path / "deep")],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert r.returncode == 1, r.stderr
    assert max(map(len, r.stdout.splitlines())) <= 80, r.stdout
    diag = vanishing.load_run(tmp_path / "deep").diagnose()
    verdict = r.stdout.split("\n\n")[0]
    assert verdict.startswith("Vanishing gradient") and "best remedy" in verdict  # first
    for f in diag.findings:  # each finding once
        assert r.stdout.count(f"] {f.kind}:") == 1, r.stdout


def test_diagnose_on_a_directory_of_runs_names_them(tmp_path):
    _record(tmp_path / "runs" / "a", 2)
    _record(tmp_path / "runs" / "b", 2)
    r = _cli("diagnose", tmp_path / "runs")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "directory of runs" in r.stderr and "a, b" in r.stderr, r.stderr
