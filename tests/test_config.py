"""Experiment configs: validation with one-line errors, example configs, sweep expansion."""

import hashlib
import itertools
import json
import typing
from pathlib import Path

import pytest

from vanishing.experiments import config as C
from vanishing.experiments.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    expand_sweep,
    load_config,
    parse_config,
    read_toml,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "configs").glob("*.toml"))


def _error(raw) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    message = str(e.value)
    assert "\n" not in message
    return message


def _literal(model, field) -> tuple:
    return typing.get_args(model.model_fields[field].annotation)


# ----------------------------------------------------------------------------- examples
def test_the_example_configs_exist():
    names = {p.stem for p in EXAMPLES}
    assert {
        "deep_sigmoid",
        "relu_he",
        "sweep_depth_activation",
        "rnn_adding",
        "lstm_forget_bias",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path):
    raw = read_toml(path)
    runs = expand_sweep(raw)
    assert runs, path
    is_sweep = "seeds" in raw or any(
        isinstance(v, list)
        for section in raw.values()
        if isinstance(section, dict)
        for v in section.values()
    )
    if is_sweep:
        with pytest.raises(ConfigError, match="sweep"):
            load_config(path)
    else:
        cfg = load_config(path)
        assert len(runs) == 1 and runs[0][1] == cfg
        # the file's own values survive validation
        for section in C.SECTIONS:
            for field, value in raw.get(section, {}).items():
                assert getattr(getattr(cfg, section), field) == value


def test_example_configs_say_what_they_claim():
    sig = load_config(ROOT / "configs/deep_sigmoid.toml")
    assert (sig.model.activation, sig.model.depth) == ("sigmoid", 10)
    relu = load_config(ROOT / "configs/relu_he.toml")
    assert (relu.model.activation, relu.model.init) == ("relu", "he_normal")
    lstm = load_config(ROOT / "configs/lstm_forget_bias.toml")
    assert (lstm.model.kind, lstm.model.cell, lstm.model.forget_bias) == ("rnn", "lstm", 1.0)
    rnn = load_config(ROOT / "configs/rnn_adding.toml")
    assert (rnn.task.name, rnn.model.kind, rnn.model.cell) == ("adding", "rnn", "rnn")
    runs = expand_sweep(read_toml(ROOT / "configs/sweep_depth_activation.toml"))
    params = [p for p, _ in runs]
    assert {p["model.activation"] for p in params} >= {"sigmoid", "relu"}
    assert len({p["model.depth"] for p in params}) >= 2 and len({p["seed"] for p in params}) >= 2


def test_allowed_values_are_the_builders_own():
    """The config accepts exactly what the task and model builders accept."""
    from vanishing.experiments import models, tasks

    M = C.ModelConfig
    assert set(_literal(C.TaskConfig, "name")) == set(tasks.TASKS)
    assert set(_literal(M, "activation")) == set(models.ACTIVATIONS)
    assert set(_literal(M, "init")) == set(models.INITS)
    assert set(_literal(M, "kind")) == set(models.KINDS)
    assert set(_literal(M, "cell")) == set(models.CELLS)
    assert set(_literal(M, "norm")) == set(models.NORMS)
    assert set(_literal(M, "bias_init")) == set(models.BIAS_INITS)
    assert set(_literal(M, "recurrent_init")) == set(models.RECURRENT_INITS)


def test_defaults_match_the_documented_format():
    d = ExperimentConfig().to_dict()
    assert set(d) == {"name", "seed", "task", "model", "train", "monitor"}
    assert d["task"]["name"] == "digits" and d["task"]["standardize"] == "standard"
    assert d["model"]["depth"] == 10 and d["model"]["activation"] == "sigmoid"
    assert d["train"] == {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "lr_schedule": "constant",
        "lr_step": 0,
        "lr_gamma": 0.1,
        "steps": 400,
        "batch_size": 64,
        "clip_norm": 0.0,
        "pretrain_steps": 0,
        "pretrain_lr": 0.1,
        "eval_every": 50,
        "device": "cpu",
    }
    assert d["monitor"] == {"stats": "all", "every": 1, "flush_every": 50, "sinks": []}


def test_every_field_is_documented():
    doc = (ROOT / "docs/config.md").read_text()
    for section in C.SECTIONS:
        model = ExperimentConfig.model_fields[section].annotation
        for field in model.model_fields:
            assert f"`{section}.{field}`" in doc, f"{section}.{field} is not in docs/config.md"


# ----------------------------------------------------------------------------- errors
def test_unknown_field_suggests_the_nearest():
    assert _error({"model": {"actvation": "relu"}}) == (
        "unknown field model.actvation (did you mean activation?)"
    )
    assert _error({"trian": {}}) == "unknown field trian (did you mean train?)"
    assert _error({"model": {"zzz": 1}}).startswith("unknown field model.zzz (known fields: kind,")


def test_bad_choice_lists_the_allowed_values():
    msg = _error({"model": {"activation": "sigmod"}})
    allowed = ", ".join(_literal(C.ModelConfig, "activation"))
    assert msg == f"model.activation: 'sigmod' is not one of {allowed}"
    assert _error({"train": {"optimizer": "rmsprop"}}) == (
        "train.optimizer: 'rmsprop' is not one of sgd, momentum, adam, adamw"
    )


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"model": {"depth": -1}}, "model.depth: must be >= 0, got -1"),
        ({"train": {"lr": 0}}, "train.lr: must be > 0.0, got 0"),
        ({"train": {"momentum": 1.0}}, "train.momentum: must be < 1.0, got 1.0"),
        ({"train": {"steps": 2.5}}, "train.steps: expected an integer, got 2.5"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
        ({"train": {"lr": float("inf")}}, "train.lr: expected a finite number, got inf"),
        ({"model": {"residual": 1}}, "model.residual: expected true or false, got 1"),
        ({"model": {"depth": True}}, "model.depth: expected an integer, got True"),
        ({"monitor": {"every": 0}}, "monitor.every: 0 is not a positive integer or 'log'"),
        ({"model": 3}, "model: expected a table, got 3"),
    ],
)
def test_type_and_range_errors_name_the_field(raw, expected):
    assert _error(raw) == expected


def test_a_list_in_a_single_run_points_to_sweep():
    assert "vanishing sweep" in _error({"model": {"depth": [2, 4]}})
    assert "vanishing sweep" in _error({"seeds": [0, 1]})


@pytest.mark.parametrize(
    "raw, start",
    [
        ({"model": {"kind": "rnn", "activation": "sigmoid"}}, "model.activation: 'sigmoid'"),
        ({"model": {"kind": "transformer", "width": 30, "heads": 4}}, "model.heads:"),
        ({"task": {"name": "mnist"}}, "task.data_dir:"),
        ({"model": {"forget_bias": 1.0}}, "model.forget_bias:"),
        ({"model": {"kind": "rnn", "activation": "tanh", "norm": "batch"}}, "model.norm:"),
        ({"model": {"kind": "transformer", "norm": "batch"}}, "model.norm:"),
        ({"model": {"kind": "cnn"}, "train": {"pretrain_steps": 5}}, "train.pretrain_steps:"),
        ({"model": {"kind": "rnn", "activation": "tanh", "depth": 0}}, "model.depth:"),
    ],
)
def test_cross_field_checks(raw, start):
    assert _error(raw).startswith(start)


def test_cross_field_combinations_that_are_fine():
    parse_config({"model": {"kind": "rnn", "cell": "lstm", "forget_bias": 1.0}})
    parse_config({"model": {"kind": "rnn", "cell": "rnn", "activation": "relu"}})
    parse_config({"model": {"kind": "transformer", "width": 32, "heads": 8}})
    parse_config({"task": {"name": "mnist", "data_dir": "/data/mnist"}})
    parse_config({"task": {"name": "adding"}, "model": {"kind": "mlp"}})


def test_the_cross_field_rules_agree_with_the_model_builder():
    """Every combination the config rejects, build_model rejects too (and the reverse for the
    ones it accepts), on a small grid of the constrained fields."""
    from vanishing.experiments.models import build_model
    from vanishing.experiments.tasks import make_task

    task = make_task("adding", seq_len=4, n_train=8, n_test=4)
    grid = itertools.product(
        ["mlp", "rnn", "transformer"],
        ["rnn", "lstm"],
        ["sigmoid", "tanh"],
        ["none", "batch"],
        [0.0, 1.0],
    )
    for kind, cell, act, norm, fb in grid:
        model = {
            "kind": kind,
            "cell": cell,
            "activation": act,
            "norm": norm,
            "forget_bias": fb,
            "depth": 1,
            "width": 8,
        }
        try:
            parse_config({"task": {"name": "adding"}, "model": model})
            accepted = True
        except ConfigError:
            accepted = False
        try:
            build_model(task, **model)
            built = True
        except ValueError:
            built = False
        assert accepted == built, model


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndepth = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[model]\ndepth = 'deep'\n")
    with pytest.raises(ConfigError) as e:
        load_config(wrong)
    assert str(e.value) == f"{wrong}: model.depth: expected an integer, got 'deep'"


def test_overrides_parse_values_as_toml():
    raw = apply_overrides(
        {"model": {"depth": 10}},
        ["model.depth=20", "model.activation=relu", "train.lr=1e-3", "model.residual=true"],
    )
    cfg = parse_config(raw)
    assert (cfg.model.depth, cfg.model.activation, cfg.train.lr, cfg.model.residual) == (
        20,
        "relu",
        0.001,
        True,
    )
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        apply_overrides({}, ["model.depth"])
    with pytest.raises(ConfigError, match="unknown section"):
        apply_overrides({}, ["modle.depth=3"])
    with pytest.raises(ConfigError, match=r"unknown field depth \(did you mean model\.depth\?\)"):
        apply_overrides({}, ["depth=5"])
    with pytest.raises(ConfigError, match=r"did you mean train\.lr\?"):
        apply_overrides({}, ["train.rl=0.1"])


# ----------------------------------------------------------------------------- sweeps
def test_sweep_is_the_cartesian_product_times_seeds():
    raw = {
        "name": "grid",
        "seeds": [3, 4],
        "model": {"activation": ["sigmoid", "tanh", "relu"], "depth": [2, 5], "width": 8},
        "train": {"lr": [0.1, 0.01], "steps": 10},
    }
    runs = expand_sweep(raw)
    expected = list(itertools.product(["sigmoid", "tanh", "relu"], [2, 5], [0.1, 0.01], [3, 4]))
    assert len(runs) == 3 * 2 * 2 * 2
    got = [(p["model.activation"], p["model.depth"], p["train.lr"], p["seed"]) for p, _ in runs]
    assert got == expected  # axes in file order, seeds innermost
    for params, cfg in runs:
        assert list(params) == ["model.activation", "model.depth", "train.lr", "seed"]
        assert (cfg.model.activation, cfg.model.depth, cfg.train.lr, cfg.seed) == (
            params["model.activation"],
            params["model.depth"],
            params["train.lr"],
            params["seed"],
        )
        assert cfg.model.width == 8 and cfg.train.steps == 10 and cfg.name == "grid"
    assert raw["model"]["depth"] == [2, 5]  # the input is not modified


def test_sweep_keys_are_stable_unique_hashes_of_the_resolved_config():
    raw = {"model": {"depth": [2, 3]}, "seeds": [0, 1]}
    runs = expand_sweep(raw)
    keys = [cfg.key for _, cfg in runs]
    assert len(set(keys)) == 4 and all(len(k) == 16 for k in keys)
    assert keys == [cfg.key for _, cfg in expand_sweep(raw)]
    # the key is sha256 of the resolved config's JSON, sorted keys: independent of how the
    # file spelled it (defaults omitted or written, int or float, key order)
    explicit = parse_config(
        {"train": {"lr": 0.1, "steps": 400}, "seed": 1, "model": {"depth": 3, "kind": "mlp"}}
    )
    implicit = parse_config({"model": {"depth": 3}, "seed": 1})
    assert explicit.key == implicit.key == keys[3]
    text = json.dumps(implicit.to_dict(), sort_keys=True, separators=(",", ":"))
    assert implicit.key == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert parse_config({"model": {"depth": 3}, "seed": 2}).key != implicit.key


def test_single_seed_and_no_lists_is_one_run():
    runs = expand_sweep({"seed": 7, "model": {"depth": 2}})
    assert [(p, c.seed) for p, c in runs] == [({"seed": 7}, 7)]


def test_every_point_is_validated_before_anything_runs():
    with pytest.raises(ConfigError) as e:
        expand_sweep({"model": {"activation": ["relu", "sigmod"], "depth": [2, 3]}})
    msg = str(e.value)
    assert msg.startswith("model.activation: 'sigmod' is not one of")
    assert "model.activation='sigmod'" in msg and "\n" not in msg
    # a cross-field failure that only one combination triggers
    with pytest.raises(ConfigError, match="model.heads"):
        expand_sweep({"model": {"kind": "transformer", "width": [32, 30], "heads": 4}})


def test_sweep_errors():
    with pytest.raises(ConfigError, match="empty list"):
        expand_sweep({"model": {"depth": []}})
    with pytest.raises(ConfigError, match="empty list"):
        expand_sweep({"seeds": []})
    with pytest.raises(ConfigError, match="not both"):
        expand_sweep({"seed": 1, "seeds": [1, 2]})
    with pytest.raises(ConfigError, match="same run twice"):
        expand_sweep({"model": {"depth": [2, 2]}})
    with pytest.raises(ConfigError, match="unknown field model.dpeth"):
        expand_sweep({"model": {"dpeth": [2, 3]}})
