"""One run, one first/last number: every place that shows the speed of learning of the first
over the last hidden layer shows recorder.semantics.first_last_ratio of the recorded run.

Each surface is driven through its real code path (the CLI in a subprocess, the sweep store,
the HTML page, the terminal table, the demo's printed table) and read back from what it printed
or wrote.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vanishing
from vanishing.report.formatting import RATIO_LABEL, stat_text
from vanishing.report.html import write_report
from vanishing.report.names import short_names

CONFIG = """name = "same-numbers"
seed = 0
[task]
name = "teacher"
n_train = 256
n_test = 64
[model]
kind = "mlp"
depth = 5
width = 16
activation = "sigmoid"
init = "glorot_standard"
[train]
steps = 25
eval_every = 25
"""


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "vanishing", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def _report_ratio(page: str) -> str:
    """The number the HTML summary shows beside the ratio's label."""
    m = re.search(re.escape(RATIO_LABEL) + r"</th><td>([^<]+)</td>", page)
    assert m, "the report shows no first / last ratio"
    return m.group(1)


def _terminal_text(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text()


def test_cli_run_summary_report_and_terminal_show_one_number(tmp_path):
    from vanishing.report.terminal import run_table

    (tmp_path / "c.toml").write_text(CONFIG)
    out = tmp_path / "run"
    r = _cli("run", tmp_path / "c.toml", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ratio = vanishing.load_run(out).first_last_ratio()
    assert ratio is not None and ratio < 0.5
    assert json.loads((out / "summary.json").read_text())["first_last_ratio"] == ratio
    line = next(x for x in r.stdout.splitlines() if "first / last hidden speed" in x)
    assert f"{ratio:.2e}" in line
    assert _report_ratio((out / "report.html").read_text()) == f"{ratio:.3g}"
    assert f"{ratio:.3g}" in _terminal_text(run_table(out))


def test_sweep_store_row_and_sweep_report_show_the_runs_number(tmp_path):
    (tmp_path / "s.toml").write_text(CONFIG)
    sweep = tmp_path / "sweep"
    r = _cli("sweep", tmp_path / "s.toml", "--out", sweep, "-w", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from vanishing.experiments.sweep import read_sweep
    from vanishing.report.terminal import sweep_table

    (row,) = read_sweep(sweep)
    ratio = vanishing.load_run(sweep / row["run_dir"]).first_last_ratio()
    assert ratio is not None and row["summary"]["first_last_ratio"] == ratio
    assert f" {stat_text(ratio)} " in r.stdout  # the CLI's sweep table: the same text
    page = (sweep / "report.html").read_text()
    assert f'<td class="num">{ratio:.3g}</td>' in page  # the sweep page's table
    assert f"{ratio:.3g}" in _terminal_text(sweep_table(sweep))
    run_page = write_report(sweep / row["run_dir"], tmp_path / "one.html").read_text()
    assert _report_ratio(run_page) == f"{ratio:.3g}"


@pytest.mark.slow
def test_demo_table_summaries_and_report_show_each_runs_number(tmp_path, capsys):
    from vanishing.cli.demo import run_demo

    rows = run_demo(out=tmp_path, steps=8)
    printed = capsys.readouterr().out
    page = write_report(rows[0].run_dir.parent).read_text()
    for row in rows:
        ratio = vanishing.load_run(row.run_dir).first_last_ratio()
        assert ratio is not None and row.ratio == ratio
        summary = json.loads((Path(row.run_dir) / "summary.json").read_text())
        assert summary["first_last_ratio"] == ratio
        line = next(
            x
            for x in printed.splitlines()
            if x.startswith("│ ")
            and (cell := x[2:].split("│")[0].strip())
            and row.label.startswith(cell)
        )
        assert f" {stat_text(ratio)} " in line, (row.label, line)
        assert f'<td class="num">{ratio:.3g}</td>' in page  # the collection's table of runs
    per_layer = printed.split("Per-layer speed")[1].splitlines()
    first = short_names(rows[0].names)[0]  # rows are named by module, as the diagnosis does
    first_layer = next(x for x in per_layer if re.match(rf"│\s+'{re.escape(first)}' │", x))
    assert f" {stat_text(rows[0].ratio)} " in first_layer  # the per-layer table agrees
