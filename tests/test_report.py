"""Reports: bounded reading, plots that show the recorded numbers, the HTML page, the CLI."""

import html
import importlib.util
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import vanishing
from helpers import QuickGELU, mlp, train
from vanishing.report import data as data_mod
from vanishing.report import plots
from vanishing.report.data import RunData
from vanishing.report.html import write_report

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_side_files(run_dir, name="deep-sigmoid", steps=30):
    config = {
        "name": name,
        "seed": 0,
        "task": {"name": "digits"},
        "model": {"kind": "mlp", "depth": 6, "activation": "sigmoid"},
        "train": {"optimizer": "sgd", "lr": 0.5, "steps": steps},
        "monitor": {"stats": "all", "every": 1},
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    ev = pd.DataFrame(
        {
            "step": [9, 9, 19, 19, 29, 29],
            "split": ["train", "test"] * 3,
            "loss": [1.1, 1.2, 1.0, 1.15, 0.9, 1.1],
            "metric": [0.3, 0.25, 0.4, 0.3, 0.5, 0.35],
            "metric_name": ["accuracy"] * 6,
        }
    )
    ev.to_parquet(run_dir / "eval.parquet")
    summary = {
        "status": "completed",
        "steps": steps,
        "train_loss": 0.9,
        "test_loss": 1.1,
        "test_metric": 0.35,
        "metric_name": "accuracy",
        "first_last_ratio": 1e-4,
        "kinds": ["vanishing_gradient"],
        "seconds": 1.0,
        "error": None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _record(run_dir, *, depth=6, steps=30, act=nn.Sigmoid, flush_every=7, stats="all", opt=True):
    torch.manual_seed(0)
    model = mlp(depth=depth, width=16, act=act)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with vanishing.watch(
        model,
        optimizer=optimizer if opt else None,
        run_dir=run_dir,
        flush_every=flush_every,
        stats=stats,
    ):
        train(model, optimizer, steps=steps)
    return Path(run_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = _record(tmp_path_factory.mktemp("report") / "run")
    _write_side_files(d)
    return d


# ---- reading ------------------------------------------------------------------------------


def test_small_run_is_read_exactly(run_dir):
    run = vanishing.load_run(run_dir)
    data = RunData(run_dir)
    assert data.step_list == run.steps["step"].tolist()
    assert len(data.buckets) == len(run.steps)  # no downsampling: one bucket per step
    for stat, param in (
        ("grad_norm", "bias"),
        ("error_norm", None),
        ("act_deriv_mean", None),
        ("update_ratio", "weight"),
    ):
        table = run.pivot(stat, param=param)
        table = table.dropna(axis=1, how="all")
        agg = data.agg(stat, param)
        assert list(agg.mean.columns) == list(table.columns)  # forward order
        np.testing.assert_allclose(agg.mean.to_numpy(), table.to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(agg.lo.to_numpy(), table.to_numpy(), rtol=1e-12)


def test_a_torn_flush_is_ignored(tmp_path):
    d = _record(tmp_path / "run", steps=10, flush_every=4)
    before = RunData(d).agg("grad_norm", "weight").hi.to_numpy()
    torn = pd.read_parquet(d / "metrics" / "part-00000.parquet")
    torn["step"] += 100  # a flush whose steps part was never written
    torn["grad_norm"] = 1e30
    torn.to_parquet(d / "metrics" / "part-00009.parquet")
    data = RunData(d)
    assert data.step_list == list(range(10))
    np.testing.assert_array_equal(data.agg("grad_norm", "weight").hi.to_numpy(), before)
    assert len(vanishing.load_run(d).metrics) == len(data.samples)  # every step sampled


def test_hidden_layers_match_the_diagnosis_view(run_dir):
    from vanishing.diagnose.view import RunView

    assert RunData(run_dir).hidden == RunView(vanishing.load_run(run_dir)).hidden


def test_speed_before_batch_norm_is_read_from_the_norms_bias(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.Sigmoid(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
        nn.Sigmoid(),
        nn.Linear(8, 3),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "bn"):
        train(model, opt, steps=3)
    run = vanishing.load_run(tmp_path / "bn")
    bias = run.pivot("grad_norm", param="bias")
    assert (bias["0"] < 1e-4 * bias["1"]).all()  # the norm cancels the linear bias' gradient
    speed = RunData(tmp_path / "bn").speed().mean
    assert list(speed.columns) == ["0", "3"]
    np.testing.assert_allclose(speed["0"], bias["1"], rtol=1e-12)
    np.testing.assert_allclose(speed["3"], bias["4"], rtol=1e-12)


def test_downsampling_bounds_buckets_and_keeps_first_last_and_extremes(tmp_path, monkeypatch):
    bench = _bench()
    d = bench.make_run(tmp_path / "syn", layers=4, steps=600, flush_every=20, spike_step=333)
    full = pd.read_parquet(d / "metrics")
    data = RunData(d, max_points=20, max_samples=10)
    b = data.buckets
    assert len(b) <= 20
    assert (b["start"].iloc[0], b["end"].iloc[0]) == (0, 0)
    assert (b["start"].iloc[-1], b["end"].iloc[-1]) == (599, 599)
    assert b["count"].sum() == 600
    agg = data.agg("grad_norm", "weight")
    for layer in agg.mean.columns:
        rows = full[(full.layer == layer) & (full.param == "weight")].set_index("step")["grad_norm"]
        assert agg.hi[layer].max() == pytest.approx(rows.max(), rel=1e-12)
        assert agg.lo[layer].min() == pytest.approx(rows.min(), rel=1e-12)
        for i, (start, end) in enumerate(zip(b["start"], b["end"])):
            in_bucket = rows.loc[start:end]
            geo = 10 ** np.log10(in_bucket).mean()
            assert agg.mean[layer].iloc[i] == pytest.approx(geo, rel=1e-9)
    # the planted spike is the first layer's maximum
    first = agg.mean.columns[0]
    spike_value = full[(full.step == 333) & (full.layer == first) & (full.param == "weight")]
    assert agg.hi[first].max() == pytest.approx(float(spike_value["grad_norm"].iloc[0]))
    # the same numbers when the pass reads and merges in many small chunks
    monkeypatch.setattr(data_mod, "_CHUNK_ROWS", 50)
    monkeypatch.setattr(data_mod, "_PARTIAL_ROWS", 100)
    small = RunData(d, max_points=20, max_samples=10).agg("grad_norm", "weight")
    np.testing.assert_allclose(small.mean.to_numpy(), agg.mean.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(small.hi.to_numpy(), agg.hi.to_numpy(), rtol=1e-12)
    # samples: bounded, and always the first, middle and last step
    assert len(data.sample_steps) <= 11 and {0, 299, 599} <= set(data.sample_steps)


def test_row_budget_reads_few_parts_but_keeps_the_global_extremes(tmp_path):
    bench = _bench()
    d = bench.make_run(
        tmp_path / "syn", layers=3, steps=1000, flush_every=10, spike_step=555, spike=1e12
    )
    data = RunData(d, max_points=50, max_rows=4000)
    rows_per_part = data.parts[0]["rows"]
    assert len(data.parts) == 100
    read = data.read_parts
    assert len(read) < 100
    assert (
        sum(p["rows"] for p in read)
        <= 4000 + 2 * len(data_mod.LOG_STATS + data_mod.LINEAR_STATS) * rows_per_part
    )
    assert read[0] is data.parts[0] and read[-1] is data.parts[-1]
    assert data.coverage[0] < data.coverage[1] == 1000
    full = pd.read_parquet(d / "metrics")
    agg = data.agg("grad_norm", "weight")
    assert agg.hi.max().max() == pytest.approx(full["grad_norm"].max())  # the spike at step 555
    assert 555 in data.metric_steps
    assert data.metric_steps[0] == 0 and data.metric_steps[-1] == 999


# ---- plots ----------------------------------------------------------------------------------


def test_heatmap_shows_log10_of_the_recorded_speeds(run_dir):
    run = vanishing.load_run(run_dir)
    fig = plots.speed_heatmap(run)
    z = fig.axes[0].collections[0].get_array()
    speed = run.pivot("grad_norm", param="bias")
    hidden = RunData(run_dir).hidden
    expected = np.log10(speed[hidden].to_numpy().T)
    assert z.shape == expected.shape
    np.testing.assert_allclose(np.asarray(z), expected, rtol=1e-9)
    # vanishing: the first hidden layer's speed is far below the last's, every step
    assert (expected[0] < expected[-1] - 2).all()


def test_depth_profile_plots_the_metrics_table(run_dir):
    run = vanishing.load_run(run_dir)
    fig = plots.depth_profile(run)
    steps = run.steps["step"].tolist()
    chosen = [steps[0], steps[(len(steps) - 1) // 2], steps[-1]]
    grad_ax, err_ax = fig.axes[:2]
    assert [line.get_label() for line in grad_ax.get_lines()] == [f"step {s}" for s in chosen]
    grad = run.pivot("grad_norm", param="weight").dropna(axis=1, how="all")
    err = run.pivot("error_norm").dropna(axis=1, how="all")
    for line, s in zip(grad_ax.get_lines(), chosen):
        np.testing.assert_allclose(line.get_ydata(), grad.loc[s].to_numpy(), rtol=1e-12)
    for line, s in zip(err_ax.get_lines(), chosen):
        np.testing.assert_allclose(line.get_ydata(), err.loc[s].to_numpy(), rtol=1e-12)
    assert grad_ax.get_yscale() == "log"


def test_speed_curves_one_line_per_hidden_layer(run_dir):
    fig = plots.speed_curves(run_dir)
    ax = fig.axes[0]
    hidden = RunData(run_dir).hidden
    assert [line.get_label() for line in ax.get_lines()] == hidden
    assert ax.get_yscale() == "log" and "step" in ax.get_xlabel()


def test_aggregation_scales_come_from_the_column_registry():
    from vanishing.recorder.columns import BUILTIN, DERIVED_RATIOS, scale_of
    from vanishing.recorder.schema import ACTIVATION_STATS

    assert data_mod.LOG_STATS == (
        "grad_norm", "param_norm", "update_norm", "grad_ratio", "update_ratio", "error_norm",
    )  # fmt: skip
    assert tuple(ACTIVATION_STATS) == data_mod.LINEAR_STATS
    ratios = {name for name, _, _ in DERIVED_RATIOS}
    for name in data_mod.LOG_STATS:
        assert name in ratios or scale_of(name) == "log", name
    for name in data_mod.LINEAR_STATS:
        assert scale_of(name) == "linear", name
    metrics = {c.name for c in BUILTIN if c.level in ("param", "module")}
    counted = {c.name for c in BUILTIN if c.reduce == "sum" and c.level == "param"}
    auxiliary = set(data_mod.AUXILIARY)  # the error's entry count: read, not shown
    assert auxiliary <= metrics
    assert (
        set(data_mod.LOG_STATS + data_mod.LINEAR_STATS) == (metrics - counted - auxiliary) | ratios
    )


def test_activation_bound_matches_the_stats_module():
    """The plotted bounds are the registry's, and both are the sup of |phi'| that autograd
    samples over a fine grid, for each kind's default module (no tautology)."""
    import torch

    from vanishing import activations

    assert set(plots.MAX_DERIVATIVE) == set(activations.kinds())
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64).unsqueeze(1).repeat(1, 3)
    for kind in activations.kinds():
        entry = activations.get(kind)
        assert plots.MAX_DERIVATIVE[kind] == pytest.approx(entry.max_derivative(), rel=1e-6)
        if kind == "quick_gelu":  # Hugging Face's class (CLIP), no torch module of its own
            module = QuickGELU().double()
        else:
            module = getattr(torch.nn, entry.classes[0])().double()  # the stock torch module
        x = z.clone().requires_grad_(True)
        (d,) = torch.autograd.grad(module(x).sum(), x)
        assert plots.MAX_DERIVATIVE[kind] == pytest.approx(float(d.abs().max()), rel=1e-4), kind


def test_activation_plot_shows_the_derivative_and_its_bound(run_dir):
    run = vanishing.load_run(run_dir)
    fig = plots.activations(run)
    deriv_ax = fig.axes[1]
    last = run.steps["step"].iloc[-1]
    deriv = run.pivot("act_deriv_mean").dropna(axis=1, how="all")
    line = [x for x in deriv_ax.get_lines() if x.get_label() == f"mean φ'(z), step {last}"][0]
    np.testing.assert_allclose(line.get_ydata(), deriv.loc[last].to_numpy(), rtol=1e-12)
    bound = [x for x in deriv_ax.get_lines() if "bound" in x.get_label()][0]
    assert set(np.asarray(bound.get_ydata(), float)) == {0.25}  # sigmoid
    assert (line.get_ydata() <= 0.25).all()


def test_activation_band_spans_the_recorded_percentiles(run_dir):
    """30 steps fit in the buckets, so each band edge is one step's recorded percentile."""
    run = vanishing.load_run(run_dir)
    fig = plots.activations(run)
    ax = fig.axes[0]
    assert "percentile" in ax.get_ylabel()
    first_layer = run.pivot("act_p02").dropna(axis=1, how="all").columns[0]
    low = run.pivot("act_p02")[first_layer].to_numpy()
    high = run.pivot("act_p98")[first_layer].to_numpy()
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(low.min()) and band.max() == pytest.approx(high.max())
    assert (low <= high).all()
    # legible with many layers: a line per layer, a band for the first and the last only
    assert len(ax.get_lines()) > 2 and len(ax.collections) == 2


def test_absent_data_gives_no_plot(tmp_path):
    d = _record(tmp_path / "params", stats="parameters", opt=False, steps=4)
    assert plots.activations(d) is None
    assert plots.saturation(d) is None
    assert plots.temporal_profile(d) is None
    assert plots.update_ratio(d) is None  # no optimizer, no updates
    assert plots.loss_curves(d) is not None  # the steps table always has the loss
    assert len(plots.loss_curves(d).axes) == 1  # no eval.parquet: no metric panel


def test_loss_and_eval_curves(run_dir):
    fig = plots.loss_curves(run_dir)
    ax, ax2 = fig.axes
    labels = [x.get_label() for x in ax.get_lines()]
    assert labels == ["training loss (per step)", "test loss (eval)", "train loss (eval)"]
    test = [x for x in ax2.get_lines() if x.get_label() == "test"][0]
    assert list(test.get_ydata()) == [0.25, 0.3, 0.35]
    steps = vanishing.load_run(run_dir).steps
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), steps["loss"].to_numpy())


def test_temporal_profile_of_a_recurrent_layer(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(3, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "rnn"):
        for _ in range(3):
            opt.zero_grad()
            x, y = torch.randn(4, 20, 3), torch.randint(0, 2, (4,))
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    fig = plots.temporal_profile(tmp_path / "rnn")
    ax = fig.axes[0]
    t = vanishing.load_run(tmp_path / "rnn").temporal
    last = t[t.step == 2].sort_values("t")
    line = [x for x in ax.get_lines() if x.get_label() == "step 2"][0]
    np.testing.assert_allclose(line.get_ydata(), last["grad_norm"].to_numpy(), rtol=1e-12)
    assert ax.get_yscale() == "log"


def test_save_figure_writes_png_and_svg(run_dir, tmp_path):
    png, svg = plots.save_figure(plots.speed_curves(run_dir), tmp_path / "out" / "speed")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in svg.read_text()[:400]
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.std() > 0.05


def _sweep(tmp_path, run_dirs=()):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    con = sqlite3.connect(sweep / "sweep.sqlite")
    con.execute(
        "CREATE TABLE runs (key TEXT PRIMARY KEY, params TEXT NOT NULL, seed INTEGER NOT NULL, "
        "config TEXT NOT NULL, status TEXT NOT NULL, summary TEXT, kinds TEXT, run_dir TEXT NOT NULL, "
        "started_at REAL, finished_at REAL, error TEXT)"
    )
    expected = {}
    i = 0
    for act in ("sigmoid", "relu"):
        for depth in (2, 5, 10):
            for seed in (0, 1):
                acc = (0.9 if act == "relu" else 0.95 - 0.08 * depth) + 0.01 * seed
                expected.setdefault(act, {}).setdefault(depth, []).append(acc)
                params = {"model.activation": act, "model.depth": depth, "seed": seed}
                summary = {
                    "status": "completed",
                    "test_metric": acc,
                    "metric_name": "accuracy",
                    "first_last_ratio": 10.0 ** (-depth if act == "sigmoid" else 0),
                    "kinds": ["vanishing_gradient"] if act == "sigmoid" else [],
                }
                key = f"{i:016x}"
                rd = f"runs/{key}"
                if i < len(run_dirs):
                    (sweep / "runs").mkdir(exist_ok=True)
                    (sweep / rd).symlink_to(run_dirs[i], target_is_directory=True)
                con.execute(
                    "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        key,
                        json.dumps(params),
                        seed,
                        json.dumps({"name": "s"}),
                        "completed",
                        json.dumps(summary),
                        json.dumps(summary["kinds"]),
                        rd,
                        0.0,
                        1.0,
                        None,
                    ),
                )
                i += 1
    con.execute(
        "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            "pendingkey000000",
            json.dumps({"model.activation": "tanh", "model.depth": 2, "seed": 0}),
            0,
            "{}",
            "pending",
            None,
            None,
            "runs/pendingkey000000",
            None,
            None,
            None,
        ),
    )
    con.commit()
    con.close()
    (sweep / "sweep.toml").write_text('name = "<b>depth</b> sweep"\n')
    return sweep, expected


def test_sweep_metric_one_line_per_remedy_with_seed_spread(tmp_path):
    sweep, expected = _sweep(tmp_path)
    fig = plots.sweep_metric(sweep, "test_metric")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "model.depth"
    lines = {x.get_label(): x for x in ax.get_lines()}
    assert set(lines) == {"activation=relu (2 seeds)", "activation=sigmoid (2 seeds)"}
    sig = lines["activation=sigmoid (2 seeds)"]
    assert list(sig.get_xdata()) == [2, 5, 10]
    np.testing.assert_allclose(
        sig.get_ydata(), [np.mean(expected["sigmoid"][d]) for d in (2, 5, 10)]
    )
    assert len(ax.collections) == 2  # one seed band per line
    ratio = plots.sweep_metric(sweep, "first_last_ratio")
    assert ratio.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="not a swept field"):
        plots.sweep_metric(sweep, x="model.width")


# ---- HTML -------------------------------------------------------------------------------------


def _check_self_contained(text):
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert "@import" not in text and "url(" not in text


def test_run_report(run_dir):
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    text = out.read_text()
    _check_self_contained(text)
    shown = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', text)
    assert shown == [name for name, _ in plots.RUN_PLOTS if name != "temporal"]  # no RNN
    assert text.count("<img") == len(shown)
    diag = vanishing.load_run(run_dir).diagnose()
    for f in diag.findings:
        assert f.kind in text
        for r in f.remedies:
            assert f"<b>{r.name}</b>" in text
    assert "deep-sigmoid" in text  # config name
    assert "<th>test (eval at step 29)</th><td>loss 1.1, accuracy 35.0%</td>" in text
    assert "&quot;lr&quot;: 0.5" in text  # config.json, escaped
    for name in RunData(run_dir).layers:  # the layer table lists every module
        assert f"<td><code>{name}</code></td>" in text


def test_every_user_string_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict(
                {
                    evil: nn.Linear(5, 8),
                    "a&b": nn.Sigmoid(),
                    "c": nn.Linear(8, 8),
                    "d$x$": nn.Sigmoid(),
                    "e": nn.Linear(8, 3),
                }
            )

        def forward(self, x):
            for m in self.blocks.values():
                x = m(x)
            return x

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = tmp_path / "evil"
    with vanishing.watch(model, optimizer=opt, run_dir=d):
        train(model, opt, steps=3)
    _write_side_files(d, name='<img src=x onerror="alert(2)">$x$')
    text = write_report(d, tmp_path / "o" / "evil.html").read_text()
    _check_self_contained(text)
    assert evil not in text and "<img src=x" not in text
    assert "blocks.&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;$x$" in text
    assert "blocks.a&amp;b" in text
    # in plots, a $ in a module name is literal text, not the start of a formula
    fig = plots.activations(d)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # the prefix every name shares is said once, in the legend's title
    assert labels == ["a&b", r"d\$x\$"]
    assert "after 'blocks.'" in fig.axes[0].get_legend().get_title().get_text()
    assert plots.png_bytes(fig)[:4] == b"\x89PNG"


def test_reports_of_an_empty_and_a_diverged_run(tmp_path):
    with vanishing.watch(mlp(depth=3), run_dir=tmp_path / "empty"):
        pass
    text = write_report(tmp_path / "empty").read_text()
    assert "<img" not in text and "No diagnosis" in text and "recorded no steps" in text
    torch.manual_seed(0)
    model = mlp(depth=3, act=nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "div"):
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(16, 5) * 100).pow(2).mean().backward()
            opt.step()
    assert vanishing.load_run(tmp_path / "div").steps["loss"].isna().any()
    text = write_report(tmp_path / "div").read_text()
    assert "non_finite" in text and text.count("<img") >= 4


def test_collection_and_sweep_reports(run_dir, tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    _record(demo / "00-sigmoid", steps=6, depth=3)
    _record(demo / "01-relu", steps=6, depth=3, act=nn.ReLU)
    text = write_report(demo).read_text()
    _check_self_contained(text)
    assert "00-sigmoid" in text and "01-relu" in text and "Comparison" in text
    assert text.count("<img") >= 3
    assert "Depth profiles of the other runs" in text
    from vanishing.report.html import render_compare

    for page in (text, render_compare([demo / "00-sigmoid", demo / "01-relu"])):
        # every caption filled in: no template field such as "{matrices}" left in the page
        assert not re.findall(r"\{[a-z_]+\}", page)
    sweep, _ = _sweep(tmp_path, run_dirs=[run_dir])
    text = write_report(sweep, tmp_path / "sweep.html").read_text()
    _check_self_contained(text)
    assert "&lt;b&gt;depth&lt;/b&gt; sweep" in text  # sweep.toml, escaped
    assert text.count("<tr><td><code>") >= 13  # every run, the pending one included
    assert "pending" in text and "model.activation" in text


def test_large_run_report_diagnoses_a_subsample(tmp_path, monkeypatch):
    bench = _bench()
    d = bench.make_run(tmp_path / "syn", layers=5, steps=400, flush_every=10)
    from vanishing.diagnose.engine import diagnose_run
    from vanishing.recorder import reader
    from vanishing.report import html as html_mod

    monkeypatch.setattr(reader, "EXACT_DIAGNOSIS_ROWS", 1000)
    data = RunData(d, max_rows=2000, max_samples=40)
    diag, note = html_mod._diagnose(data)
    assert any(re.search(r"diagnosed from (3\d|40) of 400 recorded", n) for n in diag.notes), (
        diag.notes
    )
    assert not note
    full = diagnose_run(vanishing.load_run(d))  # the exact diagnosis, from every step
    assert diag.kinds == full.kinds and diag.kinds
    for a, b in zip(diag.findings, full.findings):
        assert a.layers == b.layers
    page = html_mod.render_run(d, data=data)
    assert "diagnosed from" in page


# ---- CLI --------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "vanishing", *map(str, args)], capture_output=True, text=True
    )


def test_cli_report(run_dir, tmp_path):
    out = tmp_path / "r.html"
    r = _cli("report", run_dir, "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and out.is_file()
    r = _cli("report", tmp_path / "missing")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'missing'}: no such directory"


def test_a_damaged_part_is_skipped_with_a_warning_like_load_run(tmp_path):
    d = _record(tmp_path / "run", steps=30, flush_every=10)
    part = sorted((d / "metrics").glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        page = write_report(d)
    assert "<img" in page.read_text()


def _verdict(text):
    m = re.search(r'<p class="verdict (\w+)"><b>Verdict</b>: (.*?)</p>', text)
    assert m, "no verdict"
    assert text.index('class="verdict') < text.index("<h2>")  # the page opens with it
    return m.group(1), html.unescape(m.group(2))


def test_every_page_opens_with_a_one_sentence_verdict(run_dir, tmp_path):
    from vanishing.report.html import render_compare

    diag = vanishing.load_run(run_dir).diagnose()
    f = diag.findings[0]
    cls, sentence = _verdict(write_report(run_dir, tmp_path / "run.html").read_text())
    assert cls == f.severity and sentence.endswith(".") and sentence.count(". ") == 0
    assert f.kind.replace("_", " ") in sentence.lower() and f.severity in sentence
    assert f"'{f.layers[0]}'" in sentence and f"best remedy: {f.remedies[0].name}" in sentence
    # its first/last figure is the finding's, named by the measure the diagnosis read it from
    # (the summary's speed-of-learning figure is another measure)
    source = next(n for n in diag.notes if n.startswith("gradient through depth read from"))
    measure = source.removeprefix("gradient through depth read from the ").split(" (")[0]
    ratio = f.evidence["first_to_last_ratio"]
    assert f"(the first gets {ratio:.2g} of the last one's {measure})" in sentence
    healthy = _record(tmp_path / "healthy", steps=6, depth=1, act=nn.ReLU)
    assert vanishing.load_run(healthy).diagnose().healthy
    assert _verdict(write_report(healthy).read_text()) == ("ok", "No gradient-flow problems found.")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "a").symlink_to(run_dir, target_is_directory=True)
    (demo / "b").symlink_to(healthy, target_is_directory=True)
    cls, sentence = _verdict(write_report(demo).read_text())
    assert sentence.startswith(
        "1 of 2 runs has gradient-flow problems; in detail below, deep-sigmoid: "
    )
    assert f"best remedy: {f.remedies[0].name}" in sentence
    cls, sentence = _verdict(render_compare([run_dir, healthy]))
    assert sentence.startswith("1 of 2 runs has gradient-flow problems")
    sweep, _ = _sweep(tmp_path, run_dirs=[run_dir])
    cls, sentence = _verdict(write_report(sweep, tmp_path / "sweep.html").read_text())
    assert "runs have gradient-flow problems" in sentence or "runs has" in sentence


def test_the_verdict_of_several_runs_speaks_of_the_run_shown_in_detail(tmp_path):
    """Two runs with findings: the verdict names the one the page details (the first / last
    ratio furthest from 1), not merely the first flagged one."""
    demo = tmp_path / "demo"
    demo.mkdir()
    _record(demo / "a-shallow", steps=6, depth=3)
    _record(demo / "b-deep", steps=6, depth=8)
    kinds = {n: vanishing.load_run(demo / n).diagnose().kinds for n in ("a-shallow", "b-deep")}
    assert all(kinds.values()), kinds
    ratios = {n: vanishing.load_run(demo / n).first_last_ratio() for n in kinds}
    far = max(ratios, key=lambda n: abs(np.log10(ratios[n])))
    text = write_report(demo).read_text()
    shown = text.split("<h2>Run in detail: ")[1].split("</h2>")[0]
    assert shown == far
    _, sentence = _verdict(text)
    assert sentence.startswith(
        f"2 of 2 runs have gradient-flow problems; the one in detail below, {far}: "
    )


def test_accuracy_in_percent_dashes_not_nan_and_captions_match(run_dir, tmp_path):
    text = write_report(run_dir, tmp_path / "run.html").read_text()
    assert ">nan<" not in text and "—" in text  # a statistic that does not apply: a dash
    assert "accuracy 35.0%" in text
    assert "band 2nd-98th percentile" in text and "±1 std" not in text
    loss_caption = text.split('alt="loss"')[1].split("</figcaption>")[0]
    assert "evaluation" in loss_caption  # this run has eval.parquet
    saturation_caption = text.split('alt="saturation"')[1].split("</figcaption>")[0]
    assert "dead" not in saturation_caption  # sigmoid: no dead-unit panel is drawn
    bare = _record(tmp_path / "bare", steps=4, depth=2)  # no eval, not downsampled
    text = write_report(bare).read_text()
    loss_caption = text.split('alt="loss"')[1].split("</figcaption>")[0]
    assert "band" not in loss_caption and "eval" not in loss_caption
    sweep, _ = _sweep(tmp_path, run_dirs=[run_dir])
    text = write_report(sweep, tmp_path / "sweep.html").read_text()
    assert "0.95" not in text.split("<h2>Runs</h2>")[1].split("</table>")[0]
    assert "%</td>" in text and '"sigmoid"' not in text  # values without quotes
