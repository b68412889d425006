"""Sinks chosen by name in a config (and so from the CLI with --set monitor.sinks=[...])."""

import pytest

import vanishing
from vanishing.experiments.config import ConfigError, parse_config
from vanishing.experiments.runner import run_experiment

pytest.importorskip("tensorboard")


def _cfg(**monitor):
    return parse_config(
        {
            "task": {"name": "teacher", "n_train": 128, "n_test": 64, "n_features": 8},
            "model": {"depth": 3, "width": 8, "activation": "tanh"},
            "train": {"steps": 6, "batch_size": 32, "eval_every": 6},
            "monitor": monitor,
        }
    )


def test_a_tensorboard_sink_by_name_logs_the_run_beside_its_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_experiment(_cfg(sinks=["tensorboard"]), run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("vanishing/loss")]
    recorded = vanishing.load_run(run_dir).steps.loss.tolist()
    assert losses == pytest.approx(recorded, rel=1e-6)  # float32 in the event file


def test_an_unknown_sink_name_is_a_config_error():
    with pytest.raises(ConfigError, match="monitor.sinks"):
        _cfg(sinks=["tensorbored"])
