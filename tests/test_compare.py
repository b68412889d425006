"""vanishing compare RUN [RUN ...] [-o FILE]: runs that live anywhere, side by side."""

import subprocess
import sys

import torch
from torch import nn

import vanishing


def _cli(*args, cwd=None, columns=80):
    import os

    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, "-m", "vanishing", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def _record(run_dir, depth, steps=4):
    torch.manual_seed(0)
    layers, d = [], 8
    for _ in range(depth):
        layers += [nn.Linear(d, 16), nn.Sigmoid()]
        d = 16
    model = nn.Sequential(*layers, nn.Linear(d, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(torch.randn(32, 8)), torch.randint(0, 2, (32,))
            ).backward()
            opt.step()


def test_compare_prints_a_summary_that_fits_80_columns_and_writes_html(tmp_path):
    _record(tmp_path / "a" / "run", 10)
    _record(tmp_path / "b" / "run", 2, steps=3)
    page = tmp_path / "out" / "compare.html"
    r = _cli("compare", tmp_path / "a" / "run", tmp_path / "b" / "run", "-o", page)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80, r.stdout
    assert "a/run" in r.stdout and "b/run" in r.stdout  # the distinguishing part of each path
    assert "vanishing_gradient" in r.stdout and "healthy" in r.stdout
    deep = vanishing.load_run(tmp_path / "a" / "run")
    assert f"{deep.first_last_ratio():.3g}" in r.stdout
    assert lines[-1] == str(page)
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert text.count('<div class="card">') == 2 and text.count("<img") >= 3
    assert "a/run" in text and "vanishing_gradient" in text


def test_compare_bad_input_exits_2_with_one_error_line(tmp_path):
    _record(tmp_path / "r", 2, steps=2)
    for args in (
        ("compare", tmp_path / "r", tmp_path / "nope"),
        ("compare", tmp_path, tmp_path / "r"),  # not a run directory
        ("compare", tmp_path / "r", "-o", tmp_path),  # -o is a directory
    ):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert "Traceback" not in r.stderr and r.stdout == ""
