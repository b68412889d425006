"""Terminal views: the gradient strip, the live training view, the summary tables."""

import io
import json
import math
import sqlite3

import numpy as np
import pytest
import torch
from rich.console import Console

import vanishing
from helpers import mlp, train
from vanishing.report.terminal import (
    NONFINITE,
    SHADES,
    ZERO,
    TrainingView,
    gradient_strip,
    summary_table,
)


def _render(table, width=140):
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=False).print(table)
    return out.getvalue()


def test_strip_has_one_cell_per_layer_and_is_monotone_in_magnitude():
    rng = np.random.default_rng(0)
    for _ in range(50):
        values = 10 ** rng.uniform(-12, 2, size=rng.integers(1, 40))
        strip = gradient_strip(values)
        assert len(strip) == len(values)
        order = np.argsort(values)
        levels = [SHADES.index(strip[i]) for i in order]
        assert levels == sorted(levels)  # larger magnitude, never a lighter cell
        assert strip[int(np.argmax(values))] == SHADES[-1]
        if values.max() / values.min() >= 1e3:
            assert strip[int(np.argmin(values))] == SHADES[0]


def test_strip_shades_by_decades():
    # 9 decades over 4 steps of shade: log10 -9, -6.75, -4.5, -2.25, 0 are the level centres
    assert gradient_strip([1e-9, 10**-6.75, 10**-4.5, 10**-2.25, 1.0]) == SHADES
    assert gradient_strip([-1e-3, 1e-3]) == SHADES[-1] * 2  # sign does not matter
    # an even profile reads dark (the range is at least 3 decades): nothing vanishes
    assert set(gradient_strip([0.1, 0.2, 0.15])) == {SHADES[-1]}
    assert gradient_strip([1e-2, 1.0]) == SHADES[1] + SHADES[-1]  # 2 of 3 decades below
    s = gradient_strip([float("nan"), math.inf, 0.0, 1.0])
    assert s == NONFINITE + NONFINITE + ZERO + SHADES[-1]
    assert len({NONFINITE, ZERO, *SHADES}) == len(SHADES) + 2
    assert gradient_strip([1e-4, 1e-2], lo=-4, hi=0) == SHADES[0] + SHADES[2]
    assert gradient_strip([]) == ""


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_live_view_plain_text_is_rate_limited():
    out = io.StringIO()
    with TrainingView(total=1000, title="train", file=out) as view:
        assert not view.live
        for step in range(1, 1001):
            view.update(step, loss=1.0 / step, layer_values={"a": 1e-6, "b": 1e-3, "c": 1.0})
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 12  # every 10%, not every step
    assert lines[-1].startswith("train: step 1000/1000 (100%) loss 0.001")
    assert lines[-1].endswith("[" + gradient_strip([1e-6, 1e-3, 1.0]) + "]")
    assert "eta" in lines[1]


def test_live_view_stopped_early_prints_where_it_stopped():
    out = io.StringIO()
    with TrainingView(total=100, file=out) as view:
        for step in range(1, 38):
            view.update(step)
    assert out.getvalue().splitlines()[-1].startswith("training: step 37/100 (37%)")
    with pytest.raises(ValueError, match="positive"):
        TrainingView(total=0)


def test_live_view_on_a_terminal_draws_a_progress_bar(monkeypatch):
    monkeypatch.delenv("TERM", raising=False)
    out = _Tty()
    with TrainingView(total=10, title="fit", file=out) as view:
        assert view.live
        for step in range(1, 11):
            view.update(step, loss=0.5, layer_values={"a": 1e-9, "b": 1.0})
    text = out.getvalue()
    assert "fit" in text and "10/10" in text and "ETA" in text
    assert "[" + SHADES[0] + SHADES[-1] + "]" in text and "loss 0.5" in text


def test_live_view_with_a_monitor(tmp_path):
    torch.manual_seed(0)
    model = mlp(depth=6, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = io.StringIO()
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r") as mon:
        with TrainingView(total=5, file=out, every=0.5) as view:
            for step in range(1, 6):
                loss = train(model, opt, steps=1)[0]
                values = mon.latest("grad_norm")
                view.update(step, loss=loss, layer_values=values)
    assert list(values) == ["0", "2", "4", "6", "8", "10", "12"]
    strip = gradient_strip(list(values.values()))
    assert strip[0] in SHADES[:2] and strip[-1] == SHADES[-1]  # vanishing, visible
    assert out.getvalue().splitlines()[-1].endswith(f"[{strip}]")


def test_summary_tables(tmp_path):
    torch.manual_seed(0)
    model = mlp(depth=6, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r") as mon:
        train(model, opt, steps=4)
    run = vanishing.load_run(mon.run_dir)
    text = _render(summary_table(run))
    speed = run.pivot("grad_norm", param="bias").iloc[-1]
    assert "4 (0..3)" in text and f"{speed.iloc[0]:.3g}" in text
    assert "[" + gradient_strip(list(speed.iloc[:-1])) + "]" in text  # hidden layers only
    diag = run.diagnose()
    text = _render(summary_table(diag))
    assert "vanishing_gradient" in text and diag.findings[0].remedies[0].name in text

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    con = sqlite3.connect(sweep / "sweep.sqlite")
    con.execute(
        "CREATE TABLE runs (key TEXT PRIMARY KEY, params TEXT NOT NULL, seed INTEGER NOT NULL, "
        "config TEXT NOT NULL, status TEXT NOT NULL, summary TEXT, kinds TEXT, run_dir TEXT NOT NULL, "
        "started_at REAL, finished_at REAL, error TEXT)"
    )
    for i, (act, status) in enumerate((("sigmoid", "completed"), ("relu", "failed"))):
        summary = (
            {"test_metric": 0.8125, "first_last_ratio": 2.5e-7, "kinds": []}
            if status == "completed"
            else None
        )
        con.execute(
            "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                f"k{i}",
                json.dumps({"model.activation": act, "seed": 3}),
                3,
                "{}",
                status,
                json.dumps(summary) if summary else None,
                None,
                f"runs/k{i}",
                None,
                None,
                None,
            ),
        )
    con.commit()
    con.close()
    table = summary_table(sweep)
    assert table.row_count == 2
    text = _render(table)
    assert "sigmoid" in text and "failed" in text and "0.8125" in text and "2.5e-07" in text
    assert "healthy" in text


def test_compare_table_names_each_kind_once_styled_by_its_worst_finding(tmp_path):
    from vanishing import Diagnosis, Finding
    from vanishing.report.data import example_run
    from vanishing.report.terminal import compare_table

    # two findings of one kind (a NaN step, and the growth before it), then another kind
    diag = Diagnosis(
        [
            Finding("exploding_gradient", ["0"], "warning", "grows 30x"),
            Finding("exploding_gradient", ["0"], "critical", "NaN at step 3"),
            Finding("dead_units", ["1"], "warning", "40% dead"),
        ]
    )
    table = compare_table([example_run()], ["nan-run"], [diag])
    cell = table.columns[-1]._cells[0]
    assert cell.plain.splitlines() == ["exploding_gradient", "dead_units"]
    styles = {cell.plain[s.start : s.end].strip(): str(s.style) for s in cell.spans}
    assert styles == {"exploding_gradient": "bold red", "dead_units": "yellow"}
    assert _render(table).count("exploding_gradient") == 1
    assert "role by role" not in table.caption  # a chain of layers: first / last hidden
