"""`run_experiment` and `vanishing run`: seeded training into a run directory, evaluation,
divergence and failures recorded (never raised), optimizer / schedule / clipping wiring."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import vanishing
from vanishing.experiments.config import parse_config
from vanishing.experiments.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "status",
    "steps",
    "train_loss",
    "test_loss",
    "test_metric",
    "metric_name",
    "first_last_ratio",
    "kinds",
    "seconds",
    "error",
}


def _cfg(**sections):
    raw = {
        "task": {"name": "teacher", "n_train": 256, "n_test": 128, "n_features": 16},
        "model": {"depth": 3, "width": 16, "activation": "tanh", "init": "xavier_normal"},
        "train": {"steps": 20, "batch_size": 32, "eval_every": 10, "lr": 0.05},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return parse_config(raw)


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "vanishing", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_run_directory_holds_config_eval_and_summary(tmp_path):
    cfg = _cfg()
    summary = run_experiment(cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    assert set(summary) == SUMMARY_KEYS
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert json.loads((run_dir / "config.json").read_text()) == cfg.to_dict()
    assert summary["status"] == "completed" and summary["steps"] == 20 and summary["error"] is None
    assert summary["metric_name"] == "accuracy"

    ev = pd.read_parquet(run_dir / "eval.parquet")
    assert list(ev.columns) == ["step", "split", "loss", "metric", "metric_name"]
    assert str(ev["step"].dtype) == "int64" and str(ev["loss"].dtype) == "float64"
    # every eval_every steps and at the end, on both splits
    assert ev[ev.split == "test"]["step"].tolist() == [9, 19]
    assert ev[ev.split == "train"]["step"].tolist() == [9, 19]
    last = ev[(ev.split == "test") & (ev.step == 19)].iloc[0]
    assert summary["test_loss"] == pytest.approx(last["loss"])
    assert summary["test_metric"] == pytest.approx(last["metric"])

    # the monitor's records are there, one step per optimizer step, losses as trained
    run = vanishing.load_run(run_dir)
    assert run.steps["step"].tolist() == list(range(20))
    assert summary["train_loss"] == pytest.approx(run.steps["loss"].iloc[-1])
    assert summary["kinds"] == run.diagnose().kinds


def test_final_evaluation_is_an_independent_forward_of_the_trained_model(tmp_path):
    """Full-batch SGD: step 0's recorded loss is the loss of the freshly built, seeded model on
    the whole training set; the test metric is the accuracy of the model after the last step."""
    from vanishing.experiments.models import build_model
    from vanishing.experiments.tasks import make_task

    cfg = _cfg(train={"batch_size": 0, "steps": 5, "eval_every": 100})
    summary = run_experiment(cfg, tmp_path / "run")
    task = make_task("teacher", seed=0, n_train=256, n_test=128, n_features=16)
    torch.manual_seed(0)
    model = build_model(task, **cfg.model.model_dump())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(task.x_train), task.y_train)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        out = model(task.x_test)
        acc = (out.argmax(1) == task.y_test).float().mean().item()
        test_loss = torch.nn.functional.cross_entropy(out, task.y_test).item()
    recorded = vanishing.load_run(tmp_path / "run").steps["loss"].tolist()
    assert recorded == pytest.approx(losses, rel=1e-6)
    assert summary["test_metric"] == pytest.approx(acc)
    assert summary["test_loss"] == pytest.approx(test_loss, rel=1e-5)


def test_same_config_twice_gives_identical_losses(tmp_path):
    cfg = _cfg(train={"steps": 15, "optimizer": "momentum"})
    run_experiment(cfg, tmp_path / "a")
    run_experiment(cfg, tmp_path / "b")
    a, b = vanishing.load_run(tmp_path / "a"), vanishing.load_run(tmp_path / "b")
    assert a.steps["loss"].tolist() == b.steps["loss"].tolist()
    cols = ["grad_norm", "param_norm", "update_norm"]
    pd.testing.assert_frame_equal(a.metrics[cols], b.metrics[cols])
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "a/eval.parquet"), pd.read_parquet(tmp_path / "b/eval.parquet")
    )
    # and another seed changes them
    run_experiment(_cfg(train={"steps": 15, "optimizer": "momentum"}, seed=1), tmp_path / "c")
    c = vanishing.load_run(tmp_path / "c")
    assert c.steps["loss"].tolist() != a.steps["loss"].tolist()


def test_divergence_stops_the_run_and_is_recorded(tmp_path):
    cfg = _cfg(
        model={"activation": "relu", "init": "he_normal"},
        train={"lr": 1e6, "steps": 50, "optimizer": "sgd"},
    )
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["status"] == "diverged"
    assert 1 <= summary["steps"] < 50
    assert summary["train_loss"] is None and summary["error"] is None
    assert "non_finite" in summary["kinds"]
    steps = vanishing.load_run(tmp_path / "run").steps
    assert len(steps) == summary["steps"]
    assert not math.isfinite(steps["loss"].iloc[-1])
    assert math.isfinite(steps["loss"].iloc[0])
    json.loads((tmp_path / "run/summary.json").read_text())  # strict JSON: no NaN


def test_an_exception_in_training_is_a_failed_run_with_its_records_kept(tmp_path):
    def explode(step, loss, monitor):
        if step == 6:
            raise RuntimeError("boom at step 6")

    summary = run_experiment(_cfg(), tmp_path / "run", progress=explode)
    assert summary["status"] == "failed"
    assert summary["error"] == "RuntimeError: boom at step 6"
    assert summary["steps"] == 7
    steps = vanishing.load_run(tmp_path / "run").steps
    assert steps["step"].tolist() == list(range(7))  # flushed when the monitor closed


def test_a_run_that_cannot_start_is_failed_not_raised(tmp_path):
    empty = tmp_path / "no-mnist-here"
    empty.mkdir()
    cfg = parse_config({"task": {"name": "mnist", "data_dir": str(empty)}})
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["status"] == "failed" and summary["steps"] == 0
    assert summary["error"] and summary["kinds"] is None  # not judged: no steps recorded
    assert (tmp_path / "run/summary.json").exists()


def test_an_existing_run_is_never_overwritten(tmp_path):
    run_experiment(_cfg(train={"steps": 2}), tmp_path / "run")
    with pytest.raises(FileExistsError):
        run_experiment(_cfg(train={"steps": 2}), tmp_path / "run")


@pytest.mark.parametrize(
    "optimizer, cls, extra",
    [
        ("sgd", "SGD", {"momentum": 0}),
        ("momentum", "SGD", {"momentum": 0.5}),
        ("adam", "Adam", {}),
        ("adamw", "AdamW", {}),
    ],
)
def test_optimizers_are_wired(tmp_path, optimizer, cls, extra):
    cfg = _cfg(train={"optimizer": optimizer, "momentum": 0.5, "weight_decay": 0.01, "steps": 3})
    assert run_experiment(cfg, tmp_path / "run")["status"] == "completed"
    opt = json.loads((tmp_path / "run/manifest.json").read_text())["optimizer"]
    assert opt["type"] == cls
    assert opt["defaults"]["lr"] == pytest.approx(0.05)
    assert opt["defaults"]["weight_decay"] == pytest.approx(0.01)
    for k, v in extra.items():
        assert opt["defaults"][k] == v


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_learning_rate_schedule(tmp_path, schedule):
    """Plain SGD: each parameter's update is lr_t times its gradient, so the recorded
    update_norm / grad_norm is the learning rate in force at each step."""
    steps, lr = 12, 0.05
    cfg = _cfg(train={"lr_schedule": schedule, "lr_step": 4, "lr_gamma": 0.5, "steps": steps})
    run_experiment(cfg, tmp_path / "run")
    m = vanishing.load_run(tmp_path / "run").metrics
    m = m[(m.param == "weight") & (m.grad_norm > 0)]
    measured = (m.update_norm / m.grad_norm).groupby(m.step).median().to_numpy()
    t = np.arange(steps)
    expected = {
        "constant": np.full(steps, lr),
        "cosine": lr * (1 + np.cos(np.pi * t / steps)) / 2,
        "step": lr * 0.5 ** (t // 4),
    }[schedule]
    np.testing.assert_allclose(measured, expected, rtol=1e-4)


def test_gradient_clipping_bounds_the_total_norm(tmp_path):
    cfg = _cfg(
        model={"activation": "relu", "init": "he_normal"},
        train={"clip_norm": 0.01, "steps": 6, "lr": 0.01},
    )
    run_experiment(cfg, tmp_path / "run")
    m = vanishing.load_run(tmp_path / "run").metrics
    total = m[m.param != ""].groupby("step")["grad_norm"].apply(lambda g: np.sqrt((g**2).sum()))
    assert len(total) == 6
    np.testing.assert_allclose(total.to_numpy(), 0.01, rtol=1e-4)  # clipped to exactly c


def test_minibatches_cycle_through_the_training_set(tmp_path):
    """Batches of 64 from 256 examples: each epoch of 4 steps sees every example exactly once.
    With a negligible learning rate the model does not change, so the mean of an epoch's 4
    minibatch losses is the full-batch loss (which batch_size 0 records)."""
    full = _cfg(train={"batch_size": 0, "steps": 1, "lr": 1e-12})
    mini = _cfg(train={"batch_size": 64, "steps": 8, "lr": 1e-12})
    run_experiment(full, tmp_path / "full")
    run_experiment(mini, tmp_path / "mini")
    whole = vanishing.load_run(tmp_path / "full").steps["loss"].iloc[0]
    losses = vanishing.load_run(tmp_path / "mini").steps["loss"].to_numpy()
    assert np.mean(losses[:4]) == pytest.approx(whole, rel=1e-5)
    assert np.mean(losses[4:]) == pytest.approx(whole, rel=1e-5)
    assert len(set(losses[:4].round(6))) == 4  # four different batches, not the same one


def test_pretraining_changes_the_starting_point(tmp_path):
    base = _cfg(model={"activation": "sigmoid"}, train={"steps": 3})
    pre = _cfg(model={"activation": "sigmoid"}, train={"steps": 3, "pretrain_steps": 20})
    run_experiment(base, tmp_path / "base")
    s = run_experiment(pre, tmp_path / "pre")
    assert s["status"] == "completed"
    w0 = vanishing.load_run(tmp_path / "base").metrics
    w1 = vanishing.load_run(tmp_path / "pre").metrics
    first = (w0.step == 0) & (w0.layer == "hidden.0.linear") & (w0.param == "weight")
    first1 = (w1.step == 0) & (w1.layer == "hidden.0.linear") & (w1.param == "weight")
    # the same seeded init, then 20 autoencoder steps: the first layer's weights moved
    assert w0[first]["param_norm"].item() != w1[first1]["param_norm"].item()
    head0 = w0[(w0.step == 0) & (w0.layer == "head") & (w0.param == "weight")]
    head1 = w1[(w1.step == 0) & (w1.layer == "head") & (w1.param == "weight")]
    assert head0["param_norm"].item() == head1["param_norm"].item()  # the head is left alone
    # train.pretrain_lr drives the pretraining: at 1e-9 the first layer barely moves
    slow = _cfg(
        model={"activation": "sigmoid"},
        train={"steps": 3, "pretrain_steps": 20, "pretrain_lr": 1e-9},
    )
    run_experiment(slow, tmp_path / "slow")
    w2 = vanishing.load_run(tmp_path / "slow").metrics
    first2 = (w2.step == 0) & (w2.layer == "hidden.0.linear") & (w2.param == "weight")
    base_norm, slow_norm = w0[first]["param_norm"].item(), w2[first2]["param_norm"].item()
    assert slow_norm == pytest.approx(base_norm, rel=1e-6)
    assert abs(w1[first1]["param_norm"].item() - base_norm) > 1e-3 * base_norm


def test_first_last_ratio_is_the_median_of_bias_gradient_ratios(tmp_path):
    cfg = _cfg(model={"depth": 4, "activation": "sigmoid", "init": "glorot_standard"})
    summary = run_experiment(cfg, tmp_path / "run")
    m = vanishing.load_run(tmp_path / "run").metrics
    b = m[m.param == "bias"].pivot_table(index="step", columns="layer", values="grad_norm")
    expected = float(np.median(b["hidden.0.linear"] / b["hidden.3.linear"]))
    assert summary["first_last_ratio"] == pytest.approx(expected)
    assert summary["first_last_ratio"] < 0.1  # sigmoid + standard init: vanishing


def test_first_last_ratio_with_batch_norm_reads_the_norm_bias(tmp_path):
    cfg = _cfg(model={"depth": 3, "norm": "batch"})
    run_experiment(cfg, tmp_path / "run")
    run = vanishing.load_run(tmp_path / "run")
    b = run.metrics[run.metrics.param == "bias"].pivot_table(
        index="step", columns="layer", values="grad_norm"
    )
    expected = float(np.median(b["hidden.0.norm"] / b["hidden.2.norm"]))
    assert run.first_last_ratio() == pytest.approx(expected)


@pytest.mark.parametrize(
    "config",
    ["deep_sigmoid.toml", "lstm_forget_bias.toml"],
)
def test_example_configs_train(tmp_path, config):
    from vanishing.experiments.config import apply_overrides, read_toml

    raw = apply_overrides(
        read_toml(ROOT / "configs" / config),
        ["train.steps=15", "train.eval_every=15", "task.n_train=256", "task.n_test=64"]
        + (["task.seq_len=20", "model.width=16"] if config == "lstm_forget_bias.toml" else []),
    )
    summary = run_experiment(parse_config(raw), tmp_path / "run")
    assert summary["status"] == "completed", summary
    if config == "deep_sigmoid.toml":
        assert "vanishing_gradient" in summary["kinds"]
        assert summary["first_last_ratio"] < 1e-4
    if config == "lstm_forget_bias.toml":
        assert summary["metric_name"] == "mse"
        assert not vanishing.load_run(tmp_path / "run").temporal.empty


def test_cli_run_trains_and_prints_a_summary(tmp_path):
    out = tmp_path / "run"
    r = _cli(
        "run",
        ROOT / "configs/deep_sigmoid.toml",
        "--out",
        out,
        "--set",
        "train.steps=30",
        "--set",
        "model.depth=6",
        "--set",
        "task.name=teacher",  # generated data: no scikit-learn import in the subprocess
        "--set",
        "task.n_train=512",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["status"] == "completed"
    assert json.loads((out / "config.json").read_text())["model"]["depth"] == 6
    assert json.loads((out / "config.json").read_text())["task"]["name"] == "teacher"
    assert "first / last" in r.stdout and "vanishing_gradient" in r.stdout
    assert str(out) in r.stdout


def test_cli_run_bad_input_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[model]\nactivation = 'sigmod'\n")
    kept = tmp_path / "occupied" / "notes.txt"  # a user's directory: nothing may be overwritten
    kept.parent.mkdir()
    kept.write_text("mine")
    cases = [
        (("run", cfg), "model.activation: 'sigmod' is not one of sigmoid"),
        (("run", tmp_path / "missing.toml"), "no such config file"),
        (("run", ROOT / "configs/deep_sigmoid.toml", "--set", "model.dpeth=3"), "did you mean"),
        (
            (
                "run",
                ROOT / "configs/deep_sigmoid.toml",
                "--set",
                "task.name=mnist",
                "--set",
                f"task.data_dir={tmp_path / 'nope'}",
            ),
            "is not a directory",
        ),
        (
            (
                "run",
                ROOT / "configs/deep_sigmoid.toml",
                "--set",
                "task.name=mnist",
                "--set",
                f"task.data_dir={tmp_path}",  # a directory without the IDX files
            ),
            "MNIST file train-images-idx3-ubyte not found",
        ),
        (("run", ROOT / "configs/relu_he.toml", "--out", cfg), "is a file"),
        (("run", ROOT / "configs/relu_he.toml", "--out", kept.parent), "is not empty"),
    ]
    for args, text in cases:
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and text in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert [p.name for p in kept.parent.iterdir()] == ["notes.txt"] and kept.read_text() == "mine"


def test_every_model_kind_trains_with_a_hidden_layer_profile(tmp_path):
    """cnn (batch norm: read at the norms' biases), transformer (attention's in_proj_bias) and a
    stacked GRU (its bias_ih): each run completes and its ratio is first / last of those; the
    cnn's two blocks compare each role of block 0 with the same role of block 1 (median over
    roles per step), not the stem with the last block's second conv."""
    from vanishing.recorder.semantics import hidden_layers, speed_source

    models = {
        "cnn": {"kind": "cnn", "depth": 2, "width": 4, "activation": "relu", "norm": "batch"},
        "transformer": {"kind": "transformer", "depth": 1, "width": 8, "heads": 2},
        "rnn": {"kind": "rnn", "cell": "gru", "depth": 2, "width": 4},
    }
    first_last = {
        "cnn": (("stem.norm", "bias"), ("blocks.1.norm2", "bias")),
        "transformer": (("embed", "bias"), ("encoder.layers.0.linear2", "bias")),
        "rnn": (("recurrent.0", "bias_ih_l0"), ("recurrent.1", "bias_ih_l0")),
    }
    for name, model in models.items():
        cfg = _cfg(model=model, train={"steps": 3, "optimizer": "adam", "lr": 1e-3})
        summary = run_experiment(cfg, tmp_path / name)
        assert summary["status"] == "completed", summary
        run = vanishing.load_run(tmp_path / name)
        hidden = hidden_layers(run.layer_info)
        sources = tuple(speed_source(run.layer_info, n) for n in (hidden[0], hidden[-1]))
        assert sources == first_last[name]
        m = run.metrics

        def speed(layer, param, m=m):
            return m[(m.layer == layer) & (m.param == param)].set_index("step")["grad_norm"]

        if name == "cnn":
            roles = [("conv1", "norm1"), ("conv2", "norm2")]  # each conv read at its norm
            per_step = np.median(
                [speed(f"blocks.0.{n}", "bias") / speed(f"blocks.1.{n}", "bias") for _, n in roles],
                axis=0,
            )
        else:
            per_step = speed(*first_last[name][0]) / speed(*first_last[name][1])
        assert summary["first_last_ratio"] == pytest.approx(float(np.median(per_step)))


def test_a_stacked_lstm_is_one_speed_unit_per_layer(tmp_path):
    """torch runs a 3-layer nn.LSTM as one module: its speed of learning, first/last ratio,
    report table and logger tags still show its layers apart, each read at its own bias_ih_lK
    (checked against the gradients the loop itself saw)."""
    from vanishing.report.data import RunData
    from vanishing.report.formatting import DASH
    from vanishing.report.html import _cell, _layer_table
    from vanishing.sinks.scalars import ScalarSelector

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(3, 6, num_layers=3, batch_first=True)
            self.head = torch.nn.Linear(6, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = {f"l{k}": [] for k in range(3)}
    with vanishing.watch(net, opt, run_dir=tmp_path / "r"):
        for _ in range(4):
            opt.zero_grad()
            net(torch.randn(8, 5, 3)).pow(2).mean().backward()
            for k in range(3):
                seen[f"l{k}"].append(float(getattr(net.rnn, f"bias_ih_l{k}").grad.norm()))
            opt.step()
    run = vanishing.load_run(tmp_path / "r")
    speeds = run.speeds()
    assert list(speeds.columns) == ["rnn.l0", "rnn.l1", "rnn.l2"]
    for k in range(3):
        assert speeds[f"rnn.l{k}"].tolist() == pytest.approx(seen[f"l{k}"], rel=1e-5)
    ratios = np.array(seen["l0"]) / np.array(seen["l2"])
    assert run.first_last_ratio() == pytest.approx(float(np.median(ratios)), rel=1e-5)

    data = RunData(tmp_path / "r")
    assert list(data.speed().mean.columns) == ["rnn.l0", "rnn.l1", "rnn.l2"]
    table = _layer_table(data)

    def speed_cell(label):  # the 6th cell: the speed of learning (median)
        row = table.split(f"<code>{label}</code>")[1].split("</tr>")[0]
        return re.findall(r"<td[^>]*>(.*?)</td>", row)[4]

    for k in range(3):  # each stacked layer's speed on its weight_ih_lK row, once
        assert speed_cell(f"rnn.weight_ih_l{k}") == _cell(np.median(seen[f"l{k}"]))
        assert speed_cell(f"rnn.weight_hh_l{k}") == DASH

    sel = ScalarSelector()
    sel.observe_manifest(run.manifest)
    assert sel.hidden == ["rnn.l0", "rnn.l1", "rnn.l2"]
    assert sel._layer_weight("rnn.l1") == ("rnn", "weight_ih_l1")


# ------------------------------------------------------------------ the one training loop
def test_the_loop_evaluates_between_steps_and_after_the_monitor_closes(tmp_path):
    from vanishing.experiments.train import minibatches, train

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen, monitors = [], []

    def evaluate(step):
        seen.append((step, "open" if " open " in repr(monitors[-1]) else "closed"))

    log = train(
        net,
        minibatches(x, y, batch_size=16, generator=torch.Generator().manual_seed(0)),
        torch.nn.functional.mse_loss,
        opt,
        steps=5,
        watch={"run_dir": tmp_path / "run"},
        evaluate=evaluate,
        eval_every=2,
        on_step=lambda step, loss, mon: monitors.append(mon),
    )
    assert seen == [(1, "open"), (3, "open"), (4, "closed")]
    assert log.steps == 5 and not log.diverged and log.monitor is monitors[0]
    assert vanishing.load_run(tmp_path / "run").steps["step"].tolist() == list(range(5))
    # unwatched, without per-step reads: the same losses, read once at the end
    torch.manual_seed(0)
    net2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    quiet = train(
        net2,
        minibatches(x, y, batch_size=16, generator=torch.Generator().manual_seed(0)),
        torch.nn.functional.mse_loss,
        torch.optim.SGD(net2.parameters(), lr=0.1),
        steps=5,
        stop_on_nonfinite=False,
    )
    assert quiet.losses == log.losses and quiet.monitor is None


def test_every_training_loop_is_the_one_loop(tmp_path, monkeypatch):
    """The runner, pretraining, the demo's classifier and the Nielsen reproduction all train
    through ``experiments.train.train``."""
    import vanishing.experiments.train as train_mod
    from vanishing.experiments.data import digits
    from vanishing.experiments.models import mlp
    from vanishing.experiments.reproductions import nielsen

    calls = []
    real = train_mod.train

    def spy(*args, **kwargs):
        calls.append(kwargs.get("watch") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train", spy)
    run_experiment(
        _cfg(model={"depth": 2}, train={"steps": 2, "pretrain_steps": 2}), tmp_path / "r"
    )
    assert calls == [False, False, True]  # two hidden layers pretrained, then the run
    train_mod.train_classifier(mlp(64, 10, depth=1), digits(), run_dir=tmp_path / "c", steps=2)
    x, y, _ = nielsen.load_data()
    nielsen.train_net([64, 30, 10], x, y, seed=0, steps=2, run_dir=tmp_path / "n")
    assert calls == [False, False, True, True, True]
