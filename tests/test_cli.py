"""The command line: exit codes 0 / 1 (problems found) / 2 (bad input), no tracebacks."""

import json
import subprocess
import sys

import torch
from torch import nn

import vanishing


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "vanishing", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
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
    r = _cli("demo", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "first / last" in r.stdout and "Runs written to" in r.stdout
    (demo_dir,) = tmp_path.glob("demo-*")
    assert r.stdout.strip().endswith(str(demo_dir / "report.html"))
    page = (demo_dir / "report.html").read_text()
    summaries = [json.loads(p.read_text()) for p in sorted(demo_dir.glob("*/summary.json"))]
    assert len(summaries) == 8 and all(0 <= s["test_metric"] <= 1 for s in summaries)
    assert summaries[0]["label"].startswith("sigmoid, N(0,1)") and "vanishing_gradient" in page
